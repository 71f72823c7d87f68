"""The daemon's live event feed, ``GET /api/events``: what happens in it, as server-sent events.

What is published (each an SSE ``event:`` name with a JSON ``data:`` line):

- ``model``: a model's supervisor changed state (``{"model", "event"}``, the
  event one of ``loading``, ``serving``, ``crashed``, ``load_failed``,
  ``restarting``, ``failed``, ``stopped``: the pool's ``on_change``);
- ``worker``: an rpc worker was registered, assigned, released, lost or
  removed (``{"change", ...}`` with the worker as ``GET /api/workers`` shows it);
- ``reshard``: a sharded model recovered from lost workers (``{"model", ...}``
  with the :class:`~llamaproc.types.Reshard`'s fields);
- ``token``: one token of a stream the daemon relays, HTTP or socket
  (``{"model", "request", "text", "layout"}``; ``request`` is the feed's own
  id of the stream, ``layout`` the key of the worker layout that produced the
  token for a sharded model, else ``null``);
- ``resume``: a stream continued after a reshard (``{"model", "request",
  "layout", "reshard"}``); ``end``: a stream the feed showed ended
  (``{"model", "request", "status", "tokens"}``);
- ``subscribed`` first (``{"buffer"}``), and ``dropped`` (``{"count"}``)
  before the events that follow a loss.

Each subscriber has a buffer of at most ``buffer`` events. One that reads too
slowly loses the oldest events, and the next thing it reads is a ``dropped``
event counting them: the feed never waits for a subscriber, and never grows.
At most ``max_subscribers`` subscribe at once; a subscriber that disconnects is
forgotten at once; :meth:`EventFeed.close` (at the daemon's shutdown) ends
every subscription.

The hot path pays almost nothing while nobody subscribes: a relayed stream
tests :attr:`EventFeed.subscribers` (a list, empty then) per token, and builds
no event. Everything here runs on the daemon's event loop: no locks.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import Sequence
from typing import Any

import anyio

from ..errors import LlamaprocError
from ..types import Reshard, Shard

__all__ = [
    "BUFFER",
    "MAX_SUBSCRIBERS",
    "EventFeed",
    "FeedClosedError",
    "FeedFullError",
    "StreamTap",
    "Subscriber",
    "frame",
    "layout_key",
]

#: Events one subscriber's buffer holds; a slower subscriber loses the oldest.
BUFFER = 1024
#: Subscribers at once; more are refused (503 ``too_many_subscribers``).
MAX_SUBSCRIBERS = 32


def frame(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event: its name and its data as one line of JSON."""
    return b"event: " + event.encode() + b"\ndata: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class Subscriber:
    """One reader of the feed: a bounded buffer of encoded events, and how many it lost since it last read."""

    __slots__ = ("_frames", "_limit", "_wake", "closed", "dropped")

    def __init__(self, limit: int) -> None:
        self._frames: deque[bytes] = deque()
        self._limit = limit
        self._wake: anyio.Event | None = None
        self.dropped = 0
        self.closed = False

    def push(self, data: bytes) -> bool:
        """Buffer one event; True when the oldest had to go to make room."""
        lost = len(self._frames) >= self._limit
        if lost:
            self._frames.popleft()
            self.dropped += 1
        self._frames.append(data)
        self._awake()
        return lost

    def close(self) -> None:
        self.closed = True
        self._awake()

    def _awake(self) -> None:
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    async def next(self, timeout: float) -> list[bytes] | None:
        """The events buffered (a ``dropped`` notice first if some were lost), waiting up to ``timeout``
        seconds for one; ``[]`` if none came, ``None`` once the feed is closed and everything was read."""
        if not self._frames and not self.dropped and not self.closed:
            self._wake = wake = anyio.Event()
            with anyio.move_on_after(timeout):
                await wake.wait()
            self._wake = None
        frames = list(self._frames)
        self._frames.clear()
        if self.dropped:
            frames.insert(0, frame("dropped", {"count": self.dropped}))
            self.dropped = 0
        if not frames and self.closed:
            return None
        return frames


class FeedFullError(LlamaprocError):
    """:data:`MAX_SUBSCRIBERS` subscribe already."""


class FeedClosedError(LlamaprocError):
    """The daemon is shutting down."""


