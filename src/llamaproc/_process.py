"""Spawn, watch and stop one llama-server child.

This module knows processes and, to see that the child is ready, the
``/health`` call of the client layer; it knows nothing about tokens.

* The child listens on a port the kernel picks (``--port 0``); the port is
  read from its log line ``listening on http://HOST:PORT`` or, failing that,
  from its listening socket (psutil). No pick-then-pass race.
* Its output (stdout and stderr, merged) is drained by a thread into a
  bounded head + tail buffer and optionally forwarded to :mod:`logging`. The
  thread ends when the pipe closes, i.e. when the child is gone.
* Start-up fails as soon as the child exits, with its exit code and the lines
  of output that matter; the start-up timeout counts from the last line the
  child printed, so a big model that is still loading is not killed.
* :meth:`ServerProcess.stop` sends SIGTERM to the child's process group,
  waits ``grace`` seconds, then SIGKILL, all shielded from cancellation.
* On Linux the child gets ``PR_SET_PDEATHSIG(SIGKILL)``: if this Python
  process dies, even by SIGKILL, the kernel kills the child too.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO

import anyio
import psutil

from ._client import LlamaClient
from ._exceptions import (
    ClosedError,
    LlamaprocError,
    ProcessError,
    ServerLoadingError,
    StartupError,
    StartupTimeoutError,
    TransportError,
)

__all__ = ["OutputBuffer", "ServerProcess"]

_log = logging.getLogger("llamaproc.process")

_LISTENING = re.compile(rb"listening on https?://([^\s:/]+|\[[^\]]+\]):(\d+)")
_RELEVANT = re.compile(
    rb"error|fail|invalid|assert|abort|exception|terminate|cannot|can't|unable|not found|no such|unknown|"
    rb"out of memory|segmentation|what\(\)",
    re.IGNORECASE,
)
_LEVELS = {b"E": logging.ERROR, b"W": logging.WARNING, b"I": logging.INFO, b"D": logging.DEBUG}
_MAX_LINE = 4096


class OutputBuffer:
    """The child's output, bounded: the first ``head`` lines and the last ``tail`` lines.

    Thread-safe: one thread appends, any thread reads.
    """

    def __init__(self, *, head: int = 100, tail: int = 400) -> None:
        self._head_max = head
        self._head: list[str] = []
        self._tail: collections.deque[str] = collections.deque(maxlen=tail)
        self._relevant: collections.deque[str] = collections.deque(maxlen=20)
        self._total = 0
        self._lock = threading.Lock()

    def append(self, raw: bytes) -> None:
        line = raw[:_MAX_LINE].rstrip(b"\r\n").decode("utf-8", "replace")
        with self._lock:
            self._total += 1
            if len(self._head) < self._head_max:
                self._head.append(line)
            else:
                self._tail.append(line)
            if _is_relevant(raw):
                self._relevant.append(line)

    @property
    def line_count(self) -> int:
        return self._total

    def lines(self) -> list[str]:
        """All kept lines, with a marker where lines were dropped."""
        with self._lock:
            dropped = self._total - len(self._head) - len(self._tail)
            middle = [f"... {dropped} lines omitted ..."] if dropped > 0 else []
            return [*self._head, *middle, *self._tail]

    def text(self) -> str:
        return "\n".join(self.lines())

    def relevant(self) -> list[str]:
        """Lines that look like errors (kept even when they fall out of head and tail)."""
        with self._lock:
            return list(self._relevant)

    def summary(self, *, tail: int = 15) -> str:
        """The lines that explain a failure: error-looking lines, then the last lines."""
        with self._lock:
            relevant = list(self._relevant)
            last = [*self._head, *self._tail][-tail:]
        seen = set(relevant)
        return "\n".join(relevant + [line for line in last if line not in seen])


def _is_relevant(raw: bytes) -> bool:
    """Whether a line explains a failure.

    llama.cpp's log lines carry a level letter (``0.00.005.583 E gguf_init...``):
    trust it, so that a model path containing "error" does not count. Lines
    without one (argument errors, assertions, backtraces) are matched by words.
    """
    parts = raw.split(None, 2)
    if len(parts) >= 2 and parts[1] in _LEVELS and parts[0][:1].isdigit():
        return parts[1] == b"E"
    return _RELEVANT.search(raw) is not None


def _pdeathsig() -> Callable[[], None] | None:
    """A preexec_fn that asks Linux to SIGKILL the child when this process dies."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return preexec


