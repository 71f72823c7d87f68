"""The one way both front ends stream a generation from an endpoint.

The HTTP proxy and the socket protocol send their request with the
:class:`~llamaproc.serve.Upstream` client and read the answer through a
:class:`StreamReader`: the bytes are framed by the protocol's
:class:`~llamaproc.protocol.SSEDecoder` and parsed by its
:class:`~llamaproc.protocol.EventParser`, the same two the library's
:class:`~llamaproc.TokenStream` uses. What each front end does with the
events differs (the proxy passes them on, the socket writes token events);
how they are read, when a stream counts as ended, cut or stalled, and what
its failure means (:meth:`StreamReader.fail`) does not.
"""

from __future__ import annotations

import asyncio

import anyio

from ..errors import IncompleteStreamError, LlamaprocError, StalledError, TransportError
from ..protocol import EventParser, SSEDecoder, StreamKind, status_error
from ..runtime import Endpoint
from ..types import Completion, Token
from ._upstream import UpstreamError, UpstreamResponse

__all__ = ["END_OF_BODY_WAIT", "ERROR_BODY_LIMIT", "Event", "StreamReader", "auth_headers", "check_alive", "error_of"]

#: How much of an error answer is read.
ERROR_BODY_LIMIT = 64 * 1024
#: How long the end of the body is awaited after the final event (it normally follows at once).
END_OF_BODY_WAIT = 0.2
#: CPU time an endpoint must have used, as a fraction of the stall timeout, to count as working (a
#: long prompt being processed) rather than hung when nothing came for that long.
STALL_CPU_FRACTION = 0.05

#: One event of a stream: its data as it came, and the token it carries (if any).
Event = tuple[bytes, Token | None]


async def check_alive(endpoint: Endpoint) -> None:
    """Raise what the endpoint says of its death if it has died (a request to it would only fail)."""
    if endpoint.returncode is not None:
        raise await endpoint.explain(TransportError("the endpoint has exited"))


def auth_headers(endpoint: Endpoint) -> tuple[tuple[bytes, bytes], ...]:
    """The request headers that carry the endpoint's key."""
    key = endpoint.api_key
    return () if key is None else ((b"authorization", b"Bearer " + key.encode("latin-1")),)


async def error_of(response: UpstreamResponse, url: str) -> LlamaprocError:
    """The typed error for a non-2xx answer (its body read up to :data:`ERROR_BODY_LIMIT`)."""
    raw = b""
    try:
        while len(raw) <= ERROR_BODY_LIMIT and (chunk := await response.next_chunk()) is not None:
            raw += chunk
    except UpstreamError:
        pass
    return status_error(response.status, raw[:ERROR_BODY_LIMIT], url)


class StreamReader:
    """The events of one streamed answer of an endpoint, read until its final event.

    ``await reader.next_events()`` returns the events completed by the next
    piece of the answer, in order, and ``None`` once the final event was read
    (``[DONE]``, or native ``"stop": true``) and the end of the body after it.
    The final event's token, if any, comes in that last batch. A stream that
    ends without its final event raises :class:`IncompleteStreamError`; an
    error event :class:`~llamaproc.StreamError`; an answer that stops coming
    for ``stall_timeout`` seconds while the endpoint uses no CPU
    :class:`StalledError` (``None``: wait for ever). :meth:`close` when done.

    The stall is watched by a timer every half ``stall_timeout``, not by a
    deadline around each read: that would cost more than the rest of a
    token's relay. Two halves in a row with nothing received and no CPU time
    used by the endpoint make a stall (an endpoint that reports no CPU time,
    a remote one, is judged by the silence alone).
    """

    __slots__ = (
        "_chunks",
        "_cpu",
        "_seen",
        "_silent",
        "_stalled",
        "_timer",
        "decoder",
        "endpoint",
        "parser",
        "response",
        "stall_timeout",
    )

    def __init__(
        self, response: UpstreamResponse, kind: StreamKind, *, endpoint: Endpoint, stall_timeout: float | None
    ) -> None:
        self.response = response
        self.endpoint = endpoint
        self.stall_timeout = stall_timeout
        self.parser = EventParser(kind)
        self.decoder = SSEDecoder()
        self._chunks = 0  # pieces received so far
        self._seen = 0  # ... as the watchdog last saw them
        self._silent = False
        self._cpu: float | None = None
        self._stalled: StalledError | None = None
        self._timer: asyncio.TimerHandle | None = None
        if stall_timeout is not None:
            self._timer = asyncio.get_running_loop().call_later(stall_timeout / 2, self._watch)

    async def next_events(self) -> list[Event] | None:
        parser = self.parser
        if parser.done:
            return None
        chunk = await self._next_chunk()
        events = self.decoder.end() if chunk is None else self.decoder.feed(chunk)
        out: list[Event] = []
        for data in events:
            if parser.done:
                parser.after_end(data)
                continue
            out.append((data, parser.parse(data)))
        if parser.done:
            await self._read_to_end()
        elif chunk is None:
            raise parser.incomplete()
        return out

    def summary(self) -> Completion:
        """The usage and timings of a stream that ended normally."""
        return self.parser.summary()

    def close(self) -> None:
        """Stop watching and close the answer (which, unfinished, makes llama-server free the slot)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.response.close()

    async def _next_chunk(self) -> bytes | None:
        try:
            chunk = await self.response.next_chunk()
        except UpstreamError as exc:
            if self._stalled is not None:
                raise self._stalled from exc
            raise IncompleteStreamError(f"the connection closed before the end of the stream ({exc})") from exc
        self._chunks += 1
        return chunk

    def _watch(self) -> None:
        """Every half stall timeout: was anything received since the last look, or did the endpoint work?"""
        assert self.stall_timeout is not None
        half = self.stall_timeout / 2
        if self._chunks != self._seen:  # data came: the silence starts again
            self._seen = self._chunks
            self._silent = False
        else:
            cpu = self.endpoint.progress()
            before, self._cpu = self._cpu, cpu
            working = cpu is not None and before is not None and cpu - before >= STALL_CPU_FRACTION * half
            if self._silent and not working:
                self._timer = None
                self._stalled = StalledError(
                    f"llama-server sent nothing for {self.stall_timeout:g} s and used no CPU time: it hangs"
                )
                self.response.abort(UpstreamError("stalled"))
                return
            self._silent = True
        self._timer = asyncio.get_running_loop().call_later(half, self._watch)

    async def _read_to_end(self) -> None:
        """After the final event, read the end of the body, for a short while at most; an error event
        found there raises (as the library's streams do)."""
        with anyio.move_on_after(END_OF_BODY_WAIT):
            while True:
                try:
                    chunk = await self.response.next_chunk()
                except UpstreamError:
                    return  # the answer is complete; its connection may close as it likes
                if chunk is None:
                    return
                for data in self.decoder.feed(chunk):
                    self.parser.after_end(data)

    async def fail(self, exc: LlamaprocError) -> LlamaprocError:
        """What the failure ``exc`` of this stream means, asked of the endpoint (a crash, a hang ...).

        A stalled stream is the endpoint's hang: it is killed (its supervisor
        restarts it) and the error says so.
        """
        if isinstance(exc, StalledError):
            self.endpoint.kill(str(exc))
        return await self.endpoint.explain(exc)
