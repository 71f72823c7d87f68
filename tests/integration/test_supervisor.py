"""The supervisor against a real llama-server: crash detection, restarts, Failed."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.lowlevel
import psutil
import pytest

import llamaproc
from llamaproc.client import LlamaClient
from llamaproc.errors import ModelUnavailableError
from llamaproc.runtime import ModelConfig, Phase, Supervisor
from llamaproc.types import Health

pytestmark = pytest.mark.integration


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


def conditions(sup: Supervisor) -> dict[str, llamaproc.Condition]:
    return {c.type: c for c in sup.conditions}


@pytest.mark.anyio
async def test_serves_and_restarts_a_killed_child_with_backoff(tiny_model: Path, backend: llamaproc.Backend) -> None:
    # What the supervisor looked like at each of its events.
    seen: list[tuple[str, Phase, int, int, str, str]] = []

    def record(sup: Supervisor, event: str) -> None:
        ready = conditions(sup)["Ready"]
        seen.append((event, sup.phase, sup.loads, sup.restarts, ready.reason, ready.message))

    config = ModelConfig(path=tiny_model, parallel=2, ctx_size=256)
    async with Supervisor("tiny", config, restart_backoff=0.3, health_interval=None, on_change=record) as sup:
        model = await sup.ready()
        assert sup.phase == Phase.SERVING and sup.pid == model.pid and sup.port
        assert (await model.complete("Hello", max_tokens=4)).text
        first_pid = model.pid
        before = len(seen)

        os.kill(first_pid, signal.SIGKILL)
        # No health probes and no requests: only the exit watcher can see it.
        await wait_until(lambda: sup.phase == Phase.LOADING)
        assert sup.model is None
        crashed = conditions(sup)["Crashed"]
        assert crashed.status == "True" and "exited with code -9" in crashed.message
        assert conditions(sup)["Ready"].reason == "BackOff"

        again = await sup.ready()
        assert again.pid != first_pid and gone(first_pid)
        assert sup.restarts == 1 and sup.loads == 2
        # The order of events: the crash is recorded, then the backoff begins (the restart is counted
        # there, with its delay), and only then the child is loaded again.
        events = seen[before:]
        assert [(e, phase, loads, restarts, reason) for e, phase, loads, restarts, reason, _ in events] == [
            ("crashed", Phase.LOADING, 1, 0, "Crashed"),
            ("restarting", Phase.LOADING, 1, 1, "BackOff"),
            ("loading", Phase.LOADING, 1, 1, "Loading"),
            ("serving", Phase.SERVING, 2, 1, "Serving"),
        ]
        assert events[1][5].startswith("restarting in 0.3 s after: llama-server (pid")
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
    tiny_model: Path, backend: llamaproc.Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthy = 0  # /health answers "ok" seen by any client in this process
    health = LlamaClient.health

    async def counting(client: LlamaClient) -> Health:
        nonlocal healthy
        answer = await health(client)
        healthy += answer.status == "ok"
        return answer

    monkeypatch.setattr(LlamaClient, "health", counting)
    config = ModelConfig(path=tiny_model, ctx_size=256)
    async with Supervisor(
        "tiny", config, restart_backoff=0.05, health_interval=0.1, health_timeout=0.3, health_failures=2
    ) as sup:
        model = await sup.ready()
        probes = healthy
        await wait_until(lambda: healthy >= probes + 3)  # more healthy probes than health_failures
        assert sup.phase == Phase.SERVING and sup.restarts == 0 and sup.pid == model.pid  # they do not disturb it
        with pytest.raises(llamaproc.ServerHungError) as info:
            async with model.generate("Once", max_tokens=200) as stream:
                async for _ in stream:
                    os.kill(model.pid, signal.SIGSTOP)  # alive, but answers nothing
        # The request in flight is told of a hang, not of an exit with -9.
        assert "stopped answering and was killed" in str(info.value)
        assert "failed 2 health checks" in info.value.reason and info.value.returncode == -signal.SIGKILL
        await wait_until(lambda: sup.restarts == 1)
        crashed = conditions(sup)["Crashed"]
        assert crashed.reason == "Unresponsive" and "failed 2 health checks" in crashed.message
        again = await sup.ready()
        assert again.pid != model.pid and gone(model.pid)
        assert model.returncode == -signal.SIGKILL


@pytest.mark.anyio
async def test_too_many_restarts_in_the_window_fail_the_model(tiny_model: Path, backend: llamaproc.Backend) -> None:
    config = ModelConfig(path=tiny_model, ctx_size=256)
    events: list[str] = []
    async with Supervisor(
        "tiny", config, restart_backoff=0.05, max_restarts=1, health_interval=None,
        on_change=lambda _, event: events.append(event),
    ) as sup:  # fmt: skip
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
        assert events[-2:] == ["crashed", "failed"]  # no backoff: nothing is scheduled to restart it
        # Watched past the moment a next restart would have come (after a backoff of 0.05 s doubled):
        # nothing happens, it stays Failed. (The unit tests watch an hour of virtual time.)
        await anyio.sleep(4 * 0.05 * 2)
        assert events[-2:] == ["crashed", "failed"]
        assert sup.phase == Phase.FAILED
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
    async with Supervisor(
        "junk", ModelConfig(path=junk), restart_backoff=3600, restart_backoff_max=3600, health_interval=None
    ) as sup:
        with pytest.raises(ModelUnavailableError, match="could not be loaded"):
            await sup.ready()  # waits for the first attempt
        assert sup.phase == Phase.LOADING and conditions(sup)["Ready"].reason == "BackOff"
        # Safety net only: waiting through the hour of backoff would hang.
        with anyio.fail_after(30), pytest.raises(ModelUnavailableError) as info:
            await sup.ready()
        assert "could not be loaded: StartupError" in str(info.value)
        assert "retrying in" in str(info.value)
        assert sup.restarts == 1 and sup.phase == Phase.LOADING  # refused before a second attempt


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
