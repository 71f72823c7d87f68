"""The socket protocol's generate and chat ops sent through the daemon's ``Upstream`` client.

The model is a real :class:`TextModel` around a stand-in process, and its
llama-server a scripted HTTP server in the test (tests/unit/llama_stub.py,
each answer scripted by the test): these tests are about what
goes to llama-server (the same body as the model's own streams send), how its
answers become events, and how failures and cancellations end.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from llama_stub import Answer, LlamaStub, endless_answer, sse, status_answer, stream_answer
from test_socket_protocol import Client

from llamaproc import LlamaClient, ModelNotFoundError, TextModel
from llamaproc.backend import Backend
from llamaproc.process import OutputBuffer
from llamaproc.serve import Upstream
from llamaproc.serve._socket import serve_socket
from llamaproc.types import Timings

pytestmark = pytest.mark.anyio  # asyncio only: Upstream is built on asyncio streams

TIMINGS = {"prompt_n": 3, "prompt_ms": 1.5, "predicted_n": 2, "predicted_ms": 2.5, "cache_n": 0}
NATIVE = [
    {"content": "Once", "tokens": [10], "stop": False},
    {"content": " upon", "tokens": [11], "stop": False},
    {
        "content": "!",
        "tokens": [],
        "stop": True,
        "stop_type": "limit",
        "tokens_evaluated": 3,
        "tokens_predicted": 3,
        "timings": TIMINGS,
    },
]
CHAT = [
    {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": None}]},
    {
        "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        "timings": TIMINGS,
    },
    "[DONE]",
]
ERROR_EVENT = {"error": {"code": 500, "message": "the slot broke", "type": "server_error"}}


class Process:
    """Stands in for a running ServerProcess."""

    def __init__(self, port: int) -> None:
        self.pid = 4242
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.returncode: int | None = None
        self.output = OutputBuffer()

    async def stop(self) -> int | None:
        return self.returncode


class Pool:
    closed = False

    def __init__(self, model: TextModel) -> None:
        self.model = model

    def status(self) -> list[Any]:
        return []

    @asynccontextmanager
    async def acquire(self, name: str) -> AsyncIterator[TextModel]:
        if name != "m":
            raise ModelNotFoundError(f"no model named {name!r}")
        yield self.model


@pytest.fixture
async def llama() -> AsyncIterator[LlamaStub]:
    async with LlamaStub() as stub:
        stub.answer = stream_answer(sse(*NATIVE))
        yield stub


@asynccontextmanager
async def setup(llama: LlamaStub, tmp_path: Path) -> AsyncIterator[tuple[TextModel, Process, Path]]:
    """A TextModel on the scripted llama-server, and the socket server in front of it."""
    process = Process(llama.port)
    stand_in: Any = process
    backend = Backend(binary=tmp_path / "llama-server", flavour="cpu")
    model = TextModel(stand_in, LlamaClient(process.base_url), path=tmp_path / "m.gguf", backend=backend)
    path = tmp_path / "s.sock"
    try:
        async with Upstream(warm_for=0) as client, anyio.create_task_group() as tg:
            await tg.start(partial(serve_socket, Pool(model), path, client=client))
            yield model, process, path
            tg.cancel_scope.cancel()
    finally:
        await model.close()


@asynccontextmanager
async def connected(path: Path) -> AsyncIterator[Client]:
    async with await anyio.connect_unix(path) as stream:
        yield Client(stream)


PARAMS: dict[str, Any] = {"max_tokens": 3, "temperature": 0.5, "stop": "\n", "seed": 42, "top_k": 5}


async def test_generate_sends_what_the_model_sends_and_streams_tokens_with_ids(llama: LlamaStub, tmp_path: Path) -> None:
    llama.answer = stream_answer(sse(*NATIVE), piece=7)  # events split across HTTP chunks
    async with setup(llama, tmp_path) as (model, _, path), connected(path) as c:
        async with model.generate("Once", **PARAMS) as stream:
            direct = [(t.text, t.id) async for t in stream]
        await c.send({"id": 1, "op": "generate", "model": "m", "prompt": "Once", **PARAMS})
        events = await c.until_final(1)
    assert llama.requests[0] == llama.requests[1]  # the same path and body bytes
    assert llama.requests[1][0] == b"/completion"
    assert json.loads(llama.requests[1][1])["return_tokens"] is True
    assert direct == [("Once", 10), (" upon", 11), ("!", None)]
    assert stream.result is not None and stream.result.usage.completion_tokens == 3
    assert [(e["event"], e["text"], e.get("token_id")) for e in events[:-1]] == [
        ("token", "Once", 10),
        ("token", " upon", 11),
        ("token", "!", None),
    ]
    assert "token_id" not in events[2]
    assert events[-1] == {
        "id": 1,
        "event": "done",
        "finish_reason": "limit",
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
        "timings": Timings.model_validate(TIMINGS).model_dump(),
    }
    assert model.last_metrics is not None and model.last_metrics.decode_ms == 2.5


async def test_chat_sends_what_the_model_sends(llama: LlamaStub, tmp_path: Path) -> None:
    llama.answer = stream_answer(sse(*CHAT))
    messages = [{"role": "user", "content": "hi"}]
    async with setup(llama, tmp_path) as (model, _, path), connected(path) as c:
        async with model.chat(messages, **PARAMS) as stream:
            direct = [t.text async for t in stream]
        await c.send({"id": "c", "op": "chat", "model": "m", "messages": messages, **PARAMS})
        events = await c.until_final("c")
    assert llama.requests[0] == llama.requests[1]
    assert llama.requests[1][0] == b"/v1/chat/completions"
    assert direct == ["Hi", " there"]
    assert [e["text"] for e in events[:-1]] == direct and all("token_id" not in e for e in events[:-1])
    assert events[-1]["finish_reason"] == "length"
    assert events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert events[-1]["timings"]["predicted_ms"] == 2.5


@pytest.mark.parametrize(
    ("answer", "code", "message"),
    [
        (status_answer(400, {"error": {"message": "n_probs is bad"}}), "bad_request", "answered 400"),
        (status_answer(503, {"error": {"message": "Loading model"}}), "model_unavailable", "answered 503"),
        (status_answer(500, {"error": {"message": "oops"}}), "upstream_error", "answered 500"),
        (stream_answer(sse(NATIVE[0], ERROR_EVENT)), "upstream_error", "the slot broke"),
        (stream_answer(sse(NATIVE[0])), "upstream_error", "without its final event"),
        (stream_answer(sse(NATIVE[0]), cut=True), "upstream_error", "closed before the end of the stream"),
        (stream_answer(sse(NATIVE[0], {"content": "", "stop": True}, ERROR_EVENT)), "upstream_error", "slot broke"),
        (stream_answer(b"data: {oops\n\n"), "upstream_error", "malformed answer"),
    ],
    ids=["400", "503-loading", "500", "error-event", "no-final-event", "cut", "error-after-the-end", "malformed"],
)
async def test_failures_end_with_one_error_event(
    llama: LlamaStub, tmp_path: Path, answer: Answer, code: str, message: str
) -> None:
    llama.answer = answer
    async with setup(llama, tmp_path) as (model, _, path), connected(path) as c:
        await c.send({"id": 1, "op": "generate", "model": "m", "prompt": "x"})
        events = await c.until_final(1)
        assert [e["event"] for e in events] == ["token"] * (len(events) - 1) + ["error"]
        assert len(events) <= 2  # the first token at most (an answer that fails after its end sends no more)
        assert events[-1]["code"] == code and message in events[-1]["message"], events[-1]
        assert model.last_error is not None
        # The connection keeps working.
        llama.answer = stream_answer(sse(*NATIVE))
        await c.send({"id": 1, "op": "generate", "model": "m", "prompt": "x"})
        assert (await c.until_final(1))[-1]["event"] == "done"


async def test_a_crashed_child_is_named_with_its_exit_code(llama: LlamaStub, tmp_path: Path) -> None:
    async with setup(llama, tmp_path) as (model, process, path), connected(path) as c:

        def crash() -> None:
            process.returncode = -9

        llama.answer = stream_answer(sse(NATIVE[0]), cut=True, then=crash)
        await c.send({"id": 1, "op": "generate", "model": "m", "prompt": "x"})
        events = await c.until_final(1)
        assert [e["event"] for e in events] == ["token", "error"]
        assert events[-1]["code"] == "upstream_error"
        assert events[-1]["message"] == "llama-server (pid 4242) exited with code -9"
        # Later requests are refused at once, without reaching llama-server.
        await c.send({"id": 2, "op": "chat", "model": "m", "messages": [{"role": "user", "content": "x"}]})
        event = await c.event()
        assert (event["code"], event["message"]) == ("upstream_error", "llama-server (pid 4242) exited with code -9")
    assert len(llama.requests) == 1


async def test_bad_arguments_are_bad_requests_before_anything_is_sent(llama: LlamaStub, tmp_path: Path) -> None:
    async with setup(llama, tmp_path) as (_, _, path), connected(path) as c:
        bads: list[dict[str, Any]] = [{"max_tokens": -5}, {"n_predict": 3}, {"temperature": float("nan")}]
        for i, bad in enumerate(bads):
            await c.send({"id": i, "op": "generate", "model": "m", "prompt": "x", **bad})
            event = await c.event()
            assert (event["id"], event["code"]) == (i, "bad_request"), event
    assert llama.requests == []


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
async def test_cancelling_closes_the_upstream_connection(llama: LlamaStub, tmp_path: Path, how: str) -> None:
    llama.answer = endless_answer()
    async with setup(llama, tmp_path) as (_, _, path):
        async with connected(path) as c:
            await c.send({"id": "long", "op": "generate", "model": "m", "prompt": "x"})
            assert (await c.event())["event"] == "token"
            if how == "cancel":
                await c.send({"op": "cancel", "id": "long"})
                final = await c.until_final("long")
                assert (final[-1]["event"], final[-1]["code"]) == ("error", "cancelled")
        with anyio.fail_after(2):
            await llama.hung_up.wait()
