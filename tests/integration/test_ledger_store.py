"""The contract of the ledger's stores, run against each one (SQLite file, real Redis).

A store keeps leases and waiters and does each step as one atomic
transaction; these tests drive the stores directly (no ledger front), from
several threads and several connections where the contract is about races.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from llamaproc.errors import InvalidArgumentError, LedgerError
from llamaproc.ledger._records import PRIORITIES, Priority, Waiter

CAP = 1000
TTL = 30.0  # long enough that nothing expires unless a test means it to
SAFETY = 30.0  # an upper bound for things that take milliseconds, never a measure of speed


def waiter(name: str, memory: int, priority: Priority = "normal", *, device: str = "cpu") -> Waiter:
    return Waiter(
        id=name, device=device, memory=memory, priority=priority, holder=f"holder-{name}", pid=os.getpid(), host="here"
    )


def grant(store: Any, name: str, memory: int, priority: Priority = "normal", *, ttl: float = TTL) -> Any:
    """Grant a lease that must be granted at once."""
    result = store.try_grant(waiter(name, memory, priority), ttl, False)
    assert result.lease is not None, f"{name} was not granted: {result}"
    return result.lease


def used(store: Any, device: str = "cpu") -> int:
    return sum(lease.memory for lease in store.leases(device))


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SAFETY
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still not true after {SAFETY} s: {what}")
        time.sleep(0.02)


# --- capacity --------------------------------------------------------------------------------------


def test_capacity_is_stored_once_when_processes_race(open_store: Callable[[], Any]) -> None:
    stores = [open_store() for _ in range(8)]
    assert stores[0].capacity("cpu") is None
    assert stores[0].capacities() == {}
    start = threading.Barrier(len(stores))

    def propose(i: int) -> int:
        start.wait(SAFETY)
        return int(stores[i].set_capacity_if_absent("cpu", 1000 + i))

    with ThreadPoolExecutor(len(stores)) as pool:
        agreed = set(pool.map(propose, range(len(stores))))
    assert len(agreed) == 1
    (value,) = agreed
    assert value in range(1000, 1000 + len(stores))
    assert all(s.capacity("cpu") == value for s in stores)
    # set_capacity overwrites; set_capacity_if_absent then returns the stored one
    stores[0].set_capacity("cpu", 5)
    stores[0].set_capacity("gpu0", 7)
    assert stores[1].set_capacity_if_absent("cpu", 9) == 5
    assert stores[1].capacities() == {"cpu": 5, "gpu0": 7}


# --- order -----------------------------------------------------------------------------------------


def test_waiters_are_served_by_priority_then_arrival(store: Any) -> None:
    store.set_capacity("cpu", CAP)
    grant(store, "holder", CAP)
    arrivals: list[tuple[str, Priority]] = [("a", "normal"), ("b", "low"), ("c", "normal"), ("d", "urgent")]
    for name, priority in arrivals:
        assert store.try_grant(waiter(name, CAP, priority), TTL, False).lease is None
    assert [w.id for w in store.waiters("cpu")] == ["d", "a", "c", "b"]
    assert [w.id for w in store.waiters()] == ["d", "a", "c", "b"]

    store.release("holder")
    served = []
    for _ in arrivals:
        # everyone asks in arrival order; only the first in line is granted
        granted = [
            name
            for name, p in arrivals
            if name not in served and store.try_grant(waiter(name, CAP, p), TTL, False).lease
        ]
        assert len(granted) == 1, granted
        served += granted
        store.release(granted[0])
    assert served == ["d", "a", "c", "b"]
    assert store.waiters() == []


def test_a_small_request_does_not_pass_a_waiter_ahead_of_it(store: Any) -> None:
    store.set_capacity("cpu", CAP)
    grant(store, "holder", CAP // 2)
    assert store.try_grant(waiter("big", CAP), TTL, False).lease is None
    small = store.try_grant(waiter("small", 10, "low"), TTL, False)
    assert small.lease is None  # it would fit, but "big" comes first
    assert (small.free, small.capacity) == (CAP // 2, CAP)
    store.release("holder")
    assert store.try_grant(waiter("big", CAP), TTL, False).lease is not None
    store.release("big")
    assert store.try_grant(waiter("small", 10, "low"), TTL, False).lease is not None


def test_waiters_are_per_device(store: Any) -> None:
    store.set_capacity("cpu", CAP)
    store.set_capacity("gpu0", CAP)
    grant(store, "holder", CAP)
    assert store.try_grant(waiter("cpu-waiter", CAP, "urgent"), TTL, False).lease is None
    gpu = store.try_grant(waiter("gpu-lease", CAP, "batch", device="gpu0"), TTL, False)
    assert gpu.lease is not None and gpu.lease.device == "gpu0"
    assert [w.id for w in store.waiters("gpu0")] == []
    assert [lease.id for lease in store.leases("gpu0")] == ["gpu-lease"]
    assert [lease.id for lease in store.leases()] == ["holder", "gpu-lease"]  # oldest first


def test_a_grant_is_a_lease_with_a_growing_token(store: Any) -> None:
    store.set_capacity("cpu", CAP)
    first = grant(store, "one", 100, "high")
    second = grant(store, "two", 200)
    assert second.token > first.token
    assert (second.device, second.memory, second.priority, second.holder, second.pid, second.host) == (
        "cpu",
        200,
        "normal",
        "holder-two",
        os.getpid(),
        "here",
    )
    assert first.granted <= second.granted < second.expires
    assert second.expires - second.granted == pytest.approx(TTL, abs=1.0)
    assert second.preempt_requested is None
    assert store.leases("cpu") == [first, second]
    store.release("one")
    store.release("one")  # idempotent
    third = grant(store, "three", 100)
    assert third.token > second.token


def test_asking_again_for_a_granted_waiter_returns_its_lease(store: Any) -> None:
    store.set_capacity("cpu", 100)
    first = grant(store, "a", 60)
    # the same waiter asking again (a reply lost, the call repeated) gets the same lease, not a second one
    again = store.try_grant(waiter("a", 60), TTL, False)
    assert again.lease == first and (again.free, again.capacity) == (40, 100)
    assert store.leases() == [first] and store.waiters() == []


# --- never past capacity ---------------------------------------------------------------------------


def test_grants_never_exceed_the_capacity_under_contention(open_store: Callable[[], Any]) -> None:
    capacity = 100
    open_store().set_capacity("cpu", capacity)
    workers, rounds = 8, 25
    failures: list[str] = []
    tokens: list[int] = []
    lock = threading.Lock()

    def check(store: Any, step: str) -> None:
        live = store.leases("cpu")
        total = sum(lease.memory for lease in live)
        if total > capacity:
            failures.append(f"after {step}: {total} bytes granted of {capacity}: {live}")

    shared = open_store()  # one store used by several threads, as the ledger's worker threads use it

    def work(i: int) -> None:
        store = shared if i % 2 else open_store()
        rng = random.Random(i)
        deadline = time.monotonic() + 4 * SAFETY
        for r in range(rounds):
            name = f"w{i}-{r}"
            size = rng.randint(1, capacity)
            priority = rng.choice(PRIORITIES)
            while True:
                result = store.try_grant(waiter(name, size, priority), TTL, rng.random() < 0.5)
                check(store, f"{name} asked")
                if result.lease is not None:
                    break
                if time.monotonic() > deadline:
                    failures.append(f"{name} never granted")
                    store.cancel(name)
                    return
                time.sleep(rng.random() * 0.002)
            with lock:
                tokens.append(result.lease.token)
            if rng.random() < 0.3:
                store.resize(name, rng.randint(1, capacity))
                check(store, f"{name} resized")
            store.renew([name], [], TTL)
            check(store, f"{name} renewed")
            store.release(name)
            check(store, f"{name} released")

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, range(workers)))
    assert failures == []
    assert len(tokens) == len(set(tokens)) == workers * rounds
    assert open_store().leases() == []


# --- expiry ----------------------------------------------------------------------------------------


def test_expired_leases_and_waiters_are_purged(store: Any) -> None:
    store.set_capacity("cpu", CAP)
    grant(store, "short", CAP, ttl=0.2)
    assert store.try_grant(waiter("gone", CAP, "urgent"), 0.2, False).lease is None  # then never renewed
    # a batch request behind both is granted once the grant itself has purged them
    wait_for(lambda: store.try_grant(waiter("next", CAP, "batch"), TTL, False).lease is not None, "granted")
    assert [lease.id for lease in store.leases()] == ["next"]
    assert store.waiters() == []
    assert store.renew(["short"], [], TTL).lost == ("short",)


def test_renewed_leases_and_waiters_do_not_expire(store: Any) -> None:
    store.set_capacity("cpu", CAP)
    lease = grant(store, "kept", CAP // 4, ttl=0.3)
    grant(store, "control", CAP // 4, ttl=0.3)  # granted after "kept" with the same ttl, never renewed
    assert store.try_grant(waiter("waiting", CAP, "high"), 0.3, False).lease is None
    renewal = store.renew(["kept"], ["waiting"], TTL)
    assert renewal.lost == () and renewal.preempted == ()
    renewed = store.leases()[0]
    assert renewed.id == "kept" and renewed.expires > lease.expires and renewed.token == lease.token
    wait_for(lambda: [item.id for item in store.leases()] == ["kept"], "the lease that was not renewed expired")
    assert [item.id for item in store.waiters()] == ["waiting"]


# --- renew and preemption --------------------------------------------------------------------------


def test_renew_says_which_leases_are_lost_or_preempted(store: Any) -> None:
    store.set_capacity("cpu", CAP)
    grant(store, "batch", CAP // 2, "batch")
    grant(store, "normal", CAP // 2)
    asked = store.try_grant(waiter("urgent", CAP // 2, "urgent"), TTL, True)
    assert asked.lease is None and asked.preempting == ("batch",)
    renewal = store.renew(["batch", "normal", "never-granted"], ["urgent"], TTL)
    assert renewal.preempted == ("batch",)
    assert renewal.lost == ("never-granted",)
    assert store.leases("cpu")[0].preempt_requested is not None
    store.release("batch")
    assert store.renew(["batch", "normal"], [], TTL) == type(renewal)(lost=("batch",), preempted=())
    assert store.try_grant(waiter("urgent", CAP // 2, "urgent"), TTL, True).lease is not None


def test_preemption_asks_the_lowest_priority_and_newest_first_and_only_as_many_as_needed(store: Any) -> None:
    store.set_capacity("cpu", 100)
    for name, priority in [
        ("batch-old", "batch"),
        ("low", "low"),
        ("batch-new", "batch"),
        ("normal", "normal"),
        ("high", "high"),
    ]:
        grant(store, name, 20, priority)
    # 30 bytes needed: the two batch holders (newest first) make 40; "low" is not asked
    first = store.try_grant(waiter("urgent", 30, "urgent"), TTL, True)
    assert first.lease is None and first.preempting == ("batch-new", "batch-old")
    # asking again asks no one twice: those already asked make room enough
    assert store.try_grant(waiter("urgent", 30, "urgent"), TTL, True).preempting == ()
    store.release("batch-new")
    assert store.try_grant(waiter("urgent", 30, "urgent"), TTL, True).preempting == ()
    store.release("batch-old")
    lease = store.try_grant(waiter("urgent", 30, "urgent"), TTL, True).lease
    assert lease is not None
    store.release("urgent")
    # 50 needed (40 free): the asked ones are gone; "low" (lowest left) makes 60, "normal" is not asked
    assert store.try_grant(waiter("urgent-2", 50, "urgent"), TTL, True).preempting == ("low",)


def test_preemption_never_asks_equal_or_higher_priority(store: Any) -> None:
    store.set_capacity("cpu", 100)
    grant(store, "normal", 60)
    grant(store, "batch", 40, "batch")
    # 50 needed; only "batch" is of lower priority, and its 40 cannot make room: no one is asked
    result = store.try_grant(waiter("waiting", 50), TTL, True)
    assert result.lease is None and result.preempting == ()
    assert all(lease.preempt_requested is None for lease in store.leases())
    # a high waiter may ask "normal" too
    assert store.try_grant(waiter("high", 50, "high"), TTL, True).preempting == ("batch", "normal")


def test_only_the_first_waiter_asks_and_only_when_told_to(store: Any) -> None:
    store.set_capacity("cpu", 100)
    grant(store, "batch", 100, "batch")
    assert store.try_grant(waiter("first", 100, "high"), TTL, False).preempting == ()
    assert store.try_grant(waiter("second", 100, "normal"), TTL, True).preempting == ()  # not first in line
    assert store.try_grant(waiter("first", 100, "high"), TTL, True).preempting == ("batch",)


# --- resize and cancel -----------------------------------------------------------------------------


def test_resize_within_the_capacity(store: Any) -> None:
    store.set_capacity("cpu", 100)
    grant(store, "a", 40)
    grant(store, "b", 40)
    assert store.resize("a", 60) is True
    assert store.resize("b", 41) is False  # 60 + 41 > 100
    assert [lease.memory for lease in store.leases()] == [60, 40]
    assert store.try_grant(waiter("w", 30), TTL, False).lease is None
    assert store.resize("a", 30) is True  # shrinking makes room
    assert store.try_grant(waiter("w", 30), TTL, False).lease is not None
    store.release("a")
    assert store.resize("a", 10) is False  # gone
    assert used(store) == 70


def test_cancel_forgets_a_waiter(store: Any) -> None:
    store.set_capacity("cpu", 100)
    grant(store, "holder", 100)
    assert store.try_grant(waiter("ahead", 100, "high"), TTL, False).lease is None
    assert store.try_grant(waiter("behind", 100), TTL, False).lease is None
    store.cancel("ahead")
    store.cancel("ahead")  # idempotent
    store.cancel("never-seen")
    assert [w.id for w in store.waiters()] == ["behind"]
    store.release("holder")
    assert store.try_grant(waiter("behind", 100), TTL, False).lease is not None


# --- Redis only ------------------------------------------------------------------------------------


def test_redis_store_fails_clearly_when_redis_is_not_there(tmp_path: Path) -> None:
    from port_for import get_port

    from llamaproc.ledger._redis import RedisStore

    with pytest.raises(LedgerError, match="cannot be reached"):
        RedisStore(f"redis://127.0.0.1:{get_port(None)}/0")
    with pytest.raises(InvalidArgumentError, match="not a Redis URL") as bad:
        RedisStore("redis://127.0.0.1:notaport/0")
    assert bad.value.param == "url"
    with pytest.raises(InvalidArgumentError):
        RedisStore("http://127.0.0.1/0")


def test_redis_gone_while_a_lease_is_held_is_a_ledger_error(tmp_path: Path, own_redis: Any) -> None:
    from llamaproc.ledger._redis import RedisStore

    store = RedisStore(f"redis://127.0.0.1:{own_redis.port}/0")
    try:
        store.set_capacity("cpu", CAP)
        grant(store, "held", CAP)
        own_redis.kill()
        outcome: list[BaseException] = []

        def renew() -> None:
            try:
                store.renew(["held"], [], TTL)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome.append(exc)

        thread = threading.Thread(target=renew, daemon=True)
        thread.start()
        thread.join(SAFETY)
        assert not thread.is_alive(), "renew hangs with Redis gone"
        assert len(outcome) == 1 and isinstance(outcome[0], LedgerError), outcome
        assert "cannot be reached" in str(outcome[0])
    finally:
        store.close()


def test_redis_that_stops_answering_is_a_ledger_error(own_redis: Any) -> None:
    from llamaproc.ledger._redis import RedisStore

    store = RedisStore(f"redis://127.0.0.1:{own_redis.port}/0", socket_timeout=0.5)
    try:
        store.set_capacity("cpu", CAP)
        grant(store, "held", CAP)
        os.kill(own_redis.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(LedgerError, match="did not answer"):
                store.renew(["held"], [], TTL)
        finally:
            os.kill(own_redis.process.pid, signal.SIGCONT)
        # it answers again: the store works again on a fresh connection
        assert store.renew(["held"], [], TTL).lost == ()
    finally:
        store.close()


def test_redis_ledgers_with_other_prefixes_share_a_database(redis_url: str) -> None:
    from llamaproc.ledger._redis import RedisStore

    one = RedisStore(redis_url, prefix=f"one-{uuid.uuid4().hex}:")
    two = RedisStore(redis_url, prefix=f"two-{uuid.uuid4().hex}:")
    try:
        one.set_capacity("cpu", 10)
        two.set_capacity("cpu", 20)
        grant(one, "same-id", 10)
        grant(two, "same-id", 20)
        assert [lease.memory for lease in one.leases()] == [10]
        assert [lease.memory for lease in two.leases()] == [20]
    finally:
        one.close()
        two.close()


def test_a_redis_lease_deleted_by_hand_is_gone(redis_url: str) -> None:
    """A lease's hash deleted behind the store's back (by an operator, or evicted): lost, listed nowhere, and its
    memory free; the indexes that still named it work on."""
    import redis

    from llamaproc.ledger._redis import RedisStore

    prefix = f"test:{uuid.uuid4().hex}:"
    store = RedisStore(redis_url, prefix=prefix)
    try:
        store.set_capacity("cpu", CAP)
        grant(store, "deleted", CAP // 2, "batch")
        grant(store, "kept", CAP // 4, "batch")
        with redis.Redis.from_url(redis_url) as other:
            assert other.delete(f"{prefix}l:deleted") == 1
        assert store.renew(["deleted", "kept"], [], TTL).lost == ("deleted",)
        assert [lease.id for lease in store.leases()] == ["kept"]
        assert [lease.id for lease in store.leases("cpu")] == ["kept"]
        # Its memory is free (only "kept" is asked to yield for the rest), and a resize sees the room.
        asked = store.try_grant(waiter("urgent", CAP, "urgent"), TTL, True)
        assert asked.lease is None and asked.free == CAP - CAP // 4 and asked.preempting == ("kept",)
        store.cancel("urgent")
        assert store.resize("kept", CAP - 1)
        store.release("kept")
        grant(store, "whole", CAP)
        assert [lease.id for lease in store.leases()] == ["whole"]
    finally:
        store.close()


def test_redis_store_loads_its_scripts_again_when_redis_forgot_them(redis_url: str) -> None:
    import redis

    from llamaproc.ledger._redis import RedisStore

    store = RedisStore(redis_url, prefix=f"test:{uuid.uuid4().hex}:")
    try:
        store.set_capacity("cpu", 100)
        grant(store, "a", 60)
        with redis.Redis.from_url(redis_url) as other:
            other.script_flush()
        assert [lease.id for lease in store.leases()] == ["a"]
    finally:
        store.close()


def test_closed_redis_store_refuses_calls(redis_url: str) -> None:
    from llamaproc.errors import ClosedError
    from llamaproc.ledger._redis import RedisStore

    store = RedisStore(redis_url, prefix=f"test:{uuid.uuid4().hex}:")
    store.close()
    store.close()
    with pytest.raises(ClosedError):
        store.leases()
