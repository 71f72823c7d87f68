"""What ``/api/models``, the socket's ``status`` and ``llamaproc ps`` report about each model.

The shape is Kubernetes': a ``phase``, ``conditions`` with a ``type``,
``status``, ``reason``, ``message`` and ``lastTransitionTime``, a
``generation`` (the config's version of the model) and the
``observedGeneration`` its replicas run, and per role the desired and ready
replicas. Keys are camelCase in JSON (``model_dump(mode="json")``), snake_case
in Python.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

__all__ = [
    "Condition",
    "LayerRange",
    "LeaseStatus",
    "ModelStatus",
    "Phase",
    "ReplicaStatus",
    "RoleStatus",
    "ShardStatus",
]


class Phase(enum.StrEnum):
    """Where a supervised model (or one of its replicas) is in its life."""

    PENDING = "Pending"  #: not loaded, nobody asked for it
    LOADING = "Loading"  #: starting, or waiting out a restart backoff
    SERVING = "Serving"  #: healthy and taking requests
    FAILED = "Failed"  #: gave up after too many restarts; stays so until loaded or unloaded explicitly


class _Status(BaseModel):
    """camelCase keys in JSON; snake_case names in Python (both accepted when built)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, serialize_by_alias=True)


class Condition(_Status):
    """One observed aspect of a model, in the style of Kubernetes conditions.

    ``last_transition_time`` changes only when ``status`` changes; ``reason``
    and ``message`` follow the latest observation.
    """

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str
    last_transition_time: datetime


class LayerRange(_Status):
    """A range of layers: ``start`` included, ``stop`` excluded."""

    start: int
    stop: int


class ShardStatus(_Status):
    """One worker of a sharded model and the layers it holds."""

    address: str
    layers: LayerRange


class LeaseStatus(_Status):
    """The memory lease a model holds in the daemon's ledger (for all its replicas)."""

    id: str
    token: int  #: the fencing number of the grant (it only grows)
    device: str
    memory: int  #: bytes
    priority: str
    preempt_requested: bool  #: a waiter of higher priority asked for it: the model is unloading


class ReplicaStatus(_Status):
    """One llama-server of a model (one replica of its role)."""

    index: int  #: a number that names the replica for its life (a replacement gets a new one)
    phase: Phase
    generation: int  #: the model's generation whose config this replica runs
    pid: int | None
    port: int | None
    in_flight: int  #: requests using it now
    restarts: int
    draining: bool  #: being replaced or removed: it takes no new request
    last_error: str | None


class RoleStatus(_Status):
    """The role that serves a model: ``server`` (llama-server alone) or ``sharded`` (over rpc workers)."""

    name: Literal["server", "sharded"]
    replicas: int  #: desired
    ready_replicas: int  #: Serving now
    updated_replicas: int  #: running the model's current generation
    phase: Phase
    conditions: list[Condition]
    replica_statuses: list[ReplicaStatus]


class ModelStatus(_Status):
    """The state of one configured model, as reported by ``ModelPool.status()``.

    ``phase`` is ``Serving`` while any replica serves, ``Failed`` when every
    replica failed, ``Loading`` while one loads, else ``Pending``.
    ``conditions`` are ``Available``, ``Progressing``, ``Failed``,
    ``UpdateInProgress`` and ``Degraded``. ``pid`` and ``port`` are those of
    the first serving replica. ``layout`` and ``lost_workers`` are those of a
    sharded model (``None`` for one that is not; empty while it is not
    loaded). ``lease`` is the memory lease it holds while loaded, with a
    ledger (``None`` otherwise).
    """

    name: str
    phase: Phase
    generation: int
    observed_generation: int
    conditions: list[Condition]
    roles: list[RoleStatus]
    loaded: bool
    pid: int | None
    port: int | None
    in_flight: int
    queued: int
    parallel: int
    last_used: datetime | None
    restarts: int
    memory_estimate: int
    lease: LeaseStatus | None = None
    layout: list[ShardStatus] | None = None
    lost_workers: list[str] | None = None
