"""A process that takes memory leases from a ledger, for the multi-process ledger tests.

    python ledger_worker.py churn URL LOOP SECONDS SEED OUT  take and give back random sizes; a JSON line per try
    python ledger_worker.py hold URL LOOP MEMORY PRIORITY    take MEMORY, say "granted TOKEN", hold until killed
    python ledger_worker.py yield URL LOOP MEMORY PRIORITY   take MEMORY, say "granted TOKEN", release when asked
    python ledger_worker.py ignore URL LOOP MEMORY PRIORITY  take MEMORY, say "granted TOKEN", say "preempted" when
                                                             asked to yield, and hold on until killed
    python ledger_worker.py wait URL LOOP MEMORY PRIORITY [TIMEOUT]
                                                             wait for MEMORY (TIMEOUT s, default 30), say
                                                             "granted TOKEN" and release, or say "timeout"

URL is the ledger's (``sqlite:///path`` or ``redis://host:port/db``); LOOP is
``asyncio`` or ``trio``. The hold modes open the ledger with a 1 s TTL (so a
killed holder's lease expires quickly); churn with a longer one, so that a
busy machine never lets a held lease expire.
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
CHURN_TTL = 5.0
CHURN_TIMEOUT = 15.0


def say(line: str) -> None:
    print(line, flush=True)


async def churn(url: str, seconds: float, seed: int, out: str) -> None:
    rng = random.Random(seed)
    async with await llamaproc.open_ledger(url, ttl=CHURN_TTL, host="test") as ledger:
        # "cpu" in SQLite, "test/cpu" in Redis (a store shared by many hosts names the host)
        (capacity,) = [memory for name, memory in (await ledger.capacity()).items() if name.endswith("cpu")]
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
                lost = lease.lost
                await lease.release()
                entry = {
                    "outcome": "granted", "token": lease.token, "device": lease.device, "memory": lease.memory,
                    "granted_at": lease.granted, "released_at": released, "waited": waited, "timeout": CHURN_TIMEOUT,
                    "lost": lost,
                }  # fmt: skip
                log.write(json.dumps(entry) + "\n")


async def hold(url: str, memory: int, priority: str, mode: str, timeout: float) -> None:
    async with await llamaproc.open_ledger(url, ttl=TTL, host="test") as ledger:
        try:
            lease = await ledger.lease(memory, priority=priority, holder=mode, timeout=timeout)  # type: ignore[arg-type]
        except llamaproc.LeaseTimeoutError as e:
            say(f"timeout {type(e).__name__}")
            return
        async with lease:
            say(f"granted {lease.token}")
            if mode == "hold":
                await anyio.sleep_forever()
            if mode in ("yield", "ignore"):
                await lease.preempted()
                say("preempted" if lease.preempt_requested and not lease.lost else "lost")
            if mode == "ignore":
                await anyio.sleep_forever()
        say("released")


def main() -> None:
    mode, url, loop, *rest = sys.argv[1:]
    if mode == "churn":
        anyio.run(churn, url, float(rest[0]), int(rest[1]), rest[2], backend=loop)
    else:
        timeout = float(rest[2]) if len(rest) > 2 else (30.0 if mode == "wait" else None)
        anyio.run(hold, url, int(rest[0]), rest[1], mode, timeout, backend=loop)


if __name__ == "__main__":
    main()