class ServerProcess:
    """One llama-server child process. Start it with :meth:`start`.

    Attributes that stay readable after the child is gone: :attr:`pid`,
    :attr:`returncode`, :attr:`output`, :attr:`argv`.
    """

    def __init__(self, popen: subprocess.Popen[bytes], argv: list[str], *, host: str,
                 logger: logging.Logger | None, grace: float) -> None:
        self._popen = popen
        self.argv = argv
        self.pid: int = popen.pid
        self.host = host
        self.grace = grace
        self.output = OutputBuffer()
        self.port: int | None = None
        self._logger = logger
        self._last_progress = time.monotonic()
        self._stopping = False
        self._stopped = False
        # The output thread wakes the start-up wait through this pipe (port seen, output ended).
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        stdout = popen.stdout
        assert stdout is not None
        self._reader = threading.Thread(
            target=self._drain, args=(stdout,), name=f"llamaproc-output-{self.pid}", daemon=True
        )
        self._reader.start()

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        binary: str | os.PathLike[str],
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        devices: str | None = "0",
        host: str = "127.0.0.1",
        cwd: str | os.PathLike[str] | None = None,
        startup_timeout: float = 60.0,
        grace: float = 5.0,
        logger: logging.Logger | None = None,
    ) -> ServerProcess:
        """Spawn ``binary`` with ``args`` on a kernel-assigned port and wait until ``/health`` is 200.

        ``env`` is added to this process's environment. ``HIP_VISIBLE_DEVICES``
        is set to ``devices`` (default ``"0"``) unless ``env`` sets it;
        ``devices=None`` leaves it alone. ``startup_timeout`` counts from the
        child's last line of output. On any failure the child is stopped before
        the error reaches the caller, cancellation included.
        """
        argv = [os.fspath(binary), *args]
        if "--port" not in args:
            argv += ["--port", "0"]
        if "--host" not in args:
            argv += ["--host", host]
        child_env = dict(os.environ)
        if devices is not None:
            child_env["HIP_VISIBLE_DEVICES"] = devices
        if env:
            child_env.update(env)
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=child_env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_pdeathsig(),  # noqa: PLW1509 - only prctl, nothing that can deadlock
                close_fds=True,
            )
        except OSError as exc:
            raise StartupError(f"cannot start {argv[0]}: {exc}", returncode=None, output="") from exc
        proc = cls(popen, argv, host=host, logger=logger, grace=grace)
        try:
            await proc._wait_ready(startup_timeout)
        except BaseException:
            await proc.stop()
            raise
        return proc

    # -- state ----------------------------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has exited (negative: killed by that signal)."""
        return self._popen.poll()

    @property
    def running(self) -> bool:
        return self.returncode is None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise ClosedError("the server has no port yet")
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}"

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.returncode}"
        return f"<ServerProcess pid={self.pid} port={self.port} {state}>"

    # -- output ---------------------------------------------------------------------------------

    def _drain(self, stdout: IO[bytes]) -> None:
        logger = self._logger
        try:
            for raw in stdout:
                self._last_progress = time.monotonic()
                self.output.append(raw)
                if self.port is None:
                    m = _LISTENING.search(raw)
                    if m:
                        self.port = int(m.group(2))
                        self._wake()
                if logger is not None:
                    level = logging.INFO
                    parts = raw.split(None, 2)
                    if len(parts) >= 2 and parts[1] in _LEVELS:
                        level = _LEVELS[parts[1]]
                    logger.log(level, "[%d] %s", self.pid, raw.rstrip().decode("utf-8", "replace"))
        except (OSError, ValueError):
            pass
        finally:
            try:
                stdout.close()
            except OSError:
                pass
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    async def _sleep(self, delay: float) -> None:
        """Sleep up to ``delay`` seconds, or until the output thread has news."""
        with anyio.move_on_after(delay):
            await anyio.wait_readable(self._wake_r)
        try:
            os.read(self._wake_r, 64)
        except OSError:
            pass

    def _listening_port(self) -> int | None:
        """The child's listening TCP port, read from the kernel (fallback when the log is silent)."""
        try:
            conns = psutil.Process(self.pid).net_connections(kind="tcp")
        except (psutil.Error, OSError):
            return None
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN and conn.laddr:
                return int(conn.laddr.port)
        return None

    # -- readiness --------------------------------------------------------------------------------

    def _exited_error(self, cls: type[StartupError] = StartupError, what: str = "") -> StartupError:
        code = self.returncode
        summary = self.output.summary()
        first = next(iter(self.output.relevant()), "")
        reason = what or f"llama-server exited with code {code} during start-up"
        if first:
            reason += f": {first.strip()}"
        return cls(reason, returncode=code, output=summary, pid=self.pid)

    async def _wait_ready(self, timeout: float) -> None:
        delay = 0.001
        next_socket_probe = time.monotonic() + 0.2
        client: LlamaClient | None = None
        try:
            while True:
                if self.returncode is not None:
                    # Collect the last lines it printed, without blocking the event loop.
                    await anyio.to_thread.run_sync(self._reader.join, 1.0, abandon_on_cancel=True)
                    raise self._exited_error()
                now = time.monotonic()
                if self.port is None and now >= next_socket_probe:
                    self.port = self._listening_port()
                    next_socket_probe = now + 0.2
                if self.port is not None:
                    if client is None:
                        client = LlamaClient(self.base_url, timeout=5.0, max_connections=1)
                    try:
                        if (await client.health()).status == "ok":
                            return
                        self._last_progress = time.monotonic()  # answering 503: alive and loading
                    except (TransportError, ServerLoadingError):
                        pass
                    except LlamaprocError as exc:
                        raise StartupError(
                            f"llama-server answered /health with an error: {exc}",
                            returncode=None, output=self.output.summary(), pid=self.pid,
                        ) from exc
                if time.monotonic() - self._last_progress > timeout:
                    raise self._exited_error(
                        StartupTimeoutError,
                        f"llama-server made no progress for {timeout:g} s and is not healthy"
                        + ("" if self.port is not None else " (it never said which port it listens on)"),
                    )
                # Woken at once when the port shows up or the output ends; otherwise poll
                # (/health while the server answers 503, the socket table, the exit status).
                await self._sleep(delay)
                delay = min(delay * 2, 0.02 if self.port is not None else 0.05)
        finally:
            if client is not None:
                await client.aclose()

    # -- stopping -----------------------------------------------------------------------------------

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            try:
                self._popen.send_signal(sig)
            except ProcessLookupError:
                pass

    async def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        delay = 0.001
        while self._popen.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await anyio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.02)
        return True

    async def stop(self, *, grace: float | None = None) -> int | None:
        """SIGTERM the child's process group, wait ``grace`` seconds, then SIGKILL.

        Shielded from cancellation; idempotent; returns the exit status.
        """
        grace = self.grace if grace is None else grace
        with anyio.CancelScope(shield=True):
            if self._popen.poll() is None:
                self._stopping = True
                self._signal(signal.SIGTERM)
                if not await self._wait_exit(grace):
                    _log.warning("llama-server pid %d ignored SIGTERM for %.1f s; sending SIGKILL", self.pid, grace)
                    self._signal(signal.SIGKILL)
                    if not await self._wait_exit(10.0):
                        raise ProcessError(f"llama-server pid {self.pid} survived SIGKILL")
            # The child is gone (stopped or crashed): kill anything left in its group, such as a
            # process it spawned that ignores SIGTERM. The group id cannot be reused while any
            # member lives, so this reaches only the child's own descendants.
            self._signal(signal.SIGKILL)
            self._stopped = True
            # The pipe closes with the child; a grandchild holding it open must not hang us.
            await anyio.to_thread.run_sync(self._reader.join, 2.0, abandon_on_cancel=True)
            if not self._reader.is_alive() and self._wake_w >= 0:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1
        return self._popen.returncode
