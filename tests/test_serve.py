"""`ting serve` as a process: start-up, refusals, graceful shutdown, and kill -9 without losing a request."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from ting.store import Store
from ting.store.db import reservations

GENERATION = "/api/v1/services/aigc/multimodal-generation/generation"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """One `ting serve` process, its output in files."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.out = tmp / f"serve-{self.port}-{time.monotonic_ns()}.out"
        self.err = self.out.with_suffix(".err")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ting", "serve", "--port", str(self.port), *args],
            stdout=self.out.open("w"),
            stderr=self.err.open("w"),
            env={**os.environ, **(env or {})},
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ting serve exited with {self.proc.returncode}: {self.err.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("ting serve did not become ready")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)


def body(wav: str, max_tokens: int, **parameters: Any) -> dict[str, Any]:
    return {
        "model": "qwen-audio-turbo",
        "input": {"messages": [{"role": "user", "content": [{"audio": wav}, {"text": "What is said?"}]}]},
        "parameters": {"max_tokens": max_tokens, **parameters},
    }


@pytest.fixture(scope="module")
def wav(corpus) -> str:  # type: ignore[no-untyped-def]
    return "data:;base64," + base64.b64encode(corpus["wav_8k_en"].path.read_bytes()).decode()


def test_startup_says_where_and_what_then_shuts_down_gracefully(tiny_dir: Path, tmp_path: Path, wav: str) -> None:
    serve = Serve(tmp_path, "--model", str(tiny_dir), "--home", str(tmp_path / "home"))
    serve.wait_ready()
    log = serve.err.read_text()
    assert f"listening on http://127.0.0.1:{serve.port}" in log and f"http://127.0.0.1:{serve.port}/api/v1" in log
    assert f"model ready: {tiny_dir} on cpu (float32)" in log
    health = httpx.get(serve.url + "/health").json()
    assert (health["status"], health["device"], health["dtype"]) == ("ok", "cpu", "float32")
    events: list[str] = []

    def stream() -> None:
        headers = {"Authorization": "Bearer k", "X-DashScope-SSE": "enable"}
        with httpx.stream(
            "POST", serve.url + GENERATION, json=body(wav, 300, seed=1, temperature=1.0), headers=headers, timeout=120
        ) as r:
            events.extend(line for line in r.iter_lines() if line.startswith("data:"))

    reader = threading.Thread(target=stream)
    reader.start()
    while not events:
        time.sleep(0.01)
    started = time.monotonic()
    assert serve.stop(signal.SIGTERM) == 0  # the stream in flight is let finish, then the process exits
    reader.join(30)
    assert json.loads(events[-1][5:])["output"]["choices"][0]["finish_reason"] in ("stop", "length")
    assert time.monotonic() - started < 60
    with pytest.raises(httpx.ConnectError):
        httpx.get(serve.url + "/health", timeout=1)
    lines = [json.loads(line) for line in serve.out.read_text().splitlines()]
    assert any(line["path"] == GENERATION and line["status"] == 200 and line["outcome"] == "ok" for line in lines)


def test_it_will_not_listen_beyond_loopback_without_a_key(tiny_dir: Path, tmp_path: Path) -> None:
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "ting",
            "serve",
            "--model",
            str(tiny_dir),
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
            "--home",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "refusing to listen on 0.0.0.0 with no API key" in refused.stderr
    for extra in (["--api-key", "sk-x"], ["--allow-no-auth"]):
        serve = Serve(tmp_path, "--model", str(tiny_dir), "--host", "0.0.0.0", "--home", str(tmp_path), *extra)
        serve.wait_ready()
        assert serve.stop() == 0


@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_empty_host_is_every_interface_not_loopback(tiny_dir: Path, tmp_path: Path, how: str) -> None:
    args = ["--host", ""] if how == "flag" else []
    env = {**os.environ, "TING_HOST": ""}
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "ting",
            "serve",
            "--model",
            str(tiny_dir),
            *args,
            "--port",
            str(free_port()),
            "--home",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert refused.returncode == 2 and "refusing to listen on every interface" in refused.stderr


def test_an_ipv4_mapped_loopback_host_is_loopback(tiny_dir: Path, tmp_path: Path) -> None:
    serve = Serve(tmp_path, "--model", str(tiny_dir), "--host", "::ffff:127.0.0.1", "--home", str(tmp_path))
    serve.wait_ready()
    assert httpx.get(serve.url + "/health", timeout=5).status_code == 200
    assert serve.stop() == 0


def test_absent_weights_offline_fail_at_once_with_one_clear_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "ting", "serve", "--model", "Qwen/Qwen2-Audio-7B-Instruct", "--home", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 1 and time.monotonic() - started < 30
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "not in the local Hugging Face cache" in lines[0] and "hf download" in lines[0]


