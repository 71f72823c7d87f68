"""``GET /api/events`` of a real ``llamaproc serve``: what it shows, its bounded buffers, its subscribers, its login.

The daemons are real subprocesses with real llama-server children (and, for the
sharded model, real rpc workers). Subscribers read the feed over plain sockets
(``http.client``), so that a test can make one that reads nothing at all, with a
small receive buffer, as a slow browser tab would. Every wait is for an event or
a condition; the timeouts are a safety net only.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from daemon_helpers import (
    Daemon,
    chat_stream,
    running_daemon_checked,
    start_daemon,
    stop_daemon,
    until,
    write_config,
)
from prometheus_client.parser import text_string_to_metric_families

from llamaproc.serve._events import MAX_SUBSCRIBERS
from llamaproc.testing import write_tiny_model

pytestmark = pytest.mark.integration

#: A safety net only: every wait below ends as soon as its condition holds.
SAFETY = 120.0
KEY = "events-key-0123456789"
Event = tuple[str, dict[str, Any]]


@pytest.fixture(autouse=True)
def no_leftover_servers() -> Iterator[None]:
    """The module's daemons keep their children between tests; their fixtures check that none outlives them."""
    yield


class Feed:
    """One subscription to ``GET /api/events`` over its own socket.

    ``start()`` reads it in a thread (``next``/``until`` take what it read);
    until then nothing is read, and the daemon's writes pile up in the socket
    buffers. ``close()`` disconnects.
    """

    def __init__(self, base_url: str, *, headers: dict[str, str] | None = None, rcvbuf: int | None = None) -> None:
        url = urllib.parse.urlsplit(base_url)
        assert url.hostname is not None and url.port is not None
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(SAFETY)
        self.sock.connect((url.hostname, url.port))
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=SAFETY)
        self.conn.sock = self.sock
        self.conn.request("GET", "/api/events", headers=headers or {})
        self.response = self.conn.getresponse()
        self.queue: queue.Queue[Event | None] = queue.Queue()
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None  # why the reading stopped, if not at the feed's end
        assert self.response.status == 200, (self.response.status, self.response.read())
        assert self.response.getheader("content-type", "").startswith("text/event-stream")
        first = self.read_event()
        assert first is not None and first[0] == "subscribed", first

    def read_event(self) -> Event | None:
        """The next event (keepalive comments and ``retry:`` skipped); None at the end of the feed."""
        name, data = "message", None
        while True:
            try:
                line = self.response.readline()
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self.error = exc
                return None
            if not line:
                return None
            text = line.decode().rstrip("\n")
            if text.startswith("event: "):
                name = text[len("event: ") :]
            elif text.startswith("data: "):
                data = json.loads(text[len("data: ") :])
            elif text == "" and data is not None:
                return name, data

    def start(self) -> Feed:
        def run() -> None:
            while (event := self.read_event()) is not None:
                self.queue.put(event)
            self.queue.put(None)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    def next(self) -> Event | None:
        try:
            return self.queue.get(timeout=SAFETY)
        except queue.Empty:
            raise AssertionError(f"no event for {SAFETY} s") from None

    def until(self, predicate: Callable[[Event], bool]) -> list[Event]:
        """The events read up to the first that ``predicate`` accepts (included)."""
        seen: list[Event] = []
        while True:
            event = self.next()
            assert event is not None, f"the feed ended first ({self.error!r}); seen: {seen[-5:]}"
            seen.append(event)
            if predicate(event):
                return seen

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.thread is not None:
            self.thread.join(SAFETY)
        self.conn.close()

    def __enter__(self) -> Feed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _metric(client: httpx.Client, name: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"no metric {name}")


def _stream(client: httpx.Client, model: str, max_tokens: int, **extra: Any) -> str:
    """Stream a chat answer of exactly ``max_tokens`` tokens through the daemon; its text."""
    return chat_stream(client, model, max_tokens, **extra)


