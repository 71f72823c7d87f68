"""Unit tests of the HTTP/SSE client against mocked llama-server answers.

Bodies are SSE bytes shaped like llama-server's own (captured from a real one),
served whole or through :class:`Body`, a streamed body that can split its
chunks, fail, hang until closed, and records whether httpx closed it. A few
tests use a raw TCP server to get httpx's real transport errors.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
import respx
from trio.testing import MockClock

from llamaproc import (
    ClosedError,
    Completion,
    Health,
    IncompleteStreamError,
    InvalidArgumentError,
    LlamaClient,
    LlamaprocError,
    ServerCrashedError,
    ServerError,
    ServerLoadingError,
    StatusError,
    StreamError,
    Timings,
    Token,
    TokenStream,
    TransportError,
    Usage,
    UsageError,
)
from llamaproc.client import END_OF_BODY_WAIT

# Leaving a stream early closes its response, but httpx (0.28) and httpcore never close
# the async generators they iterate a body with; trio warns about each. Only those.
pytestmark = pytest.mark.filterwarnings(r"ignore:Async generator '(httpx|httpcore)\.:ResourceWarning")

BASE = "http://llama.test"
SSE_HEADERS = {"content-type": "text/event-stream"}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=True, assert_all_mocked=True) as router:
        yield router


@pytest.fixture
async def client() -> AsyncIterator[LlamaClient]:
    async with LlamaClient(BASE) as client:
        yield client


# -- bodies shaped like llama-server's -----------------------------------------------------------

TIMINGS = {
    "cache_n": 0,
    "prompt_n": 7,
    "prompt_ms": 1.123,
    "prompt_per_token_ms": 0.16042857142857142,
    "prompt_per_second": 6233.303650934995,
    "predicted_n": 3,
    "predicted_ms": 1.16,
    "predicted_per_token_ms": 0.58,
    "predicted_per_second": 1724.1379310344828,
}

CHAT_TIMINGS = {
    "cache_n": 2,
    "prompt_n": 48,
    "prompt_ms": 2.263,
    "prompt_per_token_ms": 0.04714583333333333,
    "prompt_per_second": 21210.782147591694,
    "predicted_n": 2,
    "predicted_ms": 0.798,
    "predicted_per_token_ms": 0.798,
    "predicted_per_second": 1253.1328320802004,
}

TEXT_TIMINGS = {
    "cache_n": 1,
    "prompt_n": 1,
    "prompt_ms": 0.606,
    "prompt_per_token_ms": 0.606,
    "prompt_per_second": 1650.1650165016501,
    "predicted_n": 2,
    "predicted_ms": 0.468,
    "predicted_per_token_ms": 0.468,
    "predicted_per_second": 2136.7521367521367,
}


def native(content: str, *ids: int, predicted: int = 1) -> dict[str, Any]:
    return {
        "index": 0,
        "content": content,
        "tokens": list(ids),
        "stop": False,
        "id_slot": -1,
        "tokens_predicted": predicted,
        "tokens_evaluated": 7,
    }


def native_final(content: str = "", *, predicted: int = 3, stop_type: str = "limit") -> dict[str, Any]:
    return {
        "index": 0,
        "content": content,
        "tokens": [],
        "id_slot": 0,
        "stop": True,
        "model": "tiny.gguf",
        "tokens_predicted": predicted,
        "tokens_evaluated": 7,
        "generation_settings": {"n_predict": 3, "temperature": 0.800000011920929, "stream": True},
        "prompt": "<s> hello",
        "has_new_line": False,
        "truncated": False,
        "stop_type": stop_type,
        "stopping_word": "",
        "tokens_cached": 9,
        "timings": TIMINGS,
    }


NATIVE_EVENTS: list[object] = [
    native(" say", 389),
    native("J", 301, predicted=2),
    native("is", 426, predicted=3),
    native_final(),
]
NATIVE_TOKENS = [Token(" say", 389), Token("J", 301), Token("is", 426)]
NATIVE_RESULT = Completion(
    text=" sayJis",
    finish_reason="limit",
    usage=Usage(prompt_tokens=7, completion_tokens=3, total_tokens=10),
    timings=Timings.model_validate(TIMINGS),
    token_ids=[389, 301, 426],
)

# Multi-byte UTF-8 text; the second chunk carries two ids (a character held back across two tokens).
UTF8_EVENTS: list[object] = [native("Grüße", 101), native(" 🦙", 102, 103), native("日本", 104), native_final()]
UTF8_TOKENS = [Token("Grüße", 101), Token(" 🦙", None), Token("日本", 104)]

_CHAT_HEAD = {
    "created": 1795459356,
    "id": "chatcmpl-0juO5AQDkjLHHwnnX61poVwiNDKrN4I4",
    "model": "tiny.gguf",
    "system_fingerprint": "b1-7e4c0a9",
    "object": "chat.completion.chunk",
}


def chat_chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"choices": [{"finish_reason": finish_reason, "index": 0, "delta": delta}], **_CHAT_HEAD, **extra}


CHAT_EVENTS: list[object] = [
    chat_chunk({"role": "assistant", "content": None}),
    chat_chunk({"content": " of"}),
    chat_chunk({"content": "model"}),
    chat_chunk({}, "length", timings=CHAT_TIMINGS),
    "[DONE]",
]


def text_chunk(text: str, finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
        "created": 1795459356,
        "model": "tiny.gguf",
        "system_fingerprint": "b1-7e4c0a9",
        "object": "text_completion",
        "id": "chatcmpl-hFB1oDlZveTndMzgQLnMIg6gFei3mcwd",
        **extra,
    }


TEXT_USAGE = {
    "completion_tokens": 2,
    "prompt_tokens": 2,
    "total_tokens": 4,
    "prompt_tokens_details": {"cached_tokens": 1},
}
TEXT_EVENTS: list[object] = [
    text_chunk("two"),
    text_chunk(" world"),
    text_chunk(
        "",
        "length",
        usage=TEXT_USAGE,
        timings=TEXT_TIMINGS,
    ),
    "[DONE]",
]

ERROR_EVENT = {"error": {"code": 500, "message": "the slot was released", "type": "server_error"}}
LOADING_BODY = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
BAD_REQUEST_BODY = {
    "error": {
        "code": 400,
        "message": "Field 'n_probs': [json.exception.type_error.302] type must be number, but is string",
        "type": "invalid_request_error",
    }
}


def sse(*events: object, newline: str = "\n") -> bytes:
    """Encode events as an SSE body: objects as JSON ``data:``, ``": ..."`` strings as comment lines."""
    parts = []
    for event in events:
        if isinstance(event, str) and event.startswith(":"):
            parts.append(event + newline)
            continue
        data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
        parts.append(f"data: {data}{newline}{newline}")
    return "".join(parts).encode()


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def split_at(data: bytes, *cuts: int) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


class Body(httpx.AsyncByteStream):
    """A streamed response body (make it inside the test: it holds anyio events).

    Hands out ``chunks``, then raises ``error``, or waits until closed (``hang``)
    and then fails like a closed socket, or just ends. ``sent`` counts the chunks
    handed out, ``closed`` records that httpx closed it, ``hanging`` is set while
    it waits. It is an iterator object, not an async generator: httpx never
    closes the generator of a body, and trio warns about each one left unexhausted.
    """

    def __init__(self, *chunks: bytes, error: Exception | None = None, hang: bool = False) -> None:
        self.chunks = chunks
        self.error = error
        self.hang = hang
        self.sent = 0
        self.closed = False
        self.hanging = anyio.Event()
        self._wake = anyio.Event()

    def __aiter__(self) -> Body:
        return self

    async def __anext__(self) -> bytes:
        if self.sent < len(self.chunks):
            self.sent += 1
            return self.chunks[self.sent - 1]
        if self.error is not None:
            raise self.error
        if self.hang:
            self.hanging.set()
            if not self.closed:
                await self._wake.wait()
            raise httpx.ReadError("the connection was closed")
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed = True
        self._wake.set()


def mock_stream(
    router: respx.MockRouter,
    path: str,
    body: Body | bytes,
    *,
    status: int = 200,
    headers: dict[str, str] = SSE_HEADERS,
) -> respx.Route:
    stream = body if isinstance(body, Body) else Body(body)
    return router.post(path).mock(return_value=httpx.Response(status, headers=headers, stream=stream))


async def collect(stream: TokenStream) -> list[Token]:
    async with stream:
        return [token async for token in stream]


async def collect_until_error(stream: TokenStream) -> tuple[list[Token], BaseException]:
    tokens: list[Token] = []
    with pytest.raises(LlamaprocError) as info:
        async with stream:
            async for token in stream:
                tokens.append(token)
    return tokens, info.value


def sent_json(route: respx.Route) -> Any:
    return json.loads(route.calls.last.request.content)


# -- native /completion stream -------------------------------------------------------------------


@pytest.mark.anyio
async def test_native_stream_tokens_ids_and_result(router: respx.MockRouter, client: LlamaClient) -> None:
    body = Body(sse(*NATIVE_EVENTS))
    route = mock_stream(router, "/completion", body)
    done: list[Completion] = []

    stream = client.stream_completion("hello", n_predict=3, temperature=0.0)
    stream.done_hook = done.append
    assert route.call_count == 0  # nothing is sent before the first iteration
    tokens = []
    async with stream:
        async for token in stream:
            tokens.append(token)
        # The stream closes its response at the end by itself, not only on __aexit__.
        assert body.closed

    assert tokens == NATIVE_TOKENS
    assert stream.result == NATIVE_RESULT
    assert stream.result.metrics is not None
    assert stream.result.metrics.decode_tokens_per_s == 1724.1379310344828
    assert stream.error is None
    assert done == [NATIVE_RESULT]
    request = route.calls.last.request
    assert request.url == "http://llama.test/completion"
    assert request.headers["accept"] == "text/event-stream"
    assert sent_json(route) == {
        "prompt": "hello",
        "n_predict": 3,
        "temperature": 0.0,
        "stream": True,
        "return_tokens": True,
    }
    # Iterating again after the end neither re-sends nor yields.
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    assert route.call_count == 1
    assert done == [NATIVE_RESULT]


@pytest.mark.anyio
async def test_native_stream_prompt_as_token_ids(router: respx.MockRouter, client: LlamaClient) -> None:
    route = mock_stream(router, "/completion", sse(*NATIVE_EVENTS))
    assert await collect(client.stream_completion((1, 2, 3), return_tokens=False, stream=False)) == NATIVE_TOKENS
    assert sent_json(route) == {"prompt": [1, 2, 3], "stream": True, "return_tokens": True}


@pytest.mark.anyio
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 4096])
async def test_native_stream_split_chunks(
    router: respx.MockRouter, client: LlamaClient, size: int, newline: str
) -> None:
    events = [": ping", UTF8_EVENTS[0], ": keep-alive", *UTF8_EVENTS[1:]]
    data = sse(*events, newline=newline)
    body = Body(*split_every(data, size))
    mock_stream(router, "/completion", body)
    stream = client.stream_completion("hi")

    assert await collect(stream) == UTF8_TOKENS
    assert stream.result is not None
    assert stream.result.text == "Grüße 🦙日本"
    assert stream.result.token_ids == [101, 102, 103, 104]
    assert body.sent == len(split_every(data, size))
    assert body.closed


@pytest.mark.anyio
async def test_native_stream_split_inside_utf8_char_data_field_and_crlf(
    router: respx.MockRouter, client: LlamaClient
) -> None:
    data = sse(": ping", *UTF8_EVENTS, newline="\r\n")
    in_char = data.index("🦙".encode()) + 2
    in_field = data.index(b"data:", data.index(b"data:") + 1) + 2
    in_crlf = data.index(b"\r\n", in_field) + 1
    after_field = data.index(b"data: ", in_crlf) + len(b"data: ")
    # The cuts are where they are meant to be.
    with pytest.raises(UnicodeDecodeError):
        data[:in_char].decode()
    assert data[in_field - 2 : in_field + 3] == b"data:"
    assert data[in_crlf - 1 : in_crlf + 1] == b"\r\n"
    assert data[after_field - 1 : after_field + 1] == b" {"
    body = Body(*split_at(data, in_char, in_field, in_crlf, after_field))
    mock_stream(router, "/completion", body)
    stream = client.stream_completion("hi")

    assert await collect(stream) == UTF8_TOKENS
    assert stream.result is not None
    assert stream.result.text == "Grüße 🦙日本"
    assert body.sent == 5


@pytest.mark.anyio
async def test_native_stream_comment_lines_are_skipped(router: respx.MockRouter, client: LlamaClient) -> None:
    data = b": ping\n\n" + sse(NATIVE_EVENTS[0]) + b": ping\n: another\n" + sse(*NATIVE_EVENTS[1:])
    mock_stream(router, "/completion", data)
    stream = client.stream_completion("hello")

    assert await collect(stream) == NATIVE_TOKENS
    assert stream.result == NATIVE_RESULT


@pytest.mark.anyio
async def test_native_stream_final_chunk_with_text(router: respx.MockRouter, client: LlamaClient) -> None:
    body = Body(sse(native("a", 1), native("b", 2), native_final("!", predicted=3, stop_type="word")))
    mock_stream(router, "/completion", body)
    done: list[Completion] = []
    stream = client.stream_completion("hello")
    stream.done_hook = done.append

    tokens = []
    async with stream:
        async for token in stream:
            tokens.append(token)
        assert body.closed

    assert tokens == [Token("a", 1), Token("b", 2), Token("!")]
    assert stream.result is not None
    assert stream.result.text == "ab!"
    assert stream.result.finish_reason == "word"
    assert stream.result.token_ids == [1, 2]
    assert done == [stream.result]


# -- OpenAI-style streams ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_chat_stream(router: respx.MockRouter, client: LlamaClient) -> None:
    body = Body(sse(*CHAT_EVENTS))
    route = mock_stream(router, "/v1/chat/completions", body)
    messages = [{"role": "user", "content": "hi"}]
    done: list[Completion] = []
    stream = client.stream_chat(messages, max_tokens=2)
    stream.done_hook = done.append

    tokens = []
    async with stream:
        async for token in stream:
            tokens.append(token)
        assert body.closed

    # The role-only first chunk yields no token; OpenAI endpoints report no ids.
    assert tokens == [Token(" of"), Token("model")]
    # No usage in the final chunk: it is derived from the timings (prompt_n + cache_n).
    expected = Completion(
        text=" ofmodel",
        finish_reason="length",
        usage=Usage(prompt_tokens=50, completion_tokens=2, total_tokens=52),
        timings=Timings.model_validate(CHAT_TIMINGS),
    )
    assert stream.result == expected
    assert done == [expected]
    assert sent_json(route) == {"messages": messages, "max_tokens": 2, "stream": True}


@pytest.mark.anyio
async def test_chat_stream_usage_chunk_after_finish(router: respx.MockRouter, client: LlamaClient) -> None:
    usage = {"completion_tokens": 2, "prompt_tokens": 5, "total_tokens": 7}
    usage_chunk = {"choices": [], **_CHAT_HEAD, "usage": usage, "timings": CHAT_TIMINGS}
    events = [*CHAT_EVENTS[:3], chat_chunk({}, "stop"), usage_chunk, "[DONE]"]
    mock_stream(router, "/v1/chat/completions", sse(*events))
    stream = client.stream_chat([{"role": "user", "content": "hi"}])

    assert await collect(stream) == [Token(" of"), Token("model")]
    assert stream.result == Completion(
        text=" ofmodel",
        finish_reason="stop",
        usage=Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7),
        timings=Timings.model_validate(CHAT_TIMINGS),
    )


@pytest.mark.anyio
async def test_text_completion_stream(router: respx.MockRouter, client: LlamaClient) -> None:
    route = mock_stream(router, "/v1/completions", sse(*TEXT_EVENTS))
    stream = client.stream_text_completion("hi", max_tokens=2)

    assert await collect(stream) == [Token("two"), Token(" world")]
    assert stream.result == Completion(
        text="two world",
        finish_reason="length",
        usage=Usage.model_validate(TEXT_USAGE),
        timings=Timings.model_validate(TEXT_TIMINGS),
    )
    assert stream.result.usage.model_extra == {"prompt_tokens_details": {"cached_tokens": 1}}
    assert sent_json(route) == {"prompt": "hi", "max_tokens": 2, "stream": True}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "events", "tokens"),
    [
        ("/v1/chat/completions", CHAT_EVENTS[:-1], [Token(" of"), Token("model")]),
        ("/v1/completions", TEXT_EVENTS[:-1], [Token("two"), Token(" world")]),
    ],
    ids=["chat", "text"],
)
async def test_openai_stream_without_done_is_incomplete(
    router: respx.MockRouter, client: LlamaClient, path: str, events: list[object], tokens: list[Token]
) -> None:
    body = Body(sse(*events))
    mock_stream(router, path, body)
    stream = client.stream_chat([]) if "chat" in path else client.stream_text_completion("hi")

    got, error = await collect_until_error(stream)
    assert got == tokens
    assert type(error) is IncompleteStreamError
    assert str(error) == "the stream ended without its final event ([DONE])"
    assert stream.error is error
    assert body.closed


# -- error answers and error events --------------------------------------------------------------


@pytest.mark.anyio
async def test_stream_error_status_with_json_body(router: respx.MockRouter, client: LlamaClient) -> None:
    body = Body(json.dumps(BAD_REQUEST_BODY).encode())
    mock_stream(router, "/completion", body, status=400, headers={"content-type": "application/json; charset=utf-8"})
    stream = client.stream_completion("hello", n_probs="x")

    tokens, error = await collect_until_error(stream)
    assert tokens == []
    assert type(error) is StatusError
    assert error.status_code == 400
    assert error.body == BAD_REQUEST_BODY
    assert error.message == BAD_REQUEST_BODY["error"]["message"]
    assert error.url == "http://llama.test/completion"
    assert str(error) == f"HTTP 400 from http://llama.test/completion: {error.message}"
    assert stream.error is error
    assert stream.result is None
    assert body.closed


@pytest.mark.anyio
async def test_stream_503_loading(router: respx.MockRouter, client: LlamaClient) -> None:
    mock_stream(
        router,
        "/v1/chat/completions",
        json.dumps(LOADING_BODY).encode(),
        status=503,
        headers={"content-type": "application/json"},
    )

    tokens, error = await collect_until_error(client.stream_chat([{"role": "user", "content": "hi"}]))
    assert tokens == []
    assert type(error) is ServerLoadingError
    assert error.status_code == 503
    assert error.message == "Loading model"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "raw", "body", "message"),
    [
        (502, b"Bad Gateway\n", "Bad Gateway\n", "Bad Gateway"),
        (500, b"", "", "(empty body)"),
        (
            503,
            b"<html>Service Unavailable</html>",
            "<html>Service Unavailable</html>",
            "<html>Service Unavailable</html>",
        ),
        (500, b"\xff\xfe oops", "\ufffd\ufffd oops", "\ufffd\ufffd oops"),
    ],
    ids=["text", "empty", "html-503", "not-utf8"],
)
async def test_stream_error_status_with_non_json_body(
    router: respx.MockRouter, client: LlamaClient, status: int, raw: bytes, body: str, message: str
) -> None:
    mock_stream(router, "/completion", raw, status=status, headers={"content-type": "text/plain"})

    tokens, error = await collect_until_error(client.stream_completion("hello"))
    assert tokens == []
    assert type(error) is StatusError
    assert error.status_code == status
    assert error.body == body
    assert error.message == message


@pytest.mark.anyio
async def test_error_event_mid_stream(router: respx.MockRouter, client: LlamaClient) -> None:
    body = Body(sse(native(" say", 389), native("J", 301), ERROR_EVENT), hang=True)
    mock_stream(router, "/completion", body)
    stream = client.stream_completion("hello")

    with anyio.fail_after(30):
        tokens, error = await collect_until_error(stream)
    assert tokens == [Token(" say", 389), Token("J", 301)]
    assert type(error) is StreamError
    assert error.body == ERROR_EVENT
    assert error.message == "the slot was released"
    assert stream.error is error
    assert stream.result is None
    assert body.closed
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


@pytest.mark.anyio
async def test_error_event_mid_chat_stream(router: respx.MockRouter, client: LlamaClient) -> None:
    mock_stream(router, "/v1/chat/completions", sse(*CHAT_EVENTS[:2], {"error": "out of memory"}))

    tokens, error = await collect_until_error(client.stream_chat([]))
    assert tokens == [Token(" of")]
    assert type(error) is StreamError
    assert error.message == "out of memory"


@pytest.mark.anyio
async def test_native_stream_cut_without_final_event(router: respx.MockRouter, client: LlamaClient) -> None:
    body = Body(*split_every(sse(*NATIVE_EVENTS[:2]), 10))
    mock_stream(router, "/completion", body)
    stream = client.stream_completion("hello")

    tokens, error = await collect_until_error(stream)
    assert tokens == NATIVE_TOKENS[:2]
    assert type(error) is IncompleteStreamError
    assert str(error) == "the stream ended without its final event"
    assert stream.result is None
    assert body.closed


@pytest.mark.anyio
async def test_native_stream_cut_inside_the_final_event(router: respx.MockRouter, client: LlamaClient) -> None:
    data = sse(*NATIVE_EVENTS)
    mock_stream(router, "/completion", data[:-1])  # the blank line that ends the final event is missing

    tokens, error = await collect_until_error(client.stream_completion("hello"))
    assert tokens == NATIVE_TOKENS
    assert type(error) is IncompleteStreamError


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "events", "tokens"),
    [
        ("/completion", NATIVE_EVENTS, NATIVE_TOKENS),
        ("/v1/chat/completions", CHAT_EVENTS, [Token(" of"), Token("model")]),
    ],
    ids=["native", "chat"],
)
async def test_read_error_after_the_final_event_is_ignored(
    router: respx.MockRouter, client: LlamaClient, path: str, events: list[object], tokens: list[Token]
) -> None:
    body = Body(sse(*events), error=httpx.ReadError("connection reset by peer"))
    mock_stream(router, path, body)
    done: list[Completion] = []
    stream = client.stream_completion("hello") if path == "/completion" else client.stream_chat([])
    stream.done_hook = done.append

    assert await collect(stream) == tokens
    assert stream.error is None
    assert stream.result is not None
    assert stream.result.text == "".join(token.text for token in tokens)
    assert done == [stream.result]
    assert body.closed


@pytest.mark.anyio
async def test_read_error_mid_stream(router: respx.MockRouter, client: LlamaClient) -> None:
    cause = httpx.ReadError("connection reset by peer")
    body = Body(sse(NATIVE_EVENTS[0]), b'data: {"index":0,"con', error=cause)
    mock_stream(router, "/completion", body)
    stream = client.stream_completion("hello")

    tokens, error = await collect_until_error(stream)
    assert tokens == NATIVE_TOKENS[:1]
    assert type(error) is IncompleteStreamError
    assert error.__cause__ is cause
    assert body.closed


@pytest.mark.anyio
async def test_read_timeout_mid_stream(router: respx.MockRouter, client: LlamaClient) -> None:
    cause = httpx.ReadTimeout("timed out")
    mock_stream(router, "/completion", Body(sse(NATIVE_EVENTS[0]), error=cause))

    tokens, error = await collect_until_error(client.stream_completion("hello"))
    assert tokens == NATIVE_TOKENS[:1]
    assert type(error) is TransportError
    assert str(error) == f"timed out: {cause!r}"
    assert error.__cause__ is cause


@pytest.mark.anyio
@pytest.mark.parametrize(
    "cause",
    [httpx.ConnectError("Connection refused"), httpx.ConnectTimeout("timed out"), httpx.ReadTimeout("timed out")],
    ids=["connect-error", "connect-timeout", "read-timeout"],
)
async def test_transport_errors_before_the_answer(
    router: respx.MockRouter, client: LlamaClient, cause: Exception
) -> None:
    router.post("/completion").mock(side_effect=cause)
    router.get("/health").mock(side_effect=cause)
    stream = client.stream_completion("hello")

    tokens, error = await collect_until_error(stream)
    assert tokens == []
    assert type(error) is TransportError
    assert error.__cause__ is cause
    assert stream.error is error
    with pytest.raises(TransportError) as info:
        await client.health()
    assert info.value.__cause__ is cause


# -- real sockets: httpx's own exceptions --------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_server(
    reply: bytes, *, hold: bool = False, received: anyio.Event | None = None
) -> AsyncIterator[str]:
    """A TCP server that reads a request, sends ``reply`` as is, then closes (or holds) the connection.

    ``received`` is set once a whole request has been read.
    """

    async def handle(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            # Read the whole request: closing with unread data would reset the connection.
            data = b""
            while b"\r\n\r\n" not in data:
                data += await conn.receive()
            head, _, body = data.partition(b"\r\n\r\n")
            lengths = [
                int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
            ]
            length = lengths[0] if lengths else 0
            while len(body) < length:
                body += await conn.receive()
            if received is not None:
                received.set()
            if reply:
                await conn.send(reply)
            if hold:
                await anyio.sleep_forever()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.listeners[0].extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield f"http://127.0.0.1:{port}"
        tg.cancel_scope.cancel()


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.anyio
async def test_real_connection_cut_mid_stream() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    with anyio.fail_after(30):
        async with raw_server(head + chunked(sse(NATIVE_EVENTS[0]))) as url, LlamaClient(url) as client:
            tokens, error = await collect_until_error(client.stream_completion("hello"))
    assert tokens == NATIVE_TOKENS[:1]
    assert type(error) is IncompleteStreamError
    assert isinstance(error.__cause__, httpx.RemoteProtocolError)


@pytest.mark.anyio
async def test_real_read_timeout() -> None:
    with anyio.fail_after(30):
        async with raw_server(b"", hold=True) as url, LlamaClient(url, timeout=0.2) as client:
            with pytest.raises(TransportError) as info:
                await client.health()
            tokens, error = await collect_until_error(client.stream_completion("hello"))
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)
    assert str(info.value).startswith("timed out: ReadTimeout(")
    assert tokens == []
    assert type(error) is TransportError
    assert isinstance(error.__cause__, httpx.ReadTimeout)


@pytest.mark.anyio
async def test_real_connect_refused() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.listeners[0].extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there now
    with anyio.fail_after(30):
        async with LlamaClient(f"http://127.0.0.1:{port}") as client:
            with pytest.raises(TransportError) as info:
                await client.health()
            _, error = await collect_until_error(client.stream_completion("hello"))
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert type(error) is TransportError
    assert isinstance(error.__cause__, httpx.ConnectError)


# -- leaving early closes the response -----------------------------------------------------------


@pytest.mark.anyio
async def test_break_inside_async_with_closes_the_response(router: respx.MockRouter, client: LlamaClient) -> None:
    body = Body(sse(*NATIVE_EVENTS[:2]), hang=True)
    mock_stream(router, "/completion", body)
    done: list[Completion] = []
    stream = client.stream_completion("hello")
    stream.done_hook = done.append

    with anyio.fail_after(30):
        async with stream:
            async for token in stream:
                assert token == NATIVE_TOKENS[0]
                break
            assert not body.closed
        assert body.closed
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
    assert stream.result is None
    assert stream.error is None
    assert done == []


@pytest.mark.anyio
async def test_break_inside_aclosing_closes_the_response(router: respx.MockRouter, client: LlamaClient) -> None:
    body = Body(sse(*CHAT_EVENTS[:3]), hang=True)
    mock_stream(router, "/v1/chat/completions", body)

    with anyio.fail_after(30):
        async with contextlib.aclosing(client.stream_chat([])) as stream:
            tokens = []
            async for token in stream:
                tokens.append(token)
                if len(tokens) == 2:
                    break
            assert not body.closed
    assert tokens == [Token(" of"), Token("model")]
    assert body.closed
    assert stream.error is None


@pytest.mark.anyio
async def test_exception_in_loop_body_closes_the_response(router: respx.MockRouter, client: LlamaClient) -> None:
    body = Body(sse(*NATIVE_EVENTS[:2]), hang=True)
    mock_stream(router, "/completion", body)

    with anyio.fail_after(30), pytest.raises(KeyError):
        async with client.stream_completion("hello") as stream:
            async for _ in stream:
                raise KeyError("consumer failed")
    assert body.closed


@pytest.mark.anyio
async def test_cancel_while_waiting_closes_the_response(router: respx.MockRouter, client: LlamaClient) -> None:
    body = Body(sse(*NATIVE_EVENTS[:2]), hang=True)
    mock_stream(router, "/completion", body)
    stream = client.stream_completion("hello")  # no async with: the stream closes itself on cancellation
    tokens = []

    async def consume() -> None:
        async for token in stream:
            tokens.append(token)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await body.hanging.wait()
            assert not body.closed
            tg.cancel_scope.cancel()
    assert tokens == NATIVE_TOKENS[:2]
    assert body.closed
    assert stream.error is None


@pytest.mark.anyio
async def test_aclose_before_first_iteration_sends_nothing(router: respx.MockRouter, client: LlamaClient) -> None:
    stream = client.stream_completion("hello")
    await stream.aclose()
    await stream.aclose()
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    assert router.calls.call_count == 0


# -- closing the client --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_client_aclose_between_tokens(router: respx.MockRouter) -> None:
    body = Body(sse(*NATIVE_EVENTS[:2]), hang=True)
    mock_stream(router, "/completion", body)
    client = LlamaClient(BASE)
    stream = client.stream_completion("hello")

    assert await anext(stream) == NATIVE_TOKENS[0]
    await client.aclose()
    assert client.closed
    assert body.closed
    with pytest.raises(ClosedError) as info:
        await anext(stream)
    assert str(info.value) == "the stream was closed because its client was closed"
    assert stream.error is info.value
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


@pytest.mark.anyio
async def test_client_aclose_while_a_task_waits_for_a_token(router: respx.MockRouter) -> None:
    body = Body(sse(NATIVE_EVENTS[0]), hang=True)
    mock_stream(router, "/completion", body)
    client = LlamaClient(BASE)
    stream = client.stream_completion("hello")
    tokens: list[Token] = []
    errors: list[BaseException] = []

    async def consume() -> None:
        try:
            async with stream:
                async for token in stream:
                    tokens.append(token)
        except LlamaprocError as exc:
            errors.append(exc)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await body.hanging.wait()
            await client.aclose()
    assert tokens == NATIVE_TOKENS[:1]
    assert [type(e) for e in errors] == [ClosedError]
    assert stream.error is errors[0]
    assert body.closed


@pytest.mark.anyio
async def test_closed_client_raises_closed_error(router: respx.MockRouter) -> None:
    client = LlamaClient(BASE)
    opened_before = client.stream_completion("hello")
    await client.aclose()
    await client.aclose()  # idempotent

    calls = [
        client.health(),
        client.props(),
        client.slots(),
        client.metrics(),
        client.tokenize("a"),
        client.detokenize([1]),
        client.completion("a"),
        client.chat([]),
        client.text_completion("a"),
        client.embeddings(["a"]),
    ]
    for call in calls:
        with pytest.raises(ClosedError) as info:
            await call
        assert str(info.value) == "the client is closed"
    streams = [opened_before, client.stream_completion("a"), client.stream_chat([]), client.stream_text_completion("a")]
    for stream in streams:
        with pytest.raises(ClosedError):
            await anext(stream)
        assert isinstance(stream.error, ClosedError)
    assert isinstance(info.value, UsageError)
    assert isinstance(info.value, RuntimeError)
    assert router.calls.call_count == 0


# -- health, introspection, tokens, embeddings ---------------------------------------------------


@pytest.mark.anyio
async def test_health_ok(router: respx.MockRouter, client: LlamaClient) -> None:
    router.get("/health").respond(200, json={"status": "ok"})
    assert await client.health() == Health(status="ok")


@pytest.mark.anyio
async def test_health_loading(router: respx.MockRouter, client: LlamaClient) -> None:
    router.get("/health").respond(503, json=LOADING_BODY)
    assert await client.health() == Health(status="loading")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (
            503,
            {"error": {"code": 503, "message": "no slot available", "type": "unavailable_error"}},
            "no slot available",
        ),
        (500, {"error": {"code": 500, "message": "internal", "type": "server_error"}}, "internal"),
        (404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}, "File Not Found"),
    ],
    ids=["503-no-slot", "500", "404"],
)
async def test_health_other_status(
    router: respx.MockRouter, client: LlamaClient, status: int, body: dict[str, Any], message: str
) -> None:
    router.get("/health").respond(status, json=body)
    with pytest.raises(StatusError) as info:
        await client.health()
    assert type(info.value) is StatusError
    assert info.value.status_code == status
    assert info.value.body == body
    assert info.value.message == message


@pytest.mark.anyio
async def test_tokenize(router: respx.MockRouter, client: LlamaClient) -> None:
    route = router.post("/tokenize").respond(json={"tokens": [259, 331, 328]})
    assert await client.tokenize("hel") == [259, 331, 328]
    assert sent_json(route) == {"content": "hel", "add_special": False}


@pytest.mark.anyio
async def test_tokenize_with_pieces_and_special(router: respx.MockRouter, client: LlamaClient) -> None:
    pieces = [{"id": 1, "piece": "<s>"}, {"id": 259, "piece": " "}, {"id": 331, "piece": "h"}]
    route = router.post("/tokenize").respond(json={"tokens": pieces})
    assert await client.tokenize("h", add_special=True) == [1, 259, 331]
    assert sent_json(route) == {"content": "h", "add_special": True}


@pytest.mark.anyio
async def test_detokenize(router: respx.MockRouter, client: LlamaClient) -> None:
    route = router.post("/detokenize").respond(json={"content": "<s></s>"})
    assert await client.detokenize((1, 2)) == "<s></s>"
    assert sent_json(route) == {"tokens": [1, 2]}


@pytest.mark.anyio
async def test_props_and_slots(router: respx.MockRouter, client: LlamaClient) -> None:
    props = {
        "model_path": "/models/tiny.gguf",
        "total_slots": 2,
        "chat_template": "{{ messages }}",
        "default_generation_settings": {"n_ctx": 2048},
    }
    slots = [{"id": 0, "n_ctx": 2048, "is_processing": False}, {"id": 1, "n_ctx": 2048, "is_processing": True}]
    router.get("/props").respond(json=props)
    router.get("/slots").respond(json=slots)
    assert await client.props() == props
    assert await client.slots() == slots


@pytest.mark.anyio
async def test_embeddings_in_input_order(router: respx.MockRouter, client: LlamaClient) -> None:
    answer = {
        "model": "tiny.gguf",
        "object": "list",
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
        "data": [
            {"embedding": [0.5, -0.25], "index": 2, "object": "embedding"},
            {"embedding": [1.0, 0.0], "index": 0, "object": "embedding"},
            {"embedding": [0.0, 1.0], "index": 1, "object": "embedding"},
        ],
    }
    route = router.post("/v1/embeddings").respond(json=answer)
    assert await client.embeddings(["a", "b", "c"]) == [[1.0, 0.0], [0.0, 1.0], [0.5, -0.25]]
    assert sent_json(route) == {"input": ["a", "b", "c"]}


@pytest.mark.anyio
async def test_embeddings_not_enabled(router: respx.MockRouter, client: LlamaClient) -> None:
    body = {
        "error": {
            "code": 501,
            "message": "This server does not support embeddings. Start it with `--embeddings`",
            "type": "not_supported_error",
        }
    }
    router.post("/v1/embeddings").respond(501, json=body)
    with pytest.raises(StatusError) as info:
        await client.embeddings(["a"])
    assert info.value.status_code == 501
    assert info.value.message == body["error"]["message"]


METRICS_TEXT = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 56
# HELP llamacpp:prompt_seconds_total Total time spent processing prompts
# TYPE llamacpp:prompt_seconds_total counter
llamacpp:prompt_seconds_total 0.003742
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 7
# HELP llamacpp:n_tokens_max Largest observed sequence length (prompt + generation)
# TYPE llamacpp:n_tokens_max counter
llamacpp:n_tokens_max 34
# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s
# TYPE llamacpp:predicted_tokens_seconds gauge
llamacpp:predicted_tokens_seconds 1724.5
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
"""


