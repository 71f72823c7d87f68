"""Scheduling logic of the model pool, with a fake loader (no processes).

What a real llama-server does (crashes, health, stopping) is tested in
tests/integration/test_supervisor.py and tests/integration/test_pool.py.
"""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from trio.testing import MockClock

from llamaproc import Health, LlamaprocError, StartupError
from llamaproc.errors import (
    ModelNotFoundError,
    ModelUnavailableError,
    QueueFullError,
    ShuttingDownError,
    UsageError,
)
from llamaproc.runtime import ModelConfig, ModelPool, Phase, ServeConfig, Supervisor, estimate_memory
from llamaproc.testing import write_tiny_model


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def virtual_clock() -> pytest.MarkDecorator:
    """Run the test on trio with a virtual clock that jumps to the next deadline whenever every task waits.

    Backoffs, idle timeouts and drain timeouts then take no real time, and
    ``anyio.current_time()`` tells exactly how much (virtual) time passed between
    two events: the pool and its supervisors measure their delays on that clock.
    """
    clock = MockClock(autojump_threshold=0)
    return pytest.mark.parametrize("anyio_backend", [pytest.param(("trio", {"clock": clock}), id="trio-virtual-clock")])


class FakeModel:
    """Stands in for a TextModel: never exits on its own (its pid is this process).

    ``close()`` takes ``close_delay`` seconds, or waits for ``close_gate`` to be set;
    ``closing`` is true from its start.
    """

    def __init__(self, path: Path, close_delay: float = 0.0, close_gate: anyio.Event | None = None) -> None:
        self.path = path
        self.pid = os.getpid()
        self.base_url = "http://127.0.0.1:9"
        self.api_key: str | None = None
        self.returncode: int | None = None
        self.closing = False
        self.closed = False
        self.output = ""
        self.close_delay = close_delay
        self.close_gate = close_gate
        self._exited = anyio.Event()

    async def health(self) -> Health:
        return Health(status="ok")

    def progress(self) -> float | None:
        return None

    async def wait(self) -> int | None:
        await self._exited.wait()
        return self.returncode

    def describe_exit(self) -> str:
        return f"fake model exited with code {self.returncode}"

    async def explain(self, error: LlamaprocError) -> LlamaprocError:
        return error

    def kill(self, reason: str) -> None:
        self.returncode = -9
        self._exited.set()

    async def close(self) -> None:
        self.closing = True
        if not self.closed:
            with anyio.CancelScope(shield=True):
                if self.close_delay:
                    await anyio.sleep(self.close_delay)
                if self.close_gate is not None:
                    await self.close_gate.wait()
        self.closed = True


class FakeLoader:
    """Loads FakeModels; a load takes ``delay`` seconds, or waits for ``gate`` to be set.

    ``calls`` records the model and the time (the event loop's clock) of every load attempt.
    """

    def __init__(
        self,
        *,
        fail: bool = False,
        delay: float = 0.0,
        close_delay: float = 0.0,
        gate: anyio.Event | None = None,
        close_gate: anyio.Event | None = None,
    ) -> None:
        self.fail = fail
        self.delay = delay
        self.close_delay = close_delay
        self.gate = gate
        self.close_gate = close_gate
        self.calls: list[tuple[str, float]] = []
        self.models: list[FakeModel] = []
        self.options: list[dict[str, Any]] = []

    async def __call__(self, path: Path, **options: Any) -> FakeModel:
        self.calls.append((Path(path).stem, anyio.current_time()))
        self.options.append(options)
        if self.delay:
            await anyio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise StartupError("llama-server exited with code 1 during start-up: bad file", returncode=1, output="")
        model = FakeModel(Path(path), self.close_delay, self.close_gate)
        self.models.append(model)
        return model

    def loaded(self) -> list[str]:
        return sorted(m.path.stem for m in self.models if not m.closed)


def config(names: str = "a", **settings: Any) -> ServeConfig:
    models = settings.pop("models", None) or {n: {"path": f"/nonexistent/{n}.gguf"} for n in names.split()}
    return ServeConfig.model_validate({"models": models, **settings})


def status(pool: ModelPool, name: str) -> Any:
    return next(s for s in pool.status() if s.name == name)


