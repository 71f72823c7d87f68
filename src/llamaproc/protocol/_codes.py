"""The one vocabulary of error codes, shared by every front end of the daemon.

The same failure has the same code string on HTTP (``error.code`` in OpenAI's
error shape, with :attr:`ErrorCode.status` as the status) and on the Unix
socket (``code`` of an ``error`` event). :data:`ERROR_CODES` is the table the
README prints; :func:`error_code` maps an exception to its code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import (
    ClosedError,
    ConfigError,
    InvalidArgumentError,
    LeaseTimeoutError,
    LedgerError,
    LlamaprocError,
    ModelNotFoundError,
    ModelUnavailableError,
    PoolError,
    QueueFullError,
    ServerCrashedError,
    ServerHungError,
    ShuttingDownError,
    StalledError,
    StatusError,
)

__all__ = [
    "ERROR_CODES",
    "ErrorCode",
    "error_code",
    "error_codes_table",
    "error_message",
    "error_status",
    "openai_error_body",
]


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """One code of the table: its HTTP status, OpenAI error type, and what it means."""

    code: str
    status: int
    type: str
    meaning: str
    #: Where it can be sent: "both", "http" or "socket".
    front_end: str = "both"
    #: Whether the answer says when to retry (HTTP ``Retry-After``, the socket's ``retry_after``).
    retry: bool = False


_INVALID = "invalid_request_error"
_SERVER = "server_error"

ERROR_CODES: dict[str, ErrorCode] = {
    e.code: e
    for e in (
        ErrorCode("invalid_json", 400, _INVALID, "the body (or the line) is not a JSON object"),
        ErrorCode("bad_request", 400, _INVALID,
                  "a field is missing or has a wrong type or value (`param` names it), "
                  "llama-server refused the request's parameters, or an applied config is invalid (`problems`)"),
        ErrorCode("invalid_api_key", 401, _INVALID, "no `Authorization: Bearer KEY` header, or not a configured key",
                  "http"),
        ErrorCode("origin_not_allowed", 403, _INVALID,
                  "a cross-origin browser request from an origin not in `allowed_origins`", "http"),
        ErrorCode("not_found", 404, _INVALID, "no such route; on the socket: no request with that id is in flight"),
        ErrorCode("model_not_found", 404, _INVALID, "no model of that name is configured"),
        ErrorCode("worker_not_found", 404, _INVALID,
                  "no rpc worker of that id is registered, or it was evicted (a worker registers again)", "http"),
        ErrorCode("method_not_allowed", 405, _INVALID, "the route does not take that method", "http"),
        ErrorCode("request_timeout", 408, _INVALID, "the request's head or body did not arrive in time", "http"),
        ErrorCode("duplicate_id", 409, _INVALID, "a request with this id is still in flight on this connection",
                  "socket"),
        ErrorCode("body_too_large", 413, _INVALID, "the request body is larger than the limit", "http"),
        ErrorCode("line_too_long", 413, _INVALID, "the request line is longer than the limit", "socket"),
        ErrorCode("unknown_op", 400, _INVALID, "the `op` is not one the socket knows", "socket"),
        ErrorCode("invalid_host", 421, _INVALID,
                  "the `Host` is not one this daemon answers to (DNS rebinding); see `allowed_hosts`", "http"),
        ErrorCode("queue_full", 429, "rate_limit_error",
                  "every slot of the model is busy and its queue is full", retry=True),
        ErrorCode("too_many_requests", 429, "rate_limit_error", "too many requests in flight on this connection",
                  "socket"),
        ErrorCode("cancelled", 499, _INVALID, "the client cancelled the request", "socket"),
        ErrorCode("internal_error", 500, _SERVER, "a bug in the daemon (logged with its traceback)"),
        ErrorCode("not_supported", 501, _SERVER,
                  "the model cannot do this (e.g. embeddings from a model loaded without them)"),
        ErrorCode("upstream_error", 502, _SERVER,
                  "llama-server failed the request, ended the stream early or crashed (it is restarted)"),
        ErrorCode("model_unavailable", 503, _SERVER,
                  "the model is Failed, could not be loaded, is loading, or does not fit the memory budget"),
        ErrorCode("memory_unavailable", 503, _SERVER,
                  "the model waited `lease_timeout` for its memory lease in the ledger, held by other processes",
                  retry=True),
        ErrorCode("ledger_unavailable", 503, _SERVER,
                  "the memory ledger (its SQLite file or Redis) cannot be used", "http"),
        ErrorCode("shutting_down", 503, _SERVER, "the daemon is draining or stopping", retry=True),
        ErrorCode("too_many_connections", 503, _SERVER,
                  "the daemon has `max_connections` HTTP connections open; refused before reading", "http",
                  retry=True),
        ErrorCode("too_many_subscribers", 503, _SERVER,
                  "`GET /api/events` has as many subscribers as it takes (32)", "http", retry=True),
        ErrorCode("too_many_workers", 503, _SERVER,
                  "the daemon's registry of rpc workers is full (none of them lost)", "http", retry=True),
        ErrorCode("upstream_timeout", 504, _SERVER,
                  "llama-server sent nothing for `stall_timeout` seconds and made no progress (hung; restarted)"),
    )
}  # fmt: skip


def error_code(exc: BaseException) -> str:
    """The code of the table for ``exc``."""
    if isinstance(exc, (InvalidArgumentError, ConfigError)):
        return "bad_request"
    if isinstance(exc, ModelNotFoundError):
        return "model_not_found"
    if isinstance(exc, QueueFullError):
        return "queue_full"
    if isinstance(exc, ShuttingDownError):
        return "shutting_down"
    if isinstance(exc, LeaseTimeoutError):
        return "memory_unavailable"
    if isinstance(exc, LedgerError):
        return "ledger_unavailable"
    if isinstance(exc, (ModelUnavailableError, PoolError, ClosedError)):
        return "model_unavailable"
    if isinstance(exc, StatusError):
        if exc.status_code == 503:
            return "model_unavailable"  # llama-server still loading
        if exc.status_code == 501:
            return "not_supported"
        if 400 <= exc.status_code < 500:
            return "bad_request"  # llama-server refused the parameters
        return "upstream_error"
    if isinstance(exc, (StalledError, ServerHungError)):
        return "upstream_timeout"
    if isinstance(exc, (ServerCrashedError, LlamaprocError)):
        return "upstream_error"
    return "internal_error"


def error_status(exc: BaseException, code: str | None = None) -> int:
    """The HTTP status for ``exc``: the table's, or llama-server's own for a parameter it refused."""
    code = code or error_code(exc)
    if code == "bad_request" and isinstance(exc, StatusError) and 400 <= exc.status_code < 500:
        return exc.status_code
    return ERROR_CODES[code].status


def error_message(exc: BaseException) -> str:
    """One line for a client: llama-server's own message for its answers, else the error's first line."""
    if isinstance(exc, StatusError):
        return f"llama-server answered {exc.status_code}: {exc.message}"[:1000]
    text = str(exc).strip()
    # Crash errors carry the child's output after the first line; logs and the status op have it.
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:1000]


def openai_error_body(code: str, message: str, *, param: str | None = None, type_: str | None = None) -> bytes:
    """``{"error": {"message", "type", "param", "code"}}``, OpenAI's error shape, as JSON bytes."""
    entry = ERROR_CODES.get(code)
    kind = type_ or (entry.type if entry is not None else _SERVER)
    body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return json.dumps(body, ensure_ascii=False).encode()


def error_codes_table() -> str:
    """:data:`ERROR_CODES` as the Markdown table the README prints (a test keeps the two the same)."""
    where = {"both": "HTTP, socket", "http": "HTTP", "socket": "socket"}
    rows = ["| code | HTTP | where | meaning |", "| --- | --- | --- | --- |"]
    for e in ERROR_CODES.values():
        retry = " (with `Retry-After` / `retry_after`)" if e.retry else ""
        rows.append(f"| `{e.code}` | {e.status} | {where[e.front_end]} | {e.meaning}{retry} |")
    return "\n".join(rows)
