"""Decoder workers that misbehave on purpose, for the isolation tests (injected with DecoderPool(target=...))."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import av

from ting.audio.decode import worker_main


def _misbehaving(magic: bytes, act) -> None:  # type: ignore[no-untyped-def]
    def main(jobs: Connection, results: Connection, memory_bytes: int) -> None:
        class Tap:
            def recv(self):  # type: ignore[no-untyped-def]
                return jobs.recv()

            def recv_bytes(self) -> bytes:
                data = jobs.recv_bytes()
                if data.startswith(magic):
                    act()
                return data

        worker_main(Tap(), results, memory_bytes)  # type: ignore[arg-type]

    return main


crash_on_magic = _misbehaving(b"CRASH", os.abort)
hang_on_magic = _misbehaving(b"HANG", lambda: time.sleep(3600))
hang_on_riff = _misbehaving(b"RIFF", lambda: time.sleep(3600))  # every WAV that reaches a worker


class _CountedPacket:
    def __init__(self, packet, container: _CountedContainer) -> None:  # type: ignore[no-untyped-def]
        self._packet, self._container = packet, container

    def decode(self):  # type: ignore[no-untyped-def]
        self._container.decoded += 1
        return self._packet.decode()

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._packet, name)


class _CountedContainer:
    """A real PyAV container whose packets count their decode() calls; reports the count when closed."""

    def __init__(self, container, on_close) -> None:  # type: ignore[no-untyped-def]
        self._container, self._on_close, self.decoded = container, on_close, 0

    def demux(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        for packet in self._container.demux(*args, **kwargs):
            yield _CountedPacket(packet, self)

    def close(self) -> None:
        self._container.close()
        self._on_close(self.decoded)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._container, name)


def count_decoded_packets(on_close) -> Callable[[], None]:  # type: ignore[no-untyped-def]
    """Wrap av.open: every container opened for reading reports how many packets were decoded from it."""
    real = av.open

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        return _CountedContainer(real(*args, **kwargs), on_close)

    av.open = counted

    def restore() -> None:
        av.open = real

    return restore


def counting_decodes(jobs: Connection, results: Connection, memory_bytes: int) -> None:
    """worker_main, appending each container's count of decoded packets to $TING_TEST_DECODE_LOG."""
    log = os.environ["TING_TEST_DECODE_LOG"]

    def record(decoded: int) -> None:
        with open(log, "a") as f:
            f.write(f"{decoded}\n")

    count_decoded_packets(record)
    worker_main(jobs, results, memory_bytes)