@pytest.mark.anyio
async def test_metrics(router: respx.MockRouter, client: LlamaClient) -> None:
    router.get("/metrics").respond(text=METRICS_TEXT, headers={"content-type": "text/plain; version=0.0.4"})
    # Keys are the sample names as llama-server exposes them.
    assert await client.metrics() == {
        "llamacpp:prompt_tokens_total": 56.0,
        "llamacpp:prompt_seconds_total": 0.003742,
        "llamacpp:tokens_predicted_total": 7.0,
        "llamacpp:n_tokens_max": 34.0,
        "llamacpp:predicted_tokens_seconds": 1724.5,
        "llamacpp:requests_processing": 1.0,
    }


@pytest.mark.anyio
async def test_metrics_disabled(router: respx.MockRouter, client: LlamaClient) -> None:
    message = "This server does not support metrics endpoint. Start it with `--metrics`"
    body = {"error": {"code": 501, "message": message, "type": "not_supported_error"}}
    router.get("/metrics").respond(501, json=body)
    with pytest.raises(StatusError) as info:
        await client.metrics()
    assert info.value.status_code == 501
    assert info.value.message == body["error"]["message"]


# -- non-streamed generation ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_completion(router: respx.MockRouter, client: LlamaClient) -> None:
    answer = {**native_final(" stream at", predicted=2), "tokens": [380, 373]}
    route = router.post("/completion").respond(json=answer)
    result = await client.completion("hello", n_predict=2)
    assert result == Completion(
        text=" stream at",
        finish_reason="limit",
        usage=Usage(prompt_tokens=7, completion_tokens=2, total_tokens=9),
        timings=Timings.model_validate(TIMINGS),
        token_ids=[380, 373],
    )
    assert sent_json(route) == {"prompt": "hello", "n_predict": 2, "stream": False, "return_tokens": True}


