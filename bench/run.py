"""Run llamaproc's benchmarks and print a table of ratios against side-by-side baselines.

    python bench/run.py [--quick] [--only NAME[,NAME...]] [--profile] [--strict]

Writes bench/results/latest.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from bench_client import client_cpu_per_token, concurrent_streams
from bench_gguf import gguf_metadata
from bench_model import close_latency, generate_throughput, load_overhead
from common import RESULTS_DIR, Result, Settings, kill_leftovers, workdir
from daemon import notes as daemon_notes
from daemon import run_benchmarks as daemon_benchmarks
from ledger import ledger_costs
from sharded import notes as sharded_notes
from sharded import run_benchmarks as sharded_benchmarks
from upstream import upstream_client

import llamaproc

#: What the daemon benchmark found besides its rows (CPU per request, the bare relay's overhead).
DAEMON_CONTEXT: dict[str, Any] = {}
#: The sharded benchmark's recovery split (detection, restart, replay).
SHARDED_CONTEXT: dict[str, Any] = {}


async def daemon(settings: Settings) -> list[Result]:
    """bench/daemon.py: ``llamaproc serve`` against its own llama-server child."""
    path = settings.workdir / "daemon"
    path.mkdir()
    results, context = await daemon_benchmarks(path, quick=settings.quick, profile=settings.profile)
    DAEMON_CONTEXT.update(context)
    return results


async def sharded(settings: Settings) -> list[Result]:
    """bench/sharded.py: a model over local rpc workers against one process, and recovery from a lost worker."""
    path = settings.workdir / "sharded"
    path.mkdir()
    results, context = await sharded_benchmarks(path, quick=settings.quick)
    SHARDED_CONTEXT.update(context)
    return results


BENCHMARKS: dict[str, Callable[[Settings], Awaitable[list[Result]]]] = {
    "generate_throughput": generate_throughput,
    "load_overhead": load_overhead,
    "close_latency": close_latency,
    "client_cpu_per_token": client_cpu_per_token,
    "concurrent_streams": concurrent_streams,
    "gguf_metadata": gguf_metadata,
    "daemon": daemon,
    "sharded": sharded,
    "upstream_client": upstream_client,
    "ledger": ledger_costs,
}


def _num(x: float | None, unit: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf"
    digits = 1 if abs(x) >= 10 else 2
    return f"{x:,.{digits}f} {unit}"


def _value(r: Result) -> str:
    if r.compare == "ratio":
        return f"{r.value:.3f}"
    if r.compare == "diff":
        return f"{r.value:+.{1 if abs(r.value) >= 10 else 2}f} {r.unit}"
    return "-" if not r.baseline else f"{r.subject / r.baseline:.2f}"


def _target(r: Result) -> str:
    op = "≤" if r.op == "<=" else "≥"
    if r.compare == "ratio":
        return f"ratio {op} {r.target:.3g}"
    if r.compare == "diff":
        return f"Δ {op} {r.target:g} {r.unit}"
    return f"{op} {r.target:g} {r.unit}"


def table(results: list[Result], errors: dict[str, str]) -> str:
    header = ["metric", "subject", "baseline", "ratio/Δ", "target", "ok?"]
    rows = [
        [r.metric, _num(r.subject, r.unit), _num(r.baseline, r.unit), _value(r), _target(r), "yes" if r.ok else "NO"]
        for r in results
    ]
    rows += [[name, "error", "-", "-", "-", "NO"] for name in errors]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    legend = ["", "ratio/Δ: median of per-round subject/baseline ratios (Δ: differences); rounds alternate the order."]
    if any(r.compare == "abs" for r in results):
        legend.append("Rows with an absolute target are latency bounds; their ratio is subject/baseline, for context.")
    for r in results:
        legend.append(f"  {r.metric}: {r.subject_label} vs. {r.baseline_label} ({r.note})")
    return "\n".join(lines + legend)


async def run_all(names: list[str], settings: Settings) -> tuple[list[Result], dict[str, str], dict[str, float]]:
    results: list[Result] = []
    errors: dict[str, str] = {}
    durations: dict[str, float] = {}
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        gc.collect()
        t0 = time.perf_counter()
        try:
            results += await BENCHMARKS[name](settings)
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            errors[name] = traceback.format_exc()
            print(errors[name], file=sys.stderr)
        durations[name] = time.perf_counter() - t0
        print(f"  {name}: {durations[name]:.1f} s", file=sys.stderr, flush=True)
    return results, errors, durations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="llamaproc benchmarks (ratios against side-by-side baselines)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about a minute)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help=f"run only these (repeat or comma-separate): {', '.join(BENCHMARKS)}")
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile the llamaproc client (bench/results/profile_client_cpu.txt)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)

    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    if args.profile and "client_cpu_per_token" not in names:
        names.append("client_cpu_per_token")

    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    with workdir() as wd:
        settings = Settings(quick=args.quick, workdir=wd, profile=args.profile)
        try:
            results, errors, durations = anyio.run(run_all, names, settings, backend="asyncio")
        finally:
            left = kill_leftovers("llama-server", "fake_server.py", "rpc-server", "redis-server")
    elapsed = time.perf_counter() - t0

    print(table(results, errors))
    if DAEMON_CONTEXT:
        # The daemon's notes: CPU per request and token, and the floor set by a bare relay.
        print("\n".join(daemon_notes(DAEMON_CONTEXT)))
    if SHARDED_CONTEXT:
        print("\n".join(sharded_notes(SHARDED_CONTEXT)))
    print(f"\n{len(names)} benchmark(s) in {elapsed:.1f} s{' (quick)' if args.quick else ''}")
    if left:
        print(f"WARNING: killed processes left running: {left}")
        errors["leftover_processes"] = f"killed {left}"

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    report = {
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(elapsed, 2),
        "quick": args.quick,
        "benchmarks": names,
        "durations_s": {k: round(v, 2) for k, v in durations.items()},
        "llamaproc": llamaproc.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_after": os.getloadavg(),
        "results": [r.to_json() for r in results],
        "daemon_context": DAEMON_CONTEXT,
        "sharded_context": SHARDED_CONTEXT,
        "errors": errors,
        "all_ok": not errors and all(r.ok for r in results),
    }
    (RESULTS_DIR / "latest.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {RESULTS_DIR / 'latest.json'}")
    if args.profile:
        print(f"wrote {RESULTS_DIR / 'profile_client_cpu.txt'}")
    return 1 if args.strict and not report["all_ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
