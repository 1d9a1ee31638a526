"""Keys, quotas, rate limits, the ledger and uploads, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ting import errors
from ting.store import Outcome, Store
from ting.store.db import api_keys, ledger, reservations, upload_data, uploads
from ting.store.quota import WINDOW_S
from ting.types import Usage


@pytest.fixture
async def store(database_url: str, tmp_path: Path) -> Store:
    s = Store(database_url, home=tmp_path, static_keys=("sk-static",))
    await s.open(server=True)
    yield s
    await s.close()


async def dump(store: Store) -> str:
    """Every row of every table, as text."""
    out = []
    for table in (api_keys, reservations, ledger):
        out += [repr(tuple(r)) for r in await store.db.read(sa.select(table))]
    return "\n".join(out)


# --- keys ----------------------------------------------------------------------------------------------------


async def test_a_key_is_shown_once_and_stored_only_as_a_hash(store: Store) -> None:
    key, info = await store.keys.create(name="alice", quota_tokens=1000)
    assert key.startswith("sk-ting-") and len(key) > 40
    assert info.prefix == key[:12] and info.remaining_tokens == 1000
    rows = await dump(store)
    assert key not in rows and key[12:] not in rows and info.prefix in rows
    who = await store.keys.authenticate(key)
    assert who.key_id == info.id and who.owner == info.id
    keys = {(await store.keys.create())[0] for _ in range(50)}
    assert len(keys) == 50


async def test_revoked_expired_unknown_static_and_open(store: Store) -> None:
    # before any key exists in the database, only the static key is configured: others are refused
    with pytest.raises(errors.AuthError):
        await store.keys.authenticate("sk-whatever")
    assert (await store.keys.authenticate("sk-static")).name == "static"
    key, info = await store.keys.create(expires_days=1)
    await store.keys.authenticate(key)
    with pytest.raises(errors.AccessDenied, match="expired"):
        await store.keys.authenticate(key, now=info.created_at + 2 * 86400)
    await store.keys.revoke(info.id)
    with pytest.raises(errors.AuthError) as revoked:
        await store.keys.authenticate(key)
    with pytest.raises(errors.AuthError) as unknown:
        await store.keys.authenticate("sk-ting-never-existed")
    assert (revoked.value.status, revoked.value.message) == (unknown.value.status, unknown.value.message)


async def test_an_open_server_until_the_first_key(database_url: str, tmp_path: Path) -> None:
    s = Store(database_url, home=tmp_path)
    await s.open()
    try:
        anyone = await s.keys.authenticate("sk-anything")
        assert anyone.key_id is None and anyone.owner.startswith("anon:")
        assert (await s.keys.authenticate(None)).name == "anonymous"
        _, info = await s.keys.create()
        await s.keys.revoke(info.id)  # revoking the last key does not open the server again
        with pytest.raises(errors.AuthError):
            await s.keys.authenticate("sk-anything")
    finally:
        await s.close()


# --- quota ---------------------------------------------------------------------------------------------------


async def test_reserve_then_settle_the_real_usage_exactly_once(store: Store) -> None:
    key, info = await store.keys.create(quota_tokens=1000)
    who = await store.keys.authenticate(key)
    await store.quota.admit(who, "r1", model="m", protocol="dashscope")
    await store.quota.reserve(who, "r1", 400)
    assert (await store.keys.find(info.id)).remaining_tokens == 600
    assert await store.quota.settle("r1", Outcome("ok", Usage(30, 125, 40), audio_seconds=5.0))
    assert not await store.quota.settle("r1", Outcome("ok", Usage(30, 125, 40)))
    after = await store.keys.find(info.id)
    assert (after.spent_tokens, after.reserved_tokens, after.remaining_tokens) == (195, 0, 805)
    rows = await store.ledger.rows()
    assert len(rows) == 1 and (rows[0].status, rows[0].charged_tokens, rows[0].audio_tokens) == ("ok", 195, 125)


async def test_without_a_database_key_reserving_writes_nothing_and_settle_caps_with_the_amount(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A static key has no balance: its reservation is kept by the caller, not written (one transaction less per
    request), and the charge is capped by it all the same."""
    who = await store.keys.authenticate("sk-static")
    writes = 0
    real_write = store.db.write

    async def counting_write(work):  # type: ignore[no-untyped-def]
        nonlocal writes
        writes += 1
        return await real_write(work)

    monkeypatch.setattr(store.db, "write", counting_write)
    for rid in ("under", "over"):
        await store.quota.admit(who, rid, model="m", protocol="dashscope")
    before = writes
    await store.quota.reserve(who, "under", 400)
    await store.quota.reserve(who, "over", 100)
    assert writes == before
    await store.quota.settle("under", Outcome("ok", Usage(30, 125, 40)), reserved=400)
    await store.quota.settle("over", Outcome("ok", Usage(30, 125, 40)), reserved=100)
    charged = {r.request_id: r.charged_tokens for r in await store.ledger.rows()}
    assert charged == {"under": 195, "over": 100}


