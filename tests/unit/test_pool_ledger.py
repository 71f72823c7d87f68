"""The model pool's leases in a real memory ledger (a SQLite file, a real redis-server of each test's own), with
the fake loader of test_pool (no processes).

Another ``Ledger`` on the same store stands for another process. What a real
daemon and a real second process do is in tests/integration/test_daemon_ledger.py.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_pool import FakeLoader, config, status, wait_until

import llamaproc
from llamaproc.errors import LeaseTimeoutError, ModelUnavailableError, ShuttingDownError
from llamaproc.ledger import Ledger
from llamaproc.protocol import error_code
from llamaproc.runtime import ModelConfig, ModelPool, Phase, lease_estimate

pytestmark = pytest.mark.anyio

#: The fake models' files do not exist: each lease holds one byte.
CAPACITY = 10


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(ledger_url: str) -> str:
    return ledger_url


def delete_leases(url: str) -> None:
    """Remove every lease from the store behind the ledger's back."""
    if url.startswith("sqlite://"):
        with sqlite3.connect(url[len("sqlite://") :]) as db:
            db.execute("DELETE FROM leases")
        return
    import redis

    with redis.Redis.from_url(url) as client:
        for key in client.scan_iter("llamaproc:ledger:l*"):  # l:<id>, lx, ld:<device>
            client.delete(key)


def waiting(url: str) -> bool:
    """Whether a waiter is queued in the store."""
    if url.startswith("sqlite://"):
        with contextlib.closing(sqlite3.connect(url[len("sqlite://") :])) as db:
            return bool(db.execute("SELECT id FROM waiters").fetchall())
    import redis

    with redis.Redis.from_url(url) as client:
        return bool(client.zcard("llamaproc:ledger:wx"))


@pytest.fixture
async def other(url: str) -> AsyncIterator[Ledger]:
    """The ledger as another process sees it; it writes the capacity."""
    async with await llamaproc.open_ledger(url, capacity={"cpu": CAPACITY}, ttl=0.6) as ledger:
        yield ledger


def ledger_config(url: str, **settings: Any) -> Any:
    return config("a", ledger=url, **settings)


async def pool_ledger(url: str) -> Ledger:
    return await llamaproc.open_ledger(url, ttl=0.6)


def test_a_lease_holds_the_estimate_with_the_compute_margin(tmp_path: Path) -> None:
    from llamaproc.backend import estimate_memory
    from llamaproc.testing import write_tiny_model

    path = write_tiny_model(tmp_path / "m.gguf")
    assert lease_estimate(ModelConfig(path=path, ctx_size=512)) == estimate_memory(path, ctx_size=512).total
    assert lease_estimate(ModelConfig(path=tmp_path / "missing.gguf")) == 1


async def test_the_lease_is_held_while_loaded_and_given_back_on_unload(url: str, other: Ledger) -> None:
    loader = FakeLoader()
    async with await pool_ledger(url) as ledger, ModelPool(ledger_config(url, priority="high"), loader=loader,
                                                           health_interval=None, ledger=ledger) as pool:  # fmt: skip
        assert status(pool, "a").lease is None
        async with pool.acquire("a"):
            lease = status(pool, "a").lease
            cpu = "cpu" if url.startswith("sqlite") else f"{other.host}/cpu"  # a Redis ledger names the host
            assert lease is not None and (lease.memory, lease.device, lease.priority) == (1, cpu, "high")
            (held,) = await other.leases()
            assert (held.holder, held.id, held.token) == ("llamaproc serve: a", lease.id, lease.token)
        await pool.unload("a")
        assert status(pool, "a").lease is None
        assert await other.leases() == []
        async with pool.acquire("a"):  # a new lease, a new fencing token
            again = status(pool, "a").lease
            assert again is not None and again.token > lease.token
    assert await other.leases() == []  # closing the pool gave it back


async def test_a_model_that_fails_gives_its_lease_back(url: str, other: Ledger) -> None:
    loader = FakeLoader(fail=True)
    async with await pool_ledger(url) as ledger, ModelPool(ledger_config(url, max_restarts=0), loader=loader,
                                                           health_interval=None, ledger=ledger) as pool:  # fmt: skip
        with pytest.raises(ModelUnavailableError):
            async with pool.acquire("a"):
                pass
        await wait_until(lambda: status(pool, "a").phase == Phase.FAILED)
        with anyio.fail_after(30):
            while await other.leases():
                await anyio.sleep(0.01)


async def test_an_idle_model_yields_to_a_waiter_of_higher_priority_at_once(url: str, other: Ledger) -> None:
    loader = FakeLoader()
    async with await pool_ledger(url) as ledger, ModelPool(ledger_config(url), loader=loader,
                                                           health_interval=None, ledger=ledger) as pool:  # fmt: skip
        await pool.load("a")
        with anyio.fail_after(30):
            urgent = await other.lease(CAPACITY, priority="urgent")
        assert loader.models[0].closed and status(pool, "a").lease is None
        assert pool.stats.preemptions == 1
        await urgent.release()
        async with pool.acquire("a"):  # loads again under a new lease
            assert status(pool, "a").lease is not None
        assert len(loader.models) == 2


async def test_a_busy_model_yields_once_its_request_ends(url: str, other: Ledger) -> None:
    loader = FakeLoader()
    async with await pool_ledger(url) as ledger, ModelPool(ledger_config(url), loader=loader,
                                                           health_interval=None, ledger=ledger) as pool:  # fmt: skip
        granted = anyio.Event()

        async def urgent() -> None:
            async with other.acquire(CAPACITY, priority="urgent"):
                granted.set()

        async with anyio.create_task_group() as tg:
            async with pool.acquire("a") as model:
                tg.start_soon(urgent)
                await wait_until(lambda: (lease := status(pool, "a").lease) is not None and lease.preempt_requested)
                await wait_until(lambda: status(pool, "a").in_flight == 1 and pool._entries["a"].evicting)
                assert not model.closed and not granted.is_set()
            await granted.wait()
            assert model.closed


