"""The daemon's dashboard: the live event feed (``GET /api/events``), the page that shows it (``GET /ui``) and
its login (``POST /ui/login``, ``POST /ui/logout``).

The page is a static HTML file and a script, package data of ``llamaproc.serve``
(``ui/``), served as they are: it reads ``/api/models``, ``/api/workers`` and
``/api/events`` like any client. A browser's ``EventSource`` cannot send an
``Authorization`` header, so when the daemon has API keys the page logs in
once: the login takes a key and answers a session cookie (``HttpOnly``,
``SameSite=Strict``, ``Path=/``; a random token, never the key), which the
gate of :mod:`._security` accepts in place of the header for reading ``/ui``
and ``/api/*``. The page and its script need no key: they hold nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
from importlib import resources
from urllib.parse import parse_qsl

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ._events import EventFeed, FeedClosedError, FeedFullError, Subscriber, frame
from ._proxy import _drop_client, _send_error, error_response
from ._security import SESSION_COOKIE, HttpSecurity, session_cookie

__all__ = ["KEEPALIVE", "MAX_LOGIN_BODY", "SEND_BUFFER", "EventsRoute", "dashboard_routes"]

_log = logging.getLogger("llamaproc.serve")

#: Seconds between comments on an idle feed (they keep proxies from closing it, and find dead clients).
KEEPALIVE = 15.0
#: The largest login form read.
MAX_LOGIN_BODY = 4096
#: The kernel's send buffer for a feed's connection: small, so that what a slow subscriber has not read waits in
#: its bounded buffer of events, where the oldest are dropped and counted, not in megabytes of socket buffer.
SEND_BUFFER = 32 * 1024
#: Milliseconds an ``EventSource`` waits before it reconnects.
_RETRY_MS = 2000
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
#: The page runs only its own script, talks only to the daemon, and may not be framed.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # not no-referrer: a form POST would then send "Origin: null"
    "Cache-Control": "no-cache",
}
_TYPES = {"dashboard.html": "text/html; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}


@functools.cache
def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("ui", name).read_bytes()


def dashboard_routes(events: EventsRoute, security: HttpSecurity) -> list[Route]:
    """The routes of the event feed, the page and its login."""

    def asset(name: str) -> Response:
        return Response(_asset(name), media_type=_TYPES[name], headers=_PAGE_HEADERS)

    async def page(request: Request) -> Response:
        return asset("dashboard.html")

    async def script(request: Request) -> Response:
        return asset("dashboard.js")

    async def login(request: Request) -> Response:
        key = await _form_key(request)
        if isinstance(key, Response):
            return key
        answer = _see_ui()
        if security.requires_key:
            token = security.login(key)
            if token is None:
                return error_response("invalid_api_key", "that is not one of the daemon's API keys", param="key")
            answer.set_cookie(SESSION_COOKIE, token, max_age=int(security.sessions.ttl), path="/",
                              httponly=True, samesite="strict", secure=request.url.scheme == "https")  # fmt: skip
        return answer

    async def logout(request: Request) -> Response:
        token = session_cookie(request.headers.get("cookie", "").encode("latin-1"))
        if token is not None:
            security.sessions.end(token)
        answer = _see_ui()
        answer.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return answer

    return [
        Route("/api/events", events, methods=["GET"]),
        Route("/ui", page, methods=["GET"]),
        Route("/ui/dashboard.js", script, methods=["GET"]),
        Route("/ui/login", login, methods=["POST"]),
        Route("/ui/logout", logout, methods=["POST"]),
    ]


def _see_ui() -> Response:
    """303 to the page: after a form's POST the browser shows ``/ui`` again."""
    return Response(status_code=303, headers={"Location": "/ui", "Cache-Control": "no-store"})


async def _form_key(request: Request) -> str | Response:
    """The ``key`` field of a login form (``application/x-www-form-urlencoded``), or the 400/413 answer."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        return error_response("bad_request", "send the key as a form: application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_LOGIN_BODY:
            return error_response("body_too_large", f"the body is larger than {MAX_LOGIN_BODY} bytes")
    try:
        fields = dict(parse_qsl(body.decode("utf-8"), max_num_fields=16))
    except (UnicodeDecodeError, ValueError):
        return error_response("bad_request", "the body is not a form in UTF-8")
    key = fields.get("key")
    if not key:
        return error_response("bad_request", "the form has no key", param="key")
    return key


class EventsRoute:
    """``GET /api/events`` as a raw ASGI app: one subscription per request, written as it fills.

    Under uvicorn, given uvicorn's own ``send`` (the app calls it directly,
    not through Starlette), the connection's socket gets a small send buffer
    (:data:`SEND_BUFFER`), and a write that cannot go out for ``write_timeout``
    seconds drops the client (the events it missed meanwhile were dropped from
    its buffer, not kept). The subscription ends when the client disconnects
    (it is forgotten at once) or the feed is closed.
    """

    def __init__(self, feed: EventFeed, *, write_timeout: float, keepalive: float = KEEPALIVE) -> None:
        self.feed = feed
        self.write_timeout = write_timeout
        self.keepalive = keepalive

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            subscriber = self.feed.subscribe()
        except FeedFullError as exc:
            await _send_error(send, "too_many_subscribers", str(exc), headers={"Retry-After": "10"})
            return
        except FeedClosedError as exc:
            await _send_error(send, "shutting_down", str(exc), headers={"Retry-After": "1"})
            return
        try:
            _limit_send_buffer(send)  # before the first write: the socket has sent nothing yet
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_disconnect, receive, tg.cancel_scope)
                await self._write(subscriber, send)
                tg.cancel_scope.cancel()
        finally:
            self.feed.unsubscribe(subscriber)

    async def _write(self, subscriber: Subscriber, send: Send) -> None:
        first = f"retry: {_RETRY_MS}\n\n".encode() + frame("subscribed", {"buffer": self.feed.buffer})
        frames: list[bytes] | None = [first]
        while frames is not None:
            body = b"".join(frames) or b": keepalive\n\n"
            with anyio.move_on_after(self.write_timeout) as deadline:
                await send({"type": "http.response.body", "body": body, "more_body": True})
            if deadline.cancelled_caught:
                _log.warning("llamaproc serve: a client of /api/events read nothing for %gs; dropped it",
                             self.write_timeout)  # fmt: skip
                await _drop_client(send)
                return
            frames = await subscriber.next(self.keepalive)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _limit_send_buffer(send: Send) -> None:
    """Set the send buffer of the connection ``send`` answers (uvicorn's: its ``send`` is a method of the
    request's cycle, which holds the transport; elsewhere nothing is done)."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    get_extra_info = getattr(transport, "get_extra_info", None)
    sock = get_extra_info("socket") if callable(get_extra_info) else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """Cancel the subscription when its client disconnects."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
