"""``llamaproc serve``: the daemon, its HTTP and socket front ends, its metrics.

Needs the ``daemon`` extra (``pip install 'llamaproc[daemon]'``): starlette,
uvicorn, httptools, uvloop and prometheus-client.
"""

from ._app import create_app
from ._daemon import DaemonInfo, cmd_serve, default_state_dir, run_daemon
from ._metrics import CONTENT_TYPE, ServeMetrics
from ._proxy import DEFAULT_MAX_BODY
from ._security import HttpSecurity
from ._socket import MAX_IN_FLIGHT, MAX_LINE, WRITE_TIMEOUT, ActiveRequests, serve_socket
from ._upstream import Upstream, UpstreamError, UpstreamResponse, UpstreamTimeout

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_MAX_BODY",
    "MAX_IN_FLIGHT",
    "MAX_LINE",
    "WRITE_TIMEOUT",
    "ActiveRequests",
    "DaemonInfo",
    "HttpSecurity",
    "ServeMetrics",
    "Upstream",
    "UpstreamError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "cmd_serve",
    "create_app",
    "default_state_dir",
    "run_daemon",
    "serve_socket",
]