@pytest.mark.anyio
async def test_completion_from_token_ids(router: respx.MockRouter, client: LlamaClient) -> None:
    route = router.post("/completion").respond(json={"content": "", "tokens": [], "stop": True, "stop_type": "eos"})
    result = await client.completion([1, 2, 3])
    assert result == Completion(text="", finish_reason="eos", usage=Usage(), timings=None, token_ids=None)
    assert sent_json(route) == {"prompt": [1, 2, 3], "stream": False, "return_tokens": True}


@pytest.mark.anyio
async def test_chat(router: respx.MockRouter, client: LlamaClient) -> None:
    answer = {
        "choices": [{"finish_reason": "stop", "index": 0, "message": {"role": "assistant", "content": "Hello!"}}],
        "created": 1795459356,
        "model": "tiny.gguf",
        "object": "chat.completion",
        "usage": {"completion_tokens": 3, "prompt_tokens": 12, "total_tokens": 15},
        "id": "chatcmpl-x",
        "timings": CHAT_TIMINGS,
    }
    route = router.post("/v1/chat/completions").respond(json=answer)
    messages = [{"role": "user", "content": "hi"}]
    result = await client.chat(messages, max_tokens=8)
    assert result == Completion(
        text="Hello!",
        finish_reason="stop",
        usage=Usage(prompt_tokens=12, completion_tokens=3, total_tokens=15),
        timings=Timings.model_validate(CHAT_TIMINGS),
    )
    assert sent_json(route) == {"messages": messages, "max_tokens": 8, "stream": False}


