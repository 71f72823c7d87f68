"""Benchmarks of sharded models: local ggml-rpc-server workers against one process, and recovery.

    python bench/sharded.py [--quick] [--strict]

Uses tiny generated models of 8 layers and local workers (``llamaproc.start_worker()``),
all on this machine's CPU. Writes ``bench/results/sharded.json``.

- ``sharded_throughput[width]``: tokens/s of one greedy stream (200 tokens) of a
  model split over 2 local rpc workers ÷ the same model on one process, median of
  per-round ratios; the two models are loaded side by side and the rounds
  alternate (the order rotates), so both see the same machine state. There is no
  target: on one machine the split only adds work (every layer's activations
  cross a socket twice per token), and the row shows how much at each width.
- ``recovery[kill]``: 3 workers, one SIGKILLed after 100 of 300 tokens.
  ``recovery[stop]``: the same with SIGSTOP and ``stall_timeout=1.0``. The target
  is on the detection time of ``stream.reshards[0]`` (≤ 0.5 s for a dead worker,
  ≤ stall_timeout + 0.5 s for a hung one); below the table, the median of the
  whole split (detection, restart, replay) and the time measured here from the
  signal to the first token of the resumed stream. For a hung worker the restart
  includes the probe deadline it misses (``PROBE_TIMEOUT``, 1 s).

Every worker is sent SIGCONT and closed at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from common import Result, interleave, kill_leftovers, median, paired, stream_rate, write_report

import llamaproc
from llamaproc.testing import write_tiny_model

PROMPT = "Once upon a time"
N_LAYERS = 8
#: Tokens per stream of the recovery rows ...
TOKENS = 300
#: ... and of the throughput rows (fewer: a split stream of the wide model runs at about 20 tokens/s here).
THROUGHPUT_TOKENS = 200
#: The signal is sent once the stream has delivered this many tokens.
FAULT_AT = 100
#: The stall timeout of the SIGSTOP case.
STALL_TIMEOUT = 1.0
#: Model widths of the throughput rows: (n_embd, n_head, n_ff).
WIDTHS = {64: (64, 4, 128), 512: (512, 8, 1024)}


def model_file(workdir: Path, n_embd: int) -> Path:
    path = workdir / f"tiny{N_LAYERS}x{n_embd}.gguf"
    if not path.exists():
        embd, head, ff = WIDTHS[n_embd]
        write_tiny_model(path, n_layers=N_LAYERS, n_embd=embd, n_head=head, n_ff=ff, seed=3)
    return path


@contextlib.asynccontextmanager
async def local_workers() -> AsyncIterator[list[llamaproc.RpcWorker]]:
    """A list to start workers into; every one is resumed (if stopped) and closed at the end."""
    started: list[llamaproc.RpcWorker] = []
    try:
        yield started
    finally:
        with anyio.CancelScope(shield=True):
            for w in started:
                if w.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.pid, signal.SIGCONT)
                await w.close()


async def _stream(model: llamaproc.TextModel, n: int = THROUGHPUT_TOKENS) -> float:
    """Tokens/s of one greedy stream of ``n`` tokens."""
    return await stream_rate(model, PROMPT, n)


async def throughput(workdir: Path, n_embd: int, quick: bool) -> Result:
    """2 local workers vs. one process, the same model, streams in alternating rounds."""
    path = model_file(workdir, n_embd)
    async with local_workers() as ws:
        ws += [await llamaproc.start_worker() for _ in range(2)]
        single = await llamaproc.load_model(path)
        sharded = await llamaproc.load_model(path, workers=ws, split="uniform")
        async with single, sharded:

            async def one() -> float:
                return await _stream(single)

            async def split() -> float:
                return await _stream(sharded)

            await _stream(single, 16)  # warm-up
            await _stream(sharded, 16)
            variants = {"sharded": split, "one_process": one}
            rounds = 2 if quick else 4
            tps = await interleave(variants, rounds)
            layout = ", ".join(f"{len(s.layers)}" for s in sharded.layout)
    return Result(
        metric=f"sharded_throughput[n_embd={n_embd}]",
        unit="tok/s",
        subject=median(tps["sharded"]),
        baseline=median(tps["one_process"]),
        compare="ratio",
        target=0.0,
        op=">=",
        value=paired(tps["sharded"], tps["one_process"], "ratio"),
        subject_label="greedy stream over 2 local rpc workers",
        baseline_label="the same model on one process",
        samples=tps,
        note=f"{THROUGHPUT_TOKENS} tokens, {N_LAYERS} layers, layers per worker {layout} (+ output), {rounds} rounds; no target",
    )


async def recover_once(path: Path, how: signal.Signals, stall_timeout: float) -> dict[str, float]:
    """One stream over 3 workers, ``how`` sent to the middle one after FAULT_AT tokens."""
    async with local_workers() as ws:
        ws += [await llamaproc.start_worker() for _ in range(3)]
        victim = ws[1]
        async with await llamaproc.load_model(path, workers=ws, stall_timeout=stall_timeout) as model:
            arrivals: list[float] = []
            sent = math.nan
            stream = model.generate(PROMPT, max_tokens=TOKENS, temperature=0.0)
            async with stream:
                async for _ in stream:
                    arrivals.append(time.perf_counter())
                    if len(arrivals) == FAULT_AT:
                        os.kill(victim.pid, how)
                        sent = time.perf_counter()
            if len(arrivals) != TOKENS:
                raise RuntimeError(f"{len(arrivals)} tokens, expected {TOKENS}")
            if len(stream.reshards) != 1 or stream.reshards[0].lost != [victim.address]:
                raise RuntimeError(f"expected one reshard losing {victim.address}: {stream.reshards}")
            r = stream.reshards[0]
            return {
                "detect_s": r.detect_seconds,
                "restart_s": r.restart_seconds,
                "replay_s": r.replay_seconds,
                "reshard_s": r.seconds,
                # The first token of the resumed stream is the one at index after_tokens.
                "signal_to_token_s": arrivals[r.after_tokens] - sent,
                "after_tokens": float(r.after_tokens),
            }


async def recovery(workdir: Path, quick: bool, context: dict[str, Any]) -> list[Result]:
    path = model_file(workdir, 64)
    cases = {
        "kill": (signal.SIGKILL, 10.0, 0.5, "SIGKILL"),
        "stop": (signal.SIGSTOP, STALL_TIMEOUT, STALL_TIMEOUT + 0.5, f"SIGSTOP, stall_timeout={STALL_TIMEOUT:g}"),
    }
    reps = 2 if quick else 3
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in cases}
    for _ in range(reps):  # the cases alternate
        for name, (how, stall, _target, _label) in cases.items():
            for key, value in (await recover_once(path, how, stall)).items():
                samples[name].setdefault(key, []).append(value)
    results = []
    for name, (_how, _stall, target, label) in cases.items():
        s = samples[name]
        context[f"recovery[{name}]"] = {key: round(median(v), 3) for key, v in s.items()}
        results.append(
            Result(
                metric=f"recovery[{name}].detect",
                unit="s",
                subject=median(s["detect_s"]),
                baseline=None,
                compare="abs",
                target=target,
                op="<=",
                value=median(s["detect_s"]),
                subject_label=f"detection of a worker lost to {label}",
                baseline_label="-",
                samples=s,
                note=f"3 workers, signal after {FAULT_AT} of {TOKENS} tokens, median of {reps}",
            )
        )
    return results


async def run_benchmarks(workdir: Path, *, quick: bool) -> tuple[list[Result], dict[str, Any]]:
    context: dict[str, Any] = {}
    results = [await throughput(workdir, n_embd, quick) for n_embd in WIDTHS]
    results += await recovery(workdir, quick, context)
    return results, context


# --- the table -----------------------------------------------------------------------------------


def _num(x: float | None, unit: str) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:,.{0 if abs(x) >= 100 else 2}f} {unit}"


def table(results: list[Result], context: dict[str, Any]) -> str:
    header = ["metric", "subject", "baseline", "ratio", "target", "ok?"]
    rows = []
    for r in results:
        if r.compare == "ratio":
            rows.append([r.metric, _num(r.subject, r.unit), _num(r.baseline, r.unit), f"{r.value:.3f}", "-", "-"])
        else:
            op = "≤" if r.op == "<=" else "≥"
            rows.append([r.metric, _num(r.subject, r.unit), "-", "-", f"{op} {r.target:g} {r.unit}",
                         "yes" if r.ok else "NO"])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("ratio: median of per-round ratios; rounds interleaved, order rotating.")
    for r in results:
        lines.append(f"  {r.metric}: {r.subject_label} vs. {r.baseline_label} ({r.note})")
    return "\n".join(lines + notes(context))


def notes(context: dict[str, Any]) -> list[str]:
    """The recovery split below the table (medians, seconds)."""
    lines = []
    for key, m in context.items():
        if key.startswith("recovery["):
            lines.append(
                f"{key} medians: detect {m['detect_s']:.3f} s, restart {m['restart_s']:.3f} s, "
                f"replay {m['replay_s']:.3f} s (reshard {m['reshard_s']:.3f} s); "
                f"signal to first resumed token {m['signal_to_token_s']:.3f} s"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sharded model benchmarks (rpc workers vs. one process, recovery)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)

    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="llamaproc-bench-sharded-") as d:
            results, context = anyio.run(lambda: run_benchmarks(Path(d), quick=args.quick))
    finally:
        left = kill_leftovers("rpc-server", "llama-server")
        if left:
            print(f"WARNING: killed processes left running: {left}", file=sys.stderr)
    elapsed = time.perf_counter() - t0

    print(table(results, context))
    print(f"\nin {elapsed:.1f} s{' (quick)' if args.quick else ''}")
    report = write_report("sharded", results, context, started=started, elapsed=elapsed, quick=args.quick)
    return 1 if args.strict and not report["all_ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
