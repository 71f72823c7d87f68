"""The daemon's rpc worker registry, its job log, their metrics and their routes (in process)."""

from __future__ import annotations

from typing import Any

import pytest
from idle_pool import FakePool
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from llamaproc.errors import WorkerUnreachableError
from llamaproc.serve import ServeMetrics, Upstream, create_app
from llamaproc.serve._workers import (
    MISSED_HEARTBEATS,
    JobLog,
    RegistryFullError,
    UnknownWorkerError,
    WorkerEntry,
    WorkerRegistry,
)
from llamaproc.types import Device, Reshard, Shard

GPU = Device("CUDA0", 24 * 2**30, 20 * 2**30)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def registry(**kwargs: Any) -> tuple[WorkerRegistry, Clock]:
    clock = Clock()
    return WorkerRegistry(heartbeat_interval=5.0, clock=clock, **kwargs), clock


# --- the registry ----------------------------------------------------------------------------------


def test_register_lists_and_heartbeats() -> None:
    reg, clock = registry()
    entry = reg.register("10.0.0.2:50052", [GPU], 1.5)
    assert entry.id.startswith("w-") and reg.get(entry.id) is entry and reg.find("10.0.0.2:50052") is entry
    [snap] = reg.snapshot()
    assert snap["address"] == "10.0.0.2:50052" and snap["state"] == "ready" and snap["source"] == "registered"
    assert snap["devices"] == [GPU.to_json()] and snap["cpu_seconds"] == 1.5 and snap["pid"] is None
    assert snap["model"] is None and snap["layers"] is None and snap["heartbeat_age"] == 0.0
    clock.now += 4
    assert reg.snapshot()[0]["heartbeat_age"] == 4.0
    assert reg.heartbeat(entry.id, 2.5) is entry
    assert reg.snapshot()[0]["heartbeat_age"] == 0.0 and entry.cpu_seconds == 2.5
    assert reg.ready() == [entry]


def test_unknown_id() -> None:
    reg, _ = registry()
    with pytest.raises(UnknownWorkerError, match="no worker with id 'nope'") as info:
        reg.heartbeat("nope")
    assert info.value.worker_id == "nope"
    with pytest.raises(UnknownWorkerError):
        reg.evict("nope")


def test_a_silent_registered_worker_is_lost_until_heard_from() -> None:
    reg, clock = registry()
    entry = reg.register("a:1")
    local = reg.register("b:2", source="local", pid=123)
    clock.now += MISSED_HEARTBEATS * 5.0
    assert reg.state(entry) == "ready"  # not yet: exactly three intervals
    clock.now += 0.001
    assert reg.state(entry) == "lost" and reg.ready() == [local]  # a local worker does not heartbeat
    assert [s["state"] for s in reg.snapshot()] == ["lost", "ready"]
    reg.heartbeat(entry.id)
    assert reg.state(entry) == "ready"


def test_assign_and_release() -> None:
    reg, _ = registry()
    a = reg.register("a:1")
    b = reg.register("b:2")
    reg.assign_layout("big", [Shard("a:1", range(0, 10)), Shard("c:3", range(10, 33))])
    assert reg.state(a) == "in use" and a.layers == range(0, 10) and reg.ready() == [b]
    config_only = reg.find("c:3")
    assert config_only is not None and config_only.source == "config" and config_only.model == "big"
    assert reg.describe(config_only)["layers"] == {"start": 10, "stop": 33}
    assert reg.ready(source="config") == []
    reg.release("big")
    assert reg.find("c:3") is None  # only the model knew it
    assert reg.state(a) == "ready" and a.model is None and a.layers is None
    reg.assign(["b:2"], "small")
    assert b.model == "small" and b.layers is None


def test_evict_marks_lost_and_calls_the_hook_once() -> None:
    reg, _ = registry()
    evicted: list[WorkerEntry] = []
    reg.on_evict = evicted.append
    entry = reg.register("a:1", [GPU])
    reg.assign(["a:1"], "big", layers={"a:1": range(0, 4)})
    assert reg.evict(entry.id) is entry
    assert evicted == [entry] and reg.state(entry) == "lost" and entry.model == "big"
    reg.evict(entry.id)
    assert evicted == [entry]
    with pytest.raises(UnknownWorkerError, match="was evicted: register again"):
        reg.heartbeat(entry.id)
    # Registering again brings it back, ready and holding nothing, with the same id.
    again = reg.register("a:1", [GPU], 3.0)
    assert again is entry and reg.state(entry) == "ready" and entry.model is None
    reg.heartbeat(entry.id)


def test_a_failing_eviction_hook_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    reg, _ = registry()

    def broken(entry: WorkerEntry) -> None:
        raise RuntimeError("boom")

    reg.on_evict = broken
    entry = reg.register("a:1")
    reg.evict(entry.id)
    assert reg.state(entry) == "lost"
    assert "the eviction of worker" in caplog.text and "boom" in caplog.text