async def test_usage_beyond_the_reservation_is_capped(store: Store) -> None:
    key, info = await store.keys.create(quota_tokens=100)
    who = await store.keys.authenticate(key)
    await store.quota.admit(who, "r", model="m", protocol="openai")
    await store.quota.reserve(who, "r", 50)
    await store.quota.settle("r", Outcome("ok", Usage(100, 100, 100)))
    assert (await store.keys.find(info.id)).spent_tokens == 50


async def test_a_spent_quota_refuses_and_records_the_refusal(store: Store) -> None:
    key, _ = await store.keys.create(quota_tokens=100)
    who = await store.keys.authenticate(key)
    await store.quota.admit(who, "a", model="m", protocol="dashscope")
    with pytest.raises(errors.QuotaExhausted):
        await store.quota.reserve(who, "a", 101)  # more than is left: refused, and settled as such
    await store.quota.admit(who, "b", model="m", protocol="dashscope")
    await store.quota.reserve(who, "b", 100)
    await store.quota.settle("b", Outcome("ok", Usage(50, 25, 25)))
    with pytest.raises(errors.QuotaExhausted) as info_:
        await store.quota.admit(who, "c", model="m", protocol="dashscope")
    assert (info_.value.status, info_.value.code) == (403, "AllocationQuota.FreeTierOnly")
    statuses = {r.request_id: (r.status, r.error_code) for r in await store.ledger.rows()}
    assert statuses == {
        "a": ("refused", "AllocationQuota.FreeTierOnly"),
        "b": ("ok", None),
        "c": ("refused", "AllocationQuota.FreeTierOnly"),
    }
    assert await store.quota.in_flight() == 0


async def test_requests_per_minute_with_retry_after(store: Store) -> None:
    key, _ = await store.keys.create(rpm=3)
    who = await store.keys.authenticate(key)
    t0 = 1_800_000_000.0 + 10  # 10 s into a minute
    for i in range(3):
        await store.quota.admit(who, f"r{i}", model="m", protocol="dashscope", now=t0 + i)
    with pytest.raises(errors.RateLimited) as info:
        await store.quota.admit(who, "r3", model="m", protocol="dashscope", now=t0 + 3)
    # 3 requests this minute: the next fits once the minute is over and some of it has slid out of the last 60 s
    assert (info.value.status, info.value.code, info.value.retry_after_s) == (429, "Throttling.RateQuota", 48)
    with pytest.raises(errors.RateLimited):
        await store.quota.admit(who, "r4", model="m", protocol="dashscope", now=t0 + 50)  # the minute's boundary
    await store.quota.admit(who, "r5", model="m", protocol="dashscope", now=t0 + 3 + 48)


async def test_no_double_burst_across_a_minutes_boundary(store: Store) -> None:
    key, _ = await store.keys.create(rpm=4)
    who = await store.keys.authenticate(key)
    t0 = 1_800_000_000.0 + 59  # the last second of a minute
    for i in range(4):
        await store.quota.admit(who, f"late{i}", model="m", protocol="dashscope", now=t0)
    # Two seconds later, whole-minute windows would let 4 more through; 4 x 58/60 of the last 60 s leave room for 1.
    await store.quota.admit(who, "early", model="m", protocol="dashscope", now=t0 + 2)
    with pytest.raises(errors.RateLimited) as info:
        await store.quota.admit(who, "early2", model="m", protocol="dashscope", now=t0 + 2)
    assert info.value.retry_after_s == 15  # then over a quarter of the previous minute has slid out: room for 2
    await store.quota.admit(who, "later", model="m", protocol="dashscope", now=t0 + 2 + 15)


