"""The ASGI app of ``llamaproc serve``: the proxied OpenAI routes, the listing and management routes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import LlamaprocError
from ..protocol import OPENAI_REQUIRED, error_code, error_message, error_status
from ._metrics import CONTENT_TYPE, ServeMetrics
from ._openapi import openapi_bytes
from ._proxy import DEFAULT_MAX_BODY, ProxyRoute, ProxyState, error_response, retry_headers
from ._security import HttpSecurity
from ._upstream import Upstream

if TYPE_CHECKING:
    from ..runtime import ModelPool

__all__ = ["create_app"]


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
) -> ASGIApp:
    """The ASGI app of the daemon, serving ``pool``.

    ``client`` reaches the llama-server children; the caller owns and closes it.
    ``security`` checks every request first (default: no API key, loopback
    ``Host`` names only, no cross-origin browser requests).
    """
    if metrics is None:
        metrics = ServeMetrics(pool)
    state = ProxyState(pool, client, metrics, max_body, write_timeout=pool.config.write_timeout)

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
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    starlette = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    return _App(starlette, hot, security if security is not None else HttpSecurity())


class _App:
    """The daemon's ASGI app: every request passes the security gate (``Host``, ``Origin``, API key),
    then the proxied ``POST`` routes go straight to their endpoint, everything else through Starlette
    (routing, error pages). The proxy answers its own errors, so Starlette's middleware has nothing
    to add on the path every token request takes."""

    __slots__ = ("hot", "security", "starlette")

    def __init__(self, starlette: Starlette, hot: dict[str, ProxyRoute], security: HttpSecurity) -> None:
        self.starlette = starlette
        self.hot = hot
        self.security = security

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            verdict = self.security.check(scope)
            if verdict is not None:
                if verdict.status:
                    await verdict.answer(send)
                    return
                send = verdict.wrap(send)
            if scope["method"] == "POST":
                endpoint = self.hot.get(scope["path"])
                if endpoint is not None:
                    await endpoint(scope, receive, send)
                    return
        await self.starlette(scope, receive, send)
