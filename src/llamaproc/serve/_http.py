"""The HTTP front end of ``llamaproc serve``: an OpenAI-compatible API and management routes.

OpenAI routes (``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``) are routed by the request's ``model`` field to a model of
the pool and proxied to that model's llama-server, which implements the same
endpoints: the request body is forwarded as received and the answer, streamed
or not, is passed back with only its ``"model"`` field rewritten to the name
the client asked for. This keeps every OpenAI parameter llama-server supports
(tools, logprobs, response_format, ...) and adds the least latency: no
re-tokenizing, no per-token JSON decoding and encoding.

The children are reached through :class:`Upstream`, a minimal HTTP/1.1
client for exactly this traffic (POST a JSON body, read a ``Content-Length``
or chunked answer, keep-alive pool): it costs about a tenth of the CPU time of
a general-purpose client per request, which is most of the daemon's own
latency budget.

The pool's admission (:meth:`ModelPool.acquire`) is held for the whole
request, stream included. A client that disconnects, while queued or while
streaming, cancels its request: it leaves the queue, or the upstream stream is
closed (which frees llama-server's slot) and the admission released.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:
unknown model 404, bad JSON or fields 400, body too large 413, queue full 429
with ``Retry-After``, model failed or daemon shutting down 503. A stream that
fails after its first event ends with an error event (``data: {"error":
...}``) and no ``[DONE]``; when the daemon stops its models after the drain
timeout, that event's code is ``shutting_down``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import (
    LlamaprocError,
    ModelNotFoundError,
    ModelUnavailableError,
    PoolError,
    QueueFullError,
    ShuttingDownError,
    TransportError,
)
from ._metrics import CONTENT_TYPE, ServeMetrics

if TYPE_CHECKING:
    from ..model import TextModel
    from ..runtime import ModelPool

__all__ = ["DEFAULT_MAX_BODY", "Upstream", "UpstreamError", "create_app"]

_log = logging.getLogger("llamaproc.serve")

#: Largest request body accepted (413 beyond).
DEFAULT_MAX_BODY = 4 * 1024 * 1024

_API = "http"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_JSON_TYPE = (b"content-type", b"application/json")
_MODEL_FIELD = re.compile(rb'"model":\s*"(?:[^"\\]|\\.)*"')
_COMPLETION_TOKENS = re.compile(rb'"(?:completion_tokens|predicted_n)":\s*(\d+)')
_TOKEN_EVENT = (b'"content":"', b'"text":"')
_DONE = b"data: [DONE]"


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

    async def post(self, base_url: str, path: str, body: bytes, *, stream: bool = False) -> UpstreamResponse:
        """Send ``body`` (JSON) and return once the status line and headers are in."""
        if self._closed:
            raise UpstreamError("the upstream client is closed")
        address = self._address(base_url)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {address[0]}:{address[1]}\r\nContent-Type: application/json\r\n"
            f"Accept: {'text/event-stream' if stream else 'application/json'}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1")
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


# --- errors ------------------------------------------------------------------------------------


def _error_body(message: str, type_: str, *, code: str | int | None = None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


def error_response(
    status: int,
    message: str,
    type_: str,
    *,
    code: str | int | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A JSON response in OpenAI's error shape."""
    return Response(
        _error_body(message, type_, code=code, param=param),
        status_code=status,
        headers=dict(headers or {}),
        media_type="application/json",
    )


def _pool_error(exc: LlamaprocError) -> tuple[int, str, str, str | None, dict[str, str]]:
    """(status, type, code, param, headers) for an error raised by the pool."""
    if isinstance(exc, ModelNotFoundError):
        return 404, "invalid_request_error", "model_not_found", "model", {}
    if isinstance(exc, QueueFullError):
        retry = str(max(1, math.ceil(exc.retry_after)))
        return 429, "rate_limit_error", "queue_full", None, {"Retry-After": retry}
    if isinstance(exc, ShuttingDownError):
        return 503, "server_error", "shutting_down", None, {"Retry-After": "1"}
    if isinstance(exc, ModelUnavailableError):
        return 503, "server_error", "model_unavailable", None, {}
    return 503, "server_error", "unavailable", None, {}


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


