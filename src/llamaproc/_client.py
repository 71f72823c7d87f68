"""A pure async HTTP/SSE client for llama-server.

This module knows HTTP and llama-server's JSON; it knows nothing about
processes. Every httpx exception is translated in one place
(:func:`_translate`), every stream is owned by a :class:`TokenStream` that
closes its HTTP response on ``break`` (with ``async with`` or
``contextlib.aclosing``, or when the stream is dropped), on error and at the
end. Request bodies are encoded here: a parameter that is not JSON raises
:class:`~llamaproc.InvalidArgumentError` before anything is sent.

Reading a streamed answer does not depend on httpx: :func:`sse_events` frames
the bytes into events and :class:`EventParser` turns each event into a token
and, at the end, the summary. The daemon's socket front end reads its streams
from its own HTTP client with the same two.
"""

from __future__ import annotations

import json
import types
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, cast

import anyio
import httpx
from httpx_sse import EventSource, ServerSentEvent

from ._exceptions import (
    ClosedError,
    IncompleteStreamError,
    InvalidArgumentError,
    LlamaprocError,
    ServerError,
    ServerLoadingError,
    StatusError,
    StreamError,
    TransportError,
)
from ._types import Completion, Health, Timings, Token, Usage

__all__ = ["DEFAULT_TIMEOUT", "LlamaClient", "TokenStream"]

#: Connect and write stay short; a generation may take long before and between tokens.
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=30.0, pool=None)
#: How much of an error answer is read.
ERROR_BODY_LIMIT = 64 * 1024
#: How long a stream waits for the end of the body after its final event (it normally follows at once).
END_OF_BODY_WAIT = 0.2

_Kind = Literal["native", "chat", "text"]
ErrorHook = Callable[[LlamaprocError], Awaitable[LlamaprocError]]


def _translate(exc: Exception, *, in_stream: bool = False) -> LlamaprocError:
    """Map an httpx (or anyio) exception onto the llamaproc tree."""
    if isinstance(exc, LlamaprocError):
        return exc
    if in_stream and isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, anyio.ClosedResourceError)):
        return IncompleteStreamError(f"the connection closed before the end of the stream ({exc!r})")
    if isinstance(exc, httpx.TimeoutException):
        return TransportError(f"timed out: {exc!r}")
    if isinstance(exc, (httpx.TransportError, anyio.ClosedResourceError, anyio.BrokenResourceError)):
        return TransportError(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, httpx.HTTPError):
        return ServerError(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, (ValueError, KeyError, IndexError, TypeError, AttributeError)):
        # ValueError covers bad JSON, undecodable bytes, pydantic validation and metrics parsing.
        return ServerError(f"malformed answer from llama-server: {exc!r}")
    raise exc


def _encode(body: Any) -> bytes:
    """A request body as JSON (as httpx would write it); what cannot be written is the caller's mistake."""
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"the request cannot be sent as JSON: {exc}") from exc


def _prompt(prompt: Any) -> str | list[int]:
    """A prompt: a string, or a sequence of token ids."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        ids = list(prompt)
        if all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return ids
    raise InvalidArgumentError(f"prompt must be a string or a sequence of token ids (ints), not {prompt!r:.80}")


async def _raise_for_status(response: httpx.Response) -> None:
    """Read a non-2xx answer (bounded) and raise it as a typed error."""
    if response.is_success:
        return
    raw = b""
    try:
        async for chunk in response.aiter_bytes():
            raw += chunk
            if len(raw) > ERROR_BODY_LIMIT:
                break
    except httpx.HTTPError:
        pass
    finally:
        with anyio.CancelScope(shield=True):
            await response.aclose()
    raise status_error(response.status_code, raw, str(response.request.url))


def status_error(status: int, raw: bytes, url: str) -> StatusError:
    """The error for a non-2xx answer with body ``raw`` (JSON or text); a loading server's 503 is its own kind."""
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = raw.decode("utf-8", "replace")
    cls = StatusError
    if status == 503 and "loading" in json.dumps(body).lower():
        cls = ServerLoadingError
    return cls(status, body, url=url)


def _timings(obj: Mapping[str, Any]) -> Timings | None:
    t = obj.get("timings")
    return Timings.model_validate(t) if isinstance(t, dict) else None