@pytest.mark.anyio
async def test_text_completion(router: respx.MockRouter, client: LlamaClient) -> None:
    answer = {
        "choices": [{"text": "two world", "index": 0, "logprobs": None, "finish_reason": "length"}],
        "object": "text_completion",
        "usage": {"completion_tokens": 2, "prompt_tokens": 2, "total_tokens": 4},
    }
    route = router.post("/v1/completions").respond(json=answer)
    result = await client.text_completion("hi", max_tokens=2)
    assert result == Completion(
        text="two world",
        finish_reason="length",
        usage=Usage(prompt_tokens=2, completion_tokens=2, total_tokens=4),
    )
    assert sent_json(route) == {"prompt": "hi", "max_tokens": 2, "stream": False}


@pytest.mark.anyio
async def test_non_streamed_loading(router: respx.MockRouter, client: LlamaClient) -> None:
    router.post("/v1/chat/completions").respond(503, json=LOADING_BODY)
    with pytest.raises(ServerLoadingError) as info:
        await client.chat([{"role": "user", "content": "hi"}])
    assert info.value.status_code == 503
    assert info.value.message == "Loading model"
    assert info.value.url == "http://llama.test/v1/chat/completions"


# -- every failure is a LlamaprocError -----------------------------------------------------------


async def _props(client: LlamaClient) -> object:
    return await client.props()


