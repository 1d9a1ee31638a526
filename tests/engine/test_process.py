"""The engine in its own process (RemoteEngine): the same answers as in-process, and it survives its own death."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from tests.engine import test_exactness
from tests.engine.helpers import PROMPTS
from tests.engine.test_exactness import MAX_NEW, run
from ting.engine.process import EngineOptions, RemoteEngine
from ting.errors import EngineDown
from ting.types import SamplingParams

reference = test_exactness.reference  # the fixture: transformers' generate() on the same checkpoint
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, repetition_penalty=1.0)


async def wait_for(condition, timeout_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def remote(tiny_dir: Path) -> AsyncIterator[RemoteEngine]:
    engine = RemoteEngine(EngineOptions(path=str(tiny_dir), max_batch_size=8, max_queue=64))
    await engine.open()
    yield engine
    await engine.aclose()


async def test_alone_and_batched_the_engine_process_gives_generates_tokens(remote, reference) -> None:  # type: ignore[no-untyped-def]
    expected = [reference(m) for m in PROMPTS]
    for messages, want in zip(PROMPTS, expected, strict=True):
        assert await run(remote, messages, GREEDY) == want
    together = await asyncio.gather(*(run(remote, m, GREEDY, delay_s=0.01 * i) for i, m in enumerate(PROMPTS)))
    assert together == expected


async def test_results_come_batched_one_message_per_step(remote) -> None:  # type: ignore[no-untyped-def]
    before = remote.stats.steps
    prompt = await remote.prepare(PROMPTS[0])
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    chunks = [c async for c in remote.generate(prompt, remote.resolve(params, prompt))]
    assert len(chunks) == MAX_NEW and chunks[-1].usage.output_tokens == MAX_NEW
    assert remote.stats.steps - before == MAX_NEW - 1  # the first token came from the prefill


async def test_on_the_cpu_the_engine_process_uses_torchs_own_default_threads(remote) -> None:  # type: ignore[no-untyped-def]
    fresh = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert remote.describe()["threads"] == int(fresh.stdout)  # --engine-threads 0 (auto), the model on the CPU


async def test_a_closed_stream_is_aborted_in_the_engine_process(remote) -> None:  # type: ignore[no-untyped-def]
    aborted = remote.stats.aborted
    prompt = await remote.prepare(PROMPTS[1])
    params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
    stream = remote.generate(prompt, remote.resolve(params, prompt))
    await anext(stream)
    await stream.aclose()
    await wait_for(lambda: remote.stats.aborted == aborted + 1 and remote.stats.running == 0)


async def test_kill_minus_nine_fails_every_request_at_once_and_a_new_engine_serves(tiny_dir: Path) -> None:
    engine = RemoteEngine(EngineOptions(path=str(tiny_dir), max_batch_size=8, first_backoff_s=2.0, threads=1))
    await engine.open()
    try:
        first_pid = engine.pid
        later = await engine.prepare(PROMPTS[0])
        params = SamplingParams(temperature=0.0, max_tokens=5000, ignore_eos=True)
        seen: list[int] = []

        async def one(messages) -> BaseException | None:  # type: ignore[no-untyped-def]
            prompt = await engine.prepare(messages)
            try:
                async for chunk in engine.generate(prompt, engine.resolve(params, prompt)):
                    seen.append(chunk.usage.output_tokens)
            except EngineDown as exc:
                return exc
            return None

        tasks = [asyncio.create_task(one(m)) for m in PROMPTS[:4] * 2]
        await wait_for(lambda: engine.stats.running == 8)
        os.kill(first_pid, signal.SIGKILL)
        errors = await asyncio.gather(*tasks)
        assert all(isinstance(e, EngineDown) and e.status == 503 for e in errors)
        with pytest.raises(EngineDown) as refused:  # until a new engine is up, a request is refused at once
            await anext(engine.generate(later, engine.resolve(GREEDY, later)))
        assert refused.value.retry_after_s and not engine.alive
        await wait_for(lambda: engine.alive)
        assert engine.pid != first_pid and engine.restarts == 1 and not psutil.pid_exists(first_pid)
        assert engine.describe()["threads"] == 1  # the new engine process keeps the options
        assert len(await run(engine, PROMPTS[0], GREEDY)) > 0
    finally:
        await engine.aclose()


def engine_processes() -> set[int]:
    """This process's engine processes still running."""
    running = set()
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):  # one that ended meanwhile
            if "ting.engine.core" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                running.add(p.pid)
    return running


