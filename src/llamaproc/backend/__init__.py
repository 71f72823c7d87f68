"""Finding llama-server (and its flavour), and reading GGUF model files' metadata."""

from ._backend import Backend, Flavour, discover, find_backend, read_gguf_info

__all__ = ["Backend", "Flavour", "discover", "find_backend", "read_gguf_info"]