# --- one daemon without keys ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, backend: Any) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("events")
    layers = write_tiny_model(tmp / "layers.gguf", n_layers=8, seed=5)
    config = write_config(
        tmp / "serve.toml",
        {
            "tiny": {"path": tiny_model, "ctx_size": 4096},  # room for the long stream a client leaves
            "split": {"path": layers, "local_workers": 2, "stall_timeout": "5s"},
        },
        preload=["tiny"],
        max_loaded_models=2,
        write_timeout="10m",  # a subscriber that reads nothing is kept (its buffer drops events) while a test needs it
    )
    with running_daemon_checked(config, tmp / "state") as started:
        yield started


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=daemon.http, timeout=SAFETY) as c:
        until("the preloaded model", lambda: c.get("/api/models").json()["models"][0]["phase"] == "Serving")
        yield c


def test_the_feed_shows_model_changes_and_the_tokens_of_http_and_socket_streams(
    daemon: Daemon, client: httpx.Client
) -> None:
    with Feed(daemon.http) as feed:
        feed.start()
        assert client.post("/api/models/tiny/unload").status_code == 200
        feed.until(lambda e: e == ("model", {"model": "tiny", "event": "stopped"}))
        assert client.post("/api/models/tiny/load").status_code == 200
        seen = feed.until(lambda e: e == ("model", {"model": "tiny", "event": "serving"}))
        assert ("model", {"model": "tiny", "event": "loading"}) in seen

        text = _stream(client, "tiny", 12)
        tokens = feed.until(lambda e: e[0] == "end")
        request = tokens[0][1]["request"]
        assert all(name == "token" and data["request"] == request for name, data in tokens[:-1])
        assert all(data["model"] == "tiny" and data["layout"] is None for _, data in tokens[:-1])
        assert "".join(data["text"] for _, data in tokens[:-1]) == text
        assert tokens[-1] == ("end", {"model": "tiny", "request": request, "status": "done", "tokens": len(tokens) - 1})

        # A stream of the socket front end is shown the same way, as another request.
        assert daemon.socket is not None
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(SAFETY)
            sock.connect(daemon.socket)
            sock.sendall(b'{"id": 1, "op": "generate", "model": "tiny", "prompt": "Once", "max_tokens": 6}\n')
            lines = b""
            while b'"event": "done"' not in lines and b'"event":"done"' not in lines:
                chunk = sock.recv(65536)
                assert chunk, lines
                lines += chunk
        texts = [json.loads(line)["text"] for line in lines.splitlines() if b'"token"' in line]
        socket_tokens = feed.until(lambda e: e[0] == "end")
        assert socket_tokens[0][1]["request"] != request
        assert [data["text"] for name, data in socket_tokens if name == "token"] == texts
        assert socket_tokens[-1][1]["status"] == "done"


def test_a_stream_whose_client_leaves_ends_as_failed(daemon: Daemon, client: httpx.Client) -> None:
    # Long enough that the client is gone well before its end.
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with Feed(daemon.http) as feed:
        feed.start()
        with client.stream("POST", "/v1/chat/completions", json=body) as answer:
            assert answer.status_code == 200
            feed.until(lambda e: e[0] == "token")
        end = feed.until(lambda e: e[0] == "end")[-1][1]
    assert end["status"] == "failed" and end["tokens"] < 4000


def test_a_slow_subscriber_loses_the_oldest_events_and_is_told_how_many(daemon: Daemon, client: httpx.Client) -> None:
    with Feed(daemon.http) as fast, Feed(daemon.http, rcvbuf=4096) as slow:
        fast.start()
        # The slow one reads nothing: once the socket buffers are full the daemon cannot write to it, its
        # buffer of events fills, and the oldest go. The daemon's metric says when that has happened.
        before = _metric(client, "llamaproc_events_dropped_total")
        streams = 0
        while _metric(client, "llamaproc_events_dropped_total") == before:
            _stream(client, "tiny", 200)
            streams += 1
            assert streams < 500, "no event was ever dropped"
        _stream(client, "tiny", 4)  # the last events: the slow one must still get them
        everything = fast.until(lambda e: e[0] == "end" and e[1]["tokens"] == 4)
        slow.start()
        received = slow.until(lambda e: e == everything[-1])

    # What the slow one read is everything the fast one read, less the gaps its `dropped` notices announce,
    # each right where its events went missing: the oldest of those waiting were dropped, the newest kept.
    notices = [data["count"] for name, data in received if name == "dropped"]
    assert notices and all(count > 0 for count in notices)
    position = 0
    for event in received:
        if event[0] == "dropped":
            position += event[1]["count"]
            continue
        assert event == everything[position], (position, event)
        position += 1
    assert position == len(everything)
    assert _metric(client, "llamaproc_events_dropped_total") - before == sum(notices)


