"""Pieces of the daemon that are easier to pin down without processes.

The HTTP proxy's stream relay (with a fake upstream answer), the upstream
connection pool's sweeping of dead keep-alive connections (against a local
asyncio server), and the default wait of ``llamaproc stop``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import anyio
import pytest
from starlette.types import Message

from llamaproc import LlamaprocError
from llamaproc.cli._daemon_cli import STOP_TIMEOUT, _default_stop_timeout
from llamaproc.runtime import ServeConfig
from llamaproc.serve import ServeMetrics
from llamaproc.serve._proxy import ProxyState, _Call
from llamaproc.serve._upstream import Upstream, UpstreamError, UpstreamResponse, _Connection

pytestmark = pytest.mark.anyio


class FakePool:
    closed = False
    config = ServeConfig.model_validate({"models": {"tiny": {"path": "/nonexistent/tiny.gguf"}}})

    def names(self) -> list[str]:
        return ["tiny"]


class FakeEndpoint:
    returncode: int | None = None
    api_key = None

    def progress(self) -> float | None:
        return None

    def kill(self, reason: str) -> None:
        self.returncode = -9

    async def explain(self, error: LlamaprocError) -> LlamaprocError:
        return error


class FakeResponse:
    """What ``Upstream.post`` returns, with a body given as chunks."""

    status = 200
    content_type = b"text/event-stream"

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)

    async def next_chunk(self) -> bytes | None:
        return next(self._chunks, None)


async def relay(chunks: list[bytes], pool: FakePool | None = None) -> tuple[bytes, _Call]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    state = ProxyState(pool or FakePool(), Upstream(), ServeMetrics(), 1 << 20)  # type: ignore[arg-type]
    call = _Call(state, "tiny", 0.0, send)
    await call._relay_stream(FakeEndpoint(), "/v1/completions", FakeResponse(chunks))  # type: ignore[arg-type]
    assert sent[0]["type"] == "http.response.start" and sent[-1]["more_body"] is False
    return b"".join(m.get("body", b"") for m in sent[1:]), call


async def test_relay_rewrites_the_model_field_and_ends_a_cut_stream_with_an_error_event() -> None:
    body, call = await relay(
        [
            b'data: {"choices":[{"text":"a"}],"model":"tiny.gguf"}\n\n',
            b'data: {"choices":[{"text":"b"}],"model":"tiny.gguf"}',  # cut before its blank line: no event
        ]
    )
    assert b"tiny.gguf" not in body
    assert body.count(b'"model":"tiny"') == 1
    error = json.loads(body.rsplit(b"data: ", 1)[1])["error"]  # no [DONE]: an error event of ours
    assert (error["code"], call.status) == ("upstream_error", "502")


async def test_relay_passes_events_on_whatever_their_line_ends() -> None:
    body, call = await relay([b'data: {"choices":[{"text":"a"}],"model":"x"}\r\n\r', b"\ndata: [DONE]\r\n\r\n"])
    assert body == b'data: {"choices":[{"text":"a"}],"model":"tiny"}\n\ndata: [DONE]\n\n'
    assert (call.status, call.tokens) == ("200", 1)


async def test_relay_ends_a_stream_cut_by_a_shutdown_with_a_shutting_down_event() -> None:
    pool = FakePool()
    pool.closed = True
    body, call = await relay([b'data: {"model":"x"}\n\n'], pool)
    assert json.loads(body.rsplit(b"data: ", 1)[1])["error"]["code"] == "shutting_down"
    assert call.status == "503"


class Server:
    """A local HTTP server answering ``{}`` with keep-alive; it can close every connection it has."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close_connections()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def close_connections(self) -> None:
        for writer in self.writers:
            writer.close()


async def test_upstream_closes_connections_to_a_server_that_went_away() -> None:
    async with Upstream(keepalive_expiry=0.2) as upstream, Server() as gone, Server() as other:
        response = await upstream.post(gone.url, "/v1/completions", b"{}")
        assert await response.read() == b"{}"
        response.close()
        assert upstream.idle_connections() == 1
        # The connection is reused while the server keeps it.
        response = await upstream.post(gone.url, "/v1/completions", b"{}")
        await response.read()
        response.close()
        assert upstream.idle_connections() == 1

        assert len(gone.writers) == 1
        gone.close_connections()  # the child stopped: it closed its end
        await anyio.sleep(0.15)  # the FIN arrives; the expiry has not passed yet
        upstream.sweep()
        assert upstream.idle_connections() == 0
        assert upstream._idle == {}  # no address kept with an empty list

        # Sweeps also happen as connections are put back (at most every expiry / 2).
        response = await upstream.post(other.url, "/v1/completions", b"{}")
        await response.read()
        response.close()
        other.close_connections()
        await anyio.sleep(0.15)
        response = await upstream.post(other.url, "/v1/completions", b"{}")  # a fresh connection
        await response.read()
        response.close()
        assert upstream.idle_connections() == 1


async def test_upstream_sweeper_runs_without_traffic() -> None:
    async with Upstream(keepalive_expiry=0.1, warm_for=0) as upstream, Server() as server:
        response = await upstream.post(server.url, "/v1/completions", b"{}")
        await response.read()
        response.close()
        assert upstream.idle_connections() == 1
        with anyio.move_on_after(0.3):
            await upstream.run_sweeper()
        assert upstream.idle_connections() == 0  # expired, and nobody had to ask


