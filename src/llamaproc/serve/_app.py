"""The ASGI app of ``llamaproc serve``: the proxied OpenAI routes, the listing and management routes,
the rpc worker registry's routes, the job log, and the dashboard (its event feed, page and login)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import LlamaprocError, WorkerError
from ..protocol import OPENAI_REQUIRED, error_code, error_message, error_status
from ..runtime import redacted
from ._dashboard import EventsRoute, dashboard_routes
from ._events import EventFeed
from ._metrics import CONTENT_TYPE, ServeMetrics
from ._openapi import openapi_bytes
from ._proxy import DEFAULT_MAX_BODY, ProxyRoute, ProxyState, error_response, retry_headers
from ._security import HttpSecurity
from ._upstream import Upstream
from ._workers import HeartbeatBody, JobLog, RegisterBody, RegistryFullError, UnknownWorkerError, WorkerRegistry

if TYPE_CHECKING:
    from ..ledger import Ledger
    from ..runtime import ModelPool

__all__ = ["MAX_WORKER_BODY", "create_app"]

#: The largest body the worker routes read (a registration with its devices is a few KiB).
MAX_WORKER_BODY = 64 * 1024


# --- management and listing --------------------------------------------------------------------


def _model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "llamaproc"}


def create_app(
    pool: ModelPool[Any],
    *,
    client: Upstream,
    metrics: ServeMetrics | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    security: HttpSecurity | None = None,
    workers: WorkerRegistry | None = None,
    jobs: JobLog | None = None,
    ledger: Ledger | None = None,
    events: EventFeed | None = None,
) -> ASGIApp:
    """The ASGI app of the daemon, serving ``pool``.

    ``client`` reaches the llama-server children; the caller owns and closes it.
    ``security`` checks every request first (default: no API key, loopback
    ``Host`` names only, no cross-origin browser requests). ``workers`` and
    ``jobs`` are served by ``/api/workers`` and ``/api/jobs``, ``events`` by
    ``/api/events`` (default: empty ones of the app's own; the relayed streams
    publish their tokens to ``events``). ``ledger`` is the pool's memory
    ledger, listed by ``/api/leases``.
    """
    if metrics is None:
        metrics = ServeMetrics(pool)
    registry = workers if workers is not None else WorkerRegistry()
    job_log = jobs if jobs is not None else JobLog()
    feed = events if events is not None else EventFeed()
    metrics.attach_events(feed)
    security = security if security is not None else HttpSecurity()
    write_timeout = pool.config.write_timeout
    state = ProxyState(pool, client, metrics, max_body, write_timeout=write_timeout, jobs=job_log, events=feed)
    events_route = EventsRoute(feed, write_timeout=write_timeout)

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_object(n, state.created) for n in pool.names()]})

    async def get_model(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in pool.names():
            return error_response("model_not_found", f"model {name[:100]!r} not found", param="model")
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
        except LlamaprocError as exc:
            code = error_code(exc)
            param = "model" if code == "model_not_found" else None
            return error_response(
                code, error_message(exc), status=error_status(exc, code), param=param, headers=retry_headers(exc, code)
            )
        return JSONResponse(_status_of(name))

    async def load(request: Request) -> Response:
        return await _manage(request.path_params["name"], pool.load)

    async def unload(request: Request) -> Response:
        return await _manage(request.path_params["name"], pool.unload)

    async def list_workers(request: Request) -> Response:
        return JSONResponse({"workers": registry.snapshot(), "heartbeat_interval": registry.heartbeat_interval})

    async def register_worker(request: Request) -> Response:
        body = await _read_body(request, RegisterBody)
        if isinstance(body, Response):
            return body
        devices = body.device_list()
        if registry.probe is not None:
            try:
                probed = await registry.probe(body.address)
            except WorkerError as exc:
                return error_response("bad_request", error_message(exc), param="address")
            devices = devices or list(probed)
        try:
            entry = registry.register(body.address, devices, body.cpu_seconds)
        except RegistryFullError as exc:
            return error_response("too_many_workers", str(exc), headers={"Retry-After": "60"})
        return JSONResponse({"id": entry.id, "heartbeat_interval": registry.heartbeat_interval})

    async def heartbeat(request: Request) -> Response:
        body = await _read_body(request, HeartbeatBody)
        if isinstance(body, Response):
            return body
        try:
            entry = registry.heartbeat(body.id, body.cpu_seconds)
        except UnknownWorkerError as exc:
            return error_response("worker_not_found", str(exc), param="id")
        return JSONResponse({"id": entry.id, "heartbeat_interval": registry.heartbeat_interval})

    async def evict_worker(request: Request) -> Response:
        worker_id = request.path_params["id"]
        try:
            entry = registry.evict(worker_id)
        except UnknownWorkerError as exc:
            return error_response("worker_not_found", str(exc), param="id")
        return JSONResponse(registry.describe(entry))

    async def list_leases(request: Request) -> Response:
        if ledger is None:
            return JSONResponse({"ledger": None, "capacity": {}, "leases": []})
        try:
            capacity = await ledger.capacity()
            leases = await ledger.leases()
        except LlamaprocError as exc:
            return error_response("ledger_unavailable", f"the memory ledger cannot be read: {error_message(exc)}")
        return JSONResponse({
            "ledger": redacted(pool.config.ledger or ""),  # the URL without the password a Redis URL may carry
            "capacity": capacity,
            "leases": [dataclasses.asdict(lease) for lease in leases],
        })  # fmt: skip

    async def list_jobs(request: Request) -> Response:
        return JSONResponse({"jobs": job_log.snapshot()})

    async def health(request: Request) -> Response:
        if pool.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok", "time": datetime.now(UTC).isoformat()})

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def openapi(request: Request) -> Response:
        return Response(openapi_bytes(), media_type="application/json")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        where = f"{request.method} {request.url.path[:200]}"  # never echo a huge path back
        return error_response(code, f"{exc.detail}: {where}", status=exc.status_code)

    hot = {path: ProxyRoute(path, state) for path in OPENAI_REQUIRED}
    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", get_model, methods=["GET"]),
        *(Route(path, endpoint, methods=["POST"]) for path, endpoint in hot.items()),
        Route("/api/models", api_models, methods=["GET"]),
        Route("/api/models/{name}/load", load, methods=["POST"]),
        Route("/api/models/{name}/unload", unload, methods=["POST"]),
        Route("/api/workers", list_workers, methods=["GET"]),
        Route("/api/workers/register", register_worker, methods=["POST"]),
        Route("/api/workers/heartbeat", heartbeat, methods=["POST"]),
        Route("/api/workers/{id}", evict_worker, methods=["DELETE"]),
        Route("/api/jobs", list_jobs, methods=["GET"]),
        Route("/api/leases", list_leases, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *dashboard_routes(events_route, security),
    ]
    starlette = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    return _App(starlette, hot, security, {"/api/events": events_route})


_Body = TypeVar("_Body", bound=BaseModel)


async def _read_body(request: Request, model: type[_Body]) -> _Body | Response:
    """The request's JSON body checked against ``model``, or the 400 or 413 answer saying what is wrong."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_WORKER_BODY:
            return error_response("body_too_large", f"the body is larger than {MAX_WORKER_BODY} bytes")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        return error_response("invalid_json", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        param = _dotted(error["loc"])
        message = str(error["ctx"]["error"]) if "error" in error.get("ctx", {}) else error["msg"]
        return error_response("bad_request", f"{param}: {message}"[:1000], param=param or None)


def _dotted(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


class _App:
    """The daemon's ASGI app: every request passes the security gate (``Host``, ``Origin``, API key),
    then the proxied ``POST`` routes and the ``GET`` of the event feed go straight to their endpoint,
    everything else through Starlette (routing, error pages). The proxy answers its own errors, so
    Starlette's middleware has nothing to add on the path every token request takes; the event feed
    needs the server's own ``send`` (to reach its connection's socket)."""

    __slots__ = ("feeds", "hot", "security", "starlette")

    def __init__(
        self,
        starlette: Starlette,
        hot: dict[str, ProxyRoute],
        security: HttpSecurity,
        feeds: dict[str, EventsRoute] | None = None,
    ) -> None:
        self.starlette = starlette
        self.hot = hot
        self.security = security
        self.feeds = feeds or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            verdict = self.security.check(scope)
            if verdict is not None:
                if verdict.status:
                    await verdict.answer(send)
                    return
                send = verdict.wrap(send)
            method = scope["method"]
            if method == "POST":
                endpoint = self.hot.get(scope["path"])
                if endpoint is not None:
                    await endpoint(scope, receive, send)
                    return
            elif method == "GET":
                feed = self.feeds.get(scope["path"])
                if feed is not None:
                    await feed(scope, receive, send)
                    return
        await self.starlette(scope, receive, send)
