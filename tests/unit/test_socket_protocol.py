"""The socket protocol of ``llamaproc serve``, against a fake pool.

The pool and its models are fakes with the real interface (``acquire()``
yielding a model whose ``generate``/``chat`` return token streams): these tests
are about framing, ids, concurrency, cancellation and error mapping. The real
pool and llama-server are in tests/integration/test_daemon_socket.py.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Self

import anyio
import anyio.abc
import pytest
from pydantic import BaseModel

from llamaproc.cli._daemon_cli import (
    DaemonClient,
    DaemonNotRunningError,
    DaemonRequestError,
    cmd_chat,
    cmd_ps,
    format_table,
)
from llamaproc.errors import (
    ModelNotFoundError,
    ModelUnavailableError,
    QueueFullError,
    ServerCrashedError,
    ShuttingDownError,
    StatusError,
)
from llamaproc.serve._socket import serve_socket
from llamaproc.types import Completion, Timings, Token, Usage

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- fakes ---------------------------------------------------------------------------------------


class FakeStream:
    """Yields ``count`` tokens ``tok0 tok1 ...`` with ids 100, 101, ... (``delay`` s apart)."""

    def __init__(self, model: FakeModel, count: int, *, native: bool, fail_at: int | None = None) -> None:
        self.model = model
        self.count = count
        self.native = native
        self.fail_at = fail_at
        self.sent = 0
        self.result: Completion | None = None
        self.closed = False

    async def __aenter__(self) -> Self:
        self.model.open_streams += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.model.open_streams -= 1

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Token:
        await anyio.sleep(self.model.delay)
        if self.fail_at is not None and self.sent == self.fail_at:
            raise ServerCrashedError("llama-server (pid 1) exited with code -9", returncode=-9, output="boom\nmore")
        if self.sent >= self.count:
            self.result = Completion(
                text="",
                finish_reason="length",
                usage=Usage(prompt_tokens=3, completion_tokens=self.count, total_tokens=3 + self.count),
                timings=Timings(prompt_n=3, predicted_n=self.count, predicted_ms=1.5),
            )
            raise StopAsyncIteration
        i = self.sent
        self.sent += 1
        text = self.model.token_text if self.model.token_text is not None else f"tok{i} "
        return Token(text, 100 + i if self.native else None)


class FakeModel:
    def __init__(self) -> None:
        self.delay = 0.0
        self.token_text: str | None = None
        self.calls: list[tuple[str, Any, dict[str, Any]]] = []
        self.open_streams = 0

    def generate(self, prompt: Any, **params: Any) -> FakeStream:
        self.calls.append(("generate", prompt, params))
        return FakeStream(self, params.get("max_tokens", 4), native=True, fail_at=params.get("fail_at"))

    def chat(self, messages: Any, **params: Any) -> FakeStream:
        self.calls.append(("chat", messages, params))
        return FakeStream(self, params.get("max_tokens", 4), native=False, fail_at=params.get("fail_at"))

    async def embed(self, texts: list[str]) -> list[list[float]]:
        self.calls.append(("embed", texts, {}))
        return [[float(len(t)), 0.5] for t in texts]


class FakeStatus(BaseModel):
    name: str
    phase: str
    loaded: bool
    pid: int | None
    port: int | None
    in_flight: int
    queued: int
    restarts: int
    last_used: datetime | None


class FakeStats:
    loads = 3
    evictions = 1
    restarts = 0
    idle_unloads = 2


class FakePool:
    """``slots`` requests at once; the rest wait. Some names raise pool errors."""

    def __init__(self, slots: int = 4) -> None:
        self.model = FakeModel()
        self.slots = anyio.Semaphore(slots)
        self.in_flight = 0
        self.waiting = 0
        self.stats = FakeStats()
        self.draining = False

    def names(self) -> list[str]:
        return ["tiny"]

    def status(self) -> list[FakeStatus]:
        return [
            FakeStatus(
                name="tiny",
                phase="Serving",
                loaded=True,
                pid=123,
                port=4567,
                in_flight=self.in_flight,
                queued=self.waiting,
                restarts=0,
                last_used=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
            ),
            FakeStatus(
                name="big",
                phase="Pending",
                loaded=False,
                pid=None,
                port=None,
                in_flight=0,
                queued=0,
                restarts=0,
                last_used=None,
            ),
        ]

    @asynccontextmanager
    async def acquire(self, name: str) -> AsyncIterator[FakeModel]:
        errors: dict[str, Exception] = {
            "missing": ModelNotFoundError("no model named 'missing'"),
            "full": QueueFullError("queue of 'full' is full", retry_after=2.5),
            "draining": ShuttingDownError("shutting down"),
            "failed": ModelUnavailableError("'failed' is Failed: too many restarts"),
            "refuses": StatusError(400, {"error": {"message": "bad n_probs"}}),
        }
        if name in errors:
            raise errors[name]
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.in_flight += 1
        try:
            yield self.model
        finally:
            self.in_flight -= 1
            self.slots.release()


class FakeMetrics:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.done: list[tuple[str, str, int]] = []
        self.first: list[str] = []

    def request_started(self, model: str, api: str) -> None:
        assert api == "socket"
        self.started.append(model)

    def request_done(self, model: str, api: str, status: str, seconds: float, tokens: int) -> None:
        assert api == "socket" and seconds >= 0
        self.done.append((model, status, tokens))

    def first_token(self, model: str, seconds: float) -> None:
        self.first.append(model)


# --- harness -------------------------------------------------------------------------------------


class Client:
    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def send(self, request: dict[str, Any] | bytes) -> None:
        data = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
        await self.stream.send(data)

    async def line(self, timeout: float = 5.0) -> bytes:
        with anyio.fail_after(timeout):
            while b"\n" not in self.buf:
                self.buf += await self.stream.receive()
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    async def event(self, timeout: float = 5.0) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(await self.line(timeout))
        return event

    async def until_final(self, rid: Any) -> list[dict[str, Any]]:
        """Events of ``rid`` up to its done/result/error (others are dropped)."""
        events = []
        while True:
            event = await self.event()
            if event["id"] == rid:
                events.append(event)
                if event["event"] in ("done", "result", "error"):
                    return events

    async def eof(self, timeout: float = 5.0) -> bool:
        with anyio.fail_after(timeout):
            try:
                await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return True
        return False


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "serve.sock"


@asynccontextmanager
async def serving(pool: FakePool, path: Path, **options: Any) -> AsyncIterator[Path]:
    async with anyio.create_task_group() as tg:
        await tg.start(partial(serve_socket, pool, path, **options))
        yield path
        tg.cancel_scope.cancel()


@asynccontextmanager
async def connected(path: Path) -> AsyncIterator[Client]:
    async with await anyio.connect_unix(path) as stream:
        yield Client(stream)


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


# --- simple ops ----------------------------------------------------------------------------------


async def test_ping_models_status(sock_path: Path) -> None:
    pool = FakePool()
    async with serving(pool, sock_path), connected(sock_path) as c:
        await c.send({"op": "ping"})
        assert await c.event() == {"id": None, "event": "result", "pong": True}
        await c.send({"op": "ping", "id": 7})
        assert await c.event() == {"id": 7, "event": "result", "pong": True}
        await c.send({"id": "m", "op": "models"})
        assert await c.event() == {
            "id": "m",
            "event": "result",
            "models": [
                {"name": "tiny", "phase": "Serving", "loaded": True},
                {"name": "big", "phase": "Pending", "loaded": False},
            ],
        }
        await c.send({"id": "s", "op": "status"})
        status = await c.event()
        assert status["event"] == "result" and status["id"] == "s"
        assert status["models"][0]["pid"] == 123 and status["models"][0]["last_used"] == "2024-01-02T03:04:05Z"
        assert status["models"][1]["pid"] is None
        assert status["stats"] == {"loads": 3, "evictions": 1, "restarts": 0, "idle_unloads": 2}
        assert status["draining"] is False


async def test_chat_streams_tokens_then_done(sock_path: Path) -> None:
    pool = FakePool()
    metrics = FakeMetrics()
    messages = [{"role": "user", "content": "hi"}]
    async with serving(pool, sock_path, metrics=metrics), connected(sock_path) as c:
        await c.send(
            {
                "id": "1",
                "op": "chat",
                "model": "tiny",
                "messages": messages,
                "max_tokens": 3,
                "temperature": 0.5,
                "stop": "\n",
                "seed": 42,
            }
        )
        events = await c.until_final("1")
    assert [e["event"] for e in events] == ["token", "token", "token", "done"]
    assert [e["text"] for e in events[:3]] == ["tok0 ", "tok1 ", "tok2 "]
    assert all("token_id" not in e for e in events[:3])
    assert events[3] == {
        "id": "1",
        "event": "done",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
        "timings": Timings(prompt_n=3, predicted_n=3, predicted_ms=1.5).model_dump(),
    }
    # Everything but the protocol's own fields goes to the model; a lone stop string becomes a list.
    assert pool.model.calls == [("chat", messages, {"max_tokens": 3, "temperature": 0.5, "stop": ["\n"], "seed": 42})]
    assert metrics.started == ["tiny"] and metrics.first == ["tiny"] and metrics.done == [("tiny", "ok", 3)]
    assert pool.in_flight == 0 and pool.model.open_streams == 0


async def test_generate_carries_token_ids(sock_path: Path) -> None:
    pool = FakePool()
    async with serving(pool, sock_path), connected(sock_path) as c:
        await c.send({"id": 5, "op": "generate", "model": "tiny", "prompt": "Once", "max_tokens": 2})
        events = await c.until_final(5)
        await c.send({"id": 6, "op": "generate", "model": "tiny", "prompt": [1, 2, 3], "max_tokens": 1})
        assert (await c.until_final(6))[-1]["event"] == "done"
    assert [(e["text"], e["token_id"]) for e in events[:2]] == [("tok0 ", 100), ("tok1 ", 101)]
    assert events[2]["event"] == "done"
    assert pool.model.calls[0] == ("generate", "Once", {"max_tokens": 2})
    assert pool.model.calls[1] == ("generate", [1, 2, 3], {"max_tokens": 1})


async def test_embed(sock_path: Path) -> None:
    pool = FakePool()
    async with serving(pool, sock_path), connected(sock_path) as c:
        await c.send({"id": "e", "op": "embed", "model": "tiny", "input": ["ab", "abcd"]})
        assert await c.event() == {"id": "e", "event": "result", "embeddings": [[2.0, 0.5], [4.0, 0.5]]}
        await c.send({"id": "e", "op": "embed", "model": "tiny", "input": "one"})
        assert (await c.event())["embeddings"] == [[3.0, 0.5]]


async def test_non_ascii_text_is_sent_as_utf8(sock_path: Path) -> None:
    pool = FakePool()
    pool.model.token_text = "héllo ✓"
    async with serving(pool, sock_path), connected(sock_path) as c:
        await c.send(
            {"id": "u", "op": "chat", "model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        )
        raw = await c.line()
        assert "héllo ✓".encode() in raw
        pool.model.token_text = "bad \udc80 surrogate"
        await c.until_final("u")
        await c.send(
            {"id": "v", "op": "chat", "model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        )
        raw = await c.line()
        assert b"\\udc80" in raw  # escaped rather than sent as invalid UTF-8
        raw.decode("ascii")


# --- bad input -----------------------------------------------------------------------------------


async def test_bad_requests_get_error_events_and_the_connection_keeps_working(sock_path: Path) -> None:
    pool = FakePool()
    msgs = [{"role": "user", "content": "x"}]
    cases: list[tuple[bytes | dict[str, Any], Any, str]] = [
        (b"{not json\n", None, "invalid_json"),
        (b"\xff\xfe\n", None, "invalid_json"),
        (b"[1, 2]\n", None, "bad_request"),
        (b'"hello"\n', None, "bad_request"),
        ({"id": "1"}, "1", "bad_request"),  # no op
        ({"id": "2", "op": "dance"}, "2", "unknown_op"),
        ({"op": "dance"}, None, "unknown_op"),
        ({"op": "chat", "model": "tiny", "messages": msgs}, None, "bad_request"),  # no id
        ({"id": True, "op": "ping"}, None, "bad_request"),
        ({"id": [1], "op": "models"}, None, "bad_request"),
        ({"id": "3", "op": "chat", "messages": msgs}, "3", "bad_request"),  # no model
        ({"id": "4", "op": "chat", "model": "tiny"}, "4", "bad_request"),  # no messages
        ({"id": "5", "op": "chat", "model": "tiny", "messages": []}, "5", "bad_request"),
        ({"id": "6", "op": "chat", "model": "tiny", "messages": ["hi"]}, "6", "bad_request"),
        ({"id": "7", "op": "generate", "model": "tiny"}, "7", "bad_request"),
        ({"id": "8", "op": "generate", "model": "tiny", "prompt": "x", "max_tokens": "9"}, "8", "bad_request"),
        ({"id": "9", "op": "generate", "model": "tiny", "prompt": "x", "temperature": "hot"}, "9", "bad_request"),
        ({"id": "a", "op": "generate", "model": "tiny", "prompt": "x", "stop": [1]}, "a", "bad_request"),
        ({"id": "b", "op": "embed", "model": "tiny", "input": []}, "b", "bad_request"),
        ({"id": "c", "op": "embed", "model": "tiny", "input": [1]}, "c", "bad_request"),
        ({"id": "d", "op": "cancel"}, "d", "not_found"),
        ({"op": "cancel"}, None, "bad_request"),
    ]
    async with serving(pool, sock_path), connected(sock_path) as c:
        for request, rid, code in cases:
            await c.send(request)
            event = await c.event()
            assert event["event"] == "error", request
            assert (event["id"], event["code"]) == (rid, code), request
            assert isinstance(event["message"], str) and event["message"]
            await c.send({"op": "ping"})
            assert (await c.event())["event"] == "result"
    assert pool.model.calls == []


async def test_framing(sock_path: Path) -> None:
    pool = FakePool()
    async with serving(pool, sock_path), connected(sock_path) as c:
        # Byte by byte, with blank lines and CRLF.
        for byte in b'\n\r\n{"op": "ping", "id": 1}\r\n':
            await c.send(bytes([byte]))
        assert await c.event() == {"id": 1, "event": "result", "pong": True}
        # Several requests in one write.
        await c.send(b'{"op": "ping", "id": 2}\n{"op": "ping", "id": 3}\n{"op": "ping", "id": 4}\n')
        assert [(await c.event())["id"] for _ in range(3)] == [2, 3, 4]
        # A last line without its newline still counts once the client is done sending.
        await c.send(b'{"op": "ping", "id": 5}')
        await c.stream.send_eof()
        assert (await c.event())["id"] == 5
        assert await c.eof()


@pytest.mark.parametrize("split", [False, True])
async def test_oversized_line_is_skipped(sock_path: Path, split: bool) -> None:
    pool = FakePool()
    big = b'{"op": "ping", "pad": "' + b"x" * 5000 + b'"}\n'
    async with serving(pool, sock_path, max_line=1024), connected(sock_path) as c:
        if split:  # arrives in pieces: reported before its newline is seen
            for i in range(0, len(big), 700):
                await c.send(big[i : i + 700])
        else:  # one write, followed by a good line in the same write
            await c.send(big + b'{"op": "ping", "id": "after"}\n')
        event = await c.event()
        assert (event["id"], event["event"], event["code"]) == (None, "error", "line_too_long")
        if split:
            await c.send({"op": "ping", "id": "after"})
        assert await c.event() == {"id": "after", "event": "result", "pong": True}
        # Exactly at the limit is fine.
        line = b'{"op": "ping", "id": "edge", "pad": "'
        line += b"y" * (1024 - len(line) - 2) + b'"}'
        assert len(line) == 1024
        await c.send(line + b"\n")
        assert (await c.event())["id"] == "edge"


async def test_default_line_limit_is_one_mebibyte(sock_path: Path) -> None:
    pool = FakePool()
    async with serving(pool, sock_path), connected(sock_path) as c:
        ok = json.dumps({"id": "ok", "op": "embed", "model": "tiny", "input": ["a" * 900_000]}).encode()
        await c.send(ok + b"\n")
        assert (await c.event())["embeddings"] == [[900_000.0, 0.5]]
        await c.send(b'{"op": "ping", "x": "' + b"a" * (2 << 20) + b'"}\n{"op": "ping", "id": 1}\n')
        assert (await c.event())["code"] == "line_too_long"
        assert (await c.event())["id"] == 1


# --- concurrency and cancellation ----------------------------------------------------------------


async def test_several_requests_in_flight_on_one_connection(sock_path: Path) -> None:
    pool = FakePool()
    pool.model.delay = 0.01
    msgs = [{"role": "user", "content": "x"}]
    async with serving(pool, sock_path), connected(sock_path) as c:
        await c.send({"id": "a", "op": "chat", "model": "tiny", "messages": msgs, "max_tokens": 8})
        await c.send({"id": "b", "op": "generate", "model": "tiny", "prompt": "y", "max_tokens": 8})
        await c.send({"id": "c", "op": "embed", "model": "tiny", "input": ["z"]})
        await c.send({"id": "a", "op": "models"})  # "a" is still in flight
        events = []
        while sum(e["event"] in ("done", "result") for e in events) < 3:
            events.append(await c.event())
    by_id: dict[str, list[str]] = {}
    for e in events:
        by_id.setdefault(e["id"], []).append(e["event"])
    assert sorted(by_id["a"]) == ["done", "error"] + ["token"] * 8 and by_id["a"][-1] == "done"
    assert next(e for e in events if e["id"] == "a" and e["event"] == "error")["code"] == "duplicate_id"
    assert by_id["b"] == ["token"] * 8 + ["done"]
    assert by_id["c"] == ["result"]
    # They really ran at once: the tokens of a and b interleave.
    order = [e["id"] for e in events if e["event"] == "token"]
    assert order != sorted(order)


async def test_id_can_be_reused_after_its_last_event(sock_path: Path) -> None:
    pool = FakePool()
    async with serving(pool, sock_path), connected(sock_path) as c:
        for _ in range(3):
            await c.send({"id": "same", "op": "generate", "model": "tiny", "prompt": "p", "max_tokens": 2})
            assert (await c.until_final("same"))[-1]["event"] == "done"


async def test_too_many_requests_in_flight(sock_path: Path) -> None:
    pool = FakePool(slots=1)
    pool.model.delay = 0.05
    async with serving(pool, sock_path, max_in_flight=2), connected(sock_path) as c:
        for rid in "abc":
            await c.send({"id": rid, "op": "generate", "model": "tiny", "prompt": "p", "max_tokens": 2})
        assert (await c.until_final("c"))[-1]["code"] == "too_many_requests"
        assert (await c.until_final("b"))[-1]["event"] == "done"


@pytest.mark.parametrize("form", ["id", "target"])
async def test_cancel_op(sock_path: Path, form: str) -> None:
    pool = FakePool(slots=1)
    pool.model.delay = 0.02
    metrics = FakeMetrics()
    async with serving(pool, sock_path, metrics=metrics), connected(sock_path) as c:
        await c.send({"id": "long", "op": "generate", "model": "tiny", "prompt": "p", "max_tokens": 10_000})
        await c.send({"id": "queued", "op": "generate", "model": "tiny", "prompt": "p", "max_tokens": 1})
        assert (await c.event())["event"] == "token"
        await wait_for(lambda: pool.waiting == 1)
        if form == "id":
            await c.send({"op": "cancel", "id": "queued"})
            await c.send({"op": "cancel", "id": "long"})
        else:
            await c.send({"op": "cancel", "target": "queued", "id": "c1"})
            await c.send({"op": "cancel", "target": "long", "id": "c2"})
            await c.send({"op": "cancel", "target": "nobody", "id": "c3"})
        finals = {}
        while len(finals) < (2 if form == "id" else 5):
            e = await c.event()
            if e["event"] != "token":
                finals[e["id"]] = e
        for rid in ("long", "queued"):
            assert (finals[rid]["event"], finals[rid]["code"]) == ("error", "cancelled")
        if form == "target":
            assert finals["c1"] == {"id": "c1", "event": "result", "target": "queued", "cancelled": True}
            assert finals["c2"]["cancelled"] is True and finals["c3"]["cancelled"] is False
        assert pool.in_flight == 0 and pool.waiting == 0 and pool.model.open_streams == 0
        # The connection and the ids are still usable.
        await c.send({"id": "long", "op": "generate", "model": "tiny", "prompt": "p", "max_tokens": 1})
        assert (await c.until_final("long"))[-1]["event"] == "done"
    assert sorted(d[1] for d in metrics.done) == ["cancelled", "cancelled", "ok"]


async def test_disconnect_cancels_streams_and_queued_requests(sock_path: Path) -> None:
    pool = FakePool(slots=1)
    pool.model.delay = 0.01
    metrics = FakeMetrics()
    async with serving(pool, sock_path, metrics=metrics):
        async with connected(sock_path) as c:
            await c.send({"id": "1", "op": "generate", "model": "tiny", "prompt": "p", "max_tokens": 100_000})
            await c.send({"id": "2", "op": "chat", "model": "tiny", "messages": [{"role": "user", "content": "x"}]})
            assert (await c.event())["event"] == "token"
            await wait_for(lambda: pool.waiting == 1 and pool.in_flight == 1)
        # Closed: the stream is closed and the queued request has left the queue.
        await wait_for(lambda: pool.in_flight == 0 and pool.waiting == 0 and pool.model.open_streams == 0)
        await wait_for(lambda: len(metrics.done) == 2)
        assert sorted(d[1] for d in metrics.done) == ["cancelled", "cancelled"]
        # The server keeps serving others.
        async with connected(sock_path) as c:
            await c.send({"id": "x", "op": "generate", "model": "tiny", "prompt": "p", "max_tokens": 1})
            assert (await c.until_final("x"))[-1]["event"] == "done"


async def test_half_close_still_gets_the_answers(sock_path: Path) -> None:
    pool = FakePool()
    pool.model.delay = 0.01
    async with serving(pool, sock_path), connected(sock_path) as c:
        await c.send({"id": "1", "op": "generate", "model": "tiny", "prompt": "p", "max_tokens": 20})
        await c.stream.send_eof()  # like `nc -N`: nothing more to send, still listening
        events = await c.until_final("1")
        assert len(events) == 21 and events[-1]["event"] == "done"
        assert await c.eof()
    assert pool.in_flight == 0


async def test_slow_reader_is_dropped_after_the_write_timeout(sock_path: Path) -> None:
    pool = FakePool()
    pool.model.token_text = "x" * 65536  # fills the socket buffers quickly
    async with serving(pool, sock_path, write_timeout=0.3), connected(sock_path) as c:
        await c.send({"id": "1", "op": "generate", "model": "tiny", "prompt": "p", "max_tokens": 1_000_000})
        await wait_for(lambda: pool.in_flight == 1)
        # Never read: the daemon drops the connection and frees the slot.
        await wait_for(lambda: pool.in_flight == 0 and pool.model.open_streams == 0, timeout=10)
        async with connected(sock_path) as other:
            await other.send({"op": "ping"})
            assert (await other.event())["event"] == "result"


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "code"),
    [
        ("missing", "model_not_found"),
        ("full", "queue_full"),
        ("draining", "shutting_down"),
        ("failed", "unavailable"),
        ("refuses", "bad_request"),
    ],
)
async def test_pool_errors_become_error_events(sock_path: Path, model: str, code: str) -> None:
    pool = FakePool()
    metrics = FakeMetrics()
    async with serving(pool, sock_path, metrics=metrics), connected(sock_path) as c:
        await c.send({"id": "1", "op": "chat", "model": model, "messages": [{"role": "user", "content": "x"}]})
        event = await c.event()
        assert (event["id"], event["event"], event["code"]) == ("1", "error", code)
        assert event["message"]
        if code == "queue_full":
            assert event["retry_after"] == 2.5
        else:
            assert "retry_after" not in event
        await c.send({"id": "2", "op": "embed", "model": model, "input": ["x"]})
        assert (await c.event())["code"] == code
    assert [d[1] for d in metrics.done] == [code, code]


async def test_crash_mid_stream_is_a_server_error(sock_path: Path) -> None:
    pool = FakePool()
    async with serving(pool, sock_path), connected(sock_path) as c:
        await c.send({"id": "1", "op": "generate", "model": "tiny", "prompt": "p", "max_tokens": 9, "fail_at": 2})
        events = await c.until_final("1")
    assert [e["event"] for e in events] == ["token", "token", "error"]
    assert events[-1]["code"] == "server_error"
    assert events[-1]["message"] == "llama-server (pid 1) exited with code -9"  # first line only
    assert pool.in_flight == 0 and pool.model.open_streams == 0


# --- the socket file -----------------------------------------------------------------------------


async def test_socket_file_mode_stale_file_and_removal(sock_path: Path) -> None:
    # A stale socket (nobody listening) is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))
    stale.close()
    pool = FakePool()
    async with serving(pool, sock_path):
        assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        # A live one is not: a second server on the same path is refused.
        with pytest.raises(OSError) as info:
            await serve_socket(pool, sock_path)
        assert info.value.errno == errno.EADDRINUSE
        async with connected(sock_path) as c:
            await c.send({"op": "ping"})
            assert (await c.event())["event"] == "result"
    assert not sock_path.exists()


async def test_refuses_to_replace_a_regular_file(sock_path: Path) -> None:
    sock_path.write_text("precious")
    with pytest.raises(OSError, match="not a socket"):
        await serve_socket(FakePool(), sock_path)
    assert sock_path.read_text() == "precious"


async def test_open_connections_are_closed_on_cancel(sock_path: Path) -> None:
    pool = FakePool()
    pool.model.delay = 0.01
    async with connected_after_serving(pool, sock_path) as (c, stop):
        await c.send({"id": "1", "op": "generate", "model": "tiny", "prompt": "p", "max_tokens": 100_000})
        assert (await c.event())["event"] == "token"
        stop()
        with anyio.fail_after(5):
            while True:  # tokens, then the end of the stream
                try:
                    await c.line()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    assert pool.in_flight == 0 and pool.model.open_streams == 0
    assert not sock_path.exists()


@asynccontextmanager
async def connected_after_serving(pool: FakePool, path: Path) -> AsyncIterator[tuple[Client, Callable[[], None]]]:
    async with anyio.create_task_group() as outer:
        scope = anyio.CancelScope()

        async def run(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await serve_socket(pool, path, task_status=task_status)

        await outer.start(run)
        async with connected(path) as c:
            yield c, scope.cancel


# --- the blocking client and the CLI --------------------------------------------------------------


async def test_daemon_client(sock_path: Path) -> None:
    pool = FakePool()

    def use() -> None:
        with DaemonClient(sock_path, timeout=5) as client:
            assert client.call("ping") == {"id": "1", "event": "result", "pong": True}
            events = list(client.stream("generate", model="tiny", prompt="p", max_tokens=2))
            assert [e["event"] for e in events] == ["token", "token", "done"]
            with pytest.raises(DaemonRequestError) as info:
                client.call("chat", model="full", messages=[{"role": "user", "content": "x"}])
            assert info.value.code == "queue_full" and info.value.retry_after == 2.5
            # Leaving a stream early cancels it; the connection stays usable.
            for event in client.stream("generate", model="tiny", prompt="p", max_tokens=100_000):
                assert event["event"] == "token"
                break
            assert client.call("models")["models"][0]["name"] == "tiny"

    async with serving(pool, sock_path):
        await anyio.to_thread.run_sync(use)
    assert pool.in_flight == 0


def test_daemon_client_not_running(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunningError, match="no llamaproc daemon"):
        DaemonClient(tmp_path / "nothing.sock")


async def test_cmd_chat_and_ps(sock_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool = FakePool()
    args = argparse.Namespace(
        model="tiny", prompt="hello", daemon=True, socket=str(sock_path), state_dir=None, max_tokens=3, binary=None
    )
    async with serving(pool, sock_path):
        assert await anyio.to_thread.run_sync(cmd_chat, args) == 0
        assert capsys.readouterr().out == "tok0 tok1 tok2 \n"
        args.model = "missing"
        assert await anyio.to_thread.run_sync(cmd_chat, args) == 1
        assert "model_not_found" in capsys.readouterr().err
        ps_args = argparse.Namespace(socket=None, state_dir=str(sock_path.parent))  # finds STATE_DIR/serve.sock
        assert await anyio.to_thread.run_sync(cmd_ps, ps_args) == 0
        out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "PHASE", "PID", "PORT", "IN-FLIGHT", "QUEUED", "RESTARTS", "LAST", "USED"]
    assert out[1].split()[:7] == ["tiny", "Serving", "123", "4567", "0", "0", "0"]
    assert out[2].split() == ["big", "Pending", "-", "-", "0", "0", "0", "-"]
    assert pool.model.calls[0] == ("chat", [{"role": "user", "content": "hello"}], {"max_tokens": 3})


async def test_cmd_chat_interactive_keeps_history(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    pool = FakePool()
    monkeypatch.setattr("sys.stdin", io.StringIO("first\n\nsecond\n"))
    args = argparse.Namespace(
        model="tiny", prompt=None, daemon=True, socket=str(sock_path), state_dir=None, max_tokens=2, binary=None
    )
    async with serving(pool, sock_path):
        assert await anyio.to_thread.run_sync(cmd_chat, args) == 0
    assert capsys.readouterr().out == "tok0 tok1 \ntok0 tok1 \n"
    assert [call[1] for call in pool.model.calls] == [
        [{"role": "user", "content": "first"}],
        [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "tok0 tok1 "},
            {"role": "user", "content": "second"},
        ],
    ]


def test_ps_table_times() -> None:
    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    table = format_table(
        [
            {
                "name": "a",
                "phase": "Serving",
                "pid": 1,
                "port": 2,
                "in_flight": 1,
                "queued": 0,
                "restarts": 2,
                "last_used": (now - timedelta(seconds=5)).isoformat(),
            },
            {"name": "b", "phase": "Failed", "last_used": (now - timedelta(minutes=7)).isoformat()},
        ],
        now=now,
    )
    lines = table.splitlines()
    assert lines[1].endswith("5s ago") and lines[2].endswith("7m ago")
    assert lines[2].split()[:3] == ["b", "Failed", "-"]


def test_cmd_stop_not_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llamaproc.cli._daemon_cli import cmd_stop

    assert cmd_stop(argparse.Namespace(state_dir=str(tmp_path), socket=None)) == 1
    assert "not running" in capsys.readouterr().err


def test_stop_accepts_a_timeout_and_bad_arguments_map_to_bad_request() -> None:
    from llamaproc import InvalidArgumentError
    from llamaproc.cli._main import _parser
    from llamaproc.serve._socket import _code

    assert _parser().parse_args(["stop", "--timeout", "2.5"]).timeout == 2.5
    assert _parser().parse_args(["stop"]).timeout is None
    assert _code(InvalidArgumentError("max_tokens must be >= 0")) == "bad_request"
