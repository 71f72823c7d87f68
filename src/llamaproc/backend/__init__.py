"""Finding llama-server (and its flavour), reading GGUF model files' metadata, and estimating their memory."""

from ._backend import Backend, Flavour, discover, find_backend, read_gguf_info
from ._estimate import estimate_memory

__all__ = ["Backend", "Flavour", "discover", "find_backend", "estimate_memory", "read_gguf_info"]