async def test_retry_after_is_exact(store: Store) -> None:
    """Whatever came before: a request at refusal + Retry-After fits, and one a second earlier does not."""
    start, refusals = 1_800_000_000.0, 0
    for case, (rpm, gaps) in enumerate(
        [
            (1, [0, 7, 30, 0.5]),
            (2, [0, 20, 30, 5, 1]),
            (3, [0, 0, 40, 11, 0, 13]),
            (5, [0, 3, 3, 3, 3, 3, 3, 50, 1, 1, 1, 1, 1]),
            (2, [58, 0.9, 0.2, 61, 0]),
        ]
    ):
        key, _ = await store.keys.create(rpm=rpm)
        who = await store.keys.authenticate(key)
        now, n = start, 0
        for gap in gaps:
            now += gap
            n += 1
            try:
                await store.quota.admit(who, f"{case}-{n}-a", model="m", protocol="dashscope", now=now)
                await store.quota.settle(f"{case}-{n}-a", Outcome("ok"), now=now)
                continue
            except errors.RateLimited as refused:
                retry, refusals = refused.retry_after_s, refusals + 1
            assert retry is not None and 1 <= retry <= 2 * WINDOW_S
            if retry > 1:
                with pytest.raises(errors.RateLimited):
                    await store.quota.admit(who, f"{case}-{n}-b", model="m", protocol="dashscope", now=now + retry - 1)
            now += retry
            await store.quota.admit(who, f"{case}-{n}-c", model="m", protocol="dashscope", now=now)
            await store.quota.settle(f"{case}-{n}-c", Outcome("ok"), now=now)
    assert refusals >= 8  # the cases do run into the limit


async def test_concurrent_requests_per_key(store: Store) -> None:
    key, _ = await store.keys.create(max_concurrency=2)
    who = await store.keys.authenticate(key)
    await store.quota.admit(who, "a", model="m", protocol="dashscope")
    await store.quota.admit(who, "b", model="m", protocol="dashscope")
    with pytest.raises(errors.ConcurrencyLimited) as info:
        await store.quota.admit(who, "c", model="m", protocol="dashscope")
    assert (info.value.status, info.value.code) == (429, "Throttling")
    await store.quota.settle("a", Outcome("ok"))
    await store.quota.admit(who, "d", model="m", protocol="dashscope")


async def test_two_hundred_at_once_against_room_for_ten(store: Store) -> None:
    key, info = await store.keys.create(quota_tokens=10 * 300)
    who = await store.keys.authenticate(key)

    async def one(i: int) -> str:
        try:
            await store.quota.admit(who, f"r{i}", model="m", protocol="dashscope")
            await store.quota.reserve(who, f"r{i}", 300)
        except errors.TingError as exc:
            return exc.code
        await asyncio.sleep(0.05)
        await store.quota.settle(f"r{i}", Outcome("ok", Usage(100, 150, 50)))
        return "ok"

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert results.count("ok") == 10
    rows = await store.ledger.rows()
    assert len(rows) == 200 and len({r.request_id for r in rows}) == 200
    assert sum(r.status == "ok" for r in rows) == 10 and sum(r.status == "refused" for r in rows) == 190
    final = await store.keys.find(info.id)
    assert (final.spent_tokens, final.reserved_tokens) == (3000, 0)
    assert await store.quota.in_flight() == 0


async def test_a_crashed_servers_reservations_are_released(database_url: str, tmp_path: Path) -> None:
    first = Store(database_url, home=tmp_path, instance_id="first")
    await first.open()
    await first.quota.heartbeat(now=1000.0)
    key, info = await first.keys.create(quota_tokens=1000)
    who = await first.keys.authenticate(key)
    await first.quota.admit(who, "lost", model="m", protocol="dashscope")
    await first.quota.reserve(who, "lost", 500)
    await first.close()  # as if killed: nothing settled
    second = Store(database_url, home=tmp_path, instance_id="second")
    await second.open()
    try:
        if second.db.dialect == "sqlite":
            assert await second.quota.recover(everyone_else=True) == 1
        else:  # replicas: only once the first has been silent long enough
            assert await second.quota.recover(now=1010.0) == 0
            assert await second.quota.recover(now=1100.0) == 1
        key_now = await second.keys.find(info.id)
        assert (key_now.reserved_tokens, key_now.spent_tokens) == (0, 0)
        rows = await second.ledger.rows()
        assert [(r.request_id, r.status, r.charged_tokens) for r in rows] == [("lost", "interrupted", 0)]
    finally:
        await second.close()