def test_mark_lost_and_remove() -> None:
    reg, _ = registry()
    entry = reg.register("a:1")
    reg.assign(["a:1"], "big")
    assert reg.mark_lost("a:1") is entry and reg.state(entry) == "lost" and entry.model == "big"
    assert reg.mark_lost("zz:1") is None
    reg.remove(entry.id)
    reg.remove(entry.id)
    assert len(reg) == 0 and reg.find("a:1") is None


def test_lost_workers_are_bounded_oldest_first() -> None:
    reg, clock = registry(max_lost=2)
    entries = [reg.register(f"h{i}:1") for i in range(4)]
    for entry in entries:
        clock.now += 1
        reg.mark_lost(entry.address)
    assert [e.address for e in reg.ready()] == []
    assert [s["address"] for s in reg.snapshot()] == ["h2:1", "h3:1"]


def test_a_full_registry_forgets_lost_workers_first_then_refuses() -> None:
    reg, clock = registry(max_workers=2)
    reg.register("a:1")
    b = reg.register("b:2", source="local")
    clock.now += 100  # a:1 goes silent
    c = reg.register("c:3", source="local")
    assert reg.find("a:1") is None and {e.address for e in reg.ready()} == {"b:2", "c:3"}
    with pytest.raises(RegistryFullError, match="already knows 2 rpc workers"):
        reg.register("d:4")
    reg.register("b:2")  # known: an update needs no room
    assert len(reg) == 2 and reg.find("b:2") is b and reg.find("c:3") is c


def test_ids_are_unique() -> None:
    reg, _ = registry()
    ids = {reg.register(f"h{i}:1").id for i in range(200)}
    assert len(ids) == 200


# --- the job log -----------------------------------------------------------------------------------


def test_job_log() -> None:
    log = JobLog(size=2)
    first = log.start("big", "/v1/chat/completions")
    assert first.to_json()["status"] == "running" and first.to_json()["finished"] is None
    first.set_layout([Shard("a:1", range(0, 33))])
    reshard = Reshard(5, ["a:1"], [Shard("b:2", range(0, 33))], 1.25, 0.5, 0.5, 0.25, "the coordinator exited")
    first.add_reshard(reshard)
    first.finish("done", 12)
    first.finish("failed", 1)  # the first outcome counts
    job = first.to_json()
    assert job["status"] == "done" and job["tokens"] == 12 and job["seconds"] >= 0
    assert job["reshards"] == [reshard.to_json()]
    assert job["layout"] == [{"address": "b:2", "layers": {"start": 0, "stop": 33}}]
    second = log.start("big", "/v1/completions")
    second.add_reshard({"after_tokens": 1, "lost": [], "layout": [], "seconds": 0.1})
    assert second.layout == []
    third = log.start("small", "/v1/completions")
    assert len(log) == 2 and [j["id"] for j in log.snapshot()] == [third.id, second.id]


# --- metrics ----------------------------------------------------------------------------------


