"""One request's life in the ledger, for every use case: admitted, then settled exactly once.

    ticket = await lifecycle.admit(call)      authenticate, check the key's limits, open the ledger row
    async with ticket:                         any exception leaving the block settles the request with the
        await ticket.reserve(most)             outcome it maps to (`outcome_of`), a clean exit settles it "ok";
        ticket.usage = ...                     what the ticket has counted by then (usage, audio seconds) is
                                               what is charged
Settling cannot be interrupted: neither a client hanging up (asyncio's Task.cancel) nor Starlette cancelling a
stream's task (anyio's cancel scopes, which re-fire at every await) stops it half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any, Protocol

import anyio

from ting.errors import (
    AccessDenied,
    AuthError,
    ConcurrencyLimited,
    Overloaded,
    QuotaExhausted,
    RateLimited,
    TingError,
)
from ting.store import Outcome, Principal, Store
from ting.types import ChatRequest, Usage

log = logging.getLogger("ting.service")


@dataclass
class Report:
    """What the access log says of a request, filled in as it goes. Nothing secret: no audio, no text, no keys."""

    protocol: str | None = None
    model: str | None = None
    key: str | None = None  # the key's id or name, never the key
    task: str | None = None  # transcribe | translate
    outcome: str | None = None  # ok | refused | error | aborted
    code: str | None = None
    audio_s: float | None = None
    audio_tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    first_token_ms: int | None = None

    def fields(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Call:
    """One request, as a protocol hands it over."""

    request: ChatRequest
    protocol: str  # "dashscope" | "openai"
    token: str | None  # the bearer token
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    oss_resolve: bool = True  # DashScope: the X-DashScope-OssResourceResolve header was sent
    report: Report = field(default_factory=Report)  # for the access log


class ClientGone(Exception):
    """The client hung up before its (non-streaming) answer was ready; the work was cancelled."""


def outcome_of(exc: BaseException | None) -> tuple[str, str | None]:
    """(status, error code) for the ledger: how a request that ended with `exc` (None: finished) ended."""
    if exc is None:
        return "ok", None
    if isinstance(exc, ClientGone):
        return "aborted", "ClientClosedRequest"
    if isinstance(exc, TingError):
        return ("refused" if exc.status == 429 else "error"), exc.code
    if isinstance(exc, Exception):
        return "error", "InternalError"  # a fault of ours, not the client's
    return "aborted", "ClientClosedRequest"  # cancelled (the client hung up) or closed before its end


# Why a request was turned away before it ran, by the error that refused it (first match wins).
REFUSALS: tuple[tuple[type[TingError], str], ...] = (
    (QuotaExhausted, "quota"),
    (AuthError, "auth"),
    (AccessDenied, "auth"),  # an expired key
    (RateLimited, "rate"),
    (ConcurrencyLimited, "concurrency"),
    (Overloaded, "overload"),
)


def refusal_of(exc: BaseException | None) -> str | None:
    """auth | quota | rate | concurrency | overload when `exc` turned a request away, else None."""
    return next((reason for kind, reason in REFUSALS if isinstance(exc, kind)), None)


@dataclass(frozen=True)
class Settled:
    """A settled request, for whoever observes the lifecycle (the metrics)."""

    protocol: str
    task: str | None  # None: chat; transcribe | translate
    outcome: str  # ok | refused | error | aborted (refused: `refusal` says why)
    refusal: str | None
    usage: Usage
    latency_s: float  # admission to settlement
    first_token_s: float | None  # admission to the first generated token (chat)
    decode_s: float | None  # the first generated token to the last (chat)


class LifecycleObserver(Protocol):
    def settled(self, request: Settled) -> None: ...


class Ticket:
    """An admitted request: who pays, what it has used so far; settled exactly once."""

    def __init__(self, lifecycle: Lifecycle, call: Call, who: Principal, started: float) -> None:
        self.lifecycle, self.call, self.who, self.started = lifecycle, call, who, started
        self.usage = Usage()
        self.reserved = 0  # tokens reserved: the most it may be charged
        self.audio_seconds = 0.0
        self.first_token_ms: int | None = None
        self.first_token_at: float | None = None  # time.monotonic() of the first and the last generated token
        self.last_token_at: float | None = None
        self.settled = False

    @property
    def request_id(self) -> str:
        return self.call.request_id

    @property
    def cache_salt(self) -> str:
        """Who pays, as the engine's prefix cache keeps tenants apart: one key never reuses another's prompts."""
        return f"key:{self.who.key_id}" if self.who.key_id else f"name:{self.who.name}"

    async def reserve(self, tokens: int) -> None:
        """Reserve the most the request can cost (refused with QuotaExhausted when it does not fit)."""
        await self.lifecycle.store.quota.reserve(self.who, self.request_id, tokens)
        self.reserved = tokens

    async def settle(self, exc: BaseException | None = None) -> None:
        """Charge what was used and write the ledger row, once; `exc` is why the request ended (None: done)."""
        if self.settled:
            return
        self.settled = True
        status, code = outcome_of(exc)
        latency_s = time.monotonic() - self.started
        outcome = Outcome(status, self.usage, self.audio_seconds, code, int(latency_s * 1000))
        with anyio.CancelScope(shield=True):
            await self.lifecycle.settle(self, outcome)
        self.lifecycle.observe(self, status, refusal_of(exc), latency_s)

    async def __aenter__(self) -> Ticket:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.settle(exc)


class Lifecycle:
    """Admission and settlement, the same for chat and transcription, for both protocols."""

    def __init__(self, store: Store, observer: LifecycleObserver | None = None) -> None:
        self.store = store
        self.observer = observer
        self.open: set[Ticket] = set()  # admitted, not yet settled
        self._settling: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    async def admit(self, call: Call, *, task: str | None = None) -> Ticket:
        """Authenticate the caller and open the request's ledger row (or refuse it, with a row of its own).

        A caller cancelled meanwhile (a client hanging up: Task.cancel() from the API layer) does not leave an
        admitted, unsettled row behind for the next restart: the admission runs to its end, then the abort is
        settled and the cancellation goes on.
        """
        started = time.monotonic()
        admitting = asyncio.ensure_future(self._admit(call, task))
        try:
            who = await asyncio.shield(admitting)
        except asyncio.CancelledError as cancelled:
            try:
                who = await admitting
            except Exception:
                raise asyncio.CancelledError() from None  # refused: its row is written, nothing to settle
            await self._opened(Ticket(self, call, who, started)).settle(cancelled)
            raise
        return self._opened(Ticket(self, call, who, started))

    def _opened(self, ticket: Ticket) -> Ticket:
        self.open.add(ticket)
        self._idle.clear()
        return ticket

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no admitted request is left unsettled; False if some still are after `timeout_s`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _admit(self, call: Call, task: str | None) -> Principal:
        who = await self.store.keys.authenticate(call.token)
        report = call.report
        report.protocol, report.model, report.key, report.task = (
            call.protocol,
            call.request.model,
            who.key_id or who.name,
            task,
        )
        try:
            await self.store.quota.admit(who, call.request_id, model=call.request.model, protocol=call.protocol)
        except TingError as exc:
            report.outcome, report.code = outcome_of(exc)
            raise
        return who

    async def settle(self, ticket: Ticket, outcome: Outcome) -> None:
        """Record the request in the ledger and the access log, in a task the caller's cancellation cannot stop."""
        task = asyncio.ensure_future(self._settle(ticket, outcome))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        with contextlib.suppress(asyncio.CancelledError):  # the settlement goes on; drain() waits for it
            await asyncio.shield(task)

    async def _settle(self, ticket: Ticket, outcome: Outcome) -> None:
        call, u, report = ticket.call, outcome.usage, ticket.call.report
        report.outcome, report.code = outcome.status, outcome.error_code
        report.audio_s = round(outcome.audio_seconds, 3)
        report.audio_tokens, report.input_tokens, report.output_tokens = u.audio_tokens, u.input_tokens, u.output_tokens
        report.first_token_ms = ticket.first_token_ms
        try:
            await self.store.quota.settle(call.request_id, outcome, reserved=ticket.reserved)
        except Exception:
            log.exception("settling %s failed; it stays reserved until the next restart", call.request_id)
        finally:
            self.open.discard(ticket)
            if not self.open:
                self._idle.set()

    def observe(self, ticket: Ticket, status: str, refusal: str | None, latency_s: float) -> None:
        """Tell the observer (the metrics) how a settled request went; its failure never fails the request."""
        if self.observer is None:
            return
        first, last = ticket.first_token_at, ticket.last_token_at
        settled = Settled(
            protocol=ticket.call.protocol,
            task=ticket.call.report.task,
            outcome="refused" if refusal else status,
            refusal=refusal,
            usage=ticket.usage,
            latency_s=latency_s,
            first_token_s=None if first is None else first - ticket.started,
            decode_s=None if first is None or last is None else last - first,
        )
        try:
            self.observer.settled(settled)
        except Exception:
            log.exception("observing %s failed", ticket.request_id)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for settlements in flight (at shutdown)."""
        if self._settling:
            await asyncio.wait(list(self._settling), timeout=timeout_s)
