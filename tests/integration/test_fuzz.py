"""Fuzzing ``llamaproc serve``: its HTTP API from its own OpenAPI document, and its socket protocol.

One daemon (a real subprocess, real llama-server children on the tiny
generated models) serves every test of this module. The HTTP routes are
fuzzed with schemathesis from the document the daemon serves at
``/openapi.json``: valid and invalid requests, each answer checked against the
document (status code, content type, body schema) and against what the daemon
promises (no 500; a 5xx only when a model is unavailable or llama-server failed,
in OpenAI's error shape; a streamed answer ends with ``[DONE]`` or an error
event). The socket protocol is fuzzed with hypothesis: random bytes, JSON
values and request objects, long lines, lines split across writes; every line
must get exactly one final answer, each answer must be one well-formed line,
and the connection must keep working. Afterwards the daemon must be alive,
healthy and still serving, with no traceback in its log.

Runs are bounded and reproducible: a fixed number of examples per test,
derandomized, no example database and no shrinking (each example is a real
request; a failure is reported with the request that caused it).
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import schemathesis
from daemon_helpers import Daemon, llama_servers_of, running_worker, start_daemon, stop_daemon, write_config
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from llamaproc.protocol import ERROR_CODES
from llamaproc.serve import MAX_LINE

pytestmark = pytest.mark.integration

#: Models of the fuzzed daemon; "broken" is not a GGUF file, so it never loads (503).
MODELS = ("tiny", "emb", "broken")
#: Seconds one HTTP request or one socket exchange may take before it counts as a hang.
TIMEOUT = 30.0
#: Each example is a real request to a live daemon: hypothesis finds that slow, and schemathesis'
#: strategies filter; neither says anything about the daemon.
LIVE = settings(
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
#: Examples per HTTP operation: more for the routes that reach llama-server.
HTTP_EXAMPLES = {"POST /v1/chat/completions": 300, "POST /v1/completions": 300, "POST /v1/embeddings": 200}
HTTP_EXAMPLES_DEFAULT = 50
SOCKET_EXAMPLES = 300
RAW_EXAMPLES = 150
_FRONT_END_ERROR = re.compile(r" (ERROR|CRITICAL) (llamaproc\.serve|uvicorn[.\w]*):")

# The operations fuzzed: those of the daemon's document (compared with this list) but the document itself.
OPERATIONS = [
    "GET /v1/models",
    "GET /v1/models/{name}",
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "GET /api/models",
    "POST /api/models/{name}/load",
    "POST /api/models/{name}/unload",
    "GET /api/workers",
    "POST /api/workers/register",
    "POST /api/workers/heartbeat",
    "DELETE /api/workers/{id}",
    "GET /api/jobs",
    "GET /api/leases",
    "GET /api/events",
    "GET /ui",
    "GET /ui/dashboard.js",
    "POST /ui/login",
    "POST /ui/logout",
    "GET /health",
    "GET /metrics",
]


@pytest.fixture(autouse=True)
def no_leftover_servers() -> Iterator[None]:
    """Overrides conftest's per-test check: the module's daemon keeps its children between tests.

    The daemon fixture checks instead that no llama-server survives the daemon.
    """
    yield


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_embedding_model: Path, backend: Any
) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("fuzz")
    broken = tmp / "broken.gguf"
    broken.write_bytes(b"not a GGUF file\n" * 64)
    # --n-predict bounds what a request that names no max_tokens generates.
    small = {"ctx_size": 512, "args": ["--n-predict", "8"]}
    config = write_config(
        tmp / "serve.toml",
        {
            "tiny": {"path": tiny_model, "parallel": 2, **small},
            "emb": {"path": tiny_embedding_model, "embeddings": True, **small},
            "broken": {"path": broken},
        },
        max_loaded_models=3,
    )
    started = start_daemon(config, tmp / "state")
    try:
        yield started
    finally:
        servers = llama_servers_of(started.pid)
        assert stop_daemon(started) == 0, started.stderr()
        deadline = time.monotonic() + 5
        while (alive := [pid for pid in servers if _alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in alive:
            psutil.Process(pid).kill()
        assert not alive, f"llama-server left running: {alive}"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> schemathesis.BaseSchema:
    """The daemon's API, from the document it serves."""
    return schemathesis.openapi.from_url(daemon.http + "/openapi.json", timeout=TIMEOUT)


