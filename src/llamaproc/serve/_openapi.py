"""The daemon's HTTP API as an OpenAPI 3.1 document, served at ``GET /openapi.json``.

The document describes what the daemon itself does: its routes, their path
parameters, the fields of a request body it checks (``model``, ``messages``,
``prompt``, ``input``, ``stream``; every other field passes through to
llama-server, hence ``additionalProperties: true``), the outline of its
answers and every status code it sends, with OpenAI's error shape. The state
of a model (``/api/models``) is described from :class:`~llamaproc.runtime.ModelStatus`
itself, so the two cannot drift apart, and the bodies of the worker routes from
the models that check them.

The document is built once, on first use, and served as the same bytes after.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from .. import __version__
from ..runtime import ModelStatus
from ._workers import STATES, HeartbeatBody, RegisterBody

__all__ = ["openapi_bytes", "openapi_document"]

_JSON = "application/json"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {_JSON: {"schema": schema}}


def _error(description: str, *, retry_after: bool | None = None) -> dict[str, Any]:
    """A response in OpenAI's error shape; ``retry_after``: True if it always carries ``Retry-After``,
    False if it may."""
    response: dict[str, Any] = {"description": description, "content": _json(_ref("Error"))}
    if retry_after is not None:
        header = {
            "description": "Seconds to wait before trying again.",
            "required": retry_after,
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
        response["headers"] = {"Retry-After": header}
    return response


_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "The name of a model, as configured in the daemon's config file.",
    "schema": {"type": "string"},
}


def _proxied(summary: str, operation: str, request: str, answer: str, note: str) -> dict[str, Any]:
    """A ``POST`` route that the daemon forwards to the model's llama-server."""
    return {
        "post": {
            "summary": summary,
            "description": (
                "Routed by `model` to that model's llama-server (loaded first if need be) and answered by it: "
                "the body is forwarded as received and the answer passed back with only its `model` field "
                "rewritten. " + note
            ),
            "operationId": operation,
            "tags": ["OpenAI"],
            "requestBody": {"required": True, "content": _json(_ref(request))},
            "responses": {
                "200": {
                    "description": 'llama-server\'s answer. With `"stream": true`, server-sent events, one '
                    "`data: {...}` event per chunk and `data: [DONE]` at the end; a stream that fails after "
                    'its first event ends with an error event (`data: {"error": {...}}`) instead. The events '
                    "are llama-server's, passed on as they come.",
                    "content": {
                        _JSON: {"schema": _ref(answer)},
                        "text/event-stream": {},  # events of JSON chunks: OpenAPI 3.1 has no schema for them
                    },
                },
                "400": _error(
                    "The body is not a JSON object in UTF-8 (`invalid_json`), lacks a required field or has a "
                    "field of the wrong type or value (`bad_request`, `param` names it; checked by the daemon "
                    "with the library's rules), or llama-server refused it (`bad_request`, with llama-server's "
                    "message and 4xx status)."
                ),
                "404": _error("No model of that name is configured (`code`: `model_not_found`)."),
                "413": _error("The body is larger than the daemon's limit (4 MiB by default)."),
                "429": _error("The model's queue is full (`code`: `queue_full`).", retry_after=True),
                "501": _error("The model cannot do this (e.g. embeddings from a model started without them)."),
                "502": _error("llama-server failed the request or cut the connection (`code`: `upstream_error`)."),
                "504": _error(
                    "llama-server sent nothing for `stall_timeout` seconds and used no CPU: it hangs and is "
                    "restarted (`code`: `upstream_timeout`)."
                ),
                "503": _error(
                    "The model could not be loaded or its server exited (`model_unavailable`), or the daemon "
                    "is shutting down (`shutting_down`, with `Retry-After`).",
                    retry_after=False,
                ),
            },
        }
    }


