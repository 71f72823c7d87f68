"""A real ``llamaproc serve`` with sharded models over real rpc workers.

A model with ``local_workers = 2`` serves completions (whole and streamed)
with its two workers listed in ``/api/workers``; evicting one of them leaves
it serving, Degraded, with one reshard counted; a ``llamaproc worker
--register`` subprocess shows up as a ready worker and a model with
``workers = "registered"`` loads over it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from daemon_helpers import Daemon, running_daemon_checked, running_worker, until, write_config
from prometheus_client.parser import text_string_to_metric_families

from llamaproc.testing import write_tiny_model

pytestmark = pytest.mark.integration

#: A safety net only: every wait below ends as soon as its condition holds.
SAFETY = 120.0


@pytest.fixture(autouse=True)
def no_leftover_servers() -> Iterator[None]:
    """Overrides conftest's per-test check: the module's daemon keeps its children between tests.

    The daemon fixture checks instead that none of them survives the daemon.
    """
    yield


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("sharded")
    model = write_tiny_model(tmp / "layers.gguf", n_layers=8)
    small = {"path": model, "ctx_size": 256, "args": ["--n-predict", "8"]}
    config = write_config(
        tmp / "serve.toml",
        {"local": {**small, "local_workers": 2}, "remote": {**small, "workers": "registered"}},
        max_loaded_models=2,
    )
    with running_daemon_checked(config, tmp / "state") as started:
        yield started


@pytest.fixture(scope="module")
def http(daemon: Daemon) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=daemon.http, timeout=SAFETY) as client:
        yield client


def _complete(http: httpx.Client, model: str) -> dict[str, Any]:
    answer = http.post("/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    return body


def _stream(http: httpx.Client, model: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    body = {"model": model, "prompt": "hello", "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as answer:
        assert answer.status_code == 200, answer.read()
        done = False
        for line in answer.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    assert done and events and "error" not in events[-1]
    return events


def _workers(http: httpx.Client) -> list[dict[str, Any]]:
    answer = http.get("/api/workers")
    assert answer.status_code == 200, answer.text
    workers: list[dict[str, Any]] = answer.json()["workers"]
    return workers


def _model(http: httpx.Client, name: str) -> dict[str, Any]:
    answer = http.get("/api/models")
    assert answer.status_code == 200, answer.text
    return next(m for m in answer.json()["models"] if m["name"] == name)


def _condition(status: dict[str, Any], type_: str) -> str:
    return str(next(c["status"] for c in status["conditions"] if c["type"] == type_))


def _reshards(http: httpx.Client, model: str) -> float:
    text = http.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llamaproc_reshards_total" and sample.labels.get("model") == model:
                return sample.value
    return 0.0


def test_local_workers_serve_and_survive_an_eviction(http: httpx.Client) -> None:
    _complete(http, "local")
    assert len(_stream(http, "local")) >= 1

    local = [w for w in _workers(http) if w["model"] == "local"]
    assert len(local) == 2
    for worker in local:
        assert worker["source"] == "local" and worker["state"] == "in use"
        assert isinstance(worker["pid"], int) and worker["layers"] is not None and worker["devices"]
    status = _model(http, "local")
    assert status["phase"] == "Serving" and _condition(status, "Degraded") == "False"
    assert sorted(s["address"] for s in status["layout"]) == sorted(w["address"] for w in local)
    assert status["lostWorkers"] == []
    layers = sorted((s["layers"]["start"], s["layers"]["stop"]) for s in status["layout"])
    assert layers[0][0] == 0 and layers[0][1] == layers[1][0]  # contiguous, every layer placed

    gone = local[0]
    evicted = http.delete(f"/api/workers/{gone['id']}")
    assert evicted.status_code == 200, evicted.text
    assert evicted.json()["state"] == "lost"

    status = until(
        "the model to reshard onto one worker",
        lambda: s if (s := _model(http, "local"))["lostWorkers"] == [gone["address"]] else None,
    )
    assert status["phase"] == "Serving" and _condition(status, "Degraded") == "True"
    assert [s["address"] for s in status["layout"]] == [local[1]["address"]]
    assert until("the reshard to be counted", lambda: _reshards(http, "local") or None) == 1.0
    survivor = next(w for w in _workers(http) if w["address"] == local[1]["address"])
    assert survivor["state"] == "in use" and survivor["layers"] == status["layout"][0]["layers"]
    _complete(http, "local")
    assert len(_stream(http, "local")) >= 1


def test_a_registered_worker_serves_a_registered_model(daemon: Daemon, http: httpx.Client, tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="503|no registered rpc worker is ready"):
        _complete(http, "remote")  # none registered yet: a clear load error
    with running_worker(tmp_path, "--register", daemon.http) as worker:

        def ready() -> dict[str, Any] | None:
            return next((w for w in _workers(http) if w["address"] == worker.address and w["state"] == "ready"),
                        None)  # fmt: skip

        registered = until("the worker to register", ready)
        assert registered["source"] == "registered" and registered["devices"]
        body = until("the model to load over the worker", lambda: _load_remote(http))
        assert body["choices"][0]["text"] is not None
        entry = next(w for w in _workers(http) if w["address"] == worker.address)
        assert entry["state"] == "in use" and entry["model"] == "remote"
        assert [s["address"] for s in _model(http, "remote")["layout"]] == [worker.address]
        assert http.post("/api/models/remote/unload").status_code == 200
    assert worker.process.returncode == 0, worker.stderr()


def _load_remote(http: httpx.Client) -> dict[str, Any] | None:
    """Load ``remote`` (which also resets it after the failed loads above) and complete; None if it failed."""
    loaded = http.post("/api/models/remote/load")
    if loaded.status_code == 503:
        return None
    assert loaded.status_code == 200, loaded.text
    return _complete(http, "remote")


def test_the_daemon_log_is_clean(daemon: Daemon) -> None:
    assert daemon.returncode is None
    assert "Traceback" not in daemon.stderr()
