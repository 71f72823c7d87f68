"""The protocols, sans-io: what goes over the wire, with no sockets and no event loop.

* SSE framing (:class:`SSEDecoder`) and the parsing of llama-server's streamed
  events into tokens and a summary (:class:`EventParser`);
* llama-server request bodies and the one validation of their parameters;
* llama-server's ``/metrics`` text;
* NDJSON lines for the daemon's socket (:class:`LineDecoder`);
* the one table of error codes the daemon's front ends send (:data:`ERROR_CODES`).

Every transport reuses these: the library client over httpx, and the daemon's
HTTP and socket relays over its upstream client.
"""

from ._bodies import (
    MAX_TOKENS,
    OPENAI_REQUIRED,
    TEMPERATURE,
    chat_body,
    chat_params,
    chat_request_body,
    check_generation,
    check_inputs,
    check_int,
    check_messages,
    check_number,
    check_openai_request,
    check_prompt,
    check_stop,
    completion_body,
    completion_params,
    decode_json_object,
    encode_json,
    generate_request_body,
    status_error,
)
from ._codes import (
    ERROR_CODES,
    ErrorCode,
    error_code,
    error_codes_table,
    error_message,
    error_status,
    openai_error_body,
)
from ._events import STREAM_PATHS, EventParser, StreamKind, native_completion, timings_of
from ._metrics import parse_metrics
from ._ndjson import LineDecoder, encode_event
from ._sse import MAX_EVENT_SIZE, SSEDecoder, sse_events

__all__ = [
    "ERROR_CODES",
    "MAX_EVENT_SIZE",
    "MAX_TOKENS",
    "OPENAI_REQUIRED",
    "STREAM_PATHS",
    "TEMPERATURE",
    "ErrorCode",
    "EventParser",
    "LineDecoder",
    "SSEDecoder",
    "StreamKind",
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
    "encode_event",
    "encode_json",
    "error_code",
    "error_codes_table",
    "error_message",
    "error_status",
    "generate_request_body",
    "native_completion",
    "openai_error_body",
    "parse_metrics",
    "sse_events",
    "status_error",
    "timings_of",
]
