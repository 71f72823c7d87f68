"""A loaded model: :class:`TextModel` (one process + one client) and :func:`load_model`."""

from ._model import TextModel, load_model

__all__ = ["TextModel", "load_model"]
