"""The daemon's Unix socket: newline-delimited JSON, several requests per connection.

One JSON object per line in each direction, so a person can drive it with
``nc -U ~/.llamaproc/serve.sock``. Requests::

    {"id": "1", "op": "chat", "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}
    {"id": "2", "op": "generate", "model": "tiny", "prompt": "Once upon", "max_tokens": 32, "temperature": 0.7}
    {"id": "3", "op": "embed", "model": "tiny-embed", "input": ["a text", "another"]}
    {"id": "4", "op": "models"}
    {"id": "5", "op": "status"}
    {"op": "ping"}
    {"op": "cancel", "id": "1"}                   (or {"op": "cancel", "target": "1", "id": "c1"})

``id`` (a string or an integer, echoed as given) is required except for
``ping``; it must not be the id of a request still in flight on the same
connection. Other fields of ``generate`` and ``chat`` (``temperature``,
``stop``, ``top_k``, ``seed`` ...) pass through to llama-server.

Answers, one event per line, each carrying the request's ``id``::

    {"id": "1", "event": "token", "text": "Hel"}                 ("token_id" too for generate)
    {"id": "1", "event": "reshard", "after_tokens": 60, "lost": ["10.0.0.2:50052"], "layout": [...], ...}
    {"id": "1", "event": "done", "finish_reason": "stop", "usage": {...}, "timings": {...}}
    {"id": "3", "event": "result", "embeddings": [[...], [...]]}
    {"id": "4", "event": "result", "models": [{"name": "tiny", "phase": "Serving", "loaded": true}]}
    {"id": "1", "event": "error", "code": "queue_full", "message": "...", "retry_after": 1.0}

Every request ends with exactly one ``done``, ``result`` or ``error`` event;
the id may be reused after it. Error codes are the daemon's one table
(:data:`~llamaproc.protocol.ERROR_CODES`, shared with the HTTP front end):
``invalid_json``, ``bad_request`` (with ``param``, the field at fault, when
there is one), ``unknown_op``, ``line_too_long``, ``duplicate_id``,
``too_many_requests``, ``not_found`` (cancel of an id not in flight),
``cancelled``, ``model_not_found``, ``queue_full`` (with ``retry_after``
seconds), ``model_unavailable``, ``not_supported``, ``shutting_down``,
``upstream_error`` (llama-server failed the request or crashed),
``upstream_timeout`` (it sent nothing for the stall timeout while using no
CPU: it was killed), ``internal_error``. A line that cannot be tied to a
request (bad JSON, too long) is answered with ``"id": null``; the connection
keeps working. So is a request whose id is that of a request still in
flight, with ``"code": "duplicate_id", "target": <the id>``: an answer with
the id would end the running request for the client, which goes on.

Cancelling: ``{"op": "cancel", "id": X}`` cancels the in-flight request X,
which then ends with ``{"id": X, "event": "error", "code": "cancelled"}``.
With ``"target": X`` the cancel request may have an id of its own, answered
with ``{"id": ..., "event": "result", "target": X, "cancelled": true|false}``.

Connections: requests run concurrently, each in its own task; events of
different requests interleave but each event is one whole line (writes are
serialised by a lock per connection). A client that disconnects has its
requests cancelled at once (streams closed, queued requests leave the
model's queue). A client that only shuts down its sending side (``nc -N``)
still receives the answers to what it sent; the connection closes when they
are done. A client that stops reading blocks its own requests (backpressure
down to llama-server) for at most ``write_timeout`` seconds per event; then
the connection is dropped and its requests are cancelled, so a stalled
reader can hold a slot only that long and can never block the daemon.

Shutting down: a request cut off because the daemon stopped its models after
the drain timeout ends with ``{"event": "error", "code": "shutting_down"}``.
The daemon waits (briefly) for those last events with
:meth:`ActiveRequests.wait_idle` before it closes the connections.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
import anyio.abc

from ..errors import (
    ConfigError,
    InvalidArgumentError,
    ListenError,
    LlamaprocError,
    QueueFullError,
    ServerCrashedError,
    ShuttingDownError,
)
from ..model import ShardedModel, resumable_error
from ..protocol import (
    STREAM_PATHS,
    LineDecoder,
    chat_request_body,
    check_inputs,
    decode_json_object,
    encode_event,
    encode_json,
    error_code,
    error_message,
    generate_request_body,
)
from ..runtime import Endpoint
from ..types import Completion, Reshard, Token
from ._events import EventFeed, StreamTap
from ._relay import StreamReader, auth_headers, check_alive, error_of
from ._upstream import Upstream, UpstreamError
from ._workers import Job, JobLog

__all__ = ["MAX_IN_FLIGHT", "MAX_LINE", "WRITE_TIMEOUT", "ActiveRequests", "serve_socket"]

_log = logging.getLogger("llamaproc.serve")

#: Longest request line accepted, in bytes (a longer one is answered with ``line_too_long``).
MAX_LINE = 1 << 20
#: Seconds one event may take to be written before the client counts as gone.
WRITE_TIMEOUT = 30.0
#: Requests one connection may have in flight at once.
MAX_IN_FLIGHT = 256

_READ_SIZE = 1 << 16
_HANGUP_POLL = 0.05
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
_API = "socket"
# Fields that are the protocol's own; everything else of generate/chat goes to llama-server.
_RESERVED = frozenset({"id", "op", "model", "prompt", "messages", "input", "target"})

RequestId = str | int


# --- what the socket needs from the pool and the metrics -------------------------------------------


class _Pool(Protocol):
    def status(self) -> Sequence[Any]: ...

    def acquire(self, name: str) -> contextlib.AbstractAsyncContextManager[Endpoint]: ...


class _Metrics(Protocol):
    def request_started(self, model: str, api: str) -> None: ...

    def request_done(self, model: str, api: str, status: str, seconds: float, tokens: int) -> None: ...

    def first_token(self, model: str, seconds: float) -> None: ...


#: ``apply(documents, dry_run)``: serve the config of these spec documents; the changes, as JSON objects.
Applier = Callable[[Any, bool], Awaitable[list[dict[str, Any]]]]


class ActiveRequests:
    """The socket requests being handled, across connections, until their last event is written."""

    def __init__(self) -> None:
        self.count = 0
        self._idle: anyio.Event | None = None

    def _started(self) -> None:
        self.count += 1

    def _finished(self) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def wait_idle(self) -> None:
        """Return once no request is being handled."""
        while self.count:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()


# --- the server ------------------------------------------------------------------------------------


async def serve_socket(
    pool: _Pool,
    path: str | os.PathLike[str],
    *,
    metrics: _Metrics | None = None,
    max_line: int = MAX_LINE,
    write_timeout: float = WRITE_TIMEOUT,
    max_in_flight: int = MAX_IN_FLIGHT,
    active: ActiveRequests | None = None,
    client: Upstream | None = None,
    stall_timeout: Callable[[str], float | None] | None = None,
    jobs: JobLog | None = None,
    events: EventFeed | None = None,
    apply: Applier | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the socket protocol on the Unix socket ``path`` until cancelled.

    A stale socket file at ``path`` (nobody listening) is replaced; a live one,
    or any other kind of file, raises :class:`~llamaproc.ListenError`. The
    socket is made mode 0600 before it listens. ``task_status.started()`` is
    called once it accepts connections. On cancellation every connection is
    closed (its requests cancelled) and the socket file is removed.
    ``active`` counts the requests in progress.

    ``client`` carries the requests to the models' llama-servers, as it does
    for the HTTP front end (the caller owns it; without one the server makes
    and closes its own). ``stall_timeout(model)`` is how long a running
    generation may receive nothing while its server uses no CPU before it
    fails (``None``: no limit). ``events``: the feed the streams' tokens are
    published to, while anyone follows it.
    """
    path = Path(path)
    try:
        await anyio.to_thread.run_sync(_clear_stale, path)
        listener = _listen(path)
    except OSError as exc:
        raise ListenError(f"socket {path}", exc) from exc
    ident = _identity(path)
    own_client = client is None
    options = _Options(
        pool, metrics, max_line, write_timeout, max_in_flight, active or ActiveRequests(),
        Upstream() if client is None else client, stall_timeout or _no_stall_timeout, jobs, events, apply,
    )  # fmt: skip
    try:
        async with anyio.create_task_group() as tg:
            _log.debug("socket protocol on %s", path)
            task_status.started()
            while True:
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    await anyio.wait_readable(listener)
                    continue
                except OSError as exc:  # EMFILE and friends: keep serving the connections we have
                    _log.warning("socket %s: accept failed: %s", path, exc)
                    await anyio.sleep(0.1)
                    continue
                sock.setblocking(False)
                tg.start_soon(_serve_connection, sock, options)
    finally:
        listener.close()
        if own_client:
            options.client.close()
        if ident is not None and _identity(path) == ident:
            with contextlib.suppress(OSError):
                path.unlink()


