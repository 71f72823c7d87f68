"""The daemon's upstream HTTP client (``Upstream``) against small asyncio servers that misbehave on purpose.

Each server runs in the test's own event loop and records the connections it
accepted and the requests it read, so a test can tell whether a connection was
reused and whether a request was sent twice. Waits are for conditions (with
a per-test timeout as the safety net), never for a clock.
"""

from __future__ import annotations

import asyncio
import select
import socket
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self, cast

import anyio
import pytest

from llamaproc import TransportError
from llamaproc.serve import Upstream, UpstreamError, UpstreamResponse, UpstreamTimeout
from llamaproc.serve._upstream import MAX_BODY, MAX_HEAD, _Connection

# asyncio only (Upstream is built on asyncio); a test that hangs fails after a minute.
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@dataclass
class Request:
    line: bytes
    headers: dict[bytes, bytes]
    body: bytes
    connection: int  # the index of the connection it came on


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"

#: Answers one request: write to the writer; return False to close the connection after it.
Answer = Callable[["Server", Request, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


async def answer_ok(
    server: Server, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    writer.write(OK)
    await writer.drain()
    return True


def answer_bytes(data: bytes, *, keep: bool = True) -> Answer:
    async def answer(
        server: Server, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(data)
        await writer.drain()
        return keep

    return answer


def answer_then_wait(data: bytes = b"") -> Answer:
    """Write ``data`` (perhaps nothing), then nothing more until the client closes the connection."""

    async def answer(
        server: Server, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(data)
        await writer.drain()
        await reader.read()
        return False

    return answer


answer_never = answer_then_wait()


class Server:
    """An HTTP server on ``host`` that reads requests and answers each with ``answer``."""

    def __init__(self, answer: Answer = answer_ok, *, host: str = "127.0.0.1", rcvbuf: int = 0) -> None:
        self.answer = answer
        self.host = host
        self.rcvbuf = rcvbuf
        self.writers: list[asyncio.StreamWriter] = []
        self.requests: list[Request] = []
        self.got_request = asyncio.Event()
        self.client_gone = asyncio.Event()  # the client closed a connection
        self.release = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> Self:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        if self.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)  # inherited by accepted sockets
        sock.bind((self.host, 0))
        self.server = await asyncio.start_server(self._handle, sock=sock)
        self.port = sock.getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        self.close_connections()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    def close_connections(self) -> None:
        for writer in self.writers:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(self.writers)
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head[:-4].split(b"\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
                body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
                request = Request(lines[0], headers, body, index)
                self.requests.append(request)
                self.got_request.set()
                if not await self.answer(self, request, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if reader.at_eof():
                self.client_gone.set()
            writer.close()


async def until(condition: Callable[[], bool]) -> None:
    """Until ``condition()`` holds (the test's timeout is the bound)."""
    while not condition():
        await asyncio.sleep(0.005)


async def post_and_read(upstream: Upstream, url: str, **kwargs: object) -> bytes:
    response = await upstream.post(url, "/v1/completions", b"{}", **kwargs)  # type: ignore[arg-type]
    try:
        return await response.read()
    finally:
        response.close()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# --- the pool: reuse, sweeping, spares --------------------------------------------------------------


def test_upstream_errors_are_transport_errors() -> None:
    assert issubclass(UpstreamTimeout, UpstreamError) and issubclass(UpstreamError, TransportError)


async def test_upstream_closes_connections_to_a_server_that_went_away() -> None:
    async with Upstream(keepalive_expiry=60) as upstream, Server() as gone:
        assert await post_and_read(upstream, gone.url) == b"{}"
        assert upstream.idle_connections() == 1
        # The connection is reused while the server keeps it.
        assert await post_and_read(upstream, gone.url) == b"{}"
        assert upstream.idle_connections() == 1
        assert len(gone.writers) == 1

        (conn,) = upstream._idle[("127.0.0.1", gone.port)]
        gone.close_connections()  # the child stopped: it closed its end
        await until(lambda: conn.closed)  # the FIN arrives; the expiry is far
        upstream.sweep()
        assert upstream.idle_connections() == 0
        assert upstream._idle == {}  # no address kept with an empty list

    async with Upstream(keepalive_expiry=0.2) as upstream, Server() as other:
        # Sweeps also happen as connections are put back (at most every expiry / 2).
        assert await post_and_read(upstream, other.url) == b"{}"
        (conn,) = upstream._idle[("127.0.0.1", other.port)]
        other.close_connections()
        await until(lambda: conn.closed)
        assert await post_and_read(upstream, other.url) == b"{}"  # on a fresh connection
        assert len(other.writers) == 2
        assert upstream.idle_connections() == 1


async def test_upstream_sweeper_runs_without_traffic() -> None:
    async with Upstream(keepalive_expiry=0.1, warm_for=0) as upstream, Server() as server:
        assert await post_and_read(upstream, server.url) == b"{}"
        assert upstream.idle_connections() == 1
        async with anyio.create_task_group() as tg:
            tg.start_soon(upstream.run_sweeper)
            await until(lambda: upstream.idle_connections() == 0)  # expired, and nobody had to ask
            tg.cancel_scope.cancel()


async def test_upstream_keeps_a_spare_connection_while_an_address_is_in_use() -> None:
    async with Upstream(keepalive_expiry=0.1, warm_for=0.6) as upstream, Server() as server:
        async with anyio.create_task_group() as tg:
            tg.start_soon(upstream.run_sweeper)
            response = await upstream.post(server.url, "/v1/completions", b"{}", stream=True)
            server.writers[0].close()  # as llama-server does after a streamed answer
            response.close()
            # A spare is opened when the answer ends, before anyone needs it.
            await until(lambda: upstream.idle_connections() == 1)
            await until(lambda: len(server.writers) == 2)
            # Past the keep-alive expiry it is renewed, not dropped.
            await until(lambda: len(server.writers) >= 3)
            await until(lambda: upstream.idle_connections() == 1)
            assert await post_and_read(upstream, server.url) == b"{}"  # answered on a spare
            assert server.requests[-1].connection >= 1
            # No request for longer than warm_for: the address goes cold.
            await until(lambda: upstream.idle_connections() == 0 and upstream._used == {})
            tg.cancel_scope.cancel()


async def test_upstream_forgets_a_spare_for_a_server_that_stopped() -> None:
    async with Upstream(keepalive_expiry=0.1, warm_for=60) as upstream, Server() as server:
        async with anyio.create_task_group() as tg:
            tg.start_soon(upstream.run_sweeper)
            assert await post_and_read(upstream, server.url) == b"{}"
            assert server.server is not None
            server.server.close()  # the child stopped: nothing listens on its port any more
            await server.server.wait_closed()
            server.close_connections()
            # No spare to a port nobody listens on.
            await until(lambda: upstream.idle_connections() == 0 and upstream._used == {})
            tg.cancel_scope.cancel()


async def test_a_localhost_url_reuses_its_connection() -> None:
    async with Upstream(warm_for=0) as upstream, Server() as server:
        url = f"http://localhost:{server.port}"
        assert await post_and_read(upstream, url) == b"{}"
        assert await post_and_read(upstream, url) == b"{}"
    assert len(server.writers) == 1 and len(server.requests) == 2


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_host_header_has_brackets() -> None:
    async with Upstream(warm_for=0) as upstream, Server(host="::1") as server:
        assert await post_and_read(upstream, server.url) == b"{}"
        assert await post_and_read(upstream, server.url) == b"{}"
    assert [r.headers[b"host"] for r in server.requests] == [f"[::1]:{server.port}".encode()] * 2
    assert len(server.writers) == 1  # reused


async def test_the_request_is_what_it_should_be_with_extra_headers() -> None:
    async with Upstream(warm_for=0) as upstream, Server() as server:
        headers = [(b"Authorization", b"Bearer KEY"), (b"X-Trace", b"a b\tc")]
        response = await upstream.post(server.url, "/v1/chat/completions", b'{"a":1}', stream=True, headers=headers)
        response.close()
    (request,) = server.requests
    assert request.line == b"POST /v1/chat/completions HTTP/1.1"
    assert request.body == b'{"a":1}'
    assert request.headers[b"authorization"] == b"Bearer KEY"
    assert request.headers[b"x-trace"] == b"a b\tc"
    assert request.headers[b"accept"] == b"text/event-stream"
    assert request.headers[b"content-type"] == b"application/json"
    assert request.headers[b"host"] == f"127.0.0.1:{server.port}".encode()


@pytest.mark.parametrize(
    "header",
    [
        (b"X-Bad", b"a\r\nInjected: 1"),
        (b"X-Bad", b"a\nb"),
        (b"X-Bad", b"a\x00"),
        (b"Bad Name", b"x"),
        (b"Bad:Name", b"x"),
        (b"", b"x"),
        (b"Content-Length", b"5"),
        (b"transfer-encoding", b"chunked"),
        (b"Host", b"elsewhere"),
    ],
)
async def test_bad_extra_headers_are_refused_before_anything_is_sent(header: tuple[bytes, bytes]) -> None:
    async with Upstream(warm_for=0) as upstream, Server() as server:
        with pytest.raises(UpstreamError, match="header"):
            await upstream.post(server.url, "/v1/completions", b"{}", headers=[header])
    assert server.writers == []


@pytest.mark.parametrize(("base_url", "path"), [("ftp://x:1", "/a"), ("http://h:1/x", "/a"), ("http://h:1", "a b")])
async def test_bad_urls_are_upstream_errors(base_url: str, path: str) -> None:
    async with Upstream() as upstream:
        with pytest.raises(UpstreamError, match="invalid"):
            await upstream.post(base_url, path, b"{}")


# --- retries: only when the server cannot have seen the request ----------------------------------------


async def test_no_retry_once_the_request_was_written() -> None:
    async def answer(
        server: Server, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if len(server.requests) == 1:
            return await answer_ok(server, request, reader, writer)
        return False  # read, then close without an answer

    async with Upstream(warm_for=0) as upstream, Server(answer) as server:
        assert await post_and_read(upstream, server.url) == b"{}"
        assert upstream.idle_connections() == 1
        with pytest.raises(UpstreamError, match="without an answer") as caught:
            await upstream.post(server.url, "/v1/completions", b"{}")  # on the pooled connection
        assert not isinstance(caught.value, UpstreamTimeout)
        # A fresh connection is no different.
        server.answer = answer_bytes(b"", keep=False)
        with pytest.raises(UpstreamError, match="without an answer"):
            await upstream.post(server.url, "/v1/completions", b"{}")
    assert len(server.requests) == 3  # each sent once
    assert len(server.writers) == 2


async def test_a_pooled_connection_closed_before_the_request_is_replaced() -> None:
    async with Upstream(warm_for=0) as upstream, Server() as server:
        assert await post_and_read(upstream, server.url) == b"{}"
        (conn,) = upstream._idle[("127.0.0.1", server.port)]
        # The server closes its end. Wait for its FIN without running the event loop (blocking it):
        # the loop has not seen it, so only a look at the socket can tell.
        server.writers[0].get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        assert select.select([conn.sock], [], [], 10)[0]
        assert not conn.closed
        assert await post_and_read(upstream, server.url) == b"{}"
        assert conn.closed
    assert [r.connection for r in server.requests] == [0, 1]  # the second request once, on a new connection


async def test_stray_bytes_on_an_idle_connection_make_it_unusable() -> None:
    async def answer(
        server: Server, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(OK)
        await writer.drain()
        if len(server.requests) == 1:
            await server.release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")  # an answer to nothing
            await writer.drain()
        return True

    async with Upstream(warm_for=0) as upstream, Server(answer) as server:
        assert await post_and_read(upstream, server.url) == b"{}"
        (conn,) = upstream._idle[("127.0.0.1", server.port)]
        server.release.set()
        await until(lambda: conn.closed)
        assert await post_and_read(upstream, server.url) == b"{}"
    assert [r.connection for r in server.requests] == [0, 1]


# --- framing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "trailer",
    [b"garbage", b"\x00", OK, b"HTTP/1.1 200 OK\r\n"],
    ids=["garbage", "nul", "another-answer", "half-an-answer"],
)
async def test_bytes_after_a_content_length_body_stop_reuse(trailer: bytes) -> None:
    async with Upstream(warm_for=0) as upstream, Server(answer_bytes(OK + trailer)) as server:
        assert await post_and_read(upstream, server.url) == b"{}"
        assert upstream.idle_connections() == 0
        server.answer = answer_ok
        assert await post_and_read(upstream, server.url) == b"{}"
        assert upstream.idle_connections() == 1
    assert [r.connection for r in server.requests] == [0, 1]


@pytest.mark.parametrize(
    ("wire", "status", "body", "kept"),
    [
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nnope!", 404, b"nope!", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 200, b"", True),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + OK, 200, b"{}", True),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}", 200, b"{}", False),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}", 200, b"{}", False),
        (CHUNKED_HEAD + b"3\r\nabc\r\n0\r\n\r\n", 200, b"abc", False),  # a stream: never kept
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\nab\r\n1\r\nc\r\n0\r\nT: 1\r\n\r\n",
            200,
            b"abc",
            True,
        ),
    ],
    ids=["404", "empty", "100-continue", "http-1.0", "connection-close", "event-stream", "chunked-trailers"],
)
async def test_answers(wire: bytes, status: int, body: bytes, kept: bool) -> None:
    async with Upstream(warm_for=0) as upstream, Server(answer_bytes(wire, keep=kept)) as server:
        response = await upstream.post(server.url, "/x", b"{}")
        assert response.status == status
        assert await response.read() == body
        response.close()
        assert upstream.idle_connections() == int(kept)


async def test_a_body_without_a_length_ends_with_the_connection() -> None:
    wire = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it"
    async with Upstream(warm_for=0) as upstream, Server(answer_bytes(wire, keep=False)) as server:
        response = await upstream.post(server.url, "/x", b"{}")
        assert response.content_type == b"text/plain"
        server.writers[0].close()
        assert await response.read() == b"all of it"
        response.close()
        assert upstream.idle_connections() == 0


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTX/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Len",  # cut in the headers
    ],
)
async def test_malformed_answers_are_upstream_errors(wire: bytes) -> None:
    async with Upstream(warm_for=0) as upstream, Server(answer_bytes(wire, keep=False)) as server:
        with pytest.raises(UpstreamError):
            response = await upstream.post(server.url, "/x", b"{}")
            try:
                await response.read()
            finally:
                response.close()
        assert upstream.idle_connections() == 0


async def test_a_header_block_over_the_bound_is_an_error() -> None:
    big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\nContent-Length: 2\r\n\r\n{}"
    async with Upstream(warm_for=0) as upstream, Server(answer_bytes(big)) as server:
        with pytest.raises(UpstreamError, match="header block"):
            await upstream.post(server.url, "/x", b"{}")
        # Headers that never end, on a connection left open: an error as soon as the bound is passed.
        lines = b"HTTP/1.1 200 OK\r\n" + b"X-Header: 0123456789\r\n" * (MAX_HEAD // 20)

        server.answer = answer_then_wait(lines)
        with pytest.raises(UpstreamError, match="header block"):
            await upstream.post(server.url, "/x", b"{}")
        await server.client_gone.wait()
        # Just under the bound is fine.
        fine = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD - 200) + b"\r\nContent-Length: 2\r\n\r\n{}"
        server.answer = answer_bytes(fine)
        assert await post_and_read(upstream, server.url) == b"{}"


async def test_read_is_bounded_by_max_body() -> None:
    chunked = CHUNKED_HEAD + b"6\r\n012345\r\n6\r\n678901\r\n0\r\n\r\n"
    length = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n012345678901"
    async with Upstream(warm_for=0, max_body=10) as upstream, Server() as server:
        for wire in (chunked, length):
            server.answer = answer_bytes(wire)
            response = await upstream.post(server.url, "/x", b"{}")
            with pytest.raises(UpstreamError, match="over 10 bytes"):
                await response.read()
            response.close()
        server.answer = answer_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789")
        assert await post_and_read(upstream, server.url) == b"0123456789"
    assert MAX_BODY >= 1 << 20


async def test_a_huge_chunk_size_is_no_allocation() -> None:
    head = CHUNKED_HEAD + b"7fffffffffffffff\r\n"
    async with Upstream(warm_for=0) as upstream, Server(answer_bytes(head + b"abc", keep=False)) as server:
        response = await upstream.post(server.url, "/x", b"{}")
        assert await response.next_chunk() == b"abc"  # passed on as it arrives
        with pytest.raises(UpstreamError, match="cut short"):
            await response.next_chunk()
        response.close()

        # 8 MiB inside that chunk, read as it comes: the client's memory stays small.
        block = b"x" * 65536

        async def flood(
            server: Server, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> bool:
            writer.write(head)
            for _ in range(128):
                writer.write(block)
                await writer.drain()
            return False

        server.answer = flood
        tracemalloc.start()
        try:
            response = await upstream.post(server.url, "/x", b"{}")
            received = 0
            with pytest.raises(UpstreamError, match="cut short"):
                while (chunk := await response.next_chunk()) is not None:
                    received += len(chunk)
            response.close()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert received == 128 * len(block)
    assert peak < 3 << 20, peak


# --- timeouts ------------------------------------------------------------------------------------------


async def test_read_timeout_waiting_for_the_headers() -> None:
    async with Upstream(warm_for=0) as upstream, Server(answer_never) as server:
        with pytest.raises(UpstreamTimeout):
            await upstream.post(server.url, "/x", b"{}", read_timeout=0.05)
        await server.client_gone.wait()  # the connection was closed
        assert upstream.idle_connections() == 0


async def test_read_timeout_between_pieces_of_the_body() -> None:
    stall = answer_then_wait(CHUNKED_HEAD + b"3\r\nabc\r\n")
    # The timeout also bounds the wait for the headers, written at once: not too short for a busy machine.
    async with Upstream(warm_for=0, read_timeout=0.5) as upstream, Server(stall) as server:
        response = await upstream.post(server.url, "/x", b"{}")
        assert await response.next_chunk() == b"abc"
        with pytest.raises(UpstreamTimeout):
            await response.next_chunk()
        await server.client_gone.wait()
        with pytest.raises(UpstreamError, match="closed"):
            await response.next_chunk()
        response.close()


async def test_a_per_request_read_timeout_overrides_the_clients() -> None:
    async def late(
        server: Server, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        await asyncio.sleep(0.1)  # after the client's own timeout (same loop: that timer fires first)
        return await answer_ok(server, request, reader, writer)

    async with Upstream(warm_for=0, read_timeout=0.02) as upstream, Server(late) as server:
        assert await post_and_read(upstream, server.url, read_timeout=None) == b"{}"
        with pytest.raises(UpstreamTimeout):
            await post_and_read(upstream, server.url)


async def test_any_byte_restarts_the_read_timeout() -> None:
    """The read timeout bounds the time without a byte: every byte received ends a wait, and the
    next wait has a timeout of its own."""
    loop = asyncio.get_running_loop()
    conn = _Connection(loop, cast(socket.socket, None), ("127.0.0.1", 1))
    conn.connection_made(StubTransport())
    conn.begin()
    for byte in b"HTTP/1.1 200 OK\r\n":
        waiting = asyncio.ensure_future(conn.wait(3600))
        await asyncio.sleep(0)
        conn.data_received(bytes([byte]))
        assert await waiting is True
        assert not conn.headers_done


async def test_write_timeout() -> None:
    try:
        wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        wmem = 4 << 20
    body = b"x" * max(16 << 20, 4 * wmem)  # more than the socket buffers hold
    done = asyncio.Event()

    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await done.wait()
        writer.close()

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by the accepted socket
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(never_read, sock=sock)
    try:
        async with Upstream(warm_for=0) as upstream:
            url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            with pytest.raises(UpstreamTimeout, match="not written"):
                await upstream.post(url, "/x", body, write_timeout=0.05)
            assert upstream.idle_connections() == 0
    finally:
        done.set()
        server.close()
        await server.wait_closed()


async def test_cancelling_a_request_closes_its_connection() -> None:
    async with Upstream(warm_for=0) as upstream, Server(answer_never) as server:
        async with anyio.create_task_group() as tg:
            tg.start_soon(upstream.post, server.url, "/x", b"{}")
            await server.got_request.wait()
            tg.cancel_scope.cancel()
        await server.client_gone.wait()
        assert upstream.idle_connections() == 0


# --- chunked framing, fed byte by byte ------------------------------------------------------------------


class StubTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing


def chunked_response(pieces: list[bytes], *, eof: bool = True) -> UpstreamResponse:
    """A chunked (keep-alive) answer whose body arrives in ``pieces`` (then end of file if ``eof``)."""
    conn = _Connection(asyncio.get_running_loop(), cast(socket.socket, None), ("127.0.0.1", 1))
    conn.connection_made(StubTransport())
    conn.begin()
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for piece in pieces:
        if piece:
            conn.data_received(piece)
    if eof:
        conn.connection_lost(None)
    return UpstreamResponse(Upstream(), conn, read_timeout=None, max_body=MAX_BODY)


async def body_of(response: UpstreamResponse) -> bytes:
    parts = []
    while (part := await response.next_chunk()) is not None:
        parts.append(part)
    return b"".join(parts)


WIRE = b'7\r\ndata: a\r\n19;ext=1\r\n\ndata: {"content":"bc"}\n\n\r\n0\r\nX-Trailer: 1\r\n\r\n'
BODY = b'data: a\ndata: {"content":"bc"}\n\n'


async def test_chunked_answers_are_unframed_however_they_are_split() -> None:
    for i in range(len(WIRE) + 1):
        for j in range(i, len(WIRE) + 1):
            response = chunked_response([WIRE[:i], WIRE[i:j], WIRE[j:]], eof=False)
            assert await body_of(response) == BODY
            assert response._conn is not None and response._conn.reusable()
    # Body bytes go on as soon as they arrive, before the rest of their chunk.
    response = chunked_response([WIRE[:9]], eof=False)
    assert await response.next_chunk() == b"data: "
    assert response._conn is not None
    response._conn.data_received(WIRE[9:])
    assert await response.next_chunk() == BODY[6:]
    assert await response.next_chunk() is None


async def test_chunked_answers_split_at_every_byte_by_a_server() -> None:
    async def trickle(
        server: Server, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        for byte in CHUNKED_HEAD.replace(b"text/event-stream", b"text/plain") + WIRE:
            writer.write(bytes([byte]))
            await writer.drain()
        return True

    async with Upstream(warm_for=0) as upstream, Server(trickle) as server:
        for _ in range(2):
            assert await post_and_read(upstream, server.url) == BODY
    assert len(server.writers) == 1  # kept between the two


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
