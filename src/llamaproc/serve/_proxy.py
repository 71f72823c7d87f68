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
or chunked answer, keep-alive pool): it costs under a third of the CPU time of
httpx per request (``bench/upstream.py``), which is most of the daemon's own
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
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from ..errors import (
    LlamaprocError,
    ModelNotFoundError,
    ModelUnavailableError,
    QueueFullError,
    ShuttingDownError,
)
from ._metrics import ServeMetrics
from ._upstream import Upstream, UpstreamError, UpstreamResponse

if TYPE_CHECKING:
    from ..model import TextModel
    from ..runtime import ModelPool

__all__ = ["DEFAULT_MAX_BODY", "ProxyRoute", "ProxyState", "error_response", "pool_error"]

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


class ProxyState:
    """What every proxied request needs: the pool, the upstream client, the metrics, the body limit."""

    def __init__(self, pool: ModelPool, client: Upstream, metrics: ServeMetrics, max_body: int) -> None:
        self.pool = pool
        self.client = client
        self.metrics = metrics
        self.max_body = max_body
        self.created = int(time.time())


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


def pool_error(exc: LlamaprocError) -> tuple[int, str, str, str | None, dict[str, str]]:
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


class ProxyRoute:
    """One OpenAI ``POST`` route, as a raw ASGI app (the hot path of the daemon)."""

    def __init__(self, path: str, required: tuple[str, ...], state: ProxyState) -> None:
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

    def __init__(self, state: ProxyState, name: str, started: float, send: Send) -> None:
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
            status, type_, code, param, headers = pool_error(exc)
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
