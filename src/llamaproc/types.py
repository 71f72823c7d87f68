"""Typed results.

Per-request and per-server results are pydantic models. :class:`Token`, made
once per streamed token on the hot path, is a slotted dataclass: building a
pydantic model for every token would cost more than parsing its JSON, and a
frozen dataclass takes three times as long to build as a plain one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Completion",
    "Device",
    "GGUFInfo",
    "Health",
    "MemoryEstimate",
    "ModelInfo",
    "Placement",
    "RequestMetrics",
    "Reshard",
    "Shard",
    "Timings",
    "Token",
    "Usage",
]


@dataclass(slots=True)
class Token:
    """One streamed piece of generated text.

    ``id`` is the token id where the endpoint reports it (native
    ``/completion``), else ``None`` (OpenAI-style endpoints).
    """

    text: str
    id: int | None = None


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Health(_Model):
    """``GET /health``: ``status`` is ``"ok"`` when ready, ``"loading"`` while the model loads."""

    status: Literal["ok", "loading"]


class Timings(_Model):
    """llama-server's own timings for one request (``timings`` in its answers)."""

    prompt_n: int = 0
    prompt_ms: float = 0.0
    prompt_per_second: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    predicted_per_second: float = 0.0
    cache_n: int = 0


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class RequestMetrics(_Model):
    """What one generation cost: tokens in and out, prefill and decode time and speed."""

    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int = 0
    prefill_ms: float
    decode_ms: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float

    @classmethod
    def from_timings(cls, timings: Timings) -> RequestMetrics:
        return cls(
            prompt_tokens=timings.prompt_n,
            generated_tokens=timings.predicted_n,
            cached_tokens=timings.cache_n,
            prefill_ms=timings.prompt_ms,
            decode_ms=timings.predicted_ms,
            prefill_tokens_per_s=timings.prompt_per_second,
            decode_tokens_per_s=timings.predicted_per_second,
        )


class Completion(_Model):
    """The whole answer of a non-streamed request, or the summary of a finished stream."""

    text: str
    finish_reason: str | None = None
    usage: Usage = Field(default_factory=Usage)
    timings: Timings | None = None
    token_ids: list[int] | None = None

    @property
    def metrics(self) -> RequestMetrics | None:
        return RequestMetrics.from_timings(self.timings) if self.timings is not None else None


class GGUFInfo(_Model):
    """What a GGUF file says about itself (read with the ``gguf`` package)."""

    path: str
    name: str | None = None
    architecture: str | None = None
    file_type: str | None = None
    size_bytes: int
    context_length: int | None = None
    embedding_length: int | None = None
    block_count: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None
    pooling_type: str | None = None
    vocab_size: int | None = None
    parameter_count: int | None = None
    chat_template: str | None = None


class ModelInfo(_Model):
    """A loaded model: its file's metadata and the server's ``/props``."""

    gguf: GGUFInfo
    props: dict[str, Any]
    pid: int | None
    base_url: str
    binary: str
    flavour: str


# --- sharded models --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Device:
    """A compute device an rpc worker offers: its name and memory in bytes (from the worker's banner or an RPC probe)."""

    name: str
    total: int
    free: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "total": self.total, "free": self.free}


@dataclass(frozen=True, slots=True)
class Shard:
    """The layers one worker holds, in pipeline order.

    ``layers`` follows llama.cpp's numbering: the repeating layers are
    ``0 .. n_layer - 1`` and the output layer is ``n_layer``. In JSON a range
    is ``{"start": a, "stop": b}``.
    """

    address: str
    layers: range

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "layers": {"start": self.layers.start, "stop": self.layers.stop}}


@dataclass(frozen=True, slots=True)
class Reshard:
    """One recovery of a sharded stream from lost workers.

    ``after_tokens`` is how many tokens the stream had delivered when it
    happened, ``lost`` the addresses evicted, ``layout`` the new plan
    (empty: every layer on the coordinator), ``seconds`` the time from
    detection to the next token, split into ``detect_seconds`` (from the last
    token to detection), ``restart_seconds`` (probing and the new
    coordinator) and ``replay_seconds`` (rebuilding the stream's context).
    ``reason`` says what was seen: the coordinator exited, or no token came
    for ``stall_timeout``.
    """

    after_tokens: int
    lost: list[str]
    layout: list[Shard]
    seconds: float
    detect_seconds: float = 0.0
    restart_seconds: float = 0.0
    replay_seconds: float = 0.0
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "after_tokens": self.after_tokens,
            "lost": list(self.lost),
            "layout": [shard.to_json() for shard in self.layout],
            "seconds": self.seconds,
            "detect_seconds": self.detect_seconds,
            "restart_seconds": self.restart_seconds,
            "replay_seconds": self.replay_seconds,
            "reason": self.reason,
        }


# --- memory --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """What a model needs on one device, in bytes, estimated from its GGUF header.

    ``weights`` (the file's tensors on that device), ``kv_cache`` (for
    ``ctx_size`` tokens, shared by the slots) and ``compute`` (a margin for
    llama.cpp's compute buffers). ``total`` is their sum.
    """

    weights: int
    kv_cache: int
    compute: int
    ctx_size: int
    gpu_layers: int | None

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute


@dataclass(frozen=True, slots=True)
class Placement:
    """Where and how a model loaded through a ledger runs (``model.placement``).

    ``memory`` is the bytes its lease holds: the estimate, or the figure
    llama-server reported after the load. ``reason`` says what ``fit=True``
    reduced to make it fit (``None`` when nothing was).
    """

    device: str
    ctx_size: int
    gpu_layers: int | None
    memory: int
    reason: str | None = None