@pytest.fixture
def hang_flag(tmp_path: Path, test_pythonpath, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The file whose presence makes the fault (tests/engine/faults.py) the test names with `fault` hang once."""
    flag = tmp_path / "hang"
    monkeypatch.setenv("TING_TEST_HANG_FLAG", str(flag))

    def fault(name: str) -> Path:
        monkeypatch.setenv("TING_TEST_BACKEND_WRAPPER", f"tests.engine.faults:{name}")
        return flag

    return fault


async def test_a_hung_engine_is_killed_and_replaced(tiny_dir: Path, hang_flag) -> None:  # type: ignore[no-untyped-def]
    flag = hang_flag("hang_once")
    engine = RemoteEngine(EngineOptions(path=str(tiny_dir), max_batch_size=4, hang_timeout_s=2.0, first_backoff_s=0.2))
    await engine.open()
    try:
        first_pid = engine.pid
        flag.touch()
        with pytest.raises(EngineDown):
            await run(engine, PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
        assert not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == psutil.STATUS_ZOMBIE
        await wait_for(lambda: engine.alive)
        assert not flag.exists() and engine.deaths == 1
        assert len(await run(engine, PROMPTS[0], GREEDY)) > 0  # the new engine serves
    finally:
        await engine.aclose()


async def test_a_restarted_engine_that_never_becomes_ready_is_killed_and_tried_again(tiny_dir: Path, hang_flag) -> None:  # type: ignore[no-untyped-def]
    flag = hang_flag("hang_on_load_once")
    engine = RemoteEngine(EngineOptions(path=str(tiny_dir), max_batch_size=2, first_backoff_s=0.2))
    started = time.monotonic()
    await engine.open()
    # A load takes what it takes on this machine (seconds on a quiet one, more on a busy one): the restart gets
    # a few times what the first start took, never a fixed number of seconds.
    engine.options = replace(engine.options, restart_timeout_s=max(5.0, 4 * (time.monotonic() - started)))
    try:
        first_pid = engine.pid
        others = engine_processes() - {first_pid}  # other tests' engines (a module's fixture)
        flag.touch()  # the next engine process loads the model and then never says READY
        os.kill(first_pid, signal.SIGKILL)
        await wait_for(lambda: not flag.exists())  # the hanging one has started
        await wait_for(lambda: engine.alive, timeout_s=600)  # killed at its deadline; the one after it serves
        assert engine.restarts == 2 and engine.deaths == 1
        assert len(await run(engine, PROMPTS[0], GREEDY)) > 0
        assert engine_processes() - others == {engine.pid}  # the hung one is gone
    finally:
        await engine.aclose()


async def test_a_slow_reader_of_a_finished_answer_is_no_hang(tiny_dir: Path) -> None:
    engine = RemoteEngine(EngineOptions(path=str(tiny_dir), max_batch_size=2, hang_timeout_s=0.5))
    await engine.open()
    try:
        prompt = await engine.prepare(PROMPTS[1])
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        stream = engine.generate(prompt, engine.resolve(params, prompt))
        chunks = [await anext(stream)]
        await wait_for(lambda: engine.stats.running == 0 and engine.stats.generated_tokens >= 6)
        idle_since = time.monotonic()
        await wait_for(lambda: time.monotonic() - idle_since > 6 * engine.options.hang_timeout_s)  # the engine
        # is idle; this stream's last chunks wait for their reader, well past the hang timeout
        chunks += [c async for c in stream]
        assert engine.deaths == 0 and engine.alive and chunks[-1].usage.output_tokens == 6
    finally:
        await engine.aclose()
