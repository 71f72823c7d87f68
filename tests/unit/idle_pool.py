"""A stand-in for the model pool: what the daemon's app asks of it to start and to serve its non-model routes."""

from __future__ import annotations

from typing import Any

from llamaproc.runtime import ServeConfig


class FakePool:
    """One configured model, never loaded, nothing in flight."""

    draining = False
    closed = False
    config = ServeConfig.model_validate({"models": {"tiny": {"path": "/nonexistent/tiny.gguf"}}})

    def names(self) -> list[str]:
        return ["tiny"]

    def status(self) -> list[Any]:
        return []
