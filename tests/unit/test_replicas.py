"""Replicas of a model in the pool, and applying a new config live, with the fake loader of test_pool.

What real llama-servers do (a replica killed under load, a live apply while
streams run) is in tests/integration/test_daemon_replicas.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from test_pool import FakeLoader, FakeModel, config, status, wait_until

from llamaproc.errors import ModelNotFoundError, ModelUnavailableError
from llamaproc.runtime import ModelPool, Phase, ServeConfig

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def conditions(pool: ModelPool, name: str) -> dict[str, Any]:
    return {c.type: c for c in status(pool, name).conditions}


def role(pool: ModelPool, name: str) -> Any:
    (only,) = status(pool, name).roles
    return only


def alive(loader: FakeLoader) -> list[FakeModel]:
    return [m for m in loader.models if not m.closed]


class PickyLoader(FakeLoader):
    """Loads like FakeLoader, but a model with ``parallel`` in ``refuse`` never starts (it waits forever)."""

    def __init__(self, refuse: set[int]) -> None:
        super().__init__()
        self.refuse = refuse

    async def __call__(self, path: Path, **options: Any) -> FakeModel:
        if options.get("parallel") in self.refuse:
            self.calls.append((Path(path).stem, anyio.current_time()))
            await anyio.sleep_forever()
        return await super().__call__(path, **options)


def replicated(replicas: int = 2, **model: Any) -> ServeConfig:
    return config(models={"a": {"path": "/m/a.gguf", "replicas": replicas, **model}})


# --- replicas ---------------------------------------------------------------------------------------


async def test_every_replica_loads_and_requests_go_to_the_least_busy() -> None:
    loader = FakeLoader()
    async with ModelPool(replicated(2, parallel=2), loader=loader, health_interval=None) as pool:
        await pool.load("a")
        await wait_until(lambda: len(alive(loader)) == 2 and role(pool, "a").ready_replicas == 2)
        async with pool.acquire("a") as first, pool.acquire("a") as second:
            assert first is not second  # the second went to the idle replica
            assert sorted(r.in_flight for r in role(pool, "a").replica_statuses) == [1, 1]
        st = status(pool, "a")
        assert (st.phase, st.generation, st.observed_generation) == (Phase.SERVING, 1, 1)
        assert conditions(pool, "a")["Available"].message == "2 of 2 replicas serving"
        assert conditions(pool, "a")["Degraded"].status == "False"


async def test_a_crashed_replica_restarts_while_the_other_serves() -> None:
    loader = FakeLoader()
    cfg = config(models={"a": {"path": "/m/a.gguf", "replicas": 2}}, restart_backoff=0.2)
    async with ModelPool(cfg, loader=loader, health_interval=None) as pool:
        await pool.load("a")
        await wait_until(lambda: role(pool, "a").ready_replicas == 2)
        victim = alive(loader)[0]
        victim.kill("test")
        await wait_until(lambda: role(pool, "a").ready_replicas == 1)
        assert status(pool, "a").phase == Phase.SERVING
        assert conditions(pool, "a")["Degraded"].reason == "ReplicasUnavailable"
        for _ in range(3):  # while it backs off, every request goes to the other one
            async with pool.acquire("a") as model:
                assert model is not victim and model.returncode is None
        await wait_until(lambda: role(pool, "a").ready_replicas == 2)
        assert status(pool, "a").restarts == 1 and len(loader.models) == 3
        assert conditions(pool, "a")["Degraded"].status == "False"


async def test_without_recovery_a_failed_replica_stays_failed_and_the_model_fails_with_the_last() -> None:
    loader = FakeLoader()
    async with ModelPool(replicated(2, recovery_policy="None"), loader=loader, health_interval=None) as pool:
        await pool.load("a")
        await wait_until(lambda: role(pool, "a").ready_replicas == 2)
        first, second = alive(loader)
        first.kill("test")
        await wait_until(lambda: conditions(pool, "a")["Failed"].status == "True")
        assert conditions(pool, "a")["Failed"].reason == "NotRestarted"
        assert status(pool, "a").phase == Phase.SERVING  # the other one serves
        async with pool.acquire("a") as model:
            assert model is second
        second.kill("test")
        await wait_until(lambda: status(pool, "a").phase == Phase.FAILED)
        with pytest.raises(ModelUnavailableError):
            async with pool.acquire("a"):
                pass
        assert len(loader.models) == 2  # never restarted


# --- apply ------------------------------------------------------------------------------------------


async def test_apply_adds_and_removes_models_and_a_removed_one_drains() -> None:
    loader = FakeLoader()
    async with ModelPool(config("a b"), loader=loader, health_interval=None) as pool:
        new = config("a c")
        assert [(c.model, c.action) for c in await pool.apply(new, dry_run=True)] == [("c", "add"), ("b", "remove")]
        assert pool.names() == ["a", "b"]  # a dry run changes nothing
        applied: list[Any] = []

        async def apply() -> None:
            applied.extend(await pool.apply(new))

        async with anyio.create_task_group() as tg:
            async with pool.acquire("b") as b_model:
                tg.start_soon(apply)
                await wait_until(lambda: "c" in pool.names())
                with pytest.raises(ModelNotFoundError):  # b takes no new request
                    async with pool.acquire("b"):
                        pass
                await anyio.wait_all_tasks_blocked()
                assert not applied and not b_model.closed  # b waits for its request in flight
        assert [(c.model, c.action) for c in applied] == [("c", "add"), ("b", "remove")]
        assert pool.names() == ["a", "c"] and b_model.closed
        async with pool.acquire("c") as model:
            assert model.path.stem == "c"
        assert await pool.apply(new) == []  # nothing left to change


async def test_a_change_of_replicas_alone_keeps_the_running_replica() -> None:
    loader = FakeLoader()
    async with ModelPool(replicated(1), loader=loader, health_interval=None) as pool:
        await pool.load("a")
        (first,) = alive(loader)
        (change,) = await pool.apply(replicated(3))
        assert (change.action, change.detail) == ("scale", "replicas: 1 -> 3")
        assert role(pool, "a").ready_replicas == 3 and first in alive(loader) and len(loader.models) == 3
        await pool.apply(replicated(2))
        assert len(alive(loader)) == 2 and first in alive(loader)
        st = status(pool, "a")
        assert (st.generation, st.observed_generation, role(pool, "a").updated_replicas) == (3, 3, 2)


async def test_a_rolling_update_replaces_each_replica_after_its_successor_serves() -> None:
    loader = FakeLoader()
    async with ModelPool(replicated(2, parallel=1), loader=loader, health_interval=None) as pool:
        await pool.load("a")
        await wait_until(lambda: role(pool, "a").ready_replicas == 2)
        old = alive(loader)
        async with anyio.create_task_group() as tg:
            async with pool.acquire("a") as busy:
                changes: list[Any] = []

                async def apply() -> None:
                    changes.extend(await pool.apply(replicated(2, parallel=4)))

                tg.start_soon(apply)
                # The idle old replica is replaced; the busy one waits for its request.
                await wait_until(lambda: sum(1 for m in alive(loader) if m not in old) >= 1)
                await anyio.wait_all_tasks_blocked()
                assert not busy.closed and conditions(pool, "a")["UpdateInProgress"].status == "True"
                async with pool.acquire("a") as other:  # not to the busy one, nor to a replica stopping
                    assert other is not busy and not other.closing
        assert [(c.model, c.action) for c in changes] == [("a", "update")]
        assert "parallel" in changes[0].detail
        assert all(m.closed for m in old) and len(alive(loader)) == 2
        assert [o["parallel"] for o in loader.options[-2:]] == [4, 4]
        st = status(pool, "a")
        assert (st.generation, st.observed_generation, st.parallel) == (2, 2, 4)
        assert conditions(pool, "a")["UpdateInProgress"].status == "False"


async def test_an_update_whose_replica_never_serves_is_rolled_back() -> None:
    loader = PickyLoader(refuse={3})
    async with ModelPool(replicated(1, parallel=1, progress_deadline=0.3), loader=loader,
                         health_interval=None) as pool:  # fmt: skip
        await pool.load("a")
        (old,) = alive(loader)
        (change,) = await pool.apply(replicated(1, parallel=3, progress_deadline=0.3))
        assert change.action == "rolled_back" and "did not serve within 0.3 s" in change.detail
        assert alive(loader) == [old]  # the old one kept serving all along
        st = status(pool, "a")
        assert (st.generation, st.observed_generation, st.parallel) == (2, 1, 1)
        progressing = conditions(pool, "a")["Progressing"]
        assert (progressing.status, progressing.reason) == ("False", "ProgressDeadlineExceeded")
        async with pool.acquire("a") as model:
            assert model is old


async def test_without_memory_for_one_more_replica_it_is_replaced_in_place(tmp_path: Path) -> None:
    path = tmp_path / "a.gguf"
    path.write_bytes(b"x" * 1000)  # not GGUF: its estimate is its size
    loader = FakeLoader()
    cfg = config(models={"a": {"path": path, "parallel": 1}}, memory_budget=1500)
    async with ModelPool(cfg, loader=loader, health_interval=None) as pool:
        await pool.load("a")
        (old,) = alive(loader)
        new = config(models={"a": {"path": path, "parallel": 2}}, memory_budget=1500)
        (change,) = await pool.apply(new)
        assert change.action == "update"
        (now,) = alive(loader)
        assert now is not old and old.closed
        assert status(pool, "a").observed_generation == 2


async def test_settings_apply_at_once_but_those_read_at_start_up_do_not() -> None:
    loader = FakeLoader()
    async with ModelPool(config("a"), loader=loader, health_interval=None) as pool:
        new = config("a", queue_size=3, api_keys=["a-new-key"])
        changes = {c.setting: c for c in await pool.apply(new)}
        assert changes["queue_size"].action == "setting" and pool.config.queue_size == 3
        assert changes["api_keys"].action == "restart_required" and pool.config.api_keys == ()
        assert "a-new-key" not in changes["api_keys"].detail


async def test_more_replicas_than_the_memory_allows_are_refused_whole(tmp_path: Path) -> None:
    path = tmp_path / "a.gguf"
    path.write_bytes(b"x" * 1000)
    loader = FakeLoader()
    async with ModelPool(config(models={"a": {"path": path}}, memory_budget=1500), loader=loader,
                         health_interval=None) as pool:  # fmt: skip
        await pool.load("a")
        (change,) = await pool.apply(config(models={"a": {"path": path, "replicas": 2}}, memory_budget=1500))
        assert change.action == "rolled_back" and "no memory for 2 replicas" in change.detail
        assert len(alive(loader)) == 1 and pool.config.models["a"].replicas == 1
        assert role(pool, "a").replicas == 1
        assert conditions(pool, "a")["Progressing"].status == "False"


class NthLoader(FakeLoader):
    """Loads like FakeLoader, but the ``nth`` load (from 1) of a model with ``parallel`` == ``value`` never starts."""

    def __init__(self, value: int, nth: int) -> None:
        super().__init__()
        self.value, self.nth, self.seen = value, nth, 0

    async def __call__(self, path: Path, **options: Any) -> FakeModel:
        if options.get("parallel") == self.value:
            self.seen += 1
            if self.seen == self.nth:
                await anyio.sleep_forever()
        return await super().__call__(path, **options)


async def test_requests_during_a_replacement_in_place_wait_for_the_new_replica(tmp_path: Path) -> None:
    path = tmp_path / "a.gguf"
    path.write_bytes(b"x" * 1000)
    loader = FakeLoader(delay=0.05, close_delay=0.05)  # a replacement in place leaves a gap with no replica
    cfg = config(models={"a": {"path": path, "parallel": 1}}, memory_budget=1500)
    async with ModelPool(cfg, loader=loader, health_interval=None) as pool:
        await pool.load("a")
        served: list[int] = []

        async def requests() -> None:
            for _ in range(20):
                async with pool.acquire("a") as model:
                    assert not model.closed
                    served.append(1)
                await anyio.sleep(0.01)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(requests)
                new = config(models={"a": {"path": path, "parallel": 2}}, memory_budget=1500)
                (change,) = await pool.apply(new)
        assert change.action == "update" and len(served) == 20
        assert status(pool, "a").observed_generation == 2


async def test_a_failed_update_puts_every_replica_back_on_the_old_config() -> None:
    loader = NthLoader(value=3, nth=2)  # the first new replica serves, the second never does
    async with ModelPool(replicated(2, parallel=1, progress_deadline=0.3), loader=loader,
                         health_interval=None) as pool:  # fmt: skip
        await pool.load("a")
        await wait_until(lambda: role(pool, "a").ready_replicas == 2)
        (change,) = await pool.apply(replicated(2, parallel=3, progress_deadline=0.3))
        assert change.action == "rolled_back"
        await wait_until(lambda: role(pool, "a").ready_replicas == 2)
        running = [m for m in alive(loader)]
        assert len(running) == 2
        assert [o["parallel"] for o, m in zip(loader.options, loader.models, strict=True) if not m.closed] == [1, 1]
        assert pool.config.models["a"].parallel == 1
        assert [c.action for c in await pool.apply(replicated(2, parallel=1, progress_deadline=0.3))] == []


async def test_an_unload_during_an_update_in_place_leaves_nothing_running(tmp_path: Path) -> None:
    path = tmp_path / "a.gguf"
    path.write_bytes(b"x" * 1000)  # with room for one replica only: replaced in place
    loader = PickyLoader(refuse={3})
    cfg = config(models={"a": {"path": path, "parallel": 1}}, memory_budget=1500)
    async with ModelPool(cfg, loader=loader, health_interval=None) as pool:
        await pool.load("a")
        async with anyio.create_task_group() as tg:
            changes: list[Any] = []

            async def apply() -> None:
                new = config(models={"a": {"path": path, "parallel": 3}}, memory_budget=1500)
                changes.extend(await pool.apply(new))

            tg.start_soon(apply)
            await wait_until(lambda: len(loader.calls) == 2)  # the new replica is loading (for ever)
            await pool.unload("a")
        assert alive(loader) == [] and status(pool, "a").phase == Phase.PENDING
        assert not any(r.supervisor.wanted for r in pool.replicas("a").replicas)


async def test_a_changed_ledger_url_is_shown_without_its_password() -> None:
    async with ModelPool(config("a"), loader=FakeLoader(), health_interval=None) as pool:
        (change,) = await pool.apply(config("a", ledger="redis://:s3cret@db:6379/0"), dry_run=True)
        assert change.action == "restart_required" and "s3cret" not in change.detail
        assert "redis://***@db:6379/0" in change.detail
