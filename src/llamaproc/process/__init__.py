"""Child processes: one llama-server (spawn on a kernel-picked port, drain its output, stop it, leave no orphan),
and llama.cpp rpc workers (start, probe in ggml's RPC protocol, stop)."""

from ._process import OutputBuffer, ServerProcess
from ._worker import RpcWorker, parse_address, probe_worker, start_worker

__all__ = ["OutputBuffer", "RpcWorker", "ServerProcess", "parse_address", "probe_worker", "start_worker"]
