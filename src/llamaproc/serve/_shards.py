"""What ties the daemon's sharded models to its worker registry and metrics.

:class:`ShardKeeper` is the glue between the :class:`~llamaproc.runtime.ModelPool`
(which loads a :class:`~llamaproc.ShardedModel` per sharded config) and the
:class:`~._workers.WorkerRegistry` (which ``/api/workers`` shows):

* at load, ``workers = "registered"`` resolves to the registry's ready
  registered workers (:meth:`ShardKeeper.registered_workers`);
* once a sharded model serves, its workers are recorded as held by it (the
  local ones it started with their pid), and each of its reshards updates
  the registry (lost workers, new layout), the metrics and the event feed;
* once it stops or crashes, its workers are released (local ones forgotten:
  they stopped with it);
* ``DELETE /api/workers/{id}`` of a worker a model holds makes that model
  evict it (in the keeper's task group, not in the request), and the
  heartbeats of a registered worker feed the model's stall watchdog with the
  worker's CPU time.

Everything runs on the daemon's event loop.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from ..errors import LlamaprocError
from ..model import ShardedModel
from ..types import Reshard
from ._events import EventFeed
from ._metrics import ServeMetrics
from ._workers import WorkerEntry, WorkerRegistry

if TYPE_CHECKING:
    from ..runtime import ModelPool

__all__ = ["ShardKeeper"]

_log = logging.getLogger("llamaproc.serve")


class ShardKeeper:
    """Keeps the registry and the metrics in step with the daemon's sharded models; see the module docs.

    Set :attr:`pool` once the pool exists, and run :meth:`run` in the
    daemon's task group (evictions run in it; cancelling it stops them).
    """

    def __init__(self, registry: WorkerRegistry, metrics: ServeMetrics, events: EventFeed | None = None) -> None:
        self.registry = registry
        self.metrics = metrics
        self.events = events
        self.pool: ModelPool[Any] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        #: The sharded models serving now, by name (to tell a model's own events from a reloaded one's).
        self._models: dict[str, ShardedModel] = {}
        registry.on_evict = self._evicted
        registry.on_heartbeat = self._heartbeat

    async def run(self) -> None:
        """Run the evictions asked for until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None

    # -- loading ------------------------------------------------------------------------------------

    def registered_workers(self, name: str) -> list[str]:
        """The addresses of the ready registered workers (``workers = "registered"``), oldest first."""
        return [e.address for e in self.registry.ready(source="registered")]

    def changed(self, name: str, event: str) -> None:
        """A supervisor event of model ``name`` (the pool's ``on_change``)."""
        if event == "serving":
            self._serving(name)
        elif event in ("crashed", "stopped", "failed", "load_failed"):
            self._released(name)

    def _serving(self, name: str) -> None:
        if self.pool is None:
            return
        model = self.pool.supervisor(name).model
        if not isinstance(model, ShardedModel):
            return
        self._released(name)
        self._models[name] = model
        for worker in model.owned_workers:
            self.registry.register(worker.address, worker.devices, worker.cpu_seconds(), pid=worker.pid,
                                   source="local")  # fmt: skip
        self.registry.assign_layout(name, model.layout)
        model.on_reshard.append(lambda reshard: self._resharded(name, model, reshard))

    def _released(self, name: str) -> None:
        self._models.pop(name, None)
        for entry, _ in self.registry.states():
            if entry.model == name and entry.source == "local":
                self.registry.remove(entry.id)  # a local worker stops with its model
        self.registry.release(name)

    def _resharded(self, name: str, model: ShardedModel, reshard: Reshard) -> None:
        if self._models.get(name) is not model:
            return
        for address in reshard.lost:
            self.registry.mark_lost(address)
        self.registry.assign_layout(name, reshard.layout)
        self.metrics.record_reshard(name, reshard)
        if self.events is not None:
            self.events.publish("reshard", {"model": name, **reshard.to_json()})

    # -- the registry's hooks -------------------------------------------------------------------------

    def _holder(self, entry: WorkerEntry) -> ShardedModel | None:
        model = self._models.get(entry.model) if entry.model is not None else None
        return model if model is not None and entry.address in model.workers else None

    def _evicted(self, entry: WorkerEntry) -> None:
        model = self._holder(entry)
        if model is None:
            return
        if self._tg is None:
            _log.warning("llamaproc serve: worker %s cannot be evicted from its model now", entry.address)
            return
        self._tg.start_soon(self._evict, model, entry.address, name=f"llamaproc-evict-{entry.address}")

    async def _evict(self, model: ShardedModel, address: str) -> None:
        try:
            await model.evict(address)
        except LlamaprocError as exc:
            _log.warning("llamaproc serve: evicting worker %s from %s: %s", address, model.path.name, exc)

    def _heartbeat(self, entry: WorkerEntry) -> None:
        model = self._holder(entry)
        if model is not None and entry.cpu_seconds is not None:
            model.report_cpu(entry.address, entry.cpu_seconds)
