"""The daemon's HTTP/1.1 client for its requests to the llama-server children.

Only what that traffic needs: ``POST`` a JSON body, read a ``Content-Length``
or chunked answer, keep-alive connections pooled per address, one spare
connection opened ahead of need. It costs a fraction of the CPU time of a
general-purpose client per request, which is most of the daemon's own latency
budget (see ``bench/``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Self

import anyio

from ..errors import TransportError

__all__ = ["Upstream", "UpstreamError", "UpstreamResponse"]


class UpstreamError(TransportError):
    """A request to a llama-server child failed below HTTP: refused, reset, cut short, malformed."""


class _Connection:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def usable(self, now: float, expiry: float) -> bool:
        return now - self.idle_since < expiry and not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class UpstreamResponse:
    """The answer to one :meth:`Upstream.post`: status and headers read, body pending.

    Read the body with :meth:`next_chunk` (pieces as they arrive; the chunks
    of a chunked answer) or :meth:`read`, then :meth:`close` — always: it
    gives a fully read keep-alive connection back to the pool and closes any
    other (which tells llama-server to stop generating).
    """

    __slots__ = ("_address", "_chunked", "_conn", "_done", "_keep", "_pool", "_remaining", "headers", "status")

    def __init__(
        self,
        pool: Upstream,
        address: tuple[str, int],
        conn: _Connection,
        status: int,
        headers: dict[bytes, bytes],
        keep: bool,
    ) -> None:
        self._pool = pool
        self._address = address
        self._conn: _Connection | None = conn
        self.status = status
        self.headers = headers
        self._keep = keep
        self._chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        length = headers.get(b"content-length")
        if self._chunked:
            self._remaining: int | None = None
        elif length is not None:
            try:
                self._remaining = int(length)
            except ValueError:
                raise UpstreamError(f"invalid Content-Length {length!r}") from None
        else:
            self._remaining = None  # until the connection closes
            self._keep = False
        self._done = self._remaining == 0

    @property
    def content_type(self) -> bytes:
        return self.headers.get(b"content-type", b"application/json")

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body (for a chunked answer, its next chunk), ``None`` at its end."""
        if self._done:
            return None
        conn = self._conn
        if conn is None:
            raise UpstreamError("the response is closed")
        reader = conn.reader
        try:
            if self._chunked:
                line = await reader.readuntil(b"\r\n")
                size = int(line.split(b";", 1)[0], 16)
                if size <= 0:
                    if size < 0:
                        raise ValueError(f"negative chunk size {size}")
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                        pass
                    self._done = True
                    return None
                data = await reader.readexactly(size + 2)
                if data[-2:] != b"\r\n":
                    raise ValueError("no CRLF after a chunk")
                return data[:-2]
            if self._remaining is None:
                data = await reader.read(65536)
                if not data:
                    self._done = True
                    return None
                return data
            data = await reader.read(min(self._remaining, 65536))
            if not data:
                raise asyncio.IncompleteReadError(b"", self._remaining)
            self._remaining -= len(data)
            self._done = self._remaining == 0
            return data
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.close()
            raise UpstreamError(f"the answer was cut short: {type(exc).__name__}: {exc}") from exc

    async def read(self) -> bytes:
        """The whole (rest of the) body."""
        parts = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        """Release the connection (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and self._keep:
            self._pool._put_back(conn)
        else:
            conn.close()
        self._pool._answered(self._address)


class Upstream:
    """A small HTTP/1.1 client for the daemon's requests to its llama-server children.

    Only what that traffic needs: ``POST`` a body to ``http://HOST:PORT``,
    keep-alive connections reused per address (dropped after
    ``keepalive_expiry`` seconds idle, well before llama-server's own 5 s), a
    ``connect_timeout``. At most ``max_idle`` idle connections are kept per
    address: llama-server gives each open connection one of its few HTTP
    threads (``parallel + 2`` on small machines), and the pool's admission
    lets ``parallel`` requests in at once, so with one idle connection a
    thread is still free for the supervisor's health probe. Streamed answers
    are never kept (llama-server closes them). There is no read timeout: a
    generation may take long, and a child that hangs is restarted by its
    supervisor, which cuts the connection.

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
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        keepalive_expiry: float = 2.0,
        max_idle: int = 1,
        warm_for: float = 60.0,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.keepalive_expiry = keepalive_expiry
        self.max_idle = max_idle
        self.warm_for = warm_for
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._addresses: dict[str, tuple[str, int]] = {}
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
        if not self._idle and len(self._addresses) > 64:
            self._addresses.clear()
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

    def _address(self, base_url: str) -> tuple[str, int]:
        address = self._addresses.get(base_url)
        if address is None:
            rest = base_url.split("://", 1)[-1].rstrip("/")
            host, _, port = rest.rpartition(":")
            address = (host.strip("[]"), int(port))
            if len(self._addresses) > 1024:
                self._addresses.clear()
            self._addresses[base_url] = address
        return address

    def _put_back(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        now = time.monotonic()
        if now - self._swept >= self.keepalive_expiry / 2:
            self.sweep()
        peer = conn.writer.get_extra_info("peername")
        if not peer:
            conn.close()
            return
        idle = self._idle.setdefault((peer[0], peer[1]), [])
        if len(idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = now
        idle.append(conn)

    def _take(self, address: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(address)
        if idle is None:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.usable(now, self.keepalive_expiry):
                return conn
            conn.close()
        del self._idle[address]
        return None

    async def _connect(self, address: tuple[str, int]) -> _Connection:
        try:
            with anyio.fail_after(self.connect_timeout):
                reader, writer = await asyncio.open_connection(address[0], address[1], limit=65536)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {address[0]}:{address[1]}: {exc}") from exc
        return _Connection(reader, writer)

    async def post(
        self,
        base_url: str,
        path: str,
        body: bytes,
        *,
        stream: bool = False,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> UpstreamResponse:
        """Send ``body`` (JSON) and return once the status line and headers are in.

        ``headers`` are added to the request as they are (trusted: the daemon's own).
        """
        if self._closed:
            raise UpstreamError("the upstream client is closed")
        address = self._address(base_url)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {address[0]}:{address[1]}\r\nContent-Type: application/json\r\n"
            f"Accept: {'text/event-stream' if stream else 'application/json'}\r\nContent-Length: {len(body)}\r\n"
        ).encode("latin-1")
        head += b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"
        if self.warm_for > 0:
            self._used[address] = time.monotonic()
        while True:
            conn = self._take(address)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(address)
            try:
                conn.writer.write(head + body)
                raw = await conn.reader.readuntil(b"\r\n\r\n")
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                conn.close()
                partial = isinstance(exc, asyncio.IncompleteReadError) and exc.partial
                if reused and not partial:
                    continue  # a kept-alive connection the server had just closed: try a fresh one
                raise UpstreamError(f"no answer from {address[0]}:{address[1]}: {type(exc).__name__}: {exc}") from exc
            except BaseException:
                conn.close()
                raise
            try:
                return self._response(address, conn, raw, stream)
            except (ValueError, UpstreamError) as exc:
                conn.close()
                raise UpstreamError(f"malformed answer from {address[0]}:{address[1]}: {exc}") from exc

    def _response(self, address: tuple[str, int], conn: _Connection, raw: bytes, stream: bool) -> UpstreamResponse:
        lines = raw.split(b"\r\n")
        version, status, _ = (lines[0].split(b" ", 2) + [b""])[:3]
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            if line:
                key, _, value = line.partition(b":")
                headers[key.strip().lower()] = value.strip()
        # llama-server closes the connection after every streamed answer.
        keep = (
            version == b"HTTP/1.1"
            and headers.get(b"connection", b"").lower() != b"close"
            and not headers.get(b"content-type", b"").startswith(b"text/event-stream")
        )
        return UpstreamResponse(self, address, conn, int(status), headers, keep)
