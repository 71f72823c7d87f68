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
    shard_options,
)
from ._endpoint import Endpoint, Loader
from ._pidlock import PidLock, read_pid
from ._pool import ModelPool, PoolStats, estimate_memory, lease_estimate
from ._spec import Resources, ServingSpec, config_to_spec, load_spec, read_spec
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
    "Resources",
    "ServeConfig",
    "ServingSpec",
    "ShardStatus",
    "Supervisor",
    "config_to_spec",
    "estimate_memory",
    "lease_estimate",
    "load_config",
    "load_spec",
    "normal_worker_address",
    "parse_api_keys",
    "parse_duration",
    "parse_size",
    "read_pid",
    "read_spec",
    "shard_options",
]
