"""A loaded model: :class:`TextModel` (one process + one client), :class:`ShardedModel` (split over rpc
workers) and :func:`load_model`."""

from ._model import TextModel, load_model
from ._sharded import ShardedModel, resumable_error

__all__ = ["ShardedModel", "TextModel", "load_model", "resumable_error"]
