"""Keeping models served: the endpoint protocol, the config, the supervisor of one model, the pool of many,
the pid lock."""

from ._config import (
    ModelConfig,
    ServeConfig,
    load_config,
    normal_worker_address,
    parse_api_keys,
    parse_duration,
    parse_size,
    shard_options,
)
from ._endpoint import Endpoint, Loader
from ._pidlock import PidLock, read_pid
from ._pool import ModelPool, PoolStats, estimate_memory, lease_estimate
from ._supervisor import Condition, LayerRange, LeaseStatus, ModelStatus, Phase, ShardStatus, Supervisor

__all__ = [
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
    "ServeConfig",
    "ShardStatus",
    "Supervisor",
    "estimate_memory",
    "lease_estimate",
    "load_config",
    "normal_worker_address",
    "parse_api_keys",
    "parse_duration",
    "parse_size",
    "read_pid",
    "shard_options",
]
