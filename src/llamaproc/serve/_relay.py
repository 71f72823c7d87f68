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
    :class:`StalledError` (``None``: wait for ever).
    """

    __slots__ = ("_cpu", "_silent", "decoder", "endpoint", "parser", "response", "stall_timeout")

    def __init__(
        self, response: UpstreamResponse, kind: StreamKind, *, endpoint: Endpoint, stall_timeout: float | None
    ) -> None:
        self.response = response
        self.endpoint = endpoint
        self.stall_timeout = stall_timeout
        self.parser = EventParser(kind)
        self.decoder = SSEDecoder()
        self._cpu: float | None = None
        self._silent = False

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

    async def _next_chunk(self) -> bytes | None:
        try:
            if self.stall_timeout is None:
                return await self.response.next_chunk()
            # Silence is watched in two halves: the endpoint's CPU time is read after the first
            # (only then: reading it costs more than a token) and compared after the second.
            self._cpu = None
            self._silent = False
            while True:
                with anyio.move_on_after(self.stall_timeout / 2):
                    return await self.response.next_chunk()
                self._check_progress()
        except UpstreamError as exc:
            raise IncompleteStreamError(f"the connection closed before the end of the stream ({exc})") from exc

    def _check_progress(self) -> None:
        """Nothing came for half the stall timeout: go on waiting while the endpoint works, else raise.

        An endpoint that reports no CPU time (a remote one) is judged by the silence alone.
        """
        assert self.stall_timeout is not None
        cpu = self.endpoint.progress()
        before, self._cpu = self._cpu, cpu
        if before is None and not self._silent:
            self._silent = True  # the first half: wait the second
            return
        if cpu is not None and before is not None and cpu - before >= STALL_CPU_FRACTION * self.stall_timeout / 2:
            return  # a long prompt (or another request) keeps it busy: not a hang
        raise StalledError(f"llama-server sent nothing for {self.stall_timeout:g} s and used no CPU time: it hangs")

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
