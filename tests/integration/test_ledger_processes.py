"""The ledger shared by real processes, on each store (a SQLite file, a real redis-server): never past
capacity, a killed holder's memory comes back, preemption across processes; and what a holder sees when
Redis goes away.

Each process is a separate Python interpreter running ledger_worker.py on one
ledger (some under asyncio, some under trio); this test process writes the
capacity, starts them, and checks what they logged. Every Redis case runs on
a redis-server of its own (tests/ledger_stores.py), so the processes share
the ledger's default key prefix and nothing else.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from ledger_stores import require_redis

from llamaproc.errors import LeaseLostError, LedgerError
from llamaproc.ledger import SQLiteStore, Store, open_ledger

WORKER = Path(__file__).with_name("ledger_worker.py")
CAPACITY = 100
PROCESSES = 8
HOST = "test"  # the workers' host name in a Redis ledger
BOTH_LOOPS = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])


def start(mode: str, url: str, *args: str, loop: str = "asyncio") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), mode, url, loop, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def read_line(process: subprocess.Popen[str], *, limit: float = 60.0) -> str:
    """The next line the worker prints (a safety net of ``limit`` seconds, not a timing assertion)."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(limit):
            raise AssertionError(f"the worker printed nothing in {limit} s")
    line = process.stdout.readline()
    if not line:
        process.wait(10)
        raise AssertionError(
            f"the worker exited ({process.returncode}): {process.stderr.read() if process.stderr else ''}"
        )
    return line.strip()


def open_store(url: str) -> Store:
    """The store behind ``url``, opened directly (as a process would open it), to look at leases and waiters."""
    if url.startswith("sqlite://"):
        return SQLiteStore(Path(url[len("sqlite://") :]))
    from llamaproc.ledger._redis import RedisStore

    return RedisStore(url)


def wait_until_queued(store: Store) -> None:
    deadline = time.monotonic() + 60
    while not store.waiters():
        assert time.monotonic() < deadline, "the waiter never queued"
        time.sleep(0.02)


