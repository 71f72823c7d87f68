"""Keeping models served: the endpoint protocol, the config (TOML, or a YAML serving spec), the supervisor of
one model, the pool of many, the pid lock."""

from ._config import (
    ModelConfig,
    ServeConfig,
    load_config,
    normal_worker_address,
    parse_api_keys,
    parse_duration,
    parse_size,
    redacted,
    shard_options,
)
from ._endpoint import Endpoint, Loader
from ._pidlock import PidLock, read_pid
from ._pool import Change, ModelPool, PoolStats, estimate_memory, lease_estimate
from ._replicas import ReplicaSet
from ._spec import Resources, ServingSpec, config_to_spec, load_spec, load_spec_data, read_spec
from ._status import Condition, LayerRange, LeaseStatus, ModelStatus, Phase, ReplicaStatus, RoleStatus, ShardStatus
from ._supervisor import Supervisor

__all__ = [
    "Change",
    "Condition",
    "Endpoint",
    "LayerRange",
    "LeaseStatus",
    "Loader",
    "ModelConfig",
    "ModelPool",
    "ModelStatus",
    "Phase",
    "PidLock",
    "PoolStats",
    "ReplicaSet",
    "ReplicaStatus",
    "Resources",
    "RoleStatus",
    "ServeConfig",
    "ServingSpec",
    "ShardStatus",
    "Supervisor",
    "config_to_spec",
    "estimate_memory",
    "lease_estimate",
    "load_config",
    "load_spec",
    "load_spec_data",
    "normal_worker_address",
    "parse_api_keys",
    "parse_duration",
    "parse_size",
    "read_pid",
    "read_spec",
    "redacted",
    "shard_options",
]
