"""Benchmarks against the real llama-server and the tiny model: generate, load, close.

Each one runs llamaproc (the subject) and the least code that does the same
job by hand (the baseline) in alternating rounds of the same run.
"""

from __future__ import annotations

import json
import time

import anyio
import httpx
from common import BareServer, Result, Settings, interleave, median, paired, server_env, stream_rate, tiny_model
from httpx_sse import aconnect_sse

import llamaproc

PROMPT = "hello world the model says"


def _auth(model: llamaproc.TextModel) -> dict[str, str]:
    """The child's key: it answers only to its owner, and the baselines talk to it directly."""
    return {"Authorization": f"Bearer {model.api_key}"}


async def _bare_tokens(http: httpx.AsyncClient, body: dict[str, object], *, stop_after: int | None = None) -> int:
    """Read a native /completion stream the plain way: httpx-sse + json.loads per event."""
    count = 0
    async with aconnect_sse(http, "POST", "/completion", json=body) as source:
        source.response.raise_for_status()
        async for sse in source.aiter_sse():
            obj = json.loads(sse.data)
            if obj.get("stop"):
                break
            if obj.get("content") or obj.get("tokens"):
                count += 1
                if stop_after is not None and count >= stop_after:
                    break
    return count


async def generate_throughput(s: Settings) -> list[Result]:
    """tokens/s through model.generate() vs. reading the same server's SSE with bare httpx-sse."""
    n = 512
    model_path = tiny_model(s.workdir)
    body = {"prompt": PROMPT, "n_predict": n, "temperature": 0.0, "stream": True, "return_tokens": True}
    model = await llamaproc.load_model(model_path)
    async with model, httpx.AsyncClient(base_url=model.base_url, timeout=60.0, trust_env=False, headers=_auth(model)) as http:

        async def subject() -> float:
            return await stream_rate(model, PROMPT, n)

        async def baseline() -> float:
            t0 = time.perf_counter()
            count = await _bare_tokens(http, body)
            dt = time.perf_counter() - t0
            if count != n:
                raise RuntimeError(f"the bare stream gave {count} tokens, expected {n}")
            return count / dt

        await subject()
        await baseline()
        runs = await interleave({"llamaproc": subject, "httpx_sse": baseline}, s.reps(30, 10))
    return [
        Result(
            metric="generate_throughput", unit="tok/s",
            subject=median(runs["llamaproc"]), baseline=median(runs["httpx_sse"]),
            compare="ratio", value=paired(runs["llamaproc"], runs["httpx_sse"], "ratio"),
            op=">=", target=0.98,
            subject_label="model.generate()", baseline_label="httpx-sse /completion",
            samples=runs, note=f"{n} tokens per stream, temperature 0, real llama-server, tiny model",
        )
    ]


async def load_overhead(s: Settings) -> list[Result]:
    """load_model() time minus the time a bare Popen of the same command takes to answer /health."""
    model_path = tiny_model(s.workdir)
    backend = llamaproc.find_backend()
    env = server_env(backend.env)

    cpu: dict[str, list[float]] = {"llamaproc_cpu_ms": [], "bare_popen_cpu_ms": []}

    async def subject() -> float:
        t0, c0 = time.perf_counter(), time.process_time()
        model = await llamaproc.load_model(model_path)
        dt, used = time.perf_counter() - t0, time.process_time() - c0
        cpu["llamaproc_cpu_ms"].append(used * 1000)
        await model.close()
        return dt * 1000

    async def baseline() -> float:
        bare = BareServer(backend.binary, model_path, env)
        try:
            c0 = time.process_time()
            dt = bare.start()
            cpu["bare_popen_cpu_ms"].append((time.process_time() - c0) * 1000)
            return dt * 1000
        finally:
            bare.kill()

    await subject()
    await baseline()
    for samples in cpu.values():
        samples.clear()
    runs = await interleave({"llamaproc": subject, "bare_popen": baseline}, s.reps(15, 4))
    return [
        Result(
            metric="load_overhead", unit="ms",
            subject=median(runs["llamaproc"]), baseline=median(runs["bare_popen"]),
            compare="diff", value=paired(runs["llamaproc"], runs["bare_popen"], "diff"),
            op="<=", target=10.0,
            subject_label="load_model()", baseline_label="Popen + /health poll 1 ms",
            samples={**runs, **cpu}, note="time to a 200 on /health; close/kill not included",
        )
    ]


