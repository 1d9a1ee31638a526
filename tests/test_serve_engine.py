"""`ting serve` runs the model in a process of its own: a crash of it fails what is in flight and nothing else.

Kill -9 of the engine process during 8 streams: each stream ends with the protocol's error event, each request is
settled in the ledger once, with the tokens it used, /health reports the engine down, and a new engine process
serves again. SIGTERM and kill -9 of the server leave no process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from tests import test_serve
from tests.test_serve import GENERATION, Serve, body
from ting.engine.process import DIR_PREFIX, remove_stale_dirs
from ting.store import Store
from ting.store.db import reservations

wav = test_serve.wav  # the fixture: a recording as a data: URI


def wait_until(condition, timeout_s: float = 120.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not met in {timeout_s} s"
        time.sleep(0.05)


def health(serve: Serve) -> tuple[int, dict[str, Any]]:
    try:
        r = httpx.get(serve.url + "/health", timeout=5)
    except httpx.HTTPError:
        return 0, {}
    return r.status_code, r.json()


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def all_gone(processes: list[psutil.Process], timeout_s: float = 60.0) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return not alive


def scrape(serve: Serve, key: str) -> dict[Any, float]:
    """/metrics: {name: value} for unlabelled samples, {(name, protocol, status, outcome): value} for requests."""
    r = httpx.get(serve.url + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    out: dict[Any, float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name == "ting_requests_total" and s.labels["endpoint"] == GENERATION:
                key_ = (s.name, s.labels["protocol"], s.labels["status"], s.labels["outcome"])
                out[key_] = out.get(key_, 0.0) + s.value
            elif not s.labels:
                out[s.name] = s.value
    return out


class Stream(threading.Thread):
    """One DashScope streaming request; keeps every event it reads."""

    def __init__(self, serve: Serve, key: str, audio: str) -> None:
        super().__init__(daemon=True)
        self.serve, self.key, self.audio = serve, key, audio
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.request_id = ""

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}", "X-DashScope-SSE": "enable"}
        with httpx.stream(
            "POST",
            self.serve.url + GENERATION,
            json=body(self.audio, 1500, temperature=0),
            headers=headers,
            timeout=120,
        ) as r:
            self.request_id = r.headers["x-request-id"]
            kind = ""
            for line in r.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:]
                elif line.startswith("data:"):
                    self.events.append((kind, json.loads(line[5:])))


def test_kill_minus_nine_of_the_engine_fails_the_streams_settles_them_and_a_new_engine_serves(
    tiny_dir: Path, tmp_path: Path, wav: str, test_pythonpath: None
) -> None:
    home = tmp_path / "home"
    database = f"sqlite:///{tmp_path / 'ting.db'}"
    common = ["--home", str(home), "--database", database]
    import subprocess
    import sys

    key = subprocess.run(
        [sys.executable, "-m", "ting", "keys", "create", "--quota-tokens", "0", *common],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    env = {
        "TING_TEST_BACKEND_WRAPPER": "tests.engine.faults:endless_slow_steps",
        "TING_TEST_STEP_DELAY_S": "0.05",
        "PYTHONPATH": os.environ["PYTHONPATH"],
    }
    serve = Serve(
        tmp_path, "--model", str(tiny_dir), *common, "--engine-max-backoff-s", "2", "--metrics-key", "sk-m", env=env
    )
    try:
        serve.wait_ready(300)
        first_engine = health(serve)[1]["engine_pid"]
        assert first_engine in [p.pid for p in descendants(serve.proc.pid)]
        streams = [Stream(serve, key, wav) for _ in range(8)]
        for s in streams:
            s.start()
        wait_until(lambda: all(len(s.events) >= 2 for s in streams), what="8 streams under way")
        statuses: list[tuple[int, str]] = []
        watching = threading.Event()

        def watch_health() -> None:
            while not watching.is_set():
                code, info = health(serve)
                statuses.append((code, info.get("status", "")))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch_health, daemon=True)
        watcher.start()
        os.kill(first_engine, signal.SIGKILL)
        for s in streams:
            s.join(120)
        for s in streams:  # every stream ends at once, with DashScope's error event
            kind, data = s.events[-1]
            assert kind == "error" and data["code"] == "ModelUnavailable" and data["request_id"] == s.request_id
            assert all(k == "result" for k, _ in s.events[:-1])
        wait_until(lambda: health(serve)[0] == 200, what="a new engine serving")
        watching.set()
        watcher.join(10)
        assert (503, "engine down") in statuses and statuses[-1][0] == 200
        info = health(serve)[1]
        assert info["engine_pid"] != first_engine and info["engine_restarts"] == 1
        assert not psutil.pid_exists(first_engine)
        again = httpx.post(
            serve.url + GENERATION,
            json=body(wav, 4, temperature=0),
            timeout=120,
            headers={"Authorization": f"Bearer {key}"},
        )
        assert again.status_code == 200 and again.json()["usage"]["output_tokens"] == 4
        metrics = scrape(serve, "sk-m")
        assert metrics["ting_engine_restarts_total"] == 1 and metrics["ting_engine_up"] == 1
        assert metrics["ting_requests_total", "dashscope", "200", "error"] == 8  # the cut streams
    finally:
        assert serve.stop() == 0

    async def ledger() -> tuple[list[Any], int, Any]:
        store = Store(database, home=home)
        await store.open()
        try:
            return (
                await store.ledger.rows(),
                len(await store.db.read(sa.select(reservations))),
                (await store.keys.list())[0],
            )
        finally:
            await store.close()

    rows, open_reservations, info = asyncio.run(ledger())
    by_id = {r.request_id: r for r in rows}
    assert len(rows) == len(by_id) == 9 and open_reservations == 0 and info.reserved_tokens == 0
    for s in streams:
        row = by_id[s.request_id]
        seen = s.events[-2][1]["usage"]["output_tokens"]  # the last result event's running total
        # What the engine generated for it: what the client saw, plus tokens that completed no character yet
        # (at most 16 are held back: ting.engine.detokenize).
        assert (row.status, row.error_code) == ("error", "ModelUnavailable")
        assert seen <= row.output_tokens <= seen + 16 and row.audio_tokens > 0
    assert info.spent_tokens == sum(r.charged_tokens for r in rows) > 0


def test_sigterm_and_kill_minus_nine_of_the_server_leave_no_process_behind(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve = Serve(tmp_path, "--model", str(tiny_dir), "--home", str(tmp_path / "a"))
    serve.wait_ready(300)
    children = descendants(serve.proc.pid)
    engine = health(serve)[1]["engine_pid"]
    assert engine in [p.pid for p in children] and len(children) >= 2  # the engine and the audio decoders
    assert serve.stop(signal.SIGTERM) == 0
    assert all_gone(children)

    temp = tmp_path / "temp"
    temp.mkdir()
    serve = Serve(tmp_path, "--model", str(tiny_dir), "--home", str(tmp_path / "b"), env={"TMPDIR": str(temp)})
    serve.wait_ready(300)
    children = descendants(serve.proc.pid)
    assert health(serve)[1]["engine_pid"] in [p.pid for p in children]
    serve.stop(signal.SIGKILL)
    assert all_gone(children)  # the engine dies with the server (PR_SET_PDEATHSIG), as the decoders do
    # Nobody was left to remove the sockets' directory; the next server (here: what it runs first) does.
    (left,) = temp.glob(f"{DIR_PREFIX}{serve.proc.pid}-*")
    live = temp / f"{DIR_PREFIX}{os.getpid()}-x"
    live.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert remove_stale_dirs() == [str(left)] and live.exists()
