"""Spawn, watch and stop one llama-server child.

This module knows processes and, to see that the child is ready, the
``/health`` call of the client layer; it knows nothing about tokens.

* The child listens on a port the kernel picks (``--port 0``); the port is
  read from its log line ``listening on http://HOST:PORT`` or, failing that,
  from its listening socket (psutil). No pick-then-pass race. The address is
  the log line's too, else the ``--host`` in ``args``, else ``host``.
* Its output (stdout and stderr, merged) is drained by a thread into a
  bounded head + tail buffer and optionally forwarded to :mod:`logging`. The
  thread ends when the pipe closes, i.e. when the child is gone.
* Start-up fails as soon as the child exits, with its exit code and the lines
  of output that matter. The start-up timeout counts from the child's last
  progress: a new line of output, or growth of its CPU time or of the bytes
  it read (a big model loads silently). Answering ``/health`` with 503 is not
  progress: a server stuck "loading" times out.
* :meth:`ServerProcess.stop` sends SIGTERM to the child's process group, and
  a second SIGTERM after 0.2 s (llama-server finishes in-flight work for up to
  30 s after the first, and exits at once on the second), then SIGKILL after
  ``grace`` seconds, all shielded from cancellation.
* On Linux the child gets ``PR_SET_PDEATHSIG(SIGKILL)``: if this Python
  process dies, even by SIGKILL, the kernel kills the child too. Where
  util-linux ``setpriv`` is found, the child is spawned through it
  (``setpriv --pdeathsig KILL -- sh -c CHECK sh BINARY ARGS``: each execs the
  next in place, so the pid is llama-server's), which lets CPython use
  ``vfork``; otherwise a ``preexec_fn`` sets the signal, which forces a full
  ``fork`` of this process (its cost grows with its size). Both refuse to run
  the binary when this process died before the signal was set.
* A ServerProcess (or a TextModel) dropped without being stopped has its
  child's process group killed by a finalizer, with a ``ResourceWarning``.
  When a step after the spawn fails (no descriptor or thread left), the
  child is killed and reaped before the error is raised.
* The output is read at most ``_READ_LIMIT`` bytes at a time: of a longer
  line the first piece is kept and the rest dropped, so a child printing
  without newlines cannot make us buffer without bound.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TypeVar

import anyio
import psutil

from ..client import LlamaClient
from ..errors import (
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

T = TypeVar("T")

_LISTENING = re.compile(rb"listening on https?://([^\s:/]+|\[[^\]]+\]):(\d+)")
_RELEVANT = re.compile(
    rb"error|fail|invalid|assert|abort|exception|terminate|cannot|can't|unable|not found|no such|unknown|"
    rb"out of memory|segmentation|what\(\)",
    re.IGNORECASE,
)
_LEVELS = {b"E": logging.ERROR, b"W": logging.WARNING, b"I": logging.INFO, b"D": logging.DEBUG}
_MAX_LINE = 4096
#: The most read from the child's output at a time: of a longer line, the rest is read and dropped.
_READ_LIMIT = 64 * 1024
#: How often the child's CPU time and reads are checked for progress during start-up.
_USAGE_INTERVAL = 0.5
#: CPU time growth that counts as progress, as a fraction of the time between two checks: a server
#: answering our /health polls uses far less, a loading model far more.
_CPU_PROGRESS = 0.1
#: How often the exit status is polled where no pidfd is available.
_POLL_INTERVAL = 0.05
#: After the first SIGTERM, wait this long (at most) before the second.
_SECOND_TERM = 0.2
#: How long kill() and the finalizer wait (blocking) for a SIGKILLed child to be reaped.
_KILL_WAIT = 1.0
#: Set this environment variable to 1 to spawn with a preexec_fn even where setpriv is found.
ENV_NO_SETPRIV = "LLAMAPROC_NO_SETPRIV"


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


@functools.cache
def _setpriv() -> tuple[str, str] | None:
    """``setpriv`` and ``sh``, when ``setpriv --pdeathsig`` works here (looked up and tried once).

    util-linux has had ``--pdeathsig`` since 2.33 (2018); an older one, or
    one that a sandbox stops from calling prctl, fails the trial run.
    """
    if not sys.platform.startswith("linux"):
        return None
    setpriv = shutil.which("setpriv")
    sh = "/bin/sh" if os.access("/bin/sh", os.X_OK) else shutil.which("sh")
    if setpriv is None or sh is None:
        return None
    try:
        trial = subprocess.run(
            [setpriv, "--pdeathsig", "KILL", "--", sh, "-c", "exit 0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if trial.returncode != 0:
        _log.debug("%s cannot set the parent-death signal; spawning with a preexec_fn", setpriv)
        return None
    return setpriv, sh


def _spawn_command(
    argv: list[str], *, env: Mapping[str, str], cwd: str | os.PathLike[str] | None
) -> tuple[list[str], Callable[[], None] | None]:
    """The command line and preexec_fn that start ``argv`` with ``PR_SET_PDEATHSIG(SIGKILL)``.

    A preexec_fn makes CPython fork this whole process (copying its page
    tables, on the caller's thread); without one it can use vfork. So where
    ``setpriv`` works, the child runs ``setpriv --pdeathsig KILL -- sh -c
    CHECK sh BINARY ARGS``: setpriv sets the signal and execs sh, which execs
    the binary, all in place (one pid, llama-server's in the end). The
    signal survives exec. ``CHECK`` closes the window between the spawn and
    the prctl, as the preexec_fn does with getppid: if this process died in
    it, the child was already handed to another parent, so sh (which reads
    its parent after setpriv set the signal) exits instead of starting the
    binary. ``LLAMAPROC_NO_SETPRIV=1`` forces the preexec_fn.

    The wrapped binary is checked first, so that a missing or non-executable
    one raises the same OSError as when exec fails in Popen.
    """
    found = None if os.environ.get(ENV_NO_SETPRIV) == "1" else _setpriv()
    if found is None:
        return argv, _pdeathsig()
    _check_executable(argv[0], env=env, cwd=cwd)
    setpriv, sh = found
    check = f'[ "$PPID" = {os.getpid()} ] && exec "$@"; exit 1'
    return [setpriv, "--pdeathsig", "KILL", "--", sh, "-c", check, "sh", *argv], None


def _check_executable(binary: str, *, env: Mapping[str, str], cwd: str | os.PathLike[str] | None) -> None:
    """Raise the OSError that exec would for a ``binary`` that cannot be run (looked up as exec does)."""
    if os.sep in binary:
        path: str | None = os.path.join(os.fspath(cwd), binary) if cwd is not None else binary
    else:
        path = shutil.which(binary, path=env.get("PATH", os.defpath))
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), binary)
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), binary)


def _send(popen: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the child's process group (it leads one), else to the child alone."""
    try:
        os.killpg(popen.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            popen.send_signal(sig)
        except ProcessLookupError:
            pass


def _kill(popen: subprocess.Popen[bytes]) -> bool:
    """SIGKILL the child's process group and reap the child (blocking up to ``_KILL_WAIT`` s).

    Returns whether the child was still running. A child whose exit was seen
    already is left alone: its group was killed when the exit was seen, and
    the group id may name someone else's group by now.
    """
    if popen.returncode is not None:
        return False
    running = popen.poll() is None
    _send(popen, signal.SIGKILL)  # a child that exited unseen may have left members in its group
    if running:
        try:
            popen.wait(_KILL_WAIT)
        except subprocess.TimeoutExpired:
            _log.warning("child pid %d is not gone %.1f s after SIGKILL", popen.pid, _KILL_WAIT)
    return running


def _finalize(
    popen: subprocess.Popen[bytes],
    _warn: Callable[..., None] = warnings.warn,
    *,
    what: str = "unstopped ServerProcess",
    advice: str = "call stop() (or close the model) when done with it",
) -> None:
    """Kill the child of an owner dropped without being stopped (its weakref.finalize callback)."""
    if _kill(popen):
        _warn(f"{what} pid {popen.pid}: its process group was killed; {advice}", ResourceWarning)


async def _spawn_watched(
    argv: list[str], *, env: Mapping[str, str], cwd: str | os.PathLike[str] | None,
    watch: Callable[[subprocess.Popen[bytes]], T],
) -> T:  # fmt: skip
    """Start ``argv`` in its own process group, with the parent-death signal and its output piped; return
    ``watch(popen)``, the child's owner (which starts the output thread).

    A child that cannot start is a :class:`StartupError`; when ``watch``
    fails (out of descriptors or threads, say), the child is killed and
    reaped before the error: it must not outlive the failure.
    """
    try:
        command, preexec = _spawn_command(argv, env=env, cwd=cwd)
        popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=preexec,  # noqa: PLW1509 - only prctl, nothing that can deadlock
            close_fds=True,
        )
    except OSError as exc:
        raise StartupError(f"cannot start {argv[0]}: {exc}", returncode=None, output="") from exc
    try:
        return watch(popen)
    except BaseException as exc:
        await _reap_killed(popen)
        if isinstance(exc, (OSError, RuntimeError)):
            raise StartupError(
                f"cannot watch {argv[0]} (pid {popen.pid}): {exc}", returncode=popen.returncode, output="", pid=popen.pid
            ) from exc
        raise


async def _reap_killed(popen: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child that has no ServerProcess (its construction failed) and wait for it, shielded."""
    _send(popen, signal.SIGKILL)
    with anyio.CancelScope(shield=True), anyio.move_on_after(10.0):
        delay = 0.001
        while popen.poll() is None:
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.02)
    if popen.stdout is not None:
        popen.stdout.close()


def _read_output(stdout: IO[bytes], output: OutputBuffer, logger: logging.Logger | None, pid: int,
                 on_piece: Callable[[bytes, bool], None] | None = None) -> None:
    """Read the child's output until the pipe closes, then close it (the body of an output thread).

    Reads at most ``_READ_LIMIT`` bytes at a time. Of a longer line, the
    first piece is kept and the rest read and dropped up to its newline, so
    memory stays bounded whatever the child prints. Kept lines go to
    ``output`` and to ``logger``; ``on_piece(raw, kept)`` is called for every
    piece read. Holds nothing of the child's owner, so that an owner dropped
    without being stopped can be collected and its finalizer kill the child.
    """
    in_long_line = False  # reading the rest of a line longer than _READ_LIMIT
    try:
        while raw := stdout.readline(_READ_LIMIT):
            kept = not in_long_line
            in_long_line = not raw.endswith(b"\n")
            if kept:
                output.append(raw)
                if logger is not None:
                    level = logging.INFO
                    parts = raw.split(None, 2)
                    if len(parts) >= 2 and parts[1] in _LEVELS:
                        level = _LEVELS[parts[1]]
                    logger.log(level, "[%d] %s", pid, raw.rstrip().decode("utf-8", "replace"))
            if on_piece is not None:
                on_piece(raw, kept)
    except (OSError, ValueError):
        pass
    finally:
        try:
            stdout.close()
        except OSError:
            pass


def _drain(owner: weakref.ref[ServerProcess], stdout: IO[bytes], output: OutputBuffer,
           logger: logging.Logger | None, pid: int) -> None:
    """Read a llama-server's output until the pipe closes (its output thread's body).

    Every piece read counts as progress; the ``listening on`` line gives the
    address. The thread holds its ServerProcess only weakly (see
    :func:`_read_output`).
    """
    listening = False

    def on_piece(raw: bytes, kept: bool) -> None:
        nonlocal listening
        address: tuple[str, int] | None = None
        if kept and not listening:
            m = _LISTENING.search(raw)
            if m:
                # The log's address wins over the one found by the socket probe: llama-server
                # prints it once the model is loaded, when it is ready to serve.
                listening = True
                address = (_connect_host(m.group(1).decode("ascii", "replace")), int(m.group(2)))
        _report(owner, address)

    try:
        _read_output(stdout, output, logger, pid, on_piece)
    finally:
        proc = owner()
        if proc is not None:
            proc._wake()
            proc._close_wake_writer()


def _report(owner: weakref.ref[ServerProcess], address: tuple[str, int] | None) -> None:
    """Tell the ServerProcess (if it still exists) that the child made progress, and its address if seen."""
    proc = owner()
    if proc is None:
        return
    proc._last_progress = time.monotonic()
    if address is not None:
        proc.host, proc.port = address
        proc._wake()


class ServerProcess:
    """One llama-server child process. Start it with :meth:`start`, end it with :meth:`stop`.

    One that is dropped without being stopped has its child's process group
    killed when it is collected (or at interpreter exit), with a
    ``ResourceWarning``. Attributes that stay readable after the child is
    gone: :attr:`pid`, :attr:`returncode`, :attr:`output`, :attr:`argv`.
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
        self._group_killed = False
        self._stopped = False
        self._stop_lock = anyio.Lock()
        # Kills the child if this object is dropped without stop(); holds the Popen, not this object.
        self._finalizer = weakref.finalize(self, _finalize, popen)
        # The output thread wakes the start-up wait through this pipe (port seen, output ended).
        # Both ends are closed when start-up ends, the write end earlier if the thread ends first;
        # the lock keeps the thread from writing to a closed (and maybe reused) descriptor.
        self._wake_r = self._wake_w = -1
        self._wake_lock = threading.Lock()
        self._wake_eof = False
        try:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            stdout = popen.stdout
            assert stdout is not None
            self._reader = threading.Thread(
                target=_drain, args=(weakref.ref(self), stdout, self.output, logger, self.pid),
                name=f"llamaproc-output-{self.pid}", daemon=True,
            )
            self._reader.start()
        except BaseException:
            # The caller kills the child: this object never existed for anyone.
            self._finalizer.detach()
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            raise

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
        ``devices=None`` leaves it alone. ``host`` is the address to listen on,
        unless ``args`` has its own ``--host``. ``startup_timeout`` counts from
        the child's last progress (a line of output, CPU time, reads). On any
        failure the child is stopped before the error reaches the caller,
        cancellation included.

        ``argv`` (and errors) show ``binary`` and ``args``; on Linux the child
        may be started through ``setpriv`` (see the module's notes), which
        execs in place, so :attr:`pid` is llama-server's either way.
        """
        argv = [os.fspath(binary), *args]
        if "--port" not in args:
            argv += ["--port", "0"]
        if "--host" in args:
            i = list(args).index("--host")
            if i + 1 < len(args):
                host = _connect_host(args[i + 1])
        else:
            argv += ["--host", host]
        child_env = dict(os.environ)
        if devices is not None:
            child_env["HIP_VISIBLE_DEVICES"] = devices
        if env:
            child_env.update(env)
        proc = await _spawn_watched(
            argv, env=child_env, cwd=cwd, watch=lambda popen: cls(popen, argv, host=host, logger=logger, grace=grace)
        )
        try:
            await proc._wait_ready(startup_timeout)
        except BaseException:
            await proc.stop()
            raise
        finally:
            proc._close_wake_writer()
            os.close(proc._wake_r)
            proc._wake_r = -1
        return proc

    # -- state ----------------------------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has exited (negative: killed by that signal)."""
        return self._poll()

    def _poll(self) -> int | None:
        """The exit status; the first call that sees the exit also kills what is left of the group.

        A process the child spawned (and that ignored SIGTERM, or was never
        sent one because the child crashed) dies with it. The group id cannot
        be reused while a member lives, and this is sent right after the exit
        is seen, never again later, when the id could name someone else's group.
        """
        code = self._popen.poll()
        if code is not None and not self._group_killed:
            self._group_killed = True
            _send(self._popen, signal.SIGKILL)
        return code

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

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w < 0:  # start-up is over
                return
            try:
                os.write(self._wake_w, b"!")
            except OSError:  # full: a wake-up is pending anyway
                pass

    def _close_wake_writer(self) -> None:
        with self._wake_lock:
            if self._wake_w >= 0:
                os.close(self._wake_w)
                self._wake_w = -1

    async def _sleep(self, delay: float) -> None:
        """Sleep up to ``delay`` seconds, or until the output thread has news."""
        if self._wake_eof:  # the output thread has ended: nothing more will come
            await anyio.sleep(delay)
            return
        with anyio.move_on_after(delay):
            await anyio.wait_readable(self._wake_r)
        try:
            if os.read(self._wake_r, 64) == b"":
                self._wake_eof = True
        except BlockingIOError:
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

    def _usage(self, ps: psutil.Process) -> tuple[float, int]:
        """The child's CPU seconds and bytes read so far (zeros when they cannot be read)."""
        try:
            with ps.oneshot():
                cpu = ps.cpu_times()
                try:
                    io = ps.io_counters()
                    read = int(io.read_bytes) + int(getattr(io, "read_chars", 0))
                except (psutil.AccessDenied, AttributeError, NotImplementedError):
                    read = 0
            return float(cpu.user + cpu.system), read
        except (psutil.Error, OSError):
            return 0.0, 0

    async def _wait_ready(self, timeout: float) -> None:
        delay = 0.001
        now = time.monotonic()
        next_socket_probe = now + 0.2
        usage_interval = min(_USAGE_INTERVAL, max(timeout / 4, 0.05))
        next_usage_check = now + usage_interval
        last_usage_check = now
        try:
            ps: psutil.Process | None = psutil.Process(self.pid)
        except psutil.Error:
            ps = None
        usage = self._usage(ps) if ps is not None else (0.0, 0)
        client: LlamaClient | None = None
        loading = False
        try:
            while True:
                if self.returncode is not None:
                    # Collect the last lines it printed, without blocking the event loop.
                    await anyio.to_thread.run_sync(self._reader.join, 1.0, abandon_on_cancel=True)
                    raise self._exited_error()
                now = time.monotonic()
                if ps is not None and now >= next_usage_check:
                    # Loading a big model prints little for a long time but keeps the CPU or the disk busy.
                    cpu, read = self._usage(ps)
                    if cpu - usage[0] > _CPU_PROGRESS * (now - last_usage_check) or read > usage[1]:
                        self._last_progress = now
                    usage = (cpu, read)
                    last_usage_check = now
                    next_usage_check = now + usage_interval
                if self.port is None and now >= next_socket_probe:
                    self.port = self._listening_port()
                    next_socket_probe = now + 0.2
                if self.port is not None:
                    if client is not None and client.base_url != self.base_url:
                        await client.aclose()  # the log named another address than the socket probe saw
                        client = None
                    if client is None:
                        client = LlamaClient(self.base_url, timeout=5.0, max_connections=1)
                    try:
                        # A 503 ("loading") is not progress by itself: the CPU and read checks tell.
                        if (await client.health()).status == "ok":
                            return
                        loading = True
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
                # While the model loads (503), poll gently: the "listening on" line wakes us when it is ready.
                delay = min(delay * 2, 0.1 if loading else 0.02 if self.port is not None else 0.05)
        finally:
            if client is not None:
                await client.aclose()

    # -- stopping -----------------------------------------------------------------------------------


    async def stop(self, *, grace: float | None = None) -> int | None:
        """Stop the child: SIGTERM to its process group, again after 0.2 s, SIGKILL after ``grace`` s.

        llama-server keeps going for up to 30 s after a SIGTERM while it has
        work in flight (it only notices closed connections about once a
        second), and exits at once on a second one. Shielded from
        cancellation; idempotent (a repeated call returns at once); returns the
        exit status.
        """
        if self._stopped:
            return self._popen.returncode
        grace = self.grace if grace is None else grace
        with anyio.CancelScope(shield=True):
            async with self._stop_lock:
                if self._stopped:
                    return self._popen.returncode
                await _terminate(self._popen, self._poll, what="llama-server", grace=grace, second_term=_SECOND_TERM)
                # _poll() has killed the rest of the group when it saw the exit.
                self._stopped = True
                self._finalizer.detach()
                # The pipe closes with the child; a grandchild holding it open must not hang us.
                await anyio.to_thread.run_sync(self._reader.join, 2.0, abandon_on_cancel=True)
        return self._popen.returncode

    # -- watching -------------------------------------------------------------------------------

    async def wait(self) -> int:
        """Return the exit status once the child has exited (and been reaped); does not stop it.

        On Linux a pidfd wakes the wait the moment the child exits; elsewhere
        the status is polled every 50 ms. Cancellable.
        """
        return await _wait_exited(self.pid, self._poll)

    def kill(self) -> None:
        """SIGKILL the child's process group at once (a hung server), without waiting: for the event loop.

        :meth:`stop` (or :meth:`wait`) then sees the exit and reaps it.
        """
        if self._poll() is None:
            _send(self._popen, signal.SIGKILL)

    def cpu_seconds(self) -> float | None:
        """The child's CPU time so far (user + system), ``None`` once it is gone.

        Growing CPU time tells a busy server (a long prompt being processed)
        from a hung one.
        """
        return _cpu_seconds(self.pid)

    def kill_and_reap(self) -> int | None:
        """SIGKILL the child's process group now and reap the child; return its exit status.

        Synchronous, for finalizers and emergencies: it waits (blocking) up
        to a second for the child to be reaped, and returns ``None`` if it is
        not gone by then. :meth:`stop` is the orderly way: it lets llama-server
        end its work and does not block. After ``kill_and_reap()``, ``stop()`` only
        waits for the exit.
        """
        self._finalizer.detach()
        if self._popen.returncode is None:  # its exit not seen yet (_poll kills the group when it sees it)
            _kill(self._popen)
            self._group_killed = True
        return self._poll()


async def _wait_exited(pid: int, poll: Callable[[], int | None]) -> int:
    """Wait until ``poll()`` (the child's status, reaping it) gives its exit status.

    On Linux a pidfd wakes the wait the moment the child exits; elsewhere the
    status is polled every 50 ms. Cancellable.
    """
    code = poll()
    if code is not None:
        return code
    fd = -1
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is not None:
        # No await between the poll and here: the pid is still our unreaped child.
        try:
            fd = pidfd_open(pid)
        except OSError:
            fd = -1
    if fd >= 0:
        try:
            await anyio.wait_readable(fd)
        finally:
            os.close(fd)
        delay = 0.001
        while (code := poll()) is None:  # readable means exited; reaping follows at once
            await anyio.sleep(delay)
            delay = min(delay * 2, _POLL_INTERVAL)
        return code
    while (code := poll()) is None:
        await anyio.sleep(_POLL_INTERVAL)
    return code


async def _exits_within(poll: Callable[[], int | None], timeout: float) -> bool:
    """Whether ``poll()`` (the child's status, reaping it) shows an exit within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while poll() is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        await anyio.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)
    return True


async def _terminate(popen: subprocess.Popen[bytes], poll: Callable[[], int | None], *, what: str, grace: float,
                     second_term: float | None = None) -> None:
    """SIGTERM the child's process group (again after ``second_term`` s), SIGKILL after ``grace`` s; wait for its exit.

    ``poll`` reaps it (and kills the rest of its group) once it has exited.
    """
    if poll() is not None:
        return
    _send(popen, signal.SIGTERM)
    waited = 0.0
    if second_term is not None:
        waited = min(grace, second_term)
        if await _exits_within(poll, waited):
            return
        _send(popen, signal.SIGTERM)
    if await _exits_within(poll, grace - waited):
        return
    _log.warning("%s pid %d ignored SIGTERM for %.1f s; sending SIGKILL", what, popen.pid, grace)
    _send(popen, signal.SIGKILL)
    if not await _exits_within(poll, 10.0):
        raise ProcessError(f"{what} pid {popen.pid} survived SIGKILL")


def _cpu_seconds(pid: int) -> float | None:
    """The CPU time (user + system) of process ``pid`` so far, ``None`` once it is gone."""
    try:
        cpu = psutil.Process(pid).cpu_times()
    except (psutil.Error, OSError):
        return None
    return float(cpu.user + cpu.system)


def _connect_host(host: str) -> str:
    """The address to connect to for a listening address as written in a URL or an argument.

    ``[::1]`` -> ``::1``; a server listening on every address (``0.0.0.0``,
    ``::``) is reached on the loopback address.
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
