"""What the HTTP front end's checks add per request: the security gate and the deadline-keeping protocol.

    python bench/security.py [--quick]

In-process micro-benchmarks, no llama-server and no sockets (so the figures are the checks' own CPU
time, without the network's noise):

- ``gate``: the daemon's ASGI dispatcher (``_App``) calling a no-op endpoint for a request with the
  headers the official ``openai`` client sends, with the real ``HttpSecurity`` (several settings)
  vs. the same dispatcher with a gate that lets everything through at once.
- ``protocol``: requests fed to uvicorn's httptools protocol with a fake transport and a minimal app,
  the daemon's ``LimitedHttpToolsProtocol`` vs. uvicorn's own ``HttpToolsProtocol``: on a kept-alive
  connection, and on a new connection per request (where the head deadline's timer is armed and
  cancelled).

Rounds alternate subject and baseline (the order rotates); each figure is the median of per-round
differences, in microseconds per request. It runs on uvloop when installed, as the daemon does
(``LLAMAPROC_UVLOOP=0``: plain asyncio).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Message, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from llamaproc.serve import HttpSecurity
from llamaproc.serve._app import _App
from llamaproc.serve._limits import ConnectionLimits, limited_protocol

KEY = "sk-local-0123456789abcdef0123456789abcdef"

#: The headers of a chat request sent by openai-python 1.x, as uvicorn hands them to the app.
OPENAI_HEADERS = [
    (b"host", b"127.0.0.1:8484"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"accept", b"application/json"),
    (b"content-type", b"application/json"),
    (b"user-agent", b"OpenAI/Python 1.54.0"),
    (b"x-stainless-lang", b"python"),
    (b"x-stainless-package-version", b"1.54.0"),
    (b"x-stainless-os", b"Linux"),
    (b"x-stainless-arch", b"x64"),
    (b"x-stainless-runtime", b"CPython"),
    (b"x-stainless-runtime-version", b"3.11.7"),
    (b"authorization", f"Bearer {KEY}".encode()),
    (b"x-stainless-async", b"false"),
    (b"x-stainless-retry-count", b"0"),
    (b"content-length", b"96"),
]


class _PassAll:
    """A gate that lets every request through: the baseline of the gate's cost."""

    def check(self, scope: Scope) -> None:
        return None


async def _noop(scope: Scope, receive: Receive, send: Send) -> None:
    return None


def _app(security: Any) -> _App:
    return _App(None, {"/v1/chat/completions": _noop}, security)  # type: ignore[arg-type, dict-item]


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Message) -> None:
    return None


def _scope(*extra: tuple[bytes, bytes]) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "scheme": "http",
        "headers": [*OPENAI_HEADERS, *extra],
    }


def _dispatch(app: _App, scope: dict[str, Any], n: int) -> Callable[[], Awaitable[float]]:
    async def run() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await app(scope, _receive, _send)
        return (time.perf_counter() - t0) / n * 1e6

    return run


# --- the protocol --------------------------------------------------------------------------------


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8484), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\n"
    + b"".join(k + b": " + v + b"\r\n" for k, v in OPENAI_HEADERS)
    + b"\r\n"
    + b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": true}'[:96]
)


def _protocol_round(cls: type[HttpToolsProtocol], n: int, *, per_connection: bool) -> Callable[[], Awaitable[float]]:
    waiter: list[asyncio.Future[None]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        waiter[0].set_result(None)

    config = Config(app, http=cls, lifespan="off", log_config=None, proxy_headers=False, ws="none")
    config.load()
    state = ServerState()

    async def run() -> float:
        loop = asyncio.get_running_loop()
        protocol = None
        t0 = time.perf_counter()
        for _ in range(n):
            if protocol is None or per_connection:
                protocol = cls(config=config, server_state=state, app_state={}, _loop=loop)
                protocol.connection_made(_Transport())
            waiter[:] = [loop.create_future()]
            protocol.data_received(REQUEST)
            await waiter[0]
            if per_connection:
                protocol.connection_lost(None)
        elapsed = (time.perf_counter() - t0) / n * 1e6
        if protocol is not None and not per_connection:
            protocol.connection_lost(None)
        return elapsed

    return run


# --- running -------------------------------------------------------------------------------------


async def _compare(
    subject: Callable[[], Awaitable[float]], baseline: Callable[[], Awaitable[float]], rounds: int
) -> tuple[float, float, float]:
    """Median subject, baseline and per-round difference (µs per request)."""
    await subject()  # warm-up
    await baseline()
    s: list[float] = []
    b: list[float] = []
    for i in range(rounds):
        if i % 2:
            s.append(await subject())
            b.append(await baseline())
        else:
            b.append(await baseline())
            s.append(await subject())
    return statistics.median(s), statistics.median(b), statistics.median(x - y for x, y in zip(s, b, strict=True))


async def main_async(quick: bool) -> list[tuple[str, float, float, float]]:
    rounds = 7 if quick else 21
    n = 20_000 if quick else 100_000
    rows = []
    baseline = _dispatch(_app(_PassAll()), _scope(), n)
    gates = {
        "gate: no keys (the default)": (HttpSecurity(), _scope()),
        "gate: 3 keys": (HttpSecurity(api_keys=[KEY, KEY + "1", KEY + "2"]), _scope()),
        "gate: 3 keys, same-origin Origin": (
            HttpSecurity(api_keys=[KEY, KEY + "1", KEY + "2"], allowed_origins=["http://app.example"]),
            _scope((b"origin", b"http://127.0.0.1:8484")),
        ),
        "gate: 3 keys, allowed cross origin": (
            HttpSecurity(api_keys=[KEY, KEY + "1", KEY + "2"], allowed_origins=["http://app.example"]),
            _scope((b"origin", b"http://app.example")),
        ),
    }
    for name, (security, scope) in gates.items():
        assert security.check(scope) is None or security.check(scope).status == 0, name  # type: ignore[union-attr]
        rows.append((name, *await _compare(_dispatch(_app(security), scope, n), baseline, rounds)))
    limited = limited_protocol(ConnectionLimits())
    m = n // 10
    for name, per_connection in (("protocol: kept-alive connection", False), ("protocol: new connection", True)):
        rows.append(
            (
                name,
                *await _compare(
                    _protocol_round(limited, m, per_connection=per_connection),
                    _protocol_round(HttpToolsProtocol, m, per_connection=per_connection),
                    rounds,
                ),
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args(argv)
    if os.environ.get("LLAMAPROC_UVLOOP", "1") != "0" and importlib.util.find_spec("uvloop") is not None:
        import uvloop

        loop = "uvloop"
        rows = uvloop.run(main_async(args.quick))
    else:
        loop = "asyncio"
        rows = asyncio.run(main_async(args.quick))
    print(f"({loop} event loop)")
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'subject':>10}  {'baseline':>10}  {'added':>10}   (µs per request, medians)")
    for name, subject, baseline, diff in rows:
        print(f"{name:{width}}  {subject:10.3f}  {baseline:10.3f}  {diff:+10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
