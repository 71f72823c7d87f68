"""What giving the child its parent-death signal costs: a preexec_fn (fork) against setpriv (vfork).

    python bench/spawn.py [--mb 0,400] [--rounds 40] [--server-rounds 8] [--quick]

CPython can start a child with vfork only when there is no ``preexec_fn``; with
one it forks the whole process, copying its page tables, on the calling thread
(the event loop's). The cost grows with the process's resident size, so each
measurement runs with ``--mb`` MiB of touched memory allocated first (a daemon
holding a few models' worth of state and buffers).

Two parts, each in alternating rounds, medians (and p90) reported:

1. A bare spawn of ``/bin/echo ready``: the time until ``Popen`` returns (the
   event loop is blocked that long) and until the child's line is read, for
   the old path (``preexec_fn`` setting PR_SET_PDEATHSIG), the new one
   (``setpriv --pdeathsig KILL -- sh -c CHECK``, as ``ServerProcess.start``
   builds it) and, as the floor, a spawn with no death signal at all.
2. ``load_model`` of the tiny model on the real llama-server, on each path
   (``LLAMAPROC_NO_SETPRIV=1`` forces the preexec_fn): the time ``Popen``
   took inside it, the longest stall of the event loop during the load (a
   task that sleeps 1 ms at a time measures it), and the time until the model
   is ready.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import psutil
from common import interleave, median, tiny_model, workdir

import llamaproc
from llamaproc.process import _process

CHILD = ["/bin/echo", "ready"]


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10)[-1] if len(xs) >= 2 else float("nan")


def ballast(mb: int) -> bytearray:
    """``mb`` MiB, every page written, so that they are resident and in the page tables."""
    block = bytearray(mb << 20)
    block[::4096] = b"\x01" * len(range(0, len(block), 4096))
    return block


def bare_spawn(command: list[str], preexec: Callable[[], None] | None) -> Callable[[], Awaitable[float]]:
    """One spawn of ``command``; records (Popen returned, child's line read) in ms; returns the first."""
    samples: list[tuple[float, float]] = []

    async def run() -> float:
        t0 = time.perf_counter()
        popen = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=preexec, close_fds=True,  # noqa: PLW1509
        )
        t1 = time.perf_counter()
        assert popen.stdout is not None
        line = popen.stdout.readline()
        t2 = time.perf_counter()
        popen.wait()
        popen.stdout.close()
        assert line == b"ready\n", line
        samples.append(((t1 - t0) * 1e3, (t2 - t0) * 1e3))
        return samples[-1][0]

    run.samples = samples  # type: ignore[attr-defined]
    return run


def spawn_variants() -> dict[str, Callable[[], Awaitable[float]]]:
    os.environ.pop(_process.ENV_NO_SETPRIV, None)
    setpriv_command, none = _process._spawn_command(CHILD, env=os.environ, cwd=None)
    if none is not None:
        sys.exit("setpriv with --pdeathsig is not available here: nothing to compare")
    return {
        "preexec_fn (fork)": bare_spawn(CHILD, _process._pdeathsig()),
        "setpriv + sh (vfork)": bare_spawn(setpriv_command, None),
        "no death signal (vfork)": bare_spawn(CHILD, None),
    }


class PopenTimer:
    """Times every ``subprocess.Popen`` made while it is installed (ms)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._real = subprocess.Popen

    def __enter__(self) -> PopenTimer:
        real, times = self._real, self.times

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                times.append((time.perf_counter() - t0) * 1e3)

        subprocess.Popen = timed  # type: ignore[misc]
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.Popen = self._real  # type: ignore[misc]


def load_variant(model: Path, force_preexec: bool) -> tuple[Callable[[], Awaitable[float]], dict[str, list[float]]]:
    got: dict[str, list[float]] = {"popen": [], "stall": [], "ready": []}

    async def run() -> float:
        if force_preexec:
            os.environ[_process.ENV_NO_SETPRIV] = "1"
        else:
            os.environ.pop(_process.ENV_NO_SETPRIV, None)
        stall = 0.0

        async def ticker() -> None:
            nonlocal stall
            last = time.perf_counter()
            while True:
                await anyio.sleep(0.001)
                now = time.perf_counter()
                stall = max(stall, (now - last) * 1e3 - 1.0)
                last = now

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await anyio.sleep(0.01)
            stall = 0.0
            with PopenTimer() as timer:
                t0 = time.perf_counter()
                model_ = await llamaproc.load_model(model, startup_timeout=60)
                ready = (time.perf_counter() - t0) * 1e3
            tg.cancel_scope.cancel()
        await model_.close()
        os.environ.pop(_process.ENV_NO_SETPRIV, None)
        got["popen"].append(timer.times[-1])
        got["stall"].append(stall)
        got["ready"].append(ready)
        return ready

    return run, got


def row(label: str, xs: list[float]) -> str:
    return f"  {label:<38} {median(xs):9.3f} {p90(xs):9.3f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", default="0,400", help="resident sizes to add, MiB, comma-separated")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--server-rounds", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="10 and 3 rounds")
    a = parser.parse_args()
    rounds, server_rounds = (10, 3) if a.quick else (a.rounds, a.server_rounds)
    sizes = [int(x) for x in a.mb.split(",")]
    _process._setpriv()  # the one-time lookup, outside the measurements
    me = psutil.Process()
    with workdir() as d:
        model = tiny_model(d)
        for mb in sizes:
            block = ballast(mb)
            rss = me.memory_info().rss >> 20
            print(f"\n== resident {rss} MiB ({mb} MiB added); {os.cpu_count()} CPUs; ms, median and p90")
            variants = spawn_variants()
            await interleave(variants, rounds)
            print(f"  bare spawn of {' '.join(CHILD)!r}, {rounds} rounds")
            print(f"  {'':<38} {'median':>9} {'p90':>9}")
            for name, run in variants.items():
                samples: list[tuple[float, float]] = run.samples  # type: ignore[attr-defined]
                print(row(f"{name}: Popen", [s[0] for s in samples]))
                print(row(f"{name}: line read", [s[1] for s in samples]))
            if server_rounds:
                runs = {"preexec_fn": load_variant(model, True), "setpriv": load_variant(model, False)}
                await interleave({k: v[0] for k, v in runs.items()}, server_rounds)
                print(f"  load_model(tiny) on llama-server, {server_rounds} rounds")
                for name, (_, got) in runs.items():
                    print(row(f"{name}: Popen", got["popen"]))
                    print(row(f"{name}: longest loop stall", got["stall"]))
                    print(row(f"{name}: ready", got["ready"]))
            del block


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    anyio.run(main)
