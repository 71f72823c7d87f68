"""The model pool against real llama-server children on the tiny model."""

from __future__ import annotations

import os
import random
import shutil
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

import llamaproc
from llamaproc.errors import ModelUnavailableError, QueueFullError, ShuttingDownError
from llamaproc.runtime import ModelPool, ModelStatus, Phase, ServeConfig, estimate_memory

pytestmark = pytest.mark.integration

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pool")
    a, b = folder / "a.gguf", folder / "b.gguf"
    shutil.copyfile(tiny_model, a)
    shutil.copyfile(tiny_model, b)
    return a, b


def serve_config(models: dict[str, Path | dict[str, Any]], **settings: Any) -> ServeConfig:
    tables = {
        name: {"path": str(spec), "ctx_size": 512} if isinstance(spec, Path) else spec for name, spec in models.items()
    }
    return ServeConfig.model_validate({"models": tables, **settings})


def status(pool: ModelPool, name: str) -> ModelStatus:
    return next(s for s in pool.status() if s.name == name)


async def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait for a condition (the timeout is only a safety net against a hang)."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def reference_text(pool: ModelPool, name: str, max_tokens: int) -> str:
    async with pool.acquire(name) as model:
        result = await model.complete(PROMPT, max_tokens=max_tokens, ignore_eos=True)
        return result.text


@pytest.mark.anyio
async def test_loads_on_demand_then_reuses_the_process(two_models: tuple[Path, Path]) -> None:
    a, _ = two_models
    async with ModelPool(serve_config({"a": a})) as pool:
        assert status(pool, "a").phase == Phase.PENDING and status(pool, "a").pid is None
        async with pool.acquire("a") as model:
            pid = model.pid
            assert (await model.complete(PROMPT, max_tokens=4)).text
            st = status(pool, "a")
            assert (st.phase, st.pid, st.in_flight, st.loaded) == (Phase.SERVING, pid, 1, True)
            assert st.port and model.base_url.endswith(f":{st.port}")
        async with pool.acquire("a") as again:
            assert again.pid == pid
            assert (await again.complete(PROMPT, max_tokens=4)).text
        assert pool.stats.loads == 1
    assert gone(pid)


@pytest.mark.anyio
async def test_lru_with_one_model_loaded_evicts_the_idle_one(two_models: tuple[Path, Path]) -> None:
    a, b = two_models
    async with ModelPool(serve_config({"a": a, "b": b}, max_loaded_models=1)) as pool:
        async with pool.acquire("a") as model_a:
            pid_a = model_a.pid
        async with pool.acquire("b") as model_b:
            assert gone(pid_a)
            assert (await model_b.complete(PROMPT, max_tokens=4)).text
        assert status(pool, "a").phase == Phase.PENDING and status(pool, "a").pid is None
        assert status(pool, "b").phase == Phase.SERVING
        assert pool.stats.evictions == 1 and pool.stats.loads == 2


@pytest.mark.anyio
async def test_a_busy_model_is_not_evicted_its_stream_completes(two_models: tuple[Path, Path]) -> None:
    a, b = two_models
    cfg = serve_config({"a": a, "b": b}, max_loaded_models=1)
    async with ModelPool(cfg) as pool:
        expected = await reference_text(pool, "a", 200)
        b_served = anyio.Event()
        async with anyio.create_task_group() as tg, pool.acquire("a") as model_a:
            pid_a = model_a.pid
            texts: list[str] = []
            async with model_a.generate(PROMPT, max_tokens=200, ignore_eos=True) as stream:

                async def use_b() -> None:
                    async with pool.acquire("b") as model_b:
                        assert (await model_b.complete(PROMPT, max_tokens=4)).text
                        b_served.set()

                async for token in stream:
                    texts.append(token.text)
                    if len(texts) == 1:
                        tg.start_soon(use_b)
                        await wait_until(lambda: status(pool, "b").in_flight == 1)
                    await anyio.sleep(0.002)  # a slow reader keeps the stream alive
                    assert not b_served.is_set()
                    assert status(pool, "a").phase == Phase.SERVING
            assert stream.result is not None
            assert "".join(texts) == expected
            assert stream.result.usage.completion_tokens == 200
            assert not gone(pid_a)
        assert b_served.is_set()
        assert gone(pid_a)


