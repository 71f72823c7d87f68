"""A process that takes memory leases from a SQLite ledger, for the multi-process ledger tests.

    python ledger_worker.py churn DB SECONDS SEED OUT   take and give back random sizes; one JSON line per try in OUT
    python ledger_worker.py hold DB MEMORY PRIORITY     take MEMORY, say "granted TOKEN", hold until killed
    python ledger_worker.py yield DB MEMORY PRIORITY    take MEMORY, say "granted TOKEN", release when asked to yield
    python ledger_worker.py wait DB MEMORY PRIORITY     wait for MEMORY (30 s at most), say "granted TOKEN", release

Every process opens the ledger with a 1 s TTL (so a killed holder's lease expires quickly).
"""

from __future__ import annotations

import json
import random
import sys
import time

import anyio

import llamaproc
from llamaproc.ledger import PRIORITIES

TTL = 1.0
CHURN_TIMEOUT = 15.0


def say(line: str) -> None:
    print(line, flush=True)


async def churn(db: str, seconds: float, seed: int, out: str) -> None:
    rng = random.Random(seed)
    async with await llamaproc.open_ledger(f"sqlite://{db}", ttl=TTL) as ledger:
        capacity = (await ledger.capacity())["cpu"]
        end = time.monotonic() + seconds
        with open(out, "w") as log:
            while time.monotonic() < end:
                memory = rng.randint(1, capacity // 2)
                priority = rng.choice(PRIORITIES)
                started = time.monotonic()
                try:
                    lease = await ledger.lease(memory, priority=priority, timeout=CHURN_TIMEOUT)
                except llamaproc.LeaseTimeoutError:
                    entry = {"outcome": "timeout", "waited": time.monotonic() - started, "timeout": CHURN_TIMEOUT}
                    log.write(json.dumps(entry) + "\n")
                    continue
                waited = time.monotonic() - started
                await anyio.sleep(rng.uniform(0.002, 0.03))  # "use" the memory
                released = time.time()  # the memory is no longer used from here on (same clock as the store's)
                await lease.release()
                entry = {
                    "outcome": "granted", "token": lease.token, "device": lease.device, "memory": lease.memory,
                    "granted_at": lease.granted, "released_at": released, "waited": waited, "timeout": CHURN_TIMEOUT,
                }  # fmt: skip
                log.write(json.dumps(entry) + "\n")


async def hold(db: str, memory: int, priority: str, mode: str) -> None:
    async with await llamaproc.open_ledger(f"sqlite://{db}", ttl=TTL) as ledger:
        timeout = 30.0 if mode == "wait" else None
        async with ledger.acquire(memory, priority=priority, holder=mode, timeout=timeout) as lease:  # type: ignore[arg-type]
            say(f"granted {lease.token}")
            if mode == "hold":
                await anyio.sleep_forever()
            if mode == "yield":
                await lease.preempted()
                say("preempted" if lease.preempt_requested else "lost")
        say("released")


def main() -> None:
    mode, db, *rest = sys.argv[1:]
    if mode == "churn":
        anyio.run(churn, db, float(rest[0]), int(rest[1]), rest[2])
    else:
        anyio.run(hold, db, int(rest[0]), rest[1], mode)


if __name__ == "__main__":
    main()