class EventFeed:
    """What happens in the daemon, for the subscribers of ``GET /api/events``; see the module docs."""

    def __init__(self, *, buffer: int = BUFFER, max_subscribers: int = MAX_SUBSCRIBERS) -> None:
        if buffer < 1 or max_subscribers < 1:
            raise ValueError("buffer and max_subscribers must be >= 1")
        self.buffer = buffer
        self.max_subscribers = max_subscribers
        #: The subscribers now (always this list object): publishers test it, empty while nobody listens,
        #: before they build an event.
        self.subscribers: list[Subscriber] = []
        #: Events lost by slow subscribers since the start (a metric).
        self.dropped = 0
        self.closed = False
        self._ids = itertools.count(1)

    def publish(self, event: str, data: dict[str, Any]) -> None:
        """Send ``event`` to every subscriber (encoded once; nothing is done when nobody subscribes)."""
        if not self.subscribers:
            return
        encoded = frame(event, data)
        for subscriber in self.subscribers:
            if subscriber.push(encoded):
                self.dropped += 1

    def subscribe(self) -> Subscriber:
        """A new subscriber. Raises :class:`FeedClosedError` after :meth:`close`, :class:`FeedFullError`
        when ``max_subscribers`` subscribe already."""
        if self.closed:
            raise FeedClosedError("the daemon is shutting down")
        if len(self.subscribers) >= self.max_subscribers:
            raise FeedFullError(f"{len(self.subscribers)} clients follow /api/events already, the most there may be")
        subscriber = Subscriber(self.buffer)
        self.subscribers.append(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Forget ``subscriber`` (it disconnected). Unknown ones are ignored."""
        if subscriber in self.subscribers:
            self.subscribers.remove(subscriber)

    def close(self) -> None:
        """End every subscription (each reads what it has, then its feed ends) and refuse new ones."""
        self.closed = True
        for subscriber in self.subscribers:
            subscriber.close()

    def tap(self, model: str, layout: Sequence[Shard] | None = None) -> StreamTap:
        """The publisher of one stream's tokens (``layout``: a sharded model's, as the stream starts)."""
        return StreamTap(self, model, layout)

    def new_id(self) -> str:
        return f"r{next(self._ids)}"


def layout_key(layout: Sequence[Shard] | None) -> str | None:
    """A short name of a worker layout (``None``: the model is not sharded), the same for the same layout."""
    if layout is None:
        return None
    if not layout:
        return "coordinator"
    return " ".join(f"{s.address}[{s.layers.start}-{s.layers.stop}]" for s in layout)


class StreamTap:
    """Publishes one relayed stream's tokens, resumes and end. The stream gets its id, and its layout's key
    is computed, only once someone subscribes: a stream nobody watches publishes nothing.

    Callers test ``feed.subscribers`` before :meth:`token` (the per-token path)."""

    __slots__ = ("_layout", "ended", "feed", "id", "model", "tokens")

    def __init__(self, feed: EventFeed, model: str, layout: Sequence[Shard] | None) -> None:
        self.feed = feed
        self.model = model
        self.id: str | None = None
        self.tokens = 0
        self.ended = False
        self._layout: Sequence[Shard] | str | None = layout

    def _key(self) -> str | None:
        if self._layout is None or isinstance(self._layout, str):
            return self._layout
        self._layout = layout_key(self._layout)
        return self._layout

    def token(self, text: str) -> None:
        if self.id is None:
            self.id = self.feed.new_id()
        self.tokens += 1
        self.feed.publish("token", {"model": self.model, "request": self.id, "text": text, "layout": self._key()})

    def resume(self, reshard: Reshard) -> None:
        """The stream continues on ``reshard.layout``."""
        self._layout = reshard.layout
        if self.feed.subscribers:
            if self.id is None:
                self.id = self.feed.new_id()
            data = {"model": self.model, "request": self.id, "layout": self._key(), "reshard": reshard.to_json()}
            self.feed.publish("resume", data)

    def end(self, status: str) -> None:
        """The stream ended (``done`` or ``failed``): told to subscribers that saw it. The first call counts."""
        if self.ended:
            return
        self.ended = True
        if self.id is not None and self.feed.subscribers:
            self.feed.publish("end", {"model": self.model, "request": self.id, "status": status, "tokens": self.tokens})