def _model_route(summary: str, action: str, description: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "description": description,
            "operationId": f"{action}Model",
            "tags": ["management"],
            "parameters": [_NAME],
            "responses": {
                "200": {"description": "The model's state afterwards.", "content": _json(_ref("ModelStatus"))},
                "404": _error("No model of that name is configured (`code`: `model_not_found`)."),
                "503": _error(
                    "The model could not be loaded (`model_unavailable`), or the daemon is shutting down "
                    "(`shutting_down`, with `Retry-After`).",
                    retry_after=False,
                ),
            },
        }
    }


def _request(required: str, field: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description + " Fields other than those below pass through to llama-server.",
        "required": ["model", required],
        "properties": {
            "model": {"type": "string", "description": "The name of a configured model."},
            required: field,
            "stream": {"type": ["boolean", "null"], "description": "Answer with server-sent events."},
        },
        "additionalProperties": True,
    }


_TOKENS = {"type": "array", "items": {"type": "integer"}}
_OUTLINE = {"type": "object", "additionalProperties": True}


def _answer(object_: str, description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": ["object", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "examples": [object_]},
            "created": {"type": "integer"},
            "model": {"type": "string", "description": "The name the request gave."},
            "choices": {"type": "array", "items": _OUTLINE},
            "usage": _OUTLINE,
        },
        "additionalProperties": True,
    }


_TEMPLATE = "#/components/schemas/{model}"
_NULLABLE_STRING = {"type": ["string", "null"]}
_RANGE = {
    "type": "object",
    "description": "Layers `start` to `stop - 1`, in llama.cpp's numbering (the output layer is `n_layer`).",
    "required": ["start", "stop"],
    "properties": {"start": {"type": "integer"}, "stop": {"type": "integer"}},
}


def _worker_schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for name, model in (("WorkerRegistration", RegisterBody), ("WorkerHeartbeat", HeartbeatBody)):
        schema = model.model_json_schema(mode="validation", ref_template=_TEMPLATE)
        schemas |= schema.pop("$defs", {})
        schemas[name] = schema
    device = {
        "type": "object",
        "required": ["name", "total", "free"],
        "properties": {
            "name": {"type": "string"},
            "total": {"type": "integer", "description": "Bytes."},
            "free": {"type": "integer", "description": "Bytes."},
        },
    }
    shard = {
        "type": "object",
        "description": "The layers one worker holds.",
        "required": ["address", "layers"],
        "properties": {"address": {"type": "string"}, "layers": _RANGE},
    }
    seconds = {"type": "number"}
    reshard = {
        "type": "object",
        "description": "One recovery of a sharded stream from lost workers.",
        "required": ["after_tokens", "lost", "layout", "seconds"],
        "properties": {
            "after_tokens": {"type": "integer", "description": "Tokens the stream had delivered."},
            "lost": {"type": "array", "items": {"type": "string"}, "description": "The addresses evicted."},
            "layout": {"type": "array", "items": _ref("Shard"), "description": "The new plan."},
            "seconds": {"type": "number", "description": "From detection to the next token."},
            "detect_seconds": seconds,
            "restart_seconds": seconds,
            "replay_seconds": seconds,
            "reason": {"type": "string"},
        },
    }
    worker = {
        "type": "object",
        "description": "An rpc worker the daemon knows.",
        "required": ["id", "address", "pid", "source", "state", "devices", "model", "layers"],
        "properties": {
            "id": {"type": "string"},
            "address": {"type": "string", "description": "`host:port` of its rpc-server."},
            "pid": {"type": ["integer", "null"], "description": "Its pid when the daemon started it."},
            "source": {"enum": ["local", "registered", "config"]},
            "state": {
                "enum": list(STATES),
                "description": "`lost`: evicted, found dead, or (registered) silent for three heartbeat intervals.",
            },
            "devices": {"type": "array", "items": _ref("Device")},
            "model": {**_NULLABLE_STRING, "description": "The model whose layers it holds."},
            "layers": {"anyOf": [_RANGE, {"type": "null"}]},
            "registered_at": {"type": "string", "format": "date-time"},
            "last_heartbeat": {"type": "string", "format": "date-time"},
            "heartbeat_age": {"type": "number", "description": "Seconds since it was last heard from."},
            "cpu_seconds": {"type": ["number", "null"], "description": "Its rpc-server's CPU seconds, as reported."},
        },
    }
    job = {
        "type": "object",
        "description": "A recent request.",
        "required": ["id", "model", "route", "status", "started", "finished", "tokens", "layout", "reshards"],
        "properties": {
            "id": {"type": "string"},
            "model": {"type": "string"},
            "route": {"type": "string"},
            "status": {"enum": ["running", "done", "failed"]},
            "started": {"type": "string", "format": "date-time"},
            "finished": {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]},
            "seconds": {"type": ["number", "null"]},
            "tokens": {"type": "integer"},
            "layout": {"type": "array", "items": _ref("Shard")},
            "reshards": {"type": "array", "items": _ref("Reshard")},
        },
    }
    schemas |= {
        "Device": device,
        "Shard": shard,
        "Reshard": reshard,
        "Worker": worker,
        "WorkerList": {
            "type": "object",
            "required": ["workers", "heartbeat_interval"],
            "properties": {
                "workers": {"type": "array", "items": _ref("Worker")},
                "heartbeat_interval": {"type": "number", "description": "Seconds between a worker's heartbeats."},
            },
        },
        "WorkerAccepted": {
            "type": "object",
            "required": ["id", "heartbeat_interval"],
            "properties": {
                "id": {"type": "string", "description": "The worker's id, for its heartbeats."},
                "heartbeat_interval": {"type": "number", "description": "Send a heartbeat this often (seconds)."},
            },
        },
        "Job": job,
        "JobList": {
            "type": "object",
            "required": ["jobs"],
            "properties": {"jobs": {"type": "array", "items": _ref("Job"), "description": "Newest first."}},
        },
    }
    return schemas


