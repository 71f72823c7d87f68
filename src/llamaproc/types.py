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
    "GGUFInfo",
    "Health",
    "ModelInfo",
    "RequestMetrics",
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
