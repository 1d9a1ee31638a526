"""Two Ting replicas behind nginx, sharing PostgreSQL, all started by the suite itself (issue 13; docs/deploy.md).

nginx is Debian's package, run with a prefix and a main configuration of its own in a temporary directory; the
server configuration is deploy/nginx/ting.conf, the file docs/deploy.md installs, with only its two replica
addresses, its listen line and its access log's path replaced. Through nginx:

- the DashScope SDK's file:// example works whichever replica takes each call: nginx's access log shows the upload
  received by one replica and the generation served by the other, in both orders;
- 200 requests at once on a key with room for exactly 10 give exactly 10 answers, across both replicas;
- a replica killed with kill -9 mid-load: the requests on the other one end as they should, a plain request the
  dead one held gets nginx's 503 in DashScope's envelope, nginx sends the next requests to the survivor, and the
  survivor releases the dead one's reservations once its heartbeat is stale.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import dashscope
import httpx
import pytest
import sqlalchemy as sa
from dashscope import MultiModalConversation

from tests import postgres, test_serve
from tests.test_serve import GENERATION, Serve, body, free_port
from ting.store import Store
from ting.store.db import reservations

pytestmark = [pytest.mark.postgres, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx" / "ting.conf"
UPLOAD = "/api/v1/uploads/oss"
REPLICAS = ("replica-a", "replica-b")
T = TypeVar("T")

wav = test_serve.wav  # the fixture: a recording as a data: URI


def nginx_binary() -> str | None:
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    return found if os.access(found, os.X_OK) else None


def wait_until(condition: Callable[[], Any], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.05)


@dataclass(frozen=True)
class Hop:
    """One line of nginx's access log (the `ting` log_format of deploy/nginx/ting.conf)."""

    method: str
    path: str
    status: int
    upstreams: tuple[str, ...]  # every replica nginx tried, in order
    request_id: str


LOG_LINE = re.compile(
    r'"(?P<method>\S+) (?P<path>[^ ?"]*)\S* [^"]*" (?P<status>\d+) .* '
    r"upstream=(?P<upstreams>.*) upstream_status=\S.* request_id=(?P<rid>\S*)$"
)


@dataclass
class Cluster:
    url: str  # nginx
    database: str
    home: Path
    replicas: dict[str, Serve]
    access_log: Path
    key: str  # no quota

    def hops(self) -> list[Hop]:
        out = []
        for line in self.access_log.read_text().splitlines():
            m = LOG_LINE.search(line)
            assert m, line
            upstreams = tuple(u.strip() for u in m["upstreams"].split(","))
            out.append(Hop(m["method"], m["path"], int(m["status"]), upstreams, m["rid"]))
        return out

    def replica_at(self, address: str) -> str:
        return next(name for name, s in self.replicas.items() if address == f"127.0.0.1:{s.port}")

    def db(self, work: Callable[[Store], Awaitable[T]]) -> T:
        async def run() -> T:
            store = Store(self.database, home=self.home)
            await store.open()
            try:
                return await work(store)
            finally:
                await store.close()

        return asyncio.run(run())


