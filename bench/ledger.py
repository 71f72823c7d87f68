"""What a memory lease costs: one acquire + release, and grants per second with processes contending.

    python bench/ledger.py [--quick]

On each store (a SQLite file; a real ``redis-server`` that this benchmark
starts on a free port with its own temporary directory, no persistence, the
flags the tests use, and stops at the end):

1. ``ledger_round_trip``: ``async with ledger.acquire(1): pass`` on an idle
   ledger in one process (asyncio), median and p99. The baseline is the
   store's own ``try_grant`` + ``release`` called directly on the same store,
   without the ledger front (its worker-thread hops and bookkeeping).
2. ``ledger_grants_per_s``: 8 processes, each acquiring a random size
   (1 to half the capacity, a random priority) and releasing it at once, for a
   few seconds against one capacity; total grants per second. A waiter in
   another process learns of freed memory by polling (20 ms, backing off to
   250 ms), so this is the rate under contention, not the store's raw speed.

3. ``ledger_load_cost``: ``load_model`` of the tiny model through a SQLite
   ledger (estimate from the GGUF, lease, llama-server at ``--log-verbosity 4``,
   the lease corrected from the logged buffer sizes) against the same
   ``load_model`` without a ledger, interleaved, time to a loaded model
   (``close`` not included); the median of per-round differences, and of
   ratios in the note.

Where ``redis-server`` is missing, the Redis rows are left out (with a note
on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
from common import Result, Settings, interleave, median, paired, tiny_model, workdir

import llamaproc
from llamaproc.ledger import PRIORITIES, Store, Waiter

PROCESSES = 8
CAPACITY = 100
TTL = 10.0


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100)[-1] if len(xs) >= 2 else float("nan")


@contextlib.contextmanager
def redis_server(datadir: Path) -> Iterator[str | None]:
    """A ``redis-server`` of the benchmark's own (as the tests start it); its URL, or None when it is missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        print("ledger: redis-server is not on this machine; the Redis rows are left out", file=sys.stderr)
        yield None
        return
    from port_for import get_port
    from pytest_redis.executor import RedisExecutor

    port = get_port(None)
    assert port is not None
    executor = RedisExecutor(
        executable=binary, databases=1, redis_timeout=30, loglevel="warning", host="127.0.0.1", port=port,
        save="", appendonly="no", datadir=datadir, startup_timeout=30,
    )  # fmt: skip
    executor.start()
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        if executor.running():
            executor.stop()


def open_store(url: str) -> Store:
    if url.startswith("sqlite://"):
        from llamaproc.ledger import SQLiteStore

        return SQLiteStore(Path(url[len("sqlite://") :]))
    from llamaproc.ledger._redis import RedisStore

    return RedisStore(url)