def _assert_log_clean(daemon: Daemon) -> None:
    """No traceback, no error of the front ends in the daemon's log (a model that fails is logged as an
    error of its supervisor: that is what "broken" is for)."""
    log = daemon.stderr()
    bad = [line for line in log.splitlines() if "Traceback" in line or _FRONT_END_ERROR.search(line)]
    assert not bad, log[-5000:]


def _assert_serving(daemon: Daemon) -> None:
    assert daemon.returncode is None, daemon.stderr()
    assert psutil.pid_exists(daemon.pid)
    health = httpx.get(daemon.http + "/health", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    reply = httpx.post(daemon.http + "/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "tiny" and reply.json()["choices"][0]["message"]["content"]


# --- HTTP --------------------------------------------------------------------------------------


def _assert_error_body(content: bytes) -> None:
    error = json.loads(content)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)


def _assert_event_stream(content: bytes) -> None:
    """Server-sent events, each ``data: <JSON>``, ending with ``[DONE]`` or with an error event.

    (llama-server's own events pass as they are: it sends ``data: null`` for some requests.)
    """
    events = [e for e in content.decode().split("\n\n") if e.strip()]
    assert events, content
    for event in events[:-1]:
        assert event.startswith("data: ") and "[DONE]" not in event, event
        data = json.loads(event[len("data: ") :])
        assert not (isinstance(data, dict) and "error" in data), event
    last = events[-1]
    assert last.startswith("data: "), last
    if last != "data: [DONE]":
        _assert_error_body(last[len("data: ") :].encode())


def test_the_served_document_lists_every_route(daemon: Daemon) -> None:
    document = httpx.get(daemon.http + "/openapi.json", timeout=TIMEOUT).json()
    labels = [f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item]
    assert labels == [*OPERATIONS, "GET /openapi.json"]


@pytest.fixture(scope="module")
def rpc_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a running rpc worker: the daemon probes a registering worker."""
    with running_worker(tmp_path_factory.mktemp("rpc")) as worker:
        yield worker.address


def _with_worker(daemon: Daemon, case: schemathesis.Case, address: str) -> None:
    """Make ``case`` name the running worker's address, or the id of a registered (and not evicted) worker.

    Only a value that the document allows is replaced: an invalid one is what a negative case tests.
    """
    given = case.body.get("address") if isinstance(case.body, dict) else None
    if isinstance(given, str) and len(given) <= 300 and re.fullmatch(r"(\[[^\[\]]+\]|[^:\[\]]+):[0-9]{1,5}", given):
        case.body["address"] = address
    given = case.body.get("id") if isinstance(case.body, dict) else None
    wants_id = isinstance(given, str) and len(given) <= 100
    if wants_id or (case.path_parameters and "id" in case.path_parameters):
        answer = httpx.post(daemon.http + "/api/workers/register", json={"address": address}, timeout=TIMEOUT)
        worker_id = answer.json()["id"]
        if wants_id:
            case.body["id"] = worker_id
        else:
            case.path_parameters["id"] = worker_id


#: Documented but not fuzzed: the event feed answers a stream that never ends (tests/integration/test_daemon_events.py).
NOT_FUZZED = ("GET /api/events",)


@pytest.mark.parametrize("label", [label for label in OPERATIONS if label not in NOT_FUZZED])
def test_fuzz_http(daemon: Daemon, api: schemathesis.BaseSchema, label: str, rpc_worker: str) -> None:
    method, path = label.split(" ")
    operation = api[path][method]
    modes = [GenerationMode.POSITIVE]
    if "{" in path or method == "POST":  # something to make invalid: a body or a path parameter
        modes.append(GenerationMode.NEGATIVE)
    cases = st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in modes))
    statuses: Counter[int] = Counter()

    # Random model names are mostly unknown (404): most requests name a configured model instead; likewise
    # random worker addresses are mostly invalid and random worker ids unknown.
    @settings(LIVE, max_examples=HTTP_EXAMPLES.get(label, HTTP_EXAMPLES_DEFAULT))
    @given(case=cases, name=st.sampled_from([*MODELS, None]))
    def fuzz(case: schemathesis.Case, name: str | None) -> None:
        if name is not None:
            if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                case.body["model"] = name
            if case.path_parameters and "name" in case.path_parameters:
                case.path_parameters["name"] = name
            if path.startswith("/api/workers/"):
                _with_worker(daemon, case, rpc_worker)
        # The whole body, streamed or not; a redirect (the login's 303) is an answer of its own.
        response = case.call(base_url=daemon.http, timeout=TIMEOUT, allow_redirects=False)
        statuses[response.status_code] += 1
        case.validate_response(
            response,
            checks=[
                status_code_conformance,
                content_type_conformance,
                response_headers_conformance,
                response_schema_conformance,
                negative_data_rejection,
            ],
        )
        status = response.status_code
        try:
            assert status < 500 or status in (501, 502, 503), response.text
            if status >= 400:
                _assert_error_body(response.content)
            elif response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
                _assert_event_stream(response.content)
        except AssertionError as exc:
            exc.add_note(f"request: {case.as_curl_command()}")
            raise

    fuzz()
    assert any(200 <= status < 400 for status in statuses), statuses  # the fuzzing reached the models
    assert daemon.returncode is None, daemon.stderr()
    _assert_log_clean(daemon)


# --- the socket --------------------------------------------------------------------------------

_OPS = ("chat", "generate", "embed", "models", "status", "ping", "cancel")
_FINAL = ("done", "result", "error")
# The error codes the socket may send (the protocol's table), less internal_error: that one is a daemon bug.
_CODES = {code for code, entry in ERROR_CODES.items() if entry.front_end != "http"} - {"internal_error"}
_MARK = "end-of-batch"

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
# A few ids again and again: duplicates, cancels of requests in flight.
_ids = st.sampled_from([1, 2, "a", "b"]) | _json_values
_small_ids = st.sampled_from([1, 2, "a", "b"])
_names = st.sampled_from(["tiny", "tiny", "emb", "broken", "nosuch"])
_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "other"]), "content": st.text(max_size=12)}
    ),
    max_size=2,
)
_fields = {
    "op": st.sampled_from(_OPS) | _json_values,
    "id": _ids,
    "model": st.sampled_from([*MODELS, "nosuch", ""]) | _json_values,
    "prompt": st.text(max_size=12) | st.lists(st.integers(-3, 600), max_size=4) | _json_values,
    "messages": _messages | _json_values,
    "input": st.text(max_size=12) | st.lists(st.text(max_size=8), max_size=3) | _json_values,
    "max_tokens": st.integers(-2, 6) | _json_values,
    "target": _ids,
    "temperature": st.floats() | _json_values,
    "stop": st.text(max_size=3) | _json_values,
    "stream": _json_values,
}
# Any of the protocol's fields, each with a plausible or any value, and other keys.
_anything = st.fixed_dictionaries({}, optional=_fields).flatmap(
    lambda request: st.dictionaries(st.text(max_size=6), _json_values, max_size=2).map(lambda x: x | request)
)
# Well-formed requests of each op...
_well_formed = st.one_of(
    st.fixed_dictionaries(
        {"op": st.just("generate"), "id": _small_ids, "model": _names, "prompt": st.text(max_size=12)},
        optional={"max_tokens": st.integers(0, 6)},
    ),
    st.fixed_dictionaries(
        {"op": st.just("chat"), "id": _small_ids, "model": _names, "messages": _messages},
        optional={"max_tokens": st.integers(0, 6)},
    ),
    st.fixed_dictionaries(
        {"op": st.just("embed"), "id": _small_ids, "model": _names, "input": st.text(max_size=12)},
    ),
    st.fixed_dictionaries({"op": st.sampled_from(["models", "status", "ping"]), "id": _small_ids}),
    st.fixed_dictionaries({"op": st.just("cancel"), "id": _small_ids}),
    st.fixed_dictionaries({"op": st.just("cancel"), "target": _small_ids}, optional={"id": _small_ids}),
)
# ... some with one field changed or added.
_requests = _anything | st.tuples(
    _well_formed,
    st.just({}) | st.dictionaries(st.sampled_from(list(_fields)), _json_values, max_size=1),
).map(lambda t: t[0] | t[1])


@dataclass(frozen=True)
class Big:
    """A line too long to print in a report: each piece repeated so many times."""

    pieces: tuple[tuple[bytes, int], ...]

    def __bytes__(self) -> bytes:
        return b"".join(piece * count for piece, count in self.pieces)


def _padded_ping(length: int) -> Big:
    """A ping line of exactly ``length`` bytes."""
    head, tail = b'{"op": "ping", "id": "long", "pad": "', b'"}'
    return Big(((head, 1), (b"x", length - len(head) - len(tail)), (tail, 1)))


_lines = st.one_of(
    _requests.map(lambda r: json.dumps(r).encode()),
    _requests.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.tuples(_requests, st.integers(0, 60)).map(lambda t: json.dumps(t[0]).encode()[: t[1]]),  # cut short
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from([b"", b"  ", b"\t\r", b"\x0b\x0c"]),
    # Nested JSON, well inside or well beyond what the parser takes (its limit depends on the stack).
    st.sampled_from([1, 2, 50, 300, 5_000, 100_000]).map(lambda depth: Big(((b"[", depth),))),
    st.sampled_from([1, 50, 300, 5_000, 50_000]).map(lambda depth: Big(((b'{"a":', depth), (b"1", 1), (b"}", depth)))),
    st.integers(MAX_LINE - 2, MAX_LINE + 2).map(_padded_ping),
)
# A long generation and a cancel of it (by its id, or as a target).
_cancelled = st.tuples(_small_ids, st.booleans()).map(
    lambda t: [
        json.dumps({"op": "generate", "id": t[0], "model": "tiny", "prompt": "x", "max_tokens": 200}).encode(),
        json.dumps({"op": "cancel", "target": t[0], "id": "c"} if t[1] else {"op": "cancel", "id": t[0]}).encode(),
    ]
)
_batches = st.lists(_lines.map(lambda line: [line]) | _cancelled, min_size=1, max_size=5).map(
    lambda groups: [line for group in groups for line in group]
)


def _expected(lines: list[bytes]) -> tuple[Counter[Any], Counter[Any]]:
    """How many final answers each id should get: (at most, of which may be missing).

    A line that is not a JSON object with a valid id is answered with ``"id": null``. A cancel of
    an id in flight (``{"op": "cancel", "id": X}``) has no answer of its own: X's ends it.
    """
    most: Counter[Any] = Counter()
    missing: Counter[Any] = Counter()
    for line in lines:
        if not line.strip():
            continue
        key = None
        if len(line) <= MAX_LINE:
            try:
                request = json.loads(line.strip())
            except (ValueError, RecursionError):
                request = None
            if isinstance(request, dict):
                rid = request.get("id")
                if isinstance(rid, (str, int)) and not isinstance(rid, bool):
                    key = rid
                    if request.get("op") == "cancel" and "target" not in request:
                        missing[key] += 1
        most[key] += 1
    return most, missing


def _check_answer(raw: bytes) -> dict[str, Any]:
    assert raw.endswith(b"\n"), raw[-200:]
    answer = json.loads(raw)
    assert isinstance(answer, dict) and "id" in answer, raw[:500]
    kind = answer.get("event")
    if kind == "token":
        assert isinstance(answer["text"], str)
    elif kind == "done":
        assert {"finish_reason", "usage", "timings"} <= set(answer), answer
    elif kind == "error":
        assert answer["code"] in _CODES, answer
        assert isinstance(answer["message"], str) and answer["message"], answer
    else:
        assert kind == "result", answer
    return answer


def _exchange(path: str, data: bytes, cuts: list[int]) -> list[dict[str, Any]]:
    """Send ``data`` in pieces cut at ``cuts``, half-close, and read every answer up to the daemon's close."""
    points = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        for start, end in zip(points, points[1:], strict=False):
            sock.sendall(data[start:end])
        sock.shutdown(socket.SHUT_WR)  # half-closed: the daemon answers everything, then closes
        with sock.makefile("rb") as reader:
            return [_check_answer(raw) for raw in reader]


def _check_batch(path: str, lines: list[bytes], cuts: list[int]) -> Counter[str]:
    """Send ``lines`` and a ping; check the answers; count their kinds (events and error codes)."""
    data = b"".join(line + b"\n" for line in lines) + json.dumps({"op": "ping", "id": _MARK}).encode() + b"\n"
    answers = _exchange(path, data, cuts)
    # The connection kept working: the last line is answered (events of requests in flight may follow).
    assert answers.count({"id": _MARK, "event": "result", "pong": True}) == 1, answers[-5:]
    most, missing = _expected(lines)
    # A duplicate id is refused with "id": null and the id as "target" (the id itself would read as the end
    # of the running request): it counts for that id.
    got = Counter(
        a["target"] if a.get("code") == "duplicate_id" else a["id"]
        for a in answers
        if a["event"] in _FINAL and a["id"] != _MARK
    )
    for key in most.keys() | got.keys():
        assert most[key] - missing[key] <= got[key] <= most[key], (key, most, missing, got, answers[-20:])
    return Counter(a.get("code", a["event"]) for a in answers)


def test_fuzz_socket(daemon: Daemon) -> None:
    assert daemon.socket is not None
    path = daemon.socket
    seen: Counter[str] = Counter()

    @settings(LIVE, max_examples=SOCKET_EXAMPLES)
    @given(lines=_batches, cuts=st.lists(st.integers(0, 1 << 21), max_size=4))
    def fuzz(lines: list[bytes | Big], cuts: list[int]) -> None:
        try:
            seen.update(_check_batch(path, [bytes(line) for line in lines], cuts))
        except (AssertionError, OSError) as exc:  # the report shows the lines (hypothesis' may not)
            exc.add_note(f"lines: {lines!r}, cut at {cuts}")
            raise

    fuzz()
    # The fuzzing reached the models, and the protocol's checks.
    assert {"token", "done", "result", "cancelled", "invalid_json", "bad_request"} <= seen.keys(), seen
    assert daemon.returncode is None, daemon.stderr()
    _assert_log_clean(daemon)


# --- raw HTTP bodies ------------------------------------------------------------------------------

# What schemathesis does not send: bodies that are not JSON, cut short, nested deep, or not UTF-8.
_valid = st.fixed_dictionaries(  # a valid body for every route; its model mostly unknown (404)
    {"model": st.text(max_size=4), "messages": st.just([]), "prompt": st.just("x"), "input": st.just("x")},
    optional={"stream": st.booleans(), "max_tokens": st.integers(0, 4)},
)
_bodies = st.one_of(
    st.binary(max_size=60),
    _json_values.map(lambda v: json.dumps(v).encode()),
    _valid.map(lambda r: json.dumps(r).encode()),
    st.tuples(_valid | _requests, st.integers(0, 80)).map(lambda t: json.dumps(t[0]).encode()[: t[1]]),
    _valid.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.tuples(_valid, st.sampled_from(["utf-16", "utf-32", "utf-8-sig", "latin-1"])).map(
        lambda t: json.dumps(t[0], ensure_ascii=False).encode(t[1], "replace")
    ),
    st.sampled_from([1, 300, 5_000, 100_000]).map(lambda depth: Big(((b"[", depth),))),
)


def test_fuzz_raw_http_bodies(daemon: Daemon) -> None:
    statuses: Counter[int] = Counter()
    with httpx.Client(base_url=daemon.http, timeout=TIMEOUT) as client:

        @settings(LIVE, max_examples=RAW_EXAMPLES)
        @given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]), body=_bodies)
        def fuzz(path: str, body: bytes | Big) -> None:
            answer = client.post(path, content=bytes(body), headers={"content-type": "application/json"})
            statuses[answer.status_code] += 1
            try:
                assert answer.status_code < 500 or answer.status_code in (501, 502, 503), answer.text
                if answer.status_code >= 400:
                    _assert_error_body(answer.content)
            except AssertionError as exc:
                exc.add_note(f"POST {path} {body!r}")
                raise

        fuzz()
    assert statuses[400] and statuses[404], statuses  # refused by the daemon; and parsed, for an unknown model
    _assert_log_clean(daemon)