def test_a_subscriber_that_disconnects_is_forgotten(daemon: Daemon, client: httpx.Client) -> None:
    before = _metric(client, "llamaproc_event_subscribers")
    feed = Feed(daemon.http)
    until("the subscriber counted", lambda: _metric(client, "llamaproc_event_subscribers") == before + 1)
    feed.close()
    until("the subscriber forgotten", lambda: _metric(client, "llamaproc_event_subscribers") == before)


def test_subscribers_are_bounded(daemon: Daemon, client: httpx.Client) -> None:
    before = int(_metric(client, "llamaproc_event_subscribers"))
    feeds = [Feed(daemon.http) for _ in range(MAX_SUBSCRIBERS - before)]
    try:
        refused = client.get("/api/events")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "too_many_subscribers"
        assert int(refused.headers["retry-after"]) > 0
        feeds.pop().close()
        until("a place free", lambda: _metric(client, "llamaproc_event_subscribers") < MAX_SUBSCRIBERS)
        feeds.append(Feed(daemon.http))
    finally:
        for feed in feeds:
            feed.close()
    until("the subscribers forgotten", lambda: _metric(client, "llamaproc_event_subscribers") == before)


def test_a_sharded_stream_shows_its_layout_and_the_reshard(daemon: Daemon, client: httpx.Client) -> None:
    with Feed(daemon.http) as feed:
        feed.start()
        assert client.post("/api/models/split/load").status_code == 200
        feed.until(lambda e: e == ("model", {"model": "split", "event": "serving"}))
        status = next(m for m in client.get("/api/models").json()["models"] if m["name"] == "split")
        first_layout = " ".join(f"{s['address']}[{s['layers']['start']}-{s['layers']['stop']}]" for s in status["layout"])
        workers = [w for w in client.get("/api/workers").json()["workers"] if w["model"] == "split"]
        assert len(workers) == 2

        killed: list[str] = []
        seen = 0

        def kill_one_worker(event: Event) -> bool:
            nonlocal seen
            if event[0] == "token" and event[1]["model"] == "split":
                seen += 1
                if seen == 20:
                    os.kill(workers[0]["pid"], signal.SIGKILL)
                    killed.append(workers[0]["address"])
            return event[0] == "end"

        texts: list[str] = []
        failures: list[BaseException] = []

        def stream() -> None:
            try:
                texts.append(_stream(client, "split", 120))
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        thread = threading.Thread(target=stream)
        thread.start()
        events = feed.until(kill_one_worker)
        thread.join(SAFETY)
        assert texts, f"the stream failed: {failures!r}\n{daemon.stderr()[-4000:]}"

    stream = [(name, data) for name, data in events if name in ("token", "resume", "end")]
    tokens = [data for name, data in stream if name == "token"]
    resume = [data for name, data in stream if name == "resume"]
    assert len(resume) == 1 and resume[0]["reshard"]["lost"] == killed
    cut = stream.index(("resume", resume[0]))
    assert {data["layout"] for _, data in stream[:cut]} == {first_layout}
    assert {data["layout"] for _, data in stream[cut + 1 : -1]} == {resume[0]["layout"]} != {first_layout}
    assert killed[0] not in resume[0]["layout"]
    assert stream[-1][1]["status"] == "done" and stream[-1][1]["tokens"] == len(tokens) == 120
    assert "".join(t["text"] for t in tokens) == texts[0]
    # The model's own reshard and the lost worker are told too.
    assert any(name == "reshard" and data["model"] == "split" and data["lost"] == killed for name, data in events)
    assert any(name == "worker" and data["change"] == "lost" and data["address"] == killed[0] for name, data in events)


