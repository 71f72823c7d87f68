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
    "OPENAI_REQUIRED",
    "TEMPERATURE",
    "chat_body",
    "chat_params",
    "chat_request_body",
    "check_generation",
    "check_inputs",
    "check_int",
    "check_messages",
    "check_number",
    "check_openai_request",
    "check_prompt",
    "check_stop",
    "completion_body",
    "completion_params",
    "decode_json_object",
    "encode_json",
    "generate_request_body",
    "status_error",
]

#: Defaults of the generation methods: greedy, up to 256 tokens.
MAX_TOKENS = 256
TEMPERATURE = 0.0

def decode_json_object(raw: bytes) -> dict[str, Any]:
    """A request (an HTTP body, a socket line) as a JSON object; ``ValueError`` with a readable message if
    it is not one.

    UTF-8 only, with or without a byte order mark: what the daemon forwards to llama-server goes as it
    came, and llama-server reads nothing else (``json.loads`` alone would take UTF-16 and UTF-32 too).
    """
    try:
        value = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8: {exc}") from None
    except RecursionError:
        raise ValueError("not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


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
    raise InvalidArgumentError(
        f"prompt must be a string or a sequence of token ids (ints), not {prompt!r:.80}", param="prompt"
    )


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
    """``value`` is an int (not a bool), at least ``minimum``; ``None`` too when ``optional``."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgumentError(
            f"{name} must be an int{' or None' if optional else ''}, not {value!r:.80}", param=name
        )
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"{name} must be at least {minimum}, not {value}", param=name)


def check_number(name: str, value: object, *, optional: bool = False) -> None:
    """``value`` is an int or a float (not a bool); ``None`` too when ``optional``."""
    if value is None and optional:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be a number, not {value!r:.80}", param=name)


def check_stop(stop: object) -> list[str] | None:
    """``stop`` as a list: a string is one stop string, a sequence of strings is kept, ``None`` is none."""
    if stop is None:
        return None
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, Sequence) and not isinstance(stop, (bytes, bytearray)) and all(
        isinstance(x, str) for x in stop
    ):
        return list(stop)
    raise InvalidArgumentError(f"stop must be a string or a sequence of strings, not {stop!r:.80}", param="stop")


def check_messages(messages: object) -> list[Mapping[str, Any]]:
    """A chat: a non-empty sequence of mappings such as ``{"role": "user", "content": "hi"}``."""
    if (
        isinstance(messages, (str, bytes, Mapping))
        or not isinstance(messages, Sequence)
        or not messages
        or not all(isinstance(m, Mapping) for m in messages)
    ):
        raise InvalidArgumentError(
            f"messages must be a non-empty sequence of mappings such as {{'role': 'user', 'content': 'hi'}}, "
            f"not {messages!r:.80}",
            param="messages",
        )
    return list(messages)


def check_inputs(inputs: object) -> list[str]:
    """Texts to embed: a non-empty sequence of strings."""
    if isinstance(inputs, str):
        raise InvalidArgumentError(
            "embed() takes a list of strings; wrap a single text in a list", param="input"
        )
    if not isinstance(inputs, Sequence) or isinstance(inputs, (bytes, bytearray)) or not inputs or not all(
        isinstance(t, str) for t in inputs
    ):
        raise InvalidArgumentError(f"input must be a non-empty sequence of strings, not {inputs!r:.80}", param="input")
    return list(inputs)


def check_generation(params: dict[str, Any], *, null: bool = True) -> dict[str, Any]:
    """Check the generation options every way in shares, in place: ``max_tokens`` (an int, -1 for no
    limit), ``temperature`` (a number) and ``stop`` (made a list). Others pass through to llama-server.

    ``null``: whether ``None`` stands for "not given" (JSON ``null`` in a request body), as it does not
    for the keyword arguments of the library.
    """
    if "max_tokens" in params:
        check_int("max_tokens", params["max_tokens"], minimum=-1, optional=null)
    if "temperature" in params:
        check_number("temperature", params["temperature"], optional=null)
    if "stop" in params:
        stop = check_stop(params["stop"])
        if stop is None:
            del params["stop"]
        else:
            params["stop"] = stop
    return params


def completion_params(
    max_tokens: object, temperature: object, stop: object, params: dict[str, Any]
) -> dict[str, Any]:
    """The ``/completion`` parameters of :meth:`TextModel.generate` and :meth:`TextModel.complete` (checked)."""
    if "n_predict" in params:
        raise InvalidArgumentError(
            "give the number of tokens to generate as max_tokens, not n_predict", param="n_predict"
        )
    params = check_generation(
        {**params, "max_tokens": max_tokens, "temperature": temperature, "stop": stop}, null=False
    )
    return {"n_predict": params.pop("max_tokens"), **params}


def chat_params(
    messages: object, max_tokens: object, temperature: object, stop: object, params: dict[str, Any]
) -> dict[str, Any]:
    """The ``/v1/chat/completions`` parameters of :meth:`TextModel.chat` (checked, ``messages`` too)."""
    params = check_generation(
        {**params, "max_tokens": max_tokens, "temperature": temperature, "stop": stop}, null=False
    )
    check_messages(messages)
    return {"max_tokens": params.pop("max_tokens"), **params}


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


#: The field each OpenAI route of the daemon needs besides ``model``.
OPENAI_REQUIRED = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/embeddings": "input"}


def check_openai_request(path: str, body: object) -> dict[str, Any]:
    """The checks the daemon makes on an OpenAI request body before it forwards it as it came.

    ``model`` must be a string and the route's own field present (``messages``
    a non-empty list of objects for chat); ``stream`` a boolean; the common
    generation options as :func:`check_generation` wants them. Everything else
    is llama-server's to judge. Raises :class:`InvalidArgumentError` naming the
    field (``param``).
    """
    if not isinstance(body, dict):
        raise InvalidArgumentError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        what = "missing required field 'model'" if model is None else "'model' must be a string"
        raise InvalidArgumentError(what, param="model")
    field = OPENAI_REQUIRED.get(path)
    if field is not None and field not in body:
        raise InvalidArgumentError(f"missing required field {field!r}", param=field)
    if field == "messages":
        check_messages(body["messages"])
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidArgumentError("'stream' must be a boolean", param="stream")
    check_generation(dict(body))  # the body is forwarded as it came: check a copy
    return body
