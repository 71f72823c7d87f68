"""A pure async HTTP/SSE client for llama-server.

This module knows HTTP and llama-server's JSON; it knows nothing about
processes. Every httpx exception is translated in one place
(:func:`_translate`), every stream is owned by a :class:`TokenStream` that
closes its HTTP response on ``break`` (with ``async with`` or
``contextlib.aclosing``), on error and at the end.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal

import anyio
import httpx
from httpx_sse import EventSource, ServerSentEvent

from ._exceptions import (
    ClosedError,
    IncompleteStreamError,
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
_ERROR_BODY_LIMIT = 64 * 1024

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


async def _raise_for_status(response: httpx.Response) -> None:
    """Read a non-2xx answer (bounded) and raise it as a typed error."""
    if response.is_success:
        return
    raw = b""
    try:
        async for chunk in response.aiter_bytes():
            raw += chunk
            if len(raw) > _ERROR_BODY_LIMIT:
                break
    except httpx.HTTPError:
        pass
    finally:
        with anyio.CancelScope(shield=True):
            await response.aclose()
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = raw.decode("utf-8", "replace")
    cls = StatusError
    if response.status_code == 503 and "loading" in json.dumps(body).lower():
        cls = ServerLoadingError
    raise cls(response.status_code, body, url=str(response.request.url))


def _timings(obj: Mapping[str, Any]) -> Timings | None:
    t = obj.get("timings")
    return Timings.model_validate(t) if isinstance(t, dict) else None


class TokenStream:
    """An async iterator of :class:`Token` over one streaming request.

    The request is sent on first use. Use it as ``async with stream:`` (or
    ``contextlib.aclosing``) so that leaving the loop early closes the HTTP
    response at once, which makes llama-server free the slot. After the last
    token, :attr:`result` holds the summary (finish reason, usage, timings).
    A stream never just stops on a failure: an error body, an error event or a
    connection cut before the final event raise.
    """

    __slots__ = (
        "_client",
        "_path",
        "_body",
        "_kind",
        "_response",
        "_events",
        "_texts",
        "_ids",
        "_done",
        "_closed",
        "_closed_by_owner",
        "error_hook",
        "done_hook",
        "result",
        "error",
    )

    def __init__(self, client: LlamaClient, path: str, body: dict[str, Any], kind: _Kind) -> None:
        self._client = client
        self._path = path
        self._body = body
        self._kind = kind
        self._response: httpx.Response | None = None
        self._events: AsyncIterator[ServerSentEvent] | None = None
        self._texts: list[str] = []
        self._ids: list[int] = []
        self._done = False
        self._closed = False
        self._closed_by_owner = False
        #: Called with any error before it is raised; returns the error to raise.
        self.error_hook: ErrorHook | None = None
        #: Called with :attr:`result` when the stream ends normally.
        self.done_hook: Callable[[Completion], None] | None = None
        #: The summary, once the stream has ended normally.
        self.result: Completion | None = None
        #: The error the stream ended with, if any.
        self.error: LlamaprocError | None = None

    # -- context manager / iterator protocol ---------------------------------------------------

    async def __aenter__(self) -> TokenStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> Token:
        if self._done:
            raise StopAsyncIteration
        try:
            events = self._events
            if events is None:
                events = await self._open()
            while True:
                try:
                    sse = await events.__anext__()
                except StopAsyncIteration:
                    raise IncompleteStreamError(
                        "the stream ended without its final event" + ("" if self._kind == "native" else " ([DONE])")
                    ) from None
                token = self._parse(sse.data)
                if self._done:
                    # The final event; it may carry the last text (native ``stop`` chunk).
                    await self._finish()
                    if token is None:
                        raise StopAsyncIteration
                if token is not None:
                    return token
        except (StopAsyncIteration, GeneratorExit):
            raise
        except BaseException as exc:
            if not isinstance(exc, Exception):
                # Cancellation and KeyboardInterrupt: close, then let it through.
                await self._close_response()
                raise
            error: LlamaprocError
            if self._closed_by_owner:
                error = ClosedError("the stream was closed because its client was closed")
            else:
                error = _translate(exc, in_stream=self._events is not None)
            await self._close_response()
            if self.error_hook is not None:
                error = await self.error_hook(error)
            self.error = error
            self._done = True
            if error is exc:
                raise
            raise error from exc

    async def aclose(self) -> None:
        """Close the HTTP response (idempotent). Shielded from cancellation."""
        self._done = True
        await self._close_response()

    # -- internals -------------------------------------------------------------------------------

    async def _open(self) -> AsyncIterator[ServerSentEvent]:
        if self._closed:
            raise ClosedError("the stream is closed")
        client = self._client
        http = client._http_client()
        request = http.build_request(
            "POST",
            self._path,
            json=self._body,
            # llama-server closes the connection after every streamed answer while announcing
            # keep-alive; saying so up front keeps the dead connection out of the pool.
            headers={"Accept": "text/event-stream", "Cache-Control": "no-store", "Connection": "close"},
        )
        client._streams.add(self)
        self._response = response = await http.send(request, stream=True)
        await _raise_for_status(response)
        self._events = events = EventSource(response).aiter_sse()
        return events

    def _parse(self, data: str) -> Token | None:
        if self._kind != "native" and data == "[DONE]":
            self._done = True
            return None
        obj = json.loads(data)
        if "error" in obj:
            raise StreamError(obj)
        if self._kind == "native":
            return self._parse_native(obj)
        choices = obj.get("choices")
        choice = choices[0] if choices else None
        text: str | None = None
        if choice is not None:
            if self._kind == "chat":
                text = (choice.get("delta") or {}).get("content")
            else:
                text = choice.get("text")
            if choice.get("finish_reason") is not None or "timings" in obj or "usage" in obj:
                self._set_result(obj, choice.get("finish_reason"))
        elif "usage" in obj or "timings" in obj:
            self._set_result(obj, None)
        if text:
            self._texts.append(text)
            return Token(text)
        return None

    def _parse_native(self, obj: dict[str, Any]) -> Token | None:
        text: str = obj.get("content") or ""
        ids = obj.get("tokens")
        if obj.get("stop"):
            self._done = True
            if text:
                self._texts.append(text)
            self.result = Completion(
                text="".join(self._texts),
                finish_reason=obj.get("stop_type"),
                usage=Usage(
                    prompt_tokens=obj.get("tokens_evaluated", 0),
                    completion_tokens=obj.get("tokens_predicted", 0),
                    total_tokens=obj.get("tokens_evaluated", 0) + obj.get("tokens_predicted", 0),
                ),
                timings=_timings(obj),
                token_ids=self._ids or None,
            )
            return Token(text) if text else None
        token_id: int | None = None
        if ids:
            self._ids.extend(ids)
            if len(ids) == 1:
                token_id = ids[0]
        if text or token_id is not None:
            self._texts.append(text)
            return Token(text, token_id)
        return None

    def _set_result(self, obj: dict[str, Any], finish_reason: str | None) -> None:
        prev = self.result
        usage = obj.get("usage")
        timings = _timings(obj)
        self.result = Completion(
            text="".join(self._texts),
            finish_reason=finish_reason or (prev.finish_reason if prev else None),
            usage=Usage.model_validate(usage) if isinstance(usage, dict) else (prev.usage if prev else Usage()),
            timings=timings or (prev.timings if prev else None),
        )

    async def _finish(self) -> None:
        """Normal end: fill in the text and give the connection back to the pool."""
        if self.result is None:
            self.result = Completion(text="".join(self._texts))
        elif self._kind != "native":
            self.result = self.result.model_copy(update={"text": "".join(self._texts)})
        if self.result.timings is not None and self.result.usage.total_tokens == 0:
            t = self.result.timings
            self.result = self.result.model_copy(
                update={"usage": Usage(prompt_tokens=t.prompt_n + t.cache_n, completion_tokens=t.predicted_n,
                                       total_tokens=t.prompt_n + t.cache_n + t.predicted_n)}
            )
        # Read the (empty) rest of the body so the connection goes back to the pool.
        events = self._events
        if events is not None:
            with anyio.move_on_after(1.0):
                try:
                    async for _ in events:
                        pass
                except Exception:  # noqa: BLE001 - the answer is complete; draining is best effort
                    pass
        await self._close_response()
        if self.done_hook is not None:
            self.done_hook(self.result)

    async def _close_response(self) -> None:
        self._closed = True
        self._client._streams.discard(self)
        events, self._events = self._events, None
        response = self._response
        with anyio.CancelScope(shield=True):
            if events is not None and hasattr(events, "aclose"):
                try:
                    await events.aclose()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
            if response is not None:
                await response.aclose()


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
        self._streams: set[TokenStream] = set()
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
            for stream in list(self._streams):
                stream._closed_by_owner = True
                await stream._close_response()
            await self._http.aclose()

    def _http_client(self) -> httpx.AsyncClient:
        if self._closed:
            raise ClosedError("the client is closed")
        return self._http

    async def _request(self, method: str, path: str, *, json_body: Any = None) -> httpx.Response:
        http = self._http_client()
        try:
            response = await http.request(method, path, json=json_body)
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
        body = {"prompt": prompt if isinstance(prompt, str) else list(prompt), **params,
                "stream": True, "return_tokens": True}
        return TokenStream(self, "/completion", body, "native")

    async def completion(self, prompt: str | Sequence[int], **params: Any) -> Completion:
        """Native ``POST /completion``, not streamed."""
        body = {"prompt": prompt if isinstance(prompt, str) else list(prompt), **params,
                "stream": False, "return_tokens": True}
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
        body = {"messages": list(messages), **params, "stream": True}
        return TokenStream(self, "/v1/chat/completions", body, "chat")

    async def chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> Completion:
        """OpenAI ``POST /v1/chat/completions``, not streamed."""
        obj = await self._json("POST", "/v1/chat/completions", {"messages": list(messages), **params, "stream": False})
        return self._openai_result(obj, lambda choice: (choice.get("message") or {}).get("content") or "")

    def stream_text_completion(self, prompt: str, **params: Any) -> TokenStream:
        """OpenAI ``POST /v1/completions`` with ``stream: true``."""
        return TokenStream(self, "/v1/completions", {"prompt": prompt, **params, "stream": True}, "text")

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