@pytest.fixture(params=["sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh ledger with a capacity of CAPACITY bytes on ``cpu``: a SQLite file, or a redis-server of its own."""
    if request.param == "sqlite":
        ledger_url = f"sqlite://{tmp_path / 'ledger.db'}"
    else:
        redis = request.getfixturevalue("own_redis")
        ledger_url = f"redis://127.0.0.1:{redis.port}/0"

    async def write_capacity() -> None:
        async with await open_ledger(ledger_url, capacity={"cpu": CAPACITY}, host=HOST):
            pass

    anyio.run(write_capacity)
    return ledger_url


# --- many processes --------------------------------------------------------------------------------


def test_eight_processes_never_hold_more_than_the_capacity(
    url: str, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    logs = [tmp_path / f"worker-{n}.jsonl" for n in range(PROCESSES)]
    processes.extend(
        start("churn", url, "4", str(n), str(log), loop="trio" if n % 2 else "asyncio") for n, log in enumerate(logs)
    )
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    entries = [json.loads(line) for log in logs for line in log.read_text().splitlines()]
    grants = [e for e in entries if e["outcome"] == "granted"]
    assert len(grants) > PROCESSES * 5, "too few grants to say anything"
    for n, log in enumerate(logs):
        assert any(json.loads(line)["outcome"] == "granted" for line in log.read_text().splitlines()), f"worker {n}"
    assert not any(g["lost"] for g in grants), "a lease was lost while it was held"

    # Tokens are unique, and grow in the order of the grants.
    assert len({g["token"] for g in grants}) == len(grants)
    by_token = sorted(grants, key=lambda g: g["token"])
    assert all(a["granted_at"] <= b["granted_at"] for a, b in zip(by_token, by_token[1:], strict=False))

    # At every grant, the leases in use (granted, not yet given back) fit in the capacity.
    for grant in grants:
        at = grant["granted_at"]
        in_use = sum(g["memory"] for g in grants if g["granted_at"] <= at < g["released_at"])
        assert in_use <= CAPACITY, f"{in_use} bytes in use at {at} (token {grant['token']})"

    # No waiter waited past its timeout (a margin for one poll and a loaded machine).
    for entry in entries:
        assert entry["waited"] <= entry["timeout"] + 5.0, entry


def test_the_memory_of_a_killed_holder_is_granted_after_its_ttl(
    url: str, processes: list[subprocess.Popen[str]]
) -> None:
    holder = start("hold", url, str(CAPACITY), "normal")
    processes.append(holder)
    assert read_line(holder).startswith("granted ")
    waiter = start("wait", url, str(CAPACITY), "normal", loop="trio")
    processes.append(waiter)
    store = open_store(url)
    try:
        wait_until_queued(store)  # the waiter is queued behind the holder
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        assert read_line(waiter).startswith("granted ")
        assert read_line(waiter) == "released"
        assert waiter.wait(30) == 0
        assert store.leases() == [] and store.waiters() == []
    finally:
        store.close()


# --- preemption ------------------------------------------------------------------------------------


def test_a_batch_holder_yields_to_an_urgent_waiter_in_another_process(
    url: str, processes: list[subprocess.Popen[str]]
) -> None:
    holder = start("yield", url, "80", "batch")
    processes.append(holder)
    assert read_line(holder).startswith("granted ")
    waiter = start("wait", url, "50", "urgent", loop="trio")
    processes.append(waiter)
    assert read_line(holder) == "preempted"
    assert read_line(holder) == "released"
    assert read_line(waiter).startswith("granted ")
    assert read_line(waiter) == "released"
    assert holder.wait(30) == 0 and waiter.wait(30) == 0


def test_a_holder_that_ignores_the_request_keeps_its_lease_and_the_waiter_times_out(
    url: str, processes: list[subprocess.Popen[str]]
) -> None:
    holder = start("ignore", url, "80", "batch", loop="trio")
    processes.append(holder)
    granted = read_line(holder)
    assert granted.startswith("granted ")
    waiter = start("wait", url, "50", "urgent", "3")
    processes.append(waiter)
    assert read_line(holder) == "preempted"
    assert read_line(waiter) == "timeout LeaseTimeoutError"
    assert waiter.wait(30) == 0
    store = open_store(url)
    try:
        # the holder, still alive, still holds its lease (asked to yield); the waiter is gone
        (lease,) = store.leases()
        token = int(granted.split()[1])
        assert (lease.token, lease.memory, lease.holder, lease.pid) == (token, 80, "ignore", holder.pid)
        assert lease.preempt_requested is not None
        assert store.waiters() == []
        assert holder.poll() is None
    finally:
        store.close()


# --- Redis going away ------------------------------------------------------------------------------


@BOTH_LOOPS
async def test_open_ledger_fails_clearly_when_redis_is_not_there(anyio_backend: str) -> None:
    from port_for import get_port

    require_redis()
    with anyio.fail_after(30), pytest.raises(LedgerError, match="cannot be reached"):
        await open_ledger(f"redis://127.0.0.1:{get_port(None)}/0", capacity={"cpu": CAPACITY})


@BOTH_LOOPS
async def test_open_ledger_fails_clearly_when_redis_does_not_answer(anyio_backend: str, own_redis: Any) -> None:
    os.kill(own_redis.process.pid, signal.SIGSTOP)  # it accepts connections and never answers
    try:
        with anyio.fail_after(30), pytest.raises(LedgerError, match="did not answer"):
            await open_ledger(f"redis://127.0.0.1:{own_redis.port}/0", capacity={"cpu": CAPACITY})
    finally:
        os.kill(own_redis.process.pid, signal.SIGCONT)


async def _held_then(redis: Any, break_it: str) -> None:
    """Hold a lease, break Redis (``kill`` or ``stop``), and check that the holder is told it lost the lease."""
    ttl = 1.0
    ledger = await open_ledger(f"redis://127.0.0.1:{redis.port}/0", capacity={"cpu": CAPACITY}, ttl=ttl)
    try:
        lease = await ledger.lease(60, timeout=30)
        if break_it == "kill":
            redis.kill()
        else:
            os.kill(redis.process.pid, signal.SIGSTOP)
        # within the TTL and the renewal that failed (a safety net, not a measure of speed)
        with anyio.fail_after(ttl + 30):
            await lease.preempted()
        assert lease.lost and not lease.preempt_requested
        with pytest.raises(LeaseLostError, match="renewal failed"):
            await lease.resize(10)
        with anyio.fail_after(30):
            await lease.release()  # nothing to give back: the lease is no longer held
    finally:
        with anyio.fail_after(30):
            await ledger.close()
        if break_it == "stop":
            os.kill(redis.process.pid, signal.SIGCONT)


@BOTH_LOOPS
async def test_a_holder_is_told_when_redis_is_killed(anyio_backend: str, own_redis: Any) -> None:
    await _held_then(own_redis, "kill")


@BOTH_LOOPS
async def test_a_holder_is_told_when_redis_stops_answering(anyio_backend: str, own_redis: Any) -> None:
    await _held_then(own_redis, "stop")


@BOTH_LOOPS
async def test_a_new_lease_fails_clearly_once_redis_is_gone(anyio_backend: str, own_redis: Any) -> None:
    async with await open_ledger(f"redis://127.0.0.1:{own_redis.port}/0", capacity={"cpu": CAPACITY}) as ledger:
        own_redis.kill()
        with anyio.fail_after(30), pytest.raises(LedgerError, match="cannot be reached"):
            await ledger.lease(10, timeout=30)
