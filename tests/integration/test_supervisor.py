"""The supervisor against a real llama-server: crash detection, restarts, Failed."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.lowlevel
import psutil
import pytest

import llamaproc
from llamaproc.errors import ModelUnavailableError
from llamaproc.runtime import ModelConfig, Phase, Supervisor

pytestmark = pytest.mark.integration


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def conditions(sup: Supervisor) -> dict[str, llamaproc.Condition]:
    return {c.type: c for c in sup.conditions}


@pytest.mark.anyio
async def test_serves_and_restarts_a_killed_child_with_backoff(tiny_model: Path, backend: llamaproc.Backend) -> None:
    phases: list[tuple[str, Phase, float]] = []

    def record(sup: Supervisor, event: str) -> None:
        phases.append((event, sup.phase, time.monotonic()))

    config = ModelConfig(path=tiny_model, parallel=2, ctx_size=256)
    async with Supervisor("tiny", config, restart_backoff=0.3, health_interval=None, on_change=record) as sup:
        model = await sup.ready()
        assert sup.phase == Phase.SERVING and sup.pid == model.pid and sup.port
        assert (await model.complete("Hello", max_tokens=4)).text
        first_pid = model.pid

        killed_at = time.monotonic()
        os.kill(first_pid, signal.SIGKILL)
        await wait_until(lambda: sup.phase == Phase.LOADING, timeout=1)
        seen_after = time.monotonic() - killed_at
        assert seen_after < 0.2  # the exit is seen at once, not at the next health probe
        assert sup.model is None
        crashed = conditions(sup)["Crashed"]
        assert crashed.status == "True" and "exited with code -9" in crashed.message
        assert conditions(sup)["Ready"].reason == "BackOff"

        again = await sup.ready()
        assert again.pid != first_pid and gone(first_pid)
        assert sup.restarts == 1 and sup.loads == 2
        loading = next(t for e, _, t in phases if e == "crashed")
        serving = [t for e, _, t in phases if e == "serving"][-1]
        assert serving - loading >= 0.3  # waited the backoff
        assert conditions(sup)["Crashed"].status == "False"
        assert conditions(sup)["Crashed"].reason == "Recovered"
        assert (await again.complete("Hello", max_tokens=4)).text
    assert gone(again.pid)
    assert sup.phase == Phase.PENDING


@pytest.mark.anyio
async def test_a_request_in_flight_sees_the_crash_then_the_model_comes_back(
    tiny_model: Path, backend: llamaproc.Backend
) -> None:
    config = ModelConfig(path=tiny_model, ctx_size=2048)
    async with Supervisor("tiny", config, restart_backoff=0.05, health_interval=None) as sup:
        model = await sup.ready()
        with pytest.raises(llamaproc.ServerCrashedError):
            async with model.generate("Once", max_tokens=100000, ignore_eos=True) as stream:
                async for _ in stream:
                    if model.returncode is None:
                        os.kill(model.pid, signal.SIGKILL)
        again = await sup.ready()
        assert again.pid != model.pid
        assert (await again.complete("Once", max_tokens=4)).text


@pytest.mark.anyio
async def test_a_child_that_stops_answering_health_is_killed_and_restarted(
    tiny_model: Path, backend: llamaproc.Backend
) -> None:
    config = ModelConfig(path=tiny_model, ctx_size=256)
    async with Supervisor(
        "tiny", config, restart_backoff=0.05, health_interval=0.1, health_timeout=0.3, health_failures=2
    ) as sup:
        model = await sup.ready()
        await anyio.sleep(0.5)  # healthy probes do not disturb it
        assert sup.phase == Phase.SERVING and sup.restarts == 0
        with pytest.raises(llamaproc.ServerHungError) as info:
            async with model.generate("Once", max_tokens=200) as stream:
                async for _ in stream:
                    os.kill(model.pid, signal.SIGSTOP)  # alive, but answers nothing
        # The request in flight is told of a hang, not of an exit with -9.
        assert "stopped answering and was killed" in str(info.value)
        assert "failed 2 health checks" in info.value.reason and info.value.returncode == -signal.SIGKILL
        await wait_until(lambda: sup.restarts == 1, timeout=5)
        crashed = conditions(sup)["Crashed"]
        assert crashed.reason == "Unresponsive" and "failed 2 health checks" in crashed.message
        again = await sup.ready()
        assert again.pid != model.pid and gone(model.pid)
        assert model.returncode == -signal.SIGKILL


@pytest.mark.anyio
async def test_too_many_restarts_in_the_window_fail_the_model(tiny_model: Path, backend: llamaproc.Backend) -> None:
    config = ModelConfig(path=tiny_model, ctx_size=256)
    async with Supervisor("tiny", config, restart_backoff=0.05, max_restarts=1, health_interval=None) as sup:
        first = await sup.ready()
        os.kill(first.pid, signal.SIGKILL)
        await wait_until(lambda: sup.restarts == 1)
        second = await sup.ready()
        os.kill(second.pid, signal.SIGKILL)
        await wait_until(lambda: sup.phase == Phase.FAILED)
        assert sup.restarts == 1 and sup.pid is None
        failed = conditions(sup)["Failed"]
        assert failed.status == "True" and failed.reason == "TooManyRestarts"
        with pytest.raises(ModelUnavailableError, match="more than 1 restarts.*exited with code -9"):
            await sup.ready()
        await anyio.sleep(0.2)
        assert sup.phase == Phase.FAILED  # stays Failed
        assert gone(first.pid) and gone(second.pid)
        # An explicit start(reset=True) tries again.
        sup.start(reset=True)
        third = await sup.ready()
        assert third.pid not in (first.pid, second.pid)


@pytest.mark.anyio
async def test_a_file_that_does_not_load_fails_after_the_limit(tmp_path: Path, backend: llamaproc.Backend) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file\n" * 100)
    async with Supervisor(
        "junk", ModelConfig(path=junk), restart_backoff=0.05, max_restarts=2, health_interval=None
    ) as sup:
        with pytest.raises(ModelUnavailableError, match="could not be loaded: StartupError"):
            await sup.ready()
        await wait_until(lambda: sup.phase == Phase.FAILED)
        assert sup.restarts == 2 and sup.loads == 0
        with pytest.raises(ModelUnavailableError, match="failed after more than 2 restarts.*StartupError"):
            await sup.ready()
        assert conditions(sup)["Loaded"].reason == "LoadFailed"


@pytest.mark.anyio
async def test_requests_during_the_backoff_after_a_failed_load_are_refused_at_once(
    tmp_path: Path, backend: llamaproc.Backend
) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file\n" * 100)
    async with Supervisor("junk", ModelConfig(path=junk), restart_backoff=5, health_interval=None) as sup:
        with pytest.raises(ModelUnavailableError, match="could not be loaded"):
            await sup.ready()  # waits for the first attempt
        assert sup.phase == Phase.LOADING and conditions(sup)["Ready"].reason == "BackOff"
        start = time.monotonic()
        with anyio.fail_after(1), pytest.raises(ModelUnavailableError) as info:
            await sup.ready()  # not through the 5 s backoff
        assert time.monotonic() - start < 0.2
        assert "could not be loaded: StartupError" in str(info.value)
        assert "retrying in" in str(info.value)
        assert sup.restarts == 1 and sup.phase == Phase.LOADING


@pytest.mark.anyio
async def test_a_stopping_model_is_no_longer_serving(tiny_model: Path, backend: llamaproc.Backend) -> None:
    """The phase leaves Serving before the child is stopped, not after."""
    async with Supervisor("tiny", ModelConfig(path=tiny_model, ctx_size=256), health_interval=None) as sup:
        model = await sup.ready()
        async with anyio.create_task_group() as tg:
            tg.start_soon(sup.stop)
            while sup.phase == Phase.SERVING:
                await anyio.lowlevel.checkpoint()
            running = model.returncode is None
            seen = (sup.phase, conditions(sup)["Ready"].reason, sup.model)
        assert running  # the child was still there when the phase changed
        assert seen == (Phase.PENDING, "Unloading", None)
        assert conditions(sup)["Ready"].reason == "Unloaded" and gone(model.pid)