@pytest.mark.postgres
async def test_how_long_a_silent_replica_counts_as_alive_is_a_setting(postgres_admin: str, tmp_path: Path) -> None:
    from tests import postgres

    url = await postgres.create_database(postgres_admin)
    first = Store(url, home=tmp_path, instance_id="first")
    second = Store(url, home=tmp_path, instance_id="second", instance_timeout_s=5.0)
    await first.open(server=True)
    await second.open(server=True)
    try:
        await first.quota.heartbeat(now=1000.0)
        key, _ = await first.keys.create(quota_tokens=1000)
        await first.quota.admit(await first.keys.authenticate(key), "lost", model="m", protocol="dashscope")
        assert await second.quota.recover(now=1004.0) == 0
        assert await second.quota.recover(now=1006.0) == 1  # not the default 45 s
    finally:
        await first.close()
        await second.close()


@pytest.mark.postgres
async def test_a_heartbeat_never_waits_behind_requests_for_a_connection(postgres_admin: str, tmp_path: Path) -> None:
    """Every pooled connection busy (as under 200 requests on one key): the heartbeat still gets through, so that
    the other replicas do not take this one for dead and release what it is serving."""
    from tests import postgres
    from ting.store.db import instances

    url = await postgres.create_database(postgres_admin)
    store = Store(url, home=tmp_path, instance_id="busy")
    await store.open(server=True)
    held: list[Any] = []
    try:
        pool = store.db.async_engine.pool
        for _ in range(pool.size() + pool._max_overflow):  # type: ignore[attr-defined]
            conn = await store.db.async_engine.connect()
            await conn.begin()
            held.append(conn)
        beat = asyncio.create_task(store.quota.heartbeat(now=5000.0))
        done, _ = await asyncio.wait({beat}, timeout=120)  # the pool's own wait gives up after 30 s
        assert done, "the heartbeat did not finish"
        beat.result()
        other = Store(url, home=tmp_path)
        try:
            rows = await other.db.read(sa.select(instances.c.heartbeat_at).where(instances.c.id == "busy"))
        finally:
            await other.close()
        assert [r.heartbeat_at for r in rows] == [5000.0]
    finally:
        for conn in held:
            await conn.close()
        await store.close()


async def test_usage_summary_per_key(store: Store) -> None:
    key, info = await store.keys.create(name="team-a")
    who = await store.keys.authenticate(key)
    for i, status in enumerate(["ok", "ok", "error"]):
        await store.quota.admit(who, f"r{i}", model="qwen-audio-turbo", protocol="dashscope")
        await store.quota.reserve(who, f"r{i}", 1000)
        await store.quota.settle(f"r{i}", Outcome(status, Usage(10, 25, 5), audio_seconds=1.0))
    [summary] = await store.ledger.summary(key_id=info.id)
    assert (summary.key_name, summary.requests, summary.ok, summary.failed) == ("team-a", 3, 2, 1)
    # a request is charged what ran for it whatever its outcome (the failed one ran 40 tokens' worth too)
    assert (summary.audio_seconds, summary.charged_tokens) == (3.0, 120)
    assert await store.ledger.summary(since=9e12) == []


# --- uploads -------------------------------------------------------------------------------------------------


async def kept_objects(store: Store) -> int:
    """Uploaded objects kept: files in the uploads directory (SQLite) plus rows of upload_data (PostgreSQL)."""
    root = store.files.root
    files = [p for p in root.iterdir() if not p.name.startswith(".")] if root.exists() else []
    return len(files) + len(await store.db.read(sa.select(upload_data.c.object_key)))


