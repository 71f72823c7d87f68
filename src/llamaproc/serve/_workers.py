"""The daemon's rpc workers and its log of recent requests.

:class:`WorkerRegistry` knows every rpc worker the daemon may shard a model
over: the local ones it starts itself (``local_workers``), the ones that
registered over HTTP (``llamaproc worker --register``) and the ones a
model's config lists. It records each worker's devices, the model and layers
it holds, and when it was last heard from. A registered worker that misses
three heartbeats in a row counts as lost until it is heard from again. It is
bounded: at most :data:`MAX_WORKERS` entries, of which at most
:data:`MAX_LOST` lost ones (the oldest are forgotten first).

:class:`JobLog` keeps the last :data:`MAX_JOBS` requests: their model,
route, outcome, token count, layout and reshards (``GET /api/jobs``).

Everything here runs on the daemon's event loop and never awaits: no locks.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import LlamaprocError
from ..runtime import normal_worker_address
from ..types import Device, Reshard, Shard

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "MAX_JOBS",
    "MAX_LOST",
    "MAX_WORKERS",
    "HeartbeatBody",
    "Job",
    "JobLog",
    "RegisterBody",
    "RegistryFullError",
    "UnknownWorkerError",
    "WorkerEntry",
    "WorkerRegistry",
]

_log = logging.getLogger("llamaproc.serve")

#: Seconds between a registered worker's heartbeats (told to it when it registers).
DEFAULT_HEARTBEAT_INTERVAL = 5.0
#: A registered worker not heard from for this many heartbeat intervals counts as lost.
MISSED_HEARTBEATS = 3
#: Workers the registry holds at most, lost ones included.
MAX_WORKERS = 1024
#: Lost workers kept (for ``GET /api/workers`` and the metrics); the oldest beyond it are forgotten.
MAX_LOST = 64
#: Requests the job log keeps.
MAX_JOBS = 256
#: Reshards one job keeps (a stream gives up long before: ``max_reshards``).
MAX_JOB_RESHARDS = 64

Source = Literal["local", "registered", "config"]
State = Literal["ready", "in use", "lost"]
STATES: tuple[State, ...] = ("ready", "in use", "lost")


class UnknownWorkerError(LlamaprocError):
    """No worker of that id is registered (or it was evicted: it must register again). HTTP 404."""

    def __init__(self, message: str, *, worker_id: str) -> None:
        self.worker_id = worker_id
        super().__init__(message)


class RegistryFullError(LlamaprocError):
    """The registry holds :data:`MAX_WORKERS` workers and none of them is lost. HTTP 503."""


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat()


@dataclass
class WorkerEntry:
    """One rpc worker the daemon knows. ``last_seen`` is on the registry's monotonic clock."""

    id: str
    address: str
    source: Source
    pid: int | None
    devices: list[Device]
    cpu_seconds: float | None
    registered_at: float  # wall clock
    last_seen: float  # monotonic
    last_seen_wall: float
    model: str | None = None
    layers: range | None = None
    #: Marked lost (evicted, or found dead by its model): stays so until it registers again.
    lost: bool = False
    lost_since: float | None = None

    def to_json(self, state: State, now: float) -> dict[str, Any]:
        layers = None if self.layers is None else {"start": self.layers.start, "stop": self.layers.stop}
        return {
            "id": self.id,
            "address": self.address,
            "pid": self.pid,
            "source": self.source,
            "state": state,
            "devices": [d.to_json() for d in self.devices],
            "model": self.model,
            "layers": layers,
            "registered_at": _iso(self.registered_at),
            "last_heartbeat": _iso(self.last_seen_wall),
            "heartbeat_age": round(max(0.0, now - self.last_seen), 3),
            "cpu_seconds": self.cpu_seconds,
        }


