"""Start, probe and stop llama.cpp rpc workers (``ggml-rpc-server``).

An rpc worker offers its devices (CPU, GPUs) to one coordinator, a
``llama-server --rpc host:port,...``, over ggml's RPC protocol. This module
knows processes and that protocol's first few commands; it knows nothing
about models.

The protocol (protocol v5, as in llama.cpp's ``ggml/src/ggml-rpc/ggml-rpc.cpp``):

* A request is a command byte, the payload's size as 8 bytes little-endian,
  then the payload; a reply is its size (8 bytes little-endian) and its bytes.
* ``HELLO`` (14) must come first. Its payload is 24 bytes of transport
  capabilities (zeros: plain TCP); a payload of any other size makes the
  server drop the connection. Its reply is 28 bytes: major, minor and patch
  version, a padding byte, and the server's 24 capability bytes.
* ``DEVICE_COUNT`` (15) takes no payload and answers a ``uint32``;
  ``GET_DEVICE_MEMORY`` (11) takes a ``uint32`` device index and answers
  free then total memory as two ``uint64``. The protocol carries no device
  names: :func:`probe_worker` calls them ``RPC device N``; a worker started
  here takes the names its banner prints (``CPU``, ``Vulkan0`` ...).

What a probe must not do:

* Take a bare TCP connection for an answer: a stopped (SIGSTOPped)
  rpc-server, or one busy with its one client, still accepts connections
  (the kernel's backlog); only the HELLO reply tells.
* Leave with a plain close after a timeout. The HELLO it sent stays queued;
  when the worker gets to it, it answers a client that has gone and dies of
  SIGPIPE. A probe that gives up closes with a reset (``SO_LINGER`` 0),
  which discards what it sent.

Facts about the rpc-server this is built for:

* ``-p 0`` is refused; so :func:`start_worker` picks a free port itself and
  tries another if the child cannot bind it (it then prints ``Failed to
  create server socket`` and exits 0: judged by its output, not its code).
* It cannot listen on an IPv6 address (it splits ``host:port`` at the first
  colon, and says nothing), nor can a coordinator reach one.
* Its banner goes to stdout, which is block-buffered in a pipe: it shows up
  when the first client is accepted (the server flushes then).
* It dies on SIGTERM at once.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import anyio
import anyio.abc
import psutil
from anyio.streams.buffered import BufferedByteReceiveStream

from ..backend import find_backend
from ..errors import (
    BinaryNotFoundError,
    InvalidArgumentError,
    StartupError,
    StartupTimeoutError,
    WorkerUnreachableError,
)
from ..types import Device
from ._process import (
    OutputBuffer,
    _connect_host,
    _cpu_seconds,
    _finalize,
    _read_output,
    _send,
    _spawn_watched,
    _terminate,
    _wait_exited,
)

__all__ = ["RpcWorker", "parse_address", "probe_worker", "start_worker"]

_log = logging.getLogger("llamaproc.process")

#: The protocol major version spoken here; a coordinator refuses a worker of another.
PROTOCOL_MAJOR = 5
_CMD_GET_DEVICE_MEMORY = 11
_CMD_HELLO = 14
_CMD_DEVICE_COUNT = 15
#: The HELLO payload: the client's transport capabilities (all zeros: plain TCP, no upgrade).
_HELLO_REQUEST_SIZE = 24
#: The HELLO reply: major, minor, patch, padding, then the server's 24 capability bytes.
_HELLO_REPLY_SIZE = 28
#: A HELLO reply longer than this is not one (a text protocol's first bytes read as a size).
_MAX_HELLO_REPLY = 256
#: More devices than this in one worker means the reply is not what it seems.
_MAX_DEVICES = 256

#: What rpc-server prints (on stderr) when it cannot bind its port, before exiting 0.
_BIND_FAILED = "Failed to create server socket"
#: What it prints (and flushes, with the banner before it) when it accepts a client.
_ACCEPTED = "Accepted client connection"
#: A device line of its banner: ``  CPU: Intel(R) Xeon(R) Processor (24105 MiB, 24105 MiB free)``.
_DEVICE_LINE = re.compile(r"^  ([^\s:]+): .*\((\d+) MiB, (\d+) MiB free\)\s*$")
#: How many free ports start_worker tries when the one it picked is taken before the child binds it.
_PORT_ATTEMPTS = 5
#: The deadline of one readiness probe during start-up.
_READY_PROBE_TIMEOUT = 2.0
#: How long start_worker waits for the banner once the worker answered (it is flushed before the answer).
_BANNER_WAIT = 1.0
_GRACE = 5.0

_ADDRESS_HELP = "expected host:port or [IPv6]:port, with a port in 1..65535"
_HOST = re.compile(r"[A-Za-z0-9._-]+")
_PORT = re.compile(r"[0-9]{1,5}")


# -- addresses --------------------------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int]:
    """Split a worker address into host and port: ``"10.0.0.2:50052"``, ``"box:50052"``, ``"[::1]:50052"``.

    The host of a bracketed address must be an IPv6 literal (brackets are
    dropped); a bare host is a name or an IPv4 address. Raises
    :class:`InvalidArgumentError` naming the value for anything else (no
    port, a port out of 1..65535, an unbracketed IPv6 address, spaces).
    """
    if not isinstance(address, str):
        raise InvalidArgumentError(f"a worker address is a 'host:port' string, not {address!r}", param="address")
    if address.startswith("["):
        close = address.find("]")
        host, sep, port_text = address[1:close], address[close + 1:close + 2], address[close + 2:]
        try:
            ok = close > 0 and sep == ":" and ipaddress.ip_address(host).version == 6
        except ValueError:
            ok = False
    else:
        host, sep, port_text = address.rpartition(":")
        ok = bool(sep) and _HOST.fullmatch(host) is not None
    if not ok or _PORT.fullmatch(port_text) is None or not 1 <= int(port_text) <= 65535:
        raise InvalidArgumentError(f"invalid worker address {address!r}: {_ADDRESS_HELP}", param="address")
    return host, int(port_text)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the probe --------------------------------------------------------------------------------------


async def probe_worker(address: str, *, timeout: float = 1.0) -> list[Device]:
    """Ask the rpc worker at ``address`` for its devices, in ggml's RPC protocol, within ``timeout`` seconds.

    A real exchange (HELLO, the device count, each device's memory), not a
    bare connect: a stopped worker, or one busy with a coordinator, still
    accepts connections. Returns one :class:`Device` per device the worker
    offers (named ``RPC device N``: the protocol carries no names), memory in
    bytes. Raises :class:`WorkerUnreachableError` naming the address and why:
    refused or unreachable, no answer within the deadline (an rpc-server
    serves one client at a time, so one held by a coordinator does not
    answer), not an rpc-server, or another protocol version. The connection
    is closed however the probe ends; one that gives up is reset, so that
    the worker never answers a probe that has gone (that would kill it).
    """
    host, port = parse_address(address)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
        timeout > 0 and math.isfinite(timeout)
    ):
        raise InvalidArgumentError(f"timeout must be a positive number of seconds, not {timeout!r}", param="timeout")
    stream: anyio.abc.SocketStream | None = None
    answered = False
    try:
        with anyio.fail_after(timeout):
            try:
                stream = await anyio.connect_tcp(host, port)
            except OSError as exc:
                raise WorkerUnreachableError(
                    f"cannot connect to the rpc worker at {address}: {_why(exc)}", address=address
                ) from exc
            devices = await _exchange(stream, address)
            answered = True
            return devices
    except TimeoutError:
        if stream is None:
            message = f"no connection to the rpc worker at {address} within {timeout:g} s (is the host up and reachable?)"
        else:
            message = (
                f"the rpc worker at {address} accepted the connection but did not answer within {timeout:g} s: "
                "it may be busy with another coordinator (an rpc-server serves one client at a time), "
                "stopped, or not an rpc-server"
            )
        raise WorkerUnreachableError(message, address=address) from None
    finally:
        if stream is not None:
            await _close(stream, reset=not answered)


def _why(exc: OSError) -> str:
    """Why a connection failed, in words (anyio wraps the attempts' errors in one OSError)."""
    cause = exc.__cause__
    if isinstance(cause, OSError):
        exc = cause
    elif isinstance(cause, BaseExceptionGroup):
        errors = [e for e in cause.exceptions if isinstance(e, OSError)]
        if errors and all(isinstance(e, ConnectionRefusedError) for e in errors):
            exc = errors[0]
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens on that port)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    return exc.strerror or str(exc) or type(exc).__name__


def _command(cmd: int, payload: bytes = b"") -> bytes:
    return struct.pack("<BQ", cmd, len(payload)) + payload


async def _exchange(stream: anyio.abc.SocketStream, address: str) -> list[Device]:
    """HELLO, DEVICE_COUNT and GET_DEVICE_MEMORY per device; the devices."""
    reader = BufferedByteReceiveStream(stream)
    step = "the RPC hello"
    try:
        await stream.send(_command(_CMD_HELLO, bytes(_HELLO_REQUEST_SIZE)))
        hello = await _reply(reader, address, step, maximum=_MAX_HELLO_REPLY)
        if len(hello) < 3:
            raise _not_rpc(address, f"its hello reply has {len(hello)} bytes")
        major, minor, patch = hello[0], hello[1], hello[2]
        if major != PROTOCOL_MAJOR:
            raise WorkerUnreachableError(
                f"the rpc worker at {address} speaks RPC protocol v{major}.{minor}.{patch}, not v{PROTOCOL_MAJOR}: "
                "run the same llama.cpp build on the workers and the coordinator",
                address=address,
            )
        if len(hello) != _HELLO_REPLY_SIZE:
            raise _not_rpc(address, f"its hello reply has {len(hello)} bytes, not {_HELLO_REPLY_SIZE}")
        step = "the device count"
        await stream.send(_command(_CMD_DEVICE_COUNT))
        (count,) = struct.unpack("<I", await _reply(reader, address, step, exact=4))
        if not 1 <= count <= _MAX_DEVICES:
            raise _not_rpc(address, f"it reports {count} devices")
        devices = []
        for index in range(count):
            step = f"the memory of device {index}"
            await stream.send(_command(_CMD_GET_DEVICE_MEMORY, struct.pack("<I", index)))
            free, total = struct.unpack("<QQ", await _reply(reader, address, step, exact=16))
            devices.append(Device(name=f"RPC device {index}", total=total, free=free))
        return devices
    except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, OSError) as exc:
        detail = "" if step != "the RPC hello" else (
            f": not an rpc-server, or one of another protocol version (this llamaproc speaks v{PROTOCOL_MAJOR})"
        )
        raise WorkerUnreachableError(
            f"the rpc worker at {address} closed the connection instead of answering {step}{detail}",
            address=address,
        ) from exc


