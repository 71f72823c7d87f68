"""A pool of named models, loaded on demand, within a count and a memory budget.

:class:`ModelPool` keeps one :class:`~llamaproc.Supervisor` per
model of a :class:`~llamaproc.ServeConfig` and hands out loaded
models with :meth:`ModelPool.acquire`::

    async with ModelPool(config) as pool:
        async with pool.acquire("tiny") as model:
            async with model.generate("hello", max_tokens=16) as stream:
                async for tok in stream:
                    ...

Each ``acquire`` goes through three steps:

1. **Admission.** Up to ``parallel`` requests per model hold a slot; up to
   ``queue_size`` more wait for one, first come first served; beyond that
   :class:`~llamaproc.QueueFullError` is raised at once, with a
   ``retry_after`` estimated from recent request durations. A cancelled
   waiter leaves the queue (a slot granted to it in the meantime is passed on).
2. **Loading.** A model that is not loaded is loaded, after making room:
   at most ``max_loaded_models`` models and, with a ``memory_budget``, their
   :func:`estimate_memory` within it. Room is made by unloading the least
   recently used model that has nothing in flight and nothing queued; when
   every loaded model is busy the request waits until one goes idle (a model
   that goes idle while a request waits for room is reserved for it at once,
   so that new requests cannot keep it busy for ever). Requests for a model
   that is loading wait for it; a model whose load just failed refuses them
   at once until its next attempt.
3. **Use.** The request keeps its slot until the ``async with`` block ends.

One load at a time makes room (the "room holder"); other requests for models
that are not loaded wait for it to finish, *or* for their own model to be
started, whichever comes first. A request never waits for the room holder
while its model is loaded or loading, so the requests that keep a loaded
model busy always make progress and no wait can be circular.

With a memory ledger (``ledger=``, see :func:`~llamaproc.open_ledger`),
each model but a sharded one also holds a lease of its estimate
(:func:`lease_estimate`) on its ``device`` at its ``priority`` while it is
loaded: the lease is taken after room is made and before the model starts
(a request waits for it up to ``lease_timeout``, then fails with
:class:`~llamaproc.LeaseTimeoutError`), kept across restarts, and given back
when the model is unloaded or Failed. When a waiter of higher priority asks
for the memory, an idle model is unloaded at once; a busy one takes no new
request, lets those in flight finish (for ``preempt_grace`` at most) and is
then unloaded; the requests that wait for it load it again under a new
lease. A model whose lease is lost is stopped at once: memory it no longer
holds is not used.

A background task unloads models idle for ``idle_timeout`` (measured, like
the supervisors' delays, on the event loop's clock); the supervisors restart
crashed models. :meth:`ModelPool.drain` stops admission
and waits for what was admitted; :meth:`ModelPool.close` (also run when the
``async with`` is left) stops every child, and requests still waiting or
running end with :class:`~llamaproc.ShuttingDownError` or the error of their
stopped model.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Generic, Self

import anyio
import anyio.abc
import anyio.lowlevel

from ..backend import estimate_memory as estimate_backend_memory
from ..errors import (
    InvalidArgumentError,
    LeaseTimeoutError,
    LedgerError,
    LlamaprocError,
    ModelFileError,
    ModelNotFoundError,
    ModelUnavailableError,
    QueueFullError,
    RolloutError,
    ShuttingDownError,
    UsageError,
    WorkerUnreachableError,
)
from ..ledger import Lease, Ledger
from ..model import load_model
from ._config import ModelConfig, ServeConfig, redacted, shard_options
from ._endpoint import Loader
from ._replicas import Replica, ReplicaSet
from ._status import LayerRange, LeaseStatus, ModelStatus, Phase, ShardStatus
from ._supervisor import E, Supervisor, _Unloaded

__all__ = ["Change", "ModelPool", "PoolStats", "estimate_memory", "lease_estimate"]

_log = logging.getLogger("llamaproc.pool")


# --- memory estimate ---------------------------------------------------------------------------


def estimate_memory(config: ModelConfig) -> int:
    """Bytes one loaded model needs against ``memory_budget``: its weights plus the KV cache.

    The backend's estimator (:func:`llamaproc.backend.estimate_memory`) without
    its compute margin, for the whole model in host memory. The context is
    ``ctx_size`` (or a ``--ctx-size``/``-c`` in ``args``), else the model's
    trained context length. A file that is not GGUF counts as its size. Reads
    the file's header (blocking).
    """
    return _estimate(config, margin=False)


def lease_estimate(config: ModelConfig) -> int:
    """Bytes a model's lease in the memory ledger holds: :func:`estimate_memory` plus the compute margin.

    The same estimate as a library model loaded with ``load_model(ledger=...)``;
    at least one byte (a lease holds something).
    """
    return max(1, _estimate(config, margin=True))


def _estimate(config: ModelConfig, *, margin: bool) -> int:
    path = config.path
    ctx = _ctx_from_args(config.args)
    if ctx is None:
        ctx = config.ctx_size
    try:
        estimate = estimate_backend_memory(path, ctx_size=ctx)
    except ModelFileError:
        try:
            return path.stat().st_size
        except OSError:
            return 0
    return estimate.total if margin else estimate.weights + estimate.kv_cache


def _ctx_from_args(args: Sequence[str]) -> int | None:
    ctx: int | None = None
    for i, arg in enumerate(args):
        value: str | None = None
        if arg in ("--ctx-size", "-c") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--ctx-size="):
            value = arg.split("=", 1)[1]
        if value is not None:
            with contextlib.suppress(ValueError):
                ctx = int(value)
    return ctx


# --- bookkeeping ---------------------------------------------------------------------------------


#: ServeConfig settings read once, at start-up: a new value needs a restart of the daemon.
FIXED_SETTINGS = (
    "api_keys", "allowed_hosts", "allowed_origins", "header_timeout", "body_timeout", "max_connections",
    "write_timeout", "ledger", "ledger_capacity",
)  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """One difference :meth:`ModelPool.apply` found (and made, unless a dry run).

    ``action``: ``"add"``, ``"remove"``, ``"update"`` (a rolling update),
    ``"scale"`` (only ``replicas`` changed), ``"rolled_back"`` (an update
    given up), ``"setting"`` (a daemon-wide setting, applied) or
    ``"restart_required"`` (a setting read only at start-up: not applied).
    ``model`` names the model (``None`` for a setting), ``setting`` the
    setting, ``detail`` says what changed.
    """

    model: str | None
    action: str
    detail: str
    setting: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "action": self.action, "detail": self.detail, "setting": self.setting}


def _diff(old: ServeConfig, new: ServeConfig) -> list[Change]:
    """What changes from ``old`` to ``new``: daemon-wide settings first, then models in ``new``'s order."""
    changes = []
    for key in ServeConfig.model_fields:
        if key == "models" or getattr(old, key) == getattr(new, key):
            continue
        action = "restart_required" if key in FIXED_SETTINGS else "setting"
        before, after = getattr(old, key), getattr(new, key)
        if key == "ledger":
            before, after = (None if url is None else redacted(url) for url in (before, after))
        shown = "(changed)" if key == "api_keys" else f"{before!r} -> {after!r}"
        changes.append(Change(None, action, f"{key}: {shown}", key))
    for name, model in new.models.items():
        before = old.models.get(name)
        if before is None:
            changes.append(Change(name, "add", f"new model, {model.replicas} replica(s)"))
        elif before != model:
            fields = [f for f in ModelConfig.model_fields if getattr(before, f) != getattr(model, f)]
            if fields == ["replicas"]:
                changes.append(Change(name, "scale", f"replicas: {before.replicas} -> {model.replicas}"))
            else:
                changes.append(Change(name, "update", "changed: " + ", ".join(fields)))
    for name in old.models:
        if name not in new.models:
            changes.append(Change(name, "remove", "no longer in the config: drained, then stopped"))
    return changes