class WorkerRegistry:
    """The daemon's rpc workers, by id and by address.

    Hooks the sharded model and the HTTP routes use (plain attributes, set after
    construction):

    - ``on_evict(entry)``: called by :meth:`evict` once the worker is marked
      lost, so that a model using it can reshard its streams. Its errors are
      logged, never raised.
    - ``on_heartbeat(entry)``: called by :meth:`heartbeat` once recorded, so
      that a model using the worker learns its CPU time. Its errors are
      logged, never raised.
    - ``on_change(entry, change)``: called when a worker is ``"registered"``,
      ``"assigned"`` to a model, ``"released"``, ``"lost"`` or ``"removed"``
      (the daemon's event feed). Its errors are logged, never raised.
    - ``probe(address)``: awaited by ``POST /api/workers/register`` before a
      worker is accepted; returns the worker's devices or raises
      :class:`~llamaproc.errors.WorkerUnreachableError`. ``None``: no probe.

    ``clock`` (monotonic seconds) and ``wall`` (Unix time) are for tests.
    """

    def __init__(
        self,
        *,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        max_workers: int = MAX_WORKERS,
        max_lost: int = MAX_LOST,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if heartbeat_interval <= 0 or max_workers < 1 or max_lost < 0:
            raise ValueError("heartbeat_interval must be > 0, max_workers >= 1 and max_lost >= 0")
        self.heartbeat_interval = heartbeat_interval
        self.max_workers = max_workers
        self.max_lost = max_lost
        self.on_evict: Callable[[WorkerEntry], object] | None = None
        self.on_heartbeat: Callable[[WorkerEntry], object] | None = None
        self.on_change: Callable[[WorkerEntry, str], object] | None = None
        self.probe: Callable[[str], Awaitable[Sequence[Device]]] | None = None
        self._clock = clock
        self._wall = wall
        self._by_id: dict[str, WorkerEntry] = {}
        self._by_address: dict[str, WorkerEntry] = {}

    # --- reading -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, worker_id: str) -> WorkerEntry:
        """The entry of ``worker_id``; raises :class:`UnknownWorkerError`."""
        entry = self._by_id.get(worker_id)
        if entry is None:
            raise UnknownWorkerError(f"no worker with id {worker_id[:100]!r} is registered", worker_id=worker_id)
        return entry

    def find(self, address: str) -> WorkerEntry | None:
        """The entry of the worker at ``address``, if any."""
        return self._by_address.get(address)

    def state(self, entry: WorkerEntry) -> State:
        """``"lost"`` when marked lost or, for a registered worker, silent for three heartbeat intervals;
        else ``"in use"`` while a model holds it, else ``"ready"``."""
        if entry.lost or self._stale(entry, self._clock()):
            return "lost"
        return "in use" if entry.model is not None else "ready"

    def ready(self, *, source: Source | None = None) -> list[WorkerEntry]:
        """The workers no model holds and not lost, oldest registration first; only those of ``source`` if given."""
        return [e for e in self._by_id.values() if self.state(e) == "ready" and (source is None or e.source == source)]

    def describe(self, entry: WorkerEntry) -> dict[str, Any]:
        """One worker as JSON, with its state now."""
        return entry.to_json(self.state(entry), self._clock())

    def snapshot(self) -> list[dict[str, Any]]:
        """Every worker as JSON (``GET /api/workers``)."""
        return [self.describe(e) for e in self._by_id.values()]

    def states(self) -> list[tuple[WorkerEntry, State]]:
        """Every worker with its state (for the metrics)."""
        return [(e, self.state(e)) for e in self._by_id.values()]

    # --- registering and heartbeats --------------------------------------------------------------

    def register(
        self,
        address: str,
        devices: Iterable[Device] = (),
        cpu_seconds: float | None = None,
        *,
        pid: int | None = None,
        source: Source = "registered",
    ) -> WorkerEntry:
        """Add the worker at ``address``, or update it if known; return its entry.

        A known worker keeps its id. One that was lost is ready again, holding
        nothing: a model uses it from its next load on, not in the middle of a
        stream. Raises :class:`RegistryFullError` when the registry is full of
        workers that are not lost.
        """
        now, wall = self._clock(), self._wall()
        entry = self._by_address.get(address)
        if entry is not None:
            if entry.lost:
                entry.model = entry.layers = None
            entry.lost, entry.lost_since = False, None
            entry.devices = list(devices)
            entry.cpu_seconds = cpu_seconds
            entry.last_seen, entry.last_seen_wall = now, wall
            if pid is not None:
                entry.pid = pid
            entry.source = source if source != "config" else entry.source
            self._changed(entry, "registered")
            return entry
        self._make_room(now)
        entry = WorkerEntry(
            id=self._new_id(),
            address=address,
            source=source,
            pid=pid,
            devices=list(devices),
            cpu_seconds=cpu_seconds,
            registered_at=wall,
            last_seen=now,
            last_seen_wall=wall,
        )
        self._by_id[entry.id] = entry
        self._by_address[address] = entry
        self._changed(entry, "registered")
        return entry

    def heartbeat(self, worker_id: str, cpu_seconds: float | None = None) -> WorkerEntry:
        """Record that ``worker_id`` is alive. Raises :class:`UnknownWorkerError` for an unknown id and for a
        worker marked lost (evicted): it must register again."""
        entry = self.get(worker_id)
        if entry.lost:
            raise UnknownWorkerError(
                f"worker {worker_id!r} ({entry.address}) was evicted: register again", worker_id=worker_id
            )
        entry.last_seen, entry.last_seen_wall = self._clock(), self._wall()
        entry.cpu_seconds = cpu_seconds
        if self.on_heartbeat is not None:
            try:
                self.on_heartbeat(entry)
            except Exception:  # noqa: BLE001 - a broken hook must not fail the heartbeat route
                _log.exception("llamaproc serve: the heartbeat hook of worker %s (%s) failed", entry.id, entry.address)
        return entry

    # --- losing workers ----------------------------------------------------------------------------

    def evict(self, worker_id: str) -> WorkerEntry:
        """Mark ``worker_id`` lost and call ``on_evict`` (once; evicting a lost worker again does nothing more).
        Raises :class:`UnknownWorkerError`."""
        entry = self.get(worker_id)
        if entry.lost:
            return entry
        self._lose(entry)
        if self.on_evict is not None:
            try:
                self.on_evict(entry)
            except Exception:  # noqa: BLE001 - a broken hook must not fail the eviction route
                _log.exception("llamaproc serve: the eviction of worker %s (%s) failed", entry.id, entry.address)
        return entry

    def mark_lost(self, address: str) -> WorkerEntry | None:
        """Mark the worker at ``address`` lost (its model found it dead or hung); ``None`` if unknown.
        It keeps the model and layers it held, for the record, until it registers again."""
        entry = self._by_address.get(address)
        if entry is not None and not entry.lost:
            self._lose(entry)
        return entry

    def remove(self, worker_id: str) -> None:
        """Forget ``worker_id`` (a local worker the daemon stopped). Unknown ids are ignored."""
        entry = self._by_id.pop(worker_id, None)
        if entry is not None:
            del self._by_address[entry.address]
            self._changed(entry, "removed")

    # --- models ------------------------------------------------------------------------------------

    def assign(self, addresses: Iterable[str], model: str, *, layers: Mapping[str, range] | None = None) -> None:
        """Record that ``model`` holds the workers at ``addresses`` (with ``layers[address]`` when given).

        An address the registry does not know is added as a worker of the
        ``"config"`` source (listed in the model's config); it is forgotten
        again when the model releases it.
        """
        for address in addresses:
            entry = self._by_address.get(address) or self.register(address, source="config")
            entry.model = model
            entry.layers = None if layers is None else layers.get(address)
            self._changed(entry, "assigned")

    def assign_layout(self, model: str, layout: Sequence[Shard]) -> None:
        """:meth:`assign` for a model's layout (its shards' addresses and layers)."""
        self.assign([s.address for s in layout], model, layers={s.address: s.layers for s in layout})

    def release(self, model: str) -> None:
        """The workers ``model`` held are free again (the model was unloaded or resharded)."""
        for entry in list(self._by_id.values()):
            if entry.model != model:
                continue
            entry.model = entry.layers = None
            if entry.source == "config":
                self.remove(entry.id)
            else:
                self._changed(entry, "released")

    # --- internals -------------------------------------------------------------------------------

    def _stale(self, entry: WorkerEntry, now: float) -> bool:
        return entry.source == "registered" and now - entry.last_seen > MISSED_HEARTBEATS * self.heartbeat_interval

    def _lose(self, entry: WorkerEntry) -> None:
        entry.lost = True
        entry.lost_since = self._clock()
        self._changed(entry, "lost")
        self._forget_lost(self.max_lost)

    def _changed(self, entry: WorkerEntry, change: str) -> None:
        if self.on_change is not None:
            try:
                self.on_change(entry, change)
            except Exception:  # noqa: BLE001 - an observer must not break the registry
                _log.exception("llamaproc serve: the change hook of worker %s (%s) failed", entry.id, entry.address)

    def _lost_oldest_first(self, now: float) -> list[WorkerEntry]:
        lost = [e for e in self._by_id.values() if e.lost or self._stale(e, now)]
        return sorted(lost, key=lambda e: e.lost_since if e.lost_since is not None else e.last_seen)

    def _forget_lost(self, keep: int) -> None:
        lost = self._lost_oldest_first(self._clock())
        for entry in lost[: max(0, len(lost) - keep)]:
            self.remove(entry.id)

    def _make_room(self, now: float) -> None:
        self._forget_lost(self.max_lost)
        if len(self._by_id) < self.max_workers:
            return
        lost = self._lost_oldest_first(now)
        if not lost:
            raise RegistryFullError(f"the daemon already knows {len(self._by_id)} rpc workers, none of them lost")
        self.remove(lost[0].id)

    def _new_id(self) -> str:
        while True:
            # Random, not sequential: a worker that outlived a daemon restart must not hit another's id.
            worker_id = "w-" + secrets.token_hex(4)
            if worker_id not in self._by_id:
                return worker_id


# --- request bodies --------------------------------------------------------------------------------

#: What the address of a registering worker looks like (the route checks the host and port further).
ADDRESS_PATTERN = r"^(\[[^\[\]]+\]|[^:\[\]]+):[0-9]{1,5}$"
#: Devices one worker may report.
MAX_DEVICES = 64


class _Body(BaseModel):
    # Strict: a string is not a number here. Unknown fields are ignored (newer workers may send more).
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class DeviceBody(_Body):
    """A device in a registration: its name and memory in bytes."""

    name: str = Field(max_length=256)
    total: int = Field(ge=0)
    free: int = Field(ge=0)


class RegisterBody(_Body):
    """The body of ``POST /api/workers/register``."""

    address: str = Field(
        max_length=300,
        description="Where the daemon reaches the worker's rpc-server: `host:port` or `[v6]:port`.",
        json_schema_extra={"pattern": ADDRESS_PATTERN},
    )
    devices: list[DeviceBody] = Field(
        default_factory=list, max_length=MAX_DEVICES, description="The devices the worker offers."
    )
    cpu_seconds: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="CPU seconds the worker's rpc-server has used."
    )

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        normal = normal_worker_address(value)
        if normal is None:
            raise ValueError("expected 'host:port' or '[v6]:port' with a port in 1..65535")
        return normal

    def device_list(self) -> list[Device]:
        return [Device(d.name, d.total, d.free) for d in self.devices]


