"""``llamaproc chat``, ``ps`` and ``stop``: the command-line clients of ``llamaproc serve``.

They find the daemon through its state directory (``--state-dir``, default
``~/.llamaproc``): the socket named in ``serve.json`` (or ``serve.sock``, or
``--socket``) and the pid in ``serve.pid``. :class:`DaemonClient` is a small
blocking client of the socket protocol (see :mod:`llamaproc.serve._socket`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psutil

from ..errors import ConfigError, DaemonError, DaemonNotRunningError, DaemonRequestError
from ..runtime import read_pid

__all__ = [
    "DEFAULT_STATE_DIR",
    "DaemonClient",
    "DaemonError",
    "DaemonNotRunningError",
    "DaemonRequestError",
    "cmd_chat",
    "cmd_ps",
    "cmd_stop",
    "find_socket",
    "state_dir",
]

DEFAULT_STATE_DIR = "~/.llamaproc"
#: How long ``llamaproc stop`` waits for the daemon to exit by default: the default drain deadline
#: (30 s) plus time to stop the children. A daemon whose serve.json names a longer drain_timeout
#: gets that plus 30 s.
STOP_TIMEOUT = 60.0

Message = Mapping[str, Any]

_STATE_DIR_HINT = "a daemon started with another --state-dir is found with that --state-dir or LLAMAPROC_STATE_DIR"


# --- finding the daemon ----------------------------------------------------------------------------


def state_dir(args: argparse.Namespace) -> Path:
    """``--state-dir``, else ``$LLAMAPROC_STATE_DIR``, else ``~/.llamaproc``."""
    given = getattr(args, "state_dir", None) or os.environ.get("LLAMAPROC_STATE_DIR") or DEFAULT_STATE_DIR
    return Path(given).expanduser()


def find_socket(args: argparse.Namespace) -> Path:
    """``--socket``, else the socket named in ``STATE_DIR/serve.json``, else ``STATE_DIR/serve.sock``."""
    given = getattr(args, "socket", None)
    if given:
        return Path(given).expanduser()
    directory = state_dir(args)
    try:
        info = json.loads((directory / "serve.json").read_text())
    except (OSError, ValueError):
        info = None
    if isinstance(info, dict) and isinstance(info.get("socket"), str):
        return Path(info["socket"])
    return directory / "serve.sock"


# --- the client ----------------------------------------------------------------------------------


class DaemonClient:
    """A blocking client of the daemon's socket protocol.

    ``with DaemonClient(path) as client:``; :meth:`call` sends one request and
    returns its ``result`` (or ``done``) event, :meth:`stream` yields the
    events of a streaming request. Errors come back as
    :class:`DaemonRequestError`. Meant for one request at a time: events of
    other ids are skipped. ``timeout`` bounds each socket operation.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float | None = None) -> None:
        self.path = Path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise DaemonNotRunningError(
                f"no llamaproc daemon is listening on {self.path} (start one with `llamaproc serve --config FILE`;"
                f" {_STATE_DIR_HINT})"
            ) from exc
        except OSError as exc:
            sock.close()
            raise DaemonError(f"cannot connect to {self.path}: {exc}") from exc
        self._sock = sock
        self._reader = sock.makefile("rb")
        self._ids = itertools.count(1)

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def new_id(self) -> str:
        return str(next(self._ids))

    def send(self, request: Mapping[str, Any]) -> None:
        """Send one request line."""
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            raise DaemonError(f"lost the connection to the daemon: {exc}") from exc

    def receive(self) -> dict[str, Any]:
        """The next event line."""
        try:
            line = self._reader.readline()
        except OSError as exc:
            raise DaemonError(f"lost the connection to the daemon: {exc}") from exc
        if not line:
            raise DaemonError("the daemon closed the connection")
        try:
            event = json.loads(line)
        except ValueError as exc:
            raise DaemonError(f"the daemon sent a line that is not JSON: {line[:200]!r}") from exc
        if not isinstance(event, dict):
            raise DaemonError(f"the daemon sent a line that is not a JSON object: {line[:200]!r}")
        return event

    def stream(self, op: str, **fields: Any) -> Generator[dict[str, Any], None, None]:
        """Send a request; yield its events up to and including the last (``done`` or ``result``).

        If the caller stops early (``break``, KeyboardInterrupt), the request
        is cancelled and its remaining events are read away.
        """
        rid = self.new_id()
        self.send({"id": rid, "op": op, **fields})
        finished = False
        try:
            while True:
                event = self.receive()
                if event.get("id") != rid:
                    continue
                kind = event.get("event")
                if kind == "error":
                    finished = True
                    raise DaemonRequestError(event)
                if kind in ("done", "result"):
                    finished = True
                    yield event
                    return
                yield event
        finally:
            if not finished:
                self._cancel_and_drain(rid)

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send a request and return its final event (``result`` or ``done``)."""
        event: dict[str, Any] = {}
        for event in self.stream(op, **fields):  # noqa: B007 - the last one is the answer
            pass
        return event

    def _cancel_and_drain(self, rid: str) -> None:
        try:
            self.send({"op": "cancel", "id": rid})
            while True:
                event = self.receive()
                if event.get("id") == rid and event.get("event") in ("done", "result", "error"):
                    return
        except DaemonError:
            pass


# --- llamaproc chat --------------------------------------------------------------------------------

Reply = Callable[[Sequence[Message]], str]


def cmd_chat(args: argparse.Namespace) -> int:
    """``llamaproc chat MODEL [PROMPT] [--daemon]``: one reply, or a conversation read from stdin."""
    params: dict[str, Any] = {"max_tokens": getattr(args, "max_tokens", 256)}
    temperature = getattr(args, "temperature", None)
    if temperature is not None:
        params["temperature"] = temperature
    try:
        if getattr(args, "daemon", False):
            with DaemonClient(find_socket(args)) as client:
                return _converse(args, partial(_daemon_reply, client, args.model, params))
        return _chat_direct(args, params)
    except DaemonNotRunningError as exc:
        _err(f"llamaproc chat: {exc}")
        return 1


def _converse(args: argparse.Namespace, reply: Reply) -> int:
    if args.prompt is not None:
        try:
            reply([{"role": "user", "content": args.prompt}])
        except DaemonRequestError as exc:
            _err(f"\nllamaproc chat: {exc}")
            return 1
        except KeyboardInterrupt:
            _out("\n")
            return 130
        return 0
    return _repl(reply)


def _repl(reply: Reply) -> int:
    """Read user lines until EOF (or /bye), keeping the conversation. Ctrl-C stops a reply."""
    history: list[Message] = []
    interactive = sys.stdin.isatty()
    if interactive:
        _err("(/bye or Ctrl-D to leave, /reset to forget the conversation, Ctrl-C stops a reply)")
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            _err("")
            return 0
        if not line:
            if interactive:
                _err("")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/bye", "/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            continue
        history.append({"role": "user", "content": text})
        try:
            answer = reply(history)
        except DaemonRequestError as exc:
            _err(f"\nllamaproc chat: {exc}")
            history.pop()
            continue
        except KeyboardInterrupt:
            _out("\n")
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})


def _daemon_reply(client: DaemonClient, model: str, params: Mapping[str, Any], messages: Sequence[Message]) -> str:
    pieces: list[str] = []
    # closing(): on Ctrl-C the request is cancelled at once, not when the traceback is dropped.
    with contextlib.closing(client.stream("chat", model=model, messages=list(messages), **params)) as events:
        for event in events:
            if event.get("event") == "token":
                text = event.get("text", "")
                pieces.append(text)
                _out(text)
    _out("\n")
    return "".join(pieces)


def _chat_direct(args: argparse.Namespace, params: Mapping[str, Any]) -> int:
    """Without ``--daemon``: MODEL is a GGUF path, loaded for this conversation only."""
    import anyio.from_thread

    from ..model import TextModel, load_model

    path = Path(args.model).expanduser()
    if not path.is_file():
        _err(f"llamaproc chat: no model file {path}; to chat with a model of the running daemon, add --daemon")
        return 1

    async def stream_reply(model: TextModel, messages: Sequence[Message]) -> str:
        pieces: list[str] = []
        async with model.chat(messages, **params) as stream:
            async for token in stream:
                pieces.append(token.text)
                _out(token.text)
        _out("\n")
        return "".join(pieces)

    with anyio.from_thread.start_blocking_portal() as portal:
        model = portal.call(partial(load_model, path, binary=getattr(args, "binary", None)))
        try:

            def reply(messages: Sequence[Message]) -> str:
                future = portal.start_task_soon(stream_reply, model, list(messages))
                try:
                    return future.result()
                except KeyboardInterrupt:
                    future.cancel()
                    concurrent.futures.wait([future], timeout=5)
                    raise

            return _converse(args, reply)
        finally:
            portal.call(model.close)


# --- llamaproc ps ----------------------------------------------------------------------------------

_COLUMNS = ("NAME", "PHASE", "READY", "PID", "PORT", "IN-FLIGHT", "QUEUED", "RESTARTS", "LEASE", "LAST USED")


def cmd_ps(args: argparse.Namespace) -> int:
    """``llamaproc ps``: a table of the daemon's models and their state."""
    try:
        with DaemonClient(find_socket(args), timeout=10.0) as client:
            status = client.call("status")
    except DaemonError as exc:
        _err(f"llamaproc ps: {exc}")
        return 1
    _out(format_table(status.get("models", [])))
    return 0


