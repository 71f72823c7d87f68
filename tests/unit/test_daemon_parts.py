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

from llamaproc.cli._daemon_cli import STOP_TIMEOUT, _default_stop_timeout
from llamaproc.serve import ServeMetrics
from llamaproc.serve._proxy import ProxyState, _Call
from llamaproc.serve._upstream import Upstream

pytestmark = pytest.mark.anyio


class FakePool:
    closed = False

    def names(self) -> list[str]:
        return ["tiny"]


class FakeModel:
    returncode: int | None = None


class FakeResponse:
    """What ``Upstream.post`` returns, with a body given as chunks."""

    status = 200
    content_type = b"text/event-stream"

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)

    async def next_chunk(self) -> bytes | None:
        return next(self._chunks, None)


async def relay(chunks: list[bytes]) -> bytes:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    state = ProxyState(FakePool(), Upstream(), ServeMetrics(), 1 << 20)  # type: ignore[arg-type]
    call = _Call(state, "tiny", 0.0, send)
    await call._relay_stream(FakeModel(), FakeResponse(chunks))  # type: ignore[arg-type]
    assert sent[0]["type"] == "http.response.start" and sent[-1]["more_body"] is False
    return b"".join(m.get("body", b"") for m in sent[1:])


async def test_relay_rewrites_the_model_field_of_a_last_event_without_its_blank_line() -> None:
    body = await relay(
        [
            b'data: {"choices":[{"text":"a"}],"model":"tiny.gguf"}\n\n',
            b'data: {"choices":[{"text":"b"}],"model":"tiny.gguf"}',  # cut before its "\n\n"
        ]
    )
    assert b"tiny.gguf" not in body
    assert body.count(b'"model":"tiny"') == 2
    error = json.loads(body.rsplit(b"data: ", 1)[1])["error"]  # no [DONE]: an error event of ours
    assert error["code"] == "upstream_error"


async def test_relay_sees_a_done_that_ends_without_its_blank_line() -> None:
    body = await relay([b'data: {"choices":[{"text":"a"}],"model":"x"}\n\n', b"data: [DONE]"])
    assert body.endswith(b"data: [DONE]")
    assert b'"error"' not in body


async def test_relay_ends_a_stream_cut_by_a_shutdown_with_a_shutting_down_event() -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    pool = FakePool()
    pool.closed = True
    state = ProxyState(pool, Upstream(), ServeMetrics(), 1 << 20)  # type: ignore[arg-type]
    call = _Call(state, "tiny", 0.0, send)
    await call._relay_stream(FakeModel(), FakeResponse([b'data: {"model":"x"}\n\n']))  # type: ignore[arg-type]
    body = b"".join(m.get("body", b"") for m in sent[1:])
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