class HeartbeatBody(_Body):
    """The body of ``POST /api/workers/heartbeat``."""

    id: str = Field(max_length=100, description="The id the registration answered.")
    cpu_seconds: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="CPU seconds the worker's rpc-server has used."
    )


# --- the job log -------------------------------------------------------------------------------


@dataclass
class Job:
    """One request of the job log; its owner updates it while it runs."""

    id: str
    model: str
    route: str
    started: float  # wall clock
    finished: float | None = None
    status: Literal["running", "done", "failed"] = "running"
    tokens: int = 0
    layout: list[dict[str, Any]] = field(default_factory=list)
    reshards: list[dict[str, Any]] = field(default_factory=list)

    def set_layout(self, layout: Sequence[Shard | Mapping[str, Any]]) -> None:
        """The shards serving the request (:class:`~llamaproc.types.Shard` or its JSON)."""
        self.layout = [s.to_json() if isinstance(s, Shard) else dict(s) for s in layout]

    def add_reshard(self, reshard: Reshard | Mapping[str, Any]) -> None:
        """Record a reshard of the request's stream (:class:`~llamaproc.types.Reshard` or its JSON)."""
        if len(self.reshards) < MAX_JOB_RESHARDS:
            self.reshards.append(reshard.to_json() if isinstance(reshard, Reshard) else dict(reshard))
        layout = reshard.layout if isinstance(reshard, Reshard) else reshard.get("layout")
        if layout is not None:
            self.set_layout(layout)

    def finish(self, status: Literal["done", "failed"], tokens: int | None = None) -> None:
        """The request ended (the first call counts; later ones are ignored)."""
        if self.status != "running":
            return
        self.status = status
        self.finished = time.time()
        if tokens is not None:
            self.tokens = tokens

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "route": self.route,
            "status": self.status,
            "started": _iso(self.started),
            "finished": None if self.finished is None else _iso(self.finished),
            "seconds": None if self.finished is None else round(self.finished - self.started, 6),
            "tokens": self.tokens,
            "layout": list(self.layout),
            "reshards": list(self.reshards),
        }


class JobLog:
    """The last ``size`` requests (a ring: the oldest are dropped), newest first in :meth:`snapshot`."""

    def __init__(self, size: int = MAX_JOBS) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self._jobs: deque[Job] = deque(maxlen=size)
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._jobs)

    def start(self, model: str, route: str) -> Job:
        """Log a new running request and return its record."""
        job = Job(id=f"job-{next(self._ids)}", model=model, route=route, started=time.time())
        self._jobs.append(job)
        return job

    def snapshot(self) -> list[dict[str, Any]]:
        """Every logged request as JSON, newest first (``GET /api/jobs``)."""
        return [job.to_json() for job in reversed(self._jobs)]
