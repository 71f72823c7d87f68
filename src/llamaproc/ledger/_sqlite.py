"""The SQLite store: a ledger shared by the processes of one host through one database file.

Every method is one ``BEGIN IMMEDIATE`` transaction (it takes the write lock
at once, so two processes never both read the free memory and both grant).
The file is in WAL mode with a busy timeout: readers do not block writers and a
writer waits for the lock instead of failing. The clock is the host's
(``time.time()``), shared by every process on it. One connection per store,
used by one thread at a time under a lock (the ledger calls from worker
threads and its renewal thread).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ClosedError, LedgerError
from ._records import PRIORITIES, Grant, LeaseRecord, Renewal, Waiter, rank

__all__ = ["SQLiteStore"]

T = TypeVar("T")

#: How long a transaction waits for another process's write lock before failing.
BUSY_TIMEOUT = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS capacity (device TEXT PRIMARY KEY, memory INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY, token INTEGER NOT NULL, device TEXT NOT NULL, memory INTEGER NOT NULL,
    rank INTEGER NOT NULL, holder TEXT NOT NULL, pid INTEGER NOT NULL, host TEXT NOT NULL,
    granted REAL NOT NULL, expires REAL NOT NULL, preempt_requested REAL
);
CREATE INDEX IF NOT EXISTS leases_device ON leases (device);
CREATE TABLE IF NOT EXISTS waiters (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, device TEXT NOT NULL, memory INTEGER NOT NULL,
    rank INTEGER NOT NULL, holder TEXT NOT NULL, pid INTEGER NOT NULL, host TEXT NOT NULL,
    arrival REAL NOT NULL, expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS waiters_order ON waiters (device, rank, seq);
"""

_LEASE_COLUMNS = "id, token, device, memory, rank, holder, pid, host, granted, expires, preempt_requested"


