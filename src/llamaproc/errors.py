"""The errors llamaproc raises. Every one derives from :class:`LlamaprocError`.

::

    LlamaprocError
    ├── ServerError                  the HTTP side: llama-server answered badly or not at all
    │   ├── TransportError           connect/read/write failures and timeouts (httpx's, translated)
    │   ├── StatusError              a non-2xx answer; .status_code, .body, .message
    │   │   └── ServerLoadingError   503 "Loading model"
    │   ├── StreamError              an error event in the middle of a stream; .body
    │   ├── IncompleteStreamError    a stream that ended without its final event
    │   └── StalledError             nothing came for stall_timeout seconds and the server made no progress
    ├── ProcessError                 the child process
    │   ├── BinaryNotFoundError      no llama-server binary; .searched lists where we looked
    │   ├── StartupError             the child exited during start-up; .returncode, .output
    │   │   └── StartupTimeoutError  no progress and no readiness within the timeout
    │   └── ServerCrashedError       the child died while in use; .returncode, .output
    │       └── ServerHungError      it stopped answering and was killed; .reason
    ├── ModelFileError               a GGUF file that cannot be read
    ├── ConfigError                  a bad serve config file (also ValueError); .path, .problems
    ├── AlreadyRunningError          another daemon holds the pid lock; .pid
    ├── ListenError (also OSError)   the daemon cannot listen on an address or socket path; .where
    ├── LedgerError                  the memory ledger: its store is unreachable or corrupt
    │   ├── LeaseTimeoutError        no memory within the timeout; .memory, .free, .capacity, .device
    │   ├── LeaseLostError           a lease expired or was removed while held (renewal failed)
    │   └── InsufficientMemoryError  fit=True found no configuration that fits; .memory, .free, .device
    ├── PoolError                    the model pool of the daemon
    │   ├── ModelNotFoundError       no model of that name in the config
    │   ├── ModelUnavailableError    the model is Failed (too many restarts) or cannot be loaded
    │   ├── QueueFullError           admission refused: slots and queue full; .retry_after
    │   ├── RolloutError             a rolling update was rolled back (a new replica did not serve)
    │   └── ShuttingDownError        the pool is draining and takes no new requests
    ├── DaemonError                  talking to a running `llamaproc serve` over its socket
    │   ├── DaemonNotRunningError    no daemon answers
    │   └── DaemonRequestError       the daemon answered with an error event; .code, .message
    └── UsageError (also RuntimeError)
        ├── ClosedError              the object was used after close()
        └── InvalidArgumentError     a bad argument (also ValueError): wrong type or value; .param
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "AlreadyRunningError",
    "BinaryNotFoundError",
    "ClosedError",
    "ConfigError",
    "DaemonError",
    "DaemonNotRunningError",
    "DaemonRequestError",
    "IncompleteStreamError",
    "InvalidArgumentError",
    "LeaseLostError",
    "InsufficientMemoryError",
    "LeaseTimeoutError",
    "LedgerError",
    "ListenError",
    "LlamaprocError",
    "ModelFileError",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "PoolError",
    "ProcessError",
    "QueueFullError",
    "RolloutError",
    "ServerCrashedError",
    "ServerError",
    "ServerHungError",
    "ServerLoadingError",
    "ShuttingDownError",
    "StalledError",
    "StartupError",
    "StartupTimeoutError",
    "StatusError",
    "StreamError",
    "TransportError",
    "UsageError",
    "WorkerBusyError",
    "WorkerError",
    "WorkerUnreachableError",
    "WorkersLostError",
]


class LlamaprocError(Exception):
    """Root of every error raised by llamaproc.

    Every error pickles and copies with its attributes (``status_code``,
    ``returncode``, ``output`` ...), whatever its constructor takes: it is
    rebuilt from its message arguments and attributes, not by calling
    ``__init__`` again.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__.copy()))


# --- server / HTTP -------------------------------------------------------------------------------


class ServerError(LlamaprocError):
    """llama-server answered with an error, or did not answer."""


