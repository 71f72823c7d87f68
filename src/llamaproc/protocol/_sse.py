"""Server-sent events, sans-io: bytes in, the ``data`` of each complete event out.

One framer for every reader of llama-server's streams: the library client (over
httpx), the daemon's HTTP relay and its socket relay (over the daemon's upstream
client) all feed the bytes they receive to an :class:`SSEDecoder`.
"""

from __future__ import annotations

from ..errors import ServerError

__all__ = ["MAX_EVENT_SIZE", "SSEDecoder", "sse_events"]

#: Most bytes one event (or what is held of an unfinished one) may take: a stream that sends more
#: without a blank line is not an event stream llama-server would send.
MAX_EVENT_SIZE = 16 * 1024 * 1024


def sse_events(data: bytes) -> tuple[list[bytes], bytes]:
    """Split a server-sent event stream: the ``data`` of each complete event in ``data``, and the rest.

    ``data`` is what the previous call left over followed by the new bytes.
    Lines end with LF, CRLF or CR; several ``data:`` lines of one event are
    joined with LF; comment lines (``:``) and other fields are skipped, and
    an event without data is no event. A CR at the very end is kept for the
    next call, which tells whether an LF follows it. The data stays bytes:
    JSON parsers take bytes, and a relay passes them on as they are.
    """
    held = b""
    if b"\r" in data:
        if data.endswith(b"\r"):
            data, held = data[:-1], b"\r"
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    end = data.rfind(b"\n\n")
    if end < 0:
        return [], data + held
    events: list[bytes] = []
    for block in data[:end].split(b"\n\n"):
        parts = []
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                parts.append(line[6:] if line.startswith(b"data: ") else line[5:])
            elif line == b"data":
                parts.append(b"")
        if parts:
            events.append(parts[0] if len(parts) == 1 else b"\n".join(parts))
    return events, data[end + 2 :] + held


class SSEDecoder:
    """Incremental :func:`sse_events`: :meth:`feed` the bytes as they come, get the complete events.

    What is held of an unfinished event is bounded by ``max_event_size``;
    more raises :class:`~llamaproc.ServerError`.
    """

    __slots__ = ("_pending", "max_event_size")

    def __init__(self, *, max_event_size: int = MAX_EVENT_SIZE) -> None:
        self._pending = b""
        self.max_event_size = max_event_size

    def feed(self, data: bytes) -> list[bytes]:
        """The data of every event completed by ``data``."""
        events, pending = sse_events(self._pending + data if self._pending else data)
        if len(pending) > self.max_event_size:
            self._pending = b""
            raise ServerError(f"an event of the stream is larger than {self.max_event_size} bytes")
        self._pending = pending
        return events

    def end(self) -> list[bytes]:
        """At the end of the body: the events completed by a line end held back (a CR that no LF followed)."""
        pending, self._pending = self._pending, b""
        if pending.endswith(b"\r"):
            return sse_events(pending[:-1] + b"\n")[0]
        return []

    @property
    def pending(self) -> bytes:
        """The bytes of the event not yet complete."""
        return self._pending
