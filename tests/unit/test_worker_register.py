"""``register_and_heartbeat``, against a fake daemon (httpx.MockTransport) that misbehaves on demand.

(tests/integration/test_daemon_workers.py runs it against a real daemon.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest

from llamaproc.cli._register import register_and_heartbeat
from llamaproc.errors import InvalidArgumentError
from llamaproc.types import Device

pytestmark = pytest.mark.anyio

GPU = Device("CUDA0", 8 * 2**30, 6 * 2**30)
URL = "http://daemon.test:8484"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class FakeDaemon:
    """Answers registrations and heartbeats; ``script`` answers the next requests instead, in turn."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any], str | None]] = []
        self.script: list[Callable[[], httpx.Response]] = []
        self.ids = 0
        self.known: set[str] = set()
        self.changed = anyio.Event()

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append((request.url.path, body, request.headers.get("authorization")))
        self.changed.set()
        self.changed = anyio.Event()
        if self.script:
            return self.script.pop(0)()
        if request.url.path == "/api/workers/register":
            self.ids += 1
            worker_id = f"w-{self.ids}"
            self.known.add(worker_id)
            return httpx.Response(200, json={"id": worker_id, "heartbeat_interval": 0.01})
        if body["id"] not in self.known:
            return httpx.Response(404, json={"error": {"message": "unknown", "code": "worker_not_found"}})
        return httpx.Response(200, json={"id": body["id"], "heartbeat_interval": 0.01})

    def paths(self) -> list[str]:
        return [path.rsplit("/", 1)[1] for path, _, _ in self.requests]

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        with anyio.fail_after(30):
            while not condition():
                await self.changed.wait()


async def run(daemon: FakeDaemon, until: Callable[[], bool], **kwargs: Any) -> None:
    """Run the client against ``daemon`` until ``until()``, then cancel it."""
    options: dict[str, Any] = {
        "api_key": "secret",
        "address": "10.0.0.2:50052",
        "devices": [GPU],
        "cpu_seconds": lambda: 1.5,
        "max_backoff": 0.05,
        "transport": httpx.MockTransport(daemon.handler),
    }
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: register_and_heartbeat(URL, **(options | kwargs)))
        await daemon.wait_for(until)
        tg.cancel_scope.cancel()


async def test_registers_then_heartbeats_at_the_daemons_interval() -> None:
    daemon = FakeDaemon()
    await run(daemon, lambda: len(daemon.requests) >= 4)
    assert daemon.paths()[:4] == ["register", "heartbeat", "heartbeat", "heartbeat"]
    path, body, auth = daemon.requests[0]
    assert body == {"address": "10.0.0.2:50052", "devices": [GPU.to_json()], "cpu_seconds": 1.5}
    assert auth == "Bearer secret"
    assert daemon.requests[1][1] == {"id": "w-1", "cpu_seconds": 1.5}


async def test_registers_again_after_a_404() -> None:
    daemon = FakeDaemon()
    # The daemon restarts between the registration and the first heartbeat: it no longer knows "old".
    daemon.script = [
        lambda: httpx.Response(200, json={"id": "old", "heartbeat_interval": 0.01}),
        lambda: httpx.Response(404, json={"error": {"message": "no worker with id 'old'"}}),
    ]
    await run(daemon, lambda: len(daemon.requests) >= 4)
    assert daemon.paths()[:4] == ["register", "heartbeat", "register", "heartbeat"]
    assert daemon.requests[3][1]["id"] == "w-1"


async def test_registers_again_when_the_daemon_forgets_it_later() -> None:
    daemon = FakeDaemon()

    def forget() -> bool:
        if daemon.paths().count("heartbeat") == 2:
            daemon.known.clear()
        return daemon.ids == 2 and daemon.requests[-1][1].get("id") == "w-2"

    await run(daemon, forget)
    assert daemon.paths()[:5] == ["register", "heartbeat", "heartbeat", "heartbeat", "register"]


async def test_connection_failures_and_errors_are_retried(caplog: pytest.LogCaptureFixture) -> None:
    def refused() -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    daemon = FakeDaemon()
    daemon.script = [
        refused,
        refused,
        refused,
        lambda: httpx.Response(500, text="oops"),
        lambda: httpx.Response(200, text="not json"),
        lambda: httpx.Response(200, json=["not", "an", "object"]),
        lambda: httpx.Response(200, json={"no id": 1}),
    ]
    with caplog.at_level(logging.DEBUG, logger="llamaproc.worker"):
        await run(daemon, lambda: "heartbeat" in daemon.paths())
    assert daemon.paths() == ["register"] * 8 + ["heartbeat"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # The same failure in a row is logged once as a warning (then at debug level).
    assert sum("connection refused" in w for w in warnings) == 1, warnings
    assert any("HTTP 500: oops" in w for w in warnings)
    assert any("answers again" in r.getMessage() for r in caplog.records)


async def test_a_refused_key_is_retried_not_raised() -> None:
    daemon = FakeDaemon()
    daemon.script = [lambda: httpx.Response(401, json={"error": {"message": "invalid API key"}})] * 3
    await run(daemon, lambda: "heartbeat" in daemon.paths())
    assert daemon.paths() == ["register"] * 4 + ["heartbeat"]


async def test_a_failing_cpu_reading_sends_none() -> None:
    def broken() -> float:
        raise OSError("no such process")

    daemon = FakeDaemon()
    await run(daemon, lambda: len(daemon.requests) >= 2, cpu_seconds=broken)
    assert daemon.requests[0][1]["cpu_seconds"] is None and daemon.requests[1][1]["cpu_seconds"] is None


async def test_a_given_interval_wins_and_no_key_sends_no_header() -> None:
    daemon = FakeDaemon()
    await run(daemon, lambda: len(daemon.requests) >= 3, interval=0.02, api_key=None)
    assert all(auth is None for _, _, auth in daemon.requests)


@pytest.mark.parametrize(
    ("url", "kwargs", "param"),
    [
        ("daemon:8484", {}, "url"),
        (URL, {"interval": 0}, "interval"),
        (URL, {"interval": float("nan")}, "interval"),
        (URL, {"max_backoff": -1.0}, "max_backoff"),
    ],
)
async def test_bad_arguments_raise_at_once(url: str, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await register_and_heartbeat(url, api_key=None, address="a:1", devices=[], cpu_seconds=lambda: None, **kwargs)
    assert info.value.param == param
