"""The socket protocol's line framing, byte by byte."""

from __future__ import annotations

import json

import pytest

from llamaproc.protocol import LineDecoder, encode_event


def decode(data: bytes, size: int, max_line: int = 16) -> list[bytes | None]:
    decoder = LineDecoder(max_line=max_line)
    out: list[bytes | None] = []
    for i in range(0, len(data), size):
        out += decoder.feed(data[i : i + size])
    return out + decoder.end()


STREAM = b'{"op":"ping"}\n\n' + b"x" * 40 + b'\n{"a":1}\r\n' + b"y" * 17 + b"\nlast"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 17, 1000])
def test_lines_from_any_split(size: int) -> None:
    assert decode(STREAM, size) == [b'{"op":"ping"}', b"", None, b'{"a":1}\r', None, b"last"]


def test_a_line_of_exactly_the_limit_is_a_line() -> None:
    assert decode(b"z" * 16 + b"\n", 5) == [b"z" * 16]
    assert decode(b"z" * 17 + b"\n", 5) == [None]


def test_a_too_long_last_line_without_its_newline_is_reported_once_and_dropped() -> None:
    assert decode(b"a\n" + b"z" * 100, 9) == [b"a", None]


def test_memory_is_bounded_by_the_limit() -> None:
    decoder = LineDecoder(max_line=16)
    for _ in range(1000):
        decoder.feed(b"q" * 1000)
    assert len(decoder._buf) <= 16


def test_events_are_one_line_of_utf8() -> None:
    line = encode_event({"id": 1, "text": "Grüße\n"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"id": 1, "text": "Grüße\n"}
    surrogate = encode_event({"text": "\ud83d"})  # half a character: escaped, not invalid UTF-8
    surrogate.decode("utf-8")
    assert json.loads(surrogate) == {"text": "\ud83d"}