class SQLiteStore:
    """A :class:`~llamaproc.ledger._records.Store` in one SQLite file (created with its directory if missing)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise LedgerError(f"cannot open the ledger database {self.path}: {e}") from e
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._transaction() as db:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
        except (sqlite3.Error, LedgerError) as e:
            self._db.close()
            raise LedgerError(f"cannot open the ledger database {self.path}: {e}") from e

    # --- transactions ---------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction under the store's lock; sqlite3 errors become LedgerError."""
        with self._lock:
            if self._closed:
                raise ClosedError("the ledger store is closed")
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise LedgerError(f"ledger database {self.path}: {e}") from e
            try:
                yield db
            except BaseException as e:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(e, sqlite3.Error):
                    raise LedgerError(f"ledger database {self.path}: {e}") from e
                raise
            else:
                try:
                    db.execute("COMMIT")
                except sqlite3.Error as e:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                    raise LedgerError(f"ledger database {self.path}: {e}") from e

    def _run(self, body: Callable[[sqlite3.Connection, float], T]) -> T:
        with self._transaction() as db:
            return body(db, time.time())

    # --- capacity -------------------------------------------------------------------------------

    def capacity(self, device: str) -> int | None:
        def body(db: sqlite3.Connection, now: float) -> int | None:
            row = db.execute("SELECT memory FROM capacity WHERE device = ?", (device,)).fetchone()
            return None if row is None else int(row[0])

        return self._run(body)

    def capacities(self) -> dict[str, int]:
        return self._run(
            lambda db, now: {d: int(m) for d, m in db.execute("SELECT device, memory FROM capacity ORDER BY device")}
        )

    def set_capacity(self, device: str, memory: int) -> None:
        self._run(
            lambda db, now: db.execute(
                "INSERT INTO capacity (device, memory) VALUES (?, ?)"
                " ON CONFLICT (device) DO UPDATE SET memory = excluded.memory",
                (device, memory),
            )
        )

    def set_capacity_if_absent(self, device: str, memory: int) -> int:
        def body(db: sqlite3.Connection, now: float) -> int:
            db.execute("INSERT OR IGNORE INTO capacity (device, memory) VALUES (?, ?)", (device, memory))
            return int(db.execute("SELECT memory FROM capacity WHERE device = ?", (device,)).fetchone()[0])

        return self._run(body)

    # --- grants ---------------------------------------------------------------------------------

    def try_grant(self, waiter: Waiter, ttl: float, preempt: bool) -> Grant:
        def body(db: sqlite3.Connection, now: float) -> Grant:
            _purge(db, now)
            capacity, free = _room(db, waiter.device)
            held = db.execute(f"SELECT {_LEASE_COLUMNS} FROM leases WHERE id = ?", (waiter.id,)).fetchone()
            if held is not None:  # granted already (the answer was lost and the call repeated): the same lease
                return Grant(lease=_record(held), free=free, capacity=capacity)
            row = db.execute("SELECT seq FROM waiters WHERE id = ?", (waiter.id,)).fetchone()
            if row is None:
                seq = _next(db, "waiter")
                db.execute(
                    "INSERT INTO waiters (id, seq, device, memory, rank, holder, pid, host, arrival, expires)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (waiter.id, seq, waiter.device, waiter.memory, rank(waiter.priority), waiter.holder,
                     waiter.pid, waiter.host, now, now + ttl),
                )  # fmt: skip
            else:
                seq = int(row[0])
                db.execute("UPDATE waiters SET expires = ? WHERE id = ?", (now + ttl, waiter.id))
            my_rank = rank(waiter.priority)
            ahead = db.execute(
                "SELECT 1 FROM waiters WHERE device = ? AND id != ? AND (rank < ? OR (rank = ? AND seq < ?)) LIMIT 1",
                (waiter.device, waiter.id, my_rank, my_rank, seq),
            ).fetchone()
            if ahead is None and waiter.memory <= free:
                token = _next(db, "token")
                lease = LeaseRecord(
                    id=waiter.id, token=token, device=waiter.device, memory=waiter.memory,
                    priority=waiter.priority, holder=waiter.holder, pid=waiter.pid, host=waiter.host,
                    granted=now, expires=now + ttl,
                )  # fmt: skip
                db.execute("DELETE FROM waiters WHERE id = ?", (waiter.id,))
                db.execute(
                    f"INSERT INTO leases ({_LEASE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                    (lease.id, token, lease.device, lease.memory, my_rank, lease.holder, lease.pid, lease.host,
                     now, now + ttl),
                )  # fmt: skip
                return Grant(lease, free=free - waiter.memory, capacity=capacity)
            preempting: tuple[str, ...] = ()
            if preempt and ahead is None and waiter.memory <= capacity:
                preempting = _ask_to_yield(db, now, waiter.device, my_rank, waiter.memory - free)
            return Grant(None, preempting=preempting, free=free, capacity=capacity)

        return self._run(body)

    def cancel(self, waiter_id: str) -> None:
        self._run(lambda db, now: db.execute("DELETE FROM waiters WHERE id = ?", (waiter_id,)))

    def renew(self, lease_ids: list[str], waiter_ids: list[str], ttl: float) -> Renewal:
        def body(db: sqlite3.Connection, now: float) -> Renewal:
            _purge(db, now)
            lost: list[str] = []
            preempted: list[str] = []
            for lease_id in lease_ids:
                row = db.execute("SELECT preempt_requested FROM leases WHERE id = ?", (lease_id,)).fetchone()
                if row is None:
                    lost.append(lease_id)
                    continue
                db.execute("UPDATE leases SET expires = ? WHERE id = ?", (now + ttl, lease_id))
                if row[0] is not None:
                    preempted.append(lease_id)
            for waiter_id in waiter_ids:
                db.execute("UPDATE waiters SET expires = ? WHERE id = ?", (now + ttl, waiter_id))
            return Renewal(lost=tuple(lost), preempted=tuple(preempted))

        return self._run(body)

    def release(self, lease_id: str) -> None:
        self._run(lambda db, now: db.execute("DELETE FROM leases WHERE id = ?", (lease_id,)))

    def resize(self, lease_id: str, memory: int) -> bool:
        def body(db: sqlite3.Connection, now: float) -> bool:
            _purge(db, now)
            row = db.execute("SELECT device, memory FROM leases WHERE id = ?", (lease_id,)).fetchone()
            if row is None:
                return False
            device, held = str(row[0]), int(row[1])
            if memory > held:
                cap_row = db.execute("SELECT memory FROM capacity WHERE device = ?", (device,)).fetchone()
                capacity = 0 if cap_row is None else int(cap_row[0])
                used = int(db.execute("SELECT SUM(memory) FROM leases WHERE device = ?", (device,)).fetchone()[0])
                if used - held + memory > capacity:
                    return False
            db.execute("UPDATE leases SET memory = ? WHERE id = ?", (memory, lease_id))
            return True

        return self._run(body)

    # --- listings -------------------------------------------------------------------------------

    def leases(self, device: str | None = None) -> list[LeaseRecord]:
        def body(db: sqlite3.Connection, now: float) -> list[LeaseRecord]:
            where = "expires >= ?" + ("" if device is None else " AND device = ?")
            args: tuple[object, ...] = (now,) if device is None else (now, device)
            rows = db.execute(f"SELECT {_LEASE_COLUMNS} FROM leases WHERE {where} ORDER BY token", args)
            return [_record(r) for r in rows]

        return self._run(body)

    def waiters(self, device: str | None = None) -> list[Waiter]:
        def body(db: sqlite3.Connection, now: float) -> list[Waiter]:
            where = "expires >= ?" + ("" if device is None else " AND device = ?")
            args: tuple[object, ...] = (now,) if device is None else (now, device)
            rows = db.execute(
                f"SELECT id, device, memory, rank, holder, pid, host FROM waiters WHERE {where}"
                " ORDER BY device, rank, seq",
                args,
            )
            return [
                Waiter(
                    id=r[0],
                    device=r[1],
                    memory=int(r[2]),
                    priority=PRIORITIES[int(r[3])],
                    holder=r[4],
                    pid=int(r[5]),
                    host=r[6],
                )  # fmt: skip
                for r in rows
            ]

        return self._run(body)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()


