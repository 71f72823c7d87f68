"""One llama-server child process: spawn on a kernel-picked port, drain its output, stop it, leave no orphan."""

from ._process import OutputBuffer, ServerProcess

__all__ = ["OutputBuffer", "ServerProcess"]