async def _reply(reader: BufferedByteReceiveStream, address: str, step: str, *,
                 exact: int | None = None, maximum: int | None = None) -> bytes:
    """One reply: its 8-byte size, checked, then its bytes."""
    header = await reader.receive_exactly(8)
    (size,) = struct.unpack("<Q", header)
    if (exact is not None and size != exact) or (maximum is not None and size > maximum):
        if header[:5] == b"HTTP/":
            raise _not_rpc(address, f"it answered {step} with {header!r}... (an HTTP server)")
        raise _not_rpc(address, f"it answered {step} with a size of {size} bytes ({header!r})")
    return await reader.receive_exactly(size) if size else b""


def _not_rpc(address: str, why: str) -> WorkerUnreachableError:
    return WorkerUnreachableError(f"{address} is not an rpc-server: {why}", address=address)


async def _close(stream: anyio.abc.SocketStream, *, reset: bool) -> None:
    """Close the probe's connection; with a reset (``SO_LINGER`` 0) when it did not end cleanly.

    A reset discards the request still queued at the server, which would
    otherwise answer it later and die of SIGPIPE.
    """
    if reset:
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # Shielded rather than cancelled (aclose_forcefully): closing a socket takes no time, and on asyncio a
    # cancellation leaves the task holding a CancelledError whose traceback keeps the caller's frames alive.
    with anyio.CancelScope(shield=True):
        await stream.aclose()


