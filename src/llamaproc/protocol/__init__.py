"""The protocols, sans-io: what goes over the wire, with no sockets and no event loop.

* SSE framing (:class:`SSEDecoder`) and the parsing of llama-server's streamed
  events into tokens and a summary (:class:`EventParser`);
* llama-server request bodies and the one validation of their parameters;
* llama-server's ``/metrics`` text.

Every transport reuses these: the library client over httpx, and the daemon's
HTTP and socket relays over its upstream client.
"""

from ._bodies import (
    MAX_TOKENS,
    TEMPERATURE,
    chat_body,
    chat_params,
    chat_request_body,
    check_int,
    check_prompt,
    completion_body,
    completion_params,
    encode_json,
    generate_request_body,
    status_error,
)
from ._events import STREAM_PATHS, EventParser, StreamKind, timings_of
from ._metrics import parse_metrics
from ._sse import MAX_EVENT_SIZE, SSEDecoder, sse_events

__all__ = [
    "MAX_EVENT_SIZE",
    "MAX_TOKENS",
    "STREAM_PATHS",
    "TEMPERATURE",
    "EventParser",
    "SSEDecoder",
    "StreamKind",
    "chat_body",
    "chat_params",
    "chat_request_body",
    "check_int",
    "check_prompt",
    "completion_body",
    "completion_params",
    "encode_json",
    "generate_request_body",
    "parse_metrics",
    "sse_events",
    "status_error",
    "timings_of",
]
