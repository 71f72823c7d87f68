"""The OpenAI routes of ``llamaproc serve``: the daemon's hot path.

``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` are
routed by the request's ``model`` field to a model of the pool and proxied to
that model's endpoint, which implements the same routes: the request body is
checked (:func:`~llamaproc.protocol.check_openai_request`) and forwarded as it
came, and the answer is passed back with only its ``"model"`` field rewritten
to the name the client asked for. This keeps every OpenAI parameter
llama-server supports (tools, logprobs, response_format, ...) and adds little
latency. A streamed answer is read as the socket front end reads it (a
:class:`~llamaproc.serve._relay.StreamReader`: one framer, one event parser,
one way to tell an end from a cut or a stall).

The pool's admission (:meth:`ModelPool.acquire`) is held for the whole
request, stream included. A client that disconnects, while queued or while
streaming, cancels its request: it leaves the queue, or the upstream stream is
closed (which frees llama-server's slot) and the admission released. So does a
client that stops reading: a write that cannot go out for ``write_timeout``
seconds drops the client's connection.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``
with the codes and statuses of :data:`~llamaproc.protocol.ERROR_CODES`, the
same codes the socket sends; llama-server's own errors are relayed in that
shape too (a parameter it refuses keeps its 4xx status as ``bad_request``; its
own failures are ``upstream_error``, 502). A body that is not UTF-8 JSON, or
is nested too deeply to parse, is ``invalid_json``. A stream that fails after its first event ends with an error event
(``data: {"error": ...}``) and no ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from ..errors import (
    InvalidArgumentError,
    LlamaprocError,
    QueueFullError,
    ServerCrashedError,
)
from ..model import ShardedModel, resumable_error
from ..protocol import (
    ERROR_CODES,
    StreamKind,
    check_openai_request,
    decode_json_object,
    encode_json,
    error_code,
    error_message,
    error_status,
    openai_error_body,
    status_error,
)
from ..runtime import Endpoint, ServeConfig
from ._events import EventFeed, StreamTap
from ._metrics import ServeMetrics
from ._relay import StreamReader, auth_headers, check_alive, error_of
from ._upstream import Upstream, UpstreamError, UpstreamResponse
from ._workers import Job, JobLog

if TYPE_CHECKING:
    from ..runtime import ModelPool

__all__ = ["DEFAULT_MAX_BODY", "ProxyRoute", "ProxyState", "error_response", "retry_headers", "stall_timeout_of"]

_log = logging.getLogger("llamaproc.serve")

#: Largest request body accepted (413 beyond).
DEFAULT_MAX_BODY = 4 * 1024 * 1024
#: Default seconds a write to a client may block before the client counts as gone.
DEFAULT_WRITE_TIMEOUT = 30.0
#: How often a request checks that its writes go out.
_WRITE_CHECK = 1.0
#: What remains of the write timeout once the daemon stops its models (less than the HTTP server's
#: own shutdown deadline, so that it is the proxy that drops the client, without a traceback).
_SHUTDOWN_WRITE_TIMEOUT = 1.0

_API = "http"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_JSON_TYPE = (b"content-type", b"application/json")
_MODEL_FIELD = re.compile(rb'"model":\s*"(?:[^"\\]|\\.)*"')
_KIND = {"/v1/chat/completions": "chat", "/v1/completions": "text"}


class ProxyState:
    """What every proxied request needs: the pool, the upstream client, the metrics, the limits."""

    def __init__(
        self,
        pool: ModelPool[Any],
        client: Upstream,
        metrics: ServeMetrics,
        max_body: int,
        *,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        jobs: JobLog | None = None,
        events: EventFeed | None = None,
    ) -> None:
        self.pool = pool
        self.jobs = jobs if jobs is not None else JobLog()
        self.events = events if events is not None else EventFeed()
        self.client = client
        self.metrics = metrics
        self.max_body = max_body
        self.write_timeout = write_timeout
        self.created = int(time.time())

    def stall_timeout(self, name: str) -> float | None:
        """How long a running generation of model ``name`` may receive nothing while its server idles."""
        return stall_timeout_of(self.pool.config, name)


def stall_timeout_of(config: ServeConfig, name: str) -> float | None:
    """The stall timeout of model ``name``: its own, else the daemon's (``None``: no limit)."""
    model = config.models.get(name)
    own = model.stall_timeout if model is not None else None
    if own is None:
        return config.stall_timeout
    return None if math.isinf(own) else own