# --- the proxy ---------------------------------------------------------------------------------


class _Endpoint:
    """One OpenAI ``POST`` route, as a raw ASGI app (the hot path of the daemon)."""

    def __init__(self, path: str, required: tuple[str, ...], state: _State) -> None:
        self.path = path
        self.required = required
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        state = self.state
        try:
            raw = await _read_body(scope, receive, state.max_body)
            body = _parse(raw, self.required)
        except _BadRequest as exc:
            state.metrics.request_started("", _API)
            await _send_error(send, exc.status, exc.message, "invalid_request_error", code=exc.code, param=exc.param)
            state.metrics.request_done("", _API, str(exc.status), time.perf_counter() - started, 0)
            return
        name: str = body["model"]
        call = _Call(state, name, started, send)
        state.metrics.request_started(name, _API)
        try:
            await call.run(self.path, raw, body.get("stream") is True, receive)
        finally:
            state.metrics.request_done(name, _API, call.status, time.perf_counter() - started, call.tokens)


class _Call:
    """The state of one proxied request."""

    __slots__ = ("_first_token", "_send", "name", "response_started", "started", "state", "status", "tokens")

    def __init__(self, state: _State, name: str, started: float, send: Send) -> None:
        self.state = state
        self.name = name
        self.started = started
        self._send = send
        self.status = "499"  # until an answer is sent: the client went away
        self.tokens = 0
        self.response_started = False
        self._first_token = False

    async def run(self, path: str, raw: bytes, stream: bool, receive: Receive) -> None:
        # The client's disconnect is watched by a plain asyncio task (the app runs under uvicorn,
        # on asyncio), not an anyio task group: that costs about 0.1 ms per request, on the way
        # to every first token. The task ends with the call.
        with anyio.CancelScope() as scope:
            watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, scope))
            try:
                await self._admitted(path, raw, stream)
            finally:
                watcher.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.wait((watcher,))
                if not watcher.cancelled() and watcher.exception() is not None:  # pragma: no cover
                    _log.error("watching the client of %r failed", self.name, exc_info=watcher.exception())

    async def _admitted(self, path: str, raw: bytes, stream: bool) -> None:
        try:
            async with self.state.pool.acquire(self.name) as model:
                await self._forward(model, path, raw, stream)
        except LlamaprocError as exc:
            # Raised by the pool's admission (the forwarders answer their own errors).
            if self.response_started:  # pragma: no cover
                raise
            status, type_, code, param, headers = _pool_error(exc)
            await self._error(status, str(exc), type_, code=code, param=param, headers=headers)

    async def _forward(self, model: TextModel, path: str, raw: bytes, stream: bool) -> None:
        try:
            response = await self.state.client.post(model.base_url, path, raw, stream=stream)
        except UpstreamError as exc:
            await self._upstream_failed(model, exc)
            return
        try:
            if stream and response.status == 200:
                await self._relay_stream(model, response)
            else:
                await self._relay_whole(response)
        except UpstreamError as exc:
            await self._upstream_failed(model, exc)
        finally:
            response.close()

    async def _relay_whole(self, response: UpstreamResponse) -> None:
        content = await response.read()
        if response.status == 200:
            content = _MODEL_FIELD.sub(self._model_field(), content, count=1)
            match = _COMPLETION_TOKENS.search(content)
            if match:
                self.tokens = int(match.group(1))
            self._first_token = True
            self.state.metrics.first_token(self.name, time.perf_counter() - self.started)
        headers = [(b"content-type", response.content_type), (b"content-length", str(len(content)).encode())]
        await self._start(response.status, headers)
        await self._send({"type": "http.response.body", "body": content, "more_body": False})

    async def _relay_stream(self, model: TextModel, response: UpstreamResponse) -> None:
        send = self._send
        model_field = self._model_field()
        await self._start(200, _SSE_HEADERS)
        pending = b""
        done = errored = False
        counted = 0
        while (chunk := await response.next_chunk()) is not None:
            data = pending + chunk if pending else chunk
            end = data.rfind(b"\n\n")
            if end < 0:
                pending = data
                continue
            end += 2
            part, pending = data[:end], data[end:]
            tokens = part.count(_TOKEN_EVENT[0]) + part.count(_TOKEN_EVENT[1])
            if tokens:
                counted += tokens
                if not self._first_token:
                    self._first_token = True
                    self.state.metrics.first_token(self.name, time.perf_counter() - self.started)
            if b'"timings"' in part or b'"usage"' in part:
                match = _COMPLETION_TOKENS.search(part)
                if match:
                    self.tokens = int(match.group(1))
            if _DONE in part:
                done = True
            elif b'data: {"error"' in part:
                errored = True
            await send({"type": "http.response.body", "body": _MODEL_FIELD.sub(model_field, part), "more_body": True})
        if pending:
            if _DONE in pending:
                done = True
            elif b'data: {"error"' in pending:
                errored = True
            await send(
                {"type": "http.response.body", "body": _MODEL_FIELD.sub(model_field, pending), "more_body": True}
            )
        if not self.tokens:
            self.tokens = counted
        if not done:
            # llama-server ends a failed stream with an error event and no [DONE]; a stream cut
            # short without one gets an error event of ours.
            if self.state.pool.closed:
                await self._stream_error(self._shutdown_message(), "shutting_down")
                self.status = "503"
            else:
                if not errored:
                    await self._stream_error(self._cut_message(model, "the stream ended before its end"))
                self.status = "502"
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _upstream_failed(self, model: TextModel, exc: UpstreamError) -> None:
        """The child could not be reached or cut the connection."""
        code = "upstream_error"
        if self.state.pool.closed:
            message, status, code = self._shutdown_message(), 503, "shutting_down"
        else:
            with anyio.move_on_after(0.5):  # a cut connection is seen before the exit status
                while model.returncode is None and not self.state.pool.closed:
                    await anyio.sleep(0.01)
            if self.state.pool.closed:
                message, status, code = self._shutdown_message(), 503, "shutting_down"
            elif model.returncode is not None:
                message = (
                    f"model {self.name!r}: llama-server exited with code {model.returncode}; it is being restarted"
                )
                status = 503
            else:
                message = f"model {self.name!r}: llama-server request failed: {type(exc).__name__}: {exc}"
                status = 502
            _log.warning("%s", message)
        if self.response_started:
            if code == "upstream_error":
                message = self._cut_message(model, message)
            await self._stream_error(message, code)
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
            self.status = str(status)
        else:
            await self._error(status, message, "server_error", code=code, headers=_retry(code))

    def _shutdown_message(self) -> str:
        return f"model {self.name!r}: the daemon is shutting down and stopped the request after its drain timeout"

    def _cut_message(self, model: TextModel, message: str) -> str:
        if model.returncode is not None:
            return f"model {self.name!r}: llama-server exited with code {model.returncode} during the stream"
        return message if message.startswith("model ") else f"model {self.name!r}: {message}"

    async def _stream_error(self, message: str, code: str = "upstream_error") -> None:
        event = b"data: " + _error_body(message, "server_error", code=code) + b"\n\n"
        await self._send({"type": "http.response.body", "body": event, "more_body": True})

    def _model_field(self) -> bytes:
        return b'"model":' + json.dumps(self.name).encode()

    async def _start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.response_started = True
        self.status = str(status)
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def _error(
        self,
        status: int,
        message: str,
        type_: str,
        *,
        code: str | None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = str(status)
        self.response_started = True
        await _send_error(self._send, status, message, type_, code=code, param=param, headers=headers)


def _retry(code: str) -> dict[str, str]:
    return {"Retry-After": "1"} if code == "shutting_down" else {}


async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """Cancel the request when its client disconnects."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def _send_error(
    send: Send,
    status: int,
    message: str,
    type_: str,
    *,
    code: str | None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> None:
    body = _error_body(message, type_, code=code, param=param)
    raw_headers = [_JSON_TYPE, (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (declared or sent)."""
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise _BadRequest(400, "invalid Content-Length header", code="invalid_request") from None
            if declared > limit:
                raise _BadRequest(
                    413, f"request body too large: {declared} bytes, the limit is {limit}", code="body_too_large"
                )
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise _BadRequest(400, "client disconnected", code="client_disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BadRequest(413, f"request body too large: the limit is {limit} bytes", code="body_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _parse(raw: bytes, required: tuple[str, ...]) -> dict[str, Any]:
    """The JSON request, checked for the fields the daemon and the route need."""
    if not raw:
        raise _BadRequest(400, "the request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _BadRequest(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _BadRequest(400, "the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if model is None:
        raise _BadRequest(400, "missing required field 'model'", code="missing_field", param="model")
    if not isinstance(model, str):
        raise _BadRequest(400, "'model' must be a string", code="invalid_type", param="model")
    for field in required:
        if field not in body:
            raise _BadRequest(400, f"missing required field {field!r}", code="missing_field", param=field)
    if "messages" in required and not isinstance(body["messages"], list):
        raise _BadRequest(400, "'messages' must be an array", code="invalid_type", param="messages")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _BadRequest(400, "'stream' must be a boolean", code="invalid_type", param="stream")
    return body


# --- management and listing --------------------------------------------------------------------


class _State:
    def __init__(self, pool: ModelPool, client: Upstream, metrics: ServeMetrics, max_body: int) -> None:
        self.pool = pool
        self.client = client
        self.metrics = metrics
        self.max_body = max_body
        self.created = int(time.time())


def _model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "llamaproc"}


def create_app(
    pool: ModelPool,
    *,
    client: Upstream,
    metrics: ServeMetrics | None = None,
    max_body: int = DEFAULT_MAX_BODY,
) -> ASGIApp:
    """The ASGI app of the daemon, serving ``pool``.

    ``client`` reaches the llama-server children; the caller owns and closes it.
    """
    if metrics is None:
        metrics = ServeMetrics(pool)
    state = _State(pool, client, metrics, max_body)

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_object(n, state.created) for n in pool.names()]})

    async def get_model(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in pool.names():
            return error_response(
                404, f"model {name!r} not found", "invalid_request_error", code="model_not_found", param="model"
            )
        return JSONResponse(_model_object(name, state.created))

    async def api_models(request: Request) -> Response:
        return JSONResponse({"models": [s.model_dump(mode="json") for s in pool.status()], "draining": pool.draining})

    def _status_of(name: str) -> dict[str, Any]:
        for s in pool.status():
            if s.name == name:
                return s.model_dump(mode="json")
        return {"name": name}  # pragma: no cover - the pool knows every name it accepted

    async def _manage(name: str, action: Callable[[str], Awaitable[None]]) -> Response:
        try:
            await action(name)
        except PoolError as exc:
            status, type_, code, param, headers = _pool_error(exc)
            return error_response(status, str(exc), type_, code=code, param=param, headers=headers)
        except LlamaprocError as exc:
            return error_response(503, str(exc), "server_error", code="model_unavailable")
        return JSONResponse(_status_of(name))

    async def load(request: Request) -> Response:
        return await _manage(request.path_params["name"], pool.load)

    async def unload(request: Request) -> Response:
        return await _manage(request.path_params["name"], pool.unload)

    async def health(request: Request) -> Response:
        if pool.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok", "time": datetime.now(UTC).isoformat()})

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", type_, code=code)

    hot = {
        path: _Endpoint(path, required, state)
        for path, required in (
            ("/v1/chat/completions", ("messages",)),
            ("/v1/completions", ("prompt",)),
            ("/v1/embeddings", ("input",)),
        )
    }
    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", get_model, methods=["GET"]),
        *(Route(path, endpoint, methods=["POST"]) for path, endpoint in hot.items()),
        Route("/api/models", api_models, methods=["GET"]),
        Route("/api/models/{name}/load", load, methods=["POST"]),
        Route("/api/models/{name}/unload", unload, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    return _App(Starlette(routes=routes, exception_handlers={HTTPException: http_error}), hot)


class _App:
    """The daemon's ASGI app: the proxied ``POST`` routes go straight to their endpoint, everything
    else through Starlette (routing, error pages). The proxy answers its own errors, so Starlette's
    middleware has nothing to add on the path every token request takes."""

    __slots__ = ("hot", "starlette")

    def __init__(self, starlette: Starlette, hot: dict[str, _Endpoint]) -> None:
        self.starlette = starlette
        self.hot = hot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.hot.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.starlette(scope, receive, send)
