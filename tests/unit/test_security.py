"""The HTTP front end's checks as pure functions, and the gate's decisions on ASGI scopes.

The same checks against a real daemon are in tests/integration/test_daemon_security.py.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.types import Message

from llamaproc.serve import HttpSecurity
from llamaproc.serve._security import (
    bearer_token,
    check_credentials,
    host_allowed,
    host_of,
    is_ip_address,
    is_loopback,
    normal_origin,
    origin_allowed,
    same_origin,
)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("header", "host"),
    [
        (b"localhost", b"localhost"),
        (b"LocalHost:8484", b"localhost"),
        (b"127.0.0.1:80", b"127.0.0.1"),
        (b"[::1]:8484", b"[::1]"),
        (b"[::1]", b"[::1]"),
        (b"example.com.:443", b"example.com"),
        (b" example.com ", b"example.com"),
        (b"[::1", b""),
        (b"", b""),
    ],
)
def test_host_of(header: bytes, host: bytes) -> None:
    assert host_of(header) == host


@pytest.mark.parametrize(
    "host", [b"localhost", b"127.0.0.1", b"127.1.2.3", b"127.255.255.254", b"[::1]", b"[0:0::1]", b"[::ffff:127.0.0.1]"]
)
def test_loopback_hosts(host: bytes) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host",
    [b"evil.example", b"127.0.0.1.evil.example", b"localhost.evil.example", b"128.0.0.1", b"[::2]", b"127.x", b""],
)
def test_other_hosts_are_not_loopback(host: bytes) -> None:
    assert not is_loopback(host)


def test_ip_addresses() -> None:
    assert is_ip_address(b"10.1.2.3") and is_ip_address(b"[fe80::1]")
    assert not is_ip_address(b"10.1.2.3.nip.io") and not is_ip_address(b"fe80::1") and not is_ip_address(b"x")


def test_a_loopback_daemon_serves_loopback_names_and_the_allowed_ones_only() -> None:
    allowed = frozenset({b"llm.example", b"[fe80::1]"})
    for header in (b"localhost:8484", b"127.0.0.1", b"[::1]:1", b"LLM.example:8484", b"[fe80:0::1]:80", None):
        assert host_allowed(header, loopback_only=True, allowed=allowed), header
    for header in (b"evil.example", b"10.0.0.1:8484", b"llm.example.evil", b"", b"[::1"):
        assert not host_allowed(header, loopback_only=True, allowed=allowed), header
    assert host_allowed(b"evil.example", loopback_only=True, allowed=frozenset({b"*"}))


def test_a_daemon_on_another_address_serves_any_host_unless_some_are_listed() -> None:
    assert host_allowed(b"anything.example", loopback_only=False, allowed=frozenset())
    allowed = frozenset({b"llm.example"})
    for header in (b"llm.example", b"10.1.2.3:8484", b"[fd00::5]", b"localhost"):
        assert host_allowed(header, loopback_only=False, allowed=allowed), header
    # A name an attacker could point at the daemon is refused; an IP address cannot be rebound.
    assert not host_allowed(b"evil.example", loopback_only=False, allowed=allowed)


@pytest.mark.parametrize(
    ("origin", "normal"),
    [
        (b"http://app.example", b"http://app.example"),
        (b"HTTP://App.Example:80", b"http://app.example"),
        (b"https://app.example:443", b"https://app.example"),
        (b"https://app.example:8443", b"https://app.example:8443"),
        (b"http://[0:0::1]:3000", b"http://[::1]:3000"),
        (b"null", None),
        (b"http://app.example/path", None),
        (b"file://", None),
    ],
)
def test_normal_origin(origin: bytes, normal: bytes | None) -> None:
    assert normal_origin(origin) == normal


def test_same_origin() -> None:
    assert same_origin(b"http://localhost:8484", b"localhost:8484", "http")
    assert same_origin(b"http://localhost", b"localhost:80", "http")
    assert same_origin(b"http://127.0.0.1:8484", b"127.0.0.1:8484", "http")
    assert not same_origin(b"http://localhost:3000", b"localhost:8484", "http")  # same site, not same origin
    assert not same_origin(b"https://localhost:8484", b"localhost:8484", "http")
    assert not same_origin(b"http://evil.example", b"localhost:8484", "http")
    assert not same_origin(b"http://localhost:8484", None, "http")
    assert not same_origin(b"null", b"localhost:8484", "http")


def test_origin_allowed() -> None:
    allowed = frozenset({b"http://app.example", b"https://ui.example:8443"})
    assert origin_allowed(b"http://app.example", allowed)
    assert origin_allowed(b"http://APP.example:80", allowed)
    assert origin_allowed(b"https://ui.example:8443", allowed)
    assert not origin_allowed(b"https://app.example", allowed)
    assert not origin_allowed(b"http://app.example:8080", allowed)
    assert not origin_allowed(b"null", allowed)
    assert origin_allowed(b"null", frozenset({b"*"}))


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (b"Bearer abc", b"abc"),
        (b"bearer   abc ", b"abc"),
        (b"BEARER abc", b"abc"),
        (b"Basic YWJjOg==", None),
        (b"Bearer", None),
        (b"Bearer ", None),
        (b"abc", None),
    ],
)
def test_bearer_token(header: bytes, token: bytes | None) -> None:
    assert bearer_token(header) == token


def test_check_credentials_accepts_any_configured_key_only() -> None:
    digests = [hashlib.sha256(k).digest() for k in (b"key-one", b"key-two")]
    assert check_credentials(b"Bearer key-one", digests)
    assert check_credentials(b"Bearer key-two", digests)
    assert not check_credentials(b"Bearer key-three", digests)
    assert not check_credentials(b"Bearer key-on", digests)
    assert not check_credentials(b"Basic key-one", digests)
    assert not check_credentials(None, digests)
    assert not check_credentials(b"Bearer key-one", [])


# --- the gate --------------------------------------------------------------------------------


def scope(
    path: str = "/v1/models", method: str = "GET", *, host: bytes | None = b"127.0.0.1:8484", **headers: bytes
) -> dict[str, Any]:
    raw = [] if host is None else [(b"host", host)]
    raw += [(name.replace("_", "-").encode(), value) for name, value in headers.items()]
    return {"type": "http", "method": method, "path": path, "scheme": "http", "headers": raw}


async def answer(security: HttpSecurity, request: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
    """What the gate answers in place of the app (status, headers, JSON body); fails if it lets it through."""
    verdict = security.check(request)
    assert verdict is not None and verdict.status, "the request was let through"
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await verdict.answer(send)
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], headers, json.loads(body) if body else {}


async def test_keys_are_required_on_every_route_but_health() -> None:
    security = HttpSecurity(api_keys=[SecretStr("key-one"), "key-two"])
    assert security.requires_key
    for path, method in (("/v1/models", "GET"), ("/v1/chat/completions", "POST"), ("/metrics", "GET")):
        status, headers, body = await answer(security, scope(path, method))
        assert status == 401
        assert headers["www-authenticate"].startswith("Bearer")
        assert body == {
            "error": {
                "message": "missing API key: send it as 'Authorization: Bearer KEY'",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
    status, _, body = await answer(security, scope(authorization=b"Bearer key-three"))
    assert (status, body["error"]["message"]) == (401, "invalid API key")
    assert security.check(scope(authorization=b"Bearer key-one")) is None
    assert security.check(scope(authorization=b"Bearer key-two")) is None
    assert security.check(scope("/health")) is None
    assert (await answer(security, scope("/health", "POST")))[0] == 401


async def test_no_keys_no_authentication() -> None:
    security = HttpSecurity()
    assert not security.requires_key
    assert security.check(scope("/api/models/tiny/unload", "POST")) is None


async def test_the_keys_are_not_shown() -> None:
    security = HttpSecurity(api_keys=["very-secret-key"])
    assert "very-secret-key" not in repr(security)
    status, headers, body = await answer(security, scope(authorization=b"Bearer very-secret-key-2"))
    assert "very-secret" not in json.dumps([headers, body])


async def test_foreign_host_is_misdirected() -> None:
    status, _, body = await answer(HttpSecurity(), scope(host=b"evil.example:8484"))
    assert status == 421 and body["error"]["code"] == "invalid_host"
    assert HttpSecurity(allowed_hosts=["evil.example"]).check(scope(host=b"evil.example:8484")) is None
    assert HttpSecurity(loopback=False).check(scope(host=b"evil.example:8484")) is None
    assert HttpSecurity().check(scope(host=None)) is None


async def test_the_host_check_comes_before_the_key_check() -> None:
    status, _, _ = await answer(HttpSecurity(api_keys=["k"]), scope(host=b"evil.example"))
    assert status == 421


async def test_a_known_host_stays_accepted_and_a_refused_one_is_not_remembered() -> None:
    security = HttpSecurity()
    for _ in range(3):
        assert security.check(scope(host=b"localhost:8484")) is None
        assert (await answer(security, scope(host=b"evil.example")))[0] == 421


async def test_a_cross_origin_text_plain_post_is_refused() -> None:
    request = scope("/api/models/tiny/unload", "POST", origin=b"http://evil.example", content_type=b"text/plain")
    status, _, body = await answer(HttpSecurity(), request)
    assert status == 403 and body["error"]["code"] == "origin_not_allowed"
    # Even with a valid key: the page may hold one the user typed in, not this daemon's trust.
    request["headers"].append((b"authorization", b"Bearer k"))
    assert (await answer(HttpSecurity(api_keys=["k"]), request))[0] == 403


async def test_same_origin_requests_pass() -> None:
    assert HttpSecurity().check(scope(method="POST", origin=b"http://127.0.0.1:8484")) is None


async def test_cross_site_fetch_without_origin_is_refused() -> None:
    status, _, body = await answer(HttpSecurity(), scope(sec_fetch_site=b"cross-site"))
    assert status == 403 and body["error"]["code"] == "origin_not_allowed"
    assert HttpSecurity().check(scope(sec_fetch_site=b"same-origin")) is None
    assert HttpSecurity().check(scope(sec_fetch_site=b"none")) is None


async def test_allowed_origin_gets_cors_headers_and_its_preflight_answered() -> None:
    security = HttpSecurity(api_keys=["k"], allowed_origins=["http://app.example"])
    status, headers, _ = await answer(
        security,
        scope(
            "/v1/chat/completions",
            "OPTIONS",
            origin=b"http://app.example",
            access_control_request_method=b"POST",
            access_control_request_headers=b"authorization, content-type",
        ),
    )
    assert status == 204
    assert headers["access-control-allow-origin"] == "http://app.example"
    assert headers["vary"] == "Origin"
    assert "POST" in headers["access-control-allow-methods"]
    assert {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")} >= {
        "authorization",
        "content-type",
    }
    # The answer itself: let through, CORS headers added to its head.
    verdict = security.check(scope(origin=b"http://app.example", authorization=b"Bearer k"))
    assert verdict is not None and not verdict.status
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    wrapped = verdict.wrap(send)
    await wrapped({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"x")]})
    await wrapped({"type": "http.response.body", "body": b"ok"})
    assert sent[0]["headers"] == [
        (b"content-type", b"x"),
        (b"access-control-allow-origin", b"http://app.example"),
        (b"vary", b"Origin"),
    ]
    assert sent[1] == {"type": "http.response.body", "body": b"ok"}
    # Without its key the page gets a 401 it can read.
    status, headers, _ = await answer(security, scope(origin=b"http://app.example"))
    assert status == 401 and headers["access-control-allow-origin"] == "http://app.example"


async def test_a_preflight_from_an_origin_not_allowed_is_refused() -> None:
    security = HttpSecurity(allowed_origins=["http://app.example"])
    request = scope(
        "/v1/chat/completions", "OPTIONS", origin=b"http://evil.example", access_control_request_method=b"POST"
    )
    assert (await answer(security, request))[0] == 403


async def test_any_origin() -> None:
    security = HttpSecurity(allowed_origins=["*"])
    verdict = security.check(scope(origin=b"http://anywhere.example"))
    assert verdict is not None and (b"access-control-allow-origin", b"*") in verdict.cors