def _body_errors(route: str) -> dict[str, Any]:
    return {
        "400": _error(
            f"The body is not a JSON object (`invalid_json`) or a field is missing or wrong (`bad_request`, "
            f"`param` names it){route}."
        ),
        "413": _error("The body is larger than 64 KiB (`body_too_large`)."),
    }


_WORKER_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "A worker's id, as `GET /api/workers` lists it.",
    "schema": {"type": "string"},
}


def _worker_paths() -> dict[str, Any]:
    accepted = {"description": "The worker's id and heartbeat interval.", "content": _json(_ref("WorkerAccepted"))}
    return {
        "/api/workers": {
            "get": {
                "summary": "The rpc workers the daemon knows",
                "operationId": "listWorkers",
                "tags": ["workers"],
                "responses": {
                    "200": {
                        "description": "Every worker: local, registered or listed in a model's config.",
                        "content": _json(_ref("WorkerList")),
                    }
                },
            }
        },
        "/api/workers/register": {
            "post": {
                "summary": "Register an rpc worker",
                "description": "Adds the worker (or updates it, keeping its id; a lost one is ready again, for "
                "the next load of a model). It must then send a heartbeat every `heartbeat_interval` seconds.",
                "operationId": "registerWorker",
                "tags": ["workers"],
                "requestBody": {"required": True, "content": _json(_ref("WorkerRegistration"))},
                "responses": {
                    "200": accepted,
                    **_body_errors(", or the daemon cannot reach the worker at its address (`param`: `address`)"),
                    "503": _error(
                        "The registry is full (`too_many_workers`), or see the gate.", retry_after=False
                    ),
                },
            }
        },
        "/api/workers/heartbeat": {
            "post": {
                "summary": "A registered worker's heartbeat",
                "operationId": "workerHeartbeat",
                "tags": ["workers"],
                "requestBody": {"required": True, "content": _json(_ref("WorkerHeartbeat"))},
                "responses": {
                    "200": accepted,
                    **_body_errors(""),
                    "404": _error(
                        "No worker has that id, or it was evicted (`worker_not_found`): register again."
                    ),
                },
            }
        },
        "/api/workers/{id}": {
            "delete": {
                "summary": "Evict an rpc worker",
                "description": "Marks the worker lost; a model using it reshards its streams onto the others.",
                "operationId": "evictWorker",
                "tags": ["workers"],
                "parameters": [_WORKER_ID],
                "responses": {
                    "200": {"description": "The worker, now lost.", "content": _json(_ref("Worker"))},
                    "404": _error("No worker has that id (`worker_not_found`)."),
                },
            }
        },
        "/api/jobs": {
            "get": {
                "summary": "Recent requests",
                "operationId": "listJobs",
                "tags": ["workers"],
                "responses": {
                    "200": {
                        "description": "The last requests: model, route, outcome, tokens, layout and reshards.",
                        "content": _json(_ref("JobList")),
                    }
                },
            }
        },
        "/api/leases": {
            "get": {
                "summary": "The memory ledger",
                "description": "The capacity of each device and the live leases of every process that shares "
                "the daemon's ledger (its own models' among them). Without a ledger: `ledger` null, nothing listed.",
                "operationId": "listLeases",
                "tags": ["models"],
                "responses": {
                    "200": {"description": "The ledger's devices and leases.", "content": _json(_ref("LeaseList"))},
                    "503": _error("The ledger cannot be read (`ledger_unavailable`), or see the gate."),
                },
            }
        },
    }


