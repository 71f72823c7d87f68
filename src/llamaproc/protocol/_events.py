"""The tokens and the summary of a streamed generation, from the data of its events (sans-io)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from ..errors import IncompleteStreamError, ServerError, StreamError
from ..types import Completion, Timings, Token, Usage

__all__ = ["STREAM_PATHS", "EventParser", "StreamKind", "native_completion", "timings_of"]

#: The three streamed generation endpoints of llama-server: native ``/completion``, OpenAI chat, OpenAI text.
StreamKind = Literal["native", "chat", "text"]

#: Paths of the streamed generation endpoints, by kind.
STREAM_PATHS: dict[StreamKind, str] = {"native": "/completion", "chat": "/v1/chat/completions", "text": "/v1/completions"}


def timings_of(obj: Mapping[str, Any]) -> Timings | None:
    t = obj.get("timings")
    return Timings.model_validate(t) if isinstance(t, dict) else None


def native_completion(obj: Mapping[str, Any], text: str, token_ids: list[int] | None) -> Completion:
    """The summary of a native ``/completion`` answer (its final chunk, or the whole answer unstreamed)."""
    evaluated, predicted = obj.get("tokens_evaluated", 0), obj.get("tokens_predicted", 0)
    return Completion(
        text=text,
        finish_reason=obj.get("stop_type"),
        usage=Usage(prompt_tokens=evaluated, completion_tokens=predicted, total_tokens=evaluated + predicted),
        timings=timings_of(obj),
        token_ids=token_ids,
    )


class EventParser:
    """The tokens and the summary of one streamed generation, from the ``data`` of its SSE events.

    Knows llama-server's JSON, not how the events arrive: :meth:`parse` takes
    one event's data (bytes, as :class:`SSEDecoder` gives it, or text) and
    returns its token, if it has one; :attr:`done` is
    set by the final event (native ``"stop": true``, OpenAI ``[DONE]``). A
    malformed event raises :class:`ServerError`, an error event
    :class:`StreamError`.
    """

    __slots__ = ("kind", "texts", "ids", "done", "result")

    def __init__(self, kind: StreamKind) -> None:
        self.kind = kind
        self.texts: list[str] = []
        self.ids: list[int] = []
        self.done = False
        self.result: Completion | None = None

    def parse(self, data: bytes | str) -> Token | None:
        if self.kind != "native" and (data == b"[DONE]" or data == "[DONE]"):
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

    def after_end(self, data: bytes | str) -> None:
        """An event after the final one: an error event raises (a request for several prompts
        gives one per failed prompt); anything else is not part of this answer."""
        if data[:1] in (b"{", "{"):
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
        token_id: int | None = None
        if choice is not None:
            if self.kind == "chat":
                text = (choice.get("delta") or {}).get("content")
            else:
                text = choice.get("text")
            logprobs = choice.get("logprobs")
            if logprobs:
                # Token ids come only with logprobs (``n_probs``) on the OpenAI routes.
                ids = [entry["id"] for entry in logprobs.get("content") or () if "id" in entry]
                self.ids.extend(ids)
                if len(ids) == 1:
                    token_id = ids[0]
            if choice.get("finish_reason") is not None or "timings" in obj or "usage" in obj:
                self._set_result(obj, choice.get("finish_reason"))
        elif "usage" in obj or "timings" in obj:
            self._set_result(obj, None)
        if text:
            self.texts.append(text)
            return Token(text, token_id)
        return None

    def _native(self, obj: dict[str, Any]) -> Token | None:
        text: str = obj.get("content") or ""
        ids = obj.get("tokens")
        if obj.get("stop"):
            self.done = True
            if ids:
                self.ids.extend(ids)
            if text:
                self.texts.append(text)
            self.result = native_completion(obj, "".join(self.texts), self.ids or None)
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
        timings = timings_of(obj)
        self.result = Completion(
            text="".join(self.texts),
            finish_reason=finish_reason or (prev.finish_reason if prev else None),
            usage=Usage.model_validate(usage) if isinstance(usage, dict) else (prev.usage if prev else Usage()),
            timings=timings or (prev.timings if prev else None),
        )
