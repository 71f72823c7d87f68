"""Request bodies for llama-server and the checks of their parameters (sans-io).

One validation for every way in: :class:`~llamaproc.TextModel`'s methods and
the daemon's socket protocol build their bodies with :func:`generate_request_body`
and :func:`chat_request_body`; a bad value raises
:class:`~llamaproc.InvalidArgumentError` before anything is sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InvalidArgumentError, ServerLoadingError, StatusError

__all__ = [
    "MAX_TOKENS",
    "TEMPERATURE",
    "chat_body",
    "chat_params",
    "chat_request_body",
    "check_int",
    "check_prompt",
    "completion_body",
    "completion_params",
    "encode_json",
    "generate_request_body",
    "status_error",
]

#: Defaults of the generation methods: greedy, up to 256 tokens.
MAX_TOKENS = 256
TEMPERATURE = 0.0

def encode_json(body: Any) -> bytes:
    """A request body as JSON (as httpx would write it); what cannot be written is the caller's mistake."""
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"the request cannot be sent as JSON: {exc}") from exc


def check_prompt(prompt: Any) -> str | list[int]:
    """A prompt: a string, or a sequence of token ids."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        ids = list(prompt)
        if all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return ids
    raise InvalidArgumentError(f"prompt must be a string or a sequence of token ids (ints), not {prompt!r:.80}")


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


def completion_body(prompt: str | Sequence[int], params: Mapping[str, Any]) -> dict[str, Any]:
    """The body of a streamed native ``/completion``: tokens come with their ids."""
    return {"prompt": check_prompt(prompt), **params, "stream": True, "return_tokens": True}


def chat_body(messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> dict[str, Any]:
    """The body of a streamed ``/v1/chat/completions``."""
    return {"messages": list(messages), **params, "stream": True}


def check_int(name: str, value: object, *, minimum: int | None = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be an int{' or None' if optional else ''}, not {value!r:.80}")
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"{name} must be at least {minimum}, not {value}")


def _generation_params(
    max_tokens: object, temperature: object, stop: object, params: dict[str, Any]
) -> dict[str, Any]:
    """Check the common generation options; ``stop`` becomes a list (a lone string is one stop string)."""
    check_int("max_tokens", max_tokens, minimum=-1)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise InvalidArgumentError(f"temperature must be a number, not {temperature!r:.80}")
    params["temperature"] = temperature
    if isinstance(stop, str):
        params["stop"] = [stop]
    elif isinstance(stop, Sequence) and not isinstance(stop, bytes) and all(isinstance(x, str) for x in stop):
        params["stop"] = list(stop)
    elif stop is not None:
        raise InvalidArgumentError(f"stop must be a string or a sequence of strings, not {stop!r:.80}")
    return params


def completion_params(
    max_tokens: object, temperature: object, stop: object, params: dict[str, Any]
) -> dict[str, Any]:
    """The ``/completion`` parameters of :meth:`TextModel.generate` and :meth:`TextModel.complete` (checked)."""
    if "n_predict" in params:
        raise InvalidArgumentError("give the number of tokens to generate as max_tokens, not n_predict")
    params = _generation_params(max_tokens, temperature, stop, params)
    return {"n_predict": max_tokens, **params}


def chat_params(
    messages: object, max_tokens: object, temperature: object, stop: object, params: dict[str, Any]
) -> dict[str, Any]:
    """The ``/v1/chat/completions`` parameters of :meth:`TextModel.chat` (checked, ``messages`` too)."""
    params = _generation_params(max_tokens, temperature, stop, params)
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not all(
        isinstance(m, Mapping) for m in messages
    ):
        raise InvalidArgumentError(
            f"messages must be a sequence of mappings such as {{'role': 'user', 'content': 'hi'}}, "
            f"not {messages!r:.80}"
        )
    return {"max_tokens": max_tokens, **params}


def generate_request_body(
    prompt: Any, *, max_tokens: object = MAX_TOKENS, temperature: object = TEMPERATURE, stop: object = None,
    **params: Any,
) -> dict[str, Any]:
    """The streamed ``/completion`` body :meth:`TextModel.generate` sends for these arguments (checked)."""
    return completion_body(prompt, completion_params(max_tokens, temperature, stop, params))


def chat_request_body(
    messages: Any, *, max_tokens: object = MAX_TOKENS, temperature: object = TEMPERATURE, stop: object = None,
    **params: Any,
) -> dict[str, Any]:
    """The streamed ``/v1/chat/completions`` body :meth:`TextModel.chat` sends for these arguments (checked)."""
    return chat_body(messages, chat_params(messages, max_tokens, temperature, stop, params))