@pytest.mark.anyio
async def test_queue_full_is_refused_while_admitted_requests_complete(two_models: tuple[Path, Path]) -> None:
    a, _ = two_models
    cfg = serve_config({"a": {"path": str(a), "parallel": 1, "ctx_size": 512}}, queue_size=2)
    results: list[str] = []
    async with ModelPool(cfg) as pool:
        expected = await reference_text(pool, "a", 50)
        release = anyio.Event()

        async def request() -> None:
            async with pool.acquire("a") as model:
                await release.wait()
                results.append((await model.complete(PROMPT, max_tokens=50, ignore_eos=True)).text)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(request)
            await wait_until(lambda: status(pool, "a").queued == 2)
            assert status(pool, "a").in_flight == 1
            # Nothing is released until the refusal: a request that waited for a place would hang.
            with anyio.fail_after(30), pytest.raises(QueueFullError) as info:
                async with pool.acquire("a"):
                    pass
            assert info.value.retry_after >= 1
            release.set()
        assert results == [expected] * 3
        assert (status(pool, "a").in_flight, status(pool, "a").queued) == (0, 0)


@pytest.mark.anyio
async def test_a_killed_child_is_restarted_with_backoff(two_models: tuple[Path, Path]) -> None:
    a, _ = two_models
    cfg = serve_config({"a": a}, restart_backoff=0.3)
    async with ModelPool(cfg) as pool:
        await pool.load("a")
        first = status(pool, "a")
        assert first.phase == Phase.SERVING and first.pid
        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        # The restart is counted when the backoff begins; this poll wakes before the backoff's end.
        await wait_until(lambda: status(pool, "a").restarts == 1)
        during = status(pool, "a")
        assert during.phase == Phase.LOADING and during.pid is None
        assert {c.type: c for c in during.conditions}["Available"].reason == "Loading"
        assert {c.type: c for c in pool.supervisor("a").conditions}["Ready"].reason == "BackOff"
        # A request arriving now, with no process running, waits for the restart and gets the new one.
        async with pool.acquire("a") as model:
            assert model.pid != first.pid
            assert pool.stats.loads == 2
            assert (await model.complete(PROMPT, max_tokens=4)).text
        after = status(pool, "a")
        assert after.phase == Phase.SERVING and after.restarts == 1 and after.pid == model.pid
        assert after.last_used is not None and first.last_used is not None and after.last_used > first.last_used
        assert pool.stats.restarts == 1 and pool.stats.loads == 2
        assert gone(first.pid)


@pytest.mark.anyio
async def test_last_used_is_reset_when_the_model_restarts(two_models: tuple[Path, Path]) -> None:
    """A restarted model counts as just used: the idle clock and the LRU order start again."""
    a, _ = two_models
    async with ModelPool(serve_config({"a": a}, restart_backoff=0.05)) as pool:
        async with pool.acquire("a") as model:
            pass
        used = status(pool, "a").last_used
        await anyio.sleep(0.2)
        killed = datetime.now(UTC)
        os.kill(model.pid, signal.SIGKILL)
        await wait_until(lambda: (s := status(pool, "a")).restarts == 1 and s.phase == Phase.SERVING)
        after = status(pool, "a").last_used
        assert used is not None and after is not None
        assert after > killed > used  # no request since the crash: the restart reset it


def llama_children() -> int:
    count = 0
    for child in psutil.Process().children(recursive=True):
        try:
            if "llama-server" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                count += 1
        except psutil.Error:
            pass
    return count


@pytest.mark.anyio
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_traffic_with_room_for_one_model_always_completes(
    two_models: tuple[Path, Path], seed: int
) -> None:
    """Clients sending requests (streamed or not, some cancelled) while loads, unloads and idle unloads
    go on, on 2 models with room for 1: every request ends (the deadline is a safety net against a
    hang), never more than one llama-server runs, and nothing stays in flight or queued.
    """
    a, b = two_models
    cfg = serve_config(
        {
            "a": {"path": str(a), "parallel": 2, "ctx_size": 512},
            "b": {"path": str(b), "parallel": 2, "ctx_size": 512},
        },
        max_loaded_models=1,
        queue_size=64,
        idle_timeout=0.3,
    )
    rng = random.Random(seed)
    ended: list[str] = []
    most = 0
    async with ModelPool(cfg) as pool:

        async def client() -> None:
            for _ in range(6):
                name = rng.choice("ab")
                stream = rng.random() < 0.5
                cancel_after = rng.random() * 0.3 if rng.random() < 0.2 else None
                with anyio.move_on_after(cancel_after if cancel_after is not None else 60):
                    async with pool.acquire(name) as model:
                        if stream:
                            async with model.generate(PROMPT, max_tokens=20) as tokens:
                                async for _ in tokens:
                                    pass
                            assert tokens.result is not None
                        else:
                            await model.complete(PROMPT, max_tokens=20)
                    ended.append("request")
                    continue
                ended.append("cancelled")

        async def admin() -> None:
            for _ in range(10):
                name = rng.choice("ab")
                await (pool.load(name) if rng.random() < 0.5 else pool.unload(name))
                ended.append("admin")
                await anyio.sleep(rng.random() * 0.2)

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, llama_children(), sum(s.loaded for s in pool.status()))
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as outer:
            outer.start_soon(watch)
            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for _ in range(7):
                        tg.start_soon(client)
                    tg.start_soon(admin)
            outer.cancel_scope.cancel()
        assert len(ended) == 7 * 6 + 10
        assert most == 1
        assert all((s.in_flight, s.queued) == (0, 0) for s in pool.status())
        assert pool.stats.evictions + pool.stats.idle_unloads >= 2


