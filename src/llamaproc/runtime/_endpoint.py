"""What the runtime supervises: an *endpoint*, something that serves llama-server's HTTP API.

A :class:`~llamaproc.TextModel` (one llama-server process) is one; a model
split over several machines (one llama-server and its rpc workers) is
another. The supervisor, the pool and the daemon's relays use only what this
protocol offers, so a new kind of endpoint needs no change to them:

* **start / ready**: a *loader* (``await loader(path, **options)``, like
  :func:`llamaproc.load_model`) returns an endpoint once it serves;
* **where to send requests**: :attr:`Endpoint.base_url`, with
  :attr:`Endpoint.api_key` as the bearer credential its server wants;
* **health**: :meth:`Endpoint.health` (the supervisor's probe) and
  :meth:`Endpoint.progress` (CPU time: busy, or hung?);
* **failure**: :meth:`Endpoint.wait` returns once it has died,
  :meth:`Endpoint.describe_exit` says how, :meth:`Endpoint.explain` turns a
  request's failure into what really happened (crashed, hung, closed), and
  :meth:`Endpoint.kill` stops a hung one at once;
* **stop**: :meth:`Endpoint.close`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

from ..errors import LlamaprocError
from ..types import Health

__all__ = ["Endpoint", "Loader"]


@runtime_checkable
class Endpoint(Protocol):
    """A running server of llama-server's HTTP API, as the runtime sees it."""

    @property
    def base_url(self) -> str:
        """Where requests go: ``http://HOST:PORT``."""
        ...

    @property
    def api_key(self) -> str | None:
        """The key its server wants as ``Authorization: Bearer KEY`` (``None``: none)."""
        ...

    @property
    def pid(self) -> int | None:
        """The main process, for status reports (``None`` when there is none to show)."""
        ...

    @property
    def returncode(self) -> int | None:
        """``None`` while it runs; its exit status once it has died."""
        ...

    async def health(self) -> Health:
        """Probe it; raises a :class:`~llamaproc.LlamaprocError` when it does not answer."""
        ...

    def progress(self) -> float | None:
        """CPU seconds it has used so far (``None``: unknown). Growth means work, not a hang."""
        ...

    async def wait(self) -> int | None:
        """Return once it has died (its exit status). Cancellable; does not stop it."""
        ...

    def describe_exit(self) -> str:
        """One line that says how it ended (exit status, the last lines of its output)."""
        ...

    async def explain(self, error: LlamaprocError) -> LlamaprocError:
        """What a request's failure means: a crash, a hang or a close seen behind a cut connection."""
        ...

    def kill(self, reason: str) -> None:
        """Stop it at once because it hangs; :meth:`explain` and :meth:`describe_exit` then say ``reason``."""
        ...

    async def close(self) -> None:
        """Stop it (gracefully, then by force). Idempotent, shielded from cancellation."""
        ...


#: Called like :func:`llamaproc.load_model` (a path, then keywords); returns an endpoint that serves.
Loader = Callable[..., Awaitable[Any]]
