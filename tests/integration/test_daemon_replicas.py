"""Replicas and live apply in a real daemon: real llama-servers, ``llamaproc apply`` and SIGHUP.

- two replicas, one killed while requests run: every request succeeds (on the
  other replica, or retried there when its replica died before answering),
  and the status shows the crash and the restart;
- ``llamaproc apply`` changes ``parallel`` while streams run: every stream
  ends whole, the new replicas serve with the new value, and the generation
  advances; a removed model finishes its stream and goes away;
- SIGHUP applies the config file again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest
from daemon_helpers import Daemon, llama_servers_of, running_daemon_checked, until, write_config

from llamaproc.testing import write_tiny_model


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "long.gguf", context_length=4096)


def models(daemon: Daemon) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in httpx.get(daemon.http + "/api/models", timeout=30).json()["models"]}


def role(daemon: Daemon, name: str) -> dict[str, Any]:
    (only,) = models(daemon)[name]["roles"]
    return dict(only)


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def parallel_of(pid: int) -> int:
    cmdline = psutil.Process(pid).cmdline()
    return int(cmdline[cmdline.index("--parallel") + 1])


def apply(daemon: Daemon, config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "llamaproc", "apply", str(config), "--state-dir", str(daemon.state_dir), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=os.environ.copy())


async def stream(client: httpx.AsyncClient, model: str, max_tokens: int, started: anyio.Event) -> list[str]:
    """A whole OpenAI text stream: its token texts, checked to end with ``[DONE]`` and no error."""
    body = {"model": model, "prompt": "once", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    texts: list[str] = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            started.set()
            if line == "data: [DONE]":
                return texts
            event = json.loads(line[len("data: ") :])
            assert "error" not in event, event
            choice = event["choices"][0]
            if choice.get("finish_reason") is None:
                texts.append(choice["text"])
            else:
                assert choice["finish_reason"] == "length", event
    raise AssertionError(f"the stream ended without [DONE] after {len(texts)} tokens")


def test_a_replica_killed_under_load_costs_no_request(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(
        tmp_path / "serve.toml", {"m": {"path": tiny_model, "ctx_size": 512, "replicas": 2}},
        preload=["m"], restart_backoff="200ms",
    )  # fmt: skip
    with running_daemon_checked(config, tmp_path / "state") as daemon:
        until("both replicas serving", lambda: role(daemon, "m")["readyReplicas"] == 2)
        first, second = (r["pid"] for r in role(daemon, "m")["replicaStatuses"])
        assert sorted(llama_servers_of(daemon.pid)) == sorted([first, second])
        statuses: list[int] = []
        killed = anyio.Event()

        async def load(client: httpx.AsyncClient) -> None:
            while not killed.is_set() or len(statuses) < 40:
                body = {"model": "m", "prompt": "hello", "max_tokens": 64, "ignore_eos": True}
                answer = await client.post("/v1/completions", json=body)
                assert answer.status_code == 200, answer.text
                statuses.append(answer.status_code)

        async def main() -> None:
            async with httpx.AsyncClient(base_url=daemon.http, timeout=60) as client, anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(load, client)
                with anyio.fail_after(60):
                    while len(statuses) < 10:
                        await anyio.sleep(0.01)
                    # Killed while answering: its requests in flight are sent again, to the other replica.
                    while not any(r["pid"] == first and r["inFlight"] for r in role(daemon, "m")["replicaStatuses"]):
                        await anyio.sleep(0.001)
                os.kill(first, signal.SIGKILL)
                killed.set()

        anyio.run(main)
        assert set(statuses) == {200}
        assert "its replica died before answering; trying another" in daemon.stderr()

        def restarted() -> dict[str, Any] | None:
            now = role(daemon, "m")
            return now if now["readyReplicas"] == 2 and first not in [r["pid"] for r in now["replicaStatuses"]] else None

        now = restarted() or until("the killed replica restarted", restarted)
        (crashed,) = [r for r in now["replicaStatuses"] if r["restarts"]]
        assert crashed["restarts"] == 1 and "exited" in crashed["lastError"]
        assert second in [r["pid"] for r in now["replicaStatuses"]]  # the other one was not touched
        assert condition(models(daemon)["m"], "Available")["status"] == "True"


def test_apply_rolls_a_live_model_while_streams_run_and_drains_a_removed_one(
    tmp_path: Path, long_model: Path, tiny_model: Path
) -> None:
    models_before = {"m": {"path": long_model, "ctx_size": 4096, "parallel": 2}, "gone": {"path": tiny_model}}
    config = write_config(tmp_path / "serve.toml", models_before, preload=["m", "gone"], max_loaded_models=2)
    with running_daemon_checked(config, tmp_path / "state") as daemon:
        until("both models serving", lambda: all(m["phase"] == "Serving" for m in models(daemon).values()))
        (old_pid,) = [r["pid"] for r in role(daemon, "m")["replicaStatuses"]]
        assert parallel_of(old_pid) == 2
        new_config = write_config(
            tmp_path / "new.toml", {"m": {"path": long_model, "ctx_size": 4096, "parallel": 3}}, preload=["m"],
            max_loaded_models=2,
        )  # fmt: skip
        changes = [
            "daemon: setting: preload: ('m', 'gone') -> ('m',)",
            "m: update: changed: parallel",
            "gone: remove: no longer in the config: drained, then stopped",
        ]
        dry = apply(daemon, new_config, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.splitlines() == ["dry run: nothing was changed; applying would make these changes:", *changes]
        assert models(daemon)["m"]["generation"] == 1 and "gone" in models(daemon)

        results: dict[str, list[str]] = {}

        async def main() -> None:
            async with httpx.AsyncClient(base_url=daemon.http, timeout=120) as client, anyio.create_task_group() as tg:
                started = [anyio.Event(), anyio.Event(), anyio.Event()]

                async def run(key: str, model: str, event: anyio.Event) -> None:
                    results[key] = await stream(client, model, 1500, event)

                tg.start_soon(run, "m1", "m", started[0])
                tg.start_soon(run, "m2", "m", started[1])
                tg.start_soon(run, "gone", "gone", started[2])
                for event in started:
                    await event.wait()
                done = await anyio.to_thread.run_sync(apply, daemon, new_config)
                assert done.returncode == 0, done.stderr
                assert done.stdout.splitlines() == changes

        anyio.run(main)
        assert [len(results[k]) for k in ("m1", "m2", "gone")] == [1500, 1500, 1500]  # nothing dropped
        status = models(daemon)
        assert list(status) == ["m"]
        assert (status["m"]["generation"], status["m"]["observedGeneration"], status["m"]["parallel"]) == (2, 2, 3)
        (replica,) = status["m"]["roles"][0]["replicaStatuses"]
        assert replica["pid"] != old_pid and replica["generation"] == 2 and parallel_of(replica["pid"]) == 3
        assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
        refused = httpx.post(daemon.http + "/v1/completions", json={"model": "gone", "prompt": "x"}, timeout=30)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"


def test_sighup_applies_the_config_file_again(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path / "serve.toml", {"a": {"path": tiny_model}})
    with running_daemon_checked(config, tmp_path / "state") as daemon:
        assert list(models(daemon)) == ["a"]
        write_config(
            config, {"a": {"path": tiny_model}, "b": {"path": tiny_model, "replicas": 2}}, max_loaded_models=2
        )
        os.kill(daemon.pid, signal.SIGHUP)
        until("model b added", lambda: "b" in models(daemon))
        answer = httpx.post(daemon.http + "/v1/completions", json={"model": "b", "prompt": "x", "max_tokens": 2},
                            timeout=60)  # fmt: skip
        assert answer.status_code == 200  # as soon as one replica serves
        until("both replicas of b serving", lambda: role(daemon, "b")["readyReplicas"] == 2)
        config.write_text("this is not TOML [")
        os.kill(daemon.pid, signal.SIGHUP)
        until("the bad file reported", lambda: "the config was not applied" in daemon.stderr())
        assert list(models(daemon)) == ["a", "b"]  # a bad file changes nothing


def test_apply_refuses_a_bad_config_and_names_its_problems(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path / "serve.toml", {"a": {"path": tiny_model}})
    with running_daemon_checked(config, tmp_path / "state") as daemon:
        bad = write_config(tmp_path / "bad.toml", {"a": {"path": tiny_model, "parallel": 0}})
        refused = apply(daemon, bad)
        assert refused.returncode == 2 and "models.a.parallel" in refused.stderr
        missing = apply(daemon, tmp_path / "missing.toml")
        assert missing.returncode == 2 and "not found" in missing.stderr
        assert models(daemon)["a"]["generation"] == 1


def test_serve_watch_applies_the_file_when_it_changes(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path / "serve.toml", {"a": {"path": tiny_model}})
    with running_daemon_checked(config, tmp_path / "state", extra_args=["--watch"]) as daemon:
        assert list(models(daemon)) == ["a"]
        write_config(config, {"a": {"path": tiny_model, "replicas": 2}})
        until("the file applied", lambda: models(daemon)["a"]["generation"] == 2)
        assert models(daemon)["a"]["roles"][0]["replicas"] == 2