@dataclasses.dataclass
class PoolStats:
    """Counters since the pool was made; they only grow."""

    loads: int = 0  #: successful loads, restarts included
    evictions: int = 0  #: models unloaded to make room (LRU)
    restarts: int = 0  #: restarts after a crash or a failed load
    idle_unloads: int = 0  #: models unloaded after idle_timeout
    preemptions: int = 0  #: models unloaded because a waiter of higher priority asked for their lease
    leases_lost: int = 0  #: models stopped because their lease was lost


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False


class _Entry:
    """The pool's view of one model."""

    def __init__(self, name: str, config: ModelConfig, replicas: ReplicaSet[Any]) -> None:
        self.name = name
        self.config = config
        self.replicas = replicas
        self.memory = 0  # one replica's estimate
        self.lease_memory = 0  # what its lease holds (with a ledger)
        self.lease: Lease | None = None
        self.yielding = False  # asked to give its lease back: unloaded once its requests are done
        self.in_flight = 0  # slot holders (using the model, or waiting for it to load)
        self.using = 0  # slot holders that have the model
        self.pins = 0  # explicit load() calls waiting for it
        self.queue: collections.deque[_Waiter] = collections.deque()
        self.evicting = False
        self.removing = False  # applied away: takes no new request, drains, then goes
        self.scope: anyio.CancelScope | None = None  # its replicas' task
        self.last_used: datetime | None = None
        self.last_used_mono = 0.0
        self.avg_seconds: float | None = None  # recent request duration (EWMA)

    @property
    def active(self) -> bool:
        return self.replicas.active

    @property
    def memory_held(self) -> int:
        """The estimate of every replica it has (a rolling update may have one more than its config)."""
        return self.memory * max(1, len(self.replicas))

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or bool(self.queue) or self.pins > 0

    @property
    def evictable(self) -> bool:
        return self.active and not self.evicting and not self.busy

    def touch(self) -> None:
        self.last_used = datetime.now(UTC)
        self.last_used_mono = anyio.current_time()


# --- the pool --------------------------------------------------------------------------------------


