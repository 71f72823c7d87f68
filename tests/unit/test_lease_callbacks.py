"""``Lease.release_nowait()`` and ``Lease.add_listener()`` on the SQLite store, under asyncio and trio.

These are what a model loaded through a ledger relies on: the ledger's
renewal thread calls a listener in the event loop when a waiter asks the
holder to yield or when the lease is lost, and the listener gives the memory
back without awaiting anything. A second store on the same file plays the
other processes (it removes rows behind the ledger's back).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from llamaproc.ledger import Lease, Ledger, SQLiteStore, Waiter, open_ledger

BOTH = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
pytestmark = [BOTH, pytest.mark.anyio]

TTL = 0.5  # short: news of a preemption or a loss comes with a renewal, every TTL / 3
SAFETY = 30.0  # an upper bound for things that take a renewal or two, never a measure of speed
# Longer than any wait of a test: a lease of a ledger with this TTL comes back only when it is released,
# never because it expired unrenewed.
STEADY_TTL = 4 * SAFETY


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
async def ledger(db: Path) -> AsyncIterator[Ledger]:
    async with await open_ledger(f"sqlite://{db}", capacity={"cpu": 10}, ttl=TTL) as opened:
        yield opened


@pytest.fixture
async def steady(db: Path, ledger: Ledger) -> AsyncIterator[Ledger]:
    """A second ledger on the same file whose leases never expire within a test."""
    async with await open_ledger(f"sqlite://{db}", ttl=STEADY_TTL) as opened:
        yield opened


@pytest.fixture
def other(db: Path, ledger: Ledger) -> Iterator[SQLiteStore]:
    """The same file through another store: what another process sees and does."""
    store = SQLiteStore(db)
    yield store
    store.close()


async def until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` is true (a safety net, never a timing assertion)."""
    with anyio.fail_after(SAFETY):
        while not condition():
            await anyio.sleep(0.01)


async def assert_renewed(ledger: Ledger, other: SQLiteStore) -> None:
    """The ledger's renewal thread still works: a new lease outlives several TTLs."""
    lease = await ledger.lease(1, timeout=SAFETY)
    [record] = [r for r in other.leases() if r.id == lease.id]

    def renewed() -> bool:
        return any(r.id == lease.id and r.expires > record.granted + 3 * TTL for r in other.leases())

    await until(renewed)
    assert not lease.lost
    await lease.release()


def recorder(lease: Lease) -> tuple[list[str], Callable[[], None]]:
    """A listener that notes what the lease says each time it is called, and in which thread."""
    calls: list[str] = []
    loop_thread = threading.get_ident()

    def listener() -> None:
        assert threading.get_ident() == loop_thread, "a listener runs in the event loop's thread"
        calls.append("lost" if lease.lost else "preempted" if lease.preempt_requested else "held")

    return calls, listener


# --- release_nowait ----------------------------------------------------------------------------


async def test_release_nowait_from_the_event_loop_gives_the_memory_back(steady: Ledger, other: SQLiteStore) -> None:
    lease = await steady.lease(10)
    lease.release_nowait()
    lease.release_nowait()  # idempotent
    await lease.release()  # and so is release() after it
    # The renewal thread gives it back soon: a lease for the whole device is granted (the safety net is generous).
    again = await steady.lease(10, timeout=SAFETY)
    assert [r.id for r in other.leases()] == [again.id]
    await again.release()


async def test_release_nowait_grants_a_waiter_of_the_same_ledger(steady: Ledger, other: SQLiteStore) -> None:
    lease = await steady.lease(10)
    granted: list[Lease] = []

    async def wait() -> None:
        granted.append(await steady.lease(10, timeout=SAFETY))

    for _ in range(2):  # the renewal thread, which gave the lease back and woke the waiter, does it again
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await until(lambda: len(other.waiters()) == 1)
            lease.release_nowait()
        lease = granted.pop()
        assert lease.memory == 10
    await lease.release()
    assert other.leases() == []


async def test_release_nowait_from_other_threads(steady: Ledger, other: SQLiteStore) -> None:
    first = await steady.lease(5)
    second = await steady.lease(5)
    # A worker thread of the event loop's library, and a plain thread of the process.
    await anyio.to_thread.run_sync(first.release_nowait)
    thread = threading.Thread(target=second.release_nowait)
    thread.start()
    await anyio.to_thread.run_sync(thread.join)
    for lease in (first, second):
        lease.release_nowait()  # idempotent from the loop too
    await until(lambda: other.leases() == [])
    # Another ledger on the same file (another process) gets the whole device.
    async with await open_ledger(f"sqlite://{other.path}", ttl=TTL) as second_ledger:
        async with second_ledger.acquire(10, timeout=SAFETY) as lease:
            assert lease.memory == 10


