"""Start and stop ``llamaproc serve`` as a real subprocess, for the daemon's integration tests.

    daemon = start_daemon(write_config(tmp_path / "serve.toml", {"tiny": {"path": model}}), tmp_path / "state")
    try:
        httpx.get(daemon.http + "/health")
    finally:
        assert stop_daemon(daemon) == 0

or ``with running_daemon(config, state_dir) as daemon: ...``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

T = TypeVar("T")

__all__ = [
    "Daemon",
    "chat_stream",
    "Worker",
    "llama_servers_of",
    "running_daemon",
    "running_worker",
    "start_daemon",
    "stop_daemon",
    "write_config",
]


@dataclass
class Daemon:
    """A running ``llamaproc serve`` subprocess and where to reach it."""

    process: subprocess.Popen[bytes]
    pid: int
    http: str
    socket: str | None
    state_dir: Path
    config: Path
    stderr_path: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def stderr(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(os.fspath(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(path: Path, models: Mapping[str, Mapping[str, Any]], **settings: Any) -> Path:
    """Write a serve config: top-level ``settings``, then one ``[models.NAME]`` table per model."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in settings.items()]
    for name, table in models.items():
        lines.append(f"\n[models.{json.dumps(name)}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _command(config: Path, state_dir: Path, port: int, socket: str | os.PathLike[str] | None) -> list[str]:
    cmd = [sys.executable, "-m", "llamaproc", "serve", "--config", str(config), "--port", str(port)]
    cmd += ["--state-dir", str(state_dir)]
    if socket is not None:
        cmd += ["--socket", os.fspath(socket)]
    return cmd


def start_daemon(
    config: Path,
    state_dir: Path,
    *,
    port: int = 0,
    socket: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    cwd: Path | None = None,
) -> Daemon:
    """Start ``python -m llamaproc serve`` and return once ``STATE_DIR/serve.json`` names it.

    ``state_dir`` (and ``socket``) may be relative to ``cwd``, the daemon's
    working directory. Raises ``RuntimeError`` with the daemon's stderr if it
    exits or does not get ready within ``timeout``.
    """
    if cwd is not None and not state_dir.is_absolute():
        state_dir = cwd / state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    info_path = state_dir / "serve.json"
    stderr_path = state_dir / f"serve-{time.monotonic_ns()}.stderr"
    given_dir = state_dir if cwd is None else Path(os.path.relpath(state_dir, cwd))
    with open(stderr_path, "wb") as err:
        process = subprocess.Popen(
            [*_command(config, given_dir, port, socket), *extra_args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            env={**os.environ, **(env or {})},
        )
    daemon = Daemon(process, process.pid, "", None, state_dir, config, stderr_path)
    deadline = time.monotonic() + timeout
    while True:
        info = _read_info(info_path)
        if info is not None and info.get("pid") == process.pid:
            daemon.http = info["http"]
            daemon.socket = info.get("socket")
            daemon.info = info
            return daemon
        if process.poll() is not None:
            raise RuntimeError(f"llamaproc serve exited with code {process.returncode}:\n{daemon.stderr()}")
        if time.monotonic() > deadline:
            _kill(process)
            raise RuntimeError(f"llamaproc serve not ready after {timeout}s:\n{daemon.stderr()}")
        time.sleep(0.02)


def _read_info(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def llama_servers_of(pid: int) -> list[int]:
    """Pids of the llama-server processes descending from ``pid``."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for child in children:
        try:
            if "llama-server" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.Error:
            pass
    return found


def _kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the daemon and any llama-server it left behind."""
    servers = llama_servers_of(process.pid)
    process.kill()
    process.wait()
    for pid in servers:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def stop_daemon(daemon: Daemon, *, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Send ``sig`` (SIGTERM) and wait for the exit; SIGKILL after ``timeout``. Returns the exit code."""
    if daemon.process.poll() is None:
        daemon.process.send_signal(sig)
        try:
            daemon.process.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill(daemon.process)
            raise RuntimeError(f"llamaproc serve did not stop within {timeout}s:\n{daemon.stderr()}") from None
    return daemon.process.returncode


@contextlib.contextmanager
def running_daemon(config: Path, state_dir: Path, **kwargs: Any) -> Iterator[Daemon]:
    """A started daemon, stopped (SIGTERM, then SIGKILL if it hangs) on exit."""
    daemon = start_daemon(config, state_dir, **kwargs)
    try:
        yield daemon
    finally:
        if daemon.process.poll() is None:
            try:
                stop_daemon(daemon, timeout=30.0)
            except RuntimeError:
                pass


@dataclass
class Worker:
    """A running ``llamaproc worker`` subprocess and the address of its rpc-server."""

    process: subprocess.Popen[bytes]
    address: str
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@contextlib.contextmanager
def running_worker(tmp: Path, *args: str, env: Mapping[str, str] | None = None) -> Iterator[Worker]:
    """``python -m llamaproc worker ARGS`` (an rpc-server on a free port); stopped with SIGTERM on exit.

    Its first line of output names the address: ``llamaproc worker: serving at HOST:PORT (pid N)``.
    """
    stderr_path = tmp / f"worker-{time.monotonic_ns()}.stderr"
    with open(stderr_path, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "llamaproc", "worker", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            env={**os.environ, **(env or {})},
        )
    try:
        assert process.stdout is not None
        first = process.stdout.readline().decode()
        if "serving at " not in first:
            process.wait(30)
            raise RuntimeError(f"llamaproc worker did not start: {first!r}\n{stderr_path.read_text()}")
        address = first.split("serving at ", 1)[1].split()[0]
        yield Worker(process, address, stderr_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()


@contextlib.contextmanager
def running_daemon_checked(config: Path, state_dir: Path, **kwargs: Any) -> Iterator[Daemon]:
    """:func:`running_daemon` for a module's daemon whose children outlive single tests.

    On exit it checks that the daemon exited 0 and that none of its children
    (llama-server, rpc workers) survived it.
    """
    with running_daemon(config, state_dir, **kwargs) as started:
        children = psutil.Process(started.pid).children(recursive=True)
        yield started
        children += psutil.Process(started.pid).children(recursive=True)
    assert started.returncode == 0, started.stderr()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"children left running by the daemon: {alive}"


def chat_stream(
    client: httpx.Client, model: str, max_tokens: int, *, on_token: Callable[[int], None] | None = None,
    **extra: Any,
) -> str:
    """Stream a chat answer of exactly ``max_tokens`` tokens through the daemon (``client`` has its base URL);
    checked to carry no error event; its text. ``on_token(n)`` is called after the ``n``-th piece of text."""
    body = {"model": model, "messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, **extra}  # fmt: skip
    texts: list[str] = []
    with client.stream("POST", "/v1/chat/completions", json=body) as answer:
        assert answer.status_code == 200, answer.read()
        for line in answer.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: ") :])
                assert "error" not in event, event
                for choice in event["choices"]:
                    if choice["delta"].get("content"):
                        texts.append(choice["delta"]["content"])
                        if on_token is not None:
                            on_token(len(texts))
    return "".join(texts)


def until(what: str, probe: Callable[[], T | None], *, safety: float = 120.0) -> T:
    """Poll ``probe`` until it returns something other than None or False (``safety``: a net, not a measure)."""
    deadline = time.monotonic() + safety
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what} after {safety} s")
        time.sleep(0.05)
