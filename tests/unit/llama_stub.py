"""A scripted llama-server for the unit tests of the daemon's front ends.

:class:`LlamaStub` is a small asyncio HTTP/1.1 server in the test's own event
loop (the daemon's upstream client is asyncio-only, so the tests that use it
run on asyncio). By default it plays llama-server: ``/completion`` and
``/v1/chat/completions`` answer with a chunked SSE stream of as many tokens as
the body asks for (``n_predict`` / ``max_tokens``), ``tok0 ``, ``tok1 `` ...
with ids 100, 101 ..., and ``/v1/embeddings`` with one small vector per text.
The stream can be slowed (``delay``), paused after a number of tokens until
``resume`` is set, or cut at a token as a crash would cut it (``fail_at``: the
stub's ``returncode`` becomes -9, which its endpoint reports). A test can
instead script every answer with ``answer`` (see :func:`stream_answer`).

It records what it got (``requests``, ``headers``), counts the streams it is
sending (``open_streams``) and notices a client that closes a connection in
the middle of an answer (``hangups``, ``hung_up``): that is how a test sees
that a cancelled request let go of llama-server's slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, Self

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

TOKEN_ID = 100  # the id of the first token of a scripted stream
STUB_TIMINGS: dict[str, Any] = {"prompt_n": 3, "predicted_ms": 1.5}  # plus predicted_n, the tokens sent
PROMPT_TOKENS = 3
_CHUNKED_SSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"


def sse(*events: Any) -> bytes:
    """Server-sent events with these data (JSON, or a string as it is)."""
    return b"".join(b"data: " + (e if isinstance(e, str) else json.dumps(e)).encode() + b"\n\n" for e in events)


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def stream_answer(body: bytes, *, piece: int = 0, cut: bool = False, then: Callable[[], None] | None = None) -> Answer:
    """A chunked SSE answer, in HTTP chunks of ``piece`` bytes (0: one chunk per event);
    ``cut`` drops the connection instead of ending the body, after calling ``then``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_CHUNKED_SSE + b"Connection: close\r\n\r\n")
        parts = (
            [e + b"\n\n" for e in body.split(b"\n\n") if e]
            if not piece
            else [body[i : i + piece] for i in range(0, len(body), piece)]
        )
        for part in parts:
            writer.write(chunk(part))
            await writer.drain()
            await asyncio.sleep(0.001)
        if then is not None:
            then()
        if cut:
            writer.transport.abort()
            return
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    return answer


def endless_answer() -> Answer:
    """A token every 10 ms until the client goes away."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_CHUNKED_SSE + b"\r\n")
        event = sse({"content": "x", "tokens": [1], "stop": False})
        while True:
            writer.write(chunk(event))
            await writer.drain()
            await asyncio.sleep(0.01)

    return answer


def status_answer(status: int, body: Any) -> Answer:
    """A JSON answer with this status."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = json.dumps(body).encode()
        writer.write(
            b"HTTP/1.1 %d Oops\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, len(raw), raw)
        )
        await writer.drain()

    return answer