async def test_where_uploaded_bytes_live_follows_the_database(store: Store) -> None:
    """SQLite (one server): a file in the data directory. PostgreSQL (replicas): the database, no file."""
    temp = store.files.temp_path()
    temp.write_bytes(b"RIFF data")
    await store.files.commit("dashscope-instant/a/b.wav", owner="alice", model="m", temp=temp, size=9)
    files = [p for p in store.files.root.iterdir() if not p.name.startswith(".")]
    in_database = await store.db.read(sa.select(upload_data))
    if store.db.dialect == "sqlite":
        assert [p.read_bytes() for p in files] == [b"RIFF data"] and in_database == []
    else:
        assert files == [] and [bytes(r.data) for r in in_database] == [b"RIFF data"]
    assert not temp.exists()
    assert await store.files.read_object("dashscope-instant/a/b.wav", owner="alice") == b"RIFF data"


@pytest.mark.postgres
async def test_an_upload_on_one_replica_is_read_by_another_and_purged_by_either(
    postgres_admin: str, tmp_path: Path
) -> None:
    from tests import postgres

    url = await postgres.create_database(postgres_admin)
    a = Store(url, home=tmp_path / "a", instance_id="a")
    b = Store(url, home=tmp_path / "b", instance_id="b")  # its own data directory, as on another machine
    await a.open(server=True)
    await b.open(server=True)
    try:
        temp = a.files.temp_path()
        temp.write_bytes(b"RIFF" + bytes(range(256)) * 40)
        await a.files.commit("dashscope-instant/o/x.wav", owner="alice", model="m", temp=temp, size=10244, now=1000.0)
        read = b.files.read_object("dashscope-instant/o/x.wav", owner="alice")
        with pytest.raises(errors.DownloadFailed):  # created at t=1000, kept 48 h: expired
            await read
        temp = a.files.temp_path()
        temp.write_bytes(b"RIFF" + bytes(range(256)) * 40)
        await a.files.commit("dashscope-instant/o/y.wav", owner="alice", model="m", temp=temp, size=10244)
        assert await b.files.read_object("dashscope-instant/o/y.wav", owner="alice") == b"RIFF" + bytes(range(256)) * 40
        with pytest.raises(errors.DownloadFailed):
            await b.files.read_object("dashscope-instant/o/y.wav", owner="mallory")
        with pytest.raises(errors.UploadRejected) as full:  # the key's stored bytes count on every replica
            await b.files.check_room(
                "dashscope-instant/o2", owner="alice", size=1, max_owner_bytes=10244, max_objects=8
            )
        assert full.value.code == "QuotaExceeded"
        assert await b.files.purge() == 1  # the expired one, bytes and all
        keys = [r.object_key for r in await a.db.read(sa.select(upload_data.c.object_key))]
        assert keys == ["dashscope-instant/o/y.wav"]
        assert [p.name for p in (tmp_path / "a" / "uploads").iterdir()] == []  # no file on either replica's disk
        assert await b.files.purge(now=time.time() + 49 * 3600) == 1
        assert await kept_objects(a) == 0
    finally:
        await a.close()
        await b.close()


async def test_uploads_are_bound_to_their_owner_and_expire(store: Store) -> None:
    temp = store.files.temp_path()
    temp.write_bytes(b"RIFF data")
    await store.files.commit("dashscope-instant/a/b.wav", owner="alice", model="m", temp=temp, size=9, now=1000.0)
    assert await kept_objects(store) == 1 and "b.wav" not in [p.name for p in store.files.root.iterdir()]
    with pytest.raises(errors.DownloadFailed):
        await store.files.read_object("dashscope-instant/a/b.wav", owner="mallory")
    with pytest.raises(errors.DownloadFailed):  # created at t=1000, kept 48 h: long gone
        await store.files.read_object("dashscope-instant/a/b.wav", owner="alice")
    assert await store.files.purge() == 1
    assert await kept_objects(store) == 0


async def test_a_failed_upload_commit_leaves_no_file(store: Store) -> None:
    """Two uploads of one key at once: one is kept, the other is a 409 and leaves nothing on disk (on PostgreSQL
    both pass the existence check and the second insert fails on the primary key)."""
    temps = []
    for data in (b"first", b"second"):
        temp = store.files.temp_path()
        temp.write_bytes(data)
        temps.append(temp)
    results = await asyncio.gather(
        *(store.files.commit("dashscope-instant/a/same.wav", owner="alice", model="m", temp=t, size=5) for t in temps),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], errors.UploadRejected) and refused[0].status == 409
    assert await kept_objects(store) == 1  # the kept object; no orphan
    assert [p.name for p in store.files.root.iterdir() if p.name.startswith(".")] == []  # no temp left


