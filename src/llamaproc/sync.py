"""A synchronous convenience for scripts and notebooks.

::

    from llamaproc.sync import load_model

    with load_model("model.gguf") as model:
        for tok in model.generate("Once upon a time", max_tokens=32):
            print(tok.text, end="")

The async model runs on an event loop in a background thread (an anyio
blocking portal) owned by the :class:`SyncTextModel`; ``close()`` (or leaving
the ``with`` block, or the interpreter exiting) stops the server and the
thread.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from functools import partial
from typing import Any

from anyio.from_thread import BlockingPortal, start_blocking_portal

from .client import TokenStream
from .errors import LlamaprocError
from .model import TextModel
from .model import load_model as _async_load_model
from .types import Completion, ModelInfo, RequestMetrics, Shard, Token

__all__ = ["SyncTextModel", "load_model"]


class SyncTextModel:
    """The blocking twin of :class:`llamaproc.TextModel`. Made by :func:`load_model`."""

    def __init__(self, model: TextModel, portal: BlockingPortal, portal_cm: AbstractContextManager[BlockingPortal]):
        self._model = model
        self._portal = portal
        self._portal_cm = portal_cm
        self._closed = False
        atexit.register(self.close)

    @property
    def model(self) -> TextModel:
        """The underlying async model (use it only on the portal's loop)."""
        return self._model

    @property
    def pid(self) -> int:
        return self._model.pid

    @property
    def base_url(self) -> str:
        return self._model.base_url

    @property
    def returncode(self) -> int | None:
        """The child's exit status once it has exited, else ``None``."""
        return self._model.returncode

    @property
    def layout(self) -> list[Shard]:
        """Which rpc worker holds which layers (``load_model(..., workers=...)``); empty for one process."""
        return self._model.layout

    @property
    def last_metrics(self) -> RequestMetrics | None:
        """Metrics of the last request that finished."""
        return self._model.last_metrics

    @property
    def last_error(self) -> LlamaprocError | None:
        """The last error a call on this model raised."""
        return self._model.last_error

    def __enter__(self) -> SyncTextModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _iterate(self, stream: TokenStream) -> Iterator[Token]:
        try:
            while True:
                try:
                    token: Token = self._portal.call(stream.__anext__)
                except StopAsyncIteration:
                    return
                yield token
        finally:
            self._portal.call(stream.aclose)

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> Iterator[Token]:
        """Yield tokens as they come; see :meth:`llamaproc.TextModel.generate`."""
        return self._iterate(self._model.generate(prompt, **kwargs))

    def chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> Iterator[Token]:
        """Yield the reply's tokens as they come; see :meth:`llamaproc.TextModel.chat`."""
        return self._iterate(self._model.chat(messages, **kwargs))

    def complete(self, prompt: str | Sequence[int], **kwargs: Any) -> Completion:
        result: Completion = self._portal.call(partial(self._model.complete, prompt, **kwargs))
        return result

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        result: list[list[float]] = self._portal.call(self._model.embed, texts)
        return result

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        result: list[int] = self._portal.call(partial(self._model.tokenize, text, add_special=add_special))
        return result

    def detokenize(self, tokens: Sequence[int]) -> str:
        result: str = self._portal.call(self._model.detokenize, tokens)
        return result

    def info(self) -> ModelInfo:
        result: ModelInfo = self._portal.call(self._model.info)
        return result

    def close(self) -> None:
        """Stop the server, then the event-loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            self._portal.call(self._model.close)
        finally:
            self._portal_cm.__exit__(None, None, None)


def load_model(path: str | os.PathLike[str], **kwargs: Any) -> SyncTextModel:
    """Blocking :func:`llamaproc.load_model`; takes the same keyword options."""
    portal_cm = start_blocking_portal()
    portal = portal_cm.__enter__()
    try:
        model: TextModel = portal.call(partial(_async_load_model, path, **kwargs))
    except BaseException as exc:
        portal_cm.__exit__(type(exc), exc, exc.__traceback__)
        raise
    return SyncTextModel(model, portal, portal_cm)
