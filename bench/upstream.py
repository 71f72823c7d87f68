"""The daemon's upstream client against httpx and httpcore: CPU time and latency per request.

    python bench/upstream.py [--quick] [--compare PATH]
    python bench/run.py --only upstream_client

Sends the same request to the same real llama-server (the tiny model, started
with ``load_model``) with ``llamaproc.serve.Upstream`` (the subject),
``httpx.AsyncClient`` and ``httpcore.AsyncConnectionPool``, in alternating
rounds (the order rotates each round); each round sends ``PER_ROUND`` requests
with each client, one after the other. The request is what the daemon relays
most: a streamed ``/completion`` of a few tokens, its body read to the end as
raw bytes. llama-server closes the connection after a streamed answer, so
every client opens a fresh connection per request: Upstream's spare
connections are off (``warm_for=0``), since with requests back to back the
spare for the next one would still be connecting when it is sent, a second
connection per request competing for the CPU; in the daemon they are opened
in the gaps between requests. Reported per request: this process's
CPU time (``time.process_time``; llama-server runs in its own process, with its
log turned off so that reading its output costs this process nothing) and the
wall-clock latency, medians of per-round values; the ratios are medians of
per-round ratios.

``--compare PATH`` adds a module file with an ``Upstream`` class of the same
API (an older version of ``src/llamaproc/serve/_upstream.py``, say) as one more
client, and a row comparing the subject with it.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpcore
import httpx
from common import Result, Settings, interleave, median, paired, tiny_model, workdir

import llamaproc
from llamaproc.serve import Upstream

PROMPT = "hello world the model says"
TOKENS = 4
#: Requests per client per round.
PER_ROUND = 20
PATH = "/completion"
#: httpx and httpcore are told not to keep the connection: llama-server closes it after a streamed
#: answer, a moment after its end, which a client that kept it would find on its next request. Upstream
#: never keeps a streamed answer's connection either.
HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream", "Connection": "close"}

Send = Callable[[], Awaitable[int]]


def upstream_send(client: Any, base_url: str, body: bytes, key: str | None) -> Send:
    """One request with an ``Upstream`` (this one or a compared one): the body's length.

    The model's key goes as the daemon sends it; an older ``Upstream`` that takes no headers sends none
    (its requests then get llama-server's 401, read whole like any answer).
    """
    extra = {} if key is None else {"headers": ((b"Authorization", b"Bearer " + key.encode()),)}

    async def send() -> int:
        response = await client.post(base_url, PATH, body, stream=True, **extra)
        try:
            if response.status != 200:
                raise RuntimeError(f"Upstream: status {response.status}")
            size = 0
            while (chunk := await response.next_chunk()) is not None:
                size += len(chunk)
            return size
        finally:
            response.close()

    return send


def httpx_send(client: httpx.AsyncClient, body: bytes) -> Send:
    async def send() -> int:
        async with client.stream("POST", PATH, content=body, headers=HEADERS) as response:
            if response.status_code != 200:
                raise RuntimeError(f"httpx: status {response.status_code}")
            size = 0
            async for chunk in response.aiter_raw():
                size += len(chunk)
            return size

    return send


def httpcore_send(pool: httpcore.AsyncConnectionPool, url: str, body: bytes, auth: dict[str, str]) -> Send:
    headers = list({**HEADERS, **auth}.items())

    async def send() -> int:
        async with pool.stream("POST", url, content=body, headers=headers) as response:
            if response.status != 200:
                raise RuntimeError(f"httpcore: status {response.status}")
            size = 0
            async for chunk in response.aiter_stream():
                size += len(chunk)
            return size

    return send


def load_compared(path: Path) -> Any:
    """The ``Upstream`` class of the module file at ``path``."""
    spec = importlib.util.spec_from_file_location("compared_upstream", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Upstream


async def upstream_client(s: Settings, compare: Path | None = None) -> list[Result]:
    """CPU time and latency per streamed request: Upstream vs. httpx and httpcore (and ``compare``)."""
    body = httpx.Request(
        "POST", "http://x", json={"prompt": PROMPT, "n_predict": TOKENS, "temperature": 0.0, "stream": True}
    ).read()
    # --log-disable: llama-server's log lines of every request would be read by the model's output
    # thread, in this process, and counted in its CPU time.
    model = await llamaproc.load_model(tiny_model(s.workdir), args=["--log-disable"])
    auth = {"Authorization": f"Bearer {model.api_key}"}  # the child answers only to its owner's key
    async with (
        model,
        Upstream(warm_for=0) as upstream,
        httpx.AsyncClient(base_url=model.base_url, timeout=60.0, trust_env=False, headers=auth) as http,
        httpcore.AsyncConnectionPool() as pool,
    ):
        clients: dict[str, Send] = {
            "upstream": upstream_send(upstream, model.base_url, body, model.api_key),
            "httpx": httpx_send(http, body),
            "httpcore": httpcore_send(pool, model.base_url + PATH, body, auth),
        }
        compared = None
        if compare is not None:
            compared = load_compared(compare)(warm_for=0)
            takes_headers = "headers" in inspect.signature(compared.post).parameters
            clients["compared"] = upstream_send(compared, model.base_url, body, model.api_key if takes_headers else None)
        # A warm-up, and a check that every client reads the whole answer (its length varies with the
        # timings in the final event).
        sizes = {name: await send() for name, send in clients.items()}
        if max(sizes.values()) > 1.1 * min(sizes.values()):
            raise RuntimeError(f"the clients read bodies of different sizes: {sizes}")

        latency: dict[str, list[float]] = {name: [] for name in clients}

        def measured(name: str, send: Send) -> Callable[[], Awaitable[float]]:
            async def round_() -> float:
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(PER_ROUND):
                    await send()
                latency[name].append((time.perf_counter() - t0) / PER_ROUND * 1e3)
                return (time.process_time() - c0) / PER_ROUND * 1e3

            return round_

        await interleave({name: measured(name, send) for name, send in clients.items()}, 2)
        for samples in latency.values():
            samples.clear()
        gc.collect()
        gc.disable()
        try:
            cpu = await interleave({name: measured(name, send) for name, send in clients.items()}, s.reps(60, 10))
        finally:
            gc.enable()
        if compared is not None:
            compared.close()

    note = (
        f"streamed /completion, {TOKENS} tokens, a fresh connection per request, {PER_ROUND} requests per client "
        f"per round, {len(cpu['upstream'])} rounds"
    )
    samples = {f"{k}_cpu_ms": v for k, v in cpu.items()} | {f"{k}_latency_ms": v for k, v in latency.items()}
    results = []
    baselines = [("httpx", "httpx.AsyncClient", 0.5), ("httpcore", "httpcore.AsyncConnectionPool", 0.6)]
    if compare is not None:
        baselines.append(("compared", f"Upstream of {compare}", 1.0))
    for name, label, target in baselines:
        results.append(
            Result(
                metric=f"upstream_cpu[{name}]",
                unit="ms",
                subject=median(cpu["upstream"]),
                baseline=median(cpu[name]),
                compare="ratio",
                value=paired(cpu["upstream"], cpu[name], "ratio"),
                op="<=",
                target=target,
                subject_label="Upstream, CPU per request",
                baseline_label=f"{label}, CPU per request",
                samples=samples if name == "httpx" else {},
                note=note,
            )
        )
    for name, label, _ in baselines:
        results.append(
            Result(
                metric=f"upstream_latency[{name}]",
                unit="ms",
                subject=median(latency["upstream"]),
                baseline=median(latency[name]),
                compare="ratio",
                value=paired(latency["upstream"], latency[name], "ratio"),
                op="<=",
                target=1.1,  # no slower, within this machine's noise (the spread of llama-server's own time)
                subject_label="Upstream, latency per request",
                baseline_label=f"{label}, latency per request",
                note=note,
            )
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the daemon's upstream client vs. httpx and httpcore")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--compare", type=Path, metavar="PATH", help="a module file with another Upstream to compare")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    with workdir() as wd:
        results = anyio.run(upstream_client, Settings(quick=args.quick, workdir=wd), args.compare, backend="asyncio")
    for r in results:
        print(
            f"{r.metric:28} {r.subject:8.3f} {r.unit} vs {r.baseline or 0:8.3f} {r.unit}  ratio {r.value:.3f}"
            f"  (target {r.op} {r.target:g}: {'ok' if r.ok else 'NO'})"
        )
    print(f"in {time.perf_counter() - t0:.1f} s{' (quick)' if args.quick else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