_FORM = "application/x-www-form-urlencoded"


def _text(media_type: str) -> dict[str, Any]:
    return {media_type: {"schema": {"type": "string"}}}


_SEE_UI: dict[str, Any] = {
    "description": "See `/ui`: the browser shows the page again.",
    "headers": {"Location": {"description": "`/ui`.", "required": True, "schema": {"type": "string"}}},
}


def _dashboard_paths() -> dict[str, Any]:
    login_form = {
        "type": "object",
        "required": ["key"],
        "properties": {"key": {"type": "string", "minLength": 1, "description": "One of the daemon's API keys."}},
    }
    cookie = {
        "description": "The session: `llamaproc_session=TOKEN; HttpOnly; SameSite=Strict; Path=/` (when the daemon "
        "has API keys).",
        "required": False,
        "schema": {"type": "string"},
    }
    return {
        "/api/events": {
            "get": {
                "summary": "What happens in the daemon, live",
                "description": "Server-sent events, as they happen: `model` (a model's state changed: `{model, "
                "event}`), `worker` (an rpc worker was registered, assigned, released, lost or removed: `{change, "
                "...}` with the worker), `reshard` (a sharded model recovered from lost workers), `token` (a token "
                "of a relayed stream: `{model, request, text, layout}`, `layout` naming the worker layout of a "
                "sharded model, else null), `resume` (a stream continued after a reshard) and `end` (a stream "
                "ended). The first event is `subscribed` (`{buffer}`). Each subscriber's buffer holds `buffer` "
                "events: one that reads too slowly loses the oldest and then reads `dropped` (`{count}`). The "
                "feed ends when the daemon shuts down. Also accepts the dashboard's session cookie.",
                "operationId": "events",
                "tags": ["dashboard"],
                "responses": {
                    "200": {
                        "description": "The feed: `event: NAME` and `data: {JSON}` per event, and `: keepalive` "
                        "comments while nothing happens.",
                        "content": _text("text/event-stream"),
                    },
                    "503": _error(
                        "Too many subscribers (`too_many_subscribers`) or the daemon is shutting down "
                        "(`shutting_down`), or see the gate.",
                        retry_after=False,
                    ),
                },
            }
        },
        "/ui": {
            "get": {
                "summary": "The dashboard",
                "description": "One page: every model and worker, and the tokens of recent streams coloured by the "
                "worker layout that produced them. Needs no key; it asks for one (`POST /ui/login`) when the API "
                "does.",
                "operationId": "dashboard",
                "tags": ["dashboard"],
                "responses": {"200": {"description": "The page.", "content": _text("text/html")}},
            }
        },
        "/ui/dashboard.js": {
            "get": {
                "summary": "The dashboard's script",
                "operationId": "dashboardScript",
                "tags": ["dashboard"],
                "responses": {"200": {"description": "The script.", "content": _text("text/javascript")}},
            }
        },
        "/ui/login": {
            "post": {
                "summary": "Log the browser in",
                "description": "Exchanges an API key for a session cookie, accepted in place of "
                "`Authorization: Bearer KEY` for `GET` of `/ui` and `/api/*` (never for a route that changes "
                "something) for 12 hours. Without API keys configured there is nothing to log in to: no cookie.",
                "operationId": "login",
                "tags": ["dashboard"],
                "requestBody": {"required": True, "content": {_FORM: {"schema": login_form}}},
                "responses": {
                    "303": {**_SEE_UI, "headers": {**_SEE_UI["headers"], "Set-Cookie": cookie}},
                    "400": _error("The body is not a form in UTF-8 with a `key` (`bad_request`)."),
                    "401": _error("The key is not one of the daemon's (`invalid_api_key`)."),
                    "413": _error("The body is larger than 4 KiB (`body_too_large`)."),
                },
            }
        },
        "/ui/logout": {
            "post": {
                "summary": "Log the browser out",
                "description": "Ends the session of the cookie sent, and clears the cookie.",
                "operationId": "logout",
                "tags": ["dashboard"],
                "responses": {"303": _SEE_UI},
            }
        },
    }