async def _chat(client: LlamaClient) -> object:
    return await client.chat([])


async def _embeddings(client: LlamaClient) -> object:
    return await client.embeddings(["a"])


async def _metrics(client: LlamaClient) -> object:
    return await client.metrics()


async def _stream(client: LlamaClient) -> object:
    return await collect(client.stream_completion("a"))


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "path", "response", "call", "error"),
    [
        ("GET", "/props", httpx.Response(200, text="<html>proxy</html>"), _props, ServerError),
        ("GET", "/props", httpx.Response(200, content=b"\xff\xfe\x00{"), _props, ServerError),
        ("POST", "/v1/chat/completions", httpx.Response(200, json={"choices": []}), _chat, ServerError),
        ("POST", "/v1/chat/completions", httpx.Response(200, json={"error": "x"}), _chat, ServerError),
        ("POST", "/v1/embeddings", httpx.Response(200, json={"data": [{"index": 0}]}), _embeddings, ServerError),
        ("GET", "/metrics", httpx.Response(200, text="not { prometheus\n"), _metrics, ServerError),
        (
            "POST",
            "/completion",
            httpx.Response(200, headers=SSE_HEADERS, content=b"data: {oops\n\n"),
            _stream,
            ServerError,
        ),
        (
            "POST",
            "/completion",
            httpx.Response(200, headers=SSE_HEADERS, content=b"data: [1, 2]\n\n"),
            _stream,
            ServerError,
        ),
        (
            "POST",
            "/completion",
            httpx.Response(200, headers=SSE_HEADERS, content=sse(native_final() | {"timings": {"prompt_n": "many"}})),
            _stream,
            ServerError,
        ),
        ("POST", "/completion", httpx.Response(200, json=native_final()), _stream, ServerError),
        ("POST", "/completion", httpx.RemoteProtocolError("bad status line"), _stream, TransportError),
        ("POST", "/completion", httpx.WriteError("broken pipe"), _stream, TransportError),
        ("POST", "/completion", httpx.PoolTimeout("no connection"), _stream, TransportError),
        ("GET", "/props", httpx.ReadError("reset"), _props, TransportError),
    ],
    ids=[
        "html-200",
        "binary-200",
        "no-choices",
        "error-200",
        "embedding-missing",
        "bad-metrics",
        "bad-json-event",
        "list-event",
        "bad-timings",
        "json-not-sse",
        "protocol-error",
        "write-error",
        "pool-timeout",
        "read-error",
    ],
)
async def test_every_failure_is_a_llamaproc_error(
    router: respx.MockRouter,
    client: LlamaClient,
    method: str,
    path: str,
    response: httpx.Response | Exception,
    call: Any,
    error: type[LlamaprocError],
) -> None:
    route = router.route(method=method, path=path)
    if isinstance(response, Exception):
        route.mock(side_effect=response)
    else:
        route.mock(return_value=response)
    with pytest.raises(LlamaprocError) as info:
        await call(client)
    assert isinstance(info.value, error)


