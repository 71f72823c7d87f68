"""The socket protocol of ``llamaproc serve``, on the daemon's own request path.

The pool is a fake with the real interface: ``acquire()`` yields an endpoint
(the runtime's :class:`~llamaproc.runtime.Endpoint`) whose llama-server is a
scripted one (tests/unit/llama_stub.py). So every generate, chat and embed
request goes the way it goes in the daemon: its body built by the protocol's
functions, sent with the daemon's ``Upstream`` client, the answer read by the
``StreamReader``. These tests are about framing, ids, concurrency,
cancellation, timeouts and error mapping. The real pool and llama-server are
in tests/integration/test_daemon_socket.py.

The upstream client is built on asyncio, as the daemon is (uvicorn): the
tests that reach llama-server run on asyncio; those that never do (ping,
models, status, bad lines, pool errors, the socket file) run on trio too.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from llama_stub import PROMPT_TOKENS, LlamaStub
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from llamaproc.cli._daemon_cli import (
    DaemonClient,
    DaemonNotRunningError,
    DaemonRequestError,
    cmd_chat,
    cmd_ps,
    format_table,
)
from llamaproc.errors import (
    LlamaprocError,
    ModelNotFoundError,
    ModelUnavailableError,
    QueueFullError,
    ServerCrashedError,
    ServerError,
    ServerHungError,
    ShuttingDownError,
    StatusError,
)
from llamaproc.runtime import Endpoint
from llamaproc.serve import Upstream
from llamaproc.serve._socket import ActiveRequests, serve_socket
from llamaproc.types import Health, Timings

pytestmark = pytest.mark.anyio

#: For the tests that never reach llama-server: they run on trio too.
both_loops = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])

MESSAGES = [{"role": "user", "content": "x"}]


# --- fakes ---------------------------------------------------------------------------------------


class FakeEndpoint:
    """An endpoint whose server is a scripted llama-server.

    ``progress()`` adds ``cpu_step`` CPU seconds at each call (0: a hung
    server uses none). ``kill()`` and ``explain()`` do what a TextModel's do:
    a failure seen once the server has exited is its crash (or its hang,
    once it was killed for one).
    """

    pid = 1
    output = "boom\nmore"

    def __init__(self, stub: LlamaStub) -> None:
        self.stub = stub
        self.cpu = 0.0
        self.cpu_step = 0.0
        self.progress_calls = 0
        self.kills: list[str] = []
        self.explained: list[LlamaprocError] = []
        self.closed = False

    @property
    def base_url(self) -> str:
        return self.stub.base_url

    @property
    def api_key(self) -> str | None:
        return self.stub.api_key

    @property
    def returncode(self) -> int | None:
        return self.stub.returncode

    async def health(self) -> Health:
        return Health(status="ok")

    def progress(self) -> float | None:
        self.progress_calls += 1
        self.cpu += self.cpu_step
        return self.cpu

    async def wait(self) -> int | None:
        while self.stub.returncode is None:
            await anyio.sleep(0.01)
        return self.stub.returncode

    def describe_exit(self) -> str:
        return f"llama-server (pid {self.pid}) exited with code {self.returncode}"

    async def explain(self, error: LlamaprocError) -> LlamaprocError:
        self.explained.append(error)
        code = self.returncode
        if not isinstance(error, ServerError) or code is None:
            return error
        if self.kills:
            reason = self.kills[0]
            message = f"llama-server (pid {self.pid}) stopped answering and was killed: {reason}"
            return ServerHungError(message, reason=reason, returncode=code, output=self.output, pid=self.pid)
        return ServerCrashedError(self.describe_exit(), returncode=code, output=self.output, pid=self.pid)

    def kill(self, reason: str) -> None:
        self.kills.append(reason)
        self.stub.returncode = -9

    async def close(self) -> None:
        self.closed = True


class FakeStatus(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, serialize_by_alias=True)

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
    """``slots`` requests at once; the rest wait. Some names raise pool errors; the others get ``endpoint``."""

    def __init__(self, endpoint: FakeEndpoint | None = None, *, slots: int = 4) -> None:
        self.endpoint = endpoint
        self.slots = anyio.Semaphore(slots)
        self.asked: list[str] = []  # the names acquire() was called with
        self.in_flight = 0
        self.waiting = 0
        self.stats = FakeStats()
        self.draining = False
        self.closed = False

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
    async def acquire(self, name: str) -> AsyncIterator[FakeEndpoint]:
        self.asked.append(name)
        errors: dict[str, Exception] = {
            "missing": ModelNotFoundError("no model named 'missing'"),
            "full": QueueFullError("queue of 'full' is full", retry_after=2.5),
            "draining": ShuttingDownError("shutting down"),
            "failed": ModelUnavailableError("'failed' is Failed: too many restarts"),
            "refuses": StatusError(400, {"error": {"message": "bad n_probs"}}),
        }
        if name in errors:
            raise errors[name]
        assert self.endpoint is not None, "this test has no llama-server"
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.in_flight += 1
        try:
            yield self.endpoint
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


@pytest.fixture
async def llama() -> AsyncIterator[LlamaStub]:
    async with LlamaStub(api_key="sk-test") as stub:
        yield stub


@pytest.fixture
def endpoint(llama: LlamaStub) -> FakeEndpoint:
    endpoint = FakeEndpoint(llama)
    assert isinstance(endpoint, Endpoint)
    return endpoint


@pytest.fixture
def pool(endpoint: FakeEndpoint) -> FakePool:
    return FakePool(endpoint)


@asynccontextmanager
async def serving(pool: FakePool, path: Path, **options: Any) -> AsyncIterator[Path]:
    """The socket server on ``path``, with an upstream client as the daemon gives it."""
    async with Upstream(warm_for=0) as client, anyio.create_task_group() as tg:
        await tg.start(partial(serve_socket, pool, path, **{"client": client, **options}))
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


def generate(rid: Any, max_tokens: Any, **fields: Any) -> dict[str, Any]:
    return {"id": rid, "op": "generate", "model": "tiny", "prompt": "p", "max_tokens": max_tokens, **fields}


# --- simple ops ----------------------------------------------------------------------------------


@both_loops
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
        assert status["models"][0]["pid"] == 123 and status["models"][0]["lastUsed"] == "2024-01-02T03:04:05Z"
        assert status["models"][1]["pid"] is None
        assert status["stats"] == {"loads": 3, "evictions": 1, "restarts": 0, "idle_unloads": 2}
        assert status["draining"] is False
    assert pool.asked == []


async def test_chat_streams_tokens_then_done(sock_path: Path, llama: LlamaStub, pool: FakePool) -> None:
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
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 3, "total_tokens": PROMPT_TOKENS + 3},
        "timings": Timings(prompt_n=3, predicted_n=3, predicted_ms=1.5).model_dump(),
    }
    # Everything but the protocol's own fields goes to llama-server; a lone stop string becomes a list.
    assert [path for path, _ in llama.requests] == [b"/v1/chat/completions"]
    assert llama.bodies() == [
        {"messages": messages, "max_tokens": 3, "temperature": 0.5, "stop": ["\n"], "seed": 42, "stream": True}
    ]
    assert llama.headers[0][b"authorization"] == b"Bearer sk-test"  # the endpoint's key
    assert metrics.started == ["tiny"] and metrics.first == ["tiny"] and metrics.done == [("tiny", "ok", 3)]
    assert pool.in_flight == 0
    await wait_for(lambda: llama.open_streams == 0)
    assert llama.hangups == 0


async def test_generate_carries_token_ids(sock_path: Path, llama: LlamaStub, pool: FakePool) -> None:
    async with serving(pool, sock_path), connected(sock_path) as c:
        await c.send({"id": 5, "op": "generate", "model": "tiny", "prompt": "Once", "max_tokens": 2})
        events = await c.until_final(5)
        await c.send({"id": 6, "op": "generate", "model": "tiny", "prompt": [1, 2, 3], "max_tokens": 1})
        assert (await c.until_final(6))[-1]["event"] == "done"
    assert [(e["text"], e["token_id"]) for e in events[:2]] == [("tok0 ", 100), ("tok1 ", 101)]
    assert (events[2]["event"], events[2]["finish_reason"]) == ("done", "limit")
    assert [path for path, _ in llama.requests] == [b"/completion", b"/completion"]
    native = {"temperature": 0.0, "stream": True, "return_tokens": True}  # the library's defaults and stream flags
    assert llama.bodies() == [
        {"prompt": "Once", "n_predict": 2, **native},
        {"prompt": [1, 2, 3], "n_predict": 1, **native},
    ]


async def test_embed(sock_path: Path, llama: LlamaStub, pool: FakePool) -> None:
    async with serving(pool, sock_path), connected(sock_path) as c:
        await c.send({"id": "e", "op": "embed", "model": "tiny", "input": ["ab", "abcd"]})
        assert await c.event() == {"id": "e", "event": "result", "embeddings": [[2.0, 0.5], [4.0, 0.5]]}
        await c.send({"id": "e", "op": "embed", "model": "tiny", "input": "one"})
        assert (await c.event())["embeddings"] == [[3.0, 0.5]]
    assert [path for path, _ in llama.requests] == [b"/v1/embeddings"] * 2
    assert llama.bodies() == [{"input": ["ab", "abcd"]}, {"input": ["one"]}]
    assert pool.in_flight == 0


async def test_non_ascii_text_is_sent_as_utf8(sock_path: Path, llama: LlamaStub, pool: FakePool) -> None:
    llama.token_text = "héllo ✓"
    async with serving(pool, sock_path), connected(sock_path) as c:
        await c.send({"id": "u", "op": "chat", "model": "tiny", "messages": MESSAGES, "max_tokens": 1})
        raw = await c.line()
        assert "héllo ✓".encode() in raw
        await c.until_final("u")
        llama.token_text = "bad \udc80 surrogate"
        await c.send({"id": "v", "op": "chat", "model": "tiny", "messages": MESSAGES, "max_tokens": 1})
        raw = await c.line()
        assert b"\\udc80" in raw  # escaped rather than sent as invalid UTF-8
        raw.decode("ascii")


# --- bad input -----------------------------------------------------------------------------------


@both_loops
async def test_bad_requests_get_error_events_and_the_connection_keeps_working(sock_path: Path) -> None:
    pool = FakePool()
    msgs = MESSAGES
    # (request, the id of the answer, its code, the field it names)
    cases: list[tuple[bytes | dict[str, Any], Any, str, str | None]] = [
        (b"{not json\n", None, "invalid_json", None),
        (b"\xff\xfe\n", None, "invalid_json", None),
        (b"[1, 2]\n", None, "invalid_json", None),
        (b'"hello"\n', None, "invalid_json", None),
        ({"id": "1"}, "1", "bad_request", "op"),  # no op
        ({"id": "2", "op": "dance"}, "2", "unknown_op", None),
        ({"op": "dance"}, None, "unknown_op", None),
        ({"op": "chat", "model": "tiny", "messages": msgs}, None, "bad_request", "id"),  # no id
        ({"id": True, "op": "ping"}, None, "bad_request", "id"),
        ({"id": [1], "op": "models"}, None, "bad_request", "id"),
        ({"id": "3", "op": "chat", "messages": msgs}, "3", "bad_request", "model"),  # no model
        ({"id": "4", "op": "chat", "model": "tiny"}, "4", "bad_request", "messages"),  # no messages
        ({"id": "5", "op": "chat", "model": "tiny", "messages": []}, "5", "bad_request", "messages"),
        ({"id": "6", "op": "chat", "model": "tiny", "messages": ["hi"]}, "6", "bad_request", "messages"),
        ({"id": "7", "op": "generate", "model": "tiny"}, "7", "bad_request", "prompt"),
        (generate("8", "9"), "8", "bad_request", "max_tokens"),
        (generate("9", 3, temperature="hot"), "9", "bad_request", "temperature"),
        (generate("a", 3, stop=[1]), "a", "bad_request", "stop"),
        (generate("a2", -5), "a2", "bad_request", "max_tokens"),
        (generate("a3", 3, n_predict=3), "a3", "bad_request", "n_predict"),
        ({"id": "b", "op": "embed", "model": "tiny", "input": []}, "b", "bad_request", "input"),
        ({"id": "c", "op": "embed", "model": "tiny", "input": [1]}, "c", "bad_request", "input"),
        ({"id": "d", "op": "cancel"}, "d", "not_found", None),
        ({"op": "cancel"}, None, "bad_request", None),
    ]
    async with serving(pool, sock_path), connected(sock_path) as c:
        for request, rid, code, param in cases:
            await c.send(request)
            event = await c.event()
            assert event["event"] == "error", request
            assert (event["id"], event["code"], event.get("param")) == (rid, code, param), request
            assert isinstance(event["message"], str) and event["message"]
            await c.send({"op": "ping"})
            assert (await c.event())["event"] == "result"
    assert pool.asked == []  # nothing went to the pool, so nothing to llama-server


@both_loops
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


@both_loops
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


async def test_default_line_limit_is_one_mebibyte(sock_path: Path, llama: LlamaStub, pool: FakePool) -> None:
    async with serving(pool, sock_path), connected(sock_path) as c:
        ok = json.dumps({"id": "ok", "op": "embed", "model": "tiny", "input": ["a" * 900_000]}).encode()
        await c.send(ok + b"\n")
        assert (await c.event())["embeddings"] == [[900_000.0, 0.5]]
        await c.send(b'{"op": "ping", "x": "' + b"a" * (2 << 20) + b'"}\n{"op": "ping", "id": 1}\n')
        assert (await c.event())["code"] == "line_too_long"
        assert (await c.event())["id"] == 1
    assert len(llama.requests) == 1


# --- concurrency and cancellation ----------------------------------------------------------------


async def test_several_requests_in_flight_on_one_connection(sock_path: Path, llama: LlamaStub, pool: FakePool) -> None:
    llama.pause_after = 1  # each stream sends one token, then waits for the others
    async with serving(pool, sock_path), connected(sock_path) as c:
        await c.send({"id": "a", "op": "chat", "model": "tiny", "messages": MESSAGES, "max_tokens": 8})
        await c.send(generate("b", 8))
        await c.send({"id": "c", "op": "embed", "model": "tiny", "input": ["z"]})
        await c.send({"id": "a", "op": "models"})  # "a" is still in flight
        events: list[dict[str, Any]] = []
        while not {"a", "b"} <= {e["id"] for e in events if e["event"] == "token"}:
            events.append(await c.event())
        llama.resume.set()  # both streams are open at once
        while sum(e["event"] in ("done", "result") for e in events) < 3:
            events.append(await c.event())
    by_id: dict[str, list[str]] = {}
    for e in events:
        by_id.setdefault(e["id"], []).append(e["event"])
    assert by_id["a"] == ["token"] * 8 + ["done"]
    assert by_id["b"] == ["token"] * 8 + ["done"]
    assert by_id["c"] == ["result"]
    # The duplicate is answered without the id, which would end "a" for the client.
    (duplicate,) = [e for e in events if e["id"] is None]
    assert (duplicate["event"], duplicate["code"], duplicate["target"]) == ("error", "duplicate_id", "a")
    # They really ran at once: the tokens of a and b interleave.
    order = [e["id"] for e in events if e["event"] == "token"]
    assert order != sorted(order)
    assert len(llama.requests) == 3


async def test_duplicate_id_leaves_the_running_request_alone(sock_path: Path, llama: LlamaStub, pool: FakePool) -> None:
    llama.pause_after = 1
    async with serving(pool, sock_path), connected(sock_path) as c:
        await c.send(generate("a", 3))
        first = await c.event()
        assert (first["id"], first["event"]) == ("a", "token")
        # Whatever its op: only a cancel by id refers to the running request.
        duplicates: list[dict[str, Any]] = [
            generate("a", 5),
            {"id": "a", "op": "chat", "model": "tiny", "messages": MESSAGES},
            {"id": "a", "op": "embed", "model": "tiny", "input": ["x"]},
            {"id": "a", "op": "models"},
            {"id": "a", "op": "ping"},
            {"id": "a", "op": "dance"},
            {"id": "a"},
            {"op": "cancel", "target": "a", "id": "a"},  # refused, so it cancels nothing
        ]
        for request in duplicates:
            await c.send(request)
            event = await c.event()
            assert (event["id"], event["event"], event["code"], event["target"]) == (None, "error", "duplicate_id", "a")
            assert "still in flight" in event["message"]
        llama.resume.set()
        events = [first, *await c.until_final("a")]
        assert [(e["event"], e.get("token_id")) for e in events] == [
            ("token", 100),
            ("token", 101),
            ("token", 102),
            ("done", None),
        ]
        assert events[-1]["usage"]["completion_tokens"] == 3
        # Once it has ended, the id is free again.
        await c.send(generate("a", 1))
        assert [e["event"] for e in await c.until_final("a")] == ["token", "done"]
    assert [body["n_predict"] for body in llama.bodies()] == [3, 1]  # the duplicates never went out
    assert pool.asked == ["tiny", "tiny"]


async def test_id_can_be_reused_after_its_last_event(sock_path: Path, llama: LlamaStub, pool: FakePool) -> None:
    async with serving(pool, sock_path), connected(sock_path) as c:
        for _ in range(3):
            await c.send(generate("same", 2))
            assert (await c.until_final("same"))[-1]["event"] == "done"
    assert len(llama.requests) == 3


async def test_too_many_requests_in_flight(sock_path: Path, llama: LlamaStub, endpoint: FakeEndpoint) -> None:
    pool = FakePool(endpoint, slots=1)
    llama.pause_after = 0  # "a" holds the slot until resumed; "b" waits for it
    async with serving(pool, sock_path, max_in_flight=2), connected(sock_path) as c:
        for rid in "abc":
            await c.send(generate(rid, 2))
        assert (await c.until_final("c"))[-1]["code"] == "too_many_requests"
        llama.resume.set()
        assert (await c.until_final("b"))[-1]["event"] == "done"
    assert len(llama.requests) == 2


@pytest.mark.parametrize("form", ["id", "target"])
async def test_cancel_op(sock_path: Path, llama: LlamaStub, endpoint: FakeEndpoint, form: str) -> None:
    pool = FakePool(endpoint, slots=1)
    llama.pause_after = 1  # "long" sends a token, then nothing until it is cancelled
    metrics = FakeMetrics()
    async with serving(pool, sock_path, metrics=metrics), connected(sock_path) as c:
        await c.send(generate("long", 10_000))
        await c.send(generate("queued", 1))
        assert (await c.event())["event"] == "token"
        await wait_for(lambda: pool.waiting == 1)
        if form == "id":
            await c.send({"op": "cancel", "id": "queued"})
            await c.send({"op": "cancel", "id": "long"})
        else:
            await c.send({"op": "cancel", "target": "queued", "id": "c1"})
            await c.send({"op": "cancel", "target": "long", "id": "c2"})
            await c.send({"op": "cancel", "target": "nobody", "id": "c3"})
        finals: dict[str, dict[str, Any]] = {}
        while len(finals) < (2 if form == "id" else 5):
            e = await c.event()
            if e["event"] != "token":
                finals[e["id"]] = e
        for rid in ("long", "queued"):
            assert (finals[rid]["event"], finals[rid]["code"]) == ("error", "cancelled")
        if form == "target":
            assert finals["c1"] == {"id": "c1", "event": "result", "target": "queued", "cancelled": True}
            assert finals["c2"]["cancelled"] is True and finals["c3"]["cancelled"] is False
        assert pool.in_flight == 0 and pool.waiting == 0
        # llama-server sees its stream closed (which frees its slot); the queued request never reached it.
        await wait_for(lambda: llama.open_streams == 0)
        assert llama.hangups == 1 and len(llama.requests) == 1
        # The connection and the ids are still usable.
        await c.send(generate("long", 1))
        assert (await c.until_final("long"))[-1]["event"] == "done"
    assert sorted(d[1] for d in metrics.done) == ["cancelled", "cancelled", "ok"]


async def test_disconnect_cancels_streams_and_queued_requests(
    sock_path: Path, llama: LlamaStub, endpoint: FakeEndpoint
) -> None:
    pool = FakePool(endpoint, slots=1)
    llama.pause_after = 1
    metrics = FakeMetrics()
    async with serving(pool, sock_path, metrics=metrics):
        async with connected(sock_path) as c:
            await c.send(generate("1", 100_000))
            await c.send({"id": "2", "op": "chat", "model": "tiny", "messages": MESSAGES})
            assert (await c.event())["event"] == "token"
            await wait_for(lambda: pool.waiting == 1 and pool.in_flight == 1)
        # Closed: the stream is closed (llama-server sees it) and the queued request has left the queue.
        await wait_for(lambda: pool.in_flight == 0 and pool.waiting == 0 and llama.open_streams == 0)
        assert llama.hangups == 1 and len(llama.requests) == 1
        await wait_for(lambda: len(metrics.done) == 2)
        assert sorted(d[1] for d in metrics.done) == ["cancelled", "cancelled"]
        # The server keeps serving others.
        async with connected(sock_path) as c:
            await c.send(generate("x", 1))
            assert (await c.until_final("x"))[-1]["event"] == "done"


async def test_half_close_still_gets_the_answers(sock_path: Path, llama: LlamaStub, pool: FakePool) -> None:
    llama.pause_after = 1
    async with serving(pool, sock_path), connected(sock_path) as c:
        await c.send(generate("1", 20))
        first = await c.event()
        await c.stream.send_eof()  # like `nc -N`: nothing more to send, still listening
        llama.resume.set()
        events = [first, *await c.until_final("1")]
        assert len(events) == 21 and events[-1]["event"] == "done"
        assert await c.eof()
    assert pool.in_flight == 0 and llama.hangups == 0


async def test_slow_reader_is_dropped_after_the_write_timeout(
    sock_path: Path, llama: LlamaStub, pool: FakePool
) -> None:
    llama.token_text = "x" * 65536  # fills the socket buffers quickly
    async with serving(pool, sock_path, write_timeout=0.3), connected(sock_path) as c:
        await c.send(generate("1", 1_000_000))
        await wait_for(lambda: pool.in_flight == 1)
        # Never read: the daemon drops the connection and frees the slot (llama-server sees its stream closed).
        await wait_for(lambda: pool.in_flight == 0 and llama.open_streams == 0, timeout=10)
        assert llama.hangups == 1
        async with connected(sock_path) as other:
            await other.send({"op": "ping"})
            assert (await other.event())["event"] == "result"


# --- errors --------------------------------------------------------------------------------------


@both_loops
@pytest.mark.parametrize(
    ("model", "code"),
    [
        ("missing", "model_not_found"),
        ("full", "queue_full"),
        ("draining", "shutting_down"),
        ("failed", "model_unavailable"),
        ("refuses", "bad_request"),
    ],
)
async def test_pool_errors_become_error_events(sock_path: Path, model: str, code: str) -> None:
    pool = FakePool()
    metrics = FakeMetrics()
    async with serving(pool, sock_path, metrics=metrics), connected(sock_path) as c:
        await c.send({"id": "1", "op": "chat", "model": model, "messages": MESSAGES})
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
    assert pool.asked == [model, model]


async def test_crash_mid_stream_is_an_upstream_error(
    sock_path: Path, llama: LlamaStub, endpoint: FakeEndpoint, pool: FakePool
) -> None:
    llama.fail_at = 2  # two tokens, then the connection is cut and the process has exited with -9
    async with serving(pool, sock_path), connected(sock_path) as c:
        await c.send(generate("1", 9))
        events = await c.until_final("1")
        assert [e["event"] for e in events] == ["token", "token", "error"]
        assert events[-1]["code"] == "upstream_error"
        assert events[-1]["message"] == "llama-server (pid 1) exited with code -9"  # first line only
        assert len(endpoint.explained) == 1 and endpoint.kills == []
        # Later requests are refused at once, as the endpoint has exited.
        await c.send({"id": "2", "op": "chat", "model": "tiny", "messages": MESSAGES})
        event = await c.event()
        assert (event["code"], event["message"]) == ("upstream_error", "llama-server (pid 1) exited with code -9")
    assert pool.in_flight == 0 and len(llama.requests) == 1
    await wait_for(lambda: llama.open_streams == 0)
    assert llama.hangups == 0  # llama-server cut it, not the daemon


async def test_a_silent_endpoint_is_killed_after_the_stall_timeout(
    sock_path: Path, llama: LlamaStub, endpoint: FakeEndpoint, pool: FakePool
) -> None:
    llama.pause_after = 1  # one token, then silence
    endpoint.cpu_step = 0.0  # and no CPU time used: it hangs
    asked: list[str] = []

    def stall_timeout(model: str) -> float:
        asked.append(model)
        return 0.5

    metrics = FakeMetrics()
    async with serving(pool, sock_path, stall_timeout=stall_timeout, metrics=metrics), connected(sock_path) as c:
        await c.send(generate("s", 5))
        events = await c.until_final("s")
    assert [e["event"] for e in events] == ["token", "error"]
    assert events[-1]["code"] == "upstream_timeout"
    assert events[-1]["message"].startswith("llama-server (pid 1) stopped answering and was killed: ")
    (reason,) = endpoint.kills
    assert "sent nothing for 0.5 s" in reason and reason in events[-1]["message"]
    assert endpoint.progress_calls >= 2 and asked == ["tiny"]
    assert pool.in_flight == 0 and metrics.done == [("tiny", "upstream_timeout", 1)]
    await wait_for(lambda: llama.open_streams == 0)  # the stream was closed, too
    assert llama.hangups == 1


async def test_a_working_endpoint_is_not_stalled(
    sock_path: Path, llama: LlamaStub, endpoint: FakeEndpoint, pool: FakePool
) -> None:
    llama.pause_after = 1  # one token, then silence ...
    endpoint.cpu_step = 1.0  # ... while its CPU time grows: a long prompt, say
    async with serving(pool, sock_path, stall_timeout=lambda model: 0.5), connected(sock_path) as c:
        await c.send(generate("s", 3))
        first = await c.event()
        assert (first["id"], first["event"]) == ("s", "token")
        # Silent for two stall timeouts (the endpoint's progress is read every half of one) ...
        await wait_for(lambda: endpoint.progress_calls >= 4)
        llama.resume.set()
        events = [first, *await c.until_final("s")]
    # ... and no error: the answer resumed and ended normally.
    assert [e["event"] for e in events] == ["token", "token", "token", "done"]
    assert endpoint.kills == [] and llama.hangups == 0 and llama.returncode is None


async def test_a_request_cut_off_by_shutdown_ends_with_shutting_down(
    sock_path: Path, llama: LlamaStub, pool: FakePool
) -> None:
    llama.pause_after = 1
    active = ActiveRequests()
    async with serving(pool, sock_path, active=active), connected(sock_path) as c:
        await c.send(generate("late", 10))
        assert (await c.event())["event"] == "token"
        assert active.count == 1
        # What the daemon does after its drain timeout: it closes the pool, which stops the model.
        pool.closed = True
        llama.crash()
        with anyio.fail_after(5):
            await active.wait_idle()  # the last event is written
        event = await c.event()
    assert (event["id"], event["event"], event["code"]) == ("late", "error", "shutting_down")
    assert active.count == 0 and pool.in_flight == 0 and llama.hangups == 0


# --- the socket file -----------------------------------------------------------------------------


@both_loops
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


@both_loops
async def test_refuses_to_replace_a_regular_file(sock_path: Path) -> None:
    sock_path.write_text("precious")
    with pytest.raises(OSError, match="not a socket"):
        await serve_socket(FakePool(), sock_path)
    assert sock_path.read_text() == "precious"


async def test_open_connections_are_closed_on_cancel(sock_path: Path, llama: LlamaStub, pool: FakePool) -> None:
    llama.pause_after = 1
    async with connected_after_serving(pool, sock_path) as (c, stop):
        await c.send(generate("1", 100_000))
        assert (await c.event())["event"] == "token"
        stop()
        with anyio.fail_after(5):
            while True:  # tokens, then the end of the stream
                try:
                    await c.line()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    assert pool.in_flight == 0
    await wait_for(lambda: llama.open_streams == 0)
    assert llama.hangups == 1
    assert not sock_path.exists()


@asynccontextmanager
async def connected_after_serving(pool: FakePool, path: Path) -> AsyncIterator[tuple[Client, Callable[[], None]]]:
    """A connection to a socket server that makes its own upstream client; and how to stop that server."""
    async with anyio.create_task_group() as outer:
        scope = anyio.CancelScope()

        async def run(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await serve_socket(pool, path, task_status=task_status)

        await outer.start(run)
        async with connected(path) as c:
            yield c, scope.cancel


# --- the blocking client and the CLI --------------------------------------------------------------


async def test_daemon_client(sock_path: Path, llama: LlamaStub, pool: FakePool) -> None:
    llama.pause_after = 5  # a long stream waits after five tokens; short ones end before

    def use() -> None:
        with DaemonClient(sock_path, timeout=5) as client:
            assert client.call("ping") == {"id": "1", "event": "result", "pong": True}
            events = list(client.stream("generate", model="tiny", prompt="p", max_tokens=2))
            assert [e["event"] for e in events] == ["token", "token", "done"]
            with pytest.raises(DaemonRequestError) as info:
                client.call("chat", model="full", messages=MESSAGES)
            assert info.value.code == "queue_full" and info.value.retry_after == 2.5
            with pytest.raises(DaemonRequestError) as info:
                client.call("chat", model="failed", messages=MESSAGES)
            assert info.value.code == "model_unavailable"
            # Leaving a stream early cancels it; the connection stays usable.
            for event in client.stream("generate", model="tiny", prompt="p", max_tokens=100_000):
                assert event["event"] == "token"
                break
            assert client.call("models")["models"][0]["name"] == "tiny"

    async with serving(pool, sock_path):
        await anyio.to_thread.run_sync(use)
    assert pool.in_flight == 0
    await wait_for(lambda: llama.open_streams == 0)
    assert llama.hangups == 1  # the stream left early was closed


def test_daemon_client_not_running(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunningError, match="no llamaproc daemon"):
        DaemonClient(tmp_path / "nothing.sock")


async def test_cmd_chat_and_ps(
    sock_path: Path, llama: LlamaStub, pool: FakePool, capsys: pytest.CaptureFixture[str]
) -> None:
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
    assert out[0].split() == [
        "NAME", "PHASE", "READY", "PID", "PORT", "IN-FLIGHT", "QUEUED", "RESTARTS", "LEASE", "LAST", "USED"
    ]  # fmt: skip
    assert out[1].split()[:8] == ["tiny", "Serving", "-", "123", "4567", "0", "0", "0"]
    assert out[2].split() == ["big", "Pending", "-", "-", "-", "0", "0", "0", "-", "-"]
    assert llama.bodies(b"/v1/chat/completions") == [
        {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "temperature": 0.0, "stream": True}
    ]


async def test_cmd_chat_interactive_keeps_history(
    sock_path: Path,
    llama: LlamaStub,
    pool: FakePool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("first\n\nsecond\n"))
    args = argparse.Namespace(
        model="tiny", prompt=None, daemon=True, socket=str(sock_path), state_dir=None, max_tokens=2, binary=None
    )
    async with serving(pool, sock_path):
        assert await anyio.to_thread.run_sync(cmd_chat, args) == 0
    assert capsys.readouterr().out == "tok0 tok1 \ntok0 tok1 \n"
    assert [body["messages"] for body in llama.bodies()] == [
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
                "inFlight": 1,
                "queued": 0,
                "restarts": 2,
                "roles": [{"readyReplicas": 1, "replicas": 2}],
                "lease": {"memory": 10022624, "priority": "normal", "preemptRequested": True},
                "lastUsed": (now - timedelta(seconds=5)).isoformat(),
            },
            {"name": "b", "phase": "Failed", "lastUsed": (now - timedelta(minutes=7)).isoformat()},
        ],
        now=now,
    )
    lines = table.splitlines()
    assert lines[1].endswith("5s ago") and lines[2].endswith("7m ago")
    assert lines[2].split()[:3] == ["b", "Failed", "-"]
    assert lines[1].split()[2] == "1/2" and lines[2].split()[2] == "-"
    assert lines[1].split()[8] == "9.6MiB@normal!" and lines[2].split()[8] == "-"


def test_cmd_stop_not_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llamaproc.cli._daemon_cli import cmd_stop

    assert cmd_stop(argparse.Namespace(state_dir=str(tmp_path), socket=None)) == 1
    assert "not running" in capsys.readouterr().err


def test_stop_accepts_a_timeout_and_bad_arguments_map_to_bad_request() -> None:
    from llamaproc import InvalidArgumentError
    from llamaproc.cli._main import _parser
    from llamaproc.protocol import error_code

    assert _parser().parse_args(["stop", "--timeout", "2.5"]).timeout == 2.5
    assert _parser().parse_args(["stop"]).timeout is None
    assert error_code(InvalidArgumentError("max_tokens must be >= 0")) == "bad_request"
