"""Pieces of the daemon that are easier to pin down without processes.

The HTTP proxy's stream relay (with a fake upstream answer) and the default
wait of ``llamaproc stop``. The upstream client has its own tests
(test_upstream.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.types import Message

from llamaproc import LlamaprocError
from llamaproc.cli._daemon_cli import STOP_TIMEOUT, _default_stop_timeout
from llamaproc.runtime import ServeConfig
from llamaproc.serve import ServeMetrics
from llamaproc.serve._proxy import ProxyState, _Call
from llamaproc.serve._upstream import Upstream

pytestmark = pytest.mark.anyio


class FakePool:
    closed = False
    config = ServeConfig.model_validate({"models": {"tiny": {"path": "/nonexistent/tiny.gguf"}}})

    def names(self) -> list[str]:
        return ["tiny"]


class FakeEndpoint:
    returncode: int | None = None
    api_key = None

    def progress(self) -> float | None:
        return None

    def kill(self, reason: str) -> None:
        self.returncode = -9

    async def explain(self, error: LlamaprocError) -> LlamaprocError:
        return error


class FakeResponse:
    """What ``Upstream.post`` returns, with a body given as chunks."""

    status = 200
    content_type = b"text/event-stream"

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self.closed = False

    async def next_chunk(self) -> bytes | None:
        return next(self._chunks, None)

    def close(self) -> None:
        self.closed = True


async def relay(chunks: list[bytes], pool: FakePool | None = None) -> tuple[bytes, _Call]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    state = ProxyState(pool or FakePool(), Upstream(), ServeMetrics(), 1 << 20)  # type: ignore[arg-type]
    call = _Call(state, "tiny", 0.0, send)
    await call._relay_stream(FakeEndpoint(), "/v1/completions", FakeResponse(chunks))  # type: ignore[arg-type]
    assert sent[0]["type"] == "http.response.start" and sent[-1]["more_body"] is False
    return b"".join(m.get("body", b"") for m in sent[1:]), call


async def test_relay_rewrites_the_model_field_and_ends_a_cut_stream_with_an_error_event() -> None:
    body, call = await relay(
        [
            b'data: {"choices":[{"text":"a"}],"model":"tiny.gguf"}\n\n',
            b'data: {"choices":[{"text":"b"}],"model":"tiny.gguf"}',  # cut before its blank line: no event
        ]
    )
    assert b"tiny.gguf" not in body
    assert body.count(b'"model":"tiny"') == 1
    error = json.loads(body.rsplit(b"data: ", 1)[1])["error"]  # no [DONE]: an error event of ours
    assert (error["code"], call.status) == ("upstream_error", "502")


async def test_relay_passes_events_on_whatever_their_line_ends() -> None:
    body, call = await relay([b'data: {"choices":[{"text":"a"}],"model":"x"}\r\n\r', b"\ndata: [DONE]\r\n\r\n"])
    assert body == b'data: {"choices":[{"text":"a"}],"model":"tiny"}\n\ndata: [DONE]\n\n'
    assert (call.status, call.tokens) == ("200", 1)


async def test_relay_ends_a_stream_cut_by_a_shutdown_with_a_shutting_down_event() -> None:
    pool = FakePool()
    pool.closed = True
    body, call = await relay([b'data: {"model":"x"}\n\n'], pool)
    assert json.loads(body.rsplit(b"data: ", 1)[1])["error"]["code"] == "shutting_down"
    assert call.status == "503"


def test_stop_waits_for_the_drain_timeout_named_in_serve_json(tmp_path: Path) -> None:
    assert STOP_TIMEOUT >= 30 + 20  # the default drain (30 s) and time to stop the children
    assert _default_stop_timeout(tmp_path) == STOP_TIMEOUT
    (tmp_path / "serve.json").write_text(json.dumps({"pid": 1, "drain_timeout": 100}))
    assert _default_stop_timeout(tmp_path) == 130
    (tmp_path / "serve.json").write_text(json.dumps({"pid": 1, "drain_timeout": 5}))
    assert _default_stop_timeout(tmp_path) == STOP_TIMEOUT
    (tmp_path / "serve.json").write_text("not json")
    assert _default_stop_timeout(tmp_path) == STOP_TIMEOUT
