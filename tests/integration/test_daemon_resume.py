"""Streams the daemon relays from a sharded model go on, token for token, when a worker dies under them.

A real ``llamaproc serve`` runs models split over two local rpc workers
(``local_workers = 2``). Each test first streams a greedy answer
uninterrupted, then the same request again, killing (SIGKILL) one of the
model's workers through the pid ``/api/workers`` shows: the second stream
must finish without an error and equal the first, with the reshard in
``/api/jobs`` and ``/metrics``. Prompts are sent with ``cache_prompt: false``
so that both runs prefill their prompt in one batch.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from daemon_helpers import Daemon, running_daemon_checked, until, write_config
from prometheus_client.parser import text_string_to_metric_families

from llamaproc.testing import write_tiny_model

pytestmark = pytest.mark.integration

SAFETY = 120.0
N = 240
KILL_AT = 40
MESSAGES = [{"role": "user", "content": "tell me a long story"}]


@pytest.fixture(autouse=True)
def no_leftover_servers() -> Iterator[None]:
    """The module's daemon keeps its children between tests; the daemon fixture checks they end with it."""
    yield


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("resume")
    model = write_tiny_model(tmp / "layers.gguf", n_layers=8, seed=5)
    table = {"path": model, "local_workers": 2, "stall_timeout": "5s"}
    config = write_config(tmp / "serve.toml", {"chat": table, "text": table, "sock": table}, max_loaded_models=3)
    with running_daemon_checked(config, tmp / "state") as started:
        yield started


@pytest.fixture(scope="module")
def http(daemon: Daemon) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=daemon.http, timeout=SAFETY) as client:
        yield client


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=daemon.http + "/v1", api_key="none", timeout=SAFETY, max_retries=0) as c:
        yield c


def _kill_a_worker(http: httpx.Client, model: str) -> str:
    workers = [w for w in http.get("/api/workers").json()["workers"] if w["model"] == model and w["pid"]]
    assert len(workers) == 2, workers
    os.kill(workers[0]["pid"], signal.SIGKILL)
    return str(workers[0]["address"])


def _metric(http: httpx.Client, name: str, model: str) -> float:
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model") == model:
                return sample.value
    return 0.0


def _job(http: httpx.Client, model: str) -> dict[str, Any]:
    return next(j for j in http.get("/api/jobs").json()["jobs"] if j["model"] == model)


def _check_recorded(http: httpx.Client, model: str, lost: str) -> None:
    job = until("the job to finish", lambda: j if (j := _job(http, model))["status"] != "running" else None)
    assert job["status"] == "done"
    assert [r["lost"] for r in job["reshards"]] == [[lost]]
    assert job["reshards"][0]["after_tokens"] >= KILL_AT
    assert [s["address"] for s in job["layout"]] != [] and lost not in [s["address"] for s in job["layout"]]
    assert _metric(http, "llamaproc_reshards_total", model) == 1.0
    assert _metric(http, "llamaproc_resume_seconds_count", model) == 1.0


def _chat(client: openai.OpenAI, then: Callable[[], None] | None = None) -> tuple[str, list[Any]]:
    texts: list[str] = []
    chunks: list[Any] = []
    stream = client.chat.completions.create(
        model="chat", messages=MESSAGES, max_tokens=N, temperature=0, stream=True,  # type: ignore[arg-type]
        extra_body={"cache_prompt": False},
    )
    for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            texts.append(chunk.choices[0].delta.content)
            if len(texts) == KILL_AT and then is not None:
                then()
    return "".join(texts), chunks


def test_an_openai_chat_stream_survives_a_dead_worker(client: openai.OpenAI, http: httpx.Client) -> None:
    reference, _ = _chat(client)
    lost: list[str] = []
    text, chunks = _chat(client, lambda: lost.append(_kill_a_worker(http, "chat")))
    assert text == reference
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1  # one stream, as far as the client can tell
    assert all(c.model == "chat" for c in chunks)
    # The token ids were asked for the daemon's sake: the client did not ask for logprobs.
    assert all(c.choices[0].logprobs is None for c in chunks if c.choices)
    _check_recorded(http, "chat", lost[0])


def test_a_text_completion_stream_survives_a_dead_worker(client: openai.OpenAI, http: httpx.Client) -> None:
    def run(then: Callable[[], None] | None = None) -> str:
        texts: list[str] = []
        stream = client.completions.create(
            model="text", prompt="Once upon a time", max_tokens=N, temperature=0, stream=True,
            extra_body={"cache_prompt": False},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                texts.append(chunk.choices[0].text)
                if len(texts) == KILL_AT and then is not None:
                    then()
        return "".join(texts)

    reference = run()
    lost: list[str] = []
    assert run(lambda: lost.append(_kill_a_worker(http, "text"))) == reference
    _check_recorded(http, "text", lost[0])


def _socket_generate(path: str, then: Callable[[], None] | None = None) -> tuple[list[int], list[dict[str, Any]]]:
    request = {"id": 1, "op": "generate", "model": "sock", "prompt": "Once upon a time", "max_tokens": N,
               "cache_prompt": False}
    ids: list[int] = []
    others: list[dict[str, Any]] = []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(SAFETY)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        buffer = b""
        while True:
            chunk = sock.recv(65536)
            assert chunk, "the daemon closed the connection"
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                event = json.loads(line)
                if event["event"] == "token":
                    ids.append(event["token_id"])
                    if len(ids) == KILL_AT and then is not None:
                        then()
                    continue
                others.append(event)
                if event["event"] in ("done", "error"):
                    return ids, others


def test_a_socket_stream_survives_a_dead_worker(daemon: Daemon, http: httpx.Client) -> None:
    assert daemon.socket is not None
    reference, _ = _socket_generate(daemon.socket)
    assert len(reference) == N
    lost: list[str] = []
    ids, events = _socket_generate(daemon.socket, lambda: lost.append(_kill_a_worker(http, "sock")))
    assert ids == reference
    assert [e["event"] for e in events] == ["reshard", "done"]
    assert events[0]["lost"] == lost and events[0]["after_tokens"] >= KILL_AT
    assert events[1]["usage"]["completion_tokens"] == N
    _check_recorded(http, "sock", lost[0])
