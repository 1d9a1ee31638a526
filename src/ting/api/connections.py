"""Connections: the limits production servers put on idle, slow and surplus clients (nginx's
client_header_timeout / client_body_timeout / worker_connections, Apache's mod_reqtimeout).

uvicorn closes a keep-alive connection only after a response, and only if no byte arrives: a socket that never
sends a request, or that sends its headers a byte at a time (slowloris), is held forever, one file descriptor
each. `guarded_protocol` is uvicorn's h11 protocol with three more rules:

- a request's headers must be complete within `header_timeout_s` of the connection opening (or of the previous
  response ending), however the bytes trickle in; otherwise 408 and the connection is closed;
- while a request body is being read, `body_timeout_s` of silence closes the connection (the route sees the
  client gone); time the route itself spends not reading does not count;
- at `max_connections` open connections, the one that has waited longest for a request (idle, or trickling its
  headers) is closed to make room; if every connection is busy with a request, the new one is answered 503 at
  once and closed, before any parsing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ting.config import Settings

REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 44\r\n\r\nThe request headers did not arrive in time.\n"
)
TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\nContent-Type: text/plain"
    b"\r\nContent-Length: 38\r\n\r\nToo many open connections; try again.\n"
)


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int


class GuardedH11Protocol(H11Protocol):
    limits = ConnectionLimits(header_timeout_s=20.0, body_timeout_s=30.0, max_connections=1000)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False
        self._guard_timer: asyncio.TimerHandle | None = None
        self._phase = ""
        self._phase_since = 0.0

    # --- asyncio.Protocol -------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections and not self._reclaim_one():
            self._refused = True  # never registered with the server: costs one write and a close
            self.transport = transport
            transport.write(TOO_MANY)
            transport.close()
            return
        super().connection_made(transport)
        self._watch()

    def _reclaim_one(self) -> bool:
        """At the cap, close the connection that has waited longest for a request (idle or trickling headers),
        so that idle sockets cannot lock out clients that do send requests. False if every one is busy."""
        waiting = [
            c
            for c in self.connections
            if isinstance(c, GuardedH11Protocol) and c._phase == "headers" and not c.transport.is_closing()
        ]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c._phase_since)
        oldest._cancel()
        oldest.transport.write(REQUEST_TIMEOUT)
        oldest.transport.close()
        self.connections.discard(oldest)  # uvicorn forgets it in connection_lost too; count the room now
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        self._watch(data_arrived=True)

    def eof_received(self) -> None:
        if not self._refused:
            super().eof_received()

    def pause_writing(self) -> None:
        if not self._refused:
            super().pause_writing()

    def resume_writing(self) -> None:
        if not self._refused:
            super().resume_writing()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    # --- the deadlines ------------------------------------------------------------------------------------------

    def _current_phase(self) -> str:
        if self.cycle is None or self.cycle.response_complete:
            return "headers"  # waiting for (the rest of) a request's headers
        if self.conn.their_state is h11.SEND_BODY:
            return "body"
        return "app"  # the request is in; the route is working or streaming its answer

    def _watch(self, *, data_arrived: bool = False) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        phase = self._current_phase()
        if phase == "headers" and self._phase != "headers":  # one deadline for the whole header, however it trickles
            self._start(self.limits.header_timeout_s, self._headers_late)
        elif phase == "body" and (self._phase != "body" or data_arrived):
            self._start(self.limits.body_timeout_s, self._body_silent)
        elif phase == "app":
            self._cancel()
        if phase != self._phase:
            self._phase_since = self.loop.time()
        self._phase = phase

    def _start(self, delay_s: float, callback: Any) -> None:
        self._cancel()
        self._guard_timer = self.loop.call_later(delay_s, callback)

    def _cancel(self) -> None:
        if self._guard_timer is not None:
            self._guard_timer.cancel()
            self._guard_timer = None

    def _headers_late(self) -> None:
        self._guard_timer = None
        if self.transport.is_closing() or self._current_phase() != "headers":
            return
        self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()

    def _body_silent(self) -> None:
        self._guard_timer = None
        if self.transport.is_closing() or self._current_phase() != "body":
            return
        if self.flow.read_paused:  # the route is not reading: not the client's silence
            self._start(self.limits.body_timeout_s, self._body_silent)
            return
        self.transport.close()


def guarded_protocol(settings: Settings) -> type[GuardedH11Protocol]:
    limits = ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_connections=settings.max_connections,
    )
    return type("TingH11Protocol", (GuardedH11Protocol,), {"limits": limits})


CUT_GRACE_S = 15.0  # past --drain-timeout-s, time for requests Ting cut to send their error and settle: uvicorn's own
# deadline, which cancels what is left and then shuts the application down at once, is only a backstop


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn.Config keyword arguments `ting serve` uses (host and port aside)."""
    return dict(
        http=guarded_protocol(settings),
        timeout_keep_alive=settings.keep_alive_s,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s + CUT_GRACE_S),
        proxy_headers=True,
        forwarded_allow_ips="127.0.0.1",
        lifespan="on",
    )