def _record(r: tuple[Any, ...]) -> LeaseRecord:
    """A lease row (the columns of ``_LEASE_COLUMNS``)."""
    return LeaseRecord(
        id=r[0], token=int(r[1]), device=r[2], memory=int(r[3]), priority=PRIORITIES[int(r[4])], holder=r[5],
        pid=int(r[6]), host=r[7], granted=float(r[8]), expires=float(r[9]),
        preempt_requested=None if r[10] is None else float(r[10]),
    )  # fmt: skip


def _room(db: sqlite3.Connection, device: str) -> tuple[int, int]:
    """The capacity of ``device`` (0 when none is stored) and the bytes free on it."""
    cap_row = db.execute("SELECT memory FROM capacity WHERE device = ?", (device,)).fetchone()
    capacity = 0 if cap_row is None else int(cap_row[0])
    used = int(db.execute("SELECT COALESCE(SUM(memory), 0) FROM leases WHERE device = ?", (device,)).fetchone()[0])
    return capacity, capacity - used


def _purge(db: sqlite3.Connection, now: float) -> None:
    """Drop the leases and waiters whose holder stopped renewing them."""
    db.execute("DELETE FROM leases WHERE expires < ?", (now,))
    db.execute("DELETE FROM waiters WHERE expires < ?", (now,))


def _next(db: sqlite3.Connection, name: str) -> int:
    """The next value of a counter that only grows (fencing tokens, waiter arrival order)."""
    row = db.execute(
        "INSERT INTO counters (name, value) VALUES (?, 1)"
        " ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value",
        (name,),
    ).fetchone()
    return int(row[0])


def _ask_to_yield(db: sqlite3.Connection, now: float, device: str, my_rank: int, missing: int) -> tuple[str, ...]:
    """Ask lower-priority holders to yield ``missing`` bytes: lowest priority first, then the newest.

    Leases already asked count toward the room; none is asked when all of them
    together could not make room (yielding would free nothing the waiter can use).
    """
    asked = db.execute(
        "SELECT COALESCE(SUM(memory), 0) FROM leases WHERE device = ? AND preempt_requested IS NOT NULL", (device,)
    ).fetchone()
    missing -= int(asked[0])
    if missing <= 0:
        return ()
    candidates = db.execute(
        "SELECT id, memory FROM leases WHERE device = ? AND rank > ? AND preempt_requested IS NULL"
        " ORDER BY rank DESC, token DESC",
        (device, my_rank),
    ).fetchall()
    chosen: list[str] = []
    for lease_id, memory in candidates:
        if missing <= 0:
            break
        chosen.append(str(lease_id))
        missing -= int(memory)
    if missing > 0:
        return ()
    db.executemany("UPDATE leases SET preempt_requested = ? WHERE id = ?", [(now, i) for i in chosen])
    return tuple(chosen)
