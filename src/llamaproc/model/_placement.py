"""Choosing a model's placement against a ledger, and reading what llama-server says it uses.

Blocking helpers and small pure functions for :func:`load_model` with a
ledger: the estimate (the backend's estimator), ``fit=True``'s search for a
configuration that fits the free memory, and the buffer sizes llama-server
logs at verbosity 4 (``-lv 4``), which correct the lease after the load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from ..backend import estimate_memory, read_gguf_info
from ..errors import InsufficientMemoryError
from ..types import GGUFInfo, MemoryEstimate

__all__ = ["DEFAULT_CTX", "choose", "measured_memory"]

#: The context of a model whose file names none (llama-server's own default).
DEFAULT_CTX = 4096

_BUFFER_RE = re.compile(r"\b(\S+)\s+(?:model|KV|compute|output|RS)\s+buffer size\s*=\s*([\d.]+)\s*MiB")


def choose(
    path: Path,
    *,
    ctx_size: int | None,
    gpu_layers: int | None,
    device: str,
    free: int | None,
    min_ctx_size: int,
) -> tuple[MemoryEstimate, str | None]:
    """The configuration to load and what was reduced (``None``: nothing). Blocking (reads the header).

    ``free=None``: no fitting, the requested configuration. Otherwise, when
    it does not fit in ``free`` bytes, fewer GPU layers (on a GPU device),
    then half the context at a time down to ``min_ctx_size``; the first that
    fits wins. Raises :class:`InsufficientMemoryError` when none does.
    """
    info = read_gguf_info(path)
    ctx = ctx_size or info.context_length or DEFAULT_CTX
    wanted = _estimate(path, info, ctx, gpu_layers, device)
    if free is None or wanted.total <= free:
        return wanted, None
    smallest = wanted
    for candidate_ctx in _contexts(ctx, min_ctx_size):
        for layers in _layer_counts(info, gpu_layers, device):
            estimate = _estimate(path, info, candidate_ctx, layers, device)
            smallest = min(smallest, estimate, key=lambda e: e.total)
            if estimate.total <= free:
                return estimate, _reason(wanted, estimate, free)
    raise InsufficientMemoryError(
        f"{path.name} does not fit on {device}: it needs {smallest.total} bytes at the least "
        f"(context {smallest.ctx_size}, gpu layers {smallest.gpu_layers}), {free} bytes are free",
        memory=smallest.total, free=free, device=device,
    )  # fmt: skip


def _estimate(path: Path, info: GGUFInfo, ctx: int, layers: int | None, device: str) -> MemoryEstimate:
    return estimate_memory(path, ctx_size=ctx, gpu_layers=layers, device=device, info=info)


def _contexts(ctx: int, minimum: int) -> Iterable[int]:
    yield ctx
    while ctx // 2 >= minimum:
        ctx //= 2
        yield ctx


def _layer_counts(info: GGUFInfo, gpu_layers: int | None, device: str) -> Iterable[int | None]:
    """The GPU layer counts to try, most first: only the one asked for on the CPU."""
    if device == "cpu":
        yield gpu_layers
        return
    total = (info.block_count or 0) + 1
    top = total if gpu_layers is None or gpu_layers < 0 else min(gpu_layers, total)
    yield from range(top, -1, -1)


def _reason(wanted: MemoryEstimate, chosen: MemoryEstimate, free: int) -> str:
    parts = []
    if chosen.gpu_layers != wanted.gpu_layers:
        parts.append(f"gpu layers {wanted.gpu_layers if wanted.gpu_layers is not None else 'all'} -> {chosen.gpu_layers}")
    if chosen.ctx_size != wanted.ctx_size:
        parts.append(f"context {wanted.ctx_size} -> {chosen.ctx_size}")
    return (
        f"reduced {', '.join(parts)}: {wanted.total} bytes needed, {free} free; {chosen.total} bytes fit"
    )


def measured_memory(lines: Iterable[str], device: str) -> int | None:
    """Bytes of the buffers llama-server logged for ``device`` (model, KV cache, compute), ``None`` if none.

    On ``"cpu"`` the host buffers count (``CPU``, ``CPU_Mapped``, ...), on a
    GPU device the others (``CUDA0``, ``ROCm0``, ``Vulkan0`` ...).
    """
    total = 0.0
    found = False
    for line in lines:
        for match in _BUFFER_RE.finditer(line):
            on_host = match.group(1).upper().startswith("CPU")
            if on_host == (device == "cpu"):
                total += float(match.group(2))
                found = True
    return round(total * 2**20) if found else None
