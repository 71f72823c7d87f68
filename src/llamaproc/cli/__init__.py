"""The ``llamaproc`` command: ``run``, ``demo``, ``discover``, ``serve``, ``render`` and the daemon's clients."""

from ._daemon_cli import DaemonClient, find_socket
from ._main import main

__all__ = ["DaemonClient", "find_socket", "main"]
