"""``llamaproc serve``'s HTTP front end tried as an attacker would: keys, Host, Origin, slow clients.

The daemon runs as a real subprocess with real llama-server children. The
slow-client tests use short deadlines (0.5 s) and wait for the server to
close the socket; they never assert on elapsed time.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import openai
import psutil
import pytest
from daemon_helpers import Daemon, llama_servers_of, running_daemon, start_daemon, stop_daemon, write_config

pytestmark = pytest.mark.integration

CONFIG_KEYS = ["config-key-0123456789", "config-key-abcdefghij"]
ENV_KEY = "env-key-9876543210"
ALL_KEYS = [*CONFIG_KEYS, ENV_KEY]
APP_ORIGIN = "http://app.example"
DEADLINE = 0.5  # header_timeout and body_timeout of the guarded daemon


@pytest.fixture(autouse=True)
def no_leftover_servers() -> Iterator[None]:
    """Overrides conftest's per-test check: the daemons shared by this module's tests keep their children.

    Each daemon fixture checks instead that no llama-server survives its daemon.
    """
    yield


def _stop_and_check(daemon: Daemon) -> None:
    servers = llama_servers_of(daemon.pid)
    assert stop_daemon(daemon) == 0, daemon.stderr()
    for pid in servers:
        try:
            psutil.Process(pid).wait(10)
        except psutil.NoSuchProcess:
            pass


def _wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _wait_loaded(daemon: Daemon, **headers: str) -> None:
    def serving() -> bool:
        models = httpx.get(daemon.http + "/api/models", headers=headers, timeout=10).json()["models"]
        return any(m["name"] == "tiny" and m["phase"] == "Serving" for m in models)

    _wait_for(serving, "the preloaded model")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, backend: Any) -> Iterator[Daemon]:
    """Keys (two in the config, one in the environment), an allowed host and origin, short deadlines."""
    tmp = tmp_path_factory.mktemp("guarded")
    config = write_config(
        tmp / "serve.toml",
        {"tiny": {"path": tiny_model}},
        preload=["tiny"],
        api_keys=CONFIG_KEYS,
        allowed_hosts=["llm.example"],
        allowed_origins=[APP_ORIGIN],
        header_timeout=DEADLINE,
        body_timeout=DEADLINE,
    )
    daemon = start_daemon(config, tmp / "state", env={"LLAMAPROC_API_KEYS": f"{ENV_KEY}, "})
    try:
        _wait_loaded(daemon, Authorization=f"Bearer {ENV_KEY}")
        yield daemon
    finally:
        _stop_and_check(daemon)


@pytest.fixture(scope="module")
def open_daemon(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, backend: Any) -> Iterator[Daemon]:
    """The default settings: loopback, no keys, no allowed origins."""
    tmp = tmp_path_factory.mktemp("open")
    config = write_config(tmp / "serve.toml", {"tiny": {"path": tiny_model}}, preload=["tiny"])
    daemon = start_daemon(config, tmp / "state")
    try:
        _wait_loaded(daemon)
        yield daemon
    finally:
        _stop_and_check(daemon)


def _auth(key: str = CONFIG_KEYS[0]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _port(daemon: Daemon) -> int:
    return int(daemon.http.rsplit(":", 1)[1])


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["param"] is None
    error: dict[str, Any] = body["error"]
    return error


def _loaded(daemon: Daemon, name: str = "tiny") -> bool:
    models = httpx.get(daemon.http + "/api/models", headers=_auth(), timeout=10).json()["models"]
    return any(m["name"] == name and m["loaded"] for m in models)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


# --- authentication ----------------------------------------------------------------------------


def test_health_needs_no_key(guarded: Daemon) -> None:
    response = httpx.get(guarded.http + "/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/tiny"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("GET", "/api/models"),
        ("POST", "/api/models/tiny/unload"),
        ("POST", "/api/models/tiny/load"),
        ("GET", "/metrics"),
        ("POST", "/health"),
        ("GET", "/nowhere"),
    ],
)
def test_every_other_route_needs_a_key(guarded: Daemon, method: str, path: str) -> None:
    url = guarded.http + path
    for headers in ({}, _auth("wrong-key"), {"Authorization": f"Basic {CONFIG_KEYS[0]}"}, _auth(CONFIG_KEYS[0] + "x")):
        response = httpx.request(method, url, json=CHAT, headers=headers, timeout=30)
        error = _error(response, 401, "invalid_api_key")
        assert error["type"] == "invalid_request_error"
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert _loaded(guarded)  # the refused unload did nothing


def test_every_configured_key_is_accepted(guarded: Daemon) -> None:
    for key in ALL_KEYS:
        response = httpx.get(guarded.http + "/v1/models", headers=_auth(key))
        assert response.status_code == 200, key
        assert [m["id"] for m in response.json()["data"]] == ["tiny"]
        lowercase = httpx.get(guarded.http + "/v1/models", headers={"Authorization": f"bearer {key}"})
        assert lowercase.status_code == 200
    response = httpx.post(guarded.http + "/v1/chat/completions", json=CHAT, headers=_auth(ENV_KEY), timeout=60)
    assert response.status_code == 200 and response.json()["model"] == "tiny"


def test_the_openai_client_authenticates_with_its_api_key(guarded: Daemon) -> None:
    messages: Any = [{"role": "user", "content": "Say hello"}]
    client = openai.OpenAI(base_url=guarded.http + "/v1", api_key=CONFIG_KEYS[1], max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert reply.model == "tiny" and reply.choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [m.id for m in client.models.list()] == ["tiny"]

    intruder = openai.OpenAI(base_url=guarded.http + "/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        intruder.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"


def test_no_key_is_ever_logged(guarded: Daemon) -> None:
    for key in [*ALL_KEYS, "wrong-key-ABCDEF"]:
        httpx.get(guarded.http + "/v1/models", headers=_auth(key))
    log = guarded.stderr()
    assert "listening on" in log
    assert "not a loopback address" not in log  # no warning on loopback
    for key in [*ALL_KEYS, "wrong-key-ABCDEF"]:
        assert key not in log


def test_no_keys_no_authentication(open_daemon: Daemon) -> None:
    assert httpx.get(open_daemon.http + "/v1/models").status_code == 200
    assert httpx.post(open_daemon.http + "/v1/chat/completions", json=CHAT, timeout=60).status_code == 200


def test_a_bad_key_in_the_environment_stops_start_up(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path / "serve.toml", {"tiny": {"path": tiny_model}})
    run = subprocess.run(
        [sys.executable, "-m", "llamaproc", "serve", "--config", str(config), "--state-dir", str(tmp_path / "s")],
        env={**os.environ, "LLAMAPROC_API_KEYS": "good-key,secret with spaces"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert "LLAMAPROC_API_KEYS: key 2: invalid API key" in run.stderr
    assert "secret" not in run.stderr


# --- Host: DNS rebinding -----------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("GET", "/health"), ("POST", "/v1/chat/completions")])
def test_a_foreign_host_is_refused(guarded: Daemon, method: str, path: str) -> None:
    port = _port(guarded)
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "llm.example.evil"):
        response = httpx.request(method, guarded.http + path, json=CHAT, headers={**_auth(), "Host": host}, timeout=30)
        _error(response, 421, "invalid_host")


def test_loopback_and_allowed_hosts_are_served(guarded: Daemon) -> None:
    port = _port(guarded)
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", "127.1.2.3", f"[::1]:{port}", "LLM.example"):
        response = httpx.get(guarded.http + "/v1/models", headers={**_auth(), "Host": host})
        assert response.status_code == 200, host


def test_the_default_daemon_refuses_a_foreign_host(open_daemon: Daemon) -> None:
    response = httpx.post(
        open_daemon.http + "/api/models/tiny/unload", headers={"Host": f"rebound.example:{_port(open_daemon)}"}
    )
    _error(response, 421, "invalid_host")
    assert _loaded(open_daemon)


def test_a_daemon_on_another_address_accepts_any_host_and_warns_without_keys(
    tmp_path: Path, tiny_model: Path, backend: Any
) -> None:
    config = write_config(tmp_path / "serve.toml", {"tiny": {"path": tiny_model}})
    with running_daemon(config, tmp_path / "state", extra_args=["--host", "0.0.0.0"]) as daemon:
        port = _port(daemon)
        response = httpx.get(f"http://127.0.0.1:{port}/health", headers={"Host": f"10.1.2.3:{port}"})
        assert response.status_code == 200
        response = httpx.get(f"http://127.0.0.1:{port}/health", headers={"Host": "pod.cluster.example"})
        assert response.status_code == 200
        assert "not a loopback address, without any API key" in daemon.stderr()
        _stop_and_check(daemon)


# --- Origin: browsers --------------------------------------------------------------------------


def test_a_web_page_cannot_unload_a_model_with_a_text_plain_post(open_daemon: Daemon) -> None:
    """The request a page of another site can send without a CORS preflight."""
    assert _loaded(open_daemon)
    response = httpx.post(
        open_daemon.http + "/api/models/tiny/unload",
        content=b"x",
        headers={"Origin": "http://evil.example", "Content-Type": "text/plain"},
    )
    _error(response, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in response.headers
    assert _loaded(open_daemon)


def test_cross_origin_requests_are_refused_on_the_proxied_routes_too(guarded: Daemon) -> None:
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "https://app.example"},  # another scheme: another origin
        {"Sec-Fetch-Site": "cross-site"},
    ):
        response = httpx.post(
            guarded.http + "/v1/chat/completions", json=CHAT, headers={**_auth(), **headers}, timeout=30
        )
        _error(response, 403, "origin_not_allowed")


def test_same_origin_requests_are_served(guarded: Daemon) -> None:
    headers = {**_auth(), "Origin": guarded.http, "Sec-Fetch-Site": "same-origin"}
    response = httpx.post(guarded.http + "/v1/chat/completions", json=CHAT, headers=headers, timeout=60)
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_an_allowed_origin_gets_its_preflight_and_cors_headers(guarded: Daemon) -> None:
    preflight = httpx.options(
        guarded.http + "/v1/chat/completions",
        headers={
            "Origin": APP_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    allowed = {h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert preflight.headers["vary"] == "Origin"

    for path in ("/v1/chat/completions", "/api/models/tiny/load"):
        headers = {**_auth(), "Origin": APP_ORIGIN, "Sec-Fetch-Site": "cross-site"}
        response = httpx.post(guarded.http + path, json=CHAT, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        assert response.headers["access-control-allow-origin"] == APP_ORIGIN
        assert response.headers["vary"] == "Origin"
    # The page's request without a key: a 401 the page can read.
    response = httpx.get(guarded.http + "/v1/models", headers={"Origin": APP_ORIGIN})
    _error(response, 401, "invalid_api_key")
    assert response.headers["access-control-allow-origin"] == APP_ORIGIN

    refused = httpx.options(
        guarded.http + "/v1/chat/completions",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    _error(refused, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in refused.headers


# --- slow clients ------------------------------------------------------------------------------


async def _closed_by_server(stream: anyio.abc.SocketStream, *, send: bytes = b"", every: float = 0.05) -> bytes:
    """Send ``send`` a byte at a time (every ``every`` s) until the server closes the connection;
    return what was not sent yet (the server closed before it all arrived when this is not empty)."""
    left = send
    with anyio.fail_after(30):
        while True:
            if left:
                try:
                    await stream.send(left[:1])
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    return left
                left = left[1:]
            with anyio.move_on_after(every):
                try:
                    data = await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    return left
                raise AssertionError(f"the server answered instead of closing: {data!r}")


async def _read_until_closed(stream: anyio.abc.SocketStream) -> bytes:
    received = b""
    with anyio.fail_after(30):
        while True:
            try:
                received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return received


def _head(port: int, path: str = "/v1/models", *, method: str = "GET", extra: str = "") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {CONFIG_KEYS[0]}\r\n"
        f"{extra}X-Padding: {'p' * 200}\r\n\r\n"
    ).encode()


@pytest.mark.anyio
async def test_slowloris_connections_are_closed_while_a_normal_client_is_served(guarded: Daemon) -> None:
    port = _port(guarded)
    head = _head(port)  # a byte every 50 ms: far longer than the deadline
    left: dict[int, bytes] = {}
    normal: list[httpx.Response] = []

    async def slow(i: int) -> None:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            left[i] = await _closed_by_server(stream, send=head)

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(slow, i)
        async with httpx.AsyncClient(base_url=guarded.http, headers=_auth(), timeout=60) as client:
            normal.append(await client.post("/v1/chat/completions", json=CHAT))
            normal.append(await client.get("/v1/models"))
    assert [r.status_code for r in normal] == [200, 200]
    assert sorted(left) == [0, 1, 2, 3, 4]
    for i, rest in left.items():
        assert rest, f"slow client {i} sent its whole head before the server closed"


@pytest.mark.anyio
async def test_a_connection_that_sends_nothing_is_closed(guarded: Daemon) -> None:
    async with await anyio.connect_tcp("127.0.0.1", _port(guarded)) as stream:
        await _closed_by_server(stream)


@pytest.mark.anyio
async def test_the_next_head_on_a_kept_alive_connection_has_its_deadline_too(guarded: Daemon) -> None:
    port = _port(guarded)
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(_head(port))
        answer = b""
        with anyio.fail_after(30):
            while b'"data"' not in answer or not answer.endswith(b"}"):
                answer += await stream.receive()
        assert answer.startswith(b"HTTP/1.1 200 ")
        # Blank lines between requests begin no request: they do not keep the connection open either.
        assert await _closed_by_server(stream, send=b"\r\n\r\n\r\n" + _head(port))


@pytest.mark.anyio
async def test_a_kept_alive_connection_idle_past_the_head_deadline_is_still_served(guarded: Daemon) -> None:
    """The head deadline runs from a request's first byte, not from the previous answer (keep-alive
    idleness is uvicorn's timeout_keep_alive, 5 s)."""
    port = _port(guarded)
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        for _ in range(2):
            await stream.send(_head(port, "/health"))
            answer = b""
            with anyio.fail_after(30):
                while not answer.endswith(b"}"):
                    answer += await stream.receive()
            assert answer.startswith(b"HTTP/1.1 200 ")
            await anyio.sleep(DEADLINE * 2)