async def test_upstream_keeps_a_spare_connection_while_an_address_is_in_use() -> None:
    async with Upstream(keepalive_expiry=0.1, warm_for=0.6) as upstream, Server() as server:
        async with anyio.create_task_group() as tg:
            tg.start_soon(upstream.run_sweeper)
            response = await upstream.post(server.url, "/v1/completions", b"{}", stream=True)
            await anyio.sleep(0.02)
            server.writers[0].close()  # as llama-server does after a streamed answer
            response.close()
            await anyio.sleep(0.05)
            # A spare was opened when the answer ended, before anyone needed it.
            assert upstream.idle_connections() == 1
            assert len(server.writers) == 2
            await anyio.sleep(0.25)  # past the keep-alive expiry: renewed, not dropped
            assert upstream.idle_connections() == 1
            assert len(server.writers) >= 3
            response = await upstream.post(server.url, "/v1/completions", b"{}")
            assert await response.read() == b"{}"  # answered on the spare
            response.close()
            await anyio.sleep(0.8)  # no request for longer than warm_for: the address goes cold
            assert upstream.idle_connections() == 0
            assert upstream._used == {}
            tg.cancel_scope.cancel()


async def test_upstream_forgets_a_spare_for_a_server_that_stopped() -> None:
    async with Upstream(keepalive_expiry=0.1, warm_for=60) as upstream, Server() as server:
        async with anyio.create_task_group() as tg:
            tg.start_soon(upstream.run_sweeper)
            response = await upstream.post(server.url, "/v1/completions", b"{}")
            await response.read()
            response.close()
            assert server.server is not None
            server.server.close()  # the child stopped: nothing listens on its port any more
            await server.server.wait_closed()
            server.close_connections()
            await anyio.sleep(0.3)
            assert upstream.idle_connections() == 0  # no spare to a port nobody listens on
            assert upstream._used == {}
            tg.cancel_scope.cancel()


class NullWriter:
    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def chunked_response(pieces: list[bytes], *, eof: bool = True) -> UpstreamResponse:
    """A chunked answer whose body arrives in ``pieces`` (then end of file if ``eof``)."""
    reader = asyncio.StreamReader()
    for piece in pieces:
        reader.feed_data(piece)
    if eof:
        reader.feed_eof()
    conn = _Connection(reader, NullWriter())  # type: ignore[arg-type]
    return UpstreamResponse(Upstream(), ("127.0.0.1", 1), conn, 200, {b"transfer-encoding": b"chunked"}, True)


async def body_of(response: UpstreamResponse) -> tuple[bytes, int]:
    parts = []
    while (part := await response.next_chunk()) is not None:
        parts.append(part)
    return b"".join(parts), len(parts)


WIRE = b"7\r\ndata: a\r\n19;ext=1\r\n\ndata: {\"content\":\"bc\"}\n\n\r\n0\r\nX-Trailer: 1\r\n\r\n"
BODY = b"data: a\ndata: {\"content\":\"bc\"}\n\n"


async def test_chunked_answers_are_unframed_however_they_are_split() -> None:
    for i in range(len(WIRE) + 1):
        for j in range(i, len(WIRE) + 1):
            response = chunked_response([WIRE[:i], WIRE[i:j], WIRE[j:]])
            assert await body_of(response) == (BODY, 2)  # one piece per chunk
            assert response._done and response._keep
    # A chunk goes on as soon as it is whole, before the rest of the answer arrives.
    response = chunked_response([WIRE[:14]], eof=False)
    assert await response.next_chunk() == b"data: a"
    assert response._conn is not None
    response._conn.reader.feed_data(WIRE[14:])
    response._conn.reader.feed_eof()
    assert await response.next_chunk() == BODY[7:]
    assert await response.next_chunk() is None


async def test_bad_chunked_framing_is_an_upstream_error() -> None:
    for wire in (
        b"zz\r\nabc\r\n0\r\n\r\n",  # not a hex size
        b"3\r\nabcXY0\r\n\r\n",  # no CRLF after the data
        b"-3\r\nabc\r\n0\r\n\r\n",  # negative size
        b"9" * 70000,  # a size line that never ends
        b"3\r\nabc\r\n",  # cut before the last chunk
    ):
        with pytest.raises(UpstreamError):
            await body_of(chunked_response([wire]))


def test_stop_waits_for_the_drain_timeout_named_in_serve_json(tmp_path: Path) -> None:
    assert STOP_TIMEOUT >= 30 + 20  # the default drain (30 s) and time to stop the children
    assert _default_stop_timeout(tmp_path) == STOP_TIMEOUT
    (tmp_path / "serve.json").write_text(json.dumps({"pid": 1, "drain_timeout": 100}))
    assert _default_stop_timeout(tmp_path) == 130
    (tmp_path / "serve.json").write_text(json.dumps({"pid": 1, "drain_timeout": 5}))
    assert _default_stop_timeout(tmp_path) == STOP_TIMEOUT
    (tmp_path / "serve.json").write_text("not json")
    assert _default_stop_timeout(tmp_path) == STOP_TIMEOUT