# --- a daemon with API keys --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, backend: Any) -> Iterator[Daemon]:
    """Keys, and a short write timeout."""
    tmp = tmp_path_factory.mktemp("events-guarded")
    config = write_config(
        tmp / "serve.toml", {"tiny": {"path": tiny_model, "ctx_size": 512}}, api_keys=[KEY], write_timeout="1s"
    )
    with running_daemon_checked(config, tmp / "state") as started:
        yield started


def test_the_feed_asks_for_the_key(guarded: Daemon) -> None:
    refused = httpx.get(guarded.http + "/api/events", timeout=SAFETY)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    with Feed(guarded.http, headers={"Authorization": f"Bearer {KEY}"}):
        pass  # subscribed


def test_a_login_cookie_reads_the_api_and_changes_nothing(guarded: Daemon) -> None:
    with httpx.Client(base_url=guarded.http, timeout=SAFETY, follow_redirects=False) as browser:
        assert browser.get("/ui").status_code == 200  # the page itself needs no key
        wrong = browser.post("/ui/login", data={"key": KEY + "x"})
        assert wrong.status_code == 401 and not browser.cookies
        login = browser.post("/ui/login", data={"key": KEY})
        assert login.status_code == 303 and login.headers["location"] == "/ui"
        cookie = login.headers["set-cookie"]
        token = browser.cookies["llamaproc_session"]
        assert KEY not in cookie and len(token) >= 40
        assert {"httponly", "samesite=strict", "path=/"} <= {p.strip().lower() for p in cookie.split(";")}

        session = {"Cookie": f"llamaproc_session={token}"}
        with Feed(guarded.http, headers=session):
            pass  # subscribed
        assert browser.get("/api/models").status_code == 200
        assert browser.get("/api/workers").status_code == 200
        # Never in place of the key for what changes something, nor outside /ui and /api.
        for path in ("/api/models/tiny/load", "/api/models/tiny/unload", "/v1/chat/completions"):
            assert browser.post(path, json={"model": "tiny", "messages": []}).status_code == 401, path
        for path in ("/metrics", "/v1/models"):
            assert browser.get(path).status_code == 401, path
        # Another origin gets nothing with it either.
        assert browser.get("/api/models", headers={"Origin": "http://evil.example"}).status_code == 403

        out = browser.post("/ui/logout")
        assert out.status_code == 303 and not browser.cookies
        assert browser.get("/api/events", headers=session).status_code == 401
        assert browser.get("/api/models", headers=session).status_code == 401


def test_a_subscriber_that_reads_nothing_for_the_write_timeout_is_dropped(guarded: Daemon) -> None:
    bearer = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=guarded.http, timeout=SAFETY, headers=bearer) as client:
        before = _metric(client, "llamaproc_event_subscribers")
        with Feed(guarded.http, headers=bearer, rcvbuf=4096) as stuck:
            streams = 0
            while _metric(client, "llamaproc_event_subscribers") > before:
                _stream(client, "tiny", 200)
                streams += 1
                assert streams < 500, "the subscriber was never dropped"
            while stuck.read_event() is not None:  # what the socket buffers held, then the end
                pass
    assert "a client of /api/events read nothing for 1s; dropped it" in guarded.stderr()


# --- shutdown -------------------------------------------------------------------------------------------


def test_the_daemons_shutdown_ends_the_feed(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(tmp_path / "serve.toml", {"tiny": {"path": tiny_model}})
    daemon = start_daemon(config, tmp_path / "state")
    try:
        feed = Feed(daemon.http).start()
        daemon.process.send_signal(signal.SIGTERM)
        while feed.next() is not None:  # the feed ends: the daemon need not wait on it
            pass
        feed.close()
        assert daemon.process.wait(SAFETY) == 0, daemon.stderr()
    finally:
        stop_daemon(daemon)