def _schemas() -> dict[str, Any]:
    status = ModelStatus.model_json_schema(mode="serialization", ref_template=_TEMPLATE)
    schemas: dict[str, Any] = status.pop("$defs", {})
    schemas["ModelStatus"] = status
    schemas |= _worker_schemas()
    lease = {
        "type": "object",
        "description": "One live lease. Times are the ledger's clock, in seconds since the epoch.",
        "required": ["id", "token", "device", "memory", "priority", "holder", "pid", "host", "granted", "expires",
                     "preempt_requested"],
        "properties": {
            "id": {"type": "string"},
            "token": {"type": "integer", "description": "The fencing number of the grant; it only grows."},
            "device": {"type": "string", "description": "`host/device` in a ledger shared by many hosts."},
            "memory": {"type": "integer", "description": "Bytes."},
            "priority": {"type": "string", "enum": ["urgent", "high", "normal", "low", "batch"]},
            "holder": {"type": "string"},
            "pid": {"type": "integer"},
            "host": {"type": "string"},
            "granted": {"type": "number"},
            "expires": {"type": "number"},
            "preempt_requested": {"type": "boolean", "description": "A waiter of higher priority asked for it."},
        },
    }  # fmt: skip
    schemas |= {
        "Lease": lease,
        "LeaseList": {
            "type": "object",
            "required": ["ledger", "capacity", "leases"],
            "properties": {
                "ledger": {"type": ["string", "null"], "description": "The ledger's URL (no password); null: none."},
                "capacity": {
                    "type": "object",
                    "additionalProperties": {"type": "integer"},
                    "description": "Bytes per device.",
                },
                "leases": {"type": "array", "items": _ref("Lease")},
            },
        },
    }
    schemas |= {
        "Error": {
            "type": "object",
            "description": "OpenAI's error shape. `code` is a string of the daemon's (`model_not_found`, "
            "`queue_full`, ...) or, for an error of llama-server's, the status code it gave.",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "integer", "null"]},
                    },
                }
            },
        },
        "Model": {
            "type": "object",
            "required": ["id", "object", "created", "owned_by"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "model"},
                "created": {"type": "integer", "description": "When the daemon started (Unix time)."},
                "owned_by": {"type": "string"},
            },
        },
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
        },
        "ChatCompletionRequest": _request(
            "messages",
            {
                "type": "array",
                "description": "The conversation: OpenAI's message objects.",
                "items": {
                    "type": "object",
                    "properties": {
                        "role": {"type": "string"},
                        "content": {"type": ["string", "array", "null"]},
                    },
                    "additionalProperties": True,
                },
            },
            "A chat completion request.",
        ),
        "CompletionRequest": _request(
            "prompt",
            {
                "description": "A prompt, token ids, or a list of them.",
                "anyOf": [
                    {"type": "string"},
                    _TOKENS,
                    {"type": "array", "items": {"anyOf": [{"type": "string"}, _TOKENS]}},
                ],
            },
            "A text completion request.",
        ),
        "EmbeddingRequest": _request(
            "input",
            {
                "description": "A text, token ids, or a list of them.",
                "anyOf": [
                    {"type": "string"},
                    _TOKENS,
                    {"type": "array", "items": {"anyOf": [{"type": "string"}, _TOKENS]}},
                ],
            },
            "An embeddings request (for a model configured with `embeddings = true`).",
        ),
        "ChatCompletion": _answer("chat.completion", "llama-server's chat completion, in outline."),
        "Completion": _answer("text_completion", "llama-server's text completion, in outline."),
        "Embeddings": {
            "type": "object",
            "description": "llama-server's embeddings, in outline.",
            "required": ["object", "data", "model"],
            "properties": {
                "object": {"type": "string", "examples": ["list"]},
                "model": {"type": "string", "description": "The name the request gave."},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "object": {"type": "string", "examples": ["embedding"]},
                            "index": {"type": "integer"},
                            "embedding": {
                                "description": "The vector (a base64 string with `encoding_format: base64`).",
                                "anyOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}],
                            },
                        },
                        "additionalProperties": True,
                    },
                },
                "usage": _OUTLINE,
            },
            "additionalProperties": True,
        },
        "ModelStatusList": {
            "type": "object",
            "required": ["models", "draining"],
            "properties": {
                "models": {"type": "array", "items": _ref("ModelStatus")},
                "draining": {"type": "boolean", "description": "True once the daemon is shutting down."},
            },
        },
    }
    return schemas


