"""The transport-free pieces of stream reading: SSE framing (``sse_events``) and ``EventParser``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llamaproc import IncompleteStreamError, ServerError, StreamError
from llamaproc.protocol import EventParser, SSEDecoder, sse_events
from llamaproc.types import Completion, Timings, Token, Usage


def feed(pieces: list[bytes]) -> tuple[list[bytes], bytes]:
    """Every event of ``pieces`` fed one after the other, as a reader does; and what is left."""
    events: list[bytes] = []
    pending = b""
    for piece in pieces:
        new, pending = sse_events(pending + piece)
        events += new
    return events, pending


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


STREAM = (
    ': ping\n\ndata: {"content":"Grüße"}\n\n'  # a comment alone is no event
    "event: message\nid: 7\nretry: 10\ndata: 🦙\n\n"  # other fields are skipped
    "data: one\ndata:two\ndata\n\n"  # several data lines; no space after the colon; a bare "data"
    ": note\ndata: [DONE]\n: after\n\n"
    "event: empty\n\n"  # no data: no event
    "data: unfinished"
)
EVENTS = [e.encode() for e in ['{"content":"Grüße"}', "🦙", "one\ntwo\n", "[DONE]"]]


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 10_000])
def test_events_from_any_split(newline: str, size: int) -> None:
    data = STREAM.replace("\n", newline).encode()
    events, rest = feed(split_every(data, size))
    assert events == EVENTS
    assert rest == b"data: unfinished"  # an event is complete at its blank line, not before


def test_one_call_gives_every_complete_event() -> None:
    assert sse_events(b"data: a\n\ndata: b\n\ndata: c\n") == ([b"a", b"b"], b"data: c\n")
    assert sse_events(b"data: a\n") == ([], b"data: a\n")
    assert sse_events(b"") == ([], b"")
    assert sse_events(b"\n\n\n\ndata: x\n\n\n") == ([b"x"], b"")


def test_a_cr_at_the_end_waits_for_the_next_bytes() -> None:
    # "\r" then "\n" is one line end (CRLF) ...
    assert sse_events(b"data: a\r") == ([], b"data: a\r")
    assert sse_events(b"data: a\r" + b"\ndata: b\r\n\r\n") == ([b"a\nb"], b"")
    # ... "\r" then anything else is a line end of its own.
    assert feed([b"data: a\r", b"\r"]) == ([], b"data: a\n\r")
    assert feed([b"data: a\r", b"\r", b"data: b\r\r"]) == ([b"a"], b"data: b\n\r")
    assert feed([b"data: a\r", b"\r", b"data: b\r\r", b"data: c"]) == ([b"a", b"b"], b"data: c")


def test_bytes_that_are_not_utf8_are_kept_and_refused_by_the_parser() -> None:
    assert sse_events(b"data: \xff!\n\n") == ([b"\xff!"], b"")
    with pytest.raises(ServerError, match="malformed"):
        EventParser("native").parse(b'{"content": "\xff"}')


def test_the_decoder_bounds_an_unfinished_event() -> None:
    decoder = SSEDecoder(max_event_size=10)
    assert decoder.feed(b"data: 12345\n\n") == [b"12345"]
    with pytest.raises(ServerError, match="larger than 10 bytes"):
        decoder.feed(b"data: " + b"x" * 20)


def test_the_decoder_ends_an_event_held_by_a_last_cr() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == []  # the second CR may be the start of a CRLF
    assert decoder.end() == [b"a"]
    assert decoder.end() == []


def test_a_character_split_between_reads_is_whole() -> None:
    data = "data: 日本\n\n".encode()
    events, rest = feed([data[:7], data[7:]])  # inside 日
    assert (events, rest) == (["日本".encode()], b"")


# --- EventParser ---------------------------------------------------------------------------------

TIMINGS = {"prompt_n": 7, "prompt_ms": 1.0, "predicted_n": 2, "predicted_ms": 2.0, "cache_n": 1}


def native_event(content: str, *ids: int) -> str:
    return json.dumps({"content": content, "tokens": list(ids), "stop": False})


def native_final(content: str = "") -> str:
    return json.dumps(
        {
            "content": content,
            "tokens": [],
            "stop": True,
            "stop_type": "limit",
            "tokens_evaluated": 7,
            "tokens_predicted": 2,
            "timings": TIMINGS,
        }
    )


def chat_event(content: str | None, finish: str | None = None, **extra: Any) -> str:
    delta = {} if content is None else {"content": content}
    return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})


def test_native_tokens_ids_and_summary() -> None:
    parser = EventParser("native")
    assert parser.parse(native_event("He", 10)) == Token("He", 10)
    assert parser.parse(native_event("", 11, 12)) is None  # several ids, no text: nothing to show
    assert parser.parse(native_event("llo", 13)) == Token("llo", 13)
    assert not parser.done
    assert parser.parse(native_final("!")) == Token("!")  # the final event's text has no id
    assert parser.done
    assert parser.summary() == Completion(
        text="Hello!",
        finish_reason="limit",
        usage=Usage(prompt_tokens=7, completion_tokens=2, total_tokens=9),
        timings=Timings.model_validate(TIMINGS),
        token_ids=[10, 11, 12, 13],
    )


def test_chat_tokens_and_summary_with_usage_from_timings() -> None:
    parser = EventParser("chat")
    assert parser.parse(chat_event("Hi")) == Token("Hi")
    assert parser.parse(chat_event(None, "length")) is None
    assert parser.parse(chat_event(" there")) == Token(" there")  # text after the finish reason still counts
    assert parser.parse(json.dumps({"choices": [], "timings": TIMINGS})) is None
    assert not parser.done
    assert parser.parse("[DONE]") is None
    assert parser.done
    summary = parser.summary()
    assert (summary.text, summary.finish_reason) == ("Hi there", "length")
    # No usage in the stream: it is made from the timings (cached prompt tokens included).
    assert summary.usage == Usage(prompt_tokens=8, completion_tokens=2, total_tokens=10)


def test_a_stream_without_final_data_has_a_plain_summary() -> None:
    parser = EventParser("chat")
    parser.parse(chat_event("x"))
    assert parser.summary() == Completion(text="x")


@pytest.mark.parametrize("kind", ["native", "chat"])
def test_error_event(kind: Any) -> None:
    parser = EventParser(kind)
    with pytest.raises(StreamError, match="boom"):
        parser.parse(json.dumps({"error": {"code": 500, "message": "boom", "type": "server_error"}}))


@pytest.mark.parametrize("data", ["{oops", "[1, 2]", "3", '{"choices": 5}', json.dumps({"choices": [{"delta": 1}]})])
def test_malformed_events_are_server_errors(data: str) -> None:
    with pytest.raises(ServerError, match="malformed answer from llama-server") as info:
        EventParser("chat").parse(data)
    assert isinstance(info.value.__cause__, (ValueError, TypeError, AttributeError))


def test_malformed_timings_are_server_errors() -> None:
    final = json.loads(native_final())
    final["timings"] = {"prompt_n": "many"}
    with pytest.raises(ServerError, match="malformed"):
        EventParser("native").parse(json.dumps(final))


def test_after_the_end_only_error_events_count() -> None:
    parser = EventParser("native")
    parser.parse(native_final())
    for data in ("[DONE]", "{oops", '{"content": "more"}', "[1]"):
        parser.after_end(data)
    with pytest.raises(StreamError, match="second prompt"):
        parser.after_end(json.dumps({"error": {"code": 400, "message": "second prompt failed"}}))


def test_incomplete() -> None:
    assert str(EventParser("native").incomplete()) == "the stream ended without its final event"
    error = EventParser("chat").incomplete()
    assert isinstance(error, IncompleteStreamError) and str(error).endswith("([DONE])")