# -- hooks ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_error_hook_replaces_the_error(router: respx.MockRouter, client: LlamaClient) -> None:
    mock_stream(router, "/completion", sse(NATIVE_EVENTS[0], ERROR_EVENT))
    seen: list[LlamaprocError] = []
    replacement = ServerCrashedError("llama-server died", returncode=-9, output="")

    async def hook(error: LlamaprocError) -> LlamaprocError:
        seen.append(error)
        return replacement

    stream = client.stream_completion("hello")
    stream.error_hook = hook
    tokens, error = await collect_until_error(stream)
    assert tokens == NATIVE_TOKENS[:1]
    assert error is replacement
    assert [type(e) for e in seen] == [StreamError]
    assert error.__cause__ is seen[0]
    assert stream.error is replacement


@pytest.mark.anyio
async def test_error_hook_returning_the_same_error(router: respx.MockRouter, client: LlamaClient) -> None:
    cause = httpx.ConnectError("Connection refused")
    router.post("/completion").mock(side_effect=cause)
    seen: list[LlamaprocError] = []

    async def hook(error: LlamaprocError) -> LlamaprocError:
        seen.append(error)
        return error

    stream = client.stream_completion("hello")
    stream.error_hook = hook
    _, error = await collect_until_error(stream)
    assert seen == [error]
    assert type(error) is TransportError
    assert error.__cause__ is cause


