"""A fake llama-server that replays recorded SSE streams as fast as it can.

Run as a separate process so that its CPU time is not charged to the client
being measured::

    python bench/fake_server.py --native native.sse --chat chat.sse [--port 0]

It prints ``PORT <n>`` on stdout once it listens, then serves HTTP/1.1 with
keep-alive on 127.0.0.1:

* ``POST /completion``            the recorded native stream,
* ``POST /v1/chat/completions``   the recorded chat stream,
* ``GET /health``                 ``{"status":"ok"}``.

A recording is the raw SSE body of a real llama-server answer. The fake
answers a request for N tokens (``n_predict`` or ``max_tokens`` in the JSON
body) with N token events made by cycling through the recorded ones (their
counters renumbered), followed by the recorded final event(s). The whole
answer is built once per N and written in one go, framed as llama-server
frames it: ``Transfer-Encoding: chunked``, one HTTP chunk per event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

DEFAULT_TOKENS = 256
_MAX_TOKENS = 1_000_000


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _events(raw: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order (comments dropped)."""
    out = []
    for block in raw.decode("utf-8").replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:")]
        if data:
            out.append("\n".join(data))
    return out


class Recording:
    """One recorded stream, split into head, token events and tail."""

    def __init__(self, raw: bytes, kind: str) -> None:
        self.kind = kind
        events = _events(raw)
        self.head: list[Any] = []
        self.tokens: list[Any] = []
        self.tail: list[Any] = []
        for data in events:
            if data == "[DONE]":
                self.tail.append(data)
                continue
            obj = json.loads(data)
            if kind == "native":
                (self.tail if obj.get("stop") else self.tokens).append(obj)
            else:
                choice = (obj.get("choices") or [{}])[0]
                delta = choice.get("delta") or {}
                if choice.get("finish_reason") is not None or "timings" in obj or "usage" in obj:
                    self.tail.append(obj)
                elif delta.get("content"):
                    self.tokens.append(obj)
                elif not self.tokens:
                    self.head.append(obj)
        if not self.tokens or not self.tail:
            raise ValueError(f"the {kind} recording has no token events or no final event")
        self._cache: dict[int, bytes] = {}

    def body(self, n: int) -> bytes:
        """The chunked-encoded SSE body of an answer with ``n`` tokens."""
        n = max(1, min(n, _MAX_TOKENS))
        cached = self._cache.get(n)
        if cached is not None:
            return cached
        payloads: list[str] = [_dumps(obj) for obj in self.head]
        recorded = len(self.tokens)
        for i in range(n):
            obj = self.tokens[i % recorded]
            if self.kind == "native":
                obj = {**obj, "tokens_predicted": i + 1}
            payloads.append(_dumps(obj))
        for obj in self.tail:
            if isinstance(obj, str):
                payloads.append(obj)
                continue
            obj = dict(obj)
            if self.kind == "native":
                obj["tokens_predicted"] = n
            if isinstance(obj.get("timings"), dict):
                obj["timings"] = {**obj["timings"], "predicted_n": n}
            if isinstance(obj.get("usage"), dict):
                usage = dict(obj["usage"])
                usage["completion_tokens"] = n
                usage["total_tokens"] = usage.get("prompt_tokens", 0) + n
                obj["usage"] = usage
            payloads.append(_dumps(obj))
        parts = []
        for payload in payloads:
            event = f"data: {payload}\n\n".encode()
            parts.append(b"%x\r\n%s\r\n" % (len(event), event))
        parts.append(b"0\r\n\r\n")
        body = b"".join(parts)
        self._cache[n] = body
        return body


_SSE_HEADERS = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: llama.cpp\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"Keep-Alive: timeout=5, max=100000\r\n"
    b"\r\n"
)


def _plain(status: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nServer: llama.cpp\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class Server:
    def __init__(self, native: Recording, chat: Recording) -> None:
        self.routes = {b"/completion": native, b"/v1/chat/completions": chat}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.split(b"\r\n")
                method, path, _ = lines[0].split(b" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length) if length else b""
                path = path.split(b"?", 1)[0]
                recording = self.routes.get(path)
                if method == b"POST" and recording is not None:
                    try:
                        params = json.loads(body) if body else {}
                    except ValueError:
                        params = {}
                    n = params.get("n_predict") or params.get("max_tokens") or DEFAULT_TOKENS
                    writer.write(_SSE_HEADERS + recording.body(int(n)))
                elif path == b"/health":
                    writer.write(_plain("200 OK", b'{"status":"ok"}'))
                else:
                    writer.write(_plain("404 Not Found", b'{"error":{"code":404,"message":"not found"}}'))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def serve(native: Recording, chat: Recording, port: int) -> None:
    server = Server(native, chat)
    srv = await asyncio.start_server(server.handle, "127.0.0.1", port, backlog=1024)
    print(f"PORT {srv.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with srv:
        # Exit when told to, or when the parent goes away (stdin closes).
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        eof = asyncio.ensure_future(reader.read())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({eof, stopped}, return_when=asyncio.FIRST_COMPLETED)
        eof.cancel()
        stopped.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--native", required=True, help="raw SSE body recorded from POST /completion")
    parser.add_argument("--chat", required=True, help="raw SSE body recorded from POST /v1/chat/completions")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    with open(args.native, "rb") as f:
        native = Recording(f.read(), "native")
    with open(args.chat, "rb") as f:
        chat = Recording(f.read(), "chat")
    asyncio.run(serve(native, chat, args.port))


if __name__ == "__main__":
    main()