async def test_an_upload_whose_transaction_fails_leaves_no_file(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = store.db.write

    async def failing_write(work):  # type: ignore[no-untyped-def]
        def then_fail(conn):  # type: ignore[no-untyped-def]
            work(conn)
            raise ConnectionResetError("the database went away before COMMIT")  # injected: rolls back

        return await real_write(then_fail)

    monkeypatch.setattr(store.db, "write", failing_write)
    temp = store.files.temp_path()
    temp.write_bytes(b"RIFF")
    with pytest.raises(ConnectionResetError):
        await store.files.commit("dashscope-instant/a/b.wav", owner="alice", model="m", temp=temp, size=4)
    monkeypatch.undo()
    assert list(store.files.root.iterdir()) == []
    rows = await store.db.read(sa.select(uploads))
    assert rows == [] and await kept_objects(store) == 0


async def test_every_string_the_database_sees_is_bounded_and_clean(store: Store) -> None:
    temp = store.files.temp_path()
    temp.write_bytes(b"RIFF")
    await store.files.commit(
        "dashscope-instant/a/b.wav", owner="alice", model="m\x00" + "x" * 300 + "\ud800", temp=temp, size=4
    )
    who = await store.keys.authenticate("sk-static")
    await store.quota.admit(who, "req-1", model="q\x00" * 200, protocol="openai")
    models = [r.model for r in await store.db.read(sa.select(reservations.c.model))]
    assert models and all(len(m) <= 100 and "\x00" not in m for m in models)


# --- the quota as a state machine ------------------------------------------------------------------------------


class QuotaMachine(RuleBasedStateMachine):
    """Random admit / reserve / settle / crash-restart sequences on 3 keys (SQLite)."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.n = 0

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    @initialize()
    def setup(self) -> None:
        import tempfile

        self.home = Path(tempfile.mkdtemp())
        self.store = Store(f"sqlite:///{self.home / 't.db'}", home=self.home)
        self.run(self.store.open(server=True))
        self.keys = []
        for quota in (500, 2000, None):
            key, info = self.run(self.store.keys.create(quota_tokens=quota, max_concurrency=3))
            self.keys.append((self.run(self.store.keys.authenticate(key)), info.id, quota))
        self.open: dict[str, tuple[object, int]] = {}
        self.settled: set[str] = set()

    @rule(k=st.integers(0, 2), tokens=st.integers(1, 700))
    def start(self, k: int, tokens: int) -> None:
        who, _, _ = self.keys[k]
        self.n += 1
        rid = f"r{self.n}"
        try:
            self.run(self.store.quota.admit(who, rid, model="m", protocol="p"))
            self.run(self.store.quota.reserve(who, rid, tokens))
            self.open[rid] = (who, tokens)
        except errors.TingError:
            self.settled.add(rid)

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data(), used=st.integers(0, 800))
    def finish(self, data: st.DataObject, used: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.open)))
        self.open.pop(rid)
        assert self.run(self.store.quota.settle(rid, Outcome("ok", Usage(used, 0, 0))))
        assert not self.run(self.store.quota.settle(rid, Outcome("ok", Usage(used, 0, 0))))
        self.settled.add(rid)

    @rule()
    def crash_and_restart(self) -> None:
        self.run(self.store.close())
        self.store = Store(f"sqlite:///{self.home / 't.db'}", home=self.home)
        self.run(self.store.open(server=True))  # releases every reservation left in flight
        self.settled |= set(self.open)
        self.open.clear()

    @invariant()
    def balances_hold(self) -> None:
        if not hasattr(self, "store"):
            return
        for _, key_id, quota in self.keys:
            info = self.run(self.store.keys.find(key_id))
            assert info.spent_tokens >= 0 and info.reserved_tokens >= 0
            if quota is not None:
                assert info.spent_tokens + info.reserved_tokens <= quota
            held = sum(t for rid, (who, t) in self.open.items() if who.key_id == key_id)
            assert info.reserved_tokens == held
        rows = self.run(self.store.ledger.rows())
        assert len(rows) == len({r.request_id for r in rows}) == len(self.settled)

    def teardown(self) -> None:
        if hasattr(self, "store"):
            self.run(self.store.close())
        self.loop.close()


TestQuotaMachine = QuotaMachine.TestCase
TestQuotaMachine.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)
