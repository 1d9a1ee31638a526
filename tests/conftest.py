"""Shared fixtures: the audio corpus, a decoder pool, the tiny checkpoint."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests import corpus as corpus_module

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, corpus_module.Sample]:
    if not corpus_module.have("espeak-ng", "ffmpeg"):
        pytest.skip("espeak-ng and ffmpeg are needed to build the audio corpus (apt-get install espeak-ng ffmpeg)")
    return corpus_module.build(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
async def decoder_pool() -> AsyncIterator[object]:
    from ting.audio.decode import DecoderPool

    pool = DecoderPool(2, timeout_s=10.0)
    await pool.start()
    yield pool
    await pool.close()


@pytest.fixture
def test_pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let child processes import the `tests` package (for injected decoder workers)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline random-weight checkpoint, built once per test session."""
    from ting.engine import tiny

    return tiny.build(tmp_path_factory.mktemp("tiny") / "qwen2-audio-tiny")


@pytest.fixture(scope="session")
async def engine(tiny_dir: Path) -> AsyncIterator[object]:
    """A running engine on the tiny checkpoint (8 slots)."""
    from ting.engine import Engine

    e = Engine.load(str(tiny_dir), max_batch_size=8, max_queue=64)
    e.start()
    yield e
    e.stop()


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[str]:
    """A PostgreSQL server the test session starts itself ($TING_TEST_POSTGRES_URL to use another)."""
    from tests import postgres

    if os.environ.get("TING_TEST_POSTGRES_URL"):
        yield os.environ["TING_TEST_POSTGRES_URL"].rstrip("/")
        return
    if postgres.binaries() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql); scripts/install --dev installs it")
    with postgres.temporary_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: SQLite in a temporary directory, or a new database on the test PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ting.db'}"
    from tests import postgres

    return await postgres.create_database(request.getfixturevalue("postgres_admin"))