@pytest.mark.anyio
async def test_a_body_shorter_than_its_content_length_gets_408_and_is_closed(guarded: Daemon) -> None:
    port = _port(guarded)
    body = json.dumps(CHAT).encode()
    head = _head(port, "/v1/chat/completions", method="POST", extra=f"Content-Length: {len(body) + 1000}\r\n")
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(head + body)
        answer = await _read_until_closed(stream)
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 408 Request Timeout"
    error = json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/models/tiny/load"])
async def test_a_trickled_body_does_not_extend_its_deadline(guarded: Daemon, path: str) -> None:
    port = _port(guarded)
    body = json.dumps({**CHAT, "pad": "x" * 400}).encode()
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(_head(port, path, method="POST", extra=f"Content-Length: {len(body)}\r\n") + body[:10])
        answer = b""
        with anyio.fail_after(30):
            for i in range(10, len(body)):  # a byte every 50 ms: longer than the deadline
                try:
                    await stream.send(body[i : i + 1])
                except (anyio.BrokenResourceError, OSError):
                    break
                with anyio.move_on_after(0.05):
                    try:
                        answer += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        break
            else:
                raise AssertionError(f"the whole body was sent, a byte every 50 ms; answer: {answer!r}")
            answer += await _read_until_closed(stream)
    if path == "/v1/chat/completions":  # the proxy waits for the whole body
        assert answer.startswith(b"HTTP/1.1 408 ")
    else:  # a route that reads no body answers at once; the connection is closed at the deadline all the same
        assert answer.startswith(b"HTTP/1.1 200 ")


