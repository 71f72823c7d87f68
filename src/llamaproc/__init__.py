"""llamaproc: supervise llama.cpp's llama-server from Python.

::

    import llamaproc

    async with await llamaproc.load_model("model.gguf", parallel=2) as model:
        async with model.generate("Once upon a time", max_tokens=64) as stream:
            async for tok in stream:
                print(tok.text, end="")
"""

from ._backend import Backend, discover, find_backend, read_gguf_info
from ._client import LlamaClient, TokenStream
from ._exceptions import (
    BinaryNotFoundError,
    ClosedError,
    IncompleteStreamError,
    LlamaprocError,
    ModelFileError,
    ProcessError,
    ServerCrashedError,
    ServerError,
    ServerLoadingError,
    StartupError,
    StartupTimeoutError,
    StatusError,
    StreamError,
    TransportError,
    UsageError,
)
from ._model import TextModel, load_model
from ._process import ServerProcess
from ._types import Completion, GGUFInfo, Health, ModelInfo, RequestMetrics, Timings, Token, Usage

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BinaryNotFoundError",
    "ClosedError",
    "Completion",
    "GGUFInfo",
    "Health",
    "IncompleteStreamError",
    "LlamaClient",
    "LlamaprocError",
    "ModelFileError",
    "ModelInfo",
    "ProcessError",
    "RequestMetrics",
    "ServerCrashedError",
    "ServerError",
    "ServerLoadingError",
    "ServerProcess",
    "StartupError",
    "StartupTimeoutError",
    "StatusError",
    "StreamError",
    "Timings",
    "Token",
    "TokenStream",
    "TextModel",
    "TransportError",
    "Usage",
    "UsageError",
    "__version__",
    "discover",
    "find_backend",
    "load_model",
    "read_gguf_info",
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
