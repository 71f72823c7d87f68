"""The rpc worker routes of a real ``llamaproc serve``: register, list, heartbeat, evict, the job log,
the metrics, the key gate, and ``register_and_heartbeat`` talking to it.

The daemon probes a registering worker (a real RPC exchange), so the
addresses registered are those of real rpc-servers (``llamaproc worker``
subprocesses). The model file is never loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from daemon_helpers import Daemon, running_daemon, running_worker, write_config
from prometheus_client.parser import text_string_to_metric_families

from llamaproc.cli._register import register_and_heartbeat
from llamaproc.types import Device

pytestmark = pytest.mark.integration

KEY = "worker-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
GPU = Device("CUDA0", 8 * 2**30, 6 * 2**30)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("workers")
    model = tmp / "unused.gguf"
    model.write_bytes(b"GGUF, never loaded\n")
    config = write_config(tmp / "serve.toml", {"tiny": {"path": model}}, api_keys=[KEY])
    with running_daemon(config, tmp / "state") as started:
        yield started
    assert started.returncode == 0, started.stderr()


@pytest.fixture(scope="module")
def rpc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """The addresses of three running rpc workers."""
    tmp = tmp_path_factory.mktemp("rpc")
    with running_worker(tmp) as a, running_worker(tmp) as b, running_worker(tmp) as c:
        yield [a.address, b.address, c.address]


@pytest.fixture
def http(daemon: Daemon) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=daemon.http, headers=AUTH, timeout=30) as client:
        yield client


def _workers(http: httpx.Client) -> dict[str, dict[str, Any]]:
    answer = http.get("/api/workers")
    assert answer.status_code == 200, answer.text
    return {w["address"]: w for w in answer.json()["workers"]}


def test_register_list_heartbeat_evict(http: httpx.Client, rpc: list[str]) -> None:
    address = rpc[0]
    body = {"address": address, "devices": [GPU.to_json()], "cpu_seconds": 0.25}
    registered = http.post("/api/workers/register", json=body)
    assert registered.status_code == 200, registered.text
    worker_id = registered.json()["id"]
    assert registered.json()["heartbeat_interval"] > 0
    worker = _workers(http)[address]
    assert worker["id"] == worker_id and worker["state"] == "ready" and worker["source"] == "registered"
    assert worker["devices"] == [GPU.to_json()] and worker["cpu_seconds"] == 0.25

    beat = http.post("/api/workers/heartbeat", json={"id": worker_id, "cpu_seconds": 1.0})
    assert beat.status_code == 200 and beat.json()["id"] == worker_id
    assert _workers(http)[address]["cpu_seconds"] == 1.0

    evicted = http.delete(f"/api/workers/{worker_id}")
    assert evicted.status_code == 200 and evicted.json()["state"] == "lost"
    assert _workers(http)[address]["state"] == "lost"
    refused = http.post("/api/workers/heartbeat", json={"id": worker_id})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "worker_not_found"
    assert http.delete(f"/api/workers/{worker_id}x").status_code == 404

    again = http.post("/api/workers/register", json=body)
    assert again.status_code == 200 and again.json()["id"] == worker_id
    assert _workers(http)[address]["state"] == "ready"


@pytest.mark.parametrize(
    ("path", "body", "code", "param"),
    [
        ("/api/workers/register", b"{", "invalid_json", None),
        ("/api/workers/register", b'{"address": "no-port"}', "bad_request", "address"),
        ("/api/workers/register", b'{"address": "h:1", "devices": [{"name": 1}]}', "bad_request", "devices[0].name"),
        ("/api/workers/heartbeat", b'{"cpu_seconds": 1}', "bad_request", "id"),
        ("/api/workers/heartbeat", b'{"id": "w-1", "cpu_seconds": "1"}', "bad_request", "cpu_seconds"),
    ],
)
def test_bad_bodies(http: httpx.Client, path: str, body: bytes, code: str, param: str | None) -> None:
    answer = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error


def test_the_routes_need_the_key(daemon: Daemon) -> None:
    with httpx.Client(base_url=daemon.http, timeout=30) as anonymous:
        for method, path in (
            ("GET", "/api/workers"),
            ("POST", "/api/workers/register"),
            ("POST", "/api/workers/heartbeat"),
            ("DELETE", "/api/workers/w-1"),
            ("GET", "/api/jobs"),
        ):
            answer = anonymous.request(method, path, json={"address": "h:1"})
            assert answer.status_code == 401, (method, path)
            assert answer.json()["error"]["code"] == "invalid_api_key"


def test_jobs_and_metrics(http: httpx.Client, rpc: list[str]) -> None:
    assert http.get("/api/jobs").json() == {"jobs": []}
    registered = http.post("/api/workers/register", json={"address": rpc[2]})
    worker_id = registered.json()["id"]
    states = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "llamaproc_worker_state" and sample.labels["worker"] == rpc[2]:
                states[sample.labels["state"]] = sample.value
    assert states == {"ready": 1.0, "in use": 0.0, "lost": 0.0}
    http.delete(f"/api/workers/{worker_id}")


def test_a_worker_that_does_not_answer_is_refused(http: httpx.Client, tmp_path: Path) -> None:
    with running_worker(tmp_path) as worker:
        address = worker.address
    refused = http.post("/api/workers/register", json={"address": address})  # nothing listens there any more
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "address" and address in refused.json()["error"]["message"]
    assert address not in _workers(http)


async def _until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(30):
        while not condition():
            await anyio.sleep(0.05)


def test_register_and_heartbeat_against_the_daemon(daemon: Daemon, http: httpx.Client, rpc: list[str]) -> None:
    address = rpc[1]
    cpu = iter(range(1, 10**6))

    def listed() -> dict[str, Any] | None:
        return _workers(http).get(address)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: register_and_heartbeat(
                    daemon.http,
                    api_key=KEY,
                    address=address,
                    devices=[GPU],
                    cpu_seconds=lambda: float(next(cpu)),
                    interval=0.05,
                )
            )
            await _until(lambda: (w := listed()) is not None and (w["cpu_seconds"] or 0) >= 3)  # heartbeats
            first = listed()
            assert first is not None and first["devices"] == [GPU.to_json()]
            # Evicted: its next heartbeat is refused, it registers again and is ready again, same id.
            assert http.delete(f"/api/workers/{first['id']}").status_code == 200
            seen = first["cpu_seconds"]
            await _until(lambda: (w := listed()) is not None and w["state"] == "ready" and w["cpu_seconds"] > seen)
            again = listed()
            assert again is not None and again["id"] == first["id"]
            tg.cancel_scope.cancel()

    anyio.run(main)
    http.delete(f"/api/workers/{_workers(http)[address]['id']}")


def test_the_daemon_log_is_clean(daemon: Daemon) -> None:
    assert daemon.returncode is None
    assert "Traceback" not in daemon.stderr()
