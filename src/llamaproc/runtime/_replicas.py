"""The replicas of one model: N supervised llama-servers of one config behind one name.

A :class:`ReplicaSet` keeps ``config.replicas`` :class:`Supervisor` objects
of a model and chooses the one each request goes to: among the replicas that
serve, the one with the fewest requests in flight, then the one used least
recently. A replica that crashes is restarted by its own supervisor (or, with
``recovery_policy = "None"``, stays Failed) while the others keep serving; the
model is Serving while any replica serves, and Failed only when all are.

:meth:`ReplicaSet.update` rolls the replicas to a new config one at a time: a
new replica is started and, once it serves, an old one stops taking requests,
finishes those in flight and is stopped. When the caller says there is no
memory for one more replica at once, the old replica is drained and stopped
first and its successor started in its place (the model serves on one replica
fewer meanwhile; with one replica its requests wait for the new one). A new
replica that does not serve within ``progress_deadline`` is stopped and the
old config is kept: :class:`RolloutError`, and ``Progressing`` turns False.
A change of ``replicas`` alone adds or removes replicas and touches no other.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Generic, Literal

import anyio
import anyio.abc

from ..errors import LlamaprocError, RolloutError, ShuttingDownError
from ._config import ModelConfig
from ._status import Condition, Phase, ReplicaStatus, RoleStatus
from ._supervisor import E, Supervisor, _Unloaded

__all__ = ["CONDITION_TYPES", "Replica", "ReplicaSet"]

_log = logging.getLogger("llamaproc.pool")

#: A model's (and its role's) condition types, in this order.
CONDITION_TYPES = ("Available", "Progressing", "Failed", "UpdateInProgress", "Degraded")


class Replica(Generic[E]):
    """One supervised llama-server of a model, with the requests using it."""

    def __init__(self, index: int, supervisor: Supervisor[E], config: ModelConfig, generation: int) -> None:
        self.index = index
        self.supervisor = supervisor
        self.config = config
        self.generation = generation
        self.using = 0
        self.last_used = 0.0
        self.draining = False
        self.scope: anyio.CancelScope | None = None

    def serving(self) -> E | None:
        """Its endpoint when it can take a request now (serving, alive, not draining), else ``None``."""
        model = self.supervisor.model
        if self.draining or model is None or model.returncode is not None:
            return None
        return model

    def status(self) -> ReplicaStatus:
        sup = self.supervisor
        return ReplicaStatus(
            index=self.index, phase=sup.phase, generation=self.generation, pid=sup.pid, port=sup.port,
            in_flight=self.using, restarts=sup.restarts, draining=self.draining, last_error=sup.last_error,
        )  # fmt: skip


def _same_but_replicas(a: ModelConfig, b: ModelConfig) -> bool:
    return a.model_copy(update={"replicas": b.replicas}) == b


class ReplicaSet(Generic[E]):
    """The replicas of model ``name``; ``make(config)`` makes one replica's (not yet running) supervisor.

    Run :meth:`run` in a task group; :meth:`start` loads every replica,
    :meth:`stop` unloads them all (shielded), :meth:`ready` waits for one that
    serves and returns it with its endpoint. The owner counts the requests
    it sends to a replica (:attr:`Replica.using`) and calls :meth:`notify`
    when a count drops.
    """

    def __init__(self, name: str, config: ModelConfig, make: Callable[[ModelConfig], Supervisor[E]]) -> None:
        self.name = name
        self.config = config
        self.generation = 1
        self.observed_generation = 1
        self._make = make
        self._next_index = 0
        self.replicas: list[Replica[E]] = [self._new(config, 1) for _ in range(config.replicas)]
        self._tg: anyio.abc.TaskGroup | None = None
        self._changed: anyio.Event | None = None
        self._wanted = False
        self._closed = False
        #: While a rolling update runs: what it does.
        self.updating: str | None = None
        #: Why the last rolling update was given up (until the next one).
        self.rolled_back: str | None = None
        now = datetime.now(UTC)
        self._conditions = {
            t: Condition(type=t, status="False", reason="NotLoaded", message="not loaded", last_transition_time=now)
            for t in CONDITION_TYPES
        }

    def _new(self, config: ModelConfig, generation: int) -> Replica[E]:
        replica = Replica(self._next_index, self._make(config), config, generation)
        self._next_index += 1
        return replica

    # -- life -----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run every replica's supervisor until cancelled (each stops its child on the way out)."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for replica in list(self.replicas):
                    await tg.start(self._run_replica, replica)
                await anyio.sleep_forever()
        finally:
            self._tg = None
            self._closed = True
            self.notify()

    async def _run_replica(
        self, replica: Replica[E], *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with anyio.CancelScope() as scope:
            replica.scope = scope
            task_status.started()
            await replica.supervisor.run()

    async def _add(self, config: ModelConfig, generation: int) -> Replica[E]:
        """A new replica, running, and asked to load while the model is wanted."""
        if self._tg is None:
            raise ShuttingDownError(f"model {self.name!r} is shutting down")
        replica = self._new(config, generation)
        self.replicas.append(replica)
        await self._tg.start(self._run_replica, replica)
        if self._wanted:
            replica.supervisor.start()
        self.notify()
        return replica

    async def _remove(self, replica: Replica[E]) -> None:
        """Stop a replica (shielded) and forget it."""
        replica.draining = True
        self.notify()
        await replica.supervisor.stop()
        if replica.scope is not None:
            replica.scope.cancel()
        if replica in self.replicas:
            self.replicas.remove(replica)
        self.notify()

    async def _retire(self, replica: Replica[E]) -> None:
        """Take no new request on ``replica``, let those in flight finish, then stop and forget it."""
        replica.draining = True
        self.notify()
        while replica.using:
            await self.changed()
        await self._remove(replica)

    def start(self) -> None:
        """Load every replica (and keep them loaded). Returns at once."""
        self._wanted = True
        for replica in self.replicas:
            if not replica.draining:
                replica.supervisor.start()
        self.notify()

    async def stop(self) -> None:
        """Unload every replica (also clears Failed). Shielded: when it returns, their children are gone."""
        self._wanted = False
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for replica in list(self.replicas):
                    tg.start_soon(replica.supervisor.stop)
        self.notify()

    # -- notifications ----------------------------------------------------------------------------

    def notify(self) -> None:
        """Wake what waits for a change: a replica's state, or a request count."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def observe(self) -> None:
        """Record the conditions now (a replica changed state): their transition times are when it happened."""
        self.conditions(self.first.lost_workers)
        self.notify()

    def _event(self) -> anyio.Event:
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    async def changed(self) -> None:
        """Return at the next :meth:`notify`."""
        await self._event().wait()

    # -- state ------------------------------------------------------------------------------------

    @property
    def wanted(self) -> bool:
        return self._wanted

    @property
    def active(self) -> bool:
        """Wanted and not Failed: some replica runs, starts, or is about to be restarted."""
        # During an update a replica may be replaced in place: none runs for a moment, yet one is coming.
        return self._wanted and (self.updating is not None or any(r.supervisor.active for r in self.replicas))

    @property
    def phase(self) -> Phase:
        phases = [r.supervisor.phase for r in self.replicas if not r.draining] or [
            r.supervisor.phase for r in self.replicas
        ]
        if Phase.SERVING in phases:
            return Phase.SERVING
        if phases and all(p is Phase.FAILED for p in phases):
            return Phase.FAILED
        if Phase.LOADING in phases:
            return Phase.LOADING
        if Phase.FAILED in phases and self._wanted:
            return Phase.FAILED
        return Phase.PENDING

    def failure(self) -> LlamaprocError:
        """The error for a request while the model is Failed."""
        for replica in self.replicas:
            if replica.supervisor.phase is Phase.FAILED:
                return replica.supervisor.failure()
        return self.replicas[0].supervisor.failure()

    @property
    def model(self) -> E | None:
        """The endpoint of the first replica that serves (``None``: none does)."""
        for replica in self.replicas:
            model = replica.supervisor.model
            if model is not None:
                return model
        return None

    @property
    def first(self) -> Supervisor[E]:
        """The supervisor of the first serving replica, else of the first replica."""
        for replica in self.replicas:
            if replica.supervisor.model is not None:
                return replica.supervisor
        return self.replicas[0].supervisor

    @property
    def restarts(self) -> int:
        return sum(r.supervisor.restarts for r in self.replicas)

    @property
    def using(self) -> int:
        return sum(r.using for r in self.replicas)

    def __len__(self) -> int:
        return len(self.replicas)

    # -- choosing a replica -----------------------------------------------------------------------

    def pick(self) -> tuple[Replica[E], E] | None:
        """The serving replica with the fewest requests in flight, then the least recently used.

        None once :meth:`stop` began, even while a replica still serves: its
        stop is on its way.
        """
        if not self._wanted:
            return None
        best: tuple[Replica[E], E] | None = None
        for replica in self.replicas:
            model = replica.serving()
            if model is None:
                continue
            if best is None or (replica.using, replica.last_used) < (best[0].using, best[0].last_used):
                best = (replica, model)
        return best

    async def ready(self) -> tuple[Replica[E], E]:
        """Wait for a replica that serves and return it with its endpoint.

        Raises like :meth:`Supervisor.ready`: :class:`ModelUnavailableError`
        when every replica is Failed or backing off after a failed load (the
        first one's error), ``_Unloaded`` when none is wanted.
        """
        while True:
            if self._closed:
                raise ShuttingDownError(f"model {self.name!r} is shutting down")
            if not self._wanted:
                raise _Unloaded(f"model {self.name!r} is not loaded")
            picked = self.pick()
            if picked is not None:
                return picked
            live = [r for r in self.replicas if not r.draining and r.supervisor.wanted]
            if not live:
                if any(r.supervisor.wanted for r in self.replicas) or self.updating:
                    await self._wait_any()  # a replacement is on its way
                    continue
                raise _Unloaded(f"model {self.name!r} is not loaded")
            if len(live) == 1 and not self.updating:
                await live[0].supervisor.ready()  # its own rules: waits for a load, raises for a failure
                continue
            if all(r.supervisor.phase is Phase.FAILED or r.supervisor.backing_off for r in live):
                await live[0].supervisor.ready()  # raises its failure
            await self._wait_any()

    async def _wait_any(self) -> None:
        """Until a replica or the set changes.

        The events are taken now, before any task starts: a change made
        before the waiting tasks run is not missed.
        """
        events = [self._event(), *(r.supervisor._event() for r in self.replicas)]
        async with anyio.create_task_group() as tg:

            async def wait(event: anyio.Event) -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            for event in events:
                tg.start_soon(wait, event)

    # -- rolling updates --------------------------------------------------------------------------

    async def update(
        self,
        config: ModelConfig,
        *,
        room_for_one_more: Callable[[int], Awaitable[bool]],
        resized: Callable[[int], Awaitable[None]],
    ) -> None:
        """Roll every replica to ``config`` (see the module docs); the model's generation advances.

        ``room_for_one_more(n)`` says whether ``n`` replicas may run at once
        (memory); ``resized(n)`` is told when ``n`` replicas run again. Raises
        :class:`RolloutError` after a rollback (``rolled_back`` says why).
        """
        previous, generation = self.config, self.generation + 1
        if self._wanted and config.replicas > len(self._live()) and not await room_for_one_more(config.replicas):
            # Checked before anything changes: more replicas than the memory allows is refused whole.
            self.generation = generation
            raise self._give_up(previous, f"no memory for {config.replicas} replicas")
        self.generation, self.config, self.rolled_back = generation, config, None
        for replica in self.replicas:
            if not replica.draining and _same_but_replicas(replica.config, config):
                replica.config, replica.generation = config, generation  # a change of replicas alone
        if not self._wanted:
            await self._rebuild(config, generation)
            self.observed_generation = generation
            self.notify()
            return
        deadline = config.progress_deadline
        retired: list[tuple[ModelConfig, int]] = []  # what the old replicas ran, to put back on a rollback
        try:
            self.updating = f"rolling to generation {generation}"
            self.notify()
            old = [r for r in self.replicas if r.generation != generation and not r.draining]
            current = [r for r in self.replicas if r.generation == generation and not r.draining]
            made = len(current)
            for extra in current[config.replicas :]:
                await self._retire(extra)
            while made < config.replicas or old:
                if not self._wanted:  # unloaded meanwhile: the next load runs the new config
                    await self._rebuild(config, generation)
                    break
                old.sort(key=lambda r: r.using)  # the idle ones first: they stop at once
                if made >= config.replicas:
                    await self._retire(old.pop(0))
                    continue
                live = len(self._live())
                in_place = bool(old) and not await room_for_one_more(live + 1)
                victim = old.pop(0) if in_place else None
                if victim is None and not old and not await room_for_one_more(live + 1):
                    # The memory went to others meanwhile: keep the replicas there are, say so.
                    self.config = config.model_copy(update={"replicas": made})
                    self.rolled_back = f"runs {made} of {config.replicas} replicas: no memory for more"
                    raise RolloutError(f"model {self.name!r} {self.rolled_back}")
                if victim is not None:
                    _log.info("model %s: no memory for one more replica: replacing replica %d in place",
                              self.name, victim.index)  # fmt: skip
                    retired.append((victim.config, victim.generation))
                    await self._retire(victim)
                new = await self._add(config, generation)
                self.updating = f"replica {new.index} of generation {generation} is loading"
                self.notify()
                problem = await self._until_serving(new, deadline)
                if problem is not None:
                    await self._remove(new)
                    await self._restore(generation, retired, previous)
                    raise self._give_up(previous, problem)
                made += 1
                if victim is None and old:
                    retired.append((old[0].config, old[0].generation))
                    await self._retire(old.pop(0))
            self.observed_generation = generation
        finally:
            self.updating = None
            with anyio.CancelScope(shield=True):
                await resized(len(self._live()))
            self.observe()

    async def _restore(
        self, generation: int, retired: list[tuple[ModelConfig, int]], previous: ModelConfig
    ) -> None:
        """After a failed update: the replicas of ``generation`` give way to what they replaced, one by one.

        Each is drained and stopped first, then its predecessor's config
        started in its place (no memory for one more is needed).
        """
        for replica in [r for r in self.replicas if r.generation == generation and not r.draining]:
            await self._retire(replica)
            if retired:
                config, old_generation = retired.pop(0)
                await self._add(config, old_generation)
        while retired and len(self._live()) < previous.replicas:
            config, old_generation = retired.pop(0)
            await self._add(config, old_generation)

    def _live(self) -> list[Replica[E]]:
        return [r for r in self.replicas if not r.draining]

    def _give_up(self, previous: ModelConfig, problem: str) -> RolloutError:
        self.config = previous
        self.rolled_back = f"rolled back to the previous config: {problem}"
        _log.warning("model %s: %s", self.name, self.rolled_back)
        return RolloutError(f"model {self.name!r}: {self.rolled_back}")

    async def _until_serving(self, replica: Replica[E], deadline: float) -> str | None:
        """``None`` once ``replica`` serves; else why it will not (Failed, deadline, unloaded)."""
        with anyio.move_on_after(deadline):
            while True:
                sup = replica.supervisor
                if sup.model is not None:
                    return None
                if sup.phase is Phase.FAILED:
                    return f"the new replica failed: {sup.last_error}"
                if not sup.wanted or not self._wanted:
                    return "the model was unloaded during the update"
                await sup.changed()
        last = replica.supervisor.last_error
        return f"the new replica did not serve within {deadline:g} s" + (f" (last error: {last})" if last else "")

    async def _rebuild(self, config: ModelConfig, generation: int) -> None:
        """While nothing runs: the replicas become ``config.replicas`` new ones of ``config``."""
        for replica in list(self.replicas):
            if replica.generation != generation or len(self._live()) > config.replicas:
                await self._remove(replica)
        while len(self._live()) < config.replicas:
            replica = self._new(config, generation)
            self.replicas.append(replica)
            if self._tg is not None:
                await self._tg.start(self._run_replica, replica)
            if self._wanted:
                replica.supervisor.start()
        self.notify()

    # -- status -----------------------------------------------------------------------------------

    def _condition(self, type_: str, status: Literal["True", "False"], reason: str, message: str) -> None:
        old = self._conditions[type_]
        when = old.last_transition_time if old.status == status else datetime.now(UTC)
        self._conditions[type_] = Condition(
            type=type_, status=status, reason=reason, message=message, last_transition_time=when
        )

    def conditions(self, lost_workers: list[str] | None = None) -> list[Condition]:
        """The model's conditions now (``Available``, ``Progressing``, ``Failed``, ``UpdateInProgress``, ``Degraded``)."""
        live = self._live()
        desired = self.config.replicas
        ready = sum(1 for r in live if r.supervisor.model is not None)
        loading = sum(1 for r in live if r.supervisor.phase is Phase.LOADING)
        failed = [r for r in live if r.supervisor.phase is Phase.FAILED]
        phase = self.phase
        counts = f"{ready} of {desired} replicas serving"
        if ready:
            self._condition("Available", "True", "MinimumReplicasAvailable", counts)
        elif phase is Phase.FAILED:
            self._condition("Available", "False", "Failed", counts)
        elif self._wanted:
            self._condition("Available", "False", "Loading", counts)
        elif any(r.supervisor.stopping for r in self.replicas):
            self._condition("Available", "False", "Unloading", "unloading")
        else:
            self._condition("Available", "False", "NotLoaded", "not loaded")
        if self.rolled_back is not None:
            self._condition("Progressing", "False", "ProgressDeadlineExceeded", self.rolled_back)
        elif self.updating is not None:
            self._condition("Progressing", "True", "ReplicaUpdating", self.updating)
        elif loading:
            self._condition("Progressing", "True", "ReplicasLoading", f"{loading} of {desired} replicas loading")
        elif self._wanted and ready == desired:
            self._condition("Progressing", "True", "ReplicasAvailable", counts)
        elif not self._wanted:
            self._condition("Progressing", "False", "NotLoaded", "not loaded")
        if failed:
            reason = "NotRestarted" if self.config.recovery_policy == "None" else "TooManyRestarts"
            message = "; ".join(f"replica {r.index}: {r.supervisor.last_error}" for r in failed)
            self._condition("Failed", "True", reason, message)
        else:
            self._condition("Failed", "False", "NoFailure", "no replica failed")
        if self.updating is not None:
            self._condition("UpdateInProgress", "True", "RollingUpdate", self.updating)
        else:
            self._condition(
                "UpdateInProgress", "False", "UpToDate", f"every replica runs generation {self.observed_generation}"
            )
        if lost_workers:
            self._condition("Degraded", "True", "WorkersLost", f"serving without lost workers {', '.join(lost_workers)}")
        elif self._wanted and 0 < ready < desired:
            self._condition("Degraded", "True", "ReplicasUnavailable", counts)
        else:
            self._condition("Degraded", "False", "AllReplicas", counts if self._wanted else "not loaded")
        return [self._conditions[t].model_copy() for t in CONDITION_TYPES]

    def role(self, conditions: list[Condition]) -> RoleStatus:
        live = self._live()
        return RoleStatus(
            name="sharded" if self.config.sharded else "server",
            replicas=self.config.replicas,
            ready_replicas=sum(1 for r in live if r.supervisor.model is not None),
            updated_replicas=sum(1 for r in live if r.generation == self.generation),
            phase=self.phase,
            conditions=conditions,
            replica_statuses=[r.status() for r in self.replicas],
        )