@pytest.mark.anyio
async def test_done_hook_not_called_on_error(router: respx.MockRouter, client: LlamaClient) -> None:
    mock_stream(router, "/completion", sse(*NATIVE_EVENTS[:2]))
    done: list[Completion] = []
    stream = client.stream_completion("hello")
    stream.done_hook = done.append
    await collect_until_error(stream)
    assert done == []


# -- aclose() from another task ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_aclose_from_another_task_ends_the_reader_with_closed_error(
    router: respx.MockRouter, client: LlamaClient
) -> None:
    body = Body(sse(NATIVE_EVENTS[0]), hang=True)
    mock_stream(router, "/completion", body)
    stream = client.stream_completion("hello")
    hooked: list[LlamaprocError] = []

    async def hook(error: LlamaprocError) -> LlamaprocError:
        hooked.append(error)
        return error

    stream.error_hook = hook
    caught: list[BaseException] = []
    tokens: list[Token] = []

    async def read() -> None:
        try:
            async for token in stream:
                tokens.append(token)
        except LlamaprocError as exc:
            caught.append(exc)

    # The body hangs until closed: the reader ends only because of aclose(). The timeout is a safety net.
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await body.hanging.wait()
            await stream.aclose()
    assert tokens == NATIVE_TOKENS[:1]
    assert [type(e) for e in caught] == [ClosedError]
    assert str(caught[0]) == "the stream was closed"
    assert stream.error is caught[0]
    assert hooked == []  # not a server error: nothing to explain
    assert body.closed
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


@pytest.mark.anyio
async def test_aclose_from_another_task_while_the_request_waits_for_an_answer() -> None:
    """A queued request (no headers yet) is abandoned at once too."""
    received = anyio.Event()
    # The server never answers: the reader ends only because of aclose(). The timeout is a safety net.
    with anyio.fail_after(30):
        async with raw_server(b"", hold=True, received=received) as url, LlamaClient(url) as client:
            stream = client.stream_completion("hello")
            caught: list[BaseException] = []

            async def read() -> None:
                try:
                    async for _ in stream:
                        pass
                except LlamaprocError as exc:
                    caught.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await received.wait()  # the request was sent; no answer comes
                await stream.aclose()
    assert [type(e) for e in caught] == [ClosedError]
    assert stream.error is caught[0]