def format_table(models: Sequence[Mapping[str, Any]], *, now: datetime | None = None) -> str:
    """The ``llamaproc ps`` table of ``status`` entries."""
    rows = [_COLUMNS]
    for m in models:
        rows.append(
            (
                str(m.get("name", "?")),
                str(m.get("phase", "?")),
                _ready(m.get("roles")),
                _dash(m.get("pid")),
                _dash(m.get("port")),
                _dash(m.get("inFlight")),
                _dash(m.get("queued")),
                _dash(m.get("restarts")),
                _lease(m.get("lease")),
                _ago(m.get("lastUsed"), now),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip() + "\n" for row in rows)


def _ready(roles: Any) -> str:
    """``1/2``: the replicas serving of those wanted (``-`` without a role)."""
    if not isinstance(roles, list) or not roles or not isinstance(roles[0], Mapping):
        return "-"
    return f"{roles[0].get('readyReplicas', '?')}/{roles[0].get('replicas', '?')}"


def _lease(lease: Any) -> str:
    """``9.6MiB@normal`` (``!`` once asked to yield), ``-`` without a lease."""
    if not isinstance(lease, Mapping) or not isinstance(lease.get("memory"), int):
        return "-"
    size = float(lease["memory"])
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    text = f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
    return f"{text}@{lease.get('priority', '?')}" + ("!" if lease.get("preemptRequested") else "")


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _ago(value: Any, now: datetime | None) -> str:
    if not isinstance(value, str):
        return "-"
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return value
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = max(0.0, ((now or datetime.now(UTC)) - when).total_seconds())
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86400:.1f}d ago"