async def test_a_busy_model_is_unloaded_after_the_grace(url: str, other: Ledger) -> None:
    loader = FakeLoader()
    async with await pool_ledger(url) as ledger, ModelPool(ledger_config(url, preempt_grace=0.2), loader=loader,
                                                           health_interval=None, ledger=ledger) as pool:  # fmt: skip
        async with pool.acquire("a") as model:
            with anyio.fail_after(30):
                lease = await other.lease(CAPACITY, priority="urgent")
            assert model.closed  # under the request that still holds it
        await lease.release()


async def test_a_lower_priority_waiter_does_not_unload_the_model(url: str, other: Ledger) -> None:
    loader = FakeLoader()
    async with await pool_ledger(url) as ledger, ModelPool(ledger_config(url), loader=loader,
                                                           health_interval=None, ledger=ledger) as pool:  # fmt: skip
        await pool.load("a")
        with pytest.raises(LeaseTimeoutError):
            await other.lease(CAPACITY, priority="batch", timeout=1.0)
        assert not loader.models[0].closed and pool.stats.preemptions == 0


async def test_a_model_whose_lease_is_lost_is_stopped_and_loads_again_on_the_next_request(
    url: str, other: Ledger
) -> None:
    loader = FakeLoader()
    async with await pool_ledger(url) as ledger, ModelPool(ledger_config(url), loader=loader,
                                                           health_interval=None, ledger=ledger) as pool:  # fmt: skip
        async with pool.acquire("a") as model:
            delete_leases(url)
            await wait_until(lambda: model.closed)  # with its request still in flight
        await wait_until(lambda: pool.stats.leases_lost == 1 and status(pool, "a").phase == Phase.PENDING)
        async with pool.acquire("a"):
            assert status(pool, "a").lease is not None
        assert len(loader.models) == 2


async def test_a_request_that_gets_no_lease_in_time_fails_with_memory_unavailable(url: str, other: Ledger) -> None:
    loader = FakeLoader()
    async with (
        await other.lease(CAPACITY, priority="urgent"),
        await pool_ledger(url) as ledger,
        ModelPool(ledger_config(url, lease_timeout=0.3), loader=loader, health_interval=None, ledger=ledger) as pool,
    ):
        with pytest.raises(LeaseTimeoutError) as caught:
            async with pool.acquire("a"):
                pass
        assert "model 'a' waited 0.3 s for a lease of 1 B on " in str(caught.value)
        assert "cpu in the ledger: 0 B of 10 B free" in str(caught.value)
        assert error_code(caught.value) == "memory_unavailable"
        assert loader.calls == [] and status(pool, "a").phase == Phase.PENDING


async def test_a_model_larger_than_the_device_is_unavailable(url: str, other: Ledger, tmp_path: Path) -> None:
    big = tmp_path / "big.gguf"
    big.write_bytes(b"x" * (CAPACITY + 1))
    cfg = config(models={"big": {"path": big}}, ledger=url)
    async with await pool_ledger(url) as ledger, ModelPool(cfg, loader=FakeLoader(), health_interval=None,
                                                           ledger=ledger) as pool:  # fmt: skip
        with pytest.raises(ModelUnavailableError, match="model 'big' cannot take its lease"):
            async with pool.acquire("big"):
                pass


async def test_closing_the_pool_ends_a_request_waiting_for_its_lease(url: str, other: Ledger) -> None:
    loader = FakeLoader()
    async with await other.lease(CAPACITY, priority="urgent"), await pool_ledger(url) as ledger:
        pool = ModelPool(ledger_config(url), loader=loader, health_interval=None, ledger=ledger)
        async with pool, anyio.create_task_group() as tg:

            async def request() -> None:
                with pytest.raises(ShuttingDownError):
                    async with pool.acquire("a"):
                        pass

            tg.start_soon(request)
            with anyio.fail_after(30):  # the request waits in the ledger
                while not waiting(url):
                    await anyio.sleep(0.01)
            await pool.close()
        assert len(await other.leases()) == 1  # the other's only
        assert loader.calls == []


async def test_the_lease_follows_the_replicas_when_the_model_scales(url: str, other: Ledger) -> None:
    loader = FakeLoader()
    two = config(models={"a": {"path": "/m/a.gguf", "replicas": 2}}, ledger=url)
    async with await pool_ledger(url) as ledger, ModelPool(two, loader=loader, health_interval=None,
                                                           ledger=ledger) as pool:  # fmt: skip
        await pool.load("a")
        assert [lease.memory for lease in await other.leases()] == [2]  # one byte per replica
        await pool.apply(config(models={"a": {"path": "/m/a.gguf", "replicas": 3}}, ledger=url))
        assert [lease.memory for lease in await other.leases()] == [3]
        await pool.apply(config(models={"a": {"path": "/m/a.gguf", "replicas": 1}}, ledger=url))
        assert [lease.memory for lease in await other.leases()] == [1]
        (change,) = await pool.apply(config(models={"a": {"path": "/m/a.gguf", "replicas": 11}}, ledger=url))
        assert change.action == "rolled_back" and "no memory for 11 replicas" in change.detail
        assert [lease.memory for lease in await other.leases()] == [1]