# --- regressions found by fuzzing --------------------------------------------------------------


def test_deeply_nested_json_is_a_bad_request(daemon: Daemon) -> None:
    deep = b'{"model": "tiny", "prompt": "x", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    answer = httpx.post(daemon.http + "/v1/completions", content=deep, timeout=TIMEOUT)
    assert answer.status_code == 400
    _assert_error_body(answer.content)
    assert answer.json()["error"]["code"] == "invalid_json"

    assert daemon.socket is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(daemon.socket)
        sock.sendall(b"[" * 100_000 + b"\n" + b'{"op": "ping", "id": 1}\n')
        with sock.makefile("rb") as reader:
            error = json.loads(reader.readline())
            assert (error["id"], error["event"], error["code"]) == (None, "error", "invalid_json")
            assert json.loads(reader.readline()) == {"id": 1, "event": "result", "pong": True}
    _assert_log_clean(daemon)


def test_a_body_that_is_not_utf8_is_a_bad_request(daemon: Daemon) -> None:
    # Python's JSON parser takes UTF-16 and UTF-32 too, llama-server does not: the daemon refuses them
    # rather than forwarding what llama-server cannot read.
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    for raw in (
        json.dumps(body).encode("utf-16"),
        json.dumps(body).encode("utf-32"),
        b'{"model": "tiny", "prompt": "\xed\xa0\x80", "max_tokens": 2}',  # a surrogate, encoded
    ):
        answer = httpx.post(daemon.http + "/v1/completions", content=raw, timeout=TIMEOUT)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "invalid_json"
    answer = httpx.post(
        daemon.http + "/v1/completions", content=b"\xef\xbb\xbf" + json.dumps(body).encode(), timeout=TIMEOUT
    )
    assert answer.status_code == 200, answer.text  # UTF-8 with a byte order mark is still UTF-8


