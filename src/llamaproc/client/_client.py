"""A pure async HTTP/SSE client for llama-server.

This module knows HTTP; it knows nothing about processes. Every httpx
exception is translated in one place (:func:`_translate`), every stream is
owned by a :class:`TokenStream` that closes its HTTP response on ``break``
(with ``async with`` or ``contextlib.aclosing``, or when the stream is
dropped), on error and at the end.

What goes over the wire comes from :mod:`llamaproc.protocol`: the request
bodies (a parameter that is not JSON raises
:class:`~llamaproc.InvalidArgumentError` before anything is sent), the SSE
framing (:class:`~llamaproc.protocol.SSEDecoder`) and the parsing of events
into tokens (:class:`~llamaproc.protocol.EventParser`), the same ones the
daemon's relays use.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import anyio
import httpx

from ..errors import (
    ClosedError,
    IncompleteStreamError,
    LlamaprocError,
    ServerError,
    ServerLoadingError,
    TransportError,
)
from ..protocol import (
    STREAM_PATHS,
    EventParser,
    SSEDecoder,
    StreamKind,
    chat_body,
    check_prompt,
    completion_body,
    encode_json,
    native_completion,
    parse_metrics,
    status_error,
    timings_of,
)
from ..types import Completion, Health, Reshard, Token, Usage

__all__ = ["DEFAULT_TIMEOUT", "END_OF_BODY_WAIT", "ERROR_BODY_LIMIT", "LlamaClient", "TokenStream"]

#: Connect and write stay short; a generation may take long before and between tokens.
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=30.0, pool=None)
#: How much of an error answer is read.
ERROR_BODY_LIMIT = 64 * 1024
#: How long a stream waits for the end of the body after its final event (it normally follows at once).
END_OF_BODY_WAIT = 0.2

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
        "decoder",
        "chunks",
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

    def __init__(self, client: LlamaClient, path: str, content: bytes, kind: StreamKind) -> None:
        self.client = client
        self.path = path
        self.content = content
        self.parser = EventParser(kind)
        self.response: httpx.Response | None = None
        self.decoder = SSEDecoder()
        self.chunks: AsyncGenerator[bytes, None] | None = None
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

    async def open(self) -> AsyncGenerator[bytes, None]:
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
        self.chunks = chunks = cast("AsyncGenerator[bytes, None]", response.aiter_bytes())
        self.streaming = True
        return chunks

    async def read_to_end(self, next_chunk: Callable[[], Awaitable[bytes]]) -> None:
        """After the final event, read the end of the body, for a short while at most.

        llama-server ends the body right after the final event. Reading that
        end lets httpx's body iterators finish instead of being left to the
        garbage collector (trio warns about each one, asyncio schedules a task
        to close each). An error event found there raises :class:`StreamError`.
        """
        with anyio.move_on_after(END_OF_BODY_WAIT):
            while True:
                try:
                    chunk = await next_chunk()
                except StopAsyncIteration:
                    return
                except Exception:  # noqa: BLE001 - the answer is complete; its connection may close as it likes
                    return
                for data in self.decoder.feed(chunk):
                    self.parser.after_end(data)

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
        chunks, self.chunks = self.chunks, None
        response = self.response
        with anyio.CancelScope(shield=True):
            if chunks is not None:
                try:
                    await chunks.aclose()
                except Exception:  # noqa: BLE001 - closing is best effort (it may be running in another task)
                    pass
            if response is not None:
                await response.aclose()


async def _iterate(state: _StreamState) -> AsyncGenerator[Token, None]:
    """The tokens of one stream. Closes the response however it ends, garbage collection included."""
    if state.done:
        return
    last: Token | None = None  # the final event's text goes out once the end of the body is read
    try:
        chunks = await state.open()
        next_chunk = chunks.__anext__
        parser = state.parser
        parse = parser.parse
        feed = state.decoder.feed
        eof = False
        while not parser.done:
            try:
                events = feed(await next_chunk())
            except StopAsyncIteration:
                events = state.decoder.end()  # a CR held back may complete the last event
                eof = True
            for data in events:
                if parser.done:
                    parser.after_end(data)
                    continue
                token = parse(data)
                if token is not None:
                    if parser.done:
                        last = token
                    else:
                        yield token
                        if state.released:  # closed while the caller held this token
                            raise ClosedError("the stream is closed")
            if eof and not parser.done:
                raise parser.incomplete()
        await state.read_to_end(next_chunk)
        await state.finish()
    except Exception as exc:  # noqa: BLE001 - fail() translates it and sets the cause
        raise await state.fail(exc)  # noqa: B904 - fail() sets the cause
    finally:
        # Cancellation, aclose() and garbage collection end up here too.
        await state.release()
    if last is not None:
        yield last


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

    def __init__(self, client: LlamaClient, path: str, body: dict[str, Any], kind: StreamKind) -> None:
        self._state = _StreamState(client, path, encode_json(body), kind)
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
    def token_ids(self) -> list[int]:
        """The ids of the tokens received so far, where the endpoint reports them (a copy)."""
        return list(self._state.parser.ids)

    @property
    def reshards(self) -> list[Reshard]:
        """Recoveries from lost rpc workers during this stream: always empty for a model on one process."""
        return []

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
            agen = self._agen = cast("types.AsyncGeneratorType[Token, None]", self._begin())
        return agen

    def _begin(self) -> AsyncGenerator[Token, None]:
        """The iteration, made on first use (a stream that makes its tokens otherwise overrides it)."""
        return _iterate(self._state)

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

    ``LlamaClient("http://127.0.0.1:8080")``; ``api_key`` for a server started with
    one (``--api-key``, ``LLAMA_API_KEY``). Use ``async with`` or call
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
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        if api_key is not None:
            headers = {**(headers or {}), "Authorization": f"Bearer {api_key}"}
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
        content = None if json_body is None else encode_json(json_body)
        headers = None if content is None else {"Content-Type": "application/json"}
        try:
            response = await http.request(method, path, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise _translate(exc) from exc
        await _raise_for_status(response)
        return response

    async def post(self, path: str, body: Any) -> Any:
        """``POST path`` with a JSON body; the decoded JSON answer (a non-2xx answer raises its typed error)."""
        return await self._json("POST", path, body)

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
        response = await self._request("GET", "/metrics")
        try:
            return parse_metrics(response.text)
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
        body = {"prompt": check_prompt(prompt), **params, "stream": False, "return_tokens": True}
        obj = await self._json("POST", "/completion", body)
        try:
            return native_completion(obj, obj.get("content", ""), obj.get("tokens") or None)
        except (ValueError, TypeError, AttributeError) as exc:
            raise _translate(exc) from exc

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
                timings=timings_of(obj),
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
