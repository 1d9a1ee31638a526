"""Faults injected into the engine process: functions it applies to its real backend (TING_TEST_BACKEND_WRAPPER).

They wrap the real backend; nothing of Ting's is replaced. Settings come from environment variables, which the
engine process inherits from the test (or from the `ting serve` the test starts).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def endless_slow_steps(backend: Any) -> Any:
    """Never end at end-of-sequence, and take $TING_TEST_STEP_DELAY_S longer per decoding step."""
    delay_s = float(os.environ.get("TING_TEST_STEP_DELAY_S", "0.05"))
    real_step = backend.step

    def slow_step():  # type: ignore[no-untyped-def]
        time.sleep(delay_s)
        return real_step()

    backend.eos_token_ids = frozenset()
    backend.step = slow_step
    return backend


def hang_once(backend: Any) -> Any:
    """The first decoding step that finds the file $TING_TEST_HANG_FLAG removes it and never returns."""
    flag = Path(os.environ["TING_TEST_HANG_FLAG"])
    real_step = backend.step

    def step():  # type: ignore[no-untyped-def]
        if flag.exists():
            flag.unlink()
            while True:
                time.sleep(1)
        return real_step()

    backend.step = step
    return backend


def hang_on_load_once(backend: Any) -> Any:
    """An engine process that finds the file $TING_TEST_HANG_FLAG removes it and never becomes ready."""
    flag = Path(os.environ["TING_TEST_HANG_FLAG"])
    if flag.exists():
        flag.unlink()
        while True:
            time.sleep(1)
    return backend