# --- errors ------------------------------------------------------------------------------------


def retry_headers(exc: BaseException, code: str) -> dict[str, str]:
    """``Retry-After`` for the codes that say when to retry."""
    if isinstance(exc, QueueFullError):
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    return {"Retry-After": "1"} if ERROR_CODES[code].retry else {}


def error_response(
    code: str,
    message: str,
    *,
    status: int | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A JSON response in OpenAI's error shape, with the status of the code table (or ``status``)."""
    return Response(
        openai_error_body(code, message, param=param),
        status_code=status or ERROR_CODES[code].status,
        headers=dict(headers or {}),
        media_type="application/json",
    )


class _BadRequest(Exception):
    def __init__(self, code: str, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


class _ClientStalled(Exception):
    """The client read nothing for the write timeout."""


# --- the proxy ---------------------------------------------------------------------------------


class ProxyRoute:
    """One OpenAI ``POST`` route, as a raw ASGI app (the hot path of the daemon)."""

    def __init__(self, path: str, state: ProxyState) -> None:
        self.path = path
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        state = self.state
        try:
            raw = await _read_body(scope, receive, state.max_body)
            body = _parse(self.path, raw)
        except _BadRequest as exc:
            state.metrics.request_started("", _API)
            if exc.code == "client_disconnected":
                status = 499
            else:
                status = ERROR_CODES[exc.code].status
                await _send_error(send, exc.code, exc.message, param=exc.param)
            state.metrics.request_done("", _API, str(status), time.perf_counter() - started, 0)
            return
        name: str = body["model"]
        call = _Call(state, name, started, send)
        state.metrics.request_started(name, _API)
        try:
            await call.run(self.path, raw, body, receive)
        finally:
            state.metrics.request_done(name, _API, call.status, time.perf_counter() - started, call.tokens)


class _Call:
    """The state of one proxied request."""

    __slots__ = (
        "_failed",
        "_first_token",
        "_send",
        "_sending_since",
        "name",
        "response_started",
        "started",
        "state",
        "status",
        "tap",
        "tokens",
    )

    def __init__(self, state: ProxyState, name: str, started: float, send: Send) -> None:
        self.state = state
        self.name = name
        self.started = started
        self._send = send
        self.status = "499"  # until an answer is sent: the client went away
        self.tokens = 0
        self.response_started = False
        self._first_token = False
        self._failed = False
        self._sending_since: float | None = None
        self.tap: StreamTap | None = None  # the event feed's view of a streamed answer

    async def run(self, path: str, raw: bytes, body: dict[str, Any], receive: Receive) -> None:
        # The client's disconnect is watched by a plain asyncio task (the app runs under uvicorn,
        # on asyncio), not an anyio task group: that costs about 0.1 ms per request, on the way
        # to every first token. The task ends with the call. A timer checks that writes to the
        # client go out: cheaper than a deadline around every write.
        loop = asyncio.get_running_loop()
        stalled = False
        with anyio.CancelScope() as scope:
            watcher = loop.create_task(_watch_disconnect(receive, scope))
            state = self.state
            period = min(state.write_timeout / 2, _WRITE_CHECK)
            timer: asyncio.TimerHandle | None = None

            def check_writes() -> None:
                nonlocal timer, stalled
                since = self._sending_since
                if since is not None:
                    # Once the daemon stops its models, a client that reads nothing gets little time
                    # for the last event: the HTTP server's own shutdown deadline would cut it harder.
                    limit = _SHUTDOWN_WRITE_TIMEOUT if state.pool.closed else state.write_timeout
                    if time.monotonic() - since >= min(limit, state.write_timeout):
                        stalled = True
                        scope.cancel()
                        return
                timer = loop.call_later(period, check_writes)

            timer = loop.call_later(period, check_writes)
            try:
                await self._admitted(path, raw, body)
            finally:
                if self.tap is not None:  # a stream that did not end well: failed, or its client left
                    self.tap.end("failed")
                if timer is not None:
                    timer.cancel()
                watcher.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.wait((watcher,))
                if not watcher.cancelled() and watcher.exception() is not None:  # pragma: no cover
                    _log.error("watching the client of %r failed", self.name, exc_info=watcher.exception())
        if stalled:
            # The slot is free and the upstream stream closed: drop the connection of a client that
            # reads nothing, so that uvicorn does not wait on it either.
            _log.warning("model %r: the client read nothing of the answer in time; dropped it", self.name[:100])
            self.status = "499"
            await _drop_client(self._send)

    async def _admitted(self, path: str, raw: bytes, body: dict[str, Any]) -> None:
        stream = body.get("stream") is True
        try:
            attempts = 0
            while True:
                attempts += 1
                async with self.state.pool.acquire(self.name) as endpoint:
                    if isinstance(endpoint, ShardedModel):
                        await self._forward_sharded(endpoint, path, raw, body, stream)
                        return
                    # Once: a second replica that dies too is an error like any other.
                    if not await self._forward(endpoint, path, raw, stream, may_retry=attempts == 1):
                        return
        except LlamaprocError as exc:
            # Raised by the pool's admission (the forwarders answer their own errors).
            if self.response_started:  # pragma: no cover
                raise
            await self._fail(exc)

    async def _forward_sharded(
        self, model: ShardedModel, path: str, raw: bytes, body: dict[str, Any], stream: bool
    ) -> None:
        """A request to a model split over rpc workers: logged as a job, and its stream survives a reshard."""
        job = self.state.jobs.start(self.name, path)
        job.set_layout(model.layout)
        resume: _Resume | None = None
        try:
            await model.ready()
            if stream and path in _KIND:
                kind: StreamKind = _KIND[path]  # type: ignore[assignment]
                sent = dict(body)
                if model.wants_token_ids(kind, sent):
                    raw = encode_json(sent)
                    resume = _Resume(model, kind, sent, "n_probs" in sent and "n_probs" not in body, job)
            await self._forward(model, path, raw, stream, resume)
        finally:
            job.finish("done" if self.status.startswith("2") and not self._failed else "failed", self.tokens)

    async def _forward(
        self, endpoint: Endpoint, path: str, raw: bytes, stream: bool, resume: _Resume | None = None,
        *, may_retry: bool = False,
    ) -> bool:  # fmt: skip
        """Send the request to ``endpoint`` and answer the client.

        Returns True instead of answering when ``may_retry``, the endpoint
        died before it sent a byte of its answer and the model has another
        replica: the caller sends the request there.
        """
        client = self.state.client
        try:
            await check_alive(endpoint)
        except LlamaprocError as exc:
            if may_retry and endpoint.returncode is not None and self._other_replica():
                _log.info("model %r: its replica died before the request was sent; trying another", self.name[:100])
                return True
            await self._fail(exc)
            return False
        try:
            response = await client.post(endpoint.base_url, path, raw, stream=stream, headers=auth_headers(endpoint))
        except UpstreamError as exc:
            explained = await endpoint.explain(exc)
            if may_retry and isinstance(explained, ServerCrashedError) and not self.response_started and (
                self._other_replica()
            ):
                _log.info("model %r: its replica died before answering; trying another", self.name[:100])
                return True
            await self._fail(explained)
            return False
        try:
            if not 200 <= response.status < 300:
                await self._fail(await error_of(response, endpoint.base_url + path))
            elif stream and path in _KIND and response.content_type.startswith(b"text/event-stream"):
                await self._relay_stream(endpoint, path, response, resume)
            else:
                await self._relay_whole(endpoint, response)
        except UpstreamError as exc:
            explained = await endpoint.explain(exc)
            if may_retry and isinstance(explained, ServerCrashedError) and not self.response_started and (
                self._other_replica()
            ):
                _log.info("model %r: its replica died before its answer began; trying another", self.name[:100])
                return True
            await self._fail(explained)
        finally:
            response.close()
        return False

    def _other_replica(self) -> bool:
        """Whether the model has more than one replica (asked only after a failure, off the hot path)."""
        return len(self.state.pool.replicas(self.name)) > 1

    async def _relay_whole(self, endpoint: Endpoint, response: UpstreamResponse) -> None:
        content = await response.read()
        content = _MODEL_FIELD.sub(self._model_field(), content, count=1)
        try:
            usage = json.loads(content).get("usage") or {}
            self.tokens = int(usage.get("completion_tokens") or 0)
        except (ValueError, TypeError, AttributeError, RecursionError):
            await self._fail(status_error(502, content[:200], endpoint.base_url))
            return
        self._first_token = True
        self.state.metrics.first_token(self.name, time.perf_counter() - self.started)
        headers = [(b"content-type", response.content_type), (b"content-length", str(len(content)).encode())]
        await self._start(response.status, headers)
        await self._write(content, more=False)

    async def _relay_stream(
        self, endpoint: Endpoint, path: str, response: UpstreamResponse, resume: _Resume | None = None
    ) -> None:
        base_url = endpoint.base_url if resume is not None else ""
        last_token = time.monotonic()
        reader = StreamReader(
            response, _KIND[path],  # type: ignore[arg-type]
            endpoint=endpoint, stall_timeout=self.state.stall_timeout(self.name),
        )  # fmt: skip
        model_field = self._model_field()
        feed = self.state.events
        watchers = feed.subscribers  # empty while nobody follows the event feed: then no event is built
        self.tap = tap = feed.tap(self.name, endpoint.layout if isinstance(endpoint, ShardedModel) else None)
        await self._start(200, _SSE_HEADERS)
        counted = 0
        try:
            while (events := await reader.next_events()) is not None:
                if not events:
                    continue
                out = []
                for data, token in events:
                    if token is not None:
                        counted += 1
                        if watchers:
                            tap.token(token.text)
                        if not self._first_token:
                            self._first_token = True
                            self.state.metrics.first_token(self.name, time.perf_counter() - self.started)
                    if resume is not None:
                        data = resume.seen(data, token is not None)
                        last_token = time.monotonic()
                    out.append(b"data: " + _MODEL_FIELD.sub(model_field, data, count=1) + b"\n\n")
                await self._write(b"".join(out))
            self.tokens = reader.summary().usage.completion_tokens or counted
        except LlamaprocError as exc:
            self.tokens = counted
            error = await reader.fail(exc)
            if resume is not None and resumable_error(error):
                reader.close()
                await self._continue(resume, reader.parser.ids, counted, base_url, error, last_token)
                return
            await self._fail(error)
            return
        finally:
            reader.close()
        tap.end("done")
        await self._write(b"", more=False)

    async def _continue(self, resume: _Resume, ids: list[int], delivered: int, base_url: str,
                        error: LlamaprocError, last_token: float) -> None:
        """Go on with a stream cut by the loss of a worker: the sharded model recovers and continues it,
        and its tokens go out as events of the same stream (same id, same shape), then ``[DONE]``."""
        stream = resume.model.continue_stream(
            resume.kind, resume.body, ids, delivered=delivered, base_url=base_url,
            reason=str(error).splitlines()[0], last_token=last_token,
        )  # fmt: skip
        recorded = 0
        tap = self.tap
        assert tap is not None
        watchers = tap.feed.subscribers
        try:
            async with stream:
                async for token in stream:
                    self.tokens += 1
                    if len(stream.reshards) > recorded:
                        recorded = self._record(resume, stream.reshards, recorded)
                    if watchers:
                        tap.token(token.text)
                    await self._write(resume.render(self.name, token.text, None))
            self._record(resume, stream.reshards, recorded)
        except LlamaprocError as exc:
            self._record(resume, stream.reshards, recorded)
            await self._fail(exc)
            return
        tap.end("done")
        result = stream.result
        finish = result.finish_reason if result is not None else None
        await self._write(resume.render(self.name, None, finish) + b"data: [DONE]\n\n", more=False)

    def _record(self, resume: _Resume, reshards: list[Any], recorded: int) -> int:
        for reshard in reshards[recorded:]:
            resume.job.add_reshard(reshard)
            self.state.metrics.record_resume(self.name, reshard)
            if self.tap is not None:
                self.tap.resume(reshard)
        return len(reshards)

    async def _fail(self, exc: LlamaprocError) -> None:
        """Answer with the error (or, once the answer started, end the stream with an error event)."""
        self._failed = True
        code = error_code(exc)
        message = error_message(exc)
        if self.state.pool.closed and code not in ("queue_full", "model_not_found"):
            code = "shutting_down"
            message = f"model {self.name[:100]!r}: the daemon is shutting down and stopped the request"
        elif not message.startswith("model ") and code != "model_not_found":
            message = f"model {self.name[:100]!r}: {message}"
        status = error_status(exc, code)
        param = exc.param if isinstance(exc, InvalidArgumentError) else ("model" if code == "model_not_found" else None)
        if code in ("upstream_error", "upstream_timeout", "internal_error"):
            _log.warning("%s", message)
        self.status = str(status)
        if self.response_started:
            event = b"data: " + openai_error_body(code, message, param=param) + b"\n\n"
            await self._write(event)
            await self._write(b"", more=False)
            return
        self.response_started = True
        await _send_error(self._send, code, message, status=status, param=param, headers=retry_headers(exc, code))

    def _model_field(self) -> bytes:
        return b'"model":' + json.dumps(self.name).encode()

    async def _start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.response_started = True
        self.status = str(status)
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def _write(self, body: bytes, *, more: bool = True) -> None:
        """Send a piece of the answer; the timer in :meth:`run` drops a client that does not take it."""
        self._sending_since = time.monotonic()
        await self._send({"type": "http.response.body", "body": body, "more_body": more})
        self._sending_since = None


class _Resume:
    """What a relayed stream of a sharded model needs to continue after a reshard."""

    __slots__ = ("model", "kind", "body", "strip", "job", "meta")

    def __init__(self, model: ShardedModel, kind: StreamKind, body: dict[str, Any], strip: bool, job: Job) -> None:
        self.model = model
        self.kind = kind
        self.body = body  # as sent upstream
        self.strip = strip  # the probabilities were asked for the token ids only: not passed on
        self.job = job
        self.meta: dict[str, Any] | None = None  # id, created ... of the stream's events

    def seen(self, data: bytes, has_token: bool) -> bytes:
        """An event as it goes out: its id and creation time are kept, the probabilities nobody asked removed."""
        if self.meta is None or (self.strip and has_token):
            try:
                obj = json.loads(data)
            except ValueError:
                return data
            if not isinstance(obj, dict):
                return data
            if self.meta is None:
                self.meta = {k: obj[k] for k in ("id", "created", "system_fingerprint", "object") if k in obj}
            if self.strip and has_token:
                for choice in obj.get("choices") or ():
                    if isinstance(choice, dict) and "logprobs" in choice:
                        choice["logprobs"] = None
                        if self.kind == "chat":
                            del choice["logprobs"]
                return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        return data

    def render(self, model: str, text: str | None, finish: str | None) -> bytes:
        """One event of the continued stream in the shape of the original's (text, or the final one)."""
        meta = self.meta or {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time())}
        choice: dict[str, Any] = {"index": 0, "finish_reason": None}
        if finish is not None:
            choice["finish_reason"] = {"limit": "length", "eos": "stop", "word": "stop"}.get(finish, finish)
        if self.kind == "chat":
            choice["delta"] = {} if text is None else {"content": text}
            kind = "chat.completion.chunk"
        else:
            choice["text"] = text or ""
            choice["logprobs"] = None
            kind = "text_completion"
        event = {"choices": [choice], **meta, "model": model, "object": meta.get("object", kind)}
        return b"data: " + json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _drop_client(send: Send) -> None:
    """Close the connection of the request ``send`` answers (uvicorn's), discarding what is queued.

    uvicorn offers no ASGI way to abort a connection; its ``send`` is a method of
    the request's cycle, which holds the transport. Aborting it makes uvicorn see
    the client as gone (no error logged). Elsewhere the request just ends.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    if callable(abort):
        abort()
        await anyio.sleep(0)  # let the protocol see the connection lost


async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """Cancel the request when its client disconnects."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def _send_error(
    send: Send,
    code: str,
    message: str,
    *,
    status: int | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> None:
    body = openai_error_body(code, message, param=param)
    raw_headers = [_JSON_TYPE, (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status or ERROR_CODES[code].status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (declared or sent)."""
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise _BadRequest("bad_request", "invalid Content-Length header") from None
            if declared > limit:
                raise _BadRequest("body_too_large", f"request body too large: {declared} bytes, the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise _BadRequest("client_disconnected", "client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BadRequest("body_too_large", f"request body too large: the limit is {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _parse(path: str, raw: bytes) -> dict[str, Any]:
    """The JSON request, checked by the protocol's rules for the route."""
    if not raw:
        raise _BadRequest("invalid_json", "the request body is empty; expected a JSON object")
    try:
        body = decode_json_object(raw)
    except ValueError as exc:
        raise _BadRequest("invalid_json", f"the request body must be a JSON object in UTF-8: {exc}") from None
    try:
        return check_openai_request(path, body)
    except InvalidArgumentError as exc:
        raise _BadRequest("bad_request", str(exc), param=exc.param) from None
