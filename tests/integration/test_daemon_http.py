"""``llamaproc serve`` over HTTP: the daemon runs as a real subprocess with real llama-server children."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import psutil
import pytest
from daemon_helpers import Daemon, llama_servers_of, running_daemon, start_daemon, stop_daemon, write_config

from llamaproc.testing import write_tiny_model

pytestmark = pytest.mark.integration

LONG = 1200  # tokens of a "long" stream: about a second on the tiny model


@pytest.fixture(autouse=True)
def no_leftover_servers() -> Iterator[None]:
    """Overrides conftest's per-test check: a daemon shared by the tests of this module keeps its children.

    Each daemon fixture checks instead that no llama-server survives its daemon.
    """
    yield


def _stop_and_check(daemon: Daemon) -> None:
    servers = llama_servers_of(daemon.pid)
    code = stop_daemon(daemon)
    assert code == 0, daemon.stderr()
    _assert_gone(servers)
    assert not (daemon.state_dir / "serve.json").exists()
    assert not (daemon.state_dir / "serve.pid").exists()
    if daemon.socket:
        assert not Path(daemon.socket).exists()


def _assert_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 30  # a wait for the exits, not a bound
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        time.sleep(0.05)
    for pid in alive:
        psutil.Process(pid).kill()
    assert not alive, f"llama-server left running: {alive}"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_embedding_model: Path, backend: Any
) -> Iterator[Daemon]:
    """One daemon for the tests that do not change its configuration."""
    tmp = tmp_path_factory.mktemp("shared")
    config = write_config(
        tmp / "serve.toml",
        {
            "tiny": {"path": tiny_model, "parallel": 2, "ctx_size": 4096},
            "lazy": {"path": tiny_model},
            "emb": {"path": tiny_embedding_model, "embeddings": True},
        },
        max_loaded_models=3,
    )
    daemon = start_daemon(config, tmp / "state")
    try:
        yield daemon
    finally:
        _stop_and_check(daemon)


def _models(daemon: Daemon) -> dict[str, dict[str, Any]]:
    answer = httpx.get(daemon.http + "/api/models", timeout=10)
    answer.raise_for_status()
    return {m["name"]: m for m in answer.json()["models"]}


def _wait_for(predicate: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _complete(daemon: Daemon, model: str, *, max_tokens: int = 4, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": "hello", "max_tokens": max_tokens, **extra}
    return httpx.post(daemon.http + "/v1/completions", json=body, timeout=60)


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 if absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        sample, _, value = line.rpartition(" ")
        if sample.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in sample for k, v in labels.items()):
            return float(value)
    return 0.0


@dataclass
class StreamResult:
    status: int
    headers: httpx.Headers
    texts: list[str] = field(default_factory=list)
    done: bool = False
    error: Any = None
    body: Any = None


async def _stream(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    *,
    first: anyio.Event | None = None,
) -> StreamResult:
    """POST a streaming request and read it to the end, as an OpenAI client would."""
    async with client.stream("POST", url, json={**body, "stream": True}) as response:
        result = StreamResult(response.status_code, response.headers)
        if response.status_code != 200:
            result.body = json.loads(await response.aread())
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                result.done = True
                continue
            event = json.loads(data)
            if "error" in event:
                result.error = event["error"]
                continue
            choice = event["choices"][0]
            text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
            if text is not None and choice.get("finish_reason") is None:  # one event per token
                result.texts.append(text)
                if first is not None:
                    first.set()
    return result


def _long(model: str) -> dict[str, Any]:
    return {"model": model, "prompt": "once upon a time", "max_tokens": LONG, "ignore_eos": True}


# --- the OpenAI API ----------------------------------------------------------------------------


def test_openai_client_round_trip(shared: Daemon) -> None:
    client = openai.OpenAI(base_url=shared.http + "/v1", api_key="unused", max_retries=0)
    messages: Any = [{"role": "user", "content": "Say hello"}]

    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert reply.model == "tiny"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0

    chunks = list(
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True)
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content  # greedy: the same text either way
    assert all(c.model == "tiny" for c in chunks)

    completion = client.completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0)
    assert completion.model == "tiny" and completion.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0, stream=True)
        if c.choices
    )
    assert streamed == completion.choices[0].text

    embeddings = client.embeddings.create(model="emb", input=["first text", "second text"])
    assert [e.index for e in embeddings.data] == [0, 1]
    assert len(embeddings.data[0].embedding) == 64
    assert embeddings.data[0].embedding != embeddings.data[1].embedding

    assert {m.id for m in client.models.list()} == {"tiny", "lazy", "emb"}

    with pytest.raises(openai.NotFoundError) as excinfo:
        client.chat.completions.create(model="nope", messages=messages, max_tokens=4)
    assert excinfo.value.status_code == 404
    assert excinfo.value.code == "model_not_found"
    assert "nope" in excinfo.value.message


def test_stream_headers_and_model_field(shared: Daemon) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", shared.http + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["cache-control"] == "no-cache"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert events and all(e["model"] == "tiny" for e in events)


def test_on_demand_load_then_reuse(shared: Daemon) -> None:
    before = _models(shared)["lazy"]
    assert not before["loaded"] and before["pid"] is None and before["phase"] == "Pending"
    servers = set(llama_servers_of(shared.pid))

    assert _complete(shared, "lazy").status_code == 200
    first = _models(shared)["lazy"]
    assert first["loaded"] and first["phase"] == "Serving" and first["pid"] is not None
    assert first["lastUsed"] is not None
    spawned = set(llama_servers_of(shared.pid)) - servers
    assert spawned == {first["pid"]}

    for _ in range(3):
        assert _complete(shared, "lazy").status_code == 200
    again = _models(shared)["lazy"]
    assert again["pid"] == first["pid"] and again["restarts"] == 0
    assert set(llama_servers_of(shared.pid)) - servers == spawned  # no second spawn


def test_management_routes(shared: Daemon) -> None:
    assert httpx.get(shared.http + "/health").json()["status"] == "ok"
    loaded = httpx.post(shared.http + "/api/models/emb/load", timeout=60)
    assert loaded.status_code == 200 and loaded.json()["loaded"] is True
    pid = loaded.json()["pid"]
    unloaded = httpx.post(shared.http + "/api/models/emb/unload", timeout=60)
    assert unloaded.status_code == 200 and unloaded.json()["loaded"] is False
    _assert_gone([pid])
    missing = httpx.post(shared.http + "/api/models/nope/load")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    model = httpx.get(shared.http + "/v1/models/tiny")
    assert model.status_code == 200 and model.json()["id"] == "tiny"
    status = _models(shared)["tiny"]
    keys = ("phase", "conditions", "pid", "port", "inFlight", "queued", "lastUsed", "restarts", "generation",
            "observedGeneration", "roles")  # fmt: skip
    for key in keys:
        assert key in status
    assert [c["type"] for c in status["conditions"]] == [
        "Available", "Progressing", "Failed", "UpdateInProgress", "Degraded"
    ]  # fmt: skip
    assert all("lastTransitionTime" in c for c in status["conditions"])


def test_bad_requests_are_refused_and_the_daemon_keeps_serving(shared: Daemon) -> None:
    url = shared.http + "/v1/chat/completions"
    headers = {"content-type": "application/json"}

    def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
        assert response.status_code == status, response.text
        error: dict[str, Any] = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        return error

    assert error_of(httpx.post(url, content=b"{not json", headers=headers), 400)["code"] == "invalid_json"
    assert error_of(httpx.post(url, content=b"[1, 2]", headers=headers), 400)["code"] == "invalid_json"
    assert error_of(httpx.post(url, content=b"", headers=headers), 400)["code"] == "invalid_json"
    assert error_of(httpx.post(url, json={"messages": []}), 400)["param"] == "model"
    assert error_of(httpx.post(url, json={"model": "tiny"}), 400)["param"] == "messages"
    assert error_of(httpx.post(url, json={"model": "tiny", "messages": "hi"}), 400)["param"] == "messages"
    assert error_of(httpx.post(url, json={"model": 3, "messages": []}), 400)["param"] == "model"
    assert error_of(httpx.post(url, json={"model": "tiny", "messages": []}), 400)["param"] == "messages"
    for bad in ({"stream": "yes"}, {"max_tokens": "8"}, {"max_tokens": -2}, {"temperature": "hot"}, {"stop": [1]}):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **bad}
        error = error_of(httpx.post(url, json=body), 400)
        assert (error["code"], error["param"]) == ("bad_request", next(iter(bad)))
    hi = [{"role": "user", "content": "hi"}]
    missing = error_of(httpx.post(url, json={"model": "nope", "messages": hi}), 404)
    assert (missing["code"], missing["param"]) == ("model_not_found", "model")
    huge = error_of(httpx.post(url, json={"model": "n" * 100_000, "messages": hi}), 404)
    assert len(huge["message"]) < 1000  # the name is not echoed back whole
    # llama-server's own validation errors come back in the daemon's shape, with llama-server's status
    upstream = httpx.post(url, json={"model": "tiny", "messages": [{"role": "user"}], "max_tokens": 2}, timeout=30)
    assert 400 <= upstream.status_code < 500
    error = upstream.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "bad_request" and error["message"].startswith("model 'tiny': llama-server answered")

    big = b'{"model": "tiny", "messages": [], "pad": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    assert error_of(httpx.post(url, content=big, headers=headers, timeout=30), 413)["code"] == "body_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is counted while reading
        yield b'{"model": "tiny", "messages": [], "pad": "'
        for _ in range(80):
            yield b"x" * 65536
        yield b'"}'

    try:
        response = httpx.post(url, content=chunked(), headers=headers, timeout=30)
    except httpx.HTTPError:  # the daemon may answer and close before the upload ends
        pass
    else:
        assert error_of(response, 413)["code"] == "body_too_large"

    assert error_of(httpx.get(url), 405)["code"] == "method_not_allowed"
    assert error_of(httpx.get(shared.http + "/nowhere"), 404)["code"] == "not_found"

    assert _complete(shared, "tiny").status_code == 200


def test_metrics_after_requests(shared: Daemon) -> None:
    assert _complete(shared, "tiny", max_tokens=5).status_code == 200
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", shared.http + "/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        response.read()
    httpx.post(shared.http + "/v1/completions", json={"model": "nope", "prompt": "x"})
    response = httpx.get(shared.http + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert _metric(text, "llamaproc_requests_total", model="tiny", api="http", status="200") >= 2
    assert _metric(text, "llamaproc_requests_total", model="(unknown)", status="404") >= 1
    assert _metric(text, "llamaproc_generated_tokens_total", model="tiny", api="http") >= 10
    assert _metric(text, "llamaproc_request_duration_seconds_count", model="tiny", api="http") >= 2
    assert _metric(text, "llamaproc_time_to_first_token_seconds_count", model="tiny") >= 2
    assert _metric(text, "llamaproc_loads_total") >= 1
    assert _metric(text, "llamaproc_model_loaded", model="tiny") == 1
    # One 0/1 series per phase and model.
    phases = {
        p: _metric(text, "llamaproc_model_phase", model="tiny", phase=p)
        for p in ("Pending", "Loading", "Serving", "Failed")
    }
    assert phases == {"Pending": 0, "Loading": 0, "Serving": 1, "Failed": 0}
    assert sum('llamaproc_model_phase{model="tiny",' in line for line in text.splitlines()) == 4
    for name in (
        "llamaproc_model_queue_depth",
        "llamaproc_model_in_flight",
        "llamaproc_evictions_total",
        "llamaproc_restarts_total",
        "llamaproc_model_restarts_total",
        "llamaproc_loaded_models",
    ):
        assert f"\n{name}" in text, name


def test_no_fd_or_rss_growth_over_100_requests(shared: Daemon) -> None:
    daemon = psutil.Process(shared.pid)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}

    def one(client: httpx.Client, i: int) -> None:
        if i % 2:
            with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as response:
                assert response.status_code == 200
                assert response.read().rstrip().endswith(b"data: [DONE]")
        else:
            assert client.post("/v1/chat/completions", json=chat).status_code == 200

    with httpx.Client(base_url=shared.http, timeout=30) as client:
        for i in range(30):  # warm-up: caches, connection pools, allocator arenas
            one(client, i)
        fds, rss = daemon.num_fds(), daemon.memory_info().rss
        for i in range(100):
            one(client, i)
        assert abs(daemon.num_fds() - fds) <= 2, (fds, daemon.num_fds())
        growth = daemon.memory_info().rss - rss
        assert growth < 5 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB"


def test_no_fd_leak_over_unload_and_reload_rounds(shared: Daemon) -> None:
    """Kept-alive connections to children that were stopped are closed, not left in CLOSE_WAIT."""
    daemon = psutil.Process(shared.pid)
    assert _complete(shared, "lazy").status_code == 200
    fds = daemon.num_fds()
    for _ in range(10):
        assert httpx.post(shared.http + "/api/models/lazy/unload", timeout=60).status_code == 200
        assert _complete(shared, "lazy").status_code == 200

    def close_wait() -> list[Any]:
        return [c for c in daemon.net_connections("tcp") if c.status == psutil.CONN_CLOSE_WAIT]

    # Idle connections are swept within about keepalive_expiry (2 s). Only growth counts: other
    # tests' idle connections may expire meanwhile and lower the count.
    try:
        _wait_for(lambda: daemon.num_fds() <= fds + 2 and not close_wait(), timeout=6, what="stale connections to go")
    except AssertionError:
        raise AssertionError(f"fds {fds} -> {daemon.num_fds()}; in CLOSE_WAIT: {close_wait()}") from None


def test_second_serve_is_refused(shared: Daemon) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llamaproc", "serve", "--config", str(shared.config), "--port", "0"]
        + ["--state-dir", str(shared.state_dir)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert str(shared.pid) in result.stderr
    assert "already running" in result.stderr
    assert httpx.get(shared.http + "/health").status_code == 200  # the first one is untouched


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llamaproc", "serve", *args], check=False, capture_output=True, text=True, timeout=60
    )


def test_start_up_errors_say_what_failed(tmp_path: Path, tiny_model: Path) -> None:
    config = str(write_config(tmp_path / "serve.toml", {"tiny": {"path": tiny_model}}))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _serve("--config", config, "--port", str(port), "--state-dir", str(tmp_path / "s1"))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in use" in result.stderr
    assert "Traceback" not in result.stderr

    missing = tmp_path / "nowhere" / "serve.sock"
    result = _serve("--config", config, "--port", "0", "--state-dir", str(tmp_path / "s2"), "--socket", str(missing))
    assert result.returncode == 1
    assert f"cannot listen on socket {missing}" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr

    not_a_socket = tmp_path / "file.sock"
    not_a_socket.write_text("a regular file")
    result = _serve(
        "--config", config, "--port", "0", "--state-dir", str(tmp_path / "s3"), "--socket", str(not_a_socket)
    )
    assert result.returncode == 1
    assert f"cannot listen on socket {not_a_socket}" in result.stderr and "not a socket" in result.stderr
    assert "Traceback" not in result.stderr
    assert not_a_socket.read_text() == "a regular file"
    for state in ("s1", "s2", "s3"):
        assert not (tmp_path / state / "serve.pid").exists() and not (tmp_path / state / "serve.json").exists()


def test_config_error_exits_2_naming_file_and_key(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path / "bad.toml", {"tiny": {"path": tiny_model, "paralel": 2}})
    result = subprocess.run(
        [sys.executable, "-m", "llamaproc", "serve", "--config", str(config), "--port", "0"]
        + ["--state-dir", str(tmp_path / "state")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert str(config) in result.stderr and "models.tiny" in result.stderr and "paralel" in result.stderr
    assert not (tmp_path / "state" / "serve.pid").exists()


# --- pool behaviour through the daemon ----------------------------------------------------------


@pytest.fixture(scope="module")
def lru(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_embedding_model: Path, backend: Any
) -> Iterator[Daemon]:
    """max_loaded_models = 1 with two models."""
    tmp = tmp_path_factory.mktemp("lru")
    config = write_config(
        tmp / "serve.toml",
        {"a": {"path": tiny_model, "ctx_size": 4096}, "b": {"path": tiny_embedding_model, "ctx_size": 4096}},
        max_loaded_models=1,
    )
    daemon = start_daemon(config, tmp / "state")
    try:
        yield daemon
    finally:
        _stop_and_check(daemon)


def test_lru_with_one_loaded_model(lru: Daemon) -> None:
    assert _complete(lru, "a").status_code == 200
    models = _models(lru)
    assert models["a"]["loaded"] and not models["b"]["loaded"]
    pid_a = models["a"]["pid"]

    assert _complete(lru, "b").status_code == 200
    models = _models(lru)
    assert models["b"]["loaded"] and not models["a"]["loaded"]
    _assert_gone([pid_a])
    assert llama_servers_of(lru.pid) == [models["b"]["pid"]]

    assert _complete(lru, "a").status_code == 200
    models = _models(lru)
    assert models["a"]["loaded"] and not models["b"]["loaded"]
    assert len(llama_servers_of(lru.pid)) == 1
    assert _metric(httpx.get(lru.http + "/metrics").text, "llamaproc_evictions_total") >= 2


@pytest.mark.anyio
async def test_busy_model_is_not_evicted(lru: Daemon) -> None:
    async with httpx.AsyncClient(base_url=lru.http, timeout=60) as client:
        assert (await client.post("/v1/completions", json={**_long("a"), "max_tokens": 2})).status_code == 200
        results: dict[str, Any] = {}
        first = anyio.Event()

        async def stream_a() -> None:
            results["a"] = await _stream(client, "/v1/completions", _long("a"), first=first)

        async def request_b() -> None:
            response = await client.post("/v1/completions", json={"model": "b", "prompt": "hi", "max_tokens": 4})
            results["b"] = response

        async def models() -> dict[str, dict[str, Any]]:
            return {m["name"]: m for m in (await client.get("/api/models")).json()["models"]}

        async with anyio.create_task_group() as tg:
            tg.start_soon(stream_a)
            await first.wait()
            tg.start_soon(request_b)
            with anyio.fail_after(30):  # b is admitted, and waits for room
                while (await models())["b"]["inFlight"] != 1:
                    await anyio.sleep(0.02)
            a = (await models())["a"]
            assert a["loaded"] and a["inFlight"] == 1  # still streaming, not evicted
            assert "b" not in results  # waits for room

        a_result: StreamResult = results["a"]
        assert a_result.status == 200 and a_result.done and a_result.error is None
        assert len(a_result.texts) == LONG  # the stream completed intact
        assert results["b"].status_code == 200
        # b's request ended after a's (the daemon's own record of when each model was last used).
        after = await models()
        assert datetime.fromisoformat(after["b"]["lastUsed"]) > datetime.fromisoformat(after["a"]["lastUsed"])


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with a context long enough for a stream of tens of seconds."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "long.gguf", context_length=32768)


@pytest.fixture
def narrow(tmp_path: Path, long_model: Path, backend: Any) -> Iterator[Daemon]:
    """One slot and one queue place."""
    config = write_config(
        tmp_path / "serve.toml", {"tiny": {"path": long_model, "ctx_size": 32768}}, queue_size=1, preload=["tiny"]
    )
    with running_daemon(config, tmp_path / "state") as daemon:
        _wait_for(lambda: _models(daemon)["tiny"]["phase"] == "Serving", what="preload")
        yield daemon
        _stop_and_check(daemon)


@pytest.mark.anyio
async def test_queue_full_gets_429_and_nothing_is_lost(narrow: Daemon) -> None:
    async with httpx.AsyncClient(base_url=narrow.http, timeout=60) as client:
        results: dict[int, StreamResult] = {}
        first = anyio.Event()

        async def run(i: int, first: anyio.Event | None = None) -> None:
            results[i] = await _stream(client, "/v1/completions", _long("tiny"), first=first)

        async def queued() -> int:
            return int((await client.get("/api/models")).json()["models"][0]["queued"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, 1, first)
            await first.wait()  # 1 holds the slot
            tg.start_soon(run, 2)
            with anyio.fail_after(30):
                while await queued() != 1:  # 2 waits in the queue
                    await anyio.sleep(0.02)
            await run(3)  # no room left: refused at once

        refused = results[3]
        assert refused.status == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.body["error"]["code"] == "queue_full"
        for i in (1, 2):
            assert results[i].status == 200 and results[i].done and results[i].error is None
            assert len(results[i].texts) == LONG


@pytest.mark.anyio
async def test_client_disconnect_frees_the_slot_and_leaves_the_queue(narrow: Daemon) -> None:
    async def status() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=narrow.http) as c:
            models: list[dict[str, Any]] = (await c.get("/api/models")).json()["models"]
            return models[0]

    body = {**_long("tiny"), "max_tokens": 100_000, "stream": True}
    async with (
        httpx.AsyncClient(base_url=narrow.http, timeout=60) as holder,
        holder.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.aiter_lines()  # kept: dropping the iterator would close the connection
        await lines.__anext__()  # generating
        async with httpx.AsyncClient(base_url=narrow.http, timeout=60) as waiter, anyio.create_task_group() as tg:

            async def wait_for_the_slot() -> None:
                await waiter.post("/v1/completions", json={**body, "stream": False})

            tg.start_soon(wait_for_the_slot)
            with anyio.fail_after(30):  # the second request waits in the queue
                while (await status())["queued"] != 1:
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()  # and its client goes away
        with anyio.fail_after(30):  # the queued request left the queue
            while (await status())["queued"] != 0:
                await anyio.sleep(0.02)
        assert (await status())["inFlight"] == 1
    with anyio.fail_after(30):  # the stream's client went away: the slot is free again
        while (await status())["inFlight"] != 0:
            await anyio.sleep(0.02)
    async with httpx.AsyncClient(base_url=narrow.http, timeout=60) as client:
        response = await client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4})
        assert response.status_code == 200


def test_crash_of_a_child_is_restarted(tmp_path: Path, long_model: Path, backend: Any) -> None:
    config = write_config(
        tmp_path / "serve.toml",
        {"tiny": {"path": long_model, "ctx_size": 32768}},
        preload=["tiny"],
        restart_backoff="500ms",
    )
    with running_daemon(config, tmp_path / "state") as daemon:
        old = _wait_for(lambda: (m := _models(daemon)["tiny"])["phase"] == "Serving" and m, what="preload")
        assert old["restarts"] == 0
        results: dict[str, StreamResult] = {}

        async def stream_and_kill() -> None:
            async with httpx.AsyncClient(base_url=daemon.http, timeout=60) as client:
                first = anyio.Event()

                async def run() -> None:
                    body = {**_long("tiny"), "max_tokens": 20_000}
                    results["stream"] = await _stream(client, "/v1/completions", body, first=first)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(run)
                    await first.wait()
                    os.kill(old["pid"], signal.SIGKILL)  # mid-stream

        anyio.run(stream_and_kill)
        cut = results["stream"]
        assert cut.status == 200 and not cut.done  # no [DONE]: the client sees the failure
        assert cut.error is not None and "exited" in cut.error["message"]

        phases = set()

        def restarted() -> Any:
            model = _models(daemon)["tiny"]
            phases.add(model["phase"])
            return model["phase"] == "Serving" and model["pid"] != old["pid"] and model

        new = _wait_for(restarted, what="restart")
        assert phases <= {"Loading", "Serving"}  # never Failed or Pending on the way
        assert new["restarts"] >= 1 and new["loaded"]
        available = next(c for c in new["conditions"] if c["type"] == "Available")
        assert (available["status"], available["reason"]) == ("True", "MinimumReplicasAvailable")
        (replica,) = new["roles"][0]["replicaStatuses"]
        assert replica["restarts"] >= 1 and "exited" in replica["lastError"]  # crashed, then loaded again
        assert _complete(daemon, "tiny").status_code == 200
        assert _metric(httpx.get(daemon.http + "/metrics").text, "llamaproc_restarts_total") >= 1
        _stop_and_check(daemon)


def test_restart_limit_marks_the_model_failed(tmp_path: Path, tiny_model: Path, backend: Any) -> None:
    config = write_config(
        tmp_path / "serve.toml",
        {"tiny": {"path": tiny_model, "ctx_size": 512}},
        preload=["tiny"],
        restart_backoff="100ms",
        max_restarts=1,
    )
    with running_daemon(config, tmp_path / "state") as daemon:
        killed: list[int] = []
        for _ in range(2):  # one restart is allowed, the second crash is one too many
            model = _wait_for(
                lambda: (m := _models(daemon)["tiny"])["phase"] == "Serving" and m["pid"] not in killed and m,
                what="the model to serve",
            )
            os.kill(model["pid"], signal.SIGKILL)
            killed.append(model["pid"])
        failed = _wait_for(lambda: (m := _models(daemon)["tiny"])["phase"] == "Failed" and m, what="Failed")
        assert failed["restarts"] == 1 and failed["pid"] is None and not failed["loaded"]
        conditions = {c["type"]: c for c in failed["conditions"]}
        assert conditions["Failed"]["status"] == "True" and conditions["Failed"]["reason"] == "TooManyRestarts"
        assert llama_servers_of(daemon.pid) == []

        refused = _complete(daemon, "tiny")
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert error["code"] == "model_unavailable" and "failed after more than 1 restarts" in error["message"]
        time.sleep(0.3)  # past the moment a next restart would come (a backoff of 100 ms, doubled)
        assert _models(daemon)["tiny"]["phase"] == "Failed"  # stays Failed
        assert _metric(httpx.get(daemon.http + "/metrics").text, "llamaproc_model_phase", model="tiny",
                       phase="Failed") == 1  # fmt: skip

        loaded = httpx.post(daemon.http + "/api/models/tiny/load", timeout=60)  # an explicit load resets it
        assert loaded.status_code == 200 and loaded.json()["phase"] == "Serving"
        assert _complete(daemon, "tiny").status_code == 200
        _stop_and_check(daemon)


def test_idle_model_is_unloaded(tmp_path: Path, tiny_model: Path, backend: Any) -> None:
    config = write_config(tmp_path / "serve.toml", {"tiny": {"path": tiny_model}}, idle_timeout="1s")
    with running_daemon(config, tmp_path / "state") as daemon:
        assert _complete(daemon, "tiny").status_code == 200
        pid = _models(daemon)["tiny"]["pid"]
        assert pid is not None
        _wait_for(lambda: not _models(daemon)["tiny"]["loaded"], what="idle unload")
        _assert_gone([pid])
        assert _metric(httpx.get(daemon.http + "/metrics").text, "llamaproc_idle_unloads_total") >= 1
        assert _complete(daemon, "tiny").status_code == 200  # and loads again on demand
        _stop_and_check(daemon)


# --- graceful stop -----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("sig", "loop"), [(signal.SIGTERM, "uvloop"), (signal.SIGTERM, "asyncio"), (signal.SIGINT, "uvloop")]
)
async def test_signal_during_a_stream_drains_then_exits(
    tmp_path: Path, tiny_model: Path, backend: Any, sig: signal.Signals, loop: str
) -> None:
    """SIGTERM or SIGINT: the stream completes, new requests are refused, exit 0, nothing left.
    Also the daemon on plain asyncio, as where uvloop is not installed (LLAMAPROC_UVLOOP=0)."""
    config = write_config(tmp_path / "serve.toml", {"tiny": {"path": tiny_model, "ctx_size": 4096}})
    env = {"LLAMAPROC_UVLOOP": "1" if loop == "uvloop" else "0"}
    daemon = start_daemon(config, tmp_path / "state", env=env)
    try:
        assert f"({loop} event loop)" in daemon.stderr()
        async with httpx.AsyncClient(base_url=daemon.http, timeout=60) as client:
            first = anyio.Event()
            results: dict[str, StreamResult] = {}

            async def run() -> None:
                results["stream"] = await _stream(client, "/v1/completions", _long("tiny"), first=first)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await first.wait()
                servers = llama_servers_of(daemon.pid)
                assert len(servers) == 1
                os.kill(daemon.pid, sig)
                async with httpx.AsyncClient(base_url=daemon.http, timeout=10) as other:
                    with anyio.fail_after(30):  # the daemon has seen the signal
                        while not (await other.get("/api/models")).json()["draining"]:
                            await anyio.sleep(0.02)
                    refused = await other.post(
                        "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}
                    )
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "shutting_down"
        stream = results["stream"]
        assert stream.status == 200 and stream.done and stream.error is None
        assert len(stream.texts) == LONG
        with anyio.fail_after(30):
            while daemon.process.poll() is None:
                await anyio.sleep(0.05)
        assert daemon.returncode == 0, daemon.stderr()
        assert f"{sig.name} received" in daemon.stderr() and "Traceback" not in daemon.stderr()
        _assert_gone(servers)
        for name in ("serve.json", "serve.pid", "serve.sock"):
            assert not (daemon.state_dir / name).exists(), name
    finally:
        if daemon.process.poll() is None:
            stop_daemon(daemon)


def _socket_stream(path: str, request: dict[str, Any], started: threading.Event) -> list[dict[str, Any]]:
    """Send one socket request and read its events up to the last one (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        events: list[dict[str, Any]] = []
        with sock.makefile("rb") as reader:
            for line in reader:
                events.append(json.loads(line))
                if events[-1]["event"] != "token":
                    break
                started.set()
        return events


@pytest.mark.anyio
async def test_drain_timeout_stops_models_and_ends_every_request_with_an_error(
    tmp_path: Path, long_model: Path, tiny_model: Path, backend: Any
) -> None:
    """Requests still running at the drain deadline: what waits gets 503 shutting_down, streams
    (HTTP and socket) end with a shutting_down error event, the daemon exits 0 at once after."""
    config = write_config(
        tmp_path / "serve.toml",
        {"long": {"path": long_model, "ctx_size": 32768, "parallel": 2}, "tiny": {"path": tiny_model}},
        max_loaded_models=1,
        drain_timeout="1s",
        preload=["long"],
    )
    daemon = start_daemon(config, tmp_path / "state")
    try:
        _wait_for(lambda: _models(daemon)["long"]["phase"] == "Serving", what="preload")
        servers = llama_servers_of(daemon.pid)
        endless = {"model": "long", "prompt": "x", "max_tokens": 100_000, "ignore_eos": True}
        results: dict[str, Any] = {}
        socket_started = threading.Event()
        async with httpx.AsyncClient(base_url=daemon.http, timeout=60) as client:
            first = anyio.Event()

            async def http_stream() -> None:
                results["stream"] = await _stream(client, "/v1/completions", endless, first=first)

            async def waiting_for_room() -> None:
                results["waiter"] = await client.post(
                    "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}
                )

            async def socket_stream() -> None:
                assert daemon.socket is not None
                request = {"id": "s", "op": "generate", **endless}
                results["socket"] = await anyio.to_thread.run_sync(
                    _socket_stream, daemon.socket, request, socket_started
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(http_stream)
                tg.start_soon(socket_stream)
                await first.wait()
                while not socket_started.is_set():
                    await anyio.sleep(0.01)
                tg.start_soon(waiting_for_room)
                with anyio.fail_after(30):
                    while (await client.get("/api/models")).json()["models"][1]["inFlight"] != 1:
                        await anyio.sleep(0.02)
                os.kill(daemon.pid, signal.SIGTERM)
                async with httpx.AsyncClient(base_url=daemon.http, timeout=30) as other:
                    with anyio.fail_after(30):  # the daemon has seen the signal
                        while not (await other.get("/api/models")).json()["draining"]:
                            await anyio.sleep(0.02)
                    load = await other.post("/api/models/tiny/load")  # refused, not queued for room
                assert load.status_code == 503 and load.json()["error"]["code"] == "shutting_down"
            # The endless streams end only because the drain timed out (they end with an error, below).
            with anyio.fail_after(30):
                while daemon.process.poll() is None:
                    await anyio.sleep(0.02)
        assert daemon.returncode == 0, daemon.stderr()

        stream: StreamResult = results["stream"]
        assert stream.status == 200 and stream.texts and not stream.done
        assert stream.error is not None and stream.error["code"] == "shutting_down"
        waiter: httpx.Response = results["waiter"]
        assert waiter.status_code == 503 and waiter.json()["error"]["code"] == "shutting_down"
        events = results["socket"]
        assert events[0]["event"] == "token"
        assert (events[-1]["event"], events[-1]["code"]) == ("error", "shutting_down")

        stderr = daemon.stderr()
        assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr
        _assert_gone(servers)
        for name in ("serve.json", "serve.pid", "serve.sock"):
            assert not (daemon.state_dir / name).exists(), name
    finally:
        if daemon.process.poll() is None:
            stop_daemon(daemon)
