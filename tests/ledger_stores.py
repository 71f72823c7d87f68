"""Fixtures for the ledger's stores: a real ``redis-server``, and a fresh store of each kind.

Loaded for every test through ``pytest_plugins`` in tests/conftest.py. The
Redis server is a real one (Debian's ``redis-server``, which .ci/run installs),
started by pytest-redis on a free port with its own temporary directory and
no persistence, and stopped at the end. Where it is missing the Redis cases
skip with the reason, except under CI, where they fail (tests/support.py).
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import require

REDIS_SERVER = shutil.which("redis-server")


def require_redis() -> str:
    """The path of ``redis-server``; skips (fails under CI) when it is missing."""
    require("redis-server", REDIS_SERVER is not None, "apt-get install redis-server")
    assert REDIS_SERVER is not None
    return REDIS_SERVER


def start_redis(datadir: Path) -> Any:
    """A new ``redis-server`` of its own (a pytest-redis executor, started), for tests that stop or kill it."""
    from port_for import get_port
    from pytest_redis.executor import RedisExecutor

    port = get_port(None)
    assert port is not None
    executor = RedisExecutor(
        executable=require_redis(),
        databases=1,
        redis_timeout=30,
        loglevel="warning",
        host="127.0.0.1",
        port=port,
        save="",
        appendonly="no",
        datadir=datadir,
        startup_timeout=30,
    )
    return executor.start()


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> str:
    """The URL of the session's ``redis-server`` (pytest-redis's ``redis_proc``), started on first use."""
    require_redis()
    proc = request.getfixturevalue("redis_proc")
    return f"redis://{proc.host}:{proc.port}/0"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Any]:
    """A ``redis-server`` for this test alone (it may kill it); stopped after, whatever the test did."""
    executor = start_redis(tmp_path)
    try:
        yield executor
    finally:
        if executor.running():
            executor.stop()


def _sqlite_opener(tmp_path: Path) -> Callable[[], Any]:
    from llamaproc.ledger import SQLiteStore

    path = tmp_path / "ledger.db"
    return lambda: SQLiteStore(path)


def _redis_opener(request: pytest.FixtureRequest) -> Callable[[], Any]:
    from llamaproc.ledger._redis import RedisStore

    url = request.getfixturevalue("redis_url")
    prefix = f"test:{uuid.uuid4().hex}:"
    return lambda: RedisStore(url, prefix=prefix)


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """Opens stores on one fresh, empty ledger of each kind: a new SQLite file, or a new key prefix on the
    session's Redis. Each call opens another store on it (other connections, as another process has);
    every one is closed after the test."""
    opener = _sqlite_opener(tmp_path) if request.param == "sqlite" else _redis_opener(request)
    opened: list[Any] = []

    def open_one() -> Any:
        made = opener()
        opened.append(made)
        return made

    try:
        yield open_one
    finally:
        for made in opened:
            made.close()


@pytest.fixture
def store(open_store: Callable[[], Any]) -> Any:
    """A store on a fresh, empty ledger of each kind."""
    return open_store()


@pytest.fixture(params=["sqlite", "redis"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh ledger of each kind: a new SQLite file, or a ``redis-server`` of this test's own."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'ledger.db'}"
    redis = request.getfixturevalue("own_redis")
    return f"redis://127.0.0.1:{redis.port}/0"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts (append them): killed, if still running, and reaped after it."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