# -- the worker process -----------------------------------------------------------------------------


class _BindFailedError(Exception):
    """The child could not bind its port (it said so and exited)."""


class RpcWorker:
    """One local rpc worker (``ggml-rpc-server``) child process. Start it with :func:`start_worker`.

    :attr:`address` is where a coordinator reaches it (``host:port``; the
    loopback address when it listens on every address); :attr:`devices` what
    it offered when it started (memory in bytes). End it with :meth:`close`
    (or ``async with``). One dropped without being closed has its process
    group killed when it is collected, with a ``ResourceWarning``; if this
    Python process dies, the kernel kills the worker too.
    """

    def __init__(self, popen: subprocess.Popen[bytes], argv: list[str], *, host: str, port: int,
                 logger: logging.Logger | None) -> None:
        self._popen = popen
        self.argv = argv
        self.pid: int = popen.pid
        self.host = host
        self.port = port
        self.address = _format_address(_connect_host(host), port)
        self.devices: list[Device] = []
        self.output = OutputBuffer()
        self._group_killed = False
        self._closed = False
        self._close_lock = anyio.Lock()
        # Kills the child if this object is dropped without close(); holds the Popen, not this object.
        self._finalizer = weakref.finalize(
            self, _finalize, popen, what="unclosed RpcWorker", advice="call close() when done with it"
        )
        try:
            stdout = popen.stdout
            assert stdout is not None
            self._reader = threading.Thread(
                target=_read_output, args=(stdout, self.output, logger, self.pid),
                name=f"llamaproc-output-{self.pid}", daemon=True,
            )
            self._reader.start()
        except BaseException:
            self._finalizer.detach()  # the caller kills the child
            raise

    # -- state ----------------------------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has exited (negative: killed by that signal).

        The first call that sees the exit also kills what is left of its
        process group (once: later the group id may name someone else's).
        """
        code = self._popen.poll()
        if code is not None and not self._group_killed:
            self._group_killed = True
            _send(self._popen, signal.SIGKILL)
        return code

    def _poll(self) -> int | None:
        return self.returncode

    def cpu_seconds(self) -> float | None:
        """The worker's CPU time so far (user + system), ``None`` once it is gone."""
        if self.returncode is not None:
            return None
        return _cpu_seconds(self.pid)

    def __repr__(self) -> str:
        code = self.returncode
        state = "running" if code is None else f"exited {code}"
        return f"<RpcWorker {self.address} pid={self.pid} {state} devices={[d.name for d in self.devices]}>"

    # -- start-up ---------------------------------------------------------------------------------

    def _listening(self) -> bool | None:
        """Whether the child listens on its port (``None``: the kernel would not say)."""
        try:
            conns = psutil.Process(self.pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            return False
        except (psutil.Error, OSError):
            return None
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port for c in conns)

    async def _wait_ready(self, deadline: float, timeout: float) -> None:
        """Wait until the child listens on its port and answers a probe, or fails; fills :attr:`devices`.

        Raises ``_BindFailedError`` when it could not bind the port, StartupError
        when it exited otherwise, StartupTimeoutError at ``deadline``. The
        probe waits for the child's own socket (when the kernel tells), so
        that another server on the same port is never taken for it.
        """
        delay = 0.005
        seen_listening = False
        last: WorkerUnreachableError | None = None
        while True:
            code = self.returncode
            if code is not None:
                # Collect the last lines it printed, without blocking the event loop.
                await anyio.to_thread.run_sync(self._reader.join, 1.0, abandon_on_cancel=True)
                if any(_BIND_FAILED in line for line in self.output.relevant()):
                    raise _BindFailedError
                first = next(iter(self.output.relevant()), "")
                raise StartupError(
                    f"rpc-server exited with code {code} during start-up" + (f": {first.strip()}" if first else ""),
                    returncode=code, output=self.output.summary(), pid=self.pid,
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why = f": {last}" if last is not None else "" if seen_listening else " (it never listened on its port)"
                raise StartupTimeoutError(
                    f"rpc-server at {self.address} was not ready within {timeout:g} s{why}",
                    returncode=None, output=self.output.summary(), pid=self.pid,
                )
            listening = self._listening()
            if listening is not False:
                seen_listening = True
                try:
                    self.devices = await probe_worker(self.address, timeout=min(remaining, _READY_PROBE_TIMEOUT))
                except WorkerUnreachableError as exc:
                    last = exc
                else:
                    await self._name_devices(deadline)
                    return
            await anyio.sleep(min(delay, max(remaining, 0.0)))
            delay = min(delay * 2, 0.05)

    async def _name_devices(self, deadline: float) -> None:
        """Name :attr:`devices` after the banner's ``Devices:`` lines (flushed when our probe was accepted)."""
        until = min(deadline, time.monotonic() + _BANNER_WAIT)
        while not any(line.startswith(_ACCEPTED) for line in self.output.lines()):
            if time.monotonic() >= until or not self._reader.is_alive():
                return
            await anyio.sleep(0.01)
        names = [m.group(1) for line in self.output.lines() if (m := _DEVICE_LINE.match(line))]
        if len(names) == len(self.devices):
            self.devices = [Device(name=name, total=d.total, free=d.free) for name, d in zip(names, self.devices, strict=True)]

    # -- stopping ---------------------------------------------------------------------------------

    async def wait(self) -> int:
        """Return the exit status once the worker has exited (and been reaped); does not stop it. Cancellable."""
        return await _wait_exited(self.pid, self._poll)

    def kill(self) -> None:
        """SIGKILL the worker's process group at once, without waiting (:meth:`close` then reaps it)."""
        if self.returncode is None:
            _send(self._popen, signal.SIGKILL)

    async def close(self, *, grace: float = _GRACE) -> int | None:
        """Stop the worker: SIGTERM to its process group, SIGKILL after ``grace`` seconds.

        Shielded from cancellation; idempotent (a repeated call returns at
        once); returns the exit status.
        """
        if self._closed:
            return self._popen.returncode
        with anyio.CancelScope(shield=True):
            async with self._close_lock:
                if self._closed:
                    return self._popen.returncode
                await _terminate(self._popen, self._poll, what="rpc-server", grace=grace)
                self._closed = True
                self._finalizer.detach()
                # The pipe closes with the child; a grandchild holding it open must not hang us.
                await anyio.to_thread.run_sync(self._reader.join, 2.0, abandon_on_cancel=True)
        return self._popen.returncode

    async def __aenter__(self) -> RpcWorker:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


def _find_rpc_server(binary: str | os.PathLike[str] | None) -> tuple[Path, dict[str, str]]:
    """The rpc-server to run and the environment it needs.

    ``binary`` names either an rpc-server itself (a file whose name contains
    ``rpc-server``) or a llama-server with one beside it; ``None`` finds
    llama-server as :func:`find_backend` does and takes the rpc-server beside it.
    """
    backend = find_backend(binary)
    if "rpc-server" in backend.binary.name:
        return backend.binary, backend.env
    rpc = backend.rpc_server
    if rpc is None:
        raise BinaryNotFoundError(
            f"no ggml-rpc-server beside {backend.binary}: pass binary= the path of an rpc-server "
            "(or of a llama-server that has one beside it)",
            searched=[str(backend.binary.parent)],
        )
    return rpc, backend.env


def _free_port(host: str) -> int:
    """A port free on ``host`` now (the kernel's pick; rpc-server refuses ``-p 0``)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return int(sock.getsockname()[1])
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}: {exc.strerror or exc}", returncode=None, output="") from exc


def _default_threads() -> int:
    """The CPU device's threads when none are given: one per physical core, as llama-server does.

    (rpc-server's own default is a single thread.)
    """
    return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def _check_start_options(host: str, port: int | None, threads: int | None, startup_timeout: float) -> None:
    if not isinstance(host, str) or _HOST.fullmatch(host) is None:
        why = (
            "rpc-server cannot listen on an IPv6 address"
            if isinstance(host, str) and ":" in host else "expected a host name or an IPv4 address"
        )
        raise InvalidArgumentError(f"invalid host {host!r}: {why}", param="host")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
        raise InvalidArgumentError(f"port must be in 1..65535 (or None for a free one), not {port!r}", param="port")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidArgumentError(f"threads must be a positive integer, not {threads!r}", param="threads")
    if isinstance(startup_timeout, bool) or not isinstance(startup_timeout, (int, float)) or not (
        startup_timeout > 0 and math.isfinite(startup_timeout)
    ):
        raise InvalidArgumentError(
            f"startup_timeout must be a positive number of seconds, not {startup_timeout!r}", param="startup_timeout"
        )


async def _spawn(argv: list[str], *, host: str, port: int, env: Mapping[str, str],
                 logger: logging.Logger | None) -> RpcWorker:
    """Start the child the way ServerProcess does: own process group, parent-death signal, output thread."""
    return await _spawn_watched(
        argv, env=env, cwd=None, watch=lambda popen: RpcWorker(popen, argv, host=host, port=port, logger=logger)
    )


async def start_worker(
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    threads: int | None = None,
    binary: str | os.PathLike[str] | None = None,
    startup_timeout: float = 10.0,
    env: Mapping[str, str] | None = None,
    logger: logging.Logger | None = None,
) -> RpcWorker:
    """Start a local rpc worker and return it once it listens and answers the RPC hello.

    ``host`` is the IPv4 address (or name) to listen on: the default serves
    this machine only; rpc-server has no authentication, so listen on a
    network only where that network is trusted. ``port`` ``None`` picks a
    free port (and another, a few times, if it is taken before the worker
    binds it); a given port that cannot be bound raises :class:`StartupError`
    naming it. ``threads`` is the CPU device's thread count (default: one per
    physical core, as llama-server uses; rpc-server's own default is 1). ``binary`` is an rpc-server, or a llama-server with one
    beside it; ``None`` takes the one beside :func:`find_backend`'s
    llama-server. ``env`` is added to this process's environment and the
    backend's (``GGML_NO_BACKTRACE=1`` is set too, so that a crash ends at
    once). The worker's output goes to :attr:`RpcWorker.output` and, if
    given, ``logger``.

    ``startup_timeout`` bounds the whole start. Raises
    :class:`BinaryNotFoundError`, :class:`StartupError` (with the child's exit
    status and output) or :class:`StartupTimeoutError`; the child is stopped
    before any error, cancellation included, reaches the caller.
    """
    _check_start_options(host, port, threads, startup_timeout)
    rpc, backend_env = _find_rpc_server(binary)
    child_env = {**os.environ, **backend_env, "GGML_NO_BACKTRACE": "1", **(env or {})}
    deadline = time.monotonic() + startup_timeout
    attempts = 1 if port is not None else _PORT_ATTEMPTS
    tried: list[int] = []
    for _ in range(attempts):
        chosen = port if port is not None else _free_port(host)
        tried.append(chosen)
        argv = [os.fspath(rpc), "-H", host, "-p", str(chosen), "-t", str(threads or _default_threads())]
        worker = await _spawn(argv, host=host, port=chosen, env=child_env, logger=logger)
        try:
            await worker._wait_ready(deadline, startup_timeout)
        except _BindFailedError:
            await worker.close()
            if port is not None:
                raise StartupError(
                    f"rpc-server could not listen on {_format_address(host, chosen)}: the port is in use "
                    f"(or {host} is not an address of this machine)",
                    returncode=worker.returncode, output=worker.output.summary(), pid=worker.pid,
                ) from None
            _log.debug("rpc-server could not bind port %d (taken meanwhile); trying another", chosen)
            continue
        except BaseException:
            await worker.close()
            raise
        return worker
    raise StartupError(
        f"rpc-server could not listen on {host} on any of the free ports tried ({', '.join(map(str, tried))})",
        returncode=None, output="",
    )
