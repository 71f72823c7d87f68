"""The SQLite ledger shared by real processes: never past capacity, a killed holder's memory comes back,
preemption across processes.

Each process is a separate Python interpreter running ledger_worker.py on one
ledger file; this test process writes the capacity, starts them, and checks
what they logged.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from llamaproc.ledger import SQLiteStore, open_ledger

WORKER = Path(__file__).with_name("ledger_worker.py")
CAPACITY = 100
PROCESSES = 8


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
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


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "ledger.db"

    async def write_capacity() -> None:
        async with await open_ledger(f"sqlite://{path}", capacity={"cpu": CAPACITY}):
            pass

    anyio.run(write_capacity)
    yield path


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_eight_processes_never_hold_more_than_the_capacity(
    db: Path, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    logs = [tmp_path / f"worker-{n}.jsonl" for n in range(PROCESSES)]
    processes.extend(start("churn", str(db), "4", str(n), str(log)) for n, log in enumerate(logs))
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    entries = [json.loads(line) for log in logs for line in log.read_text().splitlines()]
    grants = [e for e in entries if e["outcome"] == "granted"]
    assert len(grants) > PROCESSES * 5, "too few grants to say anything"
    for n, log in enumerate(logs):
        assert any(json.loads(line)["outcome"] == "granted" for line in log.read_text().splitlines()), f"worker {n}"

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
    db: Path, processes: list[subprocess.Popen[str]]
) -> None:
    holder = start("hold", str(db), str(CAPACITY), "normal")
    processes.append(holder)
    assert read_line(holder).startswith("granted ")
    waiter = start("wait", str(db), str(CAPACITY), "normal")
    processes.append(waiter)
    store = SQLiteStore(db)
    try:
        deadline = time.monotonic() + 60
        while not store.waiters():  # the waiter is queued behind the holder
            assert time.monotonic() < deadline, "the waiter never queued"
            time.sleep(0.02)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        assert read_line(waiter).startswith("granted ")
        assert read_line(waiter) == "released"
        assert waiter.wait(30) == 0
        assert store.leases() == [] and store.waiters() == []
    finally:
        store.close()


def test_a_batch_holder_yields_to_an_urgent_waiter_in_another_process(
    db: Path, processes: list[subprocess.Popen[str]]
) -> None:
    holder = start("yield", str(db), "80", "batch")
    processes.append(holder)
    assert read_line(holder).startswith("granted ")
    waiter = start("wait", str(db), "50", "urgent")
    processes.append(waiter)
    assert read_line(holder) == "preempted"
    assert read_line(holder) == "released"
    assert read_line(waiter).startswith("granted ")
    assert read_line(waiter) == "released"
    assert holder.wait(30) == 0 and waiter.wait(30) == 0
