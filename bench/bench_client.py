"""Client-side cost of streaming, against a fake llama-server that replays a real recording.

The fake server (bench/fake_server.py) runs in its own process and writes each
answer at once, so what is measured is the client: its CPU time per token
(``time.process_time`` of this process) and the aggregate rate of many
concurrent streams.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import httpx
from common import RESULTS_DIR, FakeServer, Result, Settings, interleave, median, paired, tiny_model
from httpx_sse import aconnect_sse

import llamaproc

PROMPT = "hello world the model says"
MESSAGES = [{"role": "user", "content": "hello"}]


async def record(s: Settings, n: int = 256) -> tuple[Path, Path]:
    """Record a native /completion and a chat stream of ``n`` tokens from the real server (once per run)."""
    native, chat = s.workdir / "native.sse", s.workdir / "chat.sse"
    if native.exists() and chat.exists():
        return native, chat
    requests = [
        (native, "/completion", {"prompt": PROMPT, "n_predict": n, "temperature": 0.0,
                                 "stream": True, "return_tokens": True}),
        (chat, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": n, "temperature": 0.0, "stream": True}),
    ]
    model = await llamaproc.load_model(tiny_model(s.workdir))
    auth = _auth(model)
    async with model, httpx.AsyncClient(base_url=model.base_url, timeout=60.0, trust_env=False, headers=auth) as http:
        for path, url, body in requests:
            async with http.stream("POST", url, json=body) as response:
                response.raise_for_status()
                path.write_bytes(await response.aread())
    return native, chat


# -- the ways of reading a stream ---------------------------------------------------------------

Reader = Callable[[int], Awaitable[int]]



def _auth(model: llamaproc.TextModel) -> dict[str, str]:
    """The child's key: it answers only to its owner, and the baselines talk to it directly."""
    return {"Authorization": f"Bearer {model.api_key}"}

def llamaproc_native(client: llamaproc.LlamaClient) -> Reader:
    async def read(n: int) -> int:
        count = 0
        async with client.stream_completion(PROMPT, n_predict=n, temperature=0.0) as stream:
            async for _ in stream:
                count += 1
        return count

    return read


def llamaproc_chat(client: llamaproc.LlamaClient) -> Reader:
    async def read(n: int) -> int:
        count = 0
        async with client.stream_chat(MESSAGES, max_tokens=n, temperature=0.0) as stream:
            async for _ in stream:
                count += 1
        return count

    return read


def httpx_sse_native(http: httpx.AsyncClient) -> Reader:
    async def read(n: int) -> int:
        body = {"prompt": PROMPT, "n_predict": n, "temperature": 0.0, "stream": True, "return_tokens": True}
        count = 0
        async with aconnect_sse(http, "POST", "/completion", json=body) as source:
            source.response.raise_for_status()
            async for sse in source.aiter_sse():
                obj = json.loads(sse.data)
                if obj.get("stop"):
                    break
                if obj.get("content") or obj.get("tokens"):
                    count += 1
        return count

    return read


def httpx_sse_chat(http: httpx.AsyncClient) -> Reader:
    async def read(n: int) -> int:
        body = {"messages": MESSAGES, "max_tokens": n, "temperature": 0.0, "stream": True}
        count = 0
        async with aconnect_sse(http, "POST", "/v1/chat/completions", json=body) as source:
            source.response.raise_for_status()
            async for sse in source.aiter_sse():
                if sse.data == "[DONE]":
                    break
                obj = json.loads(sse.data)
                choices = obj.get("choices")
                if choices and (choices[0].get("delta") or {}).get("content"):
                    count += 1
        return count

    return read


def openai_chat(client: object) -> Reader:
    async def read(n: int) -> int:
        count = 0
        stream = await client.chat.completions.create(  # type: ignore[attr-defined]
            model="tiny", messages=MESSAGES, max_tokens=n, temperature=0.0, stream=True
        )
        async with stream:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    count += 1
        return count

    return read


def _bare_http(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url, timeout=60.0, trust_env=False,
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
    )


# -- benchmarks -----------------------------------------------------------------------------------