# --- the connection limit ----------------------------------------------------------------------


@pytest.fixture
def limited(tmp_path: Path, tiny_model: Path, backend: Any) -> Iterator[Daemon]:
    config = write_config(tmp_path / "serve.toml", {"tiny": {"path": tiny_model}}, max_connections=3)
    with running_daemon(config, tmp_path / "state") as daemon:
        yield daemon
        _stop_and_check(daemon)


def _get_health(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    answer = b""
    while not answer.endswith(b"}"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    return answer


def test_connections_beyond_the_limit_are_refused_at_once(limited: Daemon) -> None:
    port = _port(limited)
    held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
    try:
        for sock in held:  # each one served: the server has made all three
            assert _get_health(sock).startswith(b"HTTP/1.1 200 ")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as extra:
            answer = b""
            while chunk := extra.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert b"retry-after: 1" in answer.lower()
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_connections"
        for sock in held:  # the held ones still work
            assert _get_health(sock).startswith(b"HTTP/1.1 200 ")
        held.pop().close()
        # Once the server has seen that close, a new connection is served again.
        _wait_for(lambda: _health_status(port) == 200, "a connection to be served again")
    finally:
        for sock in held:
            sock.close()


def _health_status(port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code
    except httpx.HTTPError:  # refused at once: the server has not seen the close yet
        return 0
