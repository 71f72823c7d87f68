"""The daemon's HTTP/1.1 client for its requests to the llama-server children.

Only what that traffic needs: ``POST`` a JSON body, read the answer (parsed by
httptools, the C parser uvicorn uses), keep-alive connections pooled per
address, one spare connection opened ahead of need. It costs a fraction of the
CPU time of a general-purpose client per request, which is most of the
daemon's own latency budget (see ``bench/upstream.py``).

Each connection is an :class:`asyncio.Protocol` that feeds what it receives
straight to the parser: body bytes are passed on as they arrive (never a
buffer sized by what the server announces), reading pauses while too much is
buffered, and every wait has its timeout.
"""

from __future__ import annotations

import asyncio
import enum
import re
import socket
import time
from collections.abc import Sequence
from typing import Any, Final, Self, cast
from urllib.parse import urlsplit

import anyio
from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from ..errors import TransportError

__all__ = ["MAX_BODY", "MAX_HEAD", "Upstream", "UpstreamError", "UpstreamResponse", "UpstreamTimeout"]

#: The most bytes a status line and header block may take.
MAX_HEAD = 64 * 1024
#: The default bound of a body read whole by :meth:`UpstreamResponse.read`.
MAX_BODY = 64 * 1024 * 1024
#: Reading from a connection pauses while more body bytes than this wait to be taken.
_READ_HIGH = 256 * 1024
#: Request bodies up to this size go out in the same write as the head (one copy, one send).
_JOIN_BELOW = 64 * 1024

_PATH = re.compile(r"/[!-~]*")  # printable ASCII, no space: nothing that could end the request line
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a header name (RFC 9110 token)
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")  # a header value: no CR, LF or other control byte
#: Headers that frame the request: set by the client only.
_FRAMING = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})


class UpstreamError(TransportError):
    """A request to a llama-server child failed below HTTP: refused, reset, cut short, malformed."""


class UpstreamTimeout(UpstreamError):
    """A request was not written within the write timeout, or nothing was received within the read timeout."""


class _Default(enum.Enum):
    token = 0