async def client_cpu_per_token(s: Settings) -> list[Result]:
    """CPU time of this process per streamed token: llamaproc vs. bare httpx-sse vs. openai-python."""
    from openai import AsyncOpenAI

    n = 2000
    streams = s.reps(3, 1)
    native_rec, chat_rec = await record(s)
    with FakeServer(native_rec, chat_rec) as fake:
        async with (
            llamaproc.LlamaClient(fake.url) as client,
            _bare_http(fake.url) as http,
            AsyncOpenAI(base_url=fake.url + "/v1", api_key="none", max_retries=0) as oai,
        ):
            readers = {
                "llamaproc_native": llamaproc_native(client),
                "httpx_sse_native": httpx_sse_native(http),
                "llamaproc_chat": llamaproc_chat(client),
                "httpx_sse_chat": httpx_sse_chat(http),
                "openai_chat": openai_chat(oai),
            }

            def sample(read: Reader) -> Callable[[], Awaitable[float]]:
                async def run() -> float:
                    c0 = time.process_time()
                    total = 0
                    for _ in range(streams):
                        total += await read(n)
                    cpu = time.process_time() - c0
                    if total != n * streams:
                        raise RuntimeError(f"read {total} tokens, expected {n * streams}")
                    return cpu / total * 1e6

                return run

            for read in readers.values():  # warm up: connections, imports, caches
                await read(n)
            runs = await interleave({name: sample(read) for name, read in readers.items()}, s.reps(7, 3))
            if s.profile:
                _profile(await _profiled(readers["llamaproc_native"], readers["llamaproc_chat"], n=n))

    def row(metric: str, sub: str, base: str, op: str, target: float, labels: tuple[str, str]) -> Result:
        return Result(
            metric=metric, unit="µs CPU/token",
            subject=median(runs[sub]), baseline=median(runs[base]),
            compare="ratio", value=paired(runs[sub], runs[base], "ratio"), op=op, target=target,  # type: ignore[arg-type]
            subject_label=labels[0], baseline_label=labels[1],
            samples={sub: runs[sub], base: runs[base]},
            note=f"{streams} x {n}-token streams per sample, replayed by a fake server in another process",
        )

    return [
        row("client_cpu.native_vs_httpx_sse", "llamaproc_native", "httpx_sse_native", "<=", 1.5,
            ("LlamaClient.stream_completion", "httpx-sse + json.loads")),
        row("client_cpu.chat_vs_httpx_sse", "llamaproc_chat", "httpx_sse_chat", "<=", 1.5,
            ("LlamaClient.stream_chat", "httpx-sse + json.loads")),
        row("client_cpu.chat_vs_openai", "llamaproc_chat", "openai_chat", "<=", 1 / 3,
            ("LlamaClient.stream_chat", "AsyncOpenAI chat stream")),
    ]


async def _profiled(*readers: Reader, n: int = 2000, repeat: int = 3) -> cProfile.Profile:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(repeat):
        for read in readers:
            await read(n)
    prof.disable()
    return prof


def _profile(prof: cProfile.Profile) -> None:
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "profile_client_cpu.txt").write_text(out.getvalue())
    prof.dump_stats(RESULTS_DIR / "profile_client_cpu.prof")


async def concurrent_streams(s: Settings) -> list[Result]:
    """Aggregate tokens/s of 64 concurrent streams in one process: llamaproc vs. bare httpx-sse.

    Each sample uses a new client and measures its second burst of 64 streams,
    so every sample starts from the same state (the connection pool as the
    first burst left it), as in a service that gets one burst after another.
    """
    width = 64
    n = 500
    native_rec, chat_rec = await record(s)
    cpu: dict[str, list[float]] = {"llamaproc_cpu_us_per_token": [], "httpx_sse_cpu_us_per_token": []}

    async def burst(read: Reader) -> tuple[float, float]:
        counts: list[int] = []

        async def one() -> None:
            counts.append(await read(n))

        t0, c0 = time.perf_counter(), time.process_time()
        async with anyio.create_task_group() as tg:
            for _ in range(width):
                tg.start_soon(one)
        dt, used = time.perf_counter() - t0, time.process_time() - c0
        if sum(counts) != n * width:
            raise RuntimeError(f"read {sum(counts)} tokens, expected {n * width}")
        return n * width / dt, used / (n * width) * 1e6

    with FakeServer(native_rec, chat_rec) as fake:

        async def subject() -> float:
            async with llamaproc.LlamaClient(fake.url) as client:
                read = llamaproc_native(client)
                await burst(read)
                rate, used = await burst(read)
            cpu["llamaproc_cpu_us_per_token"].append(used)
            return rate

        async def baseline() -> float:
            async with _bare_http(fake.url) as http:
                read = httpx_sse_native(http)
                await burst(read)
                rate, used = await burst(read)
            cpu["httpx_sse_cpu_us_per_token"].append(used)
            return rate

        await subject()
        await baseline()
        for samples in cpu.values():
            samples.clear()
        runs = await interleave({"llamaproc": subject, "httpx_sse": baseline}, s.reps(9, 3))
    return [
        Result(
            metric="concurrent_streams", unit="tok/s",
            subject=median(runs["llamaproc"]), baseline=median(runs["httpx_sse"]),
            compare="ratio", value=paired(runs["llamaproc"], runs["httpx_sse"], "ratio"),
            op=">=", target=0.8,
            subject_label=f"{width} x LlamaClient.stream_completion",
            baseline_label=f"{width} x httpx-sse + json.loads",
            samples={**runs, **cpu},
            note=f"{width} concurrent {n}-token streams from the fake server, one process, second burst of a new client",
        )
    ]
