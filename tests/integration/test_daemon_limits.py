"""What a request may cost the daemon: a hung llama-server and a client that stops reading.

Against a real daemon and real llama-server children. A hang is made with
SIGSTOP (the child is alive and answers nothing); a client that stops reading
is a raw socket with a small receive buffer that sends a request for a long,
bulky stream and then reads nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from daemon_helpers import Daemon, running_daemon, stop_daemon, write_config

from llamaproc.cli import DaemonClient
from llamaproc.errors import DaemonRequestError
from llamaproc.testing import write_tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "long.gguf", context_length=32768)


def models(daemon: Daemon) -> dict[str, dict[str, Any]]:
    answer = httpx.get(daemon.http + "/api/models", timeout=10)
    answer.raise_for_status()
    return {m["name"]: m for m in answer.json()["models"]}


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def serving(daemon: Daemon, *, not_pid: int | None = None) -> dict[str, Any]:
    def ready() -> Any:
        model = models(daemon)["tiny"]
        return model["phase"] == "Serving" and model["pid"] not in (None, not_pid) and model

    result: dict[str, Any] = wait_for(ready, "the model to serve")
    return result


LONG = {"prompt": "once upon a time", "max_tokens": 30_000, "ignore_eos": True}


@pytest.fixture
def stalling(tmp_path: Path, long_model: Path, backend: Any) -> Iterator[Daemon]:
    config = write_config(
        tmp_path / "serve.toml",
        {"tiny": {"path": long_model, "ctx_size": 32768}},
        preload=["tiny"],
        stall_timeout="1s",
        restart_backoff="100ms",
    )
    with running_daemon(config, tmp_path / "state") as daemon:
        yield daemon


def test_a_hung_child_fails_its_http_stream_as_a_hang_and_is_restarted(stalling: Daemon) -> None:
    pid = serving(stalling)["pid"]
    events = []
    with httpx.stream(
        "POST", stalling.http + "/v1/completions", json={"model": "tiny", "stream": True, **LONG}, timeout=60
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if not events:
                os.kill(pid, signal.SIGSTOP)  # alive, but answers nothing from now on
            events.append(line[6:])
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["code"] == "upstream_timeout" and "stopped answering" in error["message"]
    assert serving(stalling, not_pid=pid)["restarts"] >= 1  # killed as hung, then restarted
    answer = httpx.post(stalling.http + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4})
    assert answer.status_code == 200


def test_a_hung_child_fails_its_socket_stream_as_a_hang(stalling: Daemon) -> None:
    pid = serving(stalling)["pid"]
    assert stalling.socket is not None
    tokens = 0
    with DaemonClient(stalling.socket, timeout=60) as client, pytest.raises(DaemonRequestError) as info:
        for event in client.stream("generate", model="tiny", **LONG):
            if event["event"] == "token":
                tokens += 1
                if tokens == 1:
                    os.kill(pid, signal.SIGSTOP)
    assert info.value.code == "upstream_timeout"
    assert serving(stalling, not_pid=pid)["pid"] != pid


def _stop_reading_after_request(daemon: Daemon) -> socket.socket:
    """A client that asks for a long stream of large events and reads nothing of it."""
    host, port = daemon.http.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    body = json.dumps({"model": "tiny", "stream": True, "n_probs": 50, **LONG}).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (daemon.http.removeprefix("http://").encode(), len(body), body)
    )
    return sock


def _read_to_eof(sock: socket.socket) -> bool:
    sock.settimeout(30)
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    return True


def test_a_client_that_stops_reading_is_dropped_and_frees_its_slot(
    tmp_path: Path, long_model: Path, backend: Any
) -> None:
    config = write_config(
        tmp_path / "serve.toml",
        {"tiny": {"path": long_model, "ctx_size": 32768, "parallel": 1}},
        preload=["tiny"],
        write_timeout="1s",
    )
    with running_daemon(config, tmp_path / "state") as daemon:
        serving(daemon)
        stalled = _stop_reading_after_request(daemon)
        try:
            wait_for(lambda: models(daemon)["tiny"]["inFlight"] == 1, "the stream to start")
            # One slot: this request waits in the queue until the stalled client is dropped.
            answer = httpx.post(
                daemon.http + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4}, timeout=60
            )
            assert answer.status_code == 200
            assert httpx.post(daemon.http + "/api/models/tiny/unload", timeout=60).status_code == 200
            assert _read_to_eof(stalled)  # the daemon closed the connection
        finally:
            stalled.close()
        assert stop_daemon(daemon) == 0
    log = daemon.stderr()
    assert "read nothing" in log
    assert "Traceback" not in log and "ASGI callable" not in log


def test_shutdown_cuts_a_client_that_stopped_reading_without_a_traceback(
    tmp_path: Path, long_model: Path, backend: Any
) -> None:
    config = write_config(
        tmp_path / "serve.toml",
        {"tiny": {"path": long_model, "ctx_size": 32768}},
        preload=["tiny"],
        drain_timeout="1s",
    )
    with running_daemon(config, tmp_path / "state") as daemon:
        serving(daemon)
        stalled = _stop_reading_after_request(daemon)
        try:
            wait_for(lambda: models(daemon)["tiny"]["inFlight"] == 1, "the stream to start")
            assert stop_daemon(daemon) == 0
        finally:
            stalled.close()
    log = daemon.stderr()
    assert "Traceback" not in log, log