class TransportError(ServerError):
    """The HTTP request failed below the protocol: connect refused, reset, timed out."""


class StatusError(ServerError):
    """llama-server answered with a non-2xx status.

    ``message`` is the server's own error message when the body has one.
    """

    def __init__(self, status_code: int, body: Any, *, url: str = "") -> None:
        self.status_code = status_code
        self.body = body
        self.url = url
        self.message = _error_message(body)
        where = f" from {url}" if url else ""
        super().__init__(f"HTTP {status_code}{where}: {self.message}")


class ServerLoadingError(StatusError):
    """503 while llama-server is still loading its model."""


class StreamError(ServerError):
    """llama-server sent an error event in the middle of a stream."""

    def __init__(self, body: Any) -> None:
        self.body = body
        self.message = _error_message(body)
        super().__init__(f"error event in stream: {self.message}")


class IncompleteStreamError(ServerError):
    """The stream ended (or the connection dropped) before its final event."""


class StalledError(ServerError):
    """A running request received nothing for ``stall_timeout`` seconds while its server made no progress."""


# --- process -------------------------------------------------------------------------------------


class ProcessError(LlamaprocError):
    """The llama-server child process could not be started or died."""


class BinaryNotFoundError(ProcessError):
    """No llama-server binary was found. ``searched`` lists where we looked."""

    def __init__(self, message: str, *, searched: Sequence[str] = ()) -> None:
        self.searched = list(searched)
        lines = [message] + [f"  looked in: {s}" for s in self.searched]
        super().__init__("\n".join(lines))


class _ExitedError(ProcessError):
    def __init__(self, message: str, *, returncode: int | None, output: str, pid: int | None = None) -> None:
        self.returncode = returncode
        self.output = output
        self.pid = pid
        text = message
        if output:
            text += "\n--- llama-server output ---\n" + output
        super().__init__(text)


class StartupError(_ExitedError):
    """The child exited, or could not be made ready, during start-up.

    ``returncode`` is its exit status (negative for a signal, ``None`` if it was
    still running and had to be stopped) and ``output`` the relevant lines of
    its output.
    """


class StartupTimeoutError(StartupError):
    """llama-server made no progress and did not become healthy within the timeout."""


class ServerCrashedError(_ExitedError):
    """The llama-server child died while it was serving."""


class ServerHungError(ServerCrashedError):
    """The llama-server child stopped answering (failed health checks, a stalled request) and was killed.

    ``reason`` says what was seen; ``returncode`` is the SIGKILL's.
    """

    def __init__(self, message: str, *, reason: str, returncode: int | None, output: str, pid: int | None = None) -> None:
        self.reason = reason
        super().__init__(message, returncode=returncode, output=output, pid=pid)


# --- rpc workers ---------------------------------------------------------------------------------


class WorkerError(LlamaprocError):
    """An rpc worker (``ggml-rpc-server``) could not be started, reached or used. ``address`` is its ``host:port``."""

    def __init__(self, message: str, *, address: str | None = None) -> None:
        self.address = address
        super().__init__(message)


class WorkerUnreachableError(WorkerError):
    """Nothing answered as an rpc worker at ``address`` within the deadline (refused, silent, or not an rpc-server)."""


class WorkerBusyError(WorkerError):
    """The worker already serves another model: an rpc-server serves one coordinator at a time."""


class WorkersLostError(WorkerError):
    """A sharded model lost workers and has fewer than ``min_workers`` left. ``lost`` names the lost addresses."""

    def __init__(self, message: str, *, lost: Sequence[str] = (), address: str | None = None) -> None:
        self.lost = list(lost)
        super().__init__(message, address=address)


# --- files and misuse ----------------------------------------------------------------------------


class ModelFileError(LlamaprocError):
    """A model file is missing or is not a readable GGUF file."""


