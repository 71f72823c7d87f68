"""``llamaproc serve`` over its Unix socket, and the ``chat``/``ps``/``stop`` commands.

The daemon runs as a real subprocess (tests/integration/daemon_helpers.py)
with real llama-server children on tiny generated models.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from daemon_helpers import Daemon, llama_servers_of, start_daemon, stop_daemon, write_config

from llamaproc.cli._daemon_cli import DaemonClient

pytestmark = pytest.mark.integration

LONG = 600  # tokens: about half a second on the tiny model


@pytest.fixture(autouse=True)
def no_leftover_servers() -> Iterator[None]:
    """Overrides conftest's per-test check: a module's daemon keeps its children between tests.

    Each daemon is checked instead when it stops (no llama-server survives it).
    """
    yield


def _stop_and_check(daemon: Daemon) -> None:
    servers = llama_servers_of(daemon.pid)
    assert stop_daemon(daemon) == 0, daemon.stderr()
    _assert_gone(servers)
    assert daemon.socket is not None and not Path(daemon.socket).exists()
    assert not (daemon.state_dir / "serve.pid").exists()


def _assert_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 30  # a wait for the exits, not a bound
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    for pid in alive:
        psutil.Process(pid).kill()
    assert not alive, f"llama-server left running: {alive}"


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_embedding_model: Path, backend: Any
) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("socketd")
    config = write_config(
        tmp / "serve.toml",
        {
            "tiny": {"path": tiny_model, "parallel": 2, "ctx_size": 4096},
            # With --context-shift a stream asked for more tokens than its context holds never ends by itself.
            "narrow": {"path": tiny_model, "parallel": 1, "ctx_size": 8192, "args": ["--context-shift"]},
            "emb": {"path": tiny_embedding_model, "embeddings": True},
        },
        max_loaded_models=3,
        queue_size=1,
    )
    started = start_daemon(config, tmp / "state")
    try:
        yield started
    finally:
        _stop_and_check(started)


class Lines:
    """A raw connection: JSON lines out, event lines in (what `nc -U` does)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")

    def send(self, request: dict[str, Any] | bytes) -> None:
        self.sock.sendall(request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n")

    def event(self) -> dict[str, Any]:
        line = self.reader.readline()
        assert line.endswith(b"\n"), line
        event: dict[str, Any] = json.loads(line)
        return event

    def until_final(self, rid: Any) -> list[dict[str, Any]]:
        events = []
        while True:
            event = self.event()
            if event["id"] == rid:
                events.append(event)
                if event["event"] in ("done", "result", "error"):
                    return events

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def _status(daemon: Daemon) -> dict[str, dict[str, Any]]:
    assert daemon.socket is not None
    with DaemonClient(daemon.socket, timeout=10) as client:
        return {m["name"]: m for m in client.call("status")["models"]}


def _wait_for(predicate: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


def _cli(
    *args: str, stdin: str | None = None, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llamaproc", *args],
        check=False,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


# --- the protocol ------------------------------------------------------------------------------


def test_socket_file(daemon: Daemon) -> None:
    assert daemon.socket == str(daemon.state_dir / "serve.sock")  # the default, named in serve.json
    mode = os.stat(daemon.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_round_trip_chat_generate_embed(daemon: Daemon) -> None:
    assert daemon.socket is not None
    with DaemonClient(daemon.socket, timeout=60) as client:
        events = list(client.stream("chat", model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8))
        tokens, done = events[:-1], events[-1]
        assert tokens and all(e["event"] == "token" and isinstance(e["text"], str) for e in tokens)
        assert done["event"] == "done" and done["finish_reason"] in ("length", "stop")
        assert done["usage"]["completion_tokens"] >= len(tokens) > 0
        assert done["timings"]["predicted_n"] == done["usage"]["completion_tokens"]

        runs = []
        for _ in range(2):
            events = list(
                client.stream("generate", model="tiny", prompt="Once upon a time", max_tokens=16, ignore_eos=True)
            )
            assert events[-1]["event"] == "done" and events[-1]["usage"]["completion_tokens"] == 16
            runs.append([(e["text"], e["token_id"]) for e in events[:-1]])
        assert len(runs[0]) == 16 and all(isinstance(tid, int) for _, tid in runs[0])
        assert runs[0] == runs[1]  # greedy: the same tokens, through the same loaded model

        result = client.call("embed", model="emb", input=["hello", "world"])
        assert result["event"] == "result"
        assert len(result["embeddings"]) == 2 and all(len(v) == 64 for v in result["embeddings"])


def test_models_status_and_reuse(daemon: Daemon) -> None:
    assert daemon.socket is not None
    with DaemonClient(daemon.socket, timeout=60) as client:
        list(client.stream("generate", model="tiny", prompt="a", max_tokens=2))
        models = {m["name"]: m for m in client.call("models")["models"]}
        assert set(models) == {"tiny", "narrow", "emb"}
        assert models["tiny"] == {"name": "tiny", "phase": "Serving", "loaded": True}
        status = client.call("status")
        tiny = {m["name"]: m for m in status["models"]}["tiny"]
        assert tiny["pid"] in llama_servers_of(daemon.pid) and tiny["inFlight"] == 0 and tiny["parallel"] == 2
        assert set(status["stats"]) >= {"loads", "evictions", "restarts", "idle_unloads"}
        loads = status["stats"]["loads"]
        list(client.stream("generate", model="tiny", prompt="b", max_tokens=2))
        again = client.call("status")
        assert {m["name"]: m for m in again["models"]}["tiny"]["pid"] == tiny["pid"]
        assert again["stats"]["loads"] == loads  # reused, not loaded again
    metrics = httpx.get(daemon.http + "/metrics", timeout=10).text
    ok = [line for line in metrics.splitlines() if line.startswith("llamaproc_requests_total{")]
    assert any('api="socket"' in line and 'model="tiny"' in line and 'status="ok"' in line for line in ok), ok


def test_several_requests_in_flight_on_one_connection(daemon: Daemon) -> None:
    assert daemon.socket is not None
    conn = Lines(daemon.socket)
    try:
        conn.send(
            {"id": "a", "op": "generate", "model": "tiny", "prompt": "one", "max_tokens": 200, "ignore_eos": True}
        )
        conn.send(
            {
                "id": "b",
                "op": "chat",
                "model": "tiny",
                "messages": [{"role": "user", "content": "two"}],
                "max_tokens": 200,
                "ignore_eos": True,
            }
        )
        conn.send({"id": "c", "op": "embed", "model": "emb", "input": ["three"]})
        conn.send({"id": "d", "op": "ping"})
        finals: dict[str, dict[str, Any]] = {}
        tokens: list[str] = []
        while len(finals) < 4:
            event = conn.event()
            if event["event"] == "token":
                tokens.append(event["id"])
            else:
                finals[event["id"]] = event
    finally:
        conn.close()
    assert finals["a"]["event"] == "done" and finals["a"]["usage"]["completion_tokens"] == 200
    assert finals["b"]["event"] == "done" and finals["b"]["usage"]["completion_tokens"] == 200
    assert finals["c"]["event"] == "result" and finals["d"]["event"] == "result"
    assert tokens.count("a") == 200 and 0 < tokens.count("b") <= 200
    assert tokens != sorted(tokens)  # both streams ran at once (tiny has two slots)


def test_bad_lines_get_error_events_and_the_daemon_keeps_serving(daemon: Daemon) -> None:
    assert daemon.socket is not None
    conn = Lines(daemon.socket)
    try:
        conn.send(b"this is not json\n")
        event = conn.event()
        assert (event["id"], event["event"], event["code"]) == (None, "error", "invalid_json")
        conn.send({"id": "x", "op": "summon"})
        event = conn.event()
        assert (event["id"], event["code"]) == ("x", "unknown_op")
        conn.send(b'{"op": "ping", "pad": "' + b"x" * (2 << 20) + b'"}\n')
        event = conn.event()
        assert (event["id"], event["code"]) == (None, "line_too_long")
        conn.send({"id": "m", "op": "chat", "model": "nosuch", "messages": [{"role": "user", "content": "x"}]})
        event = conn.event()
        assert (event["id"], event["code"]) == ("m", "model_not_found")
        conn.send({"id": "ok", "op": "generate", "model": "tiny", "prompt": "still there?", "max_tokens": 3})
        assert conn.until_final("ok")[-1]["event"] == "done"
    finally:
        conn.close()


def test_cancel_op(daemon: Daemon) -> None:
    assert daemon.socket is not None
    conn = Lines(daemon.socket)
    try:
        conn.send(
            {
                "id": "long",
                "op": "generate",
                "model": "narrow",
                "prompt": "x",
                "max_tokens": 100_000,
                "ignore_eos": True,
            }
        )
        assert conn.event()["event"] == "token"
        conn.send({"op": "cancel", "id": "long"})
        final = conn.until_final("long")[-1]
        assert (final["event"], final["code"]) == ("error", "cancelled")
        _wait_for(lambda: _status(daemon)["narrow"]["inFlight"] == 0, what="the slot to be free")
        conn.send({"id": "long", "op": "generate", "model": "narrow", "prompt": "x", "max_tokens": 2})
        assert conn.until_final("long")[-1]["event"] == "done"
    finally:
        conn.close()


def test_queue_full_and_nothing_lost(daemon: Daemon) -> None:
    """narrow: one slot and a queue of one; a third request is refused at once, the others complete."""
    assert daemon.socket is not None
    conn = Lines(daemon.socket)
    try:
        body = {"op": "generate", "model": "narrow", "prompt": "x", "max_tokens": LONG, "ignore_eos": True}
        conn.send({"id": 1, **body})
        assert conn.event()["id"] == 1  # generating
        conn.send({"id": 2, **body})
        _wait_for(lambda: _status(daemon)["narrow"]["queued"] == 1, what="the second request to queue")
        conn.send({"id": 3, **body})
        finals: dict[int, dict[str, Any]] = {}
        counts = {1: 1, 2: 0}
        while len(finals) < 3:
            event = conn.event()
            if event["event"] == "token":
                counts[event["id"]] += 1
            else:
                finals[event["id"]] = event
    finally:
        conn.close()
    assert (finals[3]["event"], finals[3]["code"]) == ("error", "queue_full")
    assert finals[3]["retry_after"] > 0
    for rid in (1, 2):
        assert finals[rid]["event"] == "done" and finals[rid]["usage"]["completion_tokens"] == LONG
        assert counts[rid] == LONG


def test_disconnect_frees_the_slot_and_leaves_the_queue(daemon: Daemon) -> None:
    assert daemon.socket is not None
    conn = Lines(daemon.socket)
    body = {"op": "generate", "model": "narrow", "prompt": "x", "max_tokens": 100_000, "ignore_eos": True}
    conn.send({"id": "streaming", **body})
    assert conn.event()["event"] == "token"
    conn.send({"id": "waiting", **body})
    _wait_for(lambda: _status(daemon)["narrow"]["queued"] == 1, what="the second request to queue")
    conn.close()
    _wait_for(
        lambda: (m := _status(daemon)["narrow"])["queued"] == 0 and m["inFlight"] == 0,
        what="the client's requests to go",
    )
    # The gone client's stream would never end by itself (--context-shift): a token for this request
    # means its slot in llama-server was freed. (The client's timeout is a safety net.)
    with DaemonClient(daemon.socket, timeout=30) as client:
        events = client.stream("generate", model="narrow", prompt="y", max_tokens=2)
        assert next(events)["event"] == "token"
        list(events)


def test_half_closed_connection_gets_its_answers(daemon: Daemon) -> None:
    """Like `printf '...\\n' | nc -N -U serve.sock`."""
    assert daemon.socket is not None
    conn = Lines(daemon.socket)
    try:
        conn.send({"id": "h", "op": "generate", "model": "tiny", "prompt": "x", "max_tokens": 20, "ignore_eos": True})
        conn.sock.shutdown(socket.SHUT_WR)
        events = conn.until_final("h")
        assert len(events) == 21 and events[-1]["event"] == "done"
        assert conn.reader.readline() == b""  # then the daemon closes the connection
    finally:
        conn.close()


def test_no_fd_or_rss_growth_over_100_socket_requests(daemon: Daemon) -> None:
    assert daemon.socket is not None
    process = psutil.Process(daemon.pid)

    def one(i: int) -> None:
        assert daemon.socket is not None
        with DaemonClient(daemon.socket, timeout=30) as client:  # a connection per request
            if i % 3 == 2:
                assert client.call("embed", model="emb", input=["a text"])["event"] == "result"
            else:
                events = list(client.stream("generate", model="tiny", prompt="x", max_tokens=4))
                assert events[-1]["event"] == "done"

    for i in range(30):  # warm-up: caches, connection pools, allocator arenas
        one(i)
    fds, rss = process.num_fds(), process.memory_info().rss
    for i in range(100):
        one(i)
    # Idle upstream connections are closed by the daemon's sweeper after a while: wait for the count to settle.
    deadline = time.monotonic() + 30  # a safety net only
    while abs(process.num_fds() - fds) > 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert abs(process.num_fds() - fds) <= 2, (fds, process.num_fds())
    growth = process.memory_info().rss - rss
    assert growth < 5 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB"


# --- the commands --------------------------------------------------------------------------------


def test_chat_and_ps_commands(daemon: Daemon) -> None:
    state = str(daemon.state_dir)
    one = _cli("chat", "tiny", "hello", "--daemon", "--state-dir", state, "--max-tokens", "8")
    assert one.returncode == 0, one.stderr
    assert one.stdout.endswith("\n") and one.stdout.strip()

    repl = _cli("chat", "tiny", "--daemon", "--state-dir", state, "--max-tokens", "4", stdin="hi\n\nagain\n")
    assert repl.returncode == 0, repl.stderr
    assert len(repl.stdout.splitlines()) == 2

    missing = _cli("chat", "nosuch", "hello", "--daemon", "--state-dir", state)
    assert missing.returncode == 1 and "model_not_found" in missing.stderr

    ps = _cli("ps", "--state-dir", state)
    assert ps.returncode == 0, ps.stderr
    lines = ps.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "PHASE", "READY"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["tiny"][1:3] == ["Serving", "1/1"] and int(rows["tiny"][3]) in llama_servers_of(daemon.pid)


def test_stop_command_with_a_socket_elsewhere(tmp_path: Path, tiny_model: Path, backend: Any) -> None:
    """`chat --daemon` finds a --socket path through serve.json; `stop` waits for a clean exit."""
    config = write_config(tmp_path / "serve.toml", {"tiny": {"path": tiny_model}})
    state = tmp_path / "state"
    sock = tmp_path / "elsewhere.sock"
    daemon = start_daemon(config, state, socket=sock)
    try:
        assert daemon.socket == str(sock)
        chat = _cli("chat", "tiny", "hello", "--daemon", "--state-dir", str(state), "--max-tokens", "4")
        assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
        servers = llama_servers_of(daemon.pid)
        assert len(servers) == 1
        stop = _cli("stop", "--state-dir", str(state))
        assert stop.returncode == 0, stop.stderr
        assert daemon.process.poll() == 0, daemon.stderr()  # already gone when stop returns
        _assert_gone(servers)
        assert not sock.exists() and not (state / "serve.pid").exists()
        again = _cli("stop", "--state-dir", str(state))
        assert again.returncode == 1 and "not running" in again.stderr
        ps = _cli("ps", "--state-dir", str(state))
        assert ps.returncode == 1 and "no llamaproc daemon" in ps.stderr
    finally:
        if daemon.process.poll() is None:
            stop_daemon(daemon)


def test_relative_state_dir_and_socket_work_from_another_directory(
    tmp_path: Path, tiny_model: Path, backend: Any
) -> None:
    """`serve --state-dir state --socket run/s.sock` started in one directory; clients run elsewhere."""
    config = write_config(tmp_path / "serve.toml", {"tiny": {"path": tiny_model, "ctx_size": 512}})
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "run").mkdir(parents=True)
    elsewhere.mkdir()
    daemon = start_daemon(config, Path("state"), socket="run/s.sock", cwd=work)
    try:
        state = work / "state"
        info = json.loads((state / "serve.json").read_text())
        assert info["socket"] == str(work / "run" / "s.sock")
        assert info["drain_timeout"] == 30  # for `llamaproc stop` to wait long enough
        assert Path(info["socket"]).exists()
        chat = _cli("chat", "tiny", "hello", "--daemon", "--state-dir", str(state), "--max-tokens", "4", cwd=elsewhere)
        assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
        ps = _cli("ps", "--state-dir", str(state), cwd=elsewhere)
        assert ps.returncode == 0 and "tiny" in ps.stdout, ps.stderr
        servers = llama_servers_of(daemon.pid)
        stop = _cli("stop", "--state-dir", str(state), cwd=elsewhere)
        assert stop.returncode == 0, stop.stderr
        assert daemon.process.poll() == 0, daemon.stderr()
        _assert_gone(servers)
        assert not (work / "run" / "s.sock").exists() and not (state / "serve.pid").exists()
    finally:
        if daemon.process.poll() is None:
            stop_daemon(daemon)


def test_sigterm_during_a_socket_stream(tmp_path: Path, tiny_model: Path, backend: Any) -> None:
    config = write_config(tmp_path / "serve.toml", {"tiny": {"path": tiny_model, "ctx_size": 4096}})
    daemon = start_daemon(config, tmp_path / "state")
    n = 2000  # about a second: still streaming when the late request comes
    try:
        assert daemon.socket is not None
        conn = Lines(daemon.socket)
        try:
            conn.send(
                {"id": "s", "op": "generate", "model": "tiny", "prompt": "x", "max_tokens": n, "ignore_eos": True}
            )
            assert conn.event()["event"] == "token"
            servers = llama_servers_of(daemon.pid)
            os.kill(daemon.pid, signal.SIGTERM)
            _wait_for(lambda: httpx.get(daemon.http + "/health", timeout=10).status_code == 503, what="draining")
            conn.send({"id": "late", "op": "generate", "model": "tiny", "prompt": "x", "max_tokens": 2})
            tokens = 1
            finals: dict[str, dict[str, Any]] = {}
            while len(finals) < 2:
                event = conn.event()
                if event["event"] == "token":
                    tokens += 1
                else:
                    finals[event["id"]] = event
            assert conn.reader.readline() == b""  # the daemon closes the connection on its way out
        finally:
            conn.close()
        assert finals["s"]["event"] == "done" and finals["s"]["usage"]["completion_tokens"] == n
        assert tokens == n
        assert (finals["late"]["event"], finals["late"]["code"]) == ("error", "shutting_down")
        daemon.process.wait(30)
        assert daemon.returncode == 0, daemon.stderr()
        _assert_gone(servers)
        assert not Path(daemon.socket).exists()
    finally:
        if daemon.process.poll() is None:
            stop_daemon(daemon)