#: ``post(read_timeout=...)``: not given, the client's own.
_DEFAULT: Final = _Default.token


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class _Connection(asyncio.Protocol):
    """One connection to a llama-server and the state of the answer it is reading.

    The parser's callbacks fill in the status, the headers and the body
    pieces; a task waiting for any of them is woken by every byte received
    (so a read timeout bounds the time without a byte). Between answers the
    connection is idle: a byte received then closes it, since no answer can
    be expected.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, address: tuple[str, int]) -> None:
        self.loop = loop
        self.sock = sock
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.closed = False
        self.error: UpstreamError | None = None
        self._waiter: asyncio.Future[bool] | None = None
        # The answer being read.
        self.parser: HttpResponseParser | None = None
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.headers_done = False
        self.complete = False
        self.keep = False
        self.extra = False  # bytes received beyond the end of the answer
        self.body: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._head_fed = 0  # bytes fed to the parser before the end of the header block
        self._head_size = 0  # bytes of the header names and values
        self._informational = False
        self._until_eof = False

    @property
    def label(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        # pause_writing as soon as anything is left unsent, resume_writing once it is all sent:
        # "written" means in the kernel.
        transport.set_write_buffer_limits(high=0)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.complete:
            # Bytes that answer nothing: the connection cannot be reused.
            self.extra = True
            if parser is None:
                self.close()
            return
        if not self.headers_done:
            self._head_fed += len(data)
        try:
            parser.feed_data(data)
        except HttpParserUpgrade:
            if not self.complete:
                self._fail(UpstreamError(f"malformed answer from {self.label}: an unexpected protocol upgrade"))
        except HttpParserError as exc:
            if self.complete:
                self.extra = True  # the answer is whole; what follows it is no HTTP
            elif self.error is None:
                self._fail(UpstreamError(f"malformed answer from {self.label}: {exc}"))
        if not self.headers_done and self._head_fed > MAX_HEAD and self.error is None:
            self._fail(UpstreamError(f"malformed answer from {self.label}: a header block over {MAX_HEAD} bytes"))
        if self._buffered > _READ_HIGH and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        return False  # close: HTTP/1.1 has no use for a half-closed connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.parser is not None and not self.complete and self.error is None:
            if self._until_eof and exc is None:
                self.complete = True  # a body without a length ends with the connection
            elif self.headers_done:
                self.error = UpstreamError(f"the answer from {self.label} was cut short" + (f": {exc}" if exc else ""))
            else:
                self.error = UpstreamError(
                    f"{self.label} closed the connection without an answer" + (f": {exc}" if exc else "")
                )
        self._wake()

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        self._wake()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True  # another answer after this one (to nothing we asked)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            return
        self._head_size += len(name) + len(value)
        if self._head_size > MAX_HEAD:
            self._fail(UpstreamError(f"malformed answer from {self.label}: a header block over {MAX_HEAD} bytes"))
            raise ValueError("header block too large")  # stops the parser
        name = name.lower()
        old = self.headers.get(name)
        self.headers[name] = value if old is None else old + b", " + value

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        assert self.parser is not None
        status = self.parser.get_status_code()
        if status < 200:
            if status == 101:
                self._fail(UpstreamError(f"malformed answer from {self.label}: an unexpected protocol upgrade"))
                raise ValueError("upgrade")  # stops the parser
            self._informational = True  # 100 Continue and the like: the answer follows
            self.headers = {}
            return
        self.status = status
        self.headers_done = True
        headers = self.headers
        self._until_eof = (
            b"content-length" not in headers and b"chunked" not in headers.get(b"transfer-encoding", b"").lower()
        )

    def on_body(self, data: bytes) -> None:
        if self.complete:
            return
        self.body.append(data)
        self._buffered += len(data)

    def on_message_complete(self) -> None:
        if self.complete:
            return
        if self._informational:
            self._informational = False
            return
        assert self.parser is not None
        self.complete = True
        # llama-server closes the connection after every streamed answer.
        self.keep = self.parser.should_keep_alive() and not self.headers.get(b"content-type", b"").startswith(
            b"text/event-stream"
        )

    # -- used by the client -------------------------------------------------------------------

    def usable(self, now: float, expiry: float) -> bool:
        """Whether an idle connection is young enough and still open, as far as the event loop knows."""
        transport = self.transport
        return (
            now - self.idle_since < expiry
            and not self.closed
            and not self.extra
            and transport is not None
            and not transport.is_closing()
        )

    def alive(self) -> bool:
        """Whether the socket of an idle connection has nothing to read: neither the server's end of
        the connection (found before the event loop has seen it) nor any stray byte."""
        try:
            self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        return False

    def begin(self) -> None:
        """Get ready for the answer to the request about to be sent."""
        self.parser = HttpResponseParser(self)
        self.status = 0
        self.headers = {}
        self.headers_done = self.complete = self.keep = self._informational = self._until_eof = False
        self._head_fed = self._head_size = 0

    def finish(self) -> None:
        """The answer is over and the connection goes back to the pool, idle."""
        self.parser = None
        self.body.clear()
        self._buffered = 0
        self._resume()

    def reusable(self) -> bool:
        return self.complete and self.keep and not self.extra and not self.closed and self.error is None

    async def send(self, data: bytes, body: bytes, timeout: float | None) -> None:
        """Write ``data`` then ``body`` (when not empty) whole, within ``timeout`` seconds."""
        transport = self.transport
        assert transport is not None
        transport.write(data)
        if body:
            transport.write(body)
        if transport.get_write_buffer_size():
            deadline = None if timeout is None else self.loop.time() + timeout
            while transport.get_write_buffer_size() and self.error is None and not self.closed:
                left = None if deadline is None else deadline - self.loop.time()
                if (left is not None and left <= 0) or not await self.wait(left):
                    raise UpstreamTimeout(f"the request to {self.label} was not written within {timeout:g} s")
        if self.error is not None:
            raise self.error

    async def wait_head(self, timeout: float | None) -> None:
        """Until the status line and headers of the answer are in."""
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            if not await self.wait(timeout):
                raise UpstreamTimeout(f"no answer from {self.label} for {timeout:g} s")

    async def wait(self, timeout: float | None) -> bool:
        """Until something happens (a byte received, the write buffer emptied, the end of the
        connection): True; False after ``timeout`` seconds (``None``: no limit) without any."""
        waiter: asyncio.Future[bool] = self.loop.create_future()
        self._waiter = waiter
        timer = None if timeout is None else self.loop.call_later(timeout, _expire, waiter)
        try:
            return await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def take_body(self) -> bytes:
        body = self.body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        self._resume()
        return data

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)


class UpstreamResponse:
    """The answer to one :meth:`Upstream.post`: status and headers read, body pending.

    Read the body with :meth:`next_chunk` (the bytes received so far, as they
    arrive) or :meth:`read`, then :meth:`close` — always: it gives a fully
    read keep-alive connection back to the pool and closes any other (which
    tells llama-server to stop generating).
    """

    __slots__ = ("_conn", "_done", "_max_body", "_pool", "_read_timeout", "headers", "status")

    def __init__(self, pool: Upstream, conn: _Connection, *, read_timeout: float | None, max_body: int) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self._read_timeout = read_timeout
        self._max_body = max_body
        self.status = conn.status
        self.headers = conn.headers
        self._done = False

    @property
    def content_type(self) -> bytes:
        return self.headers.get(b"content-type", b"application/json")

    async def next_chunk(self) -> bytes | None:
        """The body bytes received since the last call (waiting for some), ``None`` at the end of the body.

        Raises :class:`UpstreamError` when the answer is cut short or
        malformed, :class:`UpstreamTimeout` when nothing comes within the read
        timeout; either closes the response.
        """
        if self._done:
            return None
        conn = self._conn
        if conn is None:
            raise UpstreamError("the response is closed")
        while True:
            if conn.body:
                return conn.take_body()
            if conn.complete:
                self._done = True
                return None
            if conn.error is not None:
                self.close()
                raise conn.error
            if not await conn.wait(self._read_timeout):
                self.close()
                raise UpstreamTimeout(f"nothing received from {conn.label} for {self._read_timeout:g} s")

    def abort(self, error: UpstreamError) -> None:
        """Fail the answer now, from outside (a watchdog's timer): a pending or later :meth:`next_chunk`
        raises ``error``, and the connection is closed."""
        conn = self._conn
        if conn is not None and not self._done:
            conn._fail(error)
            conn._wake()

    async def read(self) -> bytes:
        """The whole (rest of the) body; :class:`UpstreamError` if it is longer than the client's ``max_body``."""
        limit = self._max_body
        length = self.headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            self.close()
            raise UpstreamError(f"the answer's body is over {limit} bytes (Content-Length {int(length)})")
        parts = []
        size = 0
        while (chunk := await self.next_chunk()) is not None:
            size += len(chunk)
            if size > limit:
                self.close()
                raise UpstreamError(f"the answer's body is over {limit} bytes")
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Release the connection (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.reusable():
            conn.finish()
            self._pool._put_back(conn)
        else:
            conn.close()
        self._pool._answered(conn.address)


class Upstream:
    """A small HTTP/1.1 client for the daemon's requests to its llama-server children.

    Only what that traffic needs: ``POST`` a body to ``http://HOST:PORT``,
    keep-alive connections reused per ``(host, port)`` of the base URL
    (dropped after ``keepalive_expiry`` seconds idle, well before
    llama-server's own 5 s), a ``connect_timeout``. At most ``max_idle`` idle
    connections are kept per address: llama-server gives each open connection
    one of its few HTTP threads (``parallel + 2`` on small machines), and the
    pool's admission lets ``parallel`` requests in at once, so with one idle
    connection a thread is still free for the supervisor's health probe.
    Streamed answers are never kept (llama-server closes them), nor is a
    connection on which anything was received beyond the end of an answer.

    Timeouts: the request must be written within ``write_timeout`` seconds;
    ``read_timeout`` bounds the time without receiving any byte, while
    waiting for the headers and for each piece of the body (``None``, the
    default: no limit, since a generation may take long before the headers
    of an answer that is not streamed, and a child that hangs is restarted by
    its supervisor, which cuts the connection). :meth:`post` can override
    both. A timeout raises :class:`UpstreamTimeout` and closes the connection.
    A body read whole by :meth:`UpstreamResponse.read` may take at most
    ``max_body`` bytes, a header block :data:`MAX_HEAD`.

    A request is sent again on another connection only when the server cannot
    have seen it: when a pooled connection is found closed (or with stray
    bytes to read) before anything is written to it. Once a byte of the
    request is written, any failure is an error: a generation is not
    idempotent.

    Children come and go (unloads, evictions, restarts on new ports), so idle
    connections that can no longer be used (expired, or closed by their
    server) are closed by :meth:`sweep`, which runs as connections are put
    back (at most every ``keepalive_expiry / 2`` seconds) and from
    :meth:`run_sweeper`; addresses with no idle connection left are
    forgotten. Without it a connection to a stopped child would stay open
    (``CLOSE_WAIT``) for ever.

    Spare connections: since a streamed answer never leaves its connection
    for reuse, every stream would wait for a TCP connect and for
    llama-server to accept. While :meth:`run_sweeper` runs, an address that
    had a request in the last ``warm_for`` seconds keeps one connection
    opened ahead of need (idle, counted in ``max_idle``; renewed as it
    expires), so the next request finds it ready. It is opened when an
    answer ends, not while it streams: on a small machine the daemon's work
    during a request delays llama-server's first token. A spare that cannot be
    opened (the child has stopped) makes the address cold until its next
    request. ``warm_for=0`` turns spares off.

    Built on asyncio (the daemon's loop); not for trio.
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        keepalive_expiry: float = 2.0,
        max_idle: int = 1,
        warm_for: float = 60.0,
        read_timeout: float | None = None,
        write_timeout: float | None = 30.0,
        max_body: int = MAX_BODY,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.keepalive_expiry = keepalive_expiry
        self.max_idle = max_idle
        self.warm_for = warm_for
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.max_body = max_body
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        # (base URL, path, stream) -> the address and the start of the request's head
        self._heads: dict[tuple[str, str, bool], tuple[tuple[str, int], bytes]] = {}
        self._numeric: dict[tuple[str, int], list[Any]] = {}  # the socket addresses of IP addresses
        self._used: dict[tuple[str, int], float] = {}  # when each address last had a request
        self._wanted: set[tuple[str, int]] = set()  # addresses that need a spare connection
        self._wake: anyio.Event | None = None
        self._swept = time.monotonic()
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the idle connections; the pool takes no more back."""
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        self._used.clear()
        self._wanted.clear()
        if self._wake is not None:
            self._wake.set()

    def idle_connections(self) -> int:
        """How many idle connections are kept now."""
        return sum(len(conns) for conns in self._idle.values())

    def sweep(self) -> None:
        """Close the idle connections that cannot be reused; forget addresses left with none."""
        now = time.monotonic()
        self._swept = now
        expiry = self.keepalive_expiry
        for address, conns in list(self._idle.items()):
            usable = []
            for conn in conns:
                if conn.usable(now, expiry):
                    usable.append(conn)
                else:
                    conn.close()
            if usable:
                self._idle[address] = usable
            else:
                del self._idle[address]
        if not self._idle and len(self._heads) > 64:
            self._heads.clear()
            self._numeric.clear()
        for address, used in list(self._used.items()):
            if now - used >= self.warm_for:
                del self._used[address]
            elif address not in self._idle:
                self._want(address)

    async def run_sweeper(self) -> None:
        """Until cancelled: sweep every ``keepalive_expiry / 2`` seconds (also when no request
        comes) and open the spare connections that are wanted."""
        while not self._closed:
            self._wake = wake = anyio.Event()
            if not self._wanted:
                with anyio.move_on_after(self.keepalive_expiry / 2):
                    await wake.wait()
            if time.monotonic() - self._swept >= self.keepalive_expiry / 2:
                self.sweep()
            await self._open_spares()

    def _answered(self, address: tuple[str, int]) -> None:
        """An answer from ``address`` ended: open a spare for the next request, now that it is not
        competing with this one for the CPU."""
        if self.warm_for > 0 and not self._idle.get(address) and address in self._used:
            self._want(address)

    def _want(self, address: tuple[str, int]) -> None:
        self._wanted.add(address)
        if self._wake is not None:
            self._wake.set()

    async def _open_spares(self) -> None:
        while self._wanted and not self._closed:
            address = self._wanted.pop()
            if self._idle.get(address) or address not in self._used:
                continue
            try:
                conn = await self._connect(address)
            except UpstreamError:
                self._used.pop(address, None)  # the child has stopped: cold until its next request
                continue
            if self._closed or address not in self._used:
                conn.close()
                continue
            conn.idle_since = time.monotonic()
            self._idle.setdefault(address, []).append(conn)

    def _head(self, base_url: str, path: str, stream: bool) -> tuple[tuple[str, int], bytes]:
        """The address of ``base_url`` and the head of a request to ``path``, up to its extra headers."""
        key = (base_url, path, stream)
        found = self._heads.get(key)
        if found is not None:
            return found
        try:
            url = urlsplit(base_url)
            host, port = url.hostname, url.port or 80
        except ValueError as exc:
            raise UpstreamError(f"invalid base URL {base_url!r}: {exc}") from None
        if url.scheme != "http" or not host or url.path not in ("", "/") or url.query or url.username:
            raise UpstreamError(f"invalid base URL {base_url!r}: expected http://HOST:PORT")
        if not _PATH.fullmatch(path):
            raise UpstreamError(f"invalid request path {path!r}")
        host_header = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode("ascii", "replace")
        if not _VALUE.fullmatch(host_header):
            raise UpstreamError(f"invalid base URL {base_url!r}")
        head = (
            b"POST "
            + path.encode("ascii")
            + b" HTTP/1.1\r\nHost: "
            + host_header
            + b"\r\nContent-Type: application/json\r\nAccept: "
            + (b"text/event-stream" if stream else b"application/json")
            + b"\r\n"
        )
        if len(self._heads) >= 1024:
            self._heads.clear()
        found = self._heads[key] = ((host, port), head)
        return found

    def _put_back(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        now = time.monotonic()
        if now - self._swept >= self.keepalive_expiry / 2:
            self.sweep()
        idle = self._idle.setdefault(conn.address, [])
        if len(idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = now
        idle.append(conn)

    def _take(self, address: tuple[str, int]) -> _Connection | None:
        """An idle connection to ``address`` that can take a request, if there is one.

        One found closed by its server (or with stray bytes to read) is closed
        and the next one tried: nothing was written to it, so the server
        cannot have seen the request.
        """
        idle = self._idle.get(address)
        if idle is None:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.usable(now, self.keepalive_expiry) and conn.alive():
                return conn
            conn.close()
        del self._idle[address]
        return None

    async def _connect(self, address: tuple[str, int]) -> _Connection:
        host, port = address
        loop = asyncio.get_running_loop()
        try:
            with anyio.fail_after(self.connect_timeout):
                infos = self._numeric.get(address)
                if infos is None:
                    try:  # an IP address: no lookup (and no thread), and nothing to look up again
                        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
                        if len(self._numeric) >= 1024:
                            self._numeric.clear()
                        self._numeric[address] = infos
                    except socket.gaierror:
                        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                error: OSError = OSError(f"no address for {host}")
                for family, type_, proto, _, sockaddr in infos:
                    try:
                        return await _open(loop, socket.socket(family, type_, proto), sockaddr, address)
                    except OSError as exc:
                        error = exc
                raise error
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc}") from exc

    async def post(
        self,
        base_url: str,
        path: str,
        body: bytes,
        *,
        stream: bool = False,
        headers: Sequence[tuple[bytes, bytes]] = (),
        read_timeout: float | None | _Default = _DEFAULT,
        write_timeout: float | None | _Default = _DEFAULT,
    ) -> UpstreamResponse:
        """Send ``body`` (JSON) to ``path`` and return once the status line and headers are in.

        ``headers`` are added to the request (e.g. ``(b"Authorization",
        b"Bearer KEY")``); their names must be tokens and their values free
        of CR, LF and other control bytes, and the headers that frame the
        request (Host, Content-Length, Transfer-Encoding, Connection) are
        the client's own. ``read_timeout`` and ``write_timeout`` override the
        client's for this request (``None``: no limit).
        """
        if self._closed:
            raise UpstreamError("the upstream client is closed")
        address, head = self._head(base_url, path, stream)
        if headers:
            head += b"".join(_header_line(name, value) for name, value in headers)
        head += b"Content-Length: %d\r\n\r\n" % len(body)
        if len(body) < _JOIN_BELOW:
            head, body = head + body, b""
        read_after = self.read_timeout if read_timeout is _DEFAULT else read_timeout
        write_within = self.write_timeout if write_timeout is _DEFAULT else write_timeout
        if self.warm_for > 0:
            self._used[address] = time.monotonic()
        conn = self._take(address)
        if conn is None:
            conn = await self._connect(address)
        # From here on the server may see the request: whatever fails is an error, never a retry on
        # another connection (the server may have started generating). The only retry is _take's,
        # which skips a pooled connection found closed before anything was written to it.
        try:
            conn.begin()
            await conn.send(head, body, write_within)
            await conn.wait_head(read_after)
        except BaseException:
            conn.close()
            raise
        return UpstreamResponse(self, conn, read_timeout=read_after, max_body=self.max_body)


async def _open(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, sockaddr: tuple[Any, ...], address: tuple[str, int]
) -> _Connection:
    """Connect ``sock`` to ``sockaddr`` and make it a connection (closing ``sock`` on failure).

    The client keeps the socket itself (the transport's is a wrapper without
    ``recv``) to peek at it before reusing the connection.
    """
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, sockaddr)
        conn = _Connection(loop, sock, address)
        await loop.create_connection(lambda: conn, sock=sock)
    except BaseException:
        sock.close()
        raise
    return conn


def _header_line(name: bytes, value: bytes) -> bytes:
    if not _TOKEN.fullmatch(name) or name.lower() in _FRAMING:
        raise UpstreamError(f"invalid request header name {name!r}")
    if not _VALUE.fullmatch(value):
        raise UpstreamError(f"invalid value for the request header {name.decode('latin-1')!r}")
    return name + b": " + value + b"\r\n"