def _build() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llamaproc serve",
            "version": __version__,
            "description": (
                "The HTTP API of `llamaproc serve`: OpenAI-compatible routes proxied to the models' "
                "llama-server processes, and routes to list, load and unload the models, check health and "
                'scrape metrics. Errors use OpenAI\'s shape `{"error": {"message", "type", "param", '
                '"code"}}`.'
            ),
        },
        "tags": [
            {"name": "OpenAI", "description": "OpenAI-compatible routes."},
            {"name": "management", "description": "The daemon's own routes."},
            {"name": "workers", "description": "The rpc workers of sharded models, and recent requests."},
            {"name": "dashboard", "description": "The live event feed, and the page that shows it."},
        ],
        "paths": {
            "/v1/models": {
                "get": {
                    "summary": "The configured models",
                    "operationId": "listModels",
                    "tags": ["OpenAI"],
                    "responses": {
                        "200": {"description": "Every configured model.", "content": _json(_ref("ModelList"))}
                    },
                }
            },
            "/v1/models/{name}": {
                "get": {
                    "summary": "One configured model",
                    "operationId": "getModel",
                    "tags": ["OpenAI"],
                    "parameters": [_NAME],
                    "responses": {
                        "200": {"description": "The model.", "content": _json(_ref("Model"))},
                        "404": _error("No model of that name is configured (`code`: `model_not_found`)."),
                    },
                }
            },
            "/v1/chat/completions": _proxied(
                "Chat completion",
                "createChatCompletion",
                "ChatCompletionRequest",
                "ChatCompletion",
                "llama-server applies the model's chat template.",
            ),
            "/v1/completions": _proxied(
                "Text completion", "createCompletion", "CompletionRequest", "Completion", "The prompt is used as given."
            ),
            "/v1/embeddings": _proxied(
                "Embeddings",
                "createEmbedding",
                "EmbeddingRequest",
                "Embeddings",
                "The model must be configured with `embeddings = true` (else 501).",
            ),
            "/api/models": {
                "get": {
                    "summary": "The state of every configured model",
                    "operationId": "listModelStatus",
                    "tags": ["management"],
                    "responses": {
                        "200": {
                            "description": "Each model's phase, conditions, process and load.",
                            "content": _json(_ref("ModelStatusList")),
                        }
                    },
                }
            },
            "/api/models/{name}/load": _model_route(
                "Load a model",
                "load",
                "Load the model now (evicting idle ones if need be) and wait until it serves; a `Failed` "
                "model is tried again.",
            ),
            "/api/models/{name}/unload": _model_route(
                "Unload a model",
                "unload",
                "Stop the model's llama-server once its requests in flight are done.",
            ),
            **_worker_paths(),
            **_dashboard_paths(),
            "/health": {
                "get": {
                    "summary": "Whether the daemon serves",
                    "operationId": "health",
                    "tags": ["management"],
                    "responses": {
                        "200": {
                            "description": "The daemon serves.",
                            "content": _json(
                                {
                                    "type": "object",
                                    "required": ["status", "time"],
                                    "properties": {
                                        "status": {"const": "ok"},
                                        "time": {"type": "string", "format": "date-time"},
                                    },
                                }
                            ),
                        },
                        "503": {
                            "description": "The daemon is shutting down.",
                            "content": _json(
                                {
                                    "type": "object",
                                    "required": ["status"],
                                    "properties": {"status": {"const": "shutting_down"}},
                                }
                            ),
                        },
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "operationId": "metrics",
                    "tags": ["management"],
                    "responses": {
                        "200": {
                            "description": "Requests, tokens, latency and time-to-first-token histograms, queue "
                            "depth, loads, evictions, restarts and each model's phase, in Prometheus' text format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "operationId": "openapi",
                    "tags": ["management"],
                    "responses": {
                        "200": {"description": "The OpenAPI 3.1 document of this API.", "content": _json(_OUTLINE)}
                    },
                }
            },
        },
        "components": {"schemas": _schemas()},
    }


#: The routes that need no key (the gate checks Host and Origin there too).
_PUBLIC = ("/health", "/ui", "/ui/dashboard.js")
#: What the HTTP front end's gate may answer on any route, before the route sees the request.
_GATE = {
    "401": _error("An API key is configured and the request has none, or not one of them (`invalid_api_key`)."),
    "403": _error("A cross-origin browser request from an origin not in `allowed_origins` (`origin_not_allowed`)."),
    "408": _error("The request's body did not arrive within `body_timeout` (`request_timeout`)."),
    "421": _error("The `Host` is not one this daemon answers to (`invalid_host`; see `allowed_hosts`)."),
    "503": _error("Too many connections are open (`too_many_connections`), or see the route.", retry_after=False),
}


def _with_gate(document: dict[str, Any]) -> dict[str, Any]:
    """Every operation also documents the gate's refusals (``/health`` and the dashboard's page need no
    key, but Host and Origin are checked there too)."""
    for path, item in document["paths"].items():
        for operation in item.values():
            for status, response in _GATE.items():
                if status == "401" and path in _PUBLIC:
                    continue
                operation["responses"].setdefault(status, response)
    return document


@functools.cache
def openapi_bytes() -> bytes:
    """The document, encoded (built on the first call)."""
    return json.dumps(_with_gate(_build()), separators=(",", ":")).encode()


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the daemon's HTTP API (a fresh copy the caller may change)."""
    document: dict[str, Any] = json.loads(openapi_bytes())
    return document