def nginx_configuration(directory: Path, listen_port: int, replica_ports: list[int]) -> Path:
    """The documented server configuration, pointed at this test's ports, in a main configuration of its own."""
    text = NGINX_CONF.read_text()
    replacements = {
        "server 127.0.0.1:8000 ": f"server 127.0.0.1:{replica_ports[0]} ",
        "server 127.0.0.1:8001 ": f"server 127.0.0.1:{replica_ports[1]} ",
        "listen 80;": f"listen 127.0.0.1:{listen_port};",
        "/var/log/nginx/ting.access.log": str(directory / "ting.access.log"),
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, f"deploy/nginx/ting.conf no longer has {old!r} once"
        text = text.replace(old, new)
    (directory / "ting.conf").write_text(text)
    temp = "\n".join(
        f"    {kind}_temp_path {directory / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = directory / "nginx.conf"
    main.write_text(
        # as root (CI containers), the workers would otherwise run as nobody and could not use the private temp dirs
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off;\nworker_processes 1;\npid {directory / 'nginx.pid'};\n"
        + "events { worker_connections 1024; }\n"
        + f"http {{\n{temp}\n    access_log off;\n    include {directory / 'ting.conf'};\n}}\n"
    )
    return main


# Every answer runs to its max_tokens at 20 ms a step at least, whatever the machine's speed: the kill test needs
# its 600-token requests in flight when it looks (a fast server had finished some of them before, and the test
# waited for six reservations that were already settled).
SLOW_STEPS = {
    "TING_TEST_BACKEND_WRAPPER": "tests.engine.faults:endless_slow_steps",
    "TING_TEST_STEP_DELAY_S": "0.02",
    "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]),
}


@pytest.fixture(scope="module")
def cluster(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory, postgres_admin: str) -> Iterator[Cluster]:
    nginx = nginx_binary()
    if nginx is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed: CI must run this test (scripts/install --dev installs nginx)")
        pytest.skip("nginx is not installed (apt-get install nginx; scripts/install --dev installs it)")
    tmp = tmp_path_factory.mktemp("deploy")
    database = asyncio.run(postgres.create_database(postgres_admin))
    front_port = free_port()
    front = f"http://127.0.0.1:{front_port}"
    replicas: dict[str, Serve] = {}
    proxy: subprocess.Popen[bytes] | None = None
    try:
        for name in REPLICAS:  # both start at once, one per GPU in production (--device cuda:N)
            replicas[name] = Serve(
                tmp,
                *("--model", str(tiny_dir), "--home", str(tmp / name), "--database", database),
                *("--instance-id", name, "--public-url", front, "--decode-workers", "1"),
                *("--instance-heartbeat-s", "1", "--instance-timeout-s", "5"),  # a dead peer is released in ~6 s
                env=SLOW_STEPS,
            )
        for serve in replicas.values():
            serve.wait_ready(timeout_s=180)
        directory = tmp / "nginx"
        directory.mkdir()
        main = nginx_configuration(directory, front_port, [s.port for s in replicas.values()])
        errors = (directory / "stderr").open("w")
        proxy = subprocess.Popen([nginx, "-p", str(directory), "-e", "stderr", "-c", str(main)], stderr=errors)

        def up() -> bool:
            assert proxy is not None and proxy.poll() is None, (directory / "stderr").read_text()
            try:
                return httpx.get(front + "/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, "nginx answering /health from a replica")
        cluster = Cluster(front, database, tmp, replicas, directory / "ting.access.log", key="")
        cluster.key = cluster.db(lambda store: store.keys.create(name="team"))[0]
        yield cluster
    finally:
        if proxy is not None:
            proxy.terminate()
            try:
                proxy.wait(30)
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.wait(30)
        for serve in replicas.values():
            try:
                serve.stop(timeout_s=90)
            except subprocess.TimeoutExpired:
                serve.proc.kill()
                serve.proc.wait(30)


def test_the_sdks_file_example_works_whichever_replica_takes_each_call(
    cluster: Cluster, corpus: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each SDK call is three requests (policy, upload, generation); nginx's round robin alternates the replicas,
    so consecutive calls put the upload and the generation on different replicas, one way then the other. The
    orders are read from nginx's access log, not assumed."""
    monkeypatch.setattr(dashscope, "base_http_api_url", cluster.url + "/api/v1")
    monkeypatch.setattr(dashscope, "api_key", cluster.key)
    local = tmp_path / "my recording.wav"
    local.write_bytes(corpus["wav_pcm_s16_zh"].path.read_bytes())
    messages = [{"role": "user", "content": [{"audio": f"file://{local}"}, {"text": "说了什么?"}]}]
    both_ways = {("replica-a", "replica-b"), ("replica-b", "replica-a")}
    orders: set[tuple[str, str]] = set()
    for _ in range(8):
        before = len(cluster.hops())
        response = MultiModalConversation.call(model="qwen-audio-turbo", messages=messages, temperature=0, max_tokens=4)
        assert response.status_code == 200, (response.code, response.message)
        assert response.output.choices[0].finish_reason == "length" and response.usage.audio_tokens > 0

        def logged(before: int = before, request_id: str = response.request_id) -> list[Hop]:
            hops = cluster.hops()[before:]
            return hops if any(h.request_id == request_id for h in hops) else []

        wait_until(logged, "nginx's log line for the generation")
        hops = logged()
        uploads = [h for h in hops if h.path == UPLOAD]
        generations = [h for h in hops if h.path == GENERATION]
        assert [(h.method, h.status, len(h.upstreams)) for h in uploads + generations] == [("POST", 200, 1)] * 2
        assert generations[0].request_id == response.request_id  # Ting's request id, passed through nginx
        upload_on, generation_on = (cluster.replica_at(h.upstreams[0]) for h in (uploads[0], generations[0]))
        orders.add((upload_on, generation_on))
        if both_ways <= orders:
            break
    assert both_ways <= orders, f"the upload and the generation were not on different replicas both ways: {orders}"


@pytest.mark.parametrize(
    ("over_bytes", "statuses"),
    # just over Ting's limit: Ting's own answers (DashScope's 400, OpenAI's 413); over nginx's margin too: nginx's
    [(1, (400, 413)), (1024 * 1024 + 1, (413, 413))],
)
def test_a_body_over_the_limit_is_refused_in_the_protocols_envelope(
    cluster: Cluster, over_bytes: int, statuses: tuple[int, int]
) -> None:
    """nginx's body limit sits 1 MiB above Ting's --max-request-bytes (32 MiB): a body just over Ting's limit gets
    Ting's own refusal; a larger one, nginx's, in the same envelope."""
    too_large = b"{" + b" " * (32 * 1024 * 1024 + over_bytes) + b"}"
    paths = ((GENERATION, "BadRequest.TooLarge"), ("/v1/chat/completions", "payload_too_large"))
    for (path, code), status in zip(paths, statuses, strict=True):
        r = httpx.post(
            cluster.url + path,
            content=too_large,
            headers={"Authorization": f"Bearer {cluster.key}", "Content-Type": "application/json"},
            timeout=120,
        )
        assert (r.status_code, r.headers["content-type"]) == (status, "application/json"), (r, r.text[:300])
        assert (r.json()["code"] if path == GENERATION else r.json()["error"]["code"]) == code


def test_two_hundred_at_once_against_room_for_exactly_ten_across_both_replicas(cluster: Cluster, wav: str) -> None:
    small = body(wav, 4, temperature=0)
    calibration = httpx.post(
        cluster.url + GENERATION, json=small, headers={"Authorization": f"Bearer {cluster.key}"}, timeout=120
    ).json()
    assert calibration["output"]["choices"][0]["finish_reason"] == "length"  # it always uses all 4 tokens
    cost = sum(calibration["usage"][k] for k in ("input_tokens", "audio_tokens", "output_tokens"))
    key, info = cluster.db(lambda store: store.keys.create(name="ten", quota_tokens=10 * cost))
    before = len(cluster.hops())

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=300, limits=limits) as c:
            return await asyncio.gather(
                *(
                    c.post(cluster.url + GENERATION, json=small, headers={"Authorization": f"Bearer {key}"})
                    for _ in range(200)
                )
            )

    responses = asyncio.run(fire())
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 10 and codes.count(403) == 190, codes
    assert {r.json()["code"] for r in responses if r.status_code == 403} == {"AllocationQuota.FreeTierOnly"}
    ids = {r.headers["x-request-id"] for r in responses}
    assert len(ids) == 200

    async def ledger_and_key(store: Store) -> tuple[list[Any], Any, int]:
        rows = [r for r in await store.ledger.rows() if r.key_id == info.id]
        return rows, await store.keys.find(info.id), await store.quota.in_flight()

    rows, final, in_flight = cluster.db(ledger_and_key)
    assert {r.request_id for r in rows} == ids  # one ledger row each, whichever replica wrote it
    assert sum(r.status == "ok" for r in rows) == 10 and sum(r.status == "refused" for r in rows) == 190
    assert (final.spent_tokens, final.reserved_tokens, in_flight) == (10 * cost, 0, 0)

    def served() -> dict[str, str]:
        return {
            h.request_id: cluster.replica_at(h.upstreams[-1]) for h in cluster.hops()[before:] if h.path == GENERATION
        }

    wait_until(lambda: ids <= set(served()), "nginx's log lines for the 200 requests")
    assert {served()[rid] for rid in ids} == set(REPLICAS)  # both replicas took part


class Stream(threading.Thread):
    """One DashScope streaming request through nginx; keeps its events, or the error that cut it."""

    def __init__(self, url: str, key: str, audio: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.url, self.key, self.audio, self.seed = url, key, audio, seed
        self.request_id = ""
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.cut: BaseException | None = None

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}", "X-DashScope-SSE": "enable"}
        try:
            with httpx.stream(
                "POST",
                self.url + GENERATION,
                json=body(self.audio, 600, temperature=0, seed=self.seed),
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
        except httpx.HTTPError as exc:
            self.cut = exc


class Plain(threading.Thread):
    """One DashScope request without streaming through nginx; keeps its response."""

    def __init__(self, url: str, key: str, audio: str) -> None:
        super().__init__(daemon=True)
        self.url, self.key, self.audio = url, key, audio
        self.response: httpx.Response | None = None

    def run(self) -> None:
        self.response = httpx.post(
            self.url + GENERATION,
            json=body(self.audio, 600, temperature=0),
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=120,
        )


def test_a_replica_killed_mid_load_is_routed_around_and_its_reservations_released_by_the_survivor(
    cluster: Cluster, wav: str
) -> None:
    streams = [Stream(cluster.url, cluster.key, wav, seed) for seed in range(4)]
    plain = [Plain(cluster.url, cluster.key, wav) for _ in range(2)]
    for t in [*streams, *plain]:
        t.start()

    def placed() -> dict[str, str]:
        rows = cluster.db(lambda store: store.db.read(sa.select(reservations.c.request_id, reservations.c.instance_id)))
        return {r.request_id: r.instance_id for r in rows}

    wait_until(lambda: all(s.request_id and s.events for s in streams), "every stream's first event")
    wait_until(lambda: len(placed()) == 6, "every request admitted")
    # Each request's reservation names the replica it runs on, while it is in flight (600 tokens each at 20 ms or
    # more a step: SLOW_STEPS). The victim is one that holds a plain request.
    where = placed()
    plain_ids = set(where) - {s.request_id for s in streams}
    victim = min(where[rid] for rid in plain_ids)
    (survivor,) = set(REPLICAS) - {victim}
    assert any(where[s.request_id] == survivor for s in streams), f"no stream on the survivor: {where}"
    cluster.replicas[victim].stop(signal.SIGKILL)

    # nginx routes around the dead replica: every new request is answered, by the survivor
    after: set[str] = set()
    for _ in range(4):
        r = httpx.post(
            cluster.url + GENERATION,
            json=body(wav, 4, temperature=0),
            headers={"Authorization": f"Bearer {cluster.key}"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        after.add(r.headers["x-request-id"])

    def answered_by() -> set[str]:
        return {cluster.replica_at(h.upstreams[-1]) for h in cluster.hops() if h.request_id in after}

    wait_until(lambda: len([h for h in cluster.hops() if h.request_id in after]) == 4, "the log lines after the kill")
    assert answered_by() == {survivor}

    # the clients on the survivor see nothing: their requests end as they should
    for t in [*streams, *plain]:
        t.join(120)
        assert not t.is_alive()
    on_survivor = [s for s in streams if where[s.request_id] == survivor]
    for s in on_survivor:
        assert s.cut is None and all(kind != "error" for kind, _ in s.events), (s.cut, s.events[-1:])
        assert s.events[-1][1]["output"]["choices"][0]["finish_reason"] in ("stop", "length")
    # a plain request the dead replica held gets nginx's 503 in DashScope's envelope; one on the survivor, its answer
    responses = [p.response for p in plain if p.response is not None]
    assert sorted(r.status_code for r in responses) == sorted(503 if where[rid] == victim else 200 for rid in plain_ids)
    for r in responses:
        if r.status_code == 503:
            assert r.json()["code"] == "ServiceUnavailable" and r.headers["retry-after"] == "5"
        else:
            assert r.headers["x-request-id"] in plain_ids and where[r.headers["x-request-id"]] == survivor

    # the survivor releases the dead replica's reservations once its heartbeat is stale (--instance-timeout-s)
    wait_until(lambda: victim not in placed().values(), "the dead replica's reservations released", timeout_s=90)

    async def outcomes(store: Store) -> tuple[dict[str, tuple[str, str | None]], Any]:
        rows = await store.ledger.rows()
        return {r.request_id: (r.status, r.error_code) for r in rows}, (await store.keys.list())

    by_id, keys = cluster.db(outcomes)
    for rid, replica in where.items():
        assert by_id[rid] == (("ok", None) if replica == survivor else ("interrupted", "ServerRestarted"))
    assert all(k.reserved_tokens == 0 for k in keys)