async def wait_until(predicate: Any, timeout: float = 30.0) -> None:
    """Wait for a condition (the timeout is only a safety net against a hang)."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


# --- memory estimate -------------------------------------------------------------------------------


def test_estimate_memory_weights_plus_kv_cache(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "t.gguf", context_length=512)
    from llamaproc import read_gguf_info

    info = read_gguf_info(path)
    assert info.block_count and info.embedding_length and info.head_count
    kv_width = info.embedding_length // info.head_count * (info.head_count_kv or info.head_count)
    per_token = 2 * info.block_count * kv_width * 2
    assert estimate_memory(ModelConfig(path=path)) == info.size_bytes + per_token * 512
    assert estimate_memory(ModelConfig(path=path, ctx_size=1024)) == info.size_bytes + per_token * 1024
    assert estimate_memory(ModelConfig(path=path, ctx_size=0)) == info.size_bytes + per_token * 512
    assert estimate_memory(ModelConfig(path=path, args=("--ctx-size", "64"))) == info.size_bytes + per_token * 64
    assert estimate_memory(ModelConfig(path=path, args=("-c", "128"))) == info.size_bytes + per_token * 128


def test_estimate_memory_of_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"x" * 1000)
    assert estimate_memory(ModelConfig(path=path)) == 1000
    assert estimate_memory(ModelConfig(path=tmp_path / "missing.gguf")) == 0


# --- loading and LRU -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_loads_on_first_use_and_reuses() -> None:
    loader = FakeLoader()
    cfg = config("a", models={"a": {"path": "/m/a.gguf", "parallel": 3, "ctx_size": 256, "args": ["--foo"]}})
    async with ModelPool(cfg, loader=loader, health_interval=None) as pool:
        assert status(pool, "a").phase == Phase.PENDING
        async with pool.acquire("a") as first:
            assert status(pool, "a").phase == Phase.SERVING
            assert status(pool, "a").in_flight == 1
            assert status(pool, "a").loaded
        async with pool.acquire("a") as second:
            assert second is first
        assert len(loader.calls) == 1
        assert loader.options[0]["parallel"] == 3
        assert loader.options[0]["ctx_size"] == 256
        assert loader.options[0]["args"] == ("--foo",)
        assert pool.stats.loads == 1
        assert status(pool, "a").in_flight == 0
        assert status(pool, "a").last_used is not None
    assert loader.loaded() == []


@pytest.mark.anyio
async def test_unknown_model_and_use_outside_async_with() -> None:
    pool = ModelPool(config("a"), loader=FakeLoader(), health_interval=None)
    with pytest.raises(UsageError):
        async with pool.acquire("a"):
            pass
    async with pool:
        with pytest.raises(ModelNotFoundError, match="'b'.*configured: a"):
            async with pool.acquire("b"):
                pass
        assert pool.names() == ["a"]


@pytest.mark.anyio
async def test_lru_evicts_the_least_recently_used_idle_model() -> None:
    loader = FakeLoader()
    async with ModelPool(config("a b c", max_loaded_models=2), loader=loader, health_interval=None) as pool:
        for name in ("a", "b", "a", "c"):
            async with pool.acquire(name):
                pass
        assert loader.loaded() == ["a", "c"]  # b was the least recently used
        assert pool.stats.evictions == 1
        async with pool.acquire("b"):
            pass
        assert loader.loaded() == ["b", "c"]
        assert pool.stats.evictions == 2
        assert [s.phase for s in pool.status()] == [Phase.PENDING, Phase.SERVING, Phase.SERVING]


@pytest.mark.anyio
async def test_a_busy_model_is_not_evicted_the_other_request_waits() -> None:
    loader = FakeLoader()
    async with ModelPool(config("a b", max_loaded_models=1), loader=loader, health_interval=None) as pool:
        got_b = anyio.Event()
        async with anyio.create_task_group() as tg:
            async with pool.acquire("a") as model_a:

                async def use_b() -> None:
                    async with pool.acquire("b"):
                        got_b.set()

                tg.start_soon(use_b)
                await wait_until(lambda: status(pool, "b").in_flight == 1)
                await anyio.wait_all_tasks_blocked()  # everything that could happen now has happened
                assert not got_b.is_set()
                assert not model_a.closed
                assert loader.loaded() == ["a"]
            await got_b.wait()
        assert model_a.closed
        assert loader.loaded() == ["b"]


@pytest.mark.anyio
async def test_a_model_that_goes_idle_is_reserved_for_the_waiting_load() -> None:
    """New requests for the busy model cannot keep the other one waiting for ever."""
    loader = FakeLoader()
    cfg = config("a b", max_loaded_models=1, models={"a": {"path": "/m/a.gguf", "parallel": 4},
                                                      "b": {"path": "/m/b.gguf"}})  # fmt: skip
    order: list[str] = []
    async with ModelPool(cfg, loader=loader, health_interval=None) as pool:
        async with anyio.create_task_group() as tg:
            async with pool.acquire("a"):

                async def use(name: str) -> None:
                    async with pool.acquire(name):
                        order.append(name)
                        await anyio.sleep(0.01)

                tg.start_soon(use, "b")
                await wait_until(lambda: status(pool, "b").in_flight == 1)
            # a went idle with b waiting: a request for a arriving now comes after b.
            tg.start_soon(use, "a")
        assert order == ["b", "a"]


@pytest.mark.anyio
async def test_no_circular_wait_between_making_room_and_admission() -> None:
    """A request for a model that gets loaded while it waited must not wait for the load making room.

    max 1 loaded; c is busy; b1 makes room (waits for c), a waits, b2 (b's second slot) waits.
    When c goes idle b1 loads b, then a makes room and waits for b to go idle: b2 must
    then use b instead of waiting for a's load (that would be circular).
    """
    cfg = config(
        max_loaded_models=1,
        models={"a": {"path": "/m/a.gguf"}, "b": {"path": "/m/b.gguf", "parallel": 2}, "c": {"path": "/m/c.gguf"}},
    )
    loader = FakeLoader()
    done: list[str] = []
    async with ModelPool(cfg, loader=loader, health_interval=None) as pool:

        async def use(name: str) -> None:
            async with pool.acquire(name):
                assert loader.loaded() == [name]
                await anyio.sleep(0.01)
            done.append(name)

        with anyio.fail_after(30):  # safety net: a circular wait would hang
            async with anyio.create_task_group() as tg, pool.acquire("c"):
                tg.start_soon(use, "b")
                await wait_until(lambda: status(pool, "b").in_flight == 1)
                tg.start_soon(use, "a")
                await wait_until(lambda: status(pool, "a").in_flight == 1)
                tg.start_soon(use, "b")
                await wait_until(lambda: status(pool, "b").in_flight == 2)
        assert sorted(done) == ["a", "b", "b"]
        assert done[-1] == "a"  # b's two requests shared the load of b
        assert loader.loaded() == ["a"]


@pytest.mark.anyio
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_traffic_always_completes(seed: int) -> None:
    """Mixed requests, cancellations, loads and unloads on 2 models with room for 1: nothing hangs."""
    rng = random.Random(seed)
    cfg = config(
        max_loaded_models=1,
        queue_size=64,
        models={"a": {"path": "/m/a.gguf", "parallel": 1}, "b": {"path": "/m/b.gguf", "parallel": 2}},
    )
    loader = FakeLoader(delay=0.005, close_delay=0.003)
    most_loaded = 0
    outcomes: list[str] = []
    async with ModelPool(cfg, loader=loader, health_interval=None) as pool:

        async def request(name: str, hold: float, cancel_after: float | None) -> None:
            nonlocal most_loaded
            with anyio.move_on_after(cancel_after if cancel_after is not None else 60):
                async with pool.acquire(name) as model:
                    assert not model.closed
                    most_loaded = max(most_loaded, len(loader.loaded()))
                    await anyio.sleep(hold)
                    assert not model.closed  # never unloaded under a request
                outcomes.append("done")
                return
            outcomes.append("cancelled")

        async def manage(op: str, name: str) -> None:
            await (pool.load(name) if op == "load" else pool.unload(name))
            outcomes.append(op)

        with anyio.fail_after(60):  # safety net: a request that never ends would hang
            async with anyio.create_task_group() as tg:
                for _ in range(80):
                    name = rng.choice("ab")
                    roll = rng.random()
                    if roll < 0.15:
                        tg.start_soon(manage, rng.choice(["load", "unload"]), name)
                    else:
                        cancel = rng.random() * 0.03 if roll < 0.3 else None
                        tg.start_soon(request, name, rng.random() * 0.01, cancel)
                    await anyio.sleep(rng.random() * 0.004)
        assert len(outcomes) == 80
        assert most_loaded == 1
        assert all((s.in_flight, s.queued) == (0, 0) for s in pool.status())


@pytest.mark.anyio
async def test_a_load_failure_refuses_requests_at_once_during_its_backoff() -> None:
    loader = FakeLoader(fail=True)
    cfg = config(models={"a": {"path": "/m/a.gguf", "parallel": 1}}, restart_backoff=3600, restart_backoff_max=3600)
    async with ModelPool(cfg, loader=loader, health_interval=None) as pool:
        errors: list[tuple[str, int]] = []

        async def request() -> None:
            try:
                async with pool.acquire("a"):
                    pytest.fail("a model that cannot load was used")
            except ModelUnavailableError as exc:
                errors.append((str(exc), len(loader.calls)))  # with the load attempts made so far

        with anyio.fail_after(30):  # safety net: waiting through the hour of backoff would hang
            async with anyio.create_task_group() as tg:
                for _ in range(4):  # one in flight, three queued behind it
                    tg.start_soon(request)
            await request()  # arriving during the backoff
        # Every request was refused after the first attempt and before a second one: not through the backoff.
        assert [calls for _, calls in errors] == [1] * 5 and len(loader.calls) == 1
        assert all("could not be loaded: StartupError" in message for message, _ in errors)
        assert "retrying in" in errors[-1][0]
        assert status(pool, "a").phase == Phase.LOADING  # still retrying in the background


@pytest.mark.anyio
async def test_a_model_being_unloaded_is_not_reported_serving() -> None:
    stopping = anyio.Event()
    loader = FakeLoader(close_gate=stopping)
    async with ModelPool(config("a"), loader=loader, health_interval=None) as pool, anyio.create_task_group() as tg:
        await pool.load("a")
        assert status(pool, "a").phase == Phase.SERVING
        tg.start_soon(pool.unload, "a")
        try:
            await wait_until(lambda: loader.models[0].closing)
            st = status(pool, "a")
            assert not loader.models[0].closed  # still stopping: its close() waits for `stopping`
            assert not st.loaded
            assert st.phase == Phase.PENDING
            assert {c.type: c for c in st.conditions}["Available"].reason == "Unloading"
        finally:
            stopping.set()
        await wait_until(lambda: loader.models[0].closed)
        await wait_until(lambda: {c.type: c for c in status(pool, "a").conditions}["Available"].reason == "NotLoaded")


@pytest.mark.anyio
async def test_model_bigger_than_the_budget_is_refused_at_once(tmp_path: Path) -> None:
    big = tmp_path / "big.gguf"
    big.write_bytes(b"x" * 5000)
    loader = FakeLoader()
    cfg = config(models={"big": {"path": str(big)}}, memory_budget=4000)
    async with ModelPool(cfg, loader=loader, health_interval=None) as pool:
        assert status(pool, "big").memory_estimate == 5000
        with pytest.raises(ModelUnavailableError, match="memory budget"):
            async with pool.acquire("big"):
                pass
        with pytest.raises(ModelUnavailableError, match="memory budget"):
            await pool.load("big")
    assert loader.calls == []


@pytest.mark.anyio
async def test_memory_budget_limits_models_loaded_together(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.gguf").write_bytes(b"x" * 3000)
    loader = FakeLoader()
    models = {n: {"path": str(tmp_path / f"{n}.gguf")} for n in ("a", "b", "c")}
    cfg = config(models=models, max_loaded_models=3, memory_budget=7000)
    async with ModelPool(cfg, loader=loader, health_interval=None) as pool:
        for name in ("a", "b", "c"):
            async with pool.acquire(name):
                pass
        assert loader.loaded() == ["b", "c"]
        assert pool.stats.evictions == 1


# --- admission -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_queue_full_is_refused_at_once_and_nothing_is_lost() -> None:
    loader = FakeLoader()
    cfg = config(models={"a": {"path": "/m/a.gguf", "parallel": 2}}, queue_size=2)
    done: list[int] = []
    release = anyio.Event()
    async with ModelPool(cfg, loader=loader, health_interval=None) as pool:
        async with anyio.create_task_group() as tg:

            async def request(i: int) -> None:
                async with pool.acquire("a"):
                    await release.wait()
                    done.append(i)

            for i in range(4):
                tg.start_soon(request, i)
            await wait_until(lambda: status(pool, "a").queued == 2)
            assert status(pool, "a").in_flight == 2
            with anyio.fail_after(30):  # safety net: nothing is released, so a refusal that waited would hang
                with pytest.raises(QueueFullError) as info:
                    async with pool.acquire("a"):
                        pass
            assert info.value.retry_after >= 1
            release.set()
        assert sorted(done) == [0, 1, 2, 3]
        assert (status(pool, "a").in_flight, status(pool, "a").queued) == (0, 0)


@pytest.mark.anyio
async def test_queue_is_first_come_first_served() -> None:
    cfg = config(models={"a": {"path": "/m/a.gguf", "parallel": 1}}, queue_size=10)
    order: list[int] = []
    async with ModelPool(cfg, loader=FakeLoader(), health_interval=None) as pool:
        async with anyio.create_task_group() as tg, pool.acquire("a"):

            async def request(i: int) -> None:
                async with pool.acquire("a"):
                    order.append(i)
                    await anyio.lowlevel.checkpoint()

            for i in range(5):
                tg.start_soon(request, i)
                await wait_until(lambda i=i: status(pool, "a").queued == i + 1)  # type: ignore[misc]
        assert order == [0, 1, 2, 3, 4]


@pytest.mark.anyio
async def test_cancelled_waiter_leaves_the_queue_and_leaks_no_slot() -> None:
    cfg = config(models={"a": {"path": "/m/a.gguf", "parallel": 1}}, queue_size=1)
    async with ModelPool(cfg, loader=FakeLoader(), health_interval=None) as pool:
        async with pool.acquire("a"):
            with anyio.move_on_after(0.05) as scope:
                async with pool.acquire("a"):
                    pytest.fail("got a slot that was taken")
            assert scope.cancelled_caught
            assert (status(pool, "a").in_flight, status(pool, "a").queued) == (1, 0)
            # The queue place is free again.
            async with anyio.create_task_group() as tg:
                tg.start_soon(_hold, pool, "a", 0.0)
                await wait_until(lambda: status(pool, "a").queued == 1)
                tg.cancel_scope.cancel()
            assert (status(pool, "a").in_flight, status(pool, "a").queued) == (1, 0)
        assert (status(pool, "a").in_flight, status(pool, "a").queued) == (0, 0)
        with anyio.fail_after(30):  # safety net: a leaked slot would make this wait for ever
            async with pool.acquire("a"):
                pass


@pytest.mark.anyio
async def test_a_slot_granted_to_a_cancelled_waiter_is_passed_on() -> None:
    cfg = config(models={"a": {"path": "/m/a.gguf", "parallel": 1}}, queue_size=2)
    got: list[str] = []
    async with ModelPool(cfg, loader=FakeLoader(), health_interval=None) as pool:
        async with anyio.create_task_group() as tg:
            cancel_first = anyio.CancelScope()

            async def first() -> None:
                with cancel_first:
                    async with pool.acquire("a"):
                        got.append("first")

            async def second() -> None:
                async with pool.acquire("a"):
                    got.append("second")

            async with pool.acquire("a"):
                tg.start_soon(first)
                await wait_until(lambda: status(pool, "a").queued == 1)
                tg.start_soon(second)
                await wait_until(lambda: status(pool, "a").queued == 2)
                # Leaving grants the slot to `first`; cancel it before it runs.
            cancel_first.cancel()
        assert got == ["second"]
        assert (status(pool, "a").in_flight, status(pool, "a").queued) == (0, 0)


async def _hold(pool: ModelPool, name: str, seconds: float) -> None:
    async with pool.acquire(name):
        await anyio.sleep(seconds)


# --- drain -----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_drain_refuses_new_requests_and_waits_for_admitted_ones() -> None:
    cfg = config(models={"a": {"path": "/m/a.gguf", "parallel": 1}}, queue_size=4)
    finished: list[str] = []
    drained: list[bool] = []
    release = anyio.Event()
    async with ModelPool(cfg, loader=FakeLoader(), health_interval=None) as pool, anyio.create_task_group() as tg:

        async def request(name: str) -> None:
            async with pool.acquire("a"):
                await release.wait()
                finished.append(name)

        async def drain() -> None:
            drained.append(await pool.drain(timeout=3600))

        tg.start_soon(request, "in-flight")
        await wait_until(lambda: status(pool, "a").in_flight == 1)
        tg.start_soon(request, "queued")
        await wait_until(lambda: status(pool, "a").queued == 1)
        assert not pool.draining
        tg.start_soon(drain)
        await wait_until(lambda: pool.draining)
        with pytest.raises(ShuttingDownError):
            async with pool.acquire("a"):
                pass
        await anyio.wait_all_tasks_blocked()
        assert drained == [] and finished == []  # drain() waits while the admitted requests run
        release.set()
        await wait_until(lambda: bool(drained))
        assert drained == [True]
        assert finished == ["in-flight", "queued"]  # both had finished when drain() returned


@pytest.mark.anyio
async def test_load_is_refused_while_draining() -> None:
    loader = FakeLoader()
    async with ModelPool(config("a b"), loader=loader, health_interval=None) as pool, pool.acquire("a"):
        with anyio.move_on_after(0.05):
            await pool.drain(timeout=1)
        with anyio.fail_after(30), pytest.raises(ShuttingDownError):  # refused, not waiting for room
            await pool.load("b")
        assert loader.loaded() == ["a"]


@pytest.mark.anyio
async def test_close_after_a_drain_timeout_ends_what_waits_and_what_runs() -> None:
    """close() while requests wait for a slot and for room: they get ShuttingDownError; models stop."""
    loader = FakeLoader()
    cfg = config(max_loaded_models=1, models={"a": {"path": "/m/a.gguf", "parallel": 1}, "b": {"path": "/m/b.gguf"}})
    errors: list[str] = []
    async with ModelPool(cfg, loader=loader, health_interval=None) as pool:

        async def waiting(name: str) -> None:
            try:
                async with pool.acquire(name):
                    pytest.fail("admitted after close")
            except ShuttingDownError:
                errors.append(name)

        async with anyio.create_task_group() as tg, pool.acquire("a") as model:
            tg.start_soon(waiting, "a")  # waits for a's slot
            tg.start_soon(waiting, "b")  # waits for room
            await wait_until(lambda: status(pool, "a").queued == 1 and status(pool, "b").in_flight == 1)
            assert not await pool.drain(timeout=0.05)
            assert not pool.closed
            with anyio.fail_after(30):  # safety net against a hang
                await pool.close()
            assert pool.closed and model.closed
            await wait_until(lambda: len(errors) == 2)
        assert sorted(errors) == ["a", "b"]
        assert loader.loaded() == []
        with pytest.raises(ShuttingDownError):
            await pool.load("a")


@virtual_clock()
@pytest.mark.anyio
async def test_drain_times_out() -> None:
    async with ModelPool(config("a"), loader=FakeLoader(), health_interval=None) as pool, pool.acquire("a"):
        start = anyio.current_time()
        assert not await pool.drain(timeout=0.1)
        assert anyio.current_time() - start == pytest.approx(0.1)  # neither earlier nor later (virtual time)
        assert status(pool, "a").in_flight == 1
    assert await pool.drain(timeout=0.1) is True


# --- failures --------------------------------------------------------------------------------------


@virtual_clock()
@pytest.mark.anyio
async def test_load_failures_back_off_then_fail_until_an_explicit_load() -> None:
    loader = FakeLoader(fail=True)
    cfg = config("a", max_restarts=2, restart_backoff=0.05, restart_backoff_max=0.08, restart_window=60)
    async with ModelPool(cfg, loader=loader, health_interval=None) as pool:
        # The request waits for one load attempt and gets its error.
        with pytest.raises(ModelUnavailableError, match="could not be loaded: StartupError: .*bad file"):
            async with pool.acquire("a"):
                pass
        await wait_until(lambda: status(pool, "a").phase == Phase.FAILED)
        times = [t for _, t in loader.calls]
        assert len(times) == 3  # the load and 2 restarts
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert gaps == [pytest.approx(0.05), pytest.approx(0.08)]  # the backoff, then doubled and capped
        st = status(pool, "a")
        assert st.restarts == 2 and pool.stats.restarts == 2 and pool.stats.loads == 0
        failed = {c.type: c for c in st.conditions}["Failed"]
        assert failed.status == "True" and "bad file" in failed.message
        # Failed: refused at once (no time passes), with the last error.
        before = anyio.current_time()
        with pytest.raises(ModelUnavailableError, match="failed after more than 2 restarts.*bad file"):
            async with pool.acquire("a"):
                pass
        assert anyio.current_time() == before
        await anyio.sleep(3600)  # an hour, well past every backoff and the restart window
        assert len(loader.calls) == 3  # stays Failed
        assert status(pool, "a").phase == Phase.FAILED
        # An explicit load resets it.
        loader.fail = False
        await pool.load("a")
        assert status(pool, "a").phase == Phase.SERVING
        async with pool.acquire("a"):
            pass


@pytest.mark.anyio
async def test_recovery_policy_none_fails_at_the_first_failure() -> None:
    """A model with recovery_policy "None" is not restarted; the daemon-wide max_restarts holds for the others."""
    loader = FakeLoader(fail=True)
    models = {"a": {"path": "/m/a.gguf", "recovery_policy": "None"}, "b": {"path": "/m/b.gguf"}}
    cfg = config(models=models, max_restarts=2, restart_backoff=0.01, restart_backoff_max=0.01)
    async with ModelPool(cfg, loader=loader, health_interval=None) as pool:
        with pytest.raises(ModelUnavailableError):
            await pool.load("a")
        await wait_until(lambda: status(pool, "a").phase == Phase.FAILED)
        assert [name for name, _ in loader.calls] == ["a"]
        with pytest.raises(ModelUnavailableError, match=r"^model 'a' failed and is not restarted; last error: .*bad file"):
            async with pool.acquire("a"):
                pass
        with pytest.raises(ModelUnavailableError):
            await pool.load("b")
        await wait_until(lambda: status(pool, "b").phase == Phase.FAILED)
        assert [name for name, _ in loader.calls].count("b") == 3  # the load and 2 restarts


@pytest.mark.anyio
async def test_restart_grace_period_is_the_loaders_grace() -> None:
    loader = FakeLoader()
    models = {"a": {"path": "/m/a.gguf", "restart_grace_period": "12s"}, "b": {"path": "/m/b.gguf"}}
    async with ModelPool(config(models=models, max_loaded_models=2), loader=loader, health_interval=None) as pool:
        await pool.load("a")
        await pool.load("b")
    assert loader.options[0]["grace"] == 12.0
    assert "grace" not in loader.options[1]  # the loader's own default


@pytest.mark.anyio
async def test_unload_clears_failed() -> None:
    loader = FakeLoader(fail=True)
    cfg = config("a", max_restarts=0)
    async with ModelPool(cfg, loader=loader, health_interval=None) as pool:
        with pytest.raises(ModelUnavailableError):
            await pool.load("a")
        assert status(pool, "a").phase == Phase.FAILED
        await pool.unload("a")
        assert status(pool, "a").phase == Phase.PENDING
        loader.fail = False
        async with pool.acquire("a"):
            pass


@pytest.mark.anyio
async def test_requests_wait_while_loading() -> None:
    loaded = anyio.Event()
    loader = FakeLoader(gate=loaded)
    cfg = config(models={"a": {"path": "/m/a.gguf", "parallel": 2}})
    async with ModelPool(cfg, loader=loader, health_interval=None) as pool:
        models: list[Any] = []
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(_collect, pool, models)
            await wait_until(lambda: status(pool, "a").phase == Phase.LOADING and status(pool, "a").queued == 1)
            await anyio.wait_all_tasks_blocked()
            assert status(pool, "a").in_flight == 2 and status(pool, "a").queued == 1
            assert models == []  # nobody got the model while it loads
            loaded.set()
        assert len(loader.calls) == 1
        assert len(models) == 3 and all(m is models[0] for m in models)


async def _collect(pool: ModelPool, into: list[Any]) -> None:
    async with pool.acquire("a") as model:
        into.append(model)


# --- idle unload, preload, unload, close --------------------------------------------------------------


@virtual_clock()
@pytest.mark.anyio
async def test_idle_models_are_unloaded() -> None:
    loader = FakeLoader()
    async with ModelPool(config("a b", max_loaded_models=2, idle_timeout=0.2), loader=loader,
                         health_interval=None) as pool:  # fmt: skip
        async with pool.acquire("a"):
            await anyio.sleep(0.4)  # in use for twice the idle timeout: not idle
            assert loader.loaded() == ["a"]
        released = anyio.current_time()
        # The model's process is gone a moment before the unload is complete and counted.
        await wait_until(lambda: loader.loaded() == [])
        unloaded = anyio.current_time()
        await wait_until(lambda: status(pool, "a").phase == Phase.PENDING and pool.stats.idle_unloads == 1)
        # Unloaded once idle for idle_timeout, at the idle check (every 0.05 s) that follows (virtual time).
        assert 0.2 <= unloaded - released < 0.2 + 0.05 + 0.01  # + this test's own polling (every 0.005 s)
        async with pool.acquire("a"):  # loads again on demand
            pass
        assert len(loader.calls) == 2


@pytest.mark.anyio
async def test_preload_and_explicit_unload() -> None:
    loader = FakeLoader()
    async with ModelPool(config("a b", max_loaded_models=2, preload=["b"]), loader=loader,
                         health_interval=None) as pool:  # fmt: skip
        await wait_until(lambda: status(pool, "b").phase == Phase.SERVING)
        assert loader.loaded() == ["b"]
        await pool.unload("b")
        assert status(pool, "b").phase == Phase.PENDING
        assert loader.loaded() == []
        assert pool.stats.evictions == 0
    assert loader.loaded() == []


@pytest.mark.anyio
async def test_unload_waits_for_requests_using_the_model() -> None:
    loader = FakeLoader()
    async with ModelPool(config("a"), loader=loader, health_interval=None) as pool, anyio.create_task_group() as tg:
        async with pool.acquire("a") as model:
            tg.start_soon(pool.unload, "a")
            await anyio.wait_all_tasks_blocked()  # the unload has gone as far as it can
            assert not model.closed
        await wait_until(lambda: model.closed)


@pytest.mark.anyio
async def test_closing_the_pool_stops_everything_and_refuses_requests() -> None:
    loader = FakeLoader()
    cfg = config(models={"a": {"path": "/m/a.gguf", "parallel": 1}}, queue_size=1)
    errors: list[BaseException] = []
    pool = ModelPool(cfg, loader=loader, health_interval=None)
    async with anyio.create_task_group() as tg, pool, pool.acquire("a"):

        async def queued() -> None:
            try:
                async with pool.acquire("a"):
                    pass
            except ShuttingDownError as exc:
                errors.append(exc)

        tg.start_soon(queued)
        await wait_until(lambda: status(pool, "a").queued == 1)
    assert loader.loaded() == []
    assert len(errors) == 1
    with pytest.raises(ShuttingDownError):
        async with pool.acquire("a"):
            pass


# --- supervisor ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_supervisor_standalone_and_conditions() -> None:
    loader = FakeLoader()
    sup = Supervisor("a", ModelConfig(path=Path("/m/a.gguf")), loader=loader, health_interval=None)
    assert sup.phase == Phase.PENDING
    before = {c.type: c for c in sup.conditions}
    async with sup:
        model = await sup.ready()
        assert sup.phase == Phase.SERVING and sup.pid == os.getpid()
        now = {c.type: c for c in sup.conditions}
        assert now["Ready"].status == "True" and now["Loaded"].status == "True"
        assert now["Ready"].last_transition_time > before["Ready"].last_transition_time
        # Unchanged status: unchanged transition time.
        assert now["Crashed"].last_transition_time == before["Crashed"].last_transition_time
        assert now["Failed"].last_transition_time == before["Failed"].last_transition_time
    assert model.closed  # type: ignore[attr-defined]
    assert sup.phase == Phase.PENDING