async def _deferred(http: httpx.AsyncClient) -> float:
    """llama-server's count of requests waiting for a slot (``/metrics``)."""
    text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("llamacpp:requests_deferred "):
            return float(line.split()[1])
    return 0.0


async def _processing(http: httpx.AsyncClient) -> bool:
    """Whether a slot of llama-server is busy (``/slots``)."""
    return any(slot["is_processing"] for slot in (await http.get("/slots")).json())


async def close_latency(s: Settings) -> list[Result]:
    """close() with a stream being read (alone, or with a second request queued behind it), during a
    non-streamed call, and on an idle model; bare equivalents for context."""
    model_path = tiny_model(s.workdir)
    backend = llamaproc.find_backend()
    env = server_env(backend.env)
    body = {"prompt": PROMPT, "n_predict": 1500, "temperature": 0.0, "stream": True}

    async def live_subject() -> float:
        model = await llamaproc.load_model(model_path)
        reading = anyio.Event()
        dt = float("nan")

        async def consume() -> None:
            try:
                async with model.generate(PROMPT, max_tokens=1500) as stream:
                    n = 0
                    async for _ in stream:
                        n += 1
                        if n == 32:
                            reading.set()
            except llamaproc.LlamaprocError:
                pass
            finally:
                reading.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await reading.wait()
                t0 = time.perf_counter()
                await model.close()
                dt = time.perf_counter() - t0
        finally:
            await model.close()
        return dt * 1000

    async def live_baseline() -> float:
        bare = BareServer(backend.binary, model_path, env)
        try:
            bare.start()
            async with httpx.AsyncClient(base_url=bare.url, timeout=60.0, trust_env=False) as http:
                request = http.build_request("POST", "/completion", json=body)
                response = await http.send(request, stream=True)
                n = 0
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        n += 1
                        if n == 32:
                            break
                t0 = time.perf_counter()
                await response.aclose()
                dt = bare.terminate()
                return (time.perf_counter() - t0 if dt != float("inf") else dt) * 1000
        finally:
            bare.kill()

    async def queued_subject() -> float:
        """One slot: a stream holds it, a second stream waits in llama-server's queue."""
        model = await llamaproc.load_model(model_path)
        reading = anyio.Event()
        dt = float("nan")

        async def consume(signal_reading: bool) -> None:
            try:
                async with model.generate(PROMPT, max_tokens=1500) as stream:
                    async for _ in stream:
                        if signal_reading:
                            reading.set()
            except llamaproc.LlamaprocError:
                pass
            finally:
                reading.set()

        try:
            async with anyio.create_task_group() as tg, httpx.AsyncClient(
                base_url=model.base_url, timeout=60.0, trust_env=False, headers=_auth(model)
            ) as monitor:
                tg.start_soon(consume, True)
                await reading.wait()
                tg.start_soon(consume, False)
                while await _deferred(monitor) < 1:
                    await anyio.sleep(0.005)
                t0 = time.perf_counter()
                await model.close()
                dt = time.perf_counter() - t0
        finally:
            await model.close()
        return dt * 1000

    async def queued_baseline() -> float:
        bare = BareServer(backend.binary, model_path, env)
        try:
            bare.start()
            async with (
                httpx.AsyncClient(base_url=bare.url, timeout=60.0, trust_env=False) as http,
                httpx.AsyncClient(base_url=bare.url, timeout=60.0, trust_env=False) as monitor,
            ):
                reading = anyio.Event()

                async def consume() -> None:
                    async with http.stream("POST", "/completion", json=body) as response:
                        async for _ in response.aiter_lines():
                            reading.set()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume)
                    await reading.wait()
                    tg.start_soon(consume)  # queued: no answer until the slot is free
                    while await _deferred(monitor) < 1:
                        await anyio.sleep(0.005)
                    t0 = time.perf_counter()
                    tg.cancel_scope.cancel()  # closes both connections
                dt = bare.terminate()
                return (time.perf_counter() - t0 if dt != float("inf") else dt) * 1000
        finally:
            bare.kill()

    async def call_subject() -> float:
        model = await llamaproc.load_model(model_path)
        dt = float("nan")

        async def call() -> None:
            try:
                await model.complete(PROMPT, max_tokens=1500)
            except llamaproc.LlamaprocError:
                pass

        try:
            async with anyio.create_task_group() as tg, httpx.AsyncClient(
                base_url=model.base_url, timeout=60.0, trust_env=False, headers=_auth(model)
            ) as monitor:
                tg.start_soon(call)
                while not await _processing(monitor):
                    await anyio.sleep(0.005)
                t0 = time.perf_counter()
                await model.close()
                dt = time.perf_counter() - t0
        finally:
            await model.close()
        return dt * 1000

    async def call_baseline() -> float:
        bare = BareServer(backend.binary, model_path, env)
        try:
            bare.start()
            async with (
                httpx.AsyncClient(base_url=bare.url, timeout=60.0, trust_env=False) as http,
                httpx.AsyncClient(base_url=bare.url, timeout=60.0, trust_env=False) as monitor,
            ):
                async with anyio.create_task_group() as tg:

                    async def call() -> None:
                        await http.post("/completion", json={**body, "stream": False})

                    tg.start_soon(call)
                    while not await _processing(monitor):
                        await anyio.sleep(0.005)
                    t0 = time.perf_counter()
                    tg.cancel_scope.cancel()  # closes the call's connection
                dt = bare.terminate()
                return (time.perf_counter() - t0 if dt != float("inf") else dt) * 1000
        finally:
            bare.kill()

    async def idle_subject() -> float:
        model = await llamaproc.load_model(model_path)
        try:
            await model.complete(PROMPT, max_tokens=16)
            t0 = time.perf_counter()
            await model.close()
            return (time.perf_counter() - t0) * 1000
        finally:
            await model.close()

    async def idle_baseline() -> float:
        bare = BareServer(backend.binary, model_path, env)
        try:
            bare.start()
            with httpx.Client(base_url=bare.url, timeout=60.0, trust_env=False) as http:
                http.post("/completion", json={**body, "n_predict": 16, "stream": False}).raise_for_status()
            return bare.terminate() * 1000
        finally:
            bare.kill()

    rounds = s.reps(7, 3)
    runs = await interleave(
        {
            "live_llamaproc": live_subject, "live_bare": live_baseline,
            "queued_llamaproc": queued_subject, "queued_bare": queued_baseline,
            "call_llamaproc": call_subject, "call_bare": call_baseline,
            "idle_llamaproc": idle_subject, "idle_bare": idle_baseline,
        },
        rounds,
    )
    live, idle = median(runs["live_llamaproc"]), median(runs["idle_llamaproc"])
    queued, call = median(runs["queued_llamaproc"]), median(runs["call_llamaproc"])
    return [
        Result(
            metric="close_latency.live_stream", unit="ms",
            subject=live, baseline=median(runs["live_bare"]),
            compare="abs", value=live, op="<=", target=500.0,
            subject_label="model.close() while a stream is read",
            baseline_label="response.aclose() + SIGTERM + wait",
            samples={k: v for k, v in runs.items() if k.startswith("live")},
            note="latency bound from the spec; the baseline is the bare equivalent, for context",
        ),
        Result(
            metric="close_latency.queued", unit="ms",
            subject=queued, baseline=median(runs["queued_bare"]),
            compare="abs", value=queued, op="<=", target=500.0,
            subject_label="model.close() while a stream is read and a second request is queued",
            baseline_label="both connections closed + SIGTERM + wait",
            samples={k: v for k, v in runs.items() if k.startswith("queued")},
            note="llama-server notices a closed queued connection about once a second: the second SIGTERM",
        ),
        Result(
            metric="close_latency.non_streamed", unit="ms",
            subject=call, baseline=median(runs["call_bare"]),
            compare="abs", value=call, op="<=", target=500.0,
            subject_label="model.close() during a non-streamed complete()",
            baseline_label="connection closed + SIGTERM + wait",
            samples={k: v for k, v in runs.items() if k.startswith("call")},
            note="llama-server notices a dropped non-streamed request about once a second",
        ),
        Result(
            metric="close_latency.idle", unit="ms",
            subject=idle, baseline=median(runs["idle_bare"]),
            compare="abs", value=idle, op="<=", target=100.0,
            subject_label="model.close() on an idle model", baseline_label="SIGTERM + wait",
            samples={k: v for k, v in runs.items() if k.startswith("idle")},
            note="latency bound from the spec; the baseline is the bare equivalent, for context",
        ),
    ]
