"""What the ledger's stores keep: leases, waiters, and the interface every store implements.

A store (SQLite on one host, Redis for many) keeps the shared state and does
each step as one atomic transaction; everything else (waiting, renewing in the
background, telling a holder it is preempted or lost) is the ledger's
(:mod:`llamaproc.ledger._ledger`), the same for every store. The stores are
synchronous: the ledger calls them from worker threads, which works alike
under asyncio and trio and keeps a slow store off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = ["PRIORITIES", "Grant", "LeaseRecord", "Priority", "Renewal", "Store", "Waiter", "rank"]

Priority = Literal["urgent", "high", "normal", "low", "batch"]
#: Highest first.
PRIORITIES: tuple[Priority, ...] = ("urgent", "high", "normal", "low", "batch")


def rank(priority: Priority) -> int:
    """0 for ``urgent`` ... 4 for ``batch``: lower ranks are served first and preempted last."""
    return PRIORITIES.index(priority)


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """A granted lease as the store keeps it. Times are the store's clock (seconds since the epoch)."""

    id: str
    token: int  # fencing number: grows with every grant, over the whole store
    device: str
    memory: int  # bytes
    priority: Priority
    holder: str  # a name the holder chose (e.g. the model), for listings
    pid: int
    host: str
    granted: float
    expires: float
    preempt_requested: float | None = None  # when a waiter asked this holder to yield


@dataclass(frozen=True, slots=True)
class Waiter:
    """A request waiting for memory. ``arrival`` orders waiters of one priority (the store's clock)."""

    id: str
    device: str
    memory: int
    priority: Priority
    holder: str
    pid: int
    host: str


@dataclass(frozen=True, slots=True)
class Grant:
    """The outcome of one :meth:`Store.try_grant`: the lease, or why not yet."""

    lease: LeaseRecord | None
    #: Leases asked to yield for this waiter by this call (already asked ones are not repeated).
    preempting: tuple[str, ...] = ()
    #: Bytes free on the device now, and its capacity (for the error of a waiter that times out).
    free: int = 0
    capacity: int = 0


@dataclass(frozen=True, slots=True)
class Renewal:
    """The outcome of one :meth:`Store.renew`."""

    lost: tuple[str, ...]  # lease ids that are no longer in the store (expired, or released elsewhere)
    preempted: tuple[str, ...]  # lease ids a waiter asked to yield


class Store(Protocol):
    """The shared state of a ledger. Every method is one atomic transaction; ``ttl`` in seconds."""

    def capacity(self, device: str) -> int | None:
        """The stored capacity of ``device`` in bytes (``None``: none stored)."""
        ...

    def capacities(self) -> dict[str, int]:
        """Every stored capacity."""
        ...

    def set_capacity(self, device: str, memory: int) -> None:
        """Store the capacity of ``device``."""
        ...

    def set_capacity_if_absent(self, device: str, memory: int) -> int:
        """Store it unless one is stored; return the stored one (so racing processes agree on one)."""
        ...

    def try_grant(self, waiter: Waiter, ttl: float, preempt: bool) -> Grant:
        """Purge what has expired; grant ``waiter`` its lease if it fits and no waiter comes before it.

        Waiters are ordered by priority, then arrival (the first call for a
        waiter id records it; later calls refresh its expiry to now + ttl).
        The lease expires at now + ttl and takes the waiter's id; asking again
        for a waiter already granted returns its lease (a call repeated after a
        lost reply never grants twice). When it cannot be granted and
        ``preempt`` is true and the waiter is the first in order, ask holders of
        lower priority to yield, lowest priority first, then the most recently
        granted, and only as many as needed to make room (counting those already
        asked); none when even all of them cannot make room. A device with no
        stored capacity has a capacity of 0. Never grants past the capacity,
        under any interleaving.
        """
        ...

    def cancel(self, waiter_id: str) -> None:
        """Forget a waiter (it timed out or was cancelled)."""
        ...

    def renew(self, lease_ids: list[str], waiter_ids: list[str], ttl: float) -> Renewal:
        """Extend the expiry of these leases and waiters to now + ttl; say which leases are lost or preempted."""
        ...

    def release(self, lease_id: str) -> None:
        """Give a lease back (idempotent)."""
        ...

    def resize(self, lease_id: str, memory: int) -> bool:
        """Change a live lease's memory (a load measured it); refused (``False``) when growing would exceed
        the capacity or the lease is gone."""
        ...

    def leases(self, device: str | None = None) -> list[LeaseRecord]:
        """The live leases (of ``device``), oldest first."""
        ...

    def waiters(self, device: str | None = None) -> list[Waiter]:
        """The live waiters (of ``device``), in the order they will be served."""
        ...

    def close(self) -> None:
        """Close the store's connections (idempotent)."""
        ...