def _listen(path: Path) -> socket.socket:
    """A non-blocking listening socket at ``path``, mode 0600 before anyone can connect."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.bind(os.fspath(path))
        os.chmod(path, 0o600)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock


def _clear_stale(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse a live socket or another kind of file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    except OSError:
        return  # cannot tell (e.g. permissions): let bind report it
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another server is listening on {path}")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


@dataclass(slots=True)
class _Options:
    pool: _Pool
    metrics: _Metrics | None
    max_line: int
    write_timeout: float
    max_in_flight: int
    active: ActiveRequests
    client: Upstream
    stall_timeout: Callable[[str], float | None]
    jobs: JobLog | None = None
    events: EventFeed | None = None
    apply: Applier | None = None


def _no_stall_timeout(model: str) -> None:
    return None


async def _serve_connection(sock: socket.socket, options: _Options) -> None:
    try:
        await _Connection(sock, options).run()
    except Exception:  # noqa: BLE001 - a bug must cost one connection, not the daemon
        _log.exception("socket connection failed")
    finally:
        sock.close()  # every task of the connection is done: nobody waits on it


# --- one connection ------------------------------------------------------------------------------


_OPS = ("chat", "generate", "embed", "models", "status", "ping", "cancel", "apply")


class _BadRequest(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        self.code = code
        self.message = message
        self.param = param
        super().__init__(message)


@dataclass(slots=True)
class _Request:
    id: RequestId
    op: str
    model: str
    body: bytes  # what goes to llama-server, built and checked by the protocol's functions
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    started: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    tap: StreamTap | None = None  # the event feed's view of the stream


class _Connection:
    def __init__(self, sock: socket.socket, options: _Options) -> None:
        self.sock = sock
        self.options = options
        self.pool = options.pool
        self.metrics = options.metrics
        self.lock = anyio.Lock(fast_acquire=True)  # uncontended: no trip through the event loop
        self.requests: dict[RequestId, _Request] = {}
        self.tasks = 0  # request tasks alive (the last event of a finished one may still be on its way)
        self.gone = False
        self.tg: anyio.abc.TaskGroup | None = None

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self.tg = tg
            await self._read_requests()
            # End of the client's input. A closed socket cancels what is in flight;
            # a half-closed one (the client shut down its sending side) gets its answers.
            while self.tasks and not self._peer_hung_up():
                await anyio.sleep(_HANGUP_POLL)
            tg.cancel_scope.cancel()

    # -- reading --------------------------------------------------------------------------------

    async def _read_requests(self) -> None:
        decoder = LineDecoder(max_line=self.options.max_line)
        while True:
            chunk = await self._receive()
            lines = decoder.feed(chunk) if chunk else decoder.end()  # the last line may lack its newline
            for line in lines:
                if line is None:
                    await self._too_long()
                else:
                    await self._dispatch(line)
            if not chunk:
                return

    async def _receive(self) -> bytes:
        """The next bytes from the client; ``b""`` at its end (or on a reset)."""
        await anyio.lowlevel.checkpoint()
        while True:
            try:
                return self.sock.recv(_READ_SIZE)
            except BlockingIOError:
                await anyio.wait_readable(self.sock)
            except OSError:
                return b""

    async def _too_long(self) -> None:
        limit = self.options.max_line
        await self._error(None, "line_too_long", f"request line longer than {limit} bytes; skipped to its newline")

    # -- requests -------------------------------------------------------------------------------

    async def _dispatch(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return  # blank lines are harmless (and handy with nc)
        try:
            await self._handle(line)
        except _BadRequest as exc:
            await self._error(None, exc.code, exc.message, exc.param)

    async def _handle(self, line: bytes) -> None:
        try:
            req = decode_json_object(line)
        except ValueError as exc:
            raise _BadRequest("invalid_json", f"a request must be a JSON object in UTF-8: {exc}") from None
        rid = req.get("id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
            raise _BadRequest("bad_request", '"id" must be a string or an integer', "id")
        op = req.get("op")
        if rid is not None and rid in self.requests and not (op == "cancel" and "target" not in req):
            # Whatever the op (only a cancel by id names a running request), not answered with that
            # id: the client would take the answer for the end of the running request.
            await self._send({
                "id": None, "event": "error", "code": "duplicate_id", "target": rid,
                "message": f"a request with id {rid!r} is still in flight on this connection; this one was not started",
            })  # fmt: skip
            return
        if not isinstance(op, str):
            await self._error(rid, "bad_request", 'missing "op" (one of: ' + ", ".join(_OPS) + ")", "op")
            return
        if op not in _OPS:
            await self._error(rid, "unknown_op", f"unknown op {op!r}; ops: " + ", ".join(_OPS))
            return
        if op == "ping":
            await self._send({"id": rid, "event": "result", "pong": True})
            return
        if op == "cancel":
            await self._cancel(rid, req)
            return
        if rid is None:
            raise _BadRequest("bad_request", f'op {op!r} needs an "id"', "id")
        if op == "models":
            models = [{"name": s.name, "phase": str(s.phase), "loaded": bool(s.loaded)} for s in self.pool.status()]
            await self._send({"id": rid, "event": "result", "models": models})
            return
        if op == "status":
            await self._send({"id": rid, "event": "result", **_status(self.pool)})
            return
        if op == "apply":
            await self._apply(rid, req)
            return
        if len(self.requests) >= self.options.max_in_flight:
            limit = self.options.max_in_flight
            await self._error(rid, "too_many_requests", f"{limit} requests already in flight on this connection")
            return
        try:
            request = _parse(rid, op, req)
        except _BadRequest as exc:
            await self._error(rid, exc.code, exc.message, exc.param)
            return
        self.requests[rid] = request
        self.tasks += 1
        self.options.active._started()
        assert self.tg is not None
        self.tg.start_soon(self._run, request)

    async def _apply(self, rid: RequestId, req: Mapping[str, Any]) -> None:
        """Serve a new config; answered once it is in place (rolling updates take their time).

        The connection keeps serving its other requests meanwhile. The apply
        itself does not depend on this connection: a client that goes away
        does not stop it.
        """
        apply = self.options.apply
        if apply is None:
            await self._error(rid, "not_supported", "this server takes no new config")
            return
        documents, dry_run = req.get("documents"), req.get("dry_run", False)
        if not isinstance(documents, list) or not isinstance(dry_run, bool):
            await self._error(rid, "bad_request", 'apply needs "documents" (a list of spec documents) and an'
                              ' optional boolean "dry_run"', "documents")  # fmt: skip
            return

        async def run() -> None:
            try:
                changes = await apply(documents, dry_run)
            except LlamaprocError as exc:
                await self._send(_error_event(rid, exc))
            else:
                await self._send({"id": rid, "event": "result", "dry_run": dry_run, "changes": changes})

        assert self.tg is not None
        self.tg.start_soon(run)

    async def _cancel(self, rid: RequestId | None, req: Mapping[str, Any]) -> None:
        if "target" in req:
            target = req["target"]
            request = self.requests.get(target) if isinstance(target, (str, int)) else None
            if request is not None:
                request.scope.cancel()
            await self._send({"id": rid, "event": "result", "target": target, "cancelled": request is not None})
            return
        if rid is None:
            raise _BadRequest("bad_request", 'cancel needs the "id" (or "target") of the request to cancel')
        request = self.requests.get(rid)
        if request is None:
            await self._error(rid, "not_found", f"no request with id {rid!r} is in flight")
            return
        request.scope.cancel()

    async def _run(self, request: _Request) -> None:
        metrics = self.metrics
        final: dict[str, Any] | None = None
        try:
            if metrics is not None:
                metrics.request_started(request.model, _API)
            try:
                with request.scope:
                    if request.op == "embed":
                        final = await self._embed(request)
                    else:
                        final = await self._generate(request)
            except Exception as exc:  # noqa: BLE001 - every failure becomes an error event
                if getattr(self.pool, "closed", False) is True:
                    final = {
                        "id": request.id,
                        "event": "error",
                        "code": "shutting_down",
                        "message": "the daemon is shutting down and stopped the request after its drain timeout"
                        if not isinstance(exc, ShuttingDownError)
                        else error_message(exc),
                    }
                else:
                    final = _error_event(request.id, exc)
            finally:
                # Also reached when the connection is cancelled: the id is free again
                # and the in-progress gauge must come down.
                self.requests.pop(request.id, None)
                if metrics is not None:
                    status = "cancelled" if final is None else final["code"] if final["event"] == "error" else "ok"
                    seconds = time.perf_counter() - request.started
                    metrics.request_done(request.model, _API, status, seconds, request.tokens)
                if request.tap is not None:
                    request.tap.end("done" if final is not None and final["event"] == "done" else "failed")
            if final is None:  # the cancel op cancelled request.scope
                final = {"id": request.id, "event": "error", "code": "cancelled", "message": "cancelled by the client"}
            await self._send(final)
        finally:
            self.tasks -= 1
            self.options.active._finished()

    async def _generate(self, request: _Request) -> dict[str, Any]:
        rid = request.id
        attempts = 0
        while True:
            attempts += 1
            async with self.pool.acquire(request.model) as endpoint:
                events = self.options.events
                if events is not None:
                    layout = endpoint.layout if isinstance(endpoint, ShardedModel) else None
                    request.tap = events.tap(request.model, layout)
                if isinstance(endpoint, ShardedModel):
                    result = await self._relay_sharded(request, endpoint)
                    break
                try:
                    result = await self._relay(request, endpoint)
                    break
                except ServerCrashedError:
                    # A replica that died before its first token: once, to another replica.
                    if attempts > 1 or request.tokens or len(_replicas(self.pool, request.model)) < 2:
                        raise
                    _log.info("model %r: its replica died before answering; trying another", request.model[:100])
        # The model is released before "done" goes out: a client that sees "done"
        # sees the pool's accounting without this request.
        if result.usage.completion_tokens:
            request.tokens = result.usage.completion_tokens
        return {
            "id": rid,
            "event": "done",
            "finish_reason": result.finish_reason,
            "usage": result.usage.model_dump(),
            "timings": None if result.timings is None else result.timings.model_dump(),
        }

    async def _relay(
        self, request: _Request, endpoint: Endpoint, resume: tuple[dict[str, Any], Job | None] | None = None
    ) -> Completion:
        """Stream one answer of the endpoint to the client as token events; return its summary.

        Sent as ``TextModel.generate`` / ``TextModel.chat`` would send it (the
        body was built and checked by the protocol's functions); failures are
        explained by the endpoint (a crashed child is a ServerCrashedError, a
        hung one a ServerHungError).
        """
        kind: Literal["native", "chat"] = "native" if request.op == "generate" else "chat"
        path = STREAM_PATHS[kind]
        options = self.options
        await check_alive(endpoint)
        try:
            response = await options.client.post(
                endpoint.base_url, path, request.body, stream=True, headers=auth_headers(endpoint)
            )
        except UpstreamError as exc:
            raise await endpoint.explain(exc) from exc
        reader = StreamReader(response, kind, endpoint=endpoint, stall_timeout=options.stall_timeout(request.model))
        base_url = endpoint.base_url
        last_token = time.monotonic()
        try:  # closed however this ends: closing an unfinished stream makes llama-server free the slot
            if not 200 <= response.status < 300:
                raise await error_of(response, endpoint.base_url + path)
            while (events := await reader.next_events()) is not None:
                for _, token in events:
                    if token is not None:
                        last_token = time.monotonic()
                        await self._token(request, token)
            return reader.summary()
        except LlamaprocError as exc:
            error = await reader.fail(exc)
            if (
                resume is not None and isinstance(endpoint, ShardedModel) and resumable_error(error)
            ):
                reader.close()
                return await self._continue(request, endpoint, resume[0], resume[1], reader.parser.ids, base_url,
                                            error, last_token)
            if error is exc:
                raise
            raise error from exc
        finally:
            reader.close()

    async def _relay_sharded(self, request: _Request, model: ShardedModel) -> Completion:
        """:meth:`_relay` for a model split over rpc workers: logged as a job; a stream cut by the loss of a
        worker continues after a ``reshard`` event (``{"id", "event": "reshard", "after_tokens", "lost",
        "layout", "seconds", ...}``)."""
        jobs = self.options.jobs
        job = jobs.start(request.model, request.op) if jobs is not None else None
        if job is not None:
            job.set_layout(model.layout)
        kind: Literal["native", "chat"] = "native" if request.op == "generate" else "chat"
        status: Literal["done", "failed"] = "failed"
        try:
            await model.ready()
            body = json.loads(request.body)
            if not model.wants_token_ids(kind, body):
                result = await self._relay(request, model)
            else:
                request.body = encode_json(body)
                result = await self._relay(request, model, resume=(body, job))
            status = "done"
            return result
        finally:
            if job is not None:
                job.finish(status, request.tokens)

    async def _continue(self, request: _Request, model: ShardedModel, body: dict[str, Any], job: Job | None,
                        ids: list[int], base_url: str, error: LlamaprocError, last_token: float) -> Completion:
        kind: Literal["native", "chat"] = "native" if request.op == "generate" else "chat"
        stream = model.continue_stream(
            kind, body, ids, delivered=request.tokens, base_url=base_url, reason=str(error).splitlines()[0],
            last_token=last_token,
        )  # fmt: skip
        recorded = 0
        try:
            async with stream:
                async for token in stream:
                    recorded = await self._reshards(request, job, stream.reshards, recorded)
                    await self._token(request, token)
        finally:
            with anyio.CancelScope(shield=True):
                await self._reshards(request, job, stream.reshards, recorded)
        assert stream.result is not None
        return stream.result

    async def _reshards(self, request: _Request, job: Job | None, reshards: list[Reshard], recorded: int) -> int:
        for reshard in reshards[recorded:]:
            if job is not None:
                job.add_reshard(reshard)
            record = getattr(self.metrics, "record_resume", None)
            if record is not None:
                record(request.model, reshard)
            if request.tap is not None:
                request.tap.resume(reshard)
            await self._send({"id": request.id, "event": "reshard", **reshard.to_json()})
        return len(reshards)

    async def _token(self, request: _Request, token: Token) -> None:
        if request.tokens == 0 and self.metrics is not None:
            self.metrics.first_token(request.model, time.perf_counter() - request.started)
        request.tokens += 1
        tap = request.tap
        if tap is not None and tap.feed.subscribers:
            tap.token(token.text)
        event: dict[str, Any] = {"id": request.id, "event": "token", "text": token.text}
        if token.id is not None and request.op == "generate":
            event["token_id"] = token.id
        await self._send(event)

    async def _embed(self, request: _Request) -> dict[str, Any]:
        path = "/v1/embeddings"
        async with self.pool.acquire(request.model) as endpoint:
            await check_alive(endpoint)
            try:
                response = await self.options.client.post(
                    endpoint.base_url, path, request.body, headers=auth_headers(endpoint)
                )
                try:
                    if not 200 <= response.status < 300:
                        raise await error_of(response, endpoint.base_url + path)
                    answer = await response.read()
                finally:
                    response.close()
            except UpstreamError as exc:
                raise await endpoint.explain(exc) from exc
        try:
            items = sorted(json.loads(answer)["data"], key=lambda item: item.get("index", 0))
            vectors = [list(item["embedding"]) for item in items]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UpstreamError(f"malformed embeddings answer from llama-server: {exc!r}") from exc
        return {"id": request.id, "event": "result", "embeddings": vectors}

    # -- writing --------------------------------------------------------------------------------

    async def _error(self, rid: RequestId | None, code: str, message: str, param: str | None = None) -> None:
        event: dict[str, Any] = {"id": rid, "event": "error", "code": code, "message": message}
        if param is not None:
            event["param"] = param
        await self._send(event)

    async def _send(self, event: dict[str, Any]) -> None:
        """Write one event line, or drop the connection when that is impossible."""
        if not self.gone:
            data = encode_event(event)
            async with self.lock:
                if not await self._write(data):
                    self._hang_up()
        if self.gone:
            await anyio.lowlevel.checkpoint()  # delivers the cancellation of this connection

    async def _write(self, data: bytes) -> bool:
        """Write ``data`` whole within the write timeout; False if the client is to be dropped.

        Cancellation is honoured until the first byte is out; after that the
        rest of the line is written shielded (still within the timeout), so a
        cancelled request never leaves half an event on the wire.
        """
        sock = self.sock
        view = memoryview(data)
        try:
            try:  # the usual case: the whole line fits in the socket buffer at once
                sent = sock.send(view, _SEND_FLAGS)
            except BlockingIOError:
                sent = 0
            if sent == len(view):
                return True
            timeout = self.options.write_timeout
            deadline = anyio.current_time() + timeout
            if not sent:
                with anyio.CancelScope(deadline=deadline) as scope:
                    while not sent:
                        await anyio.wait_writable(sock)
                        try:
                            sent = sock.send(view, _SEND_FLAGS)
                        except BlockingIOError:
                            pass
                if scope.cancelled_caught:
                    _log.warning("socket client read nothing for %gs; dropping it", timeout)
                    return False
            view = view[sent:]
            with anyio.CancelScope(shield=True, deadline=deadline):
                while view:
                    try:
                        view = view[sock.send(view, _SEND_FLAGS) :]
                    except BlockingIOError:
                        await anyio.wait_writable(sock)
            if view:
                _log.warning("socket client read nothing for %gs; dropping it", timeout)
                return False
        except OSError:  # EPIPE, ECONNRESET: the client is gone
            return False
        return True

    def _hang_up(self) -> None:
        self.gone = True
        if self.tg is not None:
            self.tg.cancel_scope.cancel()

    def _peer_hung_up(self) -> bool:
        """Whether the client closed its socket, not merely shut down its sending side."""
        if self.gone:
            return True
        try:
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLHUP)
            hung_up = bool(poller.poll(0))
        except (OSError, ValueError):
            hung_up = True
        if hung_up:
            self.gone = True
        return hung_up


# --- parsing and encoding ------------------------------------------------------------------------


def _parse(rid: RequestId, op: str, req: dict[str, Any]) -> _Request:
    """Check a generate / chat / embed request and build its llama-server body (the library's checks)."""
    model = req.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("bad_request", f'op {op!r} needs "model", the name of a configured model', "model")
    # JSON null stands for "not given": the defaults apply (greedy, 256 tokens).
    params = {k: v for k, v in req.items() if k not in _RESERVED and v is not None}
    try:
        if op == "generate":
            if "prompt" not in req:
                raise InvalidArgumentError('op "generate" needs "prompt"', param="prompt")
            body = generate_request_body(req["prompt"], **params)
        elif op == "chat":
            body = chat_request_body(req.get("messages"), **params)
        else:
            inputs = req.get("input")
            body = {"input": check_inputs([inputs] if isinstance(inputs, str) else inputs)}
        return _Request(rid, op, model, encode_json(body))
    except InvalidArgumentError as exc:
        raise _BadRequest("bad_request", str(exc), exc.param) from None


def _replicas(pool: _Pool, name: str) -> Sized:
    replicas = getattr(pool, "replicas", None)
    return replicas(name) if callable(replicas) else ()


def _status(pool: _Pool) -> dict[str, Any]:
    out: dict[str, Any] = {"models": [s.model_dump(mode="json") for s in pool.status()]}
    stats = getattr(pool, "stats", None)
    if stats is not None:
        out["stats"] = {
            key: getattr(stats, key)
            for key in ("loads", "evictions", "restarts", "idle_unloads")
            if hasattr(stats, key)
        }
    draining = getattr(pool, "draining", None)
    if isinstance(draining, bool):
        out["draining"] = draining
    return out


def _error_event(rid: RequestId, exc: BaseException) -> dict[str, Any]:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    code = error_code(exc)
    event: dict[str, Any] = {"id": rid, "event": "error", "code": code, "message": error_message(exc)}
    if isinstance(exc, InvalidArgumentError) and exc.param is not None:
        event["param"] = exc.param
    if isinstance(exc, QueueFullError):
        event["retry_after"] = exc.retry_after
    if isinstance(exc, ConfigError):
        event["problems"] = list(exc.problems)
    if code == "internal_error":
        _log.error("socket request %r failed", rid, exc_info=exc)
    return event
