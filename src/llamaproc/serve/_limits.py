"""Deadlines and a connection limit for the daemon's HTTP server (slow clients, "slowloris").

uvicorn has no deadline for reading a request: a client that sends its head
a byte at a time, or declares a long ``Content-Length`` and sends less, holds
its connection (a file descriptor, a parser, maybe an admission slot) for as
long as it likes, and a few hundred such clients exhaust the daemon. Its
keep-alive timer does not help: every byte received cancels it.

:func:`limited_protocol` makes a subclass of uvicorn's httptools protocol
(the one uvicorn picks whenever httptools is installed, and the daemon's extra
installs it: its upstream client uses it too, so uvicorn's h11 protocol is
never used) that adds:

- a **head deadline**: the whole request head must arrive within
  ``header_timeout`` of the connection being made, or of the first byte of
  the next request on a kept-alive connection. Bytes trickling in do not
  extend it. When it passes the connection is closed.
- a **body deadline**: the whole body must arrive within ``body_timeout`` of
  the end of the head. When it passes the request gets 408 (if nothing was
  answered yet; the app sees the client as gone) and the connection is closed.
- a **connection limit**: beyond ``max_connections`` open connections a new
  one gets 503 with ``Connection: close`` at once, before anything of it is
  read. uvicorn's own ``limit_concurrency`` is not enough: it is checked only
  once a request head is complete, so connections that never complete one (the
  very attack) are never counted against anything.

A request that arrives in one packet, the usual case, arms no timer of its
own: the deadlines are set only when a head or a body is still incomplete
after the bytes at hand are parsed.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..protocol import openai_error_body

__all__ = ["ConnectionLimits", "ensure_file_limit", "limited_protocol"]

_log = logging.getLogger("llamaproc.serve")

#: File descriptors the daemon needs besides its HTTP connections (children's pipes, upstream
#: connections, the socket server's clients, log files).
_SPARE_FILES = 256


@dataclass(frozen=True)
class ConnectionLimits:
    """The deadlines (seconds) and the connection limit of :func:`limited_protocol`."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1024


def _answer(status: bytes, type_: str, code: str, message: str, extra: bytes = b"") -> bytes:
    """A whole HTTP answer with an error in OpenAI's shape, closing the connection."""
    body = openai_error_body(code, message, type_=type_)
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode() + b"\r\nconnection: close\r\n" + extra + b"\r\n" + body
    )  # fmt: skip


class _LimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head deadline, a body deadline and a connection limit."""

    limits = ConnectionLimits()
    too_many = b""  # the 503 answer to a connection beyond the limit
    too_slow = b""  # the 408 answer to a body that came too slowly

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._in_head = False  # a request head has begun and is not complete
        self._body_pending = False  # a request head is complete, its body not yet
        self._completed = 0  # requests received whole

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            # Answered and closed before anything is read: what the client sent is dropped.
            transport.write(self.too_many)
            transport.close()
            return
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        completed = self._completed
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._body_pending:
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)
        elif self._head_timer is None and (self._in_head or self._completed == completed):
            # Part of a head, or bytes between requests that begin none (blank lines): the next
            # head's deadline starts now. Bytes that ended a request (the usual case) arm nothing.
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def on_message_begin(self) -> None:
        self._in_head = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._body_pending = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._body_pending = False
        self._completed += 1
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            self.transport.write(self.too_slow)
        if cycle is not None and not cycle.response_complete:
            # The app sees its client gone: its receive() answers http.disconnect, its sends are dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


def limited_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """A uvicorn HTTP protocol class (for ``uvicorn.Config(http=...)``) enforcing ``limits``."""
    settings = limits

    class LimitedHttpToolsProtocol(_LimitedProtocol):
        limits = settings
        too_many = _answer(
            b"503 Service Unavailable",
            "server_error",
            "too_many_connections",
            f"the server has {settings.max_connections} connections open, its limit; try again later",
            b"retry-after: 1\r\n",
        )
        too_slow = _answer(
            b"408 Request Timeout",
            "invalid_request_error",
            "request_timeout",
            f"the request body did not arrive within {settings.body_timeout:g}s",
        )

    return LimitedHttpToolsProtocol


def ensure_file_limit(max_connections: int) -> None:
    """Raise the soft open-file limit so that ``max_connections`` connections fit beside the daemon's
    own files (up to the hard limit); warn when even that is too low: the limit would then be the
    kernel's ``accept`` failing rather than the clean refusal of :func:`limited_protocol`."""
    need = max_connections + _SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # pragma: no cover - refused by the system
            target = soft
    if target < need:
        _log.warning(
            "llamaproc serve: the open-file limit (%d) is too low for max_connections = %d;"
            " lower max_connections or raise the limit (ulimit -n)",
            target,
            max_connections,
        )
