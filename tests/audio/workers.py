"""Decoder workers that misbehave on purpose, for the isolation tests (injected with DecoderPool(target=...))."""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection

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