def samples(metrics: ServeMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_worker_metrics_follow_the_registry() -> None:
    reg, _ = registry()
    metrics = ServeMetrics()
    metrics.attach_workers(reg)
    a = reg.register("a:1")
    reg.register("b:2")
    reg.assign_layout("big", [Shard("a:1", range(0, 20))])
    assert samples(metrics, "llamaproc_worker_layers") == {(("model", "big"), ("worker", "a:1")): 20.0}
    state = samples(metrics, "llamaproc_worker_state")
    assert state[(("state", "in use"), ("worker", "a:1"))] == 1.0
    assert state[(("state", "ready"), ("worker", "a:1"))] == 0.0
    assert state[(("state", "ready"), ("worker", "b:2"))] == 1.0
    reg.evict(a.id)
    assert samples(metrics, "llamaproc_worker_state")[(("state", "lost"), ("worker", "a:1"))] == 1.0
    reg.remove(a.id)
    assert all(dict(k)["worker"] == "b:2" for k in samples(metrics, "llamaproc_worker_state"))
    assert samples(metrics, "llamaproc_worker_layers") == {}


def test_record_reshard() -> None:
    metrics = ServeMetrics()
    reshard = Reshard(5, ["a:1"], [], 1.5)
    metrics.record_reshard("big", reshard)
    metrics.record_reshard("big", reshard.to_json())
    metrics.record_reshard("big", {"seconds": "bad"})
    assert samples(metrics, "llamaproc_reshards_total") == {(("model", "big"),): 3.0}
    assert samples(metrics, "llamaproc_resume_seconds_count") == {}
    metrics.record_resume("big", reshard)
    metrics.record_resume("big", reshard.to_json())
    metrics.record_resume("big", {"seconds": "bad"})
    assert samples(metrics, "llamaproc_resume_seconds_count") == {(("model", "big"),): 2.0}
    assert samples(metrics, "llamaproc_resume_seconds_sum") == {(("model", "big"),): 3.0}


# --- routes -------------------------------------------------------------------------------------



def client(reg: WorkerRegistry, jobs: JobLog | None = None) -> TestClient:
    app = create_app(FakePool(), client=Upstream(), workers=reg, jobs=jobs)  # type: ignore[arg-type]
    return TestClient(app, base_url="http://127.0.0.1")


def test_routes_register_list_heartbeat_evict() -> None:
    reg, _ = registry()
    evicted: list[str] = []
    reg.on_evict = lambda entry: evicted.append(entry.address)
    with client(reg) as http:
        body = {"address": "Worker.LAN:50052", "devices": [GPU.to_json()], "cpu_seconds": 0.5, "future": 1}
        answer = http.post("/api/workers/register", json=body)
        assert answer.status_code == 200, answer.text
        worker_id = answer.json()["id"]
        assert answer.json() == {"id": worker_id, "heartbeat_interval": 5.0}
        listed = http.get("/api/workers").json()
        assert listed["heartbeat_interval"] == 5.0
        [worker] = listed["workers"]
        assert worker["address"] == "worker.lan:50052" and worker["devices"] == [GPU.to_json()]
        beat = http.post("/api/workers/heartbeat", json={"id": worker_id, "cpu_seconds": 2})
        assert beat.status_code == 200 and reg.get(worker_id).cpu_seconds == 2.0
        gone = http.delete(f"/api/workers/{worker_id}")
        assert gone.status_code == 200 and gone.json()["state"] == "lost" and evicted == ["worker.lan:50052"]
        again = http.post("/api/workers/heartbeat", json={"id": worker_id})
        assert again.status_code == 404 and again.json()["error"]["code"] == "worker_not_found"
        missing = http.delete("/api/workers/nope")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "id"


@pytest.mark.parametrize(
    ("body", "code", "param", "message"),
    [
        (b"not json", "invalid_json", None, "the body must be a JSON object"),
        (b"[1]", "invalid_json", None, "the body must be a JSON object"),
        (b"{}", "bad_request", "address", "address: Field required"),
        (b'{"address": 5}', "bad_request", "address", "address: Input should be a valid string"),
        (b'{"address": "h"}', "bad_request", "address", "address: expected 'host:port'"),
        (b'{"address": "h:0"}', "bad_request", "address", "address: expected 'host:port'"),
        (b'{"address": "h:1", "cpu_seconds": "1"}', "bad_request", "cpu_seconds", "cpu_seconds: Input should be"),
        (b'{"address": "h:1", "cpu_seconds": -1}', "bad_request", "cpu_seconds", "cpu_seconds: Input should be"),
        (b'{"address": "h:1", "cpu_seconds": NaN}', "bad_request", "cpu_seconds", "cpu_seconds: Input should be"),
        (b'{"address": "h:1", "devices": {}}', "bad_request", "devices", "devices: Input should be a valid list"),
        (b'{"address": "h:1", "devices": [{"name": "x", "total": 1}]}', "bad_request", "devices[0].free",
         "devices[0].free: Field required"),
        (b'{"address": "h:1", "devices": [{"name": "x", "total": 1.5, "free": 1}]}', "bad_request",
         "devices[0].total", "devices[0].total: Input should be a valid integer"),
    ],
)  # fmt: skip
def test_register_refuses_bad_bodies(body: bytes, code: str, param: str | None, message: str) -> None:
    reg, _ = registry()
    with client(reg) as http:
        answer = http.post("/api/workers/register", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == (code, param) and error["message"].startswith(message), error
    assert len(reg) == 0


def test_heartbeat_refuses_bad_bodies_and_large_ones() -> None:
    reg, _ = registry()
    with client(reg) as http:
        answer = http.post("/api/workers/heartbeat", json={"cpu_seconds": 1})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "id"
        big = http.post("/api/workers/register", content=b" " * (65 * 1024))
        assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"


def test_the_probe_hook_checks_the_address_and_fills_in_devices() -> None:
    reg, _ = registry()
    probed: list[str] = []

    async def probe(address: str) -> list[Device]:
        probed.append(address)
        if address.startswith("dead"):
            raise WorkerUnreachableError(f"{address}: connection refused", address=address)
        return [GPU]

    reg.probe = probe
    with client(reg) as http:
        dead = http.post("/api/workers/register", json={"address": "dead:1"})
        assert dead.status_code == 400 and dead.json()["error"]["param"] == "address"
        assert "connection refused" in dead.json()["error"]["message"] and len(reg) == 0
        alive = http.post("/api/workers/register", json={"address": "alive:1"})
        assert alive.status_code == 200 and reg.get(alive.json()["id"]).devices == [GPU]
    assert probed == ["dead:1", "alive:1"]


def test_a_full_registry_answers_503() -> None:
    reg, _ = registry(max_workers=1)
    with client(reg) as http:
        assert http.post("/api/workers/register", json={"address": "a:1"}).status_code == 200
        full = http.post("/api/workers/register", json={"address": "b:1"})
        assert full.status_code == 503 and full.json()["error"]["code"] == "too_many_workers"
        assert full.headers["retry-after"] == "60"


def test_jobs_route() -> None:
    reg, _ = registry()
    jobs = JobLog()
    jobs.start("tiny", "/v1/completions").finish("failed", 0)
    with client(reg, jobs) as http:
        [job] = http.get("/api/jobs").json()["jobs"]
    assert job["model"] == "tiny" and job["status"] == "failed"