# --- streamed answers, whatever carries them ------------------------------------------------------

#: Paths of the streamed generation endpoints, by kind.
STREAM_PATHS: dict[_Kind, str] = {"native": "/completion", "chat": "/v1/chat/completions", "text": "/v1/completions"}


def completion_body(prompt: str | Sequence[int], params: Mapping[str, Any]) -> dict[str, Any]:
    """The body of a streamed native ``/completion``: tokens come with their ids."""
    return {"prompt": _prompt(prompt), **params, "stream": True, "return_tokens": True}


def chat_body(messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> dict[str, Any]:
    """The body of a streamed ``/v1/chat/completions``."""
    return {"messages": list(messages), **params, "stream": True}


def sse_events(data: bytes) -> tuple[list[str], bytes]:
    """Split a server-sent event stream: the ``data`` of each complete event in ``data``, and the rest.

    ``data`` is what the previous call left over followed by the new bytes.
    Lines end with LF, CRLF or CR; several ``data:`` lines of one event are
    joined with LF; comment lines (``:``) and other fields are skipped, and
    an event without data is no event. A CR at the very end is kept for the
    next call, which tells whether an LF follows it.
    """
    held = b""
    if b"\r" in data:
        if data.endswith(b"\r"):
            data, held = data[:-1], b"\r"
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    end = data.rfind(b"\n\n")
    if end < 0:
        return [], data + held
    events: list[str] = []
    for block in data[:end].split(b"\n\n"):
        parts = []
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                parts.append(line[6:] if line.startswith(b"data: ") else line[5:])
            elif line == b"data":
                parts.append(b"")
        if parts:
            events.append((parts[0] if len(parts) == 1 else b"\n".join(parts)).decode("utf-8", "replace"))
    return events, data[end + 2 :] + held


class EventParser:
    """The tokens and the summary of one streamed generation, from the ``data`` of its SSE events.

    Knows llama-server's JSON, not how the events arrive: :meth:`parse` takes
    one event's data and returns its token, if it has one; :attr:`done` is
    set by the final event (native ``"stop": true``, OpenAI ``[DONE]``). A
    malformed event raises :class:`ServerError`, an error event
    :class:`StreamError`.
    """

    __slots__ = ("kind", "texts", "ids", "done", "result")

    def __init__(self, kind: _Kind) -> None:
        self.kind = kind
        self.texts: list[str] = []
        self.ids: list[int] = []
        self.done = False
        self.result: Completion | None = None

    def parse(self, data: str) -> Token | None:
        if self.kind != "native" and data == "[DONE]":
            self.done = True
            return None
        try:
            obj = json.loads(data)
            if "error" in obj:
                raise StreamError(obj)
            if self.kind == "native":
                return self._native(obj)
            return self._openai(obj)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            # ValueError covers bad JSON and pydantic validation.
            raise ServerError(f"malformed answer from llama-server: {exc!r}") from exc

    def after_end(self, data: str) -> None:
        """An event after the final one: an error event raises (a request for several prompts
        gives one per failed prompt); anything else is not part of this answer."""
        if data.startswith("{"):
            try:
                obj = json.loads(data)
            except ValueError:
                return
            if isinstance(obj, dict) and "error" in obj:
                raise StreamError(obj)

    def incomplete(self) -> IncompleteStreamError:
        """The error for a stream whose body ended before its final event."""
        return IncompleteStreamError(
            "the stream ended without its final event" + ("" if self.kind == "native" else " ([DONE])")
        )

    def summary(self) -> Completion:
        """The result of a stream that ended normally."""
        result = self.result
        if result is None:
            result = Completion(text="".join(self.texts))
        elif self.kind != "native":
            result = result.model_copy(update={"text": "".join(self.texts)})
        if result.timings is not None and result.usage.total_tokens == 0:
            t = result.timings
            result = result.model_copy(
                update={"usage": Usage(prompt_tokens=t.prompt_n + t.cache_n, completion_tokens=t.predicted_n,
                                       total_tokens=t.prompt_n + t.cache_n + t.predicted_n)}
            )
        return result

    def _openai(self, obj: dict[str, Any]) -> Token | None:
        choices = obj.get("choices")
        choice = choices[0] if choices else None
        text: str | None = None
        if choice is not None:
            if self.kind == "chat":
                text = (choice.get("delta") or {}).get("content")
            else:
                text = choice.get("text")
            if choice.get("finish_reason") is not None or "timings" in obj or "usage" in obj:
                self._set_result(obj, choice.get("finish_reason"))
        elif "usage" in obj or "timings" in obj:
            self._set_result(obj, None)
        if text:
            self.texts.append(text)
            return Token(text)
        return None

    def _native(self, obj: dict[str, Any]) -> Token | None:
        text: str = obj.get("content") or ""
        ids = obj.get("tokens")
        if obj.get("stop"):
            self.done = True
            if text:
                self.texts.append(text)
            self.result = Completion(
                text="".join(self.texts),
                finish_reason=obj.get("stop_type"),
                usage=Usage(
                    prompt_tokens=obj.get("tokens_evaluated", 0),
                    completion_tokens=obj.get("tokens_predicted", 0),
                    total_tokens=obj.get("tokens_evaluated", 0) + obj.get("tokens_predicted", 0),
                ),
                timings=_timings(obj),
                token_ids=self.ids or None,
            )
            return Token(text) if text else None
        token_id: int | None = None
        if ids:
            self.ids.extend(ids)
            if len(ids) == 1:
                token_id = ids[0]
        if text or token_id is not None:
            self.texts.append(text)
            return Token(text, token_id)
        return None

    def _set_result(self, obj: dict[str, Any], finish_reason: str | None) -> None:
        prev = self.result
        usage = obj.get("usage")
        timings = _timings(obj)
        self.result = Completion(
            text="".join(self.texts),
            finish_reason=finish_reason or (prev.finish_reason if prev else None),
            usage=Usage.model_validate(usage) if isinstance(usage, dict) else (prev.usage if prev else Usage()),
            timings=timings or (prev.timings if prev else None),
        )


# --- streams over httpx ------------------------------------------------------------------------------

_STREAM_HEADERS = {
    "Accept": "text/event-stream",
    "Cache-Control": "no-store",
    "Content-Type": "application/json",
    # llama-server closes the connection after every streamed answer while announcing
    # keep-alive; saying so up front keeps the dead connection out of the pool.
    "Connection": "close",
}


class _StreamState:
    """One stream's request, connection and results.

    The iteration (:func:`_iterate`) closes over this object, not over the
    :class:`TokenStream`, and the client holds it weakly: a stream dropped in
    the middle of a loop is freed by reference counting at once, and the
    iteration's ``finally`` closes the response.
    """

    __slots__ = (
        "client",
        "path",
        "content",
        "parser",
        "response",
        "events",
        "send_scope",
        "streaming",
        "done",
        "released",
        "closed_by_owner",
        "closed_by_user",
        "error_hook",
        "done_hook",
        "result",
        "error",
        "__weakref__",
    )

    def __init__(self, client: LlamaClient, path: str, content: bytes, kind: _Kind) -> None:
        self.client = client
        self.path = path
        self.content = content
        self.parser = EventParser(kind)
        self.response: httpx.Response | None = None
        self.events: AsyncGenerator[ServerSentEvent, None] | None = None
        self.send_scope: anyio.CancelScope | None = None
        self.streaming = False
        self.done = False
        self.released = False
        self.closed_by_owner = False
        self.closed_by_user = False
        self.error_hook: ErrorHook | None = None
        self.done_hook: Callable[[Completion], None] | None = None
        self.result: Completion | None = None
        self.error: LlamaprocError | None = None

    async def open(self) -> AsyncGenerator[ServerSentEvent, None]:
        if self.released:
            raise ClosedError("the stream is closed")
        client = self.client
        http = client._http_client()
        request = http.build_request("POST", self.path, content=self.content, headers=_STREAM_HEADERS)
        client._streams.add(self)
        with anyio.CancelScope() as scope:
            self.send_scope = scope
            self.response = response = await http.send(request, stream=True)
        self.send_scope = None
        if scope.cancelled_caught:  # release() cancelled the wait for the answer's headers
            raise ClosedError("the stream was closed before llama-server answered")
        await _raise_for_status(response)
        self.events = events = EventSource(response).aiter_sse()
        self.streaming = True
        return events

    async def read_to_end(self, next_event: Callable[[], Awaitable[ServerSentEvent]]) -> None:
        """After the final event, read the end of the body, for a short while at most.

        llama-server ends the body right after the final event. Reading that
        end lets httpx's body iterators finish instead of being left to the
        garbage collector (trio warns about each one, asyncio schedules a task
        to close each). An error event found there raises :class:`StreamError`.
        """
        with anyio.move_on_after(END_OF_BODY_WAIT):
            while True:
                try:
                    sse = await next_event()
                except StopAsyncIteration:
                    return
                except Exception:  # noqa: BLE001 - the answer is complete; its connection may close as it likes
                    return
                self.parser.after_end(sse.data)

    async def finish(self) -> None:
        """Normal end: keep the summary, close the connection, call the done hook."""
        self.result = result = self.parser.summary()
        await self.release()
        if self.done_hook is not None:
            self.done_hook(result)

    async def fail(self, exc: Exception) -> LlamaprocError:
        """The error to raise for ``exc``, with its cause set; closes the connection first."""
        self.done = True
        self.result = None  # the stream did not end normally
        await self.release()
        error: LlamaprocError
        if self.closed_by_user:
            # aclose() from another task cut the connection under the reader: not a server error.
            error = exc if isinstance(exc, ClosedError) else ClosedError("the stream was closed")
            if error is not exc:
                error.__cause__ = exc
            self.error = error
            return error
        if self.closed_by_owner:
            error = ClosedError("the stream was closed because its client was closed")
        else:
            error = _translate(exc, in_stream=self.streaming)
        if error is not exc:
            error.__cause__ = exc
        if self.error_hook is not None:
            replaced = await self.error_hook(error)
            if replaced is not error and replaced.__cause__ is None:
                replaced.__cause__ = error
            error = replaced
        self.error = error
        return error

    async def release(self) -> None:
        """Close the HTTP response (idempotent, shielded); a pending send is cancelled."""
        if self.released:
            return
        self.released = True
        self.client._streams.discard(self)
        scope = self.send_scope
        if scope is not None:
            scope.cancel()
        events, self.events = self.events, None
        response = self.response
        with anyio.CancelScope(shield=True):
            if events is not None:
                try:
                    await events.aclose()
                except Exception:  # noqa: BLE001 - closing is best effort (it may be running in another task)
                    pass
            if response is not None:
                await response.aclose()


async def _iterate(state: _StreamState) -> AsyncGenerator[Token, None]:
    """The tokens of one stream. Closes the response however it ends, garbage collection included."""
    if state.done:
        return
    try:
        events = await state.open()
        next_event = events.__anext__
        parser = state.parser
        parse = parser.parse
        while True:
            try:
                sse = await next_event()
            except StopAsyncIteration:
                raise parser.incomplete() from None
            token = parse(sse.data)
            if parser.done:
                break
            if token is not None:
                yield token
        # The final event; it may carry the last text (native ``stop`` chunk).
        await state.read_to_end(next_event)
        await state.finish()
    except Exception as exc:  # noqa: BLE001 - fail() translates it and sets the cause
        raise await state.fail(exc)
    finally:
        # Cancellation, aclose() and garbage collection end up here too.
        await state.release()
    if token is not None:
        yield token


class TokenStream:
    """An async iterator of :class:`Token` over one streaming request.

    The request is sent on first use. Use it as ``async with stream:`` (or
    ``contextlib.aclosing``) so that leaving the loop early closes the HTTP
    response at once, which makes llama-server free the slot; a stream that
    is dropped (``break`` out of ``async for tok in model.generate(...)``)
    closes it too, as soon as it is garbage. After the last token,
    :attr:`result` holds the summary (finish reason, usage, timings). A stream
    never just stops on a failure: an error body, an error event or a
    connection cut before the final event raise. :meth:`aclose` called while
    another task waits for a token makes that task raise :class:`ClosedError`.
    """

    __slots__ = ("_state", "_agen")

    def __init__(self, client: LlamaClient, path: str, body: dict[str, Any], kind: _Kind) -> None:
        self._state = _StreamState(client, path, _encode(body), kind)
        self._agen: types.AsyncGeneratorType[Token, None] | None = None

    # -- results and hooks ----------------------------------------------------------------------

    @property
    def result(self) -> Completion | None:
        """The summary, once the stream has ended normally."""
        return self._state.result

    @property
    def error(self) -> LlamaprocError | None:
        """The error the stream ended with, if any."""
        return self._state.error

    @property
    def error_hook(self) -> ErrorHook | None:
        """Called with any error before it is raised; returns the error to raise."""
        return self._state.error_hook

    @error_hook.setter
    def error_hook(self, hook: ErrorHook | None) -> None:
        self._state.error_hook = hook

    @property
    def done_hook(self) -> Callable[[Completion], None] | None:
        """Called with :attr:`result` when the stream ends normally."""
        return self._state.done_hook

    @done_hook.setter
    def done_hook(self, hook: Callable[[Completion], None] | None) -> None:
        self._state.done_hook = hook

    # -- context manager / iterator protocol ---------------------------------------------------

    async def __aenter__(self) -> TokenStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> types.AsyncGeneratorType[Token, None]:
        agen = self._agen
        if agen is None:
            agen = self._agen = cast("types.AsyncGeneratorType[Token, None]", _iterate(self._state))
        return agen

    async def __anext__(self) -> Token:
        return await self.__aiter__().__anext__()

    async def aclose(self) -> None:
        """Close the HTTP response (idempotent). Shielded from cancellation.

        If another task is waiting for a token of this stream, it raises
        :class:`ClosedError`.
        """
        state = self._state
        state.done = True
        agen = self._agen
        with anyio.CancelScope(shield=True):
            if agen is not None and agen.ag_running:
                state.closed_by_user = True
            elif agen is not None:
                await agen.aclose()
            await state.release()


class LlamaClient:
    """Async client for one llama-server.

    ``LlamaClient("http://127.0.0.1:8080")``. Use ``async with`` or call
    :meth:`aclose`; closing the client also closes every stream it opened.
    Safe for concurrent use by many tasks.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
        max_connections: int = 256,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            headers=headers,
            # Each open connection holds one of llama-server's few HTTP threads: keep few idle ones.
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=4, keepalive_expiry=2.0
            ),
            trust_env=False,
            # Plain http needs no TLS context; building one loads the CA bundle (~20 ms).
            verify=not self.base_url.startswith("http://"),
        )
        # Held weakly: a stream nobody references any more is closed by its own iteration.
        self._streams: weakref.WeakSet[_StreamState] = weakref.WeakSet()
        self._closed = False

    async def __aenter__(self) -> LlamaClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """Close every open stream, then the connection pool. Shielded from cancellation."""
        self._closed = True
        with anyio.CancelScope(shield=True):
            for state in list(self._streams):
                state.closed_by_owner = True
                await state.release()
            await self._http.aclose()

    def _http_client(self) -> httpx.AsyncClient:
        if self._closed:
            raise ClosedError("the client is closed")
        return self._http

    async def _request(self, method: str, path: str, *, json_body: Any = None) -> httpx.Response:
        http = self._http_client()
        content = None if json_body is None else _encode(json_body)
        headers = None if content is None else {"Content-Type": "application/json"}
        try:
            response = await http.request(method, path, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise _translate(exc) from exc
        await _raise_for_status(response)
        return response

    async def _json(self, method: str, path: str, json_body: Any = None) -> Any:
        response = await self._request(method, path, json_body=json_body)
        try:
            return response.json()
        except ValueError as exc:
            raise _translate(exc) from exc

    # -- health and introspection ----------------------------------------------------------------

    async def health(self) -> Health:
        """``GET /health``. Returns ``status="loading"`` for the 503 of a loading server."""
        try:
            await self._request("GET", "/health")
        except ServerLoadingError:
            return Health(status="loading")
        return Health(status="ok")

    async def props(self) -> dict[str, Any]:
        """``GET /props``: the server's settings, the model path, the chat template, ..."""
        result: dict[str, Any] = await self._json("GET", "/props")
        return result

    async def slots(self) -> list[dict[str, Any]]:
        """``GET /slots``: one entry per slot, with ``is_processing``."""
        result: list[dict[str, Any]] = await self._json("GET", "/slots")
        return result

    async def metrics(self) -> dict[str, float]:
        """``GET /metrics`` (server started with ``--metrics``), parsed to ``{sample name: value}``."""
        from prometheus_client.parser import text_string_to_metric_families

        response = await self._request("GET", "/metrics")
        # Without its TYPE lines the parser keeps every sample name as exposed: it would
        # rename a counter without the ``_total`` suffix (llamacpp:n_tokens_max).
        text = "\n".join(line for line in response.text.splitlines() if not line.startswith("# TYPE "))
        try:
            return {
                sample.name: float(sample.value)
                for family in text_string_to_metric_families(text)
                for sample in family.samples
            }
        except ValueError as exc:
            raise _translate(exc) from exc

    # -- tokens ------------------------------------------------------------------------------------

    async def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        data = await self._json("POST", "/tokenize", {"content": text, "add_special": add_special})
        return [t if isinstance(t, int) else t["id"] for t in data["tokens"]]

    async def detokenize(self, tokens: Sequence[int]) -> str:
        data = await self._json("POST", "/detokenize", {"tokens": list(tokens)})
        content: str = data["content"]
        return content

    # -- generation ----------------------------------------------------------------------------

    def stream_completion(self, prompt: str | Sequence[int], **params: Any) -> TokenStream:
        """Native ``POST /completion`` with ``stream: true``; tokens carry their ids."""
        return TokenStream(self, STREAM_PATHS["native"], completion_body(prompt, params), "native")

    async def completion(self, prompt: str | Sequence[int], **params: Any) -> Completion:
        """Native ``POST /completion``, not streamed."""
        body = {"prompt": _prompt(prompt), **params, "stream": False, "return_tokens": True}
        obj = await self._json("POST", "/completion", body)
        return Completion(
            text=obj.get("content", ""),
            finish_reason=obj.get("stop_type"),
            usage=Usage(
                prompt_tokens=obj.get("tokens_evaluated", 0),
                completion_tokens=obj.get("tokens_predicted", 0),
                total_tokens=obj.get("tokens_evaluated", 0) + obj.get("tokens_predicted", 0),
            ),
            timings=_timings(obj),
            token_ids=obj.get("tokens") or None,
        )

    def stream_chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> TokenStream:
        """OpenAI ``POST /v1/chat/completions`` with ``stream: true``."""
        return TokenStream(self, STREAM_PATHS["chat"], chat_body(messages, params), "chat")

    async def chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> Completion:
        """OpenAI ``POST /v1/chat/completions``, not streamed."""
        obj = await self._json("POST", "/v1/chat/completions", {"messages": list(messages), **params, "stream": False})
        return self._openai_result(obj, lambda choice: (choice.get("message") or {}).get("content") or "")

    def stream_text_completion(self, prompt: str, **params: Any) -> TokenStream:
        """OpenAI ``POST /v1/completions`` with ``stream: true``."""
        return TokenStream(self, STREAM_PATHS["text"], {"prompt": prompt, **params, "stream": True}, "text")

    async def text_completion(self, prompt: str, **params: Any) -> Completion:
        """OpenAI ``POST /v1/completions``, not streamed."""
        obj = await self._json("POST", "/v1/completions", {"prompt": prompt, **params, "stream": False})
        return self._openai_result(obj, lambda choice: choice.get("text") or "")

    @staticmethod
    def _openai_result(obj: dict[str, Any], text_of: Callable[[dict[str, Any]], str]) -> Completion:
        try:
            choice = obj["choices"][0]
            return Completion(
                text=text_of(choice),
                finish_reason=choice.get("finish_reason"),
                usage=Usage.model_validate(obj.get("usage") or {}),
                timings=_timings(obj),
            )
        except (KeyError, IndexError, TypeError) as exc:
            raise _translate(exc) from exc

    async def embeddings(self, inputs: Sequence[str], **params: Any) -> list[list[float]]:
        """OpenAI ``POST /v1/embeddings``: one vector per input, in input order."""
        obj = await self._json("POST", "/v1/embeddings", {"input": list(inputs), **params})
        try:
            items = sorted(obj["data"], key=lambda item: item.get("index", 0))
            return [list(item["embedding"]) for item in items]
        except (KeyError, TypeError) as exc:
            raise _translate(exc) from exc
