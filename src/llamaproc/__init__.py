"""llamaproc: supervise llama.cpp's llama-server from Python.

::

    import llamaproc

    async with await llamaproc.load_model("model.gguf", parallel=2) as model:
        async with model.generate("Once upon a time", max_tokens=64) as stream:
            async for tok in stream:
                print(tok.text, end="")
"""

from .backend import Backend, discover, find_backend, read_gguf_info
from .client import LlamaClient, TokenStream
from .errors import (
    AlreadyRunningError,
    BinaryNotFoundError,
    ClosedError,
    ConfigError,
    DaemonError,
    DaemonNotRunningError,
    DaemonRequestError,
    IncompleteStreamError,
    InsufficientMemoryError,
    InvalidArgumentError,
    LeaseLostError,
    LeaseTimeoutError,
    LedgerError,
    ListenError,
    LlamaprocError,
    ModelFileError,
    ModelNotFoundError,
    ModelUnavailableError,
    PoolError,
    ProcessError,
    QueueFullError,
    RolloutError,
    ServerCrashedError,
    ServerError,
    ServerHungError,
    ServerLoadingError,
    ShuttingDownError,
    StalledError,
    StartupError,
    StartupTimeoutError,
    StatusError,
    StreamError,
    TransportError,
    UsageError,
    WorkerBusyError,
    WorkerError,
    WorkersLostError,
    WorkerUnreachableError,
)
from .ledger import Lease, LeaseInfo, Ledger, open_ledger
from .model import ShardedModel, TextModel, load_model
from .process import RpcWorker, ServerProcess, probe_worker, start_worker
from .runtime import (
    Condition,
    ModelConfig,
    ModelPool,
    ModelStatus,
    Phase,
    PoolStats,
    ServeConfig,
    Supervisor,
    load_config,
)
from .types import (
    Completion,
    Device,
    GGUFInfo,
    Health,
    ModelInfo,
    Placement,
    RequestMetrics,
    Reshard,
    Shard,
    Timings,
    Token,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "AlreadyRunningError",
    "Backend",
    "BinaryNotFoundError",
    "ClosedError",
    "Completion",
    "Condition",
    "ConfigError",
    "DaemonError",
    "DaemonNotRunningError",
    "DaemonRequestError",
    "Device",
    "GGUFInfo",
    "Health",
    "IncompleteStreamError",
    "InsufficientMemoryError",
    "InvalidArgumentError",
    "Lease",
    "LeaseInfo",
    "LeaseLostError",
    "LeaseTimeoutError",
    "Ledger",
    "LedgerError",
    "ListenError",
    "LlamaClient",
    "LlamaprocError",
    "ModelConfig",
    "ModelFileError",
    "ModelInfo",
    "ModelNotFoundError",
    "ModelPool",
    "ModelStatus",
    "ModelUnavailableError",
    "Phase",
    "Placement",
    "PoolError",
    "PoolStats",
    "ProcessError",
    "QueueFullError",
    "RequestMetrics",
    "Reshard",
    "RolloutError",
    "RpcWorker",
    "ServeConfig",
    "ServerCrashedError",
    "ServerError",
    "ServerHungError",
    "ServerLoadingError",
    "ServerProcess",
    "Shard",
    "ShardedModel",
    "ShuttingDownError",
    "StalledError",
    "StartupError",
    "StartupTimeoutError",
    "StatusError",
    "StreamError",
    "Supervisor",
    "TextModel",
    "Timings",
    "Token",
    "TokenStream",
    "TransportError",
    "Usage",
    "UsageError",
    "WorkerBusyError",
    "WorkerError",
    "WorkerUnreachableError",
    "WorkersLostError",
    "__version__",
    "discover",
    "find_backend",
    "load_config",
    "load_model",
    "open_ledger",
    "probe_worker",
    "read_gguf_info",
    "start_worker",
]

# Tracebacks and reprs read `llamaproc.X`, not `llamaproc._module.X`.
for _name in __all__:
    _obj = globals()[_name]
    if hasattr(_obj, "__module__") and not isinstance(_obj, str):
        try:
            _obj.__module__ = __name__
        except (AttributeError, TypeError):
            pass
del _name, _obj
