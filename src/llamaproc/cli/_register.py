"""``llamaproc worker --register URL``: a worker announces itself to a daemon and keeps it informed.

:func:`register_and_heartbeat` registers the worker's rpc-server with the
daemon (``POST /api/workers/register``), then sends a heartbeat every
interval (``POST /api/workers/heartbeat``) until it is cancelled. The daemon
may go away and come back: a heartbeat answered 404 (the daemon restarted, or
evicted the worker) makes it register again, and a daemon that cannot be
reached or fails is tried again after a pause that doubles up to
``max_backoff``. Nothing the daemon does makes it raise: it logs and keeps
trying, for the worker serves on regardless.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import httpx

from ..errors import InvalidArgumentError
from ..types import Device

__all__ = ["register_and_heartbeat"]

_log = logging.getLogger("llamaproc.worker")

#: Seconds one request to the daemon may take.
REQUEST_TIMEOUT = 10.0
#: The first pause after a failure; it doubles after each failure in a row up to ``max_backoff``.
FIRST_BACKOFF = 0.5


class _Refused(Exception):
    """The daemon answered, but not with what the worker asked for."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


async def register_and_heartbeat(
    url: str,
    *,
    api_key: str | None,
    address: str,
    devices: Sequence[Device],
    cpu_seconds: Callable[[], float | None],
    interval: float | None = None,
    max_backoff: float = 30.0,
    logger: logging.Logger | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> None:
    """Register ``address`` with the daemon at ``url`` and send heartbeats until cancelled; never returns.

    ``devices`` are sent with the registration and ``cpu_seconds()`` (the
    rpc-server's CPU time, ``None`` if unknown) with each message.
    ``interval`` is the time between heartbeats; ``None`` uses the one the
    daemon answers. ``api_key`` goes in ``Authorization: Bearer``.
    ``transport`` replaces httpx's network transport (for tests). Raises
    :class:`~llamaproc.errors.InvalidArgumentError` at once for a ``url`` that
    is not ``http(s)://...`` or an interval that is not a positive number;
    after that it only logs.
    """
    if not url.startswith(("http://", "https://")):
        raise InvalidArgumentError(f"invalid daemon URL {url!r}: expected http://HOST:PORT", param="url")
    for name, value in (("interval", interval), ("max_backoff", max_backoff)):
        if value is not None and (isinstance(value, bool) or not math.isfinite(value) or value <= 0):
            raise InvalidArgumentError(f"{name} must be a positive number of seconds, not {value!r}", param=name)
    log = logger or _log
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = url.rstrip("/")
    async with httpx.AsyncClient(
        base_url=base, headers=headers, timeout=REQUEST_TIMEOUT, transport=transport, trust_env=False
    ) as client:
        worker_id: str | None = None
        every = interval if interval is not None else _interval(None)
        backoff = FIRST_BACKOFF
        problem: str | None = None  # the last failure logged: the same one again is logged at debug level
        while True:
            try:
                if worker_id is None:
                    body: dict[str, Any] = {
                        "address": address,
                        "devices": [d.to_json() for d in devices],
                        "cpu_seconds": _cpu(cpu_seconds, log),
                    }
                    answer = await _post(client, "/api/workers/register", body)
                    worker_id = str(answer["id"])
                    if interval is None:
                        every = _interval(answer.get("heartbeat_interval"))
                    log.info("llamaproc worker: registered %s with %s as %s", address, base, worker_id)
                else:
                    beat = {"id": worker_id, "cpu_seconds": _cpu(cpu_seconds, log)}
                    try:
                        await _post(client, "/api/workers/heartbeat", beat)
                    except _Refused as exc:
                        if exc.status != 404:
                            raise
                        log.warning(
                            "llamaproc worker: %s does not know %s (%s); registering again", base, worker_id, exc
                        )
                        worker_id = None
                        continue
            except (httpx.HTTPError, _Refused, ValueError, KeyError, TypeError) as exc:
                # HTTPError: the daemon cannot be reached; the others: it answered something unexpected.
                text = _describe(exc)
                level = logging.DEBUG if text == problem else logging.WARNING
                log.log(level, "llamaproc worker: %s: %s; trying again in %gs", base, text, backoff)
                problem = text
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, max_backoff)
                continue
            if problem is not None:
                log.info("llamaproc worker: %s answers again", base)
            problem = None
            backoff = FIRST_BACKOFF
            await anyio.sleep(every)


async def _post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(path, json=body)
    if response.status_code != 200:
        raise _Refused(response.status_code, _error_text(response))
    data = response.json()
    if not isinstance(data, dict):
        raise ValueError(f"{path} answered {type(data).__name__}, not a JSON object")
    return data


def _error_text(response: httpx.Response) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    return str(message)[:300]


def _interval(value: Any) -> float:
    """The daemon's heartbeat interval, or 5 s if it named none that makes sense."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf:
        return float(value)
    return 5.0


def _cpu(cpu_seconds: Callable[[], float | None], log: logging.Logger) -> float | None:
    try:
        value = cpu_seconds()
    except Exception as exc:  # noqa: BLE001 - a failing reading must not stop the heartbeats
        log.debug("llamaproc worker: cannot read the rpc-server's CPU time: %s", exc)
        return None
    return value if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0 else None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
