"""The blocking API, llamaproc.sync, against the real llama-server."""

from __future__ import annotations

from pathlib import Path

import pytest

import llamaproc
from llamaproc.sync import load_model


def test_sync_model_calls_and_properties(tiny_model: Path) -> None:
    with load_model(tiny_model) as model:
        assert model.returncode is None
        assert model.last_metrics is None and model.last_error is None
        tokens = list(model.generate("hello world", max_tokens=6))
        assert len(tokens) == 6
        assert model.last_metrics is not None and model.last_metrics.generated_tokens == 6
        ids = [t.id for t in tokens if t.id is not None]
        assert model.detokenize(ids) == "".join(t.text for t in tokens)
        assert model.tokenize("hello world") and model.complete("hello world", max_tokens=2).text
        with pytest.raises(llamaproc.StatusError) as info:
            model.embed(["no embeddings here"])
        assert model.last_error is info.value
        for _ in model.generate("hello world", max_tokens=100):
            break  # leaves the stream: the next call is served at once
        assert model.complete("hello", max_tokens=1).usage.completion_tokens == 1
    assert model.returncode is not None