def test_embeddings_asked_to_stream_are_answered_whole(daemon: Daemon) -> None:
    # llama-server does not stream embeddings: its JSON answer is relayed as such, not as an event stream.
    body = {"model": "emb", "input": "hello", "stream": True}
    answer = httpx.post(daemon.http + "/v1/embeddings", json=body, timeout=TIMEOUT)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/json")
    data = answer.json()
    assert data["model"] == "emb" and len(data["data"][0]["embedding"]) > 0


def test_llama_server_errors_in_openai_shape(daemon: Daemon) -> None:
    # llama-server answers 500 to an empty input: a failure upstream, 502 from the daemon.
    answer = httpx.post(daemon.http + "/v1/embeddings", json={"model": "emb", "input": []}, timeout=TIMEOUT)
    assert answer.status_code == 502
    _assert_error_body(answer.content)
    error = answer.json()["error"]
    assert error["code"] == "upstream_error" and error["type"] == "server_error"
    assert error["message"].startswith("model 'emb': llama-server answered 500: "), error

    # Its refusals keep their status and message, in the daemon's shape and vocabulary.
    body = {"model": "tiny", "messages": [{"role": "user"}]}
    answer = httpx.post(daemon.http + "/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert answer.status_code == 400
    assert answer.headers["content-type"].startswith("application/json")
    _assert_error_body(answer.content)
    assert answer.json()["error"] == {
        "message": "model 'tiny': llama-server answered 400: All non-assistant messages must contain 'content'",
        "type": "invalid_request_error",
        "param": None,
        "code": "bad_request",
    }
    # What the daemon checks itself never reaches llama-server: the field is named.
    answer = httpx.post(daemon.http + "/v1/chat/completions", json={"model": "tiny", "messages": [5]})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "messages"


def test_the_daemon_serves_after_the_fuzzing(daemon: Daemon) -> None:
    """Last in the module (pytest runs its tests in order): the daemon lived through all of the above."""
    _assert_serving(daemon)
    _assert_log_clean(daemon)
    assert daemon.socket is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(daemon.socket)
        sock.sendall(b'{"op": "ping"}\n{"id": 1, "op": "generate", "model": "tiny", "prompt": "x", "max_tokens": 2}\n')
        with sock.makefile("rb") as reader:
            assert json.loads(reader.readline()) == {"id": None, "event": "result", "pong": True}
            while (event := json.loads(reader.readline()))["event"] == "token":
                pass
            assert event["event"] == "done", event
