"""The ledger's front on the SQLite store in a temporary directory, under asyncio and trio.

A second store on the same file plays the other processes: it lists, removes
rows behind the ledger's back, and leaves a waiter that never renews.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import pytest

import llamaproc
from llamaproc import ClosedError, InvalidArgumentError, LeaseLostError, LeaseTimeoutError, LedgerError
from llamaproc.ledger import Ledger, SQLiteStore, Waiter, open_ledger, parse_size

BOTH = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])

TTL = 0.5


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
async def ledger(db: Path) -> AsyncIterator[Ledger]:
    async with await open_ledger(f"sqlite://{db}", capacity={"cpu": 10, "gpu0": "1KiB"}, ttl=TTL) as opened:
        yield opened


@pytest.fixture
def other(db: Path, ledger: Ledger) -> Iterator[SQLiteStore]:
    """The same file through another store: what another process sees and does."""
    store = SQLiteStore(db)
    yield store
    store.close()


async def until(condition: Callable[[], bool], *, limit: float = 30.0) -> None:
    """Wait until ``condition()`` is true (a safety net of ``limit`` seconds, never a timing assertion)."""
    with anyio.fail_after(limit):
        while not condition():
            await anyio.sleep(0.01)


@BOTH
@pytest.mark.anyio
async def test_a_lease_is_granted_listed_and_released(ledger: Ledger) -> None:
    assert await ledger.capacity() == {"cpu": 10, "gpu0": 1024}
    async with ledger.acquire(4, holder="model-a", priority="high") as lease:
        assert (lease.device, lease.memory, lease.priority, lease.holder) == ("cpu", 4, "high", "model-a")
        assert not lease.lost and not lease.preempt_requested
        [info] = await ledger.leases()
        assert (info.id, info.token, info.memory, info.holder, info.host) == (
            lease.id, lease.token, 4, "model-a", ledger.host,
        )  # fmt: skip
        assert info.granted < info.expires
        assert await ledger.leases(device="gpu0") == []
    assert await ledger.leases() == []


@BOTH
@pytest.mark.anyio
async def test_tokens_only_grow(ledger: Ledger) -> None:
    tokens = []
    for _ in range(3):
        async with ledger.acquire("1B") as lease:
            tokens.append(lease.token)
    assert tokens == sorted(set(tokens))


@BOTH
@pytest.mark.anyio
async def test_bad_requests_fail_at_once(ledger: Ledger) -> None:
    with pytest.raises(InvalidArgumentError, match="more than its capacity") as info:
        await ledger.lease(11)
    assert info.value.param == "memory"
    with pytest.raises(InvalidArgumentError, match="no device 'gpu7'") as info:
        await ledger.lease(1, device="gpu7")
    assert info.value.param == "device"
    for kwargs, param in [
        ({"memory": "2 gigs"}, "memory"),
        ({"memory": 0}, "memory"),
        ({"memory": 1, "priority": "vip"}, "priority"),
        ({"memory": 1, "timeout": -1}, "timeout"),
    ]:
        memory = kwargs.pop("memory")
        with pytest.raises(InvalidArgumentError) as info:
            await ledger.lease(memory, **kwargs)  # type: ignore[arg-type]
        assert info.value.param == param
    assert await ledger.leases() == []


@BOTH
@pytest.mark.anyio
async def test_waiters_are_served_by_priority_then_arrival(ledger: Ledger, other: SQLiteStore) -> None:
    first = await ledger.lease(10, priority="urgent")
    order: list[str] = []

    granted: list[tuple[int, str]] = []

    async def wait(priority: str, tag: str) -> None:
        lease = await ledger.lease(5, priority=priority, holder=tag)  # type: ignore[arg-type]
        order.append(tag)
        granted.append((lease.token, tag))
        held.append(lease)

    held: list[llamaproc.Lease] = []
    async with anyio.create_task_group() as tg:
        for n, (priority, tag) in enumerate(
            [("low", "low"), ("normal", "normal-1"), ("high", "high"), ("normal", "normal-2")]
        ):
            tg.start_soon(wait, priority, tag)
            await until(lambda n=n: len(other.waiters()) == n + 1)
        await first.release()
        await until(lambda: len(order) == 2)
        assert [tag for _, tag in sorted(granted)] == ["high", "normal-1"]
        for lease in list(held):
            await lease.release()
        await until(lambda: len(order) == 4)
        for lease in held[2:]:
            await lease.release()
    # Two grants close together may resume their tasks in either order: the tokens tell the order of the grants.
    assert [tag for _, tag in sorted(granted)] == ["high", "normal-1", "normal-2", "low"]


@BOTH
@pytest.mark.anyio
async def test_a_timeout_says_how_much_was_free(ledger: Ledger, other: SQLiteStore) -> None:
    async with ledger.acquire(8):
        with pytest.raises(LeaseTimeoutError) as info:
            await ledger.lease(5, timeout=0.2)
    error = info.value
    assert (error.memory, error.free, error.capacity, error.device) == (5, 2, 10, "cpu")
    assert isinstance(error, LedgerError)
    assert other.waiters() == []


@BOTH
@pytest.mark.anyio
async def test_a_waiter_asks_a_lower_priority_holder_to_yield(ledger: Ledger) -> None:
    batch = await ledger.lease(8, priority="batch", holder="batch-job")
    granted: list[llamaproc.Lease] = []

    async def urgent() -> None:
        granted.append(await ledger.lease(5, priority="urgent", timeout=30))

    async with anyio.create_task_group() as tg:
        tg.start_soon(urgent)
        with anyio.fail_after(30):
            await batch.preempted()
        assert batch.preempt_requested and not batch.lost
        [info] = [i for i in await ledger.leases() if i.id == batch.id]
        assert info.preempt_requested
        await batch.release()
    assert granted[0].memory == 5
    await granted[0].release()


@BOTH
@pytest.mark.anyio
async def test_a_holder_that_ignores_the_request_keeps_its_lease(ledger: Ledger) -> None:
    batch = await ledger.lease(8, priority="batch")
    with pytest.raises(LeaseTimeoutError):
        await ledger.lease(5, priority="urgent", timeout=3 * TTL)
    with anyio.fail_after(30):  # the request reaches the holder with its next renewal
        await batch.preempted()
    assert batch.preempt_requested and not batch.lost
    assert [i.id for i in await ledger.leases()] == [batch.id]
    await batch.release()


@BOTH
@pytest.mark.anyio
async def test_no_holder_of_equal_or_higher_priority_is_asked(ledger: Ledger) -> None:
    holder = await ledger.lease(8, priority="normal")
    with pytest.raises(LeaseTimeoutError):
        await ledger.lease(5, priority="normal", timeout=0.3)
    assert not holder.preempt_requested
    await holder.release()


@BOTH
@pytest.mark.anyio
async def test_release_is_idempotent(ledger: Ledger) -> None:
    lease = await ledger.lease(10)
    await lease.release()
    await lease.release()
    async with ledger.acquire(10):  # the memory is back, once
        assert len(await ledger.leases()) == 1


@BOTH
@pytest.mark.anyio
async def test_the_context_manager_releases_on_an_exception(ledger: Ledger) -> None:
    with pytest.raises(ZeroDivisionError):
        async with ledger.acquire(10):
            1 / 0  # noqa: B018
    assert await ledger.leases() == []


@BOTH
@pytest.mark.anyio
async def test_the_context_manager_releases_on_cancellation(ledger: Ledger) -> None:
    entered = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def hold() -> None:
            async with ledger.acquire(10):
                entered.set()
                await anyio.sleep_forever()

        tg.start_soon(hold)
        await entered.wait()
        tg.cancel_scope.cancel()
    assert await ledger.leases() == []


@BOTH
@pytest.mark.anyio
async def test_a_cancelled_waiter_leaves_no_trace(ledger: Ledger, other: SQLiteStore) -> None:
    holder = await ledger.lease(10)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ledger.lease, 5)
        await until(lambda: len(other.waiters()) == 1)
        tg.cancel_scope.cancel()
    assert other.waiters() == []
    assert [r.id for r in other.leases()] == [holder.id]
    await holder.release()


@BOTH
@pytest.mark.anyio
async def test_renewal_keeps_a_lease_past_several_ttls(ledger: Ledger, other: SQLiteStore) -> None:
    lease = await ledger.lease(10)
    [record] = other.leases()
    await until(lambda: other.leases()[0].expires > record.granted + 4 * TTL)
    [renewed] = other.leases()
    assert renewed.id == lease.id and not lease.lost
    await lease.release()


@BOTH
@pytest.mark.anyio
async def test_a_lease_removed_behind_its_back_is_lost(ledger: Ledger, other: SQLiteStore) -> None:
    lease = await ledger.lease(5)
    other.release(lease.id)
    with anyio.fail_after(30):
        await lease.preempted()
    assert lease.lost and not lease.preempt_requested
    with pytest.raises(LeaseLostError):
        await lease.resize(4)
    await lease.release()  # nothing left to give back, and no error


@BOTH
@pytest.mark.anyio
async def test_a_dead_waiter_is_purged(ledger: Ledger, other: SQLiteStore) -> None:
    # A waiter that came first, asked for everything, and then died without cancelling.
    other.try_grant(
        Waiter(id="dead", device="cpu", memory=10, priority="urgent", holder="x", pid=1, host="h"), TTL, False
    )
    holder = await ledger.lease(5, timeout=30)  # waits until the dead waiter expires
    assert [w.id for w in other.waiters()] == []
    await holder.release()


@BOTH
@pytest.mark.anyio
async def test_resize(ledger: Ledger, other: SQLiteStore) -> None:
    lease = await ledger.lease(4)
    assert await lease.resize("6B")
    assert lease.memory == 6 and other.leases()[0].memory == 6
    async with ledger.acquire(3):
        assert not await lease.resize(8)  # 8 + 3 > 10
        assert lease.memory == 6
    await lease.release()


@BOTH
@pytest.mark.anyio
async def test_close_releases_its_own_leases_only(db: Path, ledger: Ledger, other: SQLiteStore) -> None:
    async with await open_ledger(f"sqlite://{db}", ttl=TTL) as second:
        mine = await second.lease(3, holder="second")
        theirs = await ledger.lease(3, holder="first")
        threads = {t for t in threading.enumerate() if t.name == "llamaproc-ledger-renewal"}
        await second.close()
        assert {t for t in threading.enumerate() if t.name == "llamaproc-ledger-renewal"} < threads
        assert mine.lost and not theirs.lost
        with anyio.fail_after(30):
            await mine.preempted()
        assert [r.holder for r in other.leases()] == ["first"]
        await mine.release()
        with pytest.raises(ClosedError):
            await second.lease(1)
        with pytest.raises(ClosedError):
            await second.leases()
        await second.close()  # idempotent
    await theirs.release()


@BOTH
@pytest.mark.anyio
async def test_close_ends_the_waits(db: Path, ledger: Ledger, other: SQLiteStore) -> None:
    holder = await ledger.lease(10)
    second = await open_ledger(f"sqlite://{db}", ttl=TTL)
    failed: list[BaseException] = []

    async def wait() -> None:
        try:
            await second.lease(5)
        except ClosedError as e:
            failed.append(e)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await until(lambda: len(other.waiters()) == 1)
        await second.close()
    assert len(failed) == 1
    assert other.waiters() == []
    await holder.release()


@BOTH
@pytest.mark.anyio
async def test_capacity_is_shared_through_the_store(db: Path, ledger: Ledger) -> None:
    async with await open_ledger(f"sqlite://{db}") as second:  # no capacity given: the stored one
        assert await second.capacity() == {"cpu": 10, "gpu0": 1024}
    async with await open_ledger(f"sqlite://{db}", capacity={"cpu": "20B"}) as third:
        assert (await third.capacity())["cpu"] == 20
    assert (await ledger.capacity())["cpu"] == 20


@BOTH
@pytest.mark.anyio
async def test_the_default_ledger_lives_in_the_state_dir_with_the_detected_capacity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psutil

    monkeypatch.setenv("LLAMAPROC_STATE_DIR", str(tmp_path / "state"))
    async with await llamaproc.open_ledger() as opened:
        assert (await opened.capacity())["cpu"] == psutil.virtual_memory().total
    assert (tmp_path / "state" / "ledger.db").is_file()


@BOTH
@pytest.mark.anyio
async def test_bad_urls_and_options(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await open_ledger("postgres://x")
    assert info.value.param == "url"
    with pytest.raises(InvalidArgumentError):
        await open_ledger("sqlite://")
    with pytest.raises(InvalidArgumentError) as info:
        await open_ledger(f"sqlite://{tmp_path}/l.db", ttl=0)
    assert info.value.param == "ttl"
    with pytest.raises(InvalidArgumentError) as info:
        await open_ledger(f"sqlite://{tmp_path}/l.db", capacity={"cpu": "lots"})
    assert info.value.param == "capacity"
    with pytest.raises(LedgerError, match="cannot open the ledger database"):
        await open_ledger(f"sqlite://{tmp_path}/not-a-dir/../{'x' * 300}/l.db")


def test_parse_size() -> None:
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(" 1.5 GB ") == 1_500_000_000
    assert parse_size(7) == 7
    with pytest.raises(InvalidArgumentError, match="invalid size") as info:
        parse_size("2 gigs", param="memory")
    assert info.value.param == "memory"