@pytest.mark.anyio
async def test_restart_limit_marks_failed(two_models: tuple[Path, Path]) -> None:
    a, _ = two_models
    cfg = serve_config({"a": a}, restart_backoff=0.05, max_restarts=1)
    async with ModelPool(cfg) as pool:
        for _ in range(2):
            async with pool.acquire("a") as model:
                pass
            os.kill(model.pid, signal.SIGKILL)
            await wait_until(lambda: status(pool, "a").phase != Phase.SERVING)
        await wait_until(lambda: status(pool, "a").phase == Phase.FAILED)
        st = status(pool, "a")
        assert st.restarts == 1 and st.pid is None
        with pytest.raises(ModelUnavailableError, match="failed after more than 1 restarts"):
            async with pool.acquire("a"):
                pass
        await pool.load("a")  # an explicit load brings it back
        assert status(pool, "a").phase == Phase.SERVING


@pytest.mark.anyio
async def test_a_file_that_never_loads_ends_failed(tmp_path: Path, backend: llamaproc.Backend) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model\n" * 64)
    cfg = serve_config({"junk": junk}, restart_backoff=0.05, max_restarts=1)
    async with ModelPool(cfg) as pool:
        with pytest.raises(ModelUnavailableError, match="could not be loaded"):
            async with pool.acquire("junk"):
                pass
        await wait_until(lambda: status(pool, "junk").phase == Phase.FAILED)
        with pytest.raises(ModelUnavailableError, match="failed after more than 1 restarts"):
            async with pool.acquire("junk"):
                pass
        assert status(pool, "junk").restarts == 1


@pytest.mark.anyio
async def test_idle_models_are_unloaded(two_models: tuple[Path, Path]) -> None:
    a, _ = two_models
    async with ModelPool(serve_config({"a": a}, idle_timeout=0.5)) as pool:
        async with pool.acquire("a") as model:
            pid = model.pid
        released = status(pool, "a").last_used
        await wait_until(lambda: pool.stats.idle_unloads == 1)
        assert gone(pid)
        # Unloaded after the last use. (When exactly, on a virtual clock: tests/unit/test_pool.py.)
        unloaded = {c.type: c for c in status(pool, "a").conditions}["Available"]
        assert unloaded.reason == "NotLoaded" and released is not None
        assert unloaded.last_transition_time > released
        assert status(pool, "a").phase == Phase.PENDING and not status(pool, "a").loaded
        async with pool.acquire("a") as model:
            assert model.pid != pid


@pytest.mark.anyio
async def test_memory_budget_allows_one_model_at_a_time(two_models: tuple[Path, Path]) -> None:
    a, b = two_models
    cfg = serve_config({"a": a, "b": b})
    one = estimate_memory(cfg.models["a"])
    assert one == estimate_memory(cfg.models["b"]) > 0
    cfg = serve_config({"a": a, "b": b}, max_loaded_models=2, memory_budget=one * 2 - 1)
    async with ModelPool(cfg) as pool:
        assert status(pool, "a").memory_estimate == one
        async with pool.acquire("a") as model_a:
            pass
        async with pool.acquire("b") as model_b:
            assert gone(model_a.pid)
            assert [s.name for s in pool.status() if s.loaded] == ["b"]
        assert not gone(model_b.pid)
        assert pool.stats.evictions == 1


@pytest.mark.anyio
async def test_drain_waits_for_an_in_flight_stream(two_models: tuple[Path, Path]) -> None:
    a, _ = two_models
    async with ModelPool(serve_config({"a": a})) as pool:
        expected = await reference_text(pool, "a", 100)
        drained: list[bool] = []
        async with anyio.create_task_group() as tg:
            async with pool.acquire("a") as model:
                texts: list[str] = []
                async with model.generate(PROMPT, max_tokens=100, ignore_eos=True) as stream:
                    async for token in stream:
                        if not texts:

                            async def drain() -> None:
                                drained.append(await pool.drain(timeout=10))

                            tg.start_soon(drain)
                            await wait_until(lambda: pool.draining)
                            with pytest.raises(ShuttingDownError):
                                async with pool.acquire("a"):
                                    pass
                        texts.append(token.text)
                        await anyio.sleep(0.001)
                        assert not drained
                assert "".join(texts) == expected
            await wait_until(lambda: bool(drained))
        assert drained == [True]
        pid = model.pid
    assert gone(pid)