async def round_trip(url: str, n: int) -> tuple[list[float], list[float]]:
    """``n`` acquire + release through the ledger, and ``n`` try_grant + release on the store; in ms each."""
    subject: list[float] = []
    async with await llamaproc.open_ledger(url, capacity={"cpu": 2**40}, ttl=TTL, host="bench") as ledger:
        for _ in range(max(10, n // 10)):  # warm up the worker threads and the connections
            async with ledger.acquire(1):
                pass
        for _ in range(n):
            t0 = time.perf_counter()
            async with ledger.acquire(1):
                pass
            subject.append((time.perf_counter() - t0) * 1e3)
    store = open_store(url)
    device = "bench/cpu" if url.startswith("redis") else "cpu"
    baseline: list[float] = []
    try:
        for _ in range(n):
            waiter = Waiter(
                id=uuid.uuid4().hex, device=device, memory=1, priority="normal", holder="bench", pid=os.getpid(),
                host="bench",
            )  # fmt: skip
            t0 = time.perf_counter()
            grant = store.try_grant(waiter, TTL, True)
            store.release(waiter.id)
            baseline.append((time.perf_counter() - t0) * 1e3)
            assert grant.lease is not None
    finally:
        store.close()
    return subject, baseline


async def contend(url: str, seconds: float, seed: int) -> None:
    """One contending process: say ready, wait for "go" on stdin, take and give back leases, print the counts."""
    rng = random.Random(seed)
    async with await llamaproc.open_ledger(url, ttl=TTL, host="bench") as ledger:
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        grants = timeouts = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                async with ledger.acquire(rng.randint(1, CAPACITY // 2), priority=rng.choice(PRIORITIES), timeout=5):
                    grants += 1
            except llamaproc.LeaseTimeoutError:
                timeouts += 1
        print(f"{grants} {timeouts}", flush=True)


def grants_per_second(url: str, seconds: float) -> tuple[float, int]:
    """Total grants per second of PROCESSES processes contending for CAPACITY bytes, and their timeouts."""

    async def write_capacity() -> None:
        async with await llamaproc.open_ledger(url, capacity={"cpu": CAPACITY}, host="bench"):
            pass

    anyio.run(write_capacity)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(llamaproc.__file__).parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}  # fmt: skip
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--contend", url, str(seconds), str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        for n in range(PROCESSES)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None
            line = worker.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a contending process did not start: {line!r}")
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        grants = timeouts = 0
        for worker in workers:
            out, _ = worker.communicate(timeout=seconds + 60)
            if worker.returncode != 0:
                raise RuntimeError(f"a contending process failed ({worker.returncode})")
            done, timed_out = (int(x) for x in out.split())
            grants += done
            timeouts += timed_out
        return grants / seconds, timeouts
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


async def load_cost(settings: Settings) -> Result:
    """``load_model`` of the tiny model with a SQLite ledger and without, interleaved; times in ms."""
    model_path = tiny_model(settings.workdir)
    url = f"sqlite://{settings.workdir / 'ledger' / 'load.db'}"
    async with await llamaproc.open_ledger(url, capacity={"cpu": "1TiB"}, ttl=TTL, host="bench") as ledger:

        async def timed(**kwargs: Any) -> float:
            t0 = time.perf_counter()
            model = await llamaproc.load_model(model_path, **kwargs)
            dt = time.perf_counter() - t0
            await model.close()
            return dt * 1e3

        async def with_ledger() -> float:
            return await timed(ledger=ledger)

        async def without() -> float:
            return await timed()

        await with_ledger()  # warm up: the page cache, the ledger's worker threads
        await without()
        runs = await interleave({"ledger": with_ledger, "plain": without}, settings.reps(15, 4))
    diff, ratio = paired(runs["ledger"], runs["plain"], "diff"), paired(runs["ledger"], runs["plain"], "ratio")
    return Result(
        metric="ledger_load_cost[sqlite]", unit="ms",
        subject=median(runs["ledger"]), baseline=median(runs["plain"]),
        compare="diff", value=diff, op="<=", target=10.0,
        subject_label="load_model(tiny, ledger=sqlite)", baseline_label="load_model(tiny)", samples=runs,
        note=f"+{diff:.1f} ms, ratio {ratio:.2f} (medians of {len(runs['ledger'])} interleaved rounds);"
        " time to a loaded model, close not included",
    )  # fmt: skip


async def ledger_costs(settings: Settings) -> list[Result]:
    """bench/ledger.py: lease round trips and contended grants per second, on SQLite and on Redis; the cost a lease
    adds to ``load_model``."""
    n = settings.reps(2000, 300)
    seconds = settings.reps(8.0, 3.0)
    results: list[Result] = []
    path = settings.workdir / "ledger"
    (path / "redis").mkdir(parents=True)
    with redis_server(path / "redis") as redis_url:
        urls = {"sqlite": f"sqlite://{path / 'ledger.db'}"}
        if redis_url is not None:
            urls["redis"] = redis_url
        for name, url in urls.items():
            subject, baseline = await round_trip(url, n)
            results.append(Result(
                metric=f"ledger_round_trip[{name}]", unit="ms", subject=median(subject), baseline=median(baseline),
                compare="abs", target=5.0, op="<=", value=median(subject),
                subject_label="ledger.acquire + release, median", baseline_label="the store's try_grant + release",
                samples={"subject": subject, "baseline": baseline},
                note=f"{n} rounds in one process; p99 {p99(subject):.2f} ms (store alone {p99(baseline):.2f} ms)",
            ))  # fmt: skip
            results.append(Result(
                metric=f"ledger_round_trip_p99[{name}]", unit="ms", subject=p99(subject), baseline=p99(baseline),
                compare="abs", target=20.0, op="<=", value=p99(subject),
                subject_label="ledger.acquire + release, p99", baseline_label="the store's try_grant + release",
                note="the same samples",
            ))  # fmt: skip
            rate, timeouts = await anyio.to_thread.run_sync(grants_per_second, url, seconds)
            results.append(Result(
                metric=f"ledger_grants_per_s[{name}]", unit="grants/s", subject=rate, baseline=None,
                compare="abs", target=20.0, op=">=", value=rate,
                subject_label=f"{PROCESSES} processes contending for {CAPACITY} bytes", baseline_label="-",
                note=f"{seconds:g} s, sizes 1-{CAPACITY // 2}, released at once; {timeouts} timeouts (5 s)",
            ))  # fmt: skip
    results.append(await load_cost(settings))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="what a memory lease costs, on SQLite and on Redis, and what it adds to load_model")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter contention")
    parser.add_argument("--contend", nargs=3, metavar=("URL", "SECONDS", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.contend:
        url, seconds, seed = args.contend
        anyio.run(contend, url, float(seconds), int(seed))
        return 0
    t0 = time.perf_counter()
    with workdir() as wd:
        results: list[Any] = anyio.run(ledger_costs, Settings(quick=args.quick, workdir=wd), backend="asyncio")
    for r in results:
        base = "" if r.baseline is None else f" vs {r.baseline:8.3f} {r.unit}"
        print(f"{r.metric:30} {r.subject:9.3f} {r.unit}{base}  (target {r.op} {r.target:g}: {'ok' if r.ok else 'NO'})")
        print(f"{'':30} {r.note}")
    print(f"in {time.perf_counter() - t0:.1f} s{' (quick)' if args.quick else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