class LlamaStub:
    """A scripted llama-server on 127.0.0.1 (``async with LlamaStub() as stub``; ``stub.base_url``).

    ``api_key``: the ``Authorization: Bearer`` key it wants (401 without it), as the daemon's
    children do. The other attributes script the answers and may be changed at any time.
    """

    def __init__(self, *, api_key: str | None = None) -> None:
        self.api_key = api_key
        #: Every answer scripted by the test instead of the token streams (then the connection closes).
        self.answer: Answer | None = None
        #: Seconds before each token of a stream.
        self.delay = 0.0
        #: The text of every token (``None``: ``tok0 ``, ``tok1 `` ...).
        self.token_text: str | None = None
        #: After this many tokens a stream goes silent until :attr:`resume` is set (or its client goes away).
        self.pause_after: int | None = None
        self.resume = asyncio.Event()
        #: At this token a stream is cut as a crash cuts it, and :attr:`returncode` becomes -9.
        self.fail_at: int | None = None
        #: The exit status of the "process" (``None``: running), for the endpoint around the stub.
        self.returncode: int | None = None
        self.requests: list[tuple[bytes, bytes]] = []  # (path, body) of every request, in order
        self.headers: list[dict[bytes, bytes]] = []  # their headers (names in lower case)
        self.open_streams = 0  # answers being sent now
        self.hangups = 0  # answers whose client closed the connection before their end
        self.hung_up = asyncio.Event()  # set at the first of those
        self._streams: set[asyncio.StreamWriter] = set()
        self._cut: set[asyncio.StreamWriter] = set()  # streams the stub cut itself (no hang-up of the client)
        self._connections: set[asyncio.StreamWriter] = set()
        self._handlers = 0
        self._idle = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def bodies(self, path: bytes | None = None) -> list[dict[str, Any]]:
        """The JSON bodies received (on ``path`` only, if given)."""
        return [json.loads(body) for p, body in self.requests if path is None or p == path]

    def crash(self) -> None:
        """Die as a killed llama-server does: every stream is cut and :attr:`returncode` becomes -9."""
        self.returncode = -9
        for writer in list(self._streams):
            self._cut.add(writer)
            writer.transport.abort()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for writer in list(self._connections):  # connections kept alive by a client, if any are left
            writer.transport.abort()
        while self._handlers:
            self._idle.clear()
            await self._idle.wait()

    # -- serving ---------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers += 1
        self._connections.add(writer)
        try:
            while await self._one(reader, writer):
                pass  # a kept-alive connection: the next request
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(writer)
            writer.close()
            self._handlers -= 1
            self._idle.set()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; whether the connection stays open for another."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            return False  # the client closed an idle connection
        lines = head.split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:] if line)}
        path = lines[0].split()[1]
        body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
        self.requests.append((path, body))
        self.headers.append(headers)
        if self.answer is not None:
            await self._stream(reader, writer, self.answer(reader, writer))
            return False
        if self.api_key is not None and headers.get(b"authorization") != b"Bearer " + self.api_key.encode():
            await _json(
                writer, 401, {"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}}
            )
            return True
        request = json.loads(body)
        if path == b"/completion":
            await self._stream(reader, writer, self._tokens(writer, request.get("n_predict", -1), native=True))
            return False  # llama-server closes the connection after a streamed answer
        if path == b"/v1/chat/completions":
            await self._stream(reader, writer, self._tokens(writer, request.get("max_tokens", -1), native=False))
            return False
        if path == b"/v1/embeddings":
            texts = request["input"]
            data = [{"index": i, "embedding": [float(len(t)), 0.5]} for i, t in enumerate(texts)]
            await _json(writer, 200, {"data": data[::-1]})  # out of order: the index says which is which
            return True
        await _json(writer, 404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})
        return True

    async def _stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: Awaitable[None]
    ) -> None:
        """Send ``answer``; a client that closes the connection before its end stops it (a hang-up)."""
        self.open_streams += 1
        self._streams.add(writer)
        sending = asyncio.ensure_future(answer)
        gone = asyncio.ensure_future(reader.read(1))  # the client sends nothing more: b"" once it closes
        try:
            await asyncio.wait({sending, gone}, return_when=asyncio.FIRST_COMPLETED)
            hung_up = not sending.done() and writer not in self._cut
            if sending.done():
                try:
                    sending.result()
                except ConnectionError:
                    hung_up = True
            if hung_up:
                self.hangups += 1
                self.hung_up.set()
        finally:
            for task in (sending, gone):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await task
            self._streams.discard(writer)
            self._cut.discard(writer)
            self.open_streams -= 1

    async def _tokens(self, writer: asyncio.StreamWriter, count: int, *, native: bool) -> None:
        """The scripted stream: ``count`` tokens (-1: no end), then the final event."""
        writer.write(_CHUNKED_SSE + b"Connection: close\r\n\r\n")
        i = 0
        while i != count:
            if i == self.fail_at:
                self.returncode = -9
                writer.transport.abort()
                return
            if i == self.pause_after:
                await self.resume.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            text = f"tok{i} " if self.token_text is None else self.token_text
            if native:
                event: dict[str, Any] = {"content": text, "tokens": [TOKEN_ID + i], "stop": False}
            else:
                event = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
            writer.write(chunk(sse(event)))
            await writer.drain()
            i += 1
        timings = {**STUB_TIMINGS, "predicted_n": count}
        if native:
            end = sse({
                "content": "", "stop": True, "stop_type": "limit", "tokens_evaluated": PROMPT_TOKENS,
                "tokens_predicted": count, "timings": timings,
            })  # fmt: skip
        else:
            usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": count, "total_tokens": PROMPT_TOKENS + count}
            final = {
                "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                "usage": usage,
                "timings": timings,
            }
            end = sse(final, "[DONE]")
        writer.write(chunk(end) + b"0\r\n\r\n")
        await writer.drain()


async def _json(writer: asyncio.StreamWriter, status: int, body: Any) -> None:
    raw = json.dumps(body).encode()
    writer.write(
        b"HTTP/1.1 %d X\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s"
        % (status, len(raw), raw)
    )
    await writer.drain()