class ModelPool(Generic[E]):
    """Named models from a :class:`ServeConfig`, loaded on demand; see the module docs.

    ``loader`` loads one model (default :func:`llamaproc.load_model`, which
    makes a :class:`~llamaproc.TextModel`); what it returns is an
    :class:`~llamaproc.runtime.Endpoint`, and that is what :meth:`acquire`
    hands out.
    ``health_interval`` is the supervisors' ``/health`` probe period
    (``None``: exit watch only), ``health_timeout`` the time each probe may
    take and ``health_failures`` the failed probes in a row that count as a
    crash. A model whose ``recovery_policy`` is ``"None"`` is not restarted:
    its first crash or failed load marks it Failed.

    A sharded model (``workers`` or ``local_workers`` in its config) is
    loaded with :func:`~llamaproc.runtime.shard_options`: ``local_workers``
    workers started by the model itself, the listed addresses, or for
    ``workers = "registered"`` those ``registered_workers(name)`` returns at
    each load (a daemon's ready registered workers; none is a load error).
    ``on_change(name, event)`` is called with each supervisor event
    (``"serving"``, ``"crashed"``, ``"stopped"``, ... see
    :class:`~llamaproc.Supervisor`) and the pool's own ``"preempted"`` and
    ``"lease_lost"``, for an owner that keeps track of what a model holds.
    ``ledger`` (open, owned by the caller) makes the models hold leases; see
    the module docs.
    """

    def __init__(
        self,
        config: ServeConfig,
        *,
        loader: Loader = load_model,
        health_interval: float | None = 1.0,
        health_timeout: float | None = None,
        health_failures: int = 3,
        registered_workers: Callable[[str], Sequence[str]] | None = None,
        on_change: Callable[[str, str], None] | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self._lease_waits: set[anyio.CancelScope] = set()
        self._lease_news: list[tuple[_Entry, Lease]] = []
        self._lease_wakeup: anyio.Event | None = None
        self.stats = PoolStats()
        self._registered_workers = registered_workers
        self._on_change = on_change
        self._entries: dict[str, _Entry] = {}
        self._loader = loader
        self._health = (health_interval, health_timeout, health_failures)
        for name, model_config in config.models.items():
            self._entries[name] = self._new_entry(name, model_config)
        self._draining = False
        self._closed = False
        self._entered = False
        self._changed: anyio.Event | None = None
        #: The entry whose load is making room now (at most one at a time).
        self._room_holder: _Entry | None = None
        self._room_wanted = False
        self._reserved: list[_Entry] = []
        self._stack: contextlib.AsyncExitStack | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._applying = anyio.Lock()

    def _new_entry(self, name: str, model_config: ModelConfig) -> _Entry:
        def make(replica_config: ModelConfig) -> Supervisor[Any]:
            config = self.config
            interval, timeout, failures = self._health
            return Supervisor(
                name,
                replica_config,
                loader=self._sharding(name, self._loader) if replica_config.sharded else self._loader,
                restart_backoff=config.restart_backoff,
                restart_backoff_max=config.restart_backoff_max,
                max_restarts=0 if replica_config.recovery_policy == "None" else config.max_restarts,
                restart_window=config.restart_window,
                health_interval=interval,
                health_timeout=timeout,
                health_failures=failures,
                on_change=self._supervisor_changed,
            )

        return _Entry(name, model_config, ReplicaSet(name, model_config, make))

    async def _run_entry(
        self, entry: _Entry, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with anyio.CancelScope() as scope:
            entry.scope = scope
            task_status.started()
            await entry.replicas.run()

    async def _estimate(self, entry: _Entry) -> None:
        entry.memory = await anyio.to_thread.run_sync(estimate_memory, entry.config)
        if self.ledger is not None:
            entry.lease_memory = await anyio.to_thread.run_sync(lease_estimate, entry.config)

    # -- lifecycle --------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise UsageError("a ModelPool can be entered only once")
        self._entered = True
        for entry in self._entries.values():
            await self._estimate(entry)
        async with contextlib.AsyncExitStack() as stack:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            for entry in self._entries.values():
                await self._tg.start(self._run_entry, entry, name=f"llamaproc-replicas-{entry.name}")
            if self.ledger is not None:
                self._tg.start_soon(self._watch_leases, self._tg, name="llamaproc-lease-watch")
            self._tg.start_soon(self._reap_idle, name="llamaproc-idle-unload")
            if self.config.preload:
                self._tg.start_soon(self._preload, self.config.preload, name="llamaproc-preload")
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        """Stop every model (shielded) and end the background tasks."""
        stack, self._stack = self._stack, None
        if stack is None:
            return None
        await self.close()
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        return await stack.__aexit__(exc_type, exc, tb)

    async def close(self) -> None:
        """Refuse every request from now on and stop every model (shielded); idempotent.

        Requests waiting for a slot, for room or for a load get
        :class:`ShuttingDownError`; requests using a model see it stop (their
        streams fail). Use it after :meth:`drain` timed out; leaving the
        ``async with`` calls it too.
        """
        self._closed = True
        self._draining = True
        self._wake_all()
        for scope in self._lease_waits:
            scope.cancel()
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for entry in self._entries.values():
                    tg.start_soon(entry.replicas.stop)
            for entry in self._entries.values():
                await self._give_back(entry)
        self._notify()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has begun: every model is stopped or stopping."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ShuttingDownError("the model pool is closed: it is shutting down")
        if self._stack is None:
            raise UsageError("use the ModelPool in `async with` first")

    # -- notifications --------------------------------------------------------------------------

    def _event(self) -> anyio.Event:
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _wake_all(self) -> None:
        for entry in self._entries.values():
            for waiter in entry.queue:
                waiter.event.set()
        self._notify()

    def _supervisor_changed(self, supervisor: Supervisor[Any], event: str) -> None:
        entry = self._entries.get(supervisor.name)
        if entry is None or not any(r.supervisor is supervisor for r in entry.replicas.replicas):
            return  # a replica of a model removed meanwhile
        entry.replicas.observe()
        if event == "serving":
            self.stats.loads += 1
            entry.touch()
        elif event == "restarting":
            self.stats.restarts += 1
        elif (
            event == "failed" and entry.lease is not None and entry.replicas.phase is Phase.FAILED
            and entry.replicas.updating is None  # a rollback may start the old replicas again
        ):  # fmt: skip
            # Its process is gone and it will not be restarted: the memory is free again. (A stop
            # by the pool gives the lease back itself, once the process is gone.)
            lease, entry.lease = entry.lease, None
            lease.release_nowait()
        self._notify()
        self._tell(entry.name, event)

    def _tell(self, name: str, event: str) -> None:
        if self._on_change is not None:
            try:
                self._on_change(name, event)
            except Exception:  # noqa: BLE001 - a broken observer must not break the pool
                _log.exception("the on_change hook of the pool failed for model %s", name)

    # -- the memory ledger ----------------------------------------------------------------------

    async def _take_lease(self, entry: _Entry) -> None:
        """Hold the memory of ``entry`` in the ledger before it starts (if there is a ledger and it has none)."""
        ledger = self.ledger
        if ledger is None or entry.config.sharded or entry.lease is not None:
            return
        config = self.config
        priority = entry.config.priority or config.priority
        device = entry.config.device
        memory = entry.lease_memory * entry.config.replicas
        with anyio.CancelScope() as scope:
            self._lease_waits.add(scope)
            try:
                lease = await ledger.lease(
                    memory, device=device, priority=priority, holder=f"llamaproc serve: {entry.name}",
                    timeout=config.lease_timeout,
                )  # fmt: skip
            except LeaseTimeoutError as exc:
                raise LeaseTimeoutError(
                    f"model {entry.name!r} waited {config.lease_timeout:g} s for a lease of"
                    f" {_size(memory)} on {exc.device} in the ledger: {_size(exc.free)} of"
                    f" {_size(exc.capacity)} free",
                    memory=exc.memory, free=exc.free, capacity=exc.capacity, device=exc.device,
                ) from None  # fmt: skip
            except (InvalidArgumentError, LedgerError) as exc:
                raise ModelUnavailableError(f"model {entry.name!r} cannot take its lease in the ledger: {exc}") from None
            finally:
                self._lease_waits.discard(scope)
        if scope.cancelled_caught:
            raise ShuttingDownError("the model pool is closed: it is shutting down")
        if self._closed:
            with anyio.CancelScope(shield=True):
                await lease.release()
            raise ShuttingDownError("the model pool is closed: it is shutting down")
        entry.lease = lease
        lease.add_listener(lambda: self._lease_changed(entry, lease))

    def _lease_changed(self, entry: _Entry, lease: Lease) -> None:
        """The ledger's listener: the lease is lost, or a waiter asks for it.

        It runs in the event loop's thread but outside any task, where no task
        can be started: it hands the news to :meth:`_watch_leases`. A lease
        tells at most twice (asked, lost), so the list stays small.
        """
        if lease is entry.lease and not self._closed:
            self._lease_news.append((entry, lease))
            if self._lease_wakeup is not None:
                self._lease_wakeup.set()

    async def _watch_leases(self, task_group: anyio.abc.TaskGroup) -> None:
        """A background task: act on what the ledger's listeners heard."""
        while True:
            self._lease_wakeup = anyio.Event()
            if not self._lease_news:
                await self._lease_wakeup.wait()
            news, self._lease_news = self._lease_news, []
            for entry, lease in news:
                if lease is not entry.lease:
                    continue  # given back meanwhile
                if lease.lost:
                    task_group.start_soon(self._lose, entry, lease, name=f"llamaproc-lease-lost-{entry.name}")
                elif not entry.yielding:
                    entry.yielding = True
                    task_group.start_soon(self._yield, entry, lease, name=f"llamaproc-preempt-{entry.name}")

    async def _lose(self, entry: _Entry, lease: Lease) -> None:
        """Stop a model whose lease is lost at once, requests in flight or not."""
        _log.warning("model %s lost its lease in the ledger: stopping it", entry.name)
        self.stats.leases_lost += 1
        self._tell(entry.name, "lease_lost")
        entry.evicting = True
        self._notify()
        await self._unload_entry(entry, reason="its lease in the ledger was lost")

    async def _yield(self, entry: _Entry, lease: Lease) -> None:
        """Give the lease back to a waiter of higher priority: no new request, the ones in flight finish first."""
        try:
            while entry.evicting:  # being unloaded (the lease goes back with it), or only reserved for a moment
                try:
                    await self._wait_for(lambda: not entry.evicting)
                except ShuttingDownError:
                    return  # closing: every lease goes back
                if lease is not entry.lease:
                    return
            entry.evicting = True  # new requests wait, then load it again under a new lease
            self._notify()
            grace = self.config.preempt_grace
            _log.info("model %s is asked to yield its memory: unloading it once %d requests end (at most %g s)",
                      entry.name, entry.using, grace)  # fmt: skip
            with anyio.move_on_after(grace), contextlib.suppress(ShuttingDownError):
                await self._wait_for(lambda: entry.using == 0 or lease is not entry.lease)
            if lease is not entry.lease:
                entry.evicting = False
                self._notify()
                return
            self.stats.preemptions += 1
            self._tell(entry.name, "preempted")
            await self._unload_entry(entry, reason="asked to yield its memory to a waiter of higher priority")
        finally:
            entry.yielding = False

    async def _give_back(self, entry: _Entry) -> None:
        lease, entry.lease = entry.lease, None
        if lease is not None:
            with anyio.CancelScope(shield=True):
                await lease.release()

    # -- sharded models -------------------------------------------------------------------------

    def _sharding(self, name: str, loader: Loader) -> Loader:
        """``loader`` with the sharding keywords of model ``name``, resolved at each load."""

        async def load(path: Any, **options: Any) -> Any:
            return await loader(path, **options, **self._shard_options(name))

        return load

    def _shard_options(self, name: str) -> dict[str, Any]:
        config = self.config
        entry = self._entries.get(name)
        if entry is not None and config.models.get(name) != entry.config:
            # Removed or rolled back by an apply: its own config, with the daemon's settings.
            config = config.model_copy(update={"models": {**config.models, name: entry.config}})
        model = config.models[name]
        workers: Sequence[str] | int | None = None
        if model.local_workers is not None:
            workers = model.local_workers
        elif model.workers == "registered":
            if self._registered_workers is None:
                raise InvalidArgumentError(
                    f'model {name!r} has workers = "registered": only a daemon with a worker registry loads it',
                    param="workers",
                )
            workers = list(self._registered_workers(name))
            if not workers:
                raise WorkerUnreachableError(
                    f'model {name!r} has workers = "registered" and no registered rpc worker is ready:'
                    " start one with `llamaproc worker --register URL`"
                )
        options = shard_options(config, name, workers=workers)
        if options.get("stall_timeout") is None:
            options["stall_timeout"] = math.inf
        return options

    async def _wait_for(self, predicate: Callable[[], bool]) -> None:
        while True:
            changed = self._event()
            if predicate():
                return
            if self._closed:
                raise ShuttingDownError("the model pool is closed: it is shutting down")
            await changed.wait()

    # -- introspection --------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The configured model names, in config order."""
        return list(self._entries)

    def status(self) -> list[ModelStatus]:
        """One :class:`ModelStatus` per configured model, in config order."""
        result = []
        for entry in self._entries.values():
            replicas = entry.replicas
            first = replicas.first
            lost = first.lost_workers
            conditions = replicas.conditions(lost)
            result.append(
                ModelStatus(
                    name=entry.name,
                    phase=replicas.phase,
                    generation=replicas.generation,
                    observed_generation=replicas.observed_generation,
                    conditions=conditions,
                    roles=[replicas.role(conditions)],
                    loaded=first.model is not None,
                    pid=first.pid,
                    port=first.port,
                    in_flight=entry.in_flight,
                    queued=len(entry.queue),
                    parallel=entry.config.parallel,
                    last_used=entry.last_used,
                    restarts=replicas.restarts,
                    memory_estimate=entry.memory_held,
                    lease=_lease_status(entry.lease),
                    layout=_layout(first) if entry.config.sharded else None,
                    lost_workers=lost,
                )
            )
        return result

    def supervisor(self, name: str) -> Supervisor[E]:
        """The supervisor of model ``name``'s first serving replica (else its first replica)."""
        return self.replicas(name).first

    def replicas(self, name: str) -> ReplicaSet[E]:
        """The replicas of model ``name`` (also while it drains after being removed by :meth:`apply`)."""
        entry = self._entries.get(name)
        return entry.replicas if entry is not None else self._entry(name).replicas

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` (or closing) has stopped admission."""
        return self._draining

    def _entry(self, name: str) -> _Entry:
        try:
            entry = self._entries[name]
            if entry.removing:
                raise KeyError(name)
            return entry
        except KeyError:
            known = ", ".join(self._entries) or "none"
            raise ModelNotFoundError(f"no model named {name[:100]!r} (configured: {known[:500]})") from None

    # -- requests ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def acquire(self, name: str) -> AsyncIterator[E]:
        """Hold a slot of model ``name``, loaded, for the ``async with`` block.

        Raises :class:`ModelNotFoundError`, :class:`QueueFullError` (at once,
        with ``retry_after``), :class:`ModelUnavailableError` (Failed, a load
        failure, or a model too big for the memory budget) or
        :class:`ShuttingDownError` (draining or closed).
        """
        entry = self._entry(name)
        self._check_open()
        if self._draining:
            raise ShuttingDownError("the model pool is shutting down and takes no new requests")
        self._check_budget(entry)
        if entry.replicas.phase is Phase.FAILED:
            raise entry.replicas.failure()
        await self._admit(entry)
        try:
            replica, model = await self._ready(entry)
            entry.using += 1
            replica.using += 1
            entry.touch()
            started = anyio.current_time()
            try:
                yield model
            finally:
                entry.using -= 1
                replica.using -= 1
                replica.last_used = anyio.current_time()
                entry.replicas.notify()
                entry.touch()
                seconds = anyio.current_time() - started
                entry.avg_seconds = seconds if entry.avg_seconds is None else 0.8 * entry.avg_seconds + 0.2 * seconds
        finally:
            self._release(entry)

    def _check_budget(self, entry: _Entry) -> None:
        budget = self.config.memory_budget
        if budget is not None and entry.memory_held > budget:
            raise ModelUnavailableError(
                f"model {entry.name!r} needs about {_size(entry.memory_held)}, more than the whole memory budget"
                f" of {_size(budget)}"
            )

    async def _admit(self, entry: _Entry) -> None:
        if entry.in_flight < entry.config.parallel and not entry.queue:
            entry.in_flight += 1
            self._notify()
            return
        if len(entry.queue) >= self.config.queue_size:
            retry_after = self._retry_after(entry)
            raise QueueFullError(
                f"model {entry.name!r} is busy: {entry.in_flight} requests in flight and {len(entry.queue)}"
                f" queued (queue_size {self.config.queue_size}); retry after {retry_after:g} s",
                retry_after=retry_after,
            )
        waiter = _Waiter()
        entry.queue.append(waiter)
        self._notify()
        try:
            await waiter.event.wait()
            if not waiter.granted:
                raise ShuttingDownError("the model pool is closed: it is shutting down")
            # Cancelled while the slot was on its way (a client that went away): pass it on.
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            if waiter.granted:
                self._release(entry)  # pass the slot on
            else:
                with contextlib.suppress(ValueError):
                    entry.queue.remove(waiter)
                self._notify()
            raise

    def _retry_after(self, entry: _Entry) -> float:
        """Seconds until a queue place is likely to free up (at least 1)."""
        if entry.avg_seconds is None:
            return 1.0
        ahead = len(entry.queue) + 1
        return float(min(60, max(1, math.ceil(entry.avg_seconds * ahead / entry.config.parallel))))

    def _release(self, entry: _Entry) -> None:
        """Give back a slot: to the first waiter in the queue, or to the pool."""
        if entry.queue:
            waiter = entry.queue.popleft()
            waiter.granted = True
            waiter.event.set()
        else:
            entry.in_flight -= 1
        if self._room_wanted and entry.evictable:
            # Someone waits for room and every other model was busy: this one is it.
            entry.evicting = True
            self._reserved.append(entry)
        self._notify()

    async def _ready(self, entry: _Entry) -> tuple[Replica[E], E]:
        """Return a serving replica of ``entry`` and its endpoint, loading it (after making room) when needed.

        Waits only for things that end on their own: a load in progress, an
        unload in progress, or another load making room, which in turn waits
        only for requests that use (or wait for) models that are loaded.
        """
        sup = entry.replicas
        while True:
            self._check_open()
            if sup.phase is Phase.FAILED:
                raise sup.failure()
            if entry.evicting:
                await self._wait_for(lambda: not entry.evicting)
                continue
            if sup.active:
                try:
                    ready: tuple[Replica[E], E] = await sup.ready()
                    return ready
                except _Unloaded:
                    continue  # unloaded under us: load it again
            if self._room_holder is not None:
                # Another load makes room. Wait for it to end, or for this model to be
                # started meanwhile (by that load, or a restart): never for longer.
                await self._wait_for(lambda: self._room_holder is None or sup.active or entry.evicting or _failed(sup))
                continue
            self._room_holder = entry
            try:
                await self._make_room(entry)
                self._check_open()
                if entry.evicting or sup.active or _failed(sup):
                    continue  # unloaded, started or failed while room was made: look again
                await self._take_lease(entry)
                if entry.evicting or sup.active or _failed(sup):
                    continue
                entry.touch()
                sup.start()
                if not sup.active:  # nothing it could start now (a replica replaced in place): wait
                    await sup.changed()
            finally:
                self._room_holder = None
                self._notify()

    # -- room ---------------------------------------------------------------------------------------

    def _fits(self, entry: _Entry) -> bool:
        # A model being unloaded still counts until its process is gone.
        others = [e for e in self._entries.values() if e is not entry and (e.active or e.evicting)]
        if len(others) + 1 > self.config.max_loaded_models:
            return False
        budget = self.config.memory_budget
        return budget is None or sum(e.memory_held for e in others) + entry.memory_held <= budget

    async def _make_room(self, entry: _Entry) -> None:
        """Unload least recently used idle models until ``entry`` fits; wait while all are busy."""
        self._room_wanted = True
        try:
            while True:
                changed = self._event()
                if self._closed:
                    raise ShuttingDownError("the model pool is closed: it is shutting down")
                if self._fits(entry):
                    return
                if self._reserved:
                    victim = self._reserved.pop(0)
                    await self._unload_entry(victim, reason="evicted to make room for " + repr(entry.name))
                    self.stats.evictions += 1
                    continue
                idle = [e for e in self._entries.values() if e is not entry and e.evictable]
                if idle:
                    victim = min(idle, key=lambda e: e.last_used_mono)
                    victim.evicting = True
                    await self._unload_entry(victim, reason="evicted to make room for " + repr(entry.name))
                    self.stats.evictions += 1
                    continue
                _log.debug("model %s waits for a loaded model to go idle", entry.name)
                await changed.wait()
        finally:
            self._room_wanted = False
            for reserved in self._reserved:
                reserved.evicting = False
            self._reserved.clear()
            self._notify()

    async def _unload_entry(self, entry: _Entry, *, reason: str) -> None:
        """Stop an entry already marked ``evicting`` (shielded), then clear the mark."""
        _log.info("unloading model %s: %s", entry.name, reason)
        try:
            await entry.replicas.stop()
            await self._give_back(entry)
        finally:
            entry.evicting = False
            self._notify()

    # -- management -------------------------------------------------------------------------------

    async def load(self, name: str) -> None:
        """Load model ``name`` now (making room like a request would) and wait until it serves.

        A Failed model is reset and tried again. Raises
        :class:`ModelUnavailableError` when the load fails and
        :class:`ShuttingDownError` once :meth:`drain` or :meth:`close` began.
        """
        entry = self._entry(name)
        self._check_open()
        if self._draining:
            raise ShuttingDownError("the model pool is shutting down and loads no models")
        self._check_budget(entry)
        entry.pins += 1
        try:
            if entry.replicas.phase is Phase.FAILED:
                await entry.replicas.stop()  # back to Pending, restart history cleared
            await self._ready(entry)
        finally:
            entry.pins -= 1
            self._notify()

    async def unload(self, name: str) -> None:
        """Unload model ``name`` (also clears Failed).

        New requests for it wait and load it again afterwards; requests that
        already use it finish first.
        """
        entry = self._entry(name)
        self._check_open()
        if entry.evicting:
            await self._wait_for(lambda: not entry.evicting)
            return
        entry.evicting = True
        try:
            await self._wait_for(lambda: entry.using == 0)
        except BaseException:
            entry.evicting = False
            self._notify()
            raise
        await self._unload_entry(entry, reason="unload requested")

    async def drain(self, timeout: float) -> bool:
        """Stop admitting (new :meth:`acquire` → :class:`ShuttingDownError`) and wait for the admitted.

        Returns True when nothing was in flight or queued any more within
        ``timeout`` seconds, False otherwise.
        """
        self._draining = True
        self._notify()
        with anyio.move_on_after(timeout):
            try:
                await self._wait_for(lambda: all(e.in_flight == 0 and not e.queue for e in self._entries.values()))
            except ShuttingDownError:
                return False
            return True
        return False

    # -- applying a new config -------------------------------------------------------------------

    async def apply(self, config: ServeConfig, *, dry_run: bool = False) -> list[Change]:
        """Serve ``config`` from now on, without a restart: what changes, as :class:`Change` items.

        New models are added (not loaded: they load on first use, or now when
        in ``preload``); changed ones roll their replicas one at a time (see
        :class:`ReplicaSet`; a change of ``replicas`` alone adds or removes
        replicas); removed ones take no new request (``model_not_found``),
        finish what was admitted and stop. The pool's own settings (sizes,
        timeouts, priorities) take effect at once, its restart policy for the
        replicas started from then on; a change to
        a setting fixed at start-up (``api_keys``, the HTTP limits, the
        ledger) is listed with ``action="restart_required"`` and not applied.
        ``dry_run``: only say what would change. Returns once every change is
        done; a rolling update that was rolled back is listed with
        ``action="rolled_back"``. One apply runs at a time.
        """
        self._check_open()
        if self._draining:
            raise ShuttingDownError("the model pool is shutting down and takes no new config")
        async with self._applying:
            changes = _diff(self.config, config)
            if dry_run or not changes:
                return changes
            fixed = {c.setting for c in changes if c.action == "restart_required"}
            kept = {key: getattr(self.config, key) for key in fixed if key is not None}
            old_config, self.config = self.config, config.model_copy(update=kept)
            results: list[Change] = [c for c in changes if c.model is None]
            async with anyio.create_task_group() as tg:
                for change in changes:
                    if change.model is None:
                        continue
                    if change.action == "add":
                        await self._add_model(change.model, config.models[change.model])
                        results.append(change)
                    elif change.action == "remove":
                        tg.start_soon(self._remove_model, change.model)
                        results.append(change)
                    else:
                        tg.start_soon(self._update_model, change, config.models[change.model], results)
            for name in config.preload:
                if name not in old_config.models and self._tg is not None:
                    self._tg.start_soon(self._preload, [name], name="llamaproc-preload")
            order = {name: i for i, name in enumerate([*config.models, *old_config.models])}
            return sorted(results, key=lambda c: (c.model is not None, order.get(c.model or "", 0)))

    async def _add_model(self, name: str, model_config: ModelConfig) -> None:
        entry = self._new_entry(name, model_config)
        await self._estimate(entry)
        self._entries[name] = entry
        assert self._tg is not None
        await self._tg.start(self._run_entry, entry, name=f"llamaproc-replicas-{name}")
        _log.info("model %s added", name)
        self._notify()

    async def _remove_model(self, name: str) -> None:
        entry = self._entries[name]
        entry.removing = True
        self._notify()
        try:
            await self._wait_for(lambda: entry.in_flight == 0 and not entry.queue and not entry.evicting)
        except ShuttingDownError:
            return  # close() stops it
        entry.evicting = True
        await self._unload_entry(entry, reason="removed from the config")
        if entry.scope is not None:
            entry.scope.cancel()
        if self._entries.get(name) is entry:
            del self._entries[name]
        _log.info("model %s removed", name)
        self._notify()

    async def _update_model(self, change: Change, model_config: ModelConfig, results: list[Change]) -> None:
        entry = self._entries[change.model or ""]
        entry.config = model_config
        await self._estimate(entry)

        async def room_for(count: int) -> bool:
            if model_config.sharded and model_config.local_workers is None:
                return False  # its rpc workers serve one llama-server at a time: replaced in place
            budget = self.config.memory_budget
            others = sum(e.memory_held for e in self._entries.values() if e is not entry and (e.active or e.evicting))
            if budget is not None and others + entry.memory * count > budget:
                return False
            if entry.lease is None or entry.lease.memory >= entry.lease_memory * count:
                return True  # held already (an update grows it once, and shrinks it when done)
            try:
                return await entry.lease.resize(entry.lease_memory * count)
            except LlamaprocError:
                return False

        async def resized(count: int) -> None:
            if entry.lease is not None and count > 0:
                with contextlib.suppress(LlamaprocError):
                    await entry.lease.resize(entry.lease_memory * count)

        try:
            await entry.replicas.update(model_config, room_for_one_more=room_for, resized=resized)
        except RolloutError as exc:
            if entry.replicas.phase is Phase.FAILED and entry.lease is not None:
                lease, entry.lease = entry.lease, None
                lease.release_nowait()
            entry.config = entry.replicas.config
            self.config = self.config.model_copy(
                update={"models": {**self.config.models, entry.name: entry.replicas.config}}
            )
            await self._estimate(entry)
            results.append(Change(entry.name, "rolled_back", str(exc)))
            return
        finally:
            self._notify()
        results.append(change)

    # -- background tasks -----------------------------------------------------------------------

    async def _reap_idle(self) -> None:
        """Unload models idle for ``idle_timeout`` (read at each look: :meth:`apply` may change it)."""
        while True:
            idle_timeout = self.config.idle_timeout
            await anyio.sleep(1.0 if idle_timeout is None else max(0.05, min(idle_timeout / 4, 1.0)))
            idle_timeout = self.config.idle_timeout
            if idle_timeout is None:
                continue
            now = anyio.current_time()
            for entry in list(self._entries.values()):
                if entry.evictable and now - entry.last_used_mono >= idle_timeout:
                    entry.evicting = True
                    try:
                        await self._unload_entry(entry, reason=f"idle for {idle_timeout:g} s")
                    except LlamaprocError as exc:
                        _log.error("unloading idle model %s failed: %s", entry.name, exc)
                    self.stats.idle_unloads += 1

    async def _preload(self, names: Sequence[str]) -> None:
        for name in names:
            try:
                await self.load(name)
            except ShuttingDownError:
                return
            except LlamaprocError as exc:
                _log.error("preloading model %s failed: %s", name, exc)


def _layout(supervisor: Supervisor[Any]) -> list[ShardStatus]:
    return [
        ShardStatus(address=s.address, layers=LayerRange(start=s.layers.start, stop=s.layers.stop))
        for s in supervisor.layout
    ]


def _lease_status(lease: Lease | None) -> LeaseStatus | None:
    if lease is None or lease.lost:
        return None
    return LeaseStatus(
        id=lease.id, token=lease.token, device=lease.device, memory=lease.memory, priority=lease.priority,
        preempt_requested=lease.preempt_requested,
    )  # fmt: skip


def _failed(replicas: ReplicaSet[Any]) -> bool:
    return replicas.phase is Phase.FAILED


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover
