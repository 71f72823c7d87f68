"""Newline-delimited JSON, sans-io: the daemon's socket protocol's framing and encoding.

:class:`LineDecoder` turns the bytes a client sends into request lines,
bounded: a line longer than ``max_line`` is skipped up to its newline and
reported once (as ``None``), so a client can never make the daemon hold more
than ``max_line`` bytes of one line. :func:`encode_event` writes one answer
line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["LineDecoder", "encode_event"]


class LineDecoder:
    """Lines out of a byte stream: :meth:`feed` the bytes as they come, :meth:`end` at the end of input.

    Each item is a complete line without its ``\\n`` (a ``\\r`` before it is
    kept: JSON ignores it), or ``None`` for a line longer than ``max_line``
    bytes, reported when the limit is passed and skipped up to its newline.
    """

    __slots__ = ("_buf", "_skipping", "max_line")

    def __init__(self, *, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._skipping = False  # inside a line that is too long: drop bytes up to its newline

    def feed(self, data: bytes) -> list[bytes | None]:
        out: list[bytes | None] = []
        max_line = self.max_line
        buf = self._buf
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                if not self._skipping:
                    if len(buf) + len(data) - start > max_line:
                        self._skipping = True
                        buf.clear()
                        out.append(None)
                    else:
                        buf += data[start:]
                return out
            if self._skipping:
                self._skipping = False
            elif len(buf) + nl - start > max_line:
                buf.clear()
                out.append(None)
            elif buf:
                buf += data[start:nl]
                out.append(bytes(buf))
                buf.clear()
            else:
                out.append(data[start:nl])
            start = nl + 1

    def end(self) -> list[bytes | None]:
        """The last line, if the input ended without its newline."""
        line, self._buf = bytes(self._buf), bytearray()
        skipping, self._skipping = self._skipping, False
        return [line] if line and not skipping else []


def encode_event(event: Mapping[str, Any]) -> bytes:
    """One answer line: compact JSON and ``\\n``; a lone surrogate (half a character) is escaped, never sent
    as invalid UTF-8."""
    try:
        return (json.dumps(event, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:
        return (json.dumps(event) + "\n").encode()
