"""The dashboard's parts on their own: the event feed and its bounded buffers, the stream taps, the worker
registry's change hook, the login sessions and the gate's use of their cookie.

The same against a real daemon: tests/integration/test_daemon_events.py; in a real browser:
tests/integration/test_dashboard_browser.py.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from idle_pool import FakePool
from starlette.testclient import TestClient

from llamaproc.serve import HttpSecurity, Upstream, create_app
from llamaproc.serve._events import EventFeed, FeedClosedError, FeedFullError, layout_key
from llamaproc.serve._security import SESSION_COOKIE, Sessions
from llamaproc.serve._workers import WorkerRegistry
from llamaproc.types import Reshard, Shard

pytestmark = pytest.mark.anyio


def _decode(frames: list[bytes] | None) -> list[tuple[str, dict[str, Any]]]:
    assert frames is not None
    events = []
    for raw in frames:
        name, data = raw.decode().removesuffix("\n\n").split("\n")
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


# --- the feed ----------------------------------------------------------------------------------------


async def test_a_slow_subscriber_loses_the_oldest_events_and_is_told_how_many() -> None:
    feed = EventFeed(buffer=3)
    slow = feed.subscribe()
    for n in range(5):
        feed.publish("model", {"n": n})
    assert feed.dropped == 2
    assert _decode(await slow.next(1)) == [
        ("dropped", {"count": 2}),
        ("model", {"n": 2}),
        ("model", {"n": 3}),
        ("model", {"n": 4}),
    ]
    # The count starts again: a later read tells only of later losses.
    feed.publish("model", {"n": 5})
    assert _decode(await slow.next(1)) == [("model", {"n": 5})]


async def test_each_subscriber_has_its_own_buffer() -> None:
    feed = EventFeed(buffer=2)
    first, second = feed.subscribe(), feed.subscribe()
    feed.publish("model", {"n": 1})
    assert _decode(await first.next(1)) == [("model", {"n": 1})]
    feed.publish("model", {"n": 2})
    feed.publish("model", {"n": 3})
    assert _decode(await first.next(1)) == [("model", {"n": 2}), ("model", {"n": 3})]
    assert _decode(await second.next(1)) == [("dropped", {"count": 1}), ("model", {"n": 2}), ("model", {"n": 3})]


async def test_nothing_is_built_while_nobody_subscribes() -> None:
    feed = EventFeed()
    feed.publish("model", {"not json": object()})  # never encoded: it would raise
    tap = feed.tap("tiny")
    tap.end("done")
    assert tap.id is None and feed.dropped == 0


async def test_a_reader_waits_for_the_next_event_or_its_timeout() -> None:
    feed = EventFeed()
    subscriber = feed.subscribe()
    assert await subscriber.next(0.01) == []  # nothing came: the caller sends a keepalive
    async with anyio.create_task_group() as tg:

        async def publish_soon() -> None:
            await anyio.sleep(0)
            feed.publish("model", {"n": 1})

        tg.start_soon(publish_soon)
        with anyio.fail_after(30):
            assert _decode(await subscriber.next(60)) == [("model", {"n": 1})]


async def test_subscribers_are_bounded_forgotten_and_ended_by_close() -> None:
    feed = EventFeed(max_subscribers=2)
    first, second = feed.subscribe(), feed.subscribe()
    with pytest.raises(FeedFullError, match="2 clients"):
        feed.subscribe()
    feed.unsubscribe(first)
    feed.unsubscribe(first)  # twice: ignored
    assert feed.subscribers == [second]
    feed.subscribe()
    feed.publish("model", {"n": 1})
    feed.close()
    # What was buffered is still read, then the subscription ends.
    assert _decode(await second.next(60)) == [("model", {"n": 1})]
    with anyio.fail_after(30):
        assert await second.next(60) is None
    with pytest.raises(FeedClosedError):
        feed.subscribe()


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="buffer"):
        EventFeed(buffer=0)
    with pytest.raises(ValueError, match="ttl"):
        Sessions(ttl=0)


# --- streams -----------------------------------------------------------------------------------------


async def test_a_tap_publishes_tokens_with_their_layout_and_marks_a_reshard() -> None:
    feed = EventFeed()
    subscriber = feed.subscribe()
    before = [Shard("10.0.0.2:50052", range(0, 4)), Shard("10.0.0.3:50052", range(4, 9))]
    after = [Shard("10.0.0.2:50052", range(0, 9))]
    tap = feed.tap("big", before)
    tap.token("Once")
    tap.resume(Reshard(after_tokens=1, lost=["10.0.0.3:50052"], layout=after, seconds=0.5))
    tap.token(" upon")
    tap.end("done")
    events = _decode(await subscriber.next(1))
    assert [name for name, _ in events] == ["token", "resume", "token", "end"]
    first, resume, second, end = (data for _, data in events)
    assert first == {"model": "big", "request": "r1", "text": "Once", "layout": layout_key(before)}
    assert layout_key(before) == "10.0.0.2:50052[0-4] 10.0.0.3:50052[4-9]"
    assert resume["request"] == "r1" and resume["layout"] == layout_key(after)
    assert resume["reshard"]["lost"] == ["10.0.0.3:50052"]
    assert second["layout"] == "10.0.0.2:50052[0-9]"
    assert end == {"model": "big", "request": "r1", "status": "done", "tokens": 2}
    assert layout_key(None) is None and layout_key([]) == "coordinator"


def test_the_registry_tells_of_each_change() -> None:
    registry = WorkerRegistry()
    seen: list[tuple[str, str]] = []
    registry.on_change = lambda entry, change: seen.append((entry.address, change))
    entry = registry.register("10.0.0.2:50052")
    registry.assign(["10.0.0.2:50052", "10.0.0.9:50052"], "big")
    registry.release("big")
    registry.evict(entry.id)
    registry.remove(entry.id)
    assert seen == [
        ("10.0.0.2:50052", "registered"),
        ("10.0.0.2:50052", "assigned"),
        ("10.0.0.9:50052", "registered"),  # listed in the model's config: known from now on
        ("10.0.0.9:50052", "assigned"),
        ("10.0.0.2:50052", "released"),
        ("10.0.0.9:50052", "removed"),  # a config worker is forgotten with its model
        ("10.0.0.2:50052", "lost"),
        ("10.0.0.2:50052", "removed"),
    ]


def test_a_broken_change_hook_does_not_break_the_registry() -> None:
    registry = WorkerRegistry()

    def broken(entry: Any, change: str) -> None:
        raise RuntimeError("observer bug")

    registry.on_change = broken
    assert registry.register("10.0.0.2:50052").address == "10.0.0.2:50052"


# --- logins --------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sessions_expire_end_and_are_bounded() -> None:
    clock = Clock()
    sessions = Sessions(ttl=60, limit=2, clock=clock)
    first = sessions.create().encode()
    assert sessions.valid(first) and not sessions.valid(b"made-up")
    clock.now += 61
    assert not sessions.valid(first) and len(sessions) == 0
    second, third = sessions.create().encode(), sessions.create().encode()
    fourth = sessions.create().encode()  # beyond the limit: the oldest ends
    assert not sessions.valid(second) and sessions.valid(third) and sessions.valid(fourth)
    sessions.end(third)
    sessions.end(third)
    assert not sessions.valid(third) and len(sessions) == 1


def test_a_login_needs_a_key_and_never_keeps_it() -> None:
    security = HttpSecurity(api_keys=["key-one"])
    assert security.login("key-two") is None and security.login("kéy") is None
    token = security.login("key-one")
    assert token is not None and "key-one" not in token
    assert security.sessions.valid(token.encode())
    assert HttpSecurity().login("anything") is None  # no keys: nothing to log in to


def _scope(path: str, method: str = "GET", cookie: str | None = None, **headers: bytes) -> dict[str, Any]:
    raw = [(b"host", b"127.0.0.1:8484")]
    if cookie is not None:
        raw.append((b"cookie", f"theme=dark; {SESSION_COOKIE}={cookie}".encode()))
    raw += [(name.encode(), value) for name, value in headers.items()]
    return {"type": "http", "method": method, "path": path, "scheme": "http", "headers": raw}


def _passes(security: HttpSecurity, scope: dict[str, Any]) -> bool:
    verdict = security.check(scope)
    return verdict is None or not verdict.status


def test_the_cookie_stands_in_for_the_key_for_reading_only() -> None:
    security = HttpSecurity(api_keys=["key-one"])
    token = security.login("key-one")
    assert token is not None
    for path in ("/api/models", "/api/workers", "/api/events", "/api/jobs"):
        assert _passes(security, _scope(path, cookie=token)), path
        assert _passes(security, _scope(path, "HEAD", cookie=token)), path
        assert not _passes(security, _scope(path, cookie="forged")), path
    assert _passes(security, _scope("/ui/logout", "POST", cookie=token))
    # Nothing that changes something, and nothing outside /ui and /api.
    for path, method in (
        ("/api/models/tiny/load", "POST"),
        ("/api/models/tiny/unload", "POST"),
        ("/api/workers/register", "POST"),
        ("/api/workers/w-1", "DELETE"),
        ("/v1/chat/completions", "POST"),
        ("/v1/models", "GET"),
        ("/metrics", "GET"),
    ):
        assert not _passes(security, _scope(path, method, cookie=token)), (method, path)
    security.sessions.end(token.encode())
    assert not _passes(security, _scope("/api/models", cookie=token))


def test_the_page_and_the_login_need_no_key_but_their_origin_is_checked() -> None:
    security = HttpSecurity(api_keys=["key-one"])
    for path, method in (("/ui", "GET"), ("/ui/dashboard.js", "GET"), ("/ui/login", "POST"), ("/health", "GET")):
        assert _passes(security, _scope(path, method)), path
    assert not _passes(security, _scope("/ui/logout", "POST"))
    evil = _scope("/ui/login", "POST", origin=b"http://evil.example")
    verdict = security.check(evil)
    assert verdict is not None and verdict.status == 403
    token = security.login("key-one")
    assert token is not None
    verdict = security.check(_scope("/api/events", cookie=token, origin=b"http://evil.example"))
    assert verdict is not None and verdict.status == 403


# --- the routes, in process -------------------------------------------------------------------------



def test_login_sets_a_strict_http_only_cookie_and_logout_clears_it() -> None:
    security = HttpSecurity(api_keys=["key-one"])
    app = create_app(FakePool(), client=Upstream(), security=security)  # type: ignore[arg-type]
    with TestClient(app, base_url="http://127.0.0.1", follow_redirects=False) as client:
        page = client.get("/ui")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert b'src="/ui/dashboard.js"' in page.content
        assert client.get("/ui/dashboard.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/api/models").status_code == 401

        wrong = client.post("/ui/login", data={"key": "key-two"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert "set-cookie" not in wrong.headers
        assert client.post("/ui/login", data={"other": "x"}).status_code == 400
        assert client.post("/ui/login", json={"key": "key-one"}).status_code == 400
        assert client.post("/ui/login", data={"key": "k" * 5000}).status_code == 413

        answer = client.post("/ui/login", data={"key": "key-one"})
        assert answer.status_code == 303 and answer.headers["location"] == "/ui"
        cookie = answer.headers["set-cookie"]
        token = answer.cookies[SESSION_COOKIE]
        assert token and "key-one" not in cookie
        attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "path=/", "samesite=strict", "max-age=43200"} <= attributes
        assert client.get("/api/models").status_code == 200  # the client keeps the cookie
        assert client.post("/api/models/tiny/unload").status_code == 401

        out = client.post("/ui/logout")
        assert out.status_code == 303 and f'{SESSION_COOKIE}=""' in out.headers["set-cookie"]
        client.cookies.set(SESSION_COOKIE, token)  # the old cookie, sent again: its session ended
        assert client.get("/api/models").status_code == 401


def test_without_keys_the_login_sets_no_cookie() -> None:
    app = create_app(FakePool(), client=Upstream())  # type: ignore[arg-type]
    with TestClient(app, base_url="http://127.0.0.1", follow_redirects=False) as client:
        answer = client.post("/ui/login", data={"key": "anything"})
        assert answer.status_code == 303 and "set-cookie" not in answer.headers
        assert client.get("/api/models").status_code == 200


def test_the_feed_route_answers_head_and_refuses_other_methods() -> None:
    app = create_app(FakePool(), client=Upstream())  # type: ignore[arg-type]
    with TestClient(app, base_url="http://127.0.0.1") as client:
        head = client.head("/api/events")
        assert head.status_code == 200 and head.headers["content-type"].startswith("text/event-stream")
        assert client.post("/api/events").status_code == 405