class ConfigError(LlamaprocError, ValueError):
    """A bad serve config file or value; the message names the file and the key.

    ``path`` is the config file (``None`` for a lone value) and ``problems``
    holds one line per problem; the message is those lines joined.
    """

    def __init__(
        self, message: str, *, path: str | os.PathLike[str] | None = None, problems: tuple[str, ...] = ()
    ) -> None:
        self.path = None if path is None else Path(path)
        self.problems = problems or (message,)
        super().__init__(message)


class AlreadyRunningError(LlamaprocError):
    """Another live process holds the pid lock. ``pid`` is its pid when known."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        who = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"already running: {who} holds the lock on {path}")


class ListenError(LlamaprocError, OSError):
    """The daemon cannot listen where it was told to (a TCP address or a Unix socket path)."""

    def __init__(self, where: str, cause: OSError | str) -> None:
        errno_ = cause.errno if isinstance(cause, OSError) else None
        OSError.__init__(self, errno_, str(cause))
        self.where = where
        self.reason = str(cause)

    def __str__(self) -> str:
        return f"cannot listen on {self.where}: {self.reason}"


class LedgerError(LlamaprocError):
    """The memory ledger failed: its store cannot be reached, or holds something it should not."""


class LeaseTimeoutError(LedgerError):
    """No lease of ``memory`` bytes on ``device`` within the timeout.

    ``free`` and ``capacity`` are the device's free memory and capacity in
    bytes when the waiter gave up.
    """

    def __init__(self, message: str, *, memory: int, free: int, capacity: int, device: str) -> None:
        self.memory = memory
        self.free = free
        self.capacity = capacity
        self.device = device
        super().__init__(message)


class LeaseLostError(LedgerError):
    """A lease is no longer held: it expired (renewal failed for longer than its TTL) or was removed."""


class InsufficientMemoryError(LedgerError):
    """``load_model(fit=True)`` found no configuration whose estimate fits the free memory on the device."""

    def __init__(self, message: str, *, memory: int, free: int, device: str) -> None:
        super().__init__(message)
        self.memory = memory  #: bytes the smallest configuration needs
        self.free = free  #: bytes free on the device when it was checked
        self.device = device


class PoolError(LlamaprocError):
    """The model pool could not serve a request."""


class RolloutError(PoolError):
    """A rolling update was given up and rolled back: a new replica did not serve in time, or found no memory."""


class ModelNotFoundError(PoolError):
    """No model of that name is configured."""


class ModelUnavailableError(PoolError):
    """The model cannot serve now (Failed after too many restarts, or its load failed)."""


class QueueFullError(PoolError):
    """Every slot is busy and the model's queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class ShuttingDownError(PoolError):
    """The pool is shutting down and takes no new requests."""


class DaemonError(LlamaprocError):
    """Talking to the daemon over its socket failed."""


class DaemonNotRunningError(DaemonError):
    """No daemon answers on the socket."""


class DaemonRequestError(DaemonError):
    """The daemon answered a request with an error event; ``code`` and ``message`` are its fields."""

    def __init__(self, event: Mapping[str, Any]) -> None:
        self.event = dict(event)
        self.code: str = str(event.get("code", "error"))
        self.message: str = str(event.get("message", ""))
        self.retry_after: float | None = event.get("retry_after")
        super().__init__(f"{self.code}: {self.message}")


class UsageError(LlamaprocError, RuntimeError):
    """The API was used in a way it does not support."""


class ClosedError(UsageError):
    """The model, client or process was used after it was closed."""


class InvalidArgumentError(UsageError, ValueError):
    """An argument of the wrong type or out of range (``parallel=0``, ``prompt=None`` ...).

    ``param`` names the argument (or request field) when there is one.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


def _rebuild(cls: type[LlamaprocError], args: tuple[Any, ...], state: dict[str, Any]) -> LlamaprocError:
    """Unpickle an error without calling its ``__init__`` (whose parameters differ from ``args``)."""
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


def _error_message(body: Any) -> str:
    """Pull the human message out of llama-server's / OpenAI's error shapes."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = err.get("message")
            if isinstance(msg, str):
                return msg
        elif isinstance(err, str):
            return err
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    text = str(body).strip()
    return text[:500] if text else "(empty body)"
