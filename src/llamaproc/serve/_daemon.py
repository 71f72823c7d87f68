"""``llamaproc serve``: the daemon that keeps models loaded and serves them over HTTP and a Unix socket.

:func:`run_daemon` runs everything in one anyio task group on asyncio: the
model pool, a uvicorn server with the OpenAI-compatible app (uvicorn's own
signal handling disabled) and the socket server. It holds a pid lock in the
state directory and writes ``serve.json`` (pid, HTTP URL, socket path) once it
listens, for clients to find it.

On SIGTERM or SIGINT it stops admitting requests (new ones get 503), waits up
to ``drain_timeout`` for the requests in flight to finish, stops the HTTP and
socket servers, then the llama-server children, removes its files and returns.
A second signal during the drain stops waiting. When requests are still in
flight at the deadline the models are stopped first: requests still waiting
get a ``shutting_down`` error (503) and streams end with an error event, so
that the HTTP and socket servers can then close without cutting anything
mid-answer.

Paths given relative (``--state-dir``, ``--socket``) are made absolute:
``serve.json`` must be usable by clients started from any directory.

Every HTTP request passes the checks of :mod:`._security` (``Host``,
``Origin``, API key) and the deadlines and connection limit of
:mod:`._limits`; the config's ``api_keys`` are joined by those of the
``LLAMAPROC_API_KEYS`` environment variable (comma-separated). Listening on a
non-loopback address without any key logs a warning. The Unix socket needs no
key: it is the owner's alone (mode 0600).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import uvicorn
from pydantic import SecretStr

from ..errors import (
    AlreadyRunningError,
    ConfigError,
    ListenError,
    LlamaprocError,
    PoolError,
    QueueFullError,
    ShuttingDownError,
)
from ..ledger import Ledger, open_ledger
from ..process import probe_worker
from ..runtime import Change, PidLock, ServeConfig, load_config, load_spec_data, parse_api_keys, redacted
from ._app import create_app
from ._events import EventFeed
from ._limits import ConnectionLimits, ensure_file_limit, limited_protocol
from ._metrics import ServeMetrics
from ._proxy import DEFAULT_MAX_BODY, stall_timeout_of
from ._security import HttpSecurity
from ._shards import ShardKeeper
from ._upstream import Upstream
from ._workers import JobLog, WorkerEntry, WorkerRegistry

if TYPE_CHECKING:
    from ..runtime import ModelPool
    from ._socket import ActiveRequests
    from ._socket import Applier as Applier_

__all__ = ["DaemonInfo", "cmd_serve", "default_state_dir", "run_daemon"]

_log = logging.getLogger("llamaproc.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8484
PID_FILE = "serve.pid"
INFO_FILE = "serve.json"
SOCKET_FILE = "serve.sock"
#: How long the HTTP server waits for open connections once the pool has drained (or been closed).
HTTP_SHUTDOWN_TIMEOUT = 5
#: How long the socket server gets to write the last events of its requests before it closes.
SOCKET_SHUTDOWN_TIMEOUT = 2.0
#: How long a registering rpc worker has to answer the daemon's probe (a real RPC exchange).
REGISTER_PROBE_TIMEOUT = 2.0
#: The environment variable whose comma-separated API keys are added to the config's.
API_KEYS_ENV = "LLAMAPROC_API_KEYS"


@dataclass(frozen=True)
class DaemonInfo:
    """Where a running daemon can be reached (the content of ``serve.json``)."""

    pid: int
    http: str
    socket: str | None
    state_dir: Path
    drain_timeout: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "http": self.http, "socket": self.socket, "drain_timeout": self.drain_timeout}


def default_state_dir() -> Path:
    """``$LLAMAPROC_STATE_DIR``, else ``~/.llamaproc``."""
    given = os.environ.get("LLAMAPROC_STATE_DIR")
    return _absolute(given) if given else Path.home() / ".llamaproc"


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the daemon handles SIGTERM/SIGINT itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (bound here, so that errors and the real port are known at once).

    Raises :class:`ListenError` naming ``HOST:PORT``.
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, type_, proto, _, address = infos[0]
        sock = socket.socket(family, type_, proto)
    except OSError as exc:
        raise ListenError(where, exc) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenError(where, exc) from exc
    except BaseException:
        sock.close()
        raise
    return sock


def _is_loopback(sock: socket.socket) -> bool:
    """Whether ``sock`` listens on a loopback address (not a wildcard or a network interface's)."""
    try:
        return ipaddress.ip_address(sock.getsockname()[0]).is_loopback
    except ValueError:  # pragma: no cover - a TCP socket always has an IP address
        return False


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _write_info(path: Path, info: DaemonInfo) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(info.to_json(), f)
        f.write("\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _removing(path: Path) -> Iterator[None]:
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


async def run_daemon(
    config: ServeConfig,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    socket_path: str | os.PathLike[str] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    ready: Callable[[DaemonInfo], None] | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    config_path: str | os.PathLike[str] | None = None,
    watch: bool = False,
    extra_keys: tuple[SecretStr, ...] = (),
) -> None:
    """Serve ``config``'s models until SIGTERM or SIGINT, then shut down gracefully.

    ``config_path`` is the file ``config`` was read from: SIGHUP reads and
    applies it again (as ``llamaproc apply FILE`` would), and so does a change
    of the file when ``watch`` is set. ``extra_keys`` (the
    ``LLAMAPROC_API_KEYS`` ones) join the keys of every config applied.

    ``socket_path`` defaults to ``STATE_DIR/serve.sock`` and ``state_dir`` to
    ``~/.llamaproc``; both are made absolute. ``ready`` is called with the
    :class:`DaemonInfo` once both servers listen (and ``serve.json`` is
    written). Raises :class:`AlreadyRunningError` if another daemon holds the
    state dir's pid lock and :class:`~llamaproc.ListenError` (also an :class:`OSError`) if the
    port or the socket cannot be bound. Must run on the asyncio backend
    (uvicorn).
    """
    from ..runtime import ModelPool
    from ._socket import ActiveRequests

    directory = _absolute(state_dir) if state_dir is not None else default_state_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    sock_path = _absolute(socket_path) if socket_path is not None else directory / SOCKET_FILE
    if not sock_path.parent.is_dir():
        raise ListenError(f"socket {sock_path}", f"the directory {sock_path.parent} does not exist")
    with contextlib.ExitStack() as stack:
        signals = stack.enter_context(anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
        stack.enter_context(PidLock(directory / PID_FILE))
        listener = stack.enter_context(_bind(host, port))
        url = _url(listener)
        loopback = _is_loopback(listener)
        security = HttpSecurity.from_config(config, loopback=loopback)
        if not loopback and not security.requires_key:
            _log.warning(
                "llamaproc serve: listening on %s, not a loopback address, without any API key: anyone who can"
                " reach it can use, load and unload the models. Set api_keys in the config (or %s).",
                url,
                API_KEYS_ENV,
            )
        limits = ConnectionLimits(
            header_timeout=config.header_timeout,
            body_timeout=config.body_timeout,
            max_connections=config.max_connections,
        )
        ensure_file_limit(limits.max_connections)
        metrics = ServeMetrics()
        workers = WorkerRegistry()
        workers.probe = functools.partial(probe_worker, timeout=REGISTER_PROBE_TIMEOUT)
        jobs = JobLog()
        metrics.attach_workers(workers)
        events = EventFeed()
        shards = ShardKeeper(workers, metrics, events)
        socket_requests = ActiveRequests()

        def model_changed(name: str, event: str) -> None:
            shards.changed(name, event)
            events.publish("model", {"model": name, "event": event})

        def worker_changed(entry: WorkerEntry, change: str) -> None:
            if events.subscribers:
                events.publish("worker", {"change": change, **workers.describe(entry)})

        workers.on_change = worker_changed
        async with (
            Upstream() as client,
            _open_ledger(config) as ledger,
            ModelPool(
                config, registered_workers=shards.registered_workers, on_change=model_changed, ledger=ledger
            ) as pool,
        ):
            shards.pool = pool
            metrics.attach(pool)
            app = create_app(
                pool,
                client=client,
                metrics=metrics,
                max_body=max_body,
                security=security,
                workers=workers,
                jobs=jobs,
                ledger=ledger,
                events=events,
            )
            server = _Server(
                uvicorn.Config(
                    app,
                    http=limited_protocol(limits),
                    # No WebSocket routes: no upgrade to a protocol that would skip the limits.
                    ws="none",
                    lifespan="off",
                    log_config=None,
                    log_level="warning",
                    access_log=False,
                    # Loopback by default, not behind a proxy: no X-Forwarded-* rewriting per request.
                    proxy_headers=False,
                    timeout_graceful_shutdown=HTTP_SHUTDOWN_TIMEOUT,
                )
            )
            async with anyio.create_task_group() as tg:
                sweeper_scope = anyio.CancelScope()
                tg.start_soon(_run_in, sweeper_scope, client.run_sweeper)
                shards_scope = anyio.CancelScope()
                tg.start_soon(_run_in, shards_scope, shards.run)
                socket_scope = anyio.CancelScope()
                applier = Applier(pool, tg, extra_keys=extra_keys, path=config_path)
                socket_url = await _start_socket(
                    tg, socket_scope, pool, sock_path, metrics, socket_requests, client, jobs, events,
                    applier.apply_documents,
                )  # fmt: skip
                watch_scope = anyio.CancelScope()
                if watch and config_path is not None:
                    tg.start_soon(_run_in, watch_scope, applier.watch)
                served = anyio.Event()

                async def serve_http() -> None:
                    try:
                        await server.serve([listener])
                    finally:
                        served.set()

                tg.start_soon(serve_http)
                while not server.started:
                    if served.is_set():
                        raise ListenError(url, "the HTTP server stopped during start-up")
                    await anyio.sleep(0.005)
                info = DaemonInfo(
                    pid=os.getpid(),
                    http=url,
                    socket=socket_url,
                    state_dir=directory,
                    drain_timeout=config.drain_timeout,
                )
                loop = type(asyncio.get_running_loop()).__module__.split(".")[0]  # "uvloop" or "asyncio"
                _log.info("llamaproc serve: listening on %s (%s event loop)", url, loop)
                _log.info("llamaproc serve: socket %s", socket_url)
                stack.enter_context(_removing(directory / INFO_FILE))
                _write_info(directory / INFO_FILE, info)
                if ready is not None:
                    ready(info)

                async for signum in signals:
                    if signum == signal.SIGHUP:
                        applier.reload_soon("SIGHUP")
                        continue
                    _log.info("llamaproc serve: %s received, draining", signal.Signals(signum).name)
                    break
                watch_scope.cancel()
                if not await _drain(pool, pool.config.drain_timeout, signals):
                    # Stop the models now, while the servers still run: what waits gets a
                    # shutting_down error and what streams ends with an error event.
                    _log.info("llamaproc serve: stopping models and the requests still using them")
                    await pool.close()
                with anyio.move_on_after(SOCKET_SHUTDOWN_TIMEOUT):
                    await socket_requests.wait_idle()
                events.close()  # the /api/events subscriptions end, so that the HTTP server need not wait on them
                server.should_exit = True
                socket_scope.cancel()
                sweeper_scope.cancel()
                shards_scope.cancel()
            if not pool.closed:
                _log.info("llamaproc serve: stopping models")
        _log.info("llamaproc serve: stopped")


@contextlib.asynccontextmanager
async def _open_ledger(config: ServeConfig) -> AsyncIterator[Ledger | None]:
    """The config's memory ledger, open for the daemon's life (``None`` without one)."""
    if config.ledger is None:
        yield None
        return
    capacity = dict(config.ledger_capacity) if config.ledger_capacity is not None else None
    async with await open_ledger(config.ledger, capacity=capacity) as ledger:
        _log.info("llamaproc serve: memory ledger %s", redacted(config.ledger))
        yield ledger


class Applier:
    """Applies new configs to the daemon's pool: from ``llamaproc apply`` (the socket), SIGHUP, or a watched file.

    An apply runs in the daemon's task group, not in the task of whoever asked
    for it: a client that goes away does not cut a rolling update short. The
    pool runs one apply at a time; the others wait their turn.
    """

    #: How often a watched config file is looked at (seconds).
    WATCH_INTERVAL = 1.0
    #: Applies that may wait for their turn at once; more are refused.
    MAX_PENDING = 8

    def __init__(
        self, pool: ModelPool, tg: anyio.abc.TaskGroup, *, extra_keys: tuple[SecretStr, ...],
        path: str | os.PathLike[str] | None,
    ) -> None:  # fmt: skip
        self.pool = pool
        self.tg = tg
        self.extra_keys = extra_keys
        self.path = path
        self.pending = 0

    async def apply(self, config: ServeConfig, dry_run: bool) -> list[Change]:
        if self.extra_keys:
            config = config.model_copy(update={"api_keys": config.api_keys + self.extra_keys})
        if dry_run:
            return await self.pool.apply(config, dry_run=True)
        if self.pending >= self.MAX_PENDING:
            raise QueueFullError(f"{self.pending} configs are being applied or wait their turn; try again later",
                                 retry_after=5.0)  # fmt: skip
        done = anyio.Event()
        outcome: list[Any] = []

        async def run() -> None:
            try:
                outcome.append(await self.pool.apply(config))
            except LlamaprocError as exc:
                outcome.append(exc)
            except Exception as exc:  # noqa: BLE001 - a bug must fail this apply, not the daemon
                _log.exception("llamaproc serve: applying a config failed")
                outcome.append(PoolError(f"applying the config failed: {type(exc).__name__}: {exc}"))
            finally:
                self.pending -= 1
                done.set()

        self.pending += 1
        self.tg.start_soon(run, name="llamaproc-apply")
        await done.wait()
        if not outcome:
            raise ShuttingDownError("the daemon stopped before the config was applied")
        if isinstance(outcome[0], LlamaprocError):
            raise outcome[0]
        changes: list[Change] = outcome[0]
        for change in changes:
            _log.info("llamaproc serve: applied: %s", _describe_change(change))
        return changes

    async def apply_documents(self, documents: Any, dry_run: bool) -> list[dict[str, Any]]:
        """The socket's ``apply``: spec documents (paths absolute, as ``llamaproc apply`` sends them)."""
        config = await anyio.to_thread.run_sync(lambda: load_spec_data({"documents": documents}, path="<apply>",
                                                                       yaml=False))  # fmt: skip
        return [change.to_json() for change in await self.apply(config, dry_run)]

    def reload_soon(self, why: str) -> None:
        """Read the config file again and apply it, in the background (SIGHUP)."""
        self.tg.start_soon(self.reload, why, name="llamaproc-reload")

    async def reload(self, why: str) -> None:
        if self.path is None:
            _log.warning("llamaproc serve: %s: no config file to read again", why)
            return
        _log.info("llamaproc serve: %s: reading %s again", why, self.path)
        try:
            config = await anyio.to_thread.run_sync(load_config, self.path)
            changes = await self.apply(config, False)
        except LlamaprocError as exc:
            _log.error("llamaproc serve: %s: the config was not applied: %s", why, exc)
            return
        if not changes:
            _log.info("llamaproc serve: %s: nothing changed", why)

    async def watch(self) -> None:
        """Apply the config file whenever it changes (its size, time or inode), until cancelled."""
        assert self.path is not None
        seen = _stamp(self.path)
        while True:
            await anyio.sleep(self.WATCH_INTERVAL)
            now = _stamp(self.path)
            if now != seen and now is not None:
                seen = now
                await self.reload("the config file changed")


def _stamp(path: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _describe_change(change: Change) -> str:
    what = change.model if change.model is not None else "daemon"
    return f"{what}: {change.action}: {change.detail}"


def _absolute(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


async def _run_in(scope: anyio.CancelScope, func: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await func()


async def _drain(pool: ModelPool, timeout: float, signals: AsyncIterator[int]) -> bool:
    """Wait for in-flight requests (up to ``timeout``); a second signal stops waiting. True if drained."""
    drained = False
    async with anyio.create_task_group() as tg:

        async def second_signal() -> None:
            async for signum in signals:
                _log.warning(
                    "llamaproc serve: %s received again, not waiting for requests", signal.Signals(signum).name
                )
                tg.cancel_scope.cancel()
                return

        tg.start_soon(second_signal)
        drained = await pool.drain(timeout)
        if not drained:
            _log.warning("llamaproc serve: requests still in flight after %gs, stopping them", timeout)
        tg.cancel_scope.cancel()
    return drained


async def _start_socket(
    tg: anyio.abc.TaskGroup,
    scope: anyio.CancelScope,
    pool: ModelPool,
    path: Path,
    metrics: ServeMetrics,
    active: ActiveRequests,
    client: Upstream,
    jobs: JobLog | None = None,
    events: EventFeed | None = None,
    apply: Applier_ | None = None,
) -> str:
    """Start the Unix socket server in ``tg``, cancellable through ``scope``; return its path."""
    from ._socket import serve_socket

    async def run(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with scope:
            try:
                await serve_socket(
                    pool,
                    path,
                    metrics=metrics,
                    active=active,
                    client=client,
                    write_timeout=pool.config.write_timeout,
                    stall_timeout=lambda name: stall_timeout_of(pool.config, name),
                    jobs=jobs,
                    events=events,
                    apply=apply,
                    task_status=task_status,
                )
            except OSError as exc:
                if isinstance(exc, ListenError):
                    raise
                raise ListenError(f"socket {path}", exc) from exc

    await tg.start(run)
    return str(path)


def cmd_serve(args: argparse.Namespace) -> int:
    """``llamaproc serve``: 0 after a graceful stop, 1 if already running or unable to start, 2 for a bad config."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"llamaproc serve: {exc}", file=sys.stderr)
        return 2
    try:
        extra_keys = parse_api_keys(os.environ.get(API_KEYS_ENV, ""))
    except ConfigError as exc:
        print(f"llamaproc serve: {API_KEYS_ENV}: {exc}", file=sys.stderr)
        return 2
    if extra_keys:
        config = config.model_copy(update={"api_keys": config.api_keys + extra_keys})
    state_dir = getattr(args, "state_dir", None)
    # The supervisors' health probes would log a line each.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        anyio.run(
            lambda: run_daemon(
                config,
                host=getattr(args, "host", None) or DEFAULT_HOST,
                port=DEFAULT_PORT if getattr(args, "port", None) is None else args.port,
                socket_path=getattr(args, "socket", None),
                state_dir=state_dir,
                config_path=args.config,
                watch=bool(getattr(args, "watch", False)),
                extra_keys=extra_keys,
            ),
            backend="asyncio",
            backend_options={"use_uvloop": _use_uvloop()},
        )
    except AlreadyRunningError as exc:
        who = f"pid {exc.pid}" if exc.pid is not None else "another process"
        print(f"llamaproc serve: already running ({who}, lock {exc.path})", file=sys.stderr)
        return 1
    except (OSError, LlamaprocError) as exc:
        print(f"llamaproc serve: {_start_error(exc)}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # A failure inside the task group (e.g. the socket cannot be bound): report the cause.
        errors = _leaves(group)
        if not all(isinstance(e, (OSError, LlamaprocError)) for e in errors):
            raise
        for error in errors:
            print(f"llamaproc serve: {_start_error(error)}", file=sys.stderr)
        return 1
    return 0


def _use_uvloop() -> bool:
    """uvloop when it is installed (``LLAMAPROC_UVLOOP=0`` turns it off): a faster event loop
    for the daemon's request path (uvicorn does the same when it runs its own loop)."""
    if os.environ.get("LLAMAPROC_UVLOOP", "1") == "0":
        return False
    return importlib.util.find_spec("uvloop") is not None


def _start_error(exc: BaseException) -> str:
    if isinstance(exc, ListenError):
        return str(exc)
    return f"cannot start: {type(exc).__name__}: {exc}"


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves
