"""Benchmarks of ``llamaproc serve``: the daemon against the llama-server it runs, side by side.

    python bench/daemon.py [--quick] [--profile] [--strict]

Starts ``python -m llamaproc serve`` as a subprocess (temporary config, state
dir and tiny model), loads its models, and sends the same request both through
the daemon and directly to the daemon's own llama-server child (its port from
``GET /api/models``), with the same client code on both sides, in alternating
rounds (the order rotates each round). Writes ``bench/results/daemon.json``.

- ``ttft_overhead`` (HTTP and Unix socket): time to first token through the
  daemon minus direct, median of per-round differences; target ≤ 1 ms.
- ``concurrent_16``: aggregate tokens/s of 16 concurrent streams through the
  daemon ÷ direct, median of per-round ratios; target ≥ 0.95. Measured twice:
  with ``parallel = 16`` every stream decodes at once in one batch, which is
  the highest token rate the daemon has to relay, and on 2 cores every CPU
  cycle the daemon spends per token is taken from llama-server: the strict
  case. With ``parallel = 4`` (a usual slot count for 2 cores) 12 of the 16
  streams wait, in the daemon's admission queue or in llama-server's own, so
  the hand-over from one stream to the next is measured too.
- ``loaded_first_token`` (HTTP and socket): the time to first token through the
  daemon itself, median and p95; the spec gives it as a bound (≤ 20 ms).

The client opens a fresh connection for every request on both sides and sends
``Connection: close`` (llama-server closes the connection after every streamed
answer, so a keep-alive client could not reuse it). The first token is the
first SSE event whose ``delta.content`` is non-empty (HTTP) or the first
``token`` event with non-empty text (socket; its baseline is the direct HTTP
request, the only direct way there is). Below the table: the daemon's and
llama-server's CPU time per request and per token (from
``/proc/PID/task/*/schedstat``), the cost that the ratios only show indirectly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
sys.path.insert(0, str(REPO / "tests" / "integration"))

from common import Result, free_port, interleave, kill_leftovers, median, paired, write_report
from daemon_helpers import Daemon, llama_servers_of, start_daemon, stop_daemon, write_config

from llamaproc.testing import write_tiny_model

MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]
#: Streams of the concurrency benchmark.
STREAMS = 16


# --- results -------------------------------------------------------------------------------------


def percentile(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1), linear between the closest ranks."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# --- the client: the same code for the daemon and for llama-server -------------------------------


@dataclass
class Stream:
    """What one streamed request gave: seconds to the first token and to the end, tokens."""

    first_token: float
    total: float
    tokens: int


_TOKEN = b'"content":"'
_EMPTY = b'"content":""'


def _http_request(path: str, body: bytes, host: str, port: int, key: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nConnection: close\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def child_key(pid: int) -> str:
    """The key a llama-server child of the daemon answers to (in its environment, readable by its user only).

    The benchmark sends it in every request, to the daemon too (which ignores it: it has no keys of its
    own here), so that every variant sends the same bytes.
    """
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"LLAMA_API_KEY="))


async def http_stream(host: str, port: int, body: bytes, key: str, path: str = "/v1/chat/completions") -> Stream:
    """POST ``body`` on a fresh connection and read the SSE answer to its end (the server closes).

    Counts as tokens the ``data:`` lines with a non-empty ``"content"``; the
    body is HTTP/1.1 chunked on both sides, and both servers write whole events
    per chunk, so the lines are whole.
    """
    request = _http_request(path, body, host, port, key)
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        first = 0.0
        tokens = 0
        status: bytes | None = None
        rest = b""
        while data := await reader.read(65536):
            if status is None:
                status = data[9:12]
            if rest:
                data = rest + data
            end = data.rfind(b"\n")
            if end < 0:
                rest = data
                continue
            rest = data[end + 1 :]
            n = data.count(_TOKEN, 0, end) - data.count(_EMPTY, 0, end)
            if n and not tokens:
                first = time.perf_counter() - t0
            tokens += n
        total = time.perf_counter() - t0
    finally:
        writer.close()
    if status != b"200" or not tokens:
        raise RuntimeError(f"bad answer from {host}:{port}: status {status!r}, {tokens} tokens")
    return Stream(first, total, tokens)


async def socket_stream(path: str, request: dict[str, Any]) -> Stream:
    """Send one request line over a fresh Unix socket connection; read events to ``done``."""
    line = (json.dumps(request) + "\n").encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(line)
        first = 0.0
        tokens = 0
        while raw := await reader.readline():
            event = json.loads(raw)
            kind = event.get("event")
            if kind == "token":
                if event.get("text"):
                    if not tokens:
                        first = time.perf_counter() - t0
                    tokens += 1
            elif kind == "done":
                break
            else:
                raise RuntimeError(f"socket answer: {event}")
        total = time.perf_counter() - t0
    finally:
        writer.close()
    if not tokens:
        raise RuntimeError("socket answer without tokens")
    return Stream(first, total, tokens)


def chat_body(model: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,  # the same number of tokens every time
        "stream": True,
    }


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far, in ns resolution (``/proc/PID/task/*/schedstat``)."""
    total = 0
    with os.scandir(f"/proc/{pid}/task") as tasks:
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task.name}/schedstat", "rb") as f:
                    total += int(f.read().split(None, 1)[0])
            except (OSError, ValueError):
                pass  # a thread that just ended
    return total / 1e9


class CpuMeter:
    """Adds up the CPU time that processes spend during measured calls, per variant."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.seconds: dict[tuple[str, str], float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, variant: str, call: Callable[[], Awaitable[float]]) -> Callable[[], Awaitable[float]]:
        async def measured() -> float:
            before = {who: cpu_seconds(pid) for who, pid in self.pids.items()}
            value = await call()
            for who, pid in self.pids.items():
                key = (variant, who)
                self.seconds[key] = self.seconds.get(key, 0.0) + cpu_seconds(pid) - before[who]
            self.calls[variant] = self.calls.get(variant, 0) + 1
            return value

        return measured

    def per_call(self, variant: str, who: str) -> float:
        return self.seconds.get((variant, who), 0.0) / max(1, self.calls.get(variant, 0))


# --- the daemon under test -----------------------------------------------------------------------

#: The configured models: name -> slots. The same GGUF file for both.
MODELS = {"tiny": 4, "tiny16": 16}
SLOT_CTX = 512  # the chat prompt (~40 tokens) + up to 256 generated tokens fit in a slot


@dataclass
class Child:
    pid: int
    port: int
    key: str


@dataclass
class Setup:
    daemon: Daemon
    host: str
    port: int
    socket: str
    children: dict[str, Child]


@contextlib.contextmanager
def daemon_running(workdir: Path) -> Iterator[Setup]:
    """The daemon with every model of MODELS loaded; stopped (leftovers killed, with a warning) on exit."""
    model = write_tiny_model(workdir / "tiny.gguf", context_length=SLOT_CTX)
    config = write_config(
        workdir / "serve.toml",
        {name: {"path": model, "parallel": n, "ctx_size": SLOT_CTX * n} for name, n in MODELS.items()},
        max_loaded_models=len(MODELS),
        queue_size=64,
    )
    daemon = start_daemon(config, workdir / "state", socket=workdir / "serve.sock")
    servers: list[int] = []
    try:
        children: dict[str, Child] = {}
        with httpx.Client(base_url=daemon.http, trust_env=False, timeout=60.0) as http:
            for name in MODELS:
                http.post(f"/api/models/{name}/load").raise_for_status()
            for status in http.get("/api/models").json()["models"]:
                pid = int(status["pid"])
                children[status["name"]] = Child(pid, int(status["port"]), child_key(pid))
        servers = llama_servers_of(daemon.pid)
        host, port = daemon.http.removeprefix("http://").rsplit(":", 1)
        assert daemon.socket is not None
        yield Setup(daemon, host, int(port), daemon.socket, children)
    finally:
        code = stop_daemon(daemon, timeout=30.0)
        left = [pid for pid in servers if _alive(pid)]
        for pid in left:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        if code != 0 or left:
            print(
                f"WARNING: llamaproc serve exited with code {code}; killed llama-server left running: {left}",
                file=sys.stderr,
            )


@contextlib.contextmanager
def relay_running(port: int, upstream: int) -> Iterator[None]:
    """bench/relay.py on ``port`` in front of ``upstream``, for the duration of the block."""
    relay = subprocess.Popen(
        [sys.executable, str(BENCH_DIR / "relay.py"), str(port), str(upstream)], stdout=subprocess.PIPE
    )
    try:
        assert relay.stdout is not None
        if relay.stdout.readline().strip() != b"ready":
            raise RuntimeError("bench/relay.py did not start")
        yield
    finally:
        relay.kill()
        relay.wait()


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


# --- profiling (optional) ------------------------------------------------------------------------


@contextlib.contextmanager
def profiled(pid: int, name: str, enabled: bool) -> Iterator[None]:
    """``py-spy record`` of ``pid`` while the block runs (collapsed stacks in bench/results/).

    The profiler takes CPU from the 2 cores: the figures of a profiled run are not comparable.
    """
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not enabled or not os.access(spy, os.X_OK):
        if enabled:
            print("py-spy not found: no profile", file=sys.stderr)
        yield
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"daemon_profile_{name}.txt"
    proc = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "500", "--gil", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.5)  # attach
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if not out.exists():
            print(f"py-spy failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}", file=sys.stderr)
        else:
            print(f"wrote {out}", file=sys.stderr)


# --- the benchmarks ------------------------------------------------------------------------------


async def ttft(setup: Setup, quick: bool, profile: bool, context: dict[str, Any]) -> list[Result]:
    """Time to first token: direct, through the daemon's HTTP API, through its socket."""
    name = "tiny"
    child = setup.children[name]
    max_tokens = 4
    body = json.dumps(chat_body(name, max_tokens)).encode()
    request = {"id": "1", "op": "chat", **chat_body(name, max_tokens)}
    del request["stream"]
    meter = CpuMeter({"daemon": setup.daemon.pid, "llama-server": child.pid})

    async def direct() -> float:
        return (await http_stream(setup.host, child.port, body, child.key)).first_token

    async def via_http() -> float:
        return (await http_stream(setup.host, setup.port, body, child.key)).first_token

    async def via_socket() -> float:
        return (await socket_stream(setup.socket, request)).first_token

    relay_port = free_port()

    async def via_relay() -> float:
        return (await http_stream(setup.host, relay_port, body, child.key)).first_token

    variants = {"direct": direct, "daemon_http": via_http, "daemon_socket": via_socket, "bare_relay": via_relay}
    with relay_running(relay_port, child.port):
        await interleave(variants, 20)  # warm-up: connections, caches, llama-server's prompt cache
        rounds = 100 if quick else 600
        gc.collect()
        gc.disable()
        try:
            with profiled(setup.daemon.pid, "ttft", profile):
                measured = {k: meter.wrap(k, v) for k, v in variants.items() if k != "bare_relay"}
                measured["bare_relay"] = via_relay
                ms = {k: [v * 1e3 for v in vs] for k, vs in (await interleave(measured, rounds)).items()}
        finally:
            gc.enable()
    context["bare_relay_ttft_overhead_ms"] = round(paired(ms["bare_relay"], ms["direct"], "diff"), 3)
    context["cpu_ms_per_request"] = {
        variant: {who: round(meter.per_call(variant, who) * 1e3, 3) for who in meter.pids}
        for variant in variants
        if variant != "bare_relay"
    }
    note = f"chat stream, max_tokens {max_tokens}, fresh connection per request, {rounds} rounds"
    results = []
    for sub, label in (("daemon_http", "daemon HTTP"), ("daemon_socket", "daemon socket")):
        results.append(
            Result(
                metric=f"ttft_overhead[{sub.removeprefix('daemon_')}]",
                unit="ms",
                subject=median(ms[sub]),
                baseline=median(ms["direct"]),
                compare="diff",
                target=1.0,
                op="<=",
                value=paired(ms[sub], ms["direct"], "diff"),
                subject_label=f"TTFT via {label}",
                baseline_label="TTFT direct to its llama-server (HTTP)",
                samples={sub: ms[sub], "direct": ms["direct"]},
                note=note,
            )
        )
    for sub, label in (("daemon_http", "http"), ("daemon_socket", "socket")):
        for q, stat in ((0.5, "median"), (0.95, "p95")):
            results.append(
                Result(
                    metric=f"loaded_first_token[{label}, {stat}]",
                    unit="ms",
                    subject=percentile(ms[sub], q),
                    baseline=percentile(ms["direct"], q),
                    compare="abs",
                    target=20.0,
                    op="<=",
                    value=percentile(ms[sub], q),
                    subject_label=f"TTFT via daemon {label}",
                    baseline_label="direct",
                    note=note + "; the same samples as ttft_overhead",
                )
            )
    return results


async def concurrent(setup: Setup, name: str, quick: bool, profile: bool, context: dict[str, Any]) -> Result:
    """Aggregate tokens/s of STREAMS concurrent streams of model ``name``, through the daemon and direct."""
    child = setup.children[name]
    parallel = MODELS[name]
    max_tokens = 128
    body = json.dumps(chat_body(name, max_tokens)).encode()
    meter = CpuMeter({"daemon": setup.daemon.pid, "llama-server": child.pid})

    async def run(port: int) -> float:
        t0 = time.perf_counter()
        streams = await asyncio.gather(*(http_stream(setup.host, port, body, child.key) for _ in range(STREAMS)))
        elapsed = time.perf_counter() - t0
        tokens = sum(s.tokens for s in streams)
        if tokens != STREAMS * max_tokens:
            raise RuntimeError(f"{tokens} tokens, expected {STREAMS * max_tokens}")
        return tokens / elapsed

    async def direct() -> float:
        return await run(child.port)

    async def via_http() -> float:
        return await run(setup.port)

    variants = {"direct": direct, "daemon_http": via_http}
    await interleave(variants, 1)
    if parallel >= STREAMS:
        rounds = 6 if quick else 36
    else:
        rounds = 4 if quick else 20
    gc.collect()
    with profiled(setup.daemon.pid, f"concurrent_p{parallel}", profile):
        tps = await interleave({k: meter.wrap(k, v) for k, v in variants.items()}, rounds)
    tokens = STREAMS * max_tokens
    context[f"cpu_us_per_token[parallel={parallel}]"] = {
        variant: {who: round(meter.per_call(variant, who) / tokens * 1e6, 2) for who in meter.pids}
        for variant in variants
    }
    return Result(
        metric=f"concurrent_{STREAMS}[parallel={parallel}]",
        unit="tok/s",
        subject=median(tps["daemon_http"]),
        baseline=median(tps["direct"]),
        compare="ratio",
        target=0.95,
        op=">=",
        value=paired(tps["daemon_http"], tps["direct"], "ratio"),
        subject_label=f"{STREAMS} concurrent chat streams via daemon HTTP",
        baseline_label="the same, direct to its llama-server",
        samples=tps,
        note=f"max_tokens {max_tokens} each, {rounds} rounds",
    )


async def run_benchmarks(workdir: Path, *, quick: bool, profile: bool) -> tuple[list[Result], dict[str, Any]]:
    context: dict[str, Any] = {}
    with daemon_running(workdir) as setup:
        kids = ", ".join(f"{n}: pid {c.pid} port {c.port}" for n, c in setup.children.items())
        print(f"daemon pid {setup.daemon.pid} {setup.daemon.http}; llama-server {kids}", file=sys.stderr)
        results = await ttft(setup, quick, profile, context)
        for name in MODELS:
            results.append(await concurrent(setup, name, quick, profile, context))
    return results, context


# --- the table -----------------------------------------------------------------------------------


def _num(x: float | None, unit: str) -> str:
    if x is None or math.isnan(x):
        return "-"
    digits = 0 if abs(x) >= 1000 else 1 if abs(x) >= 100 else 2
    return f"{x:,.{digits}f} {unit}"


def _value(r: Result) -> str:
    if r.compare == "ratio":
        return f"{r.value:.3f}"
    if r.compare == "diff":
        return f"{r.value:+.3f} {r.unit}"
    return "-"


def _target(r: Result) -> str:
    op = "≤" if r.op == "<=" else "≥"
    if r.compare == "ratio":
        return f"ratio {op} {r.target:g}"
    if r.compare == "diff":
        return f"Δ {op} {r.target:g} {r.unit}"
    return f"{op} {r.target:g} {r.unit}"


def table(results: list[Result], context: dict[str, Any]) -> str:
    header = ["metric", "subject", "baseline", "ratio/Δ", "target", "ok?"]
    rows = [
        [r.metric, _num(r.subject, r.unit), _num(r.baseline, r.unit), _value(r), _target(r), "yes" if r.ok else "NO"]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [
        "",
        "ratio/Δ: median of per-round ratios (Δ: differences); rounds interleaved, order rotating.",
        "loaded_first_token: a bound on the daemon's own TTFT (median, p95); baseline column: direct TTFT.",
    ]
    seen = set()
    for r in results:
        key = r.metric.split("[")[0] if r.compare != "ratio" else r.metric
        if key not in seen:
            seen.add(key)
            lines.append(f"  {key}: {r.subject_label} vs. {r.baseline_label} ({r.note})")
    return "\n".join(lines + notes(context))


def notes(context: dict[str, Any]) -> list[str]:
    """The lines below the table: the bare relay's overhead, CPU time per request and per token."""
    lines = []
    if "bare_relay_ttft_overhead_ms" in context:
        lines.append(
            f"floor: a bare asyncio byte relay (bench/relay.py, upstream connection opened ahead) adds "
            f"{context['bare_relay_ttft_overhead_ms']:+.3f} ms to the same TTFT, measured in the same rounds."
        )
    cpu = context.get("cpu_ms_per_request", {})
    if cpu:
        lines.append("CPU time from /proc/PID/task/*/schedstat, all threads (the daemon's during direct requests:")
        lines.append("  its idle work and reading the child's log lines).")
        lines.append(
            "CPU ms per TTFT request (max_tokens 4): "
            + "; ".join(f"{v}: daemon {c['daemon']:.2f}, llama-server {c['llama-server']:.2f}" for v, c in cpu.items())
        )
    for key, per in context.items():
        if key.startswith("cpu_us_per_token"):
            lines.append(
                f"CPU µs per token {key.removeprefix('cpu_us_per_token')}: "
                + "; ".join(
                    f"{v}: daemon {c['daemon']:.1f}, llama-server {c['llama-server']:.1f}" for v, c in per.items()
                )
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="llamaproc serve benchmarks (daemon vs. direct llama-server)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (under a minute)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the daemon during each benchmark (bench/results/daemon_profile_*.txt)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)

    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="llamaproc-bench-daemon-") as d:
            results, context = asyncio.run(run_benchmarks(Path(d), quick=args.quick, profile=args.profile))
    finally:
        left = kill_leftovers("llama-server", "llamaproc serve")
        if left:
            print(f"WARNING: killed processes left running: {left}", file=sys.stderr)
    elapsed = time.perf_counter() - t0

    print(table(results, context))
    print(f"\nin {elapsed:.1f} s{' (quick)' if args.quick else ''}{' (profiled)' if args.profile else ''}")
    report = write_report("daemon", results, context, started=started, elapsed=elapsed, quick=args.quick, profiled=args.profile, models=MODELS)
    return 1 if args.strict and not report["all_ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