# -- a dropped stream closes its response ----------------------------------------------------------

OUR_GENERATOR_GC_WARNING = pytest.mark.filterwarnings(
    # trio warns about any async generator left to the garbage collector, ours included.
    r"ignore:Async generator 'llamaproc\.client\._client\._iterate':ResourceWarning"
)


@OUR_GENERATOR_GC_WARNING
@pytest.mark.anyio
async def test_break_without_async_with_closes_the_response_once_dropped(
    router: respx.MockRouter, client: LlamaClient
) -> None:
    body = Body(sse(*NATIVE_EVENTS[:2]), hang=True)
    mock_stream(router, "/completion", body)
    gc.disable()  # reference counting alone must free it: no cycle keeps the stream alive
    try:
        async for token in client.stream_completion("hello"):
            assert token == NATIVE_TOKENS[0]
            [state] = client._streams
            alive = weakref.ref(state)
            del state
            break
        with anyio.fail_after(30):  # a safety net: it is closed when dropped, or never
            while not body.closed:
                await anyio.sleep(0.001)
        assert len(client._streams) == 0
        assert alive() is None
    finally:
        gc.enable()


@OUR_GENERATOR_GC_WARNING
@pytest.mark.anyio
async def test_dropping_a_stream_after_next_closes_the_response(router: respx.MockRouter, client: LlamaClient) -> None:
    body = Body(sse(*NATIVE_EVENTS[:2]), hang=True)
    mock_stream(router, "/completion", body)
    gc.disable()
    try:
        stream = client.stream_completion("hello")
        assert await stream.__anext__() == NATIVE_TOKENS[0]
        alive = weakref.ref(stream._state)
        del stream
        with anyio.fail_after(30):  # a safety net: it is closed when dropped, or never
            while not body.closed:
                await anyio.sleep(0.001)
        assert alive() is None
    finally:
        gc.enable()


@pytest.mark.anyio
async def test_a_kept_stream_stays_open_until_closed(router: respx.MockRouter, client: LlamaClient) -> None:
    body = Body(sse(*NATIVE_EVENTS[:2]), hang=True)
    mock_stream(router, "/completion", body)
    stream = client.stream_completion("hello")
    async for _ in stream:
        break
    async for token in stream:  # a second loop goes on where the first left off
        assert token == NATIVE_TOKENS[1]
        break
    await anyio.wait_all_tasks_blocked()  # whatever could close it has run
    assert not body.closed
    await stream.aclose()
    assert body.closed


# -- after the final event ------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-virtual-clock")]
)
async def test_body_held_open_after_the_final_event_does_not_delay_the_end(
    router: respx.MockRouter, client: LlamaClient
) -> None:
    """The body hangs until closed after the final event: the stream waits for its end only briefly."""
    body = Body(sse(*NATIVE_EVENTS), hang=True)
    mock_stream(router, "/completion", body)
    stream = client.stream_completion("hello")
    start = anyio.current_time()
    assert await collect(stream) == NATIVE_TOKENS
    assert anyio.current_time() - start <= END_OF_BODY_WAIT  # on a virtual clock
    assert stream.result == NATIVE_RESULT
    assert body.closed


@pytest.mark.anyio
async def test_error_event_after_the_final_event_is_raised(router: respx.MockRouter, client: LlamaClient) -> None:
    """What a request for several prompts gives when a later prompt fails: not to be dropped silently."""
    exceed = {"error": {"code": 400, "message": "request (552 tokens) exceeds the available context size",
                        "type": "exceed_context_size_error"}}
    mock_stream(router, "/completion", sse(*NATIVE_EVENTS, exceed))
    stream = client.stream_completion("hello")
    tokens, error = await collect_until_error(stream)
    assert tokens == NATIVE_TOKENS
    assert type(error) is StreamError
    assert error.body == exceed
    assert stream.result is None


# -- arguments -------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "prompt", [None, 5, b"bytes", ["hello", "world"], [1, "2"], [1.5], [True], {"a": 1}],
    ids=["none", "int", "bytes", "strings", "mixed", "float", "bool", "dict"],
)
async def test_prompt_must_be_a_string_or_token_ids(client: LlamaClient, prompt: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="prompt must be"):
        client.stream_completion(prompt)
    with pytest.raises(InvalidArgumentError, match="prompt must be"):
        await client.completion(prompt)


@pytest.mark.anyio
@pytest.mark.parametrize("value", [{1, 2}, object(), float("nan"), b"bytes"], ids=["set", "object", "nan", "bytes"])
async def test_params_that_are_not_json_are_the_callers_mistake(
    router: respx.MockRouter, client: LlamaClient, value: Any
) -> None:
    # Before anything is sent, in both the streamed and the whole-answer paths.
    with pytest.raises(InvalidArgumentError, match="cannot be sent as JSON"):
        client.stream_completion("hello", foo=value)
    with pytest.raises(InvalidArgumentError, match="cannot be sent as JSON"):
        client.stream_chat([], foo=value)
    with pytest.raises(InvalidArgumentError, match="cannot be sent as JSON"):
        await client.completion("hello", foo=value)
    with pytest.raises(InvalidArgumentError, match="cannot be sent as JSON"):
        await client.chat([], foo=value)
    assert router.calls.call_count == 0


@pytest.mark.anyio
async def test_request_bodies_are_json(router: respx.MockRouter, client: LlamaClient) -> None:
    route = router.post("/tokenize").respond(json={"tokens": [1]})
    await client.tokenize("grüß 🦙")
    request = route.calls.last.request
    assert request.headers["content-type"] == "application/json"
    assert request.content == '{"content":"grüß 🦙","add_special":false}'.encode()


# -- causes ------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_error_hook_keeps_the_cause_it_set(router: respx.MockRouter, client: LlamaClient) -> None:
    """A crash error made by the hook keeps the stream error as its cause, not the raw httpx one."""
    cause = httpx.ReadError("connection reset by peer")
    mock_stream(router, "/completion", Body(sse(NATIVE_EVENTS[0]), error=cause))

    async def hook(error: LlamaprocError) -> LlamaprocError:
        crashed = ServerCrashedError("llama-server died", returncode=-9, output="")
        crashed.__cause__ = error
        return crashed

    stream = client.stream_completion("hello")
    stream.error_hook = hook
    _, error = await collect_until_error(stream)
    assert type(error) is ServerCrashedError
    assert type(error.__cause__) is IncompleteStreamError
    assert error.__cause__.__cause__ is cause
    assert stream.error is error