# --- llamaproc stop --------------------------------------------------------------------------------


# --- llamaproc apply -------------------------------------------------------------------------------


def cmd_apply(args: argparse.Namespace) -> int:
    """``llamaproc apply FILE``: 0 when applied (or nothing changed), 1 when refused or rolled back, 2 for a bad file.

    The file is read here (relative paths against its folder) and sent to the
    daemon as spec documents with absolute paths; the daemon checks it again
    and answers once every change is in place.
    """
    from ..runtime import config_to_spec, load_config

    try:
        config = load_config(args.file)
    except ConfigError as exc:
        _err(f"llamaproc apply: {exc}")
        return 2
    dry_run = bool(getattr(args, "dry_run", False))
    try:
        with DaemonClient(find_socket(args), timeout=None) as client:
            answer = client.call("apply", documents=config_to_spec(config), dry_run=dry_run)
    except DaemonRequestError as exc:
        problems = exc.event.get("problems")
        lines = problems if isinstance(problems, list) and problems else [exc.message]
        _err("llamaproc apply: the daemon refused the config:\n" + "\n".join(f"  {line}" for line in lines))
        return 1
    except DaemonError as exc:
        _err(f"llamaproc apply: {exc}")
        return 1
    changes = answer.get("changes") or []
    if not changes:
        _out("nothing to change\n")
        return 0
    if dry_run:
        _out("dry run: nothing was changed; applying would make these changes:\n")
    failed = False
    for change in changes:
        action = str(change.get("action"))
        failed |= action in ("rolled_back", "restart_required")
        _out(f"{change.get('model') or 'daemon'}: {action}: {change.get('detail')}\n")
    return 1 if failed and not dry_run else 0


def cmd_stop(args: argparse.Namespace) -> int:
    """``llamaproc stop``: SIGTERM to the daemon of the pid file, then wait until it has exited."""
    pid_file = state_dir(args) / "serve.pid"
    pid = read_pid(pid_file)
    if pid is None:
        _err(f"llamaproc stop: not running (no live daemon holds {pid_file}; {_STATE_DIR_HINT})")
        return 1
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        _err(f"llamaproc stop: not running (pid {pid} has already exited)")
        return 1
    given = getattr(args, "timeout", None)
    timeout = _default_stop_timeout(state_dir(args)) if given is None else float(given)
    _err(f"llamaproc stop: sent SIGTERM to the daemon (pid {pid}); waiting for it to finish its requests")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            _err("llamaproc stop: stopped")
            return 0
        time.sleep(0.05)
    _err(f"llamaproc stop: the daemon (pid {pid}) is still running after {timeout:g}s")
    return 1


def _default_stop_timeout(directory: Path) -> float:
    """``STOP_TIMEOUT``, or the daemon's drain timeout (from serve.json) + 30 s when that is longer."""
    try:
        drain = json.loads((directory / "serve.json").read_text()).get("drain_timeout")
    except (OSError, ValueError, AttributeError):
        drain = None
    if isinstance(drain, (int, float)) and not isinstance(drain, bool):
        return max(STOP_TIMEOUT, float(drain) + 30.0)
    return STOP_TIMEOUT


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


# --- output --------------------------------------------------------------------------------------


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