def test_kill_minus_nine_five_times_loses_and_duplicates_nothing(
    tiny_dir: Path, tmp_path: Path, wav: str, database_url: str
) -> None:
    home = tmp_path / "home"
    common = ["--home", str(home), "--database", database_url]
    created = subprocess.run(
        [sys.executable, "-m", "ting", "keys", "create", "--name", "crash", "--quota-tokens", "0", *common],
        capture_output=True,
        text=True,
        check=True,
    )
    key = created.stdout.strip()
    seen: dict[str, bool] = {}  # request id -> the client saw it finish
    lock = threading.Lock()
    logs: list[Path] = []
    rng = random.Random(7)
    port = free_port()  # a restarted server comes back on its port, under the same instance name

    def one(url: str, n: int) -> None:
        headers = {"Authorization": f"Bearer {key}", "X-DashScope-SSE": "enable"}
        try:
            with httpx.stream(
                "POST", url + GENERATION, json=body(wav, n, temperature=1.0), headers=headers, timeout=60
            ) as r:
                rid = r.headers["x-request-id"]
                with lock:
                    seen.setdefault(rid, False)
                for line in r.iter_lines():
                    if line.startswith("data:") and '"finish_reason":"null"' not in line:
                        with lock:
                            seen[rid] = True
        except (httpx.HTTPError, KeyError):
            pass  # the server died under us

    for _ in range(5):
        serve = Serve(tmp_path, "--model", str(tiny_dir), *common, port=port)
        logs += [serve.out, serve.err]
        serve.wait_ready()
        with lock:
            finished_before = sum(seen.values())
        # Each round has short requests (5 tokens) and long ones: kill once a short one has finished (a condition,
        # however slow the machine), at a random moment among the long ones.
        sizes = [5, 5, *rng.choices([40, 400, 1500], k=10)]
        threads = [threading.Thread(target=one, args=(serve.url, n)) for n in sizes]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while sum(seen.values()) == finished_before:
            assert time.monotonic() < deadline, "no request finished"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        serve.stop(signal.SIGKILL)
        for t in threads:
            t.join(60)
    serve = Serve(tmp_path, "--model", str(tiny_dir), *common, port=port)  # settles what the last kill left
    logs += [serve.out, serve.err]
    serve.wait_ready()
    assert serve.stop() == 0

    async def inspect() -> tuple[list[Any], int, Any, str]:
        store = Store(database_url, home=home)
        await store.open()
        try:
            rows = await store.ledger.rows()
            open_reservations = len(await store.db.read(sa.select(reservations)))
            info = (await store.keys.list())[0]
            dump = json.dumps([list(map(str, r)) for r in rows]) + str(await store.keys.list())
            return rows, open_reservations, info, dump
        finally:
            await store.close()

    rows, open_reservations, info, dump = asyncio.run(inspect())
    ids = [r.request_id for r in rows]
    assert open_reservations == 0 and info.reserved_tokens == 0
    assert len(ids) == len(set(ids))  # nothing settled twice
    assert set(seen) <= set(ids)  # every request a client got an answer from is in the ledger, once
    statuses = {r.request_id: r.status for r in rows}
    assert all(statuses[rid] == "ok" for rid, done in seen.items() if done)  # finished means recorded as finished
    assert sum(done for done in seen.values()) >= 5 and any(s == "interrupted" for s in statuses.values())
    assert info.spent_tokens == sum(r.charged_tokens for r in rows)
    for path in logs:  # the key appears in no log and nowhere at rest
        assert key not in path.read_text()
    assert key not in dump
    db_files = [p for p in home.rglob("*") if p.is_file()]
    assert all(key.encode() not in p.read_bytes() for p in db_files)


def test_sigterm_past_the_drain_time_cuts_streams_with_an_error_and_settles_each(
    tiny_dir: Path, tmp_path: Path, wav: str
) -> None:
    home = tmp_path / "home"
    serve = Serve(tmp_path, "--model", str(tiny_dir), "--home", str(home), "--drain-timeout-s", "1")
    serve.wait_ready()
    streams: dict[int, list[str]] = {i: [] for i in range(4)}

    def stream(i: int) -> None:
        headers = {"Authorization": "Bearer k", "X-DashScope-SSE": "enable"}
        with httpx.stream(
            "POST", serve.url + GENERATION, json=body(wav, 1500, temperature=1.0, seed=i), headers=headers, timeout=120
        ) as r:
            streams[i].extend(line for line in r.iter_lines() if line.startswith(("data:", "event:")))

    readers = [threading.Thread(target=stream, args=(i,)) for i in streams]
    for t in readers:
        t.start()
    deadline = time.monotonic() + 120
    while not all(any(line.startswith("data:") for line in s) for s in streams.values()):
        assert time.monotonic() < deadline, "the streams did not start"
        time.sleep(0.02)
    serve.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30

    def ready() -> bool:
        try:
            return httpx.get(serve.url + "/health", timeout=5).status_code == 200
        except httpx.ConnectError:
            return False  # no new connections while draining

    while ready():  # readiness turns false at once
        assert time.monotonic() < deadline, "/health stayed ready while draining"
        time.sleep(0.02)
    assert serve.proc.wait(120) == 1  # the drain was not clean, and the exit status says so
    for t in readers:
        t.join(30)
    cut = [s for s in streams.values() if s[-2] == "event:error"]
    assert cut  # 1,500 tokens each: the tiny model on this machine does not finish four in one second
    for lines in cut:
        error = json.loads(lines[-1][5:])
        assert (error["code"], error["message"]) == (
            "ServiceUnavailable",
            "The server is shutting down, please try again later.",
        )

    async def inspect() -> tuple[list[Any], int]:
        store = Store(f"sqlite:///{home / 'ting.db'}", home=home)
        await store.open()
        try:
            return await store.ledger.rows(), len(await store.db.read(sa.select(reservations)))
        finally:
            await store.close()

    rows, open_reservations = asyncio.run(inspect())
    assert open_reservations == 0 and len(rows) == 4
    by_status = sorted((r.status, r.error_code) for r in rows)
    assert by_status.count(("error", "ServiceUnavailable")) == len(cut)
    assert all(
        r.output_tokens > 0 and r.charged_tokens == r.audio_tokens + r.input_tokens + r.output_tokens for r in rows
    )  # settled with what they used, before the store closed
    assert "were cut" in serve.err.read_text()