async def test_release_nowait_after_the_lease_was_lost(ledger: Ledger, other: SQLiteStore) -> None:
    lease = await ledger.lease(5)
    other.release(lease.id)
    with anyio.fail_after(SAFETY):
        await lease.preempted()
    assert lease.lost
    # Another process takes the memory at once; giving back the lost lease must not touch it.
    theirs = Waiter(id="theirs", device="cpu", memory=5, priority="normal", holder="x", pid=1, host="h")
    assert other.try_grant(theirs, 60.0, False).lease is not None
    lease.release_nowait()
    lease.release_nowait()
    await lease.release()
    assert [r.id for r in other.leases()] == ["theirs"]
    other.release("theirs")
    await assert_renewed(ledger, other)  # the renewal thread is none the worse


async def test_release_nowait_just_before_close_is_given_back_by_close(db: Path, other: SQLiteStore) -> None:
    opened = await open_ledger(f"sqlite://{db}", ttl=STEADY_TTL)
    lease = await opened.lease(7)
    lease.release_nowait()
    await opened.close()  # whether the renewal thread or close() gives it back, it is back
    assert other.leases() == []
    lease.release_nowait()  # after close: nothing to do, and no error
    assert not lease.lost  # released by its holder, not lost


# --- add_listener --------------------------------------------------------------------------------


async def test_a_listener_hears_the_preemption_request_then_the_loss(ledger: Ledger, other: SQLiteStore) -> None:
    batch = await ledger.lease(8, priority="batch")
    calls, listener = recorder(batch)
    batch.add_listener(listener)
    assert calls == []  # nothing happened yet: not called on adding
    async with anyio.create_task_group() as tg:
        tg.cancel_scope.deadline = anyio.current_time() + SAFETY

        async def urgent() -> None:
            # Asks the batch holder to yield, then gives up: the holder is told once and keeps its lease.
            with anyio.move_on_after(3 * TTL):
                await ledger.lease(5, priority="urgent")

        tg.start_soon(urgent)
        await until(lambda: calls == ["preempted"])
    assert batch.preempt_requested and not batch.lost
    # The request stays in the store and is reported again by each renewal: the listener is not called again
    # for it. The loss, noticed by a later renewal, is the next call.
    other.release(batch.id)
    await until(lambda: len(calls) == 2)
    assert calls == ["preempted", "lost"]
    await batch.release()


async def test_a_listener_may_give_the_lease_back_at_once(ledger: Ledger) -> None:
    """What a model loaded through a ledger does: the waiter is granted without the holder awaiting anything."""
    batch = await ledger.lease(8, priority="batch")
    batch.add_listener(batch.release_nowait)
    with anyio.fail_after(SAFETY):
        urgent = await ledger.lease(5, priority="urgent")
    assert batch.preempt_requested and not batch.lost
    assert [i.id for i in await ledger.leases()] == [urgent.id]
    await urgent.release()


async def test_a_listener_added_late_is_called_at_once(ledger: Ledger, other: SQLiteStore) -> None:
    batch = await ledger.lease(8, priority="batch")
    with anyio.move_on_after(3 * TTL):
        await ledger.lease(5, priority="urgent")  # asks the batch holder to yield, then gives up
    with anyio.fail_after(SAFETY):
        await batch.preempted()
    calls, listener = recorder(batch)
    batch.add_listener(listener)
    assert calls == ["preempted"]  # already asked: called before add_listener returns
    other.release(batch.id)
    await until(lambda: len(calls) == 2)  # and called again when it is lost
    assert calls == ["preempted", "lost"]

    lost = await ledger.lease(2)
    other.release(lost.id)
    with anyio.fail_after(SAFETY):
        await lost.preempted()
    late, listener = recorder(lost)
    lost.add_listener(listener)
    assert late == ["lost"]

    released = await ledger.lease(2)
    await released.release()
    never, listener = recorder(released)
    released.add_listener(listener)
    assert never == []  # released by its holder: neither asked nor lost
    for lease in (batch, lost):
        await lease.release()


async def test_a_failing_listener_breaks_neither_the_others_nor_the_ledger(
    ledger: Ledger, other: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    lease = await ledger.lease(5)
    before, first = recorder(lease)
    after, last = recorder(lease)

    def broken() -> None:
        raise RuntimeError("a listener's bug")

    for listener in (first, broken, last):
        lease.add_listener(listener)
    with caplog.at_level(logging.ERROR, logger="llamaproc"):
        other.release(lease.id)
        await until(lambda: after == ["lost"])
    assert before == ["lost"]
    assert any("a listener of lease" in r.getMessage() and r.exc_info for r in caplog.records)
    # The renewal thread still runs and the ledger still grants, renews and releases.
    await assert_renewed(ledger, other)
    assert other.leases() == []
