"""How much memory a model needs, estimated from its GGUF header.

The one estimator of the package: :func:`load_model` asks a ledger for this
much, and the daemon's ``memory_budget`` counts its models with it. An
estimate, not a measurement: a model loaded through a ledger corrects its
lease with the buffer sizes llama-server reports once it is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..types import GGUFInfo, MemoryEstimate
from ._backend import read_gguf_info

__all__ = ["COMPUTE_FLOOR", "estimate_memory"]

#: The smallest compute margin (bytes): llama.cpp's scheduler reserves a few MiB even for a tiny model.
COMPUTE_FLOOR = 8 * 2**20
#: Tokens llama.cpp computes at once (its default ``--ubatch-size``), which sizes the compute buffers.
_UBATCH = 512


def estimate_memory(
    path: str | os.PathLike[str],
    *,
    ctx_size: int | None = None,
    gpu_layers: int | None = None,
    device: str = "cpu",
    info: GGUFInfo | None = None,
) -> MemoryEstimate:
    """Bytes the GGUF at ``path`` needs on ``device`` with a context of ``ctx_size`` tokens.

    Weights: the file size. KV cache: 2 (K and V) × layers × context ×
    (embedding width / heads × KV heads) × 2 bytes (f16), for ``ctx_size``
    tokens in all (the total shared by the slots; ``None`` or 0: the model's
    trained context). Compute: a margin for llama.cpp's compute buffers, one
    micro-batch of logits and activations (at least :data:`COMPUTE_FLOOR`).

    On ``device="cpu"`` everything counts. On any other device only what
    ``gpu_layers`` offloads does (``None`` or a negative number: all of it): a
    share of the weights (the output layer counts as one more layer, as in
    ``-ngl``) and of the KV cache, and the compute margin when anything is
    offloaded. Metadata that is missing counts as no KV cache. Reads the
    file's header (blocking); ``info`` skips that when it was read already.
    Raises :class:`ModelFileError` for a file that is not GGUF.
    """
    if info is None:
        info = read_gguf_info(Path(path))
    ctx = ctx_size or info.context_length or 0
    layers = info.block_count or 0
    width = info.embedding_length or 0
    heads = info.head_count or 0
    kv_heads = info.head_count_kv or heads
    kv_width = width // heads * kv_heads if heads else width
    weights = info.size_bytes
    kv_cache = 2 * layers * ctx * kv_width * 2
    compute = max(COMPUTE_FLOOR, _UBATCH * 4 * ((info.vocab_size or 0) + 4 * width))
    if device != "cpu" and gpu_layers is not None and gpu_layers >= 0:
        total_layers = layers + 1  # the repeating layers and the output layer, as -ngl counts them
        offloaded = min(gpu_layers, total_layers)
        weights = weights * offloaded // total_layers
        kv_cache = kv_cache * min(offloaded, layers) // layers if layers else 0
        compute = compute if offloaded else 0
    return MemoryEstimate(weights=weights, kv_cache=kv_cache, compute=compute, ctx_size=ctx, gpu_layers=gpu_layers)
