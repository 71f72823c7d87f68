"""``llamaproc serve`` with a memory ledger shared with another process (a real daemon, a real llama-server,
and ledger_worker.py as the other program, all on one SQLite file).

The daemon's model holds a lease while it is loaded; an urgent waiter in the
other process makes it yield: at once when it is idle, after its request in
flight when it is busy. A request that cannot get its model's lease in time
fails with ``memory_unavailable`` (503, ``Retry-After``).
"""

from __future__ import annotations

import contextlib
import selectors
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from daemon_helpers import Daemon, running_daemon_checked, until, write_config
from test_ledger_processes import read_line, start

from llamaproc.testing import write_tiny_model


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with a context long enough for a stream that runs until its client goes away."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "long.gguf", context_length=32768)


def models(daemon: Daemon) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in httpx.get(daemon.http + "/api/models", timeout=30).json()["models"]}


def metric(daemon: Daemon, name: str) -> float:
    for line in httpx.get(daemon.http + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def printed_nothing(process: subprocess.Popen[str]) -> bool:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        return not selector.select(0)


def serving_lease(daemon: Daemon) -> dict[str, Any]:
    """The lease of the daemon's model ``m`` once it serves."""
    return until("the model serving under a lease", lambda: (m := models(daemon)["m"])["phase"] == "Serving"
                 and m["lease"])  # fmt: skip


@contextlib.contextmanager
def daemon_with_ledger(tmp_path: Path, model: Path, **settings: Any) -> Iterator[tuple[Daemon, str, int]]:
    """A daemon that preloads model ``m`` under a lease, the ledger's URL and the lease's size.

    The ledger's capacity is twice the lease: anything larger than the lease
    that another process asks for needs the daemon's memory.
    """
    from llamaproc.runtime import ModelConfig, lease_estimate

    memory = lease_estimate(ModelConfig(path=model, ctx_size=32768))
    url = f"sqlite://{tmp_path / 'ledger.db'}"
    config = write_config(
        tmp_path / "serve.toml", {"m": {"path": model, "ctx_size": 32768}},
        ledger=url, ledger_capacity={"cpu": 2 * memory}, preload=["m"], **settings,
    )  # fmt: skip
    with running_daemon_checked(config, tmp_path / "state") as daemon:
        lease = serving_lease(daemon)
        assert (lease["memory"], lease["device"], lease["priority"]) == (memory, "cpu", "normal")
        yield daemon, url, memory


def test_an_urgent_lease_of_another_process_unloads_the_idle_model_which_reloads_on_its_next_request(
    tmp_path: Path, long_model: Path, processes: list[subprocess.Popen[str]]
) -> None:
    with daemon_with_ledger(tmp_path, long_model) as (daemon, url, memory):
        listed = httpx.get(daemon.http + "/api/leases", timeout=30).json()
        assert listed["ledger"] == url and listed["capacity"] == {"cpu": 2 * memory}
        (held,) = listed["leases"]
        assert (held["holder"], held["memory"], held["pid"]) == ("llamaproc serve: m", memory, daemon.pid)

        waiter = start("wait", url, str(memory + 1), "urgent", "60")
        processes.append(waiter)
        assert read_line(waiter).startswith("granted ")
        status = models(daemon)["m"]
        assert (status["loaded"], status["lease"], status["phase"]) == (False, None, "Pending")
        assert metric(daemon, "llamaproc_preemptions_total") == 1
        assert read_line(waiter) == "released"

        answer = httpx.post(daemon.http + "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 4},
                            timeout=60)  # fmt: skip
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"]
        assert serving_lease(daemon)["memory"] == memory


def test_a_busy_model_finishes_its_request_in_flight_before_it_yields(
    tmp_path: Path, long_model: Path, processes: list[subprocess.Popen[str]]
) -> None:
    with daemon_with_ledger(tmp_path, long_model) as (daemon, url, memory):

        async def main() -> None:
            body = {"model": "m", "prompt": "x", "max_tokens": 100_000, "ignore_eos": True, "stream": True}
            async with (
                httpx.AsyncClient(base_url=daemon.http, timeout=60) as client,
                client.stream("POST", "/v1/completions", json=body) as response,
            ):
                assert response.status_code == 200
                lines = response.aiter_lines()
                await lines.__anext__()
                waiter = start("wait", url, str(memory + 1), "urgent", "60")
                processes.append(waiter)
                with anyio.fail_after(60):
                    while not (models(daemon)["m"]["lease"] or {}).get("preemptRequested"):
                        await anyio.sleep(0.05)
                # Asked to yield, it keeps the stream going and its lease held.
                received = 0
                async for line in lines:
                    received += line.startswith("data: {")
                    if received == 50:
                        break
                status = models(daemon)["m"]
                assert (status["loaded"], status["inFlight"]) == (True, 1)
                assert printed_nothing(waiter)
            # The stream's client went away: the model yields now.
            assert read_line(waiter).startswith("granted ")
            assert models(daemon)["m"]["loaded"] is False

        anyio.run(main)


def test_a_request_that_cannot_get_its_lease_in_time_fails_with_memory_unavailable(
    tmp_path: Path, long_model: Path, processes: list[subprocess.Popen[str]]
) -> None:
    with daemon_with_ledger(tmp_path, long_model, lease_timeout="500ms") as (daemon, url, memory):
        # Unload it, and let another process take most of the memory at a priority it cannot preempt.
        assert httpx.post(daemon.http + "/api/models/m/unload", timeout=60).status_code == 200
        holder = start("hold", url, str(memory + 1), "urgent")
        processes.append(holder)
        assert read_line(holder).startswith("granted ")
        leases = httpx.get(daemon.http + "/api/leases", timeout=30).json()["leases"]
        assert [(lease["holder"], lease["pid"], lease["priority"]) for lease in leases] == [
            ("hold", holder.pid, "urgent")
        ]

        request = {"model": "m", "prompt": "hi", "max_tokens": 4}
        refused = httpx.post(daemon.http + "/v1/completions", json=request, timeout=60)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "memory_unavailable"
        assert "waited 0.5 s for a lease" in refused.json()["error"]["message"]
        assert int(refused.headers["retry-after"]) >= 1

        holder.kill()  # its lease expires after its TTL: the model loads again
        holder.wait(10)

        def answered() -> bool:
            response = httpx.post(daemon.http + "/v1/completions", json=request, timeout=60)
            assert response.status_code in (200, 503), response.text
            return response.status_code == 200

        until("the model answering once the holder's lease expired", answered)
        assert models(daemon)["m"]["lease"]["memory"] == memory


def test_without_a_ledger_the_daemon_lists_no_leases(tmp_path: Path, long_model: Path) -> None:
    config = write_config(tmp_path / "serve.toml", {"m": {"path": long_model}})
    with running_daemon_checked(config, tmp_path / "state") as daemon:
        assert httpx.get(daemon.http + "/api/leases", timeout=30).json() == {
            "ledger": None, "capacity": {}, "leases": []
        }  # fmt: skip
        assert models(daemon)["m"]["lease"] is None
        assert "llamaproc_model_lease_bytes" not in httpx.get(daemon.http + "/metrics", timeout=30).text
