"""The ledger's front: opening a store, waiting for memory, renewing leases, telling holders to yield.

Everything here is the same for every store. Store calls run in worker
threads (``anyio.to_thread``), alike under asyncio and trio. A waiter polls
its store, starting at :data:`POLL_MIN` and backing off to :data:`POLL_MAX`
(a release through the same ledger wakes it at once); each poll keeps its
waiter record alive. One background thread per ledger renews its leases and
waiters every ``ttl / 3`` and hears from the store which leases a waiter asked
to yield and which are gone; it is stopped by :meth:`Ledger.close`. A thread,
not a task: the library owns no task group, and a thread renews even while the
event loop is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

import anyio
import anyio.lowlevel
import anyio.to_thread

from ..errors import ClosedError, InvalidArgumentError, LeaseLostError, LeaseTimeoutError, LedgerError, LlamaprocError
from ._capacity import detect_capacity
from ._records import PRIORITIES, Grant, LeaseRecord, Priority, Store, Waiter
from ._size import parse_size
from ._sqlite import SQLiteStore

__all__ = ["POLL_MAX", "POLL_MIN", "Lease", "LeaseInfo", "Ledger", "default_ledger_path", "open_ledger"]

T = TypeVar("T")

_log = logging.getLogger("llamaproc")

#: A waiter's first poll interval and its ceiling (seconds); the interval doubles in between.
POLL_MIN = 0.02
POLL_MAX = 0.25


def default_ledger_path() -> Path:
    """``$LLAMAPROC_STATE_DIR/ledger.db``, else ``~/.llamaproc/ledger.db``."""
    given = os.environ.get("LLAMAPROC_STATE_DIR")
    directory = Path(given).expanduser().absolute() if given else Path.home() / ".llamaproc"
    return directory / "ledger.db"


async def open_ledger(
    url: str | None = None,
    *,
    capacity: Mapping[str, str | int] | None = None,
    ttl: float = 10.0,
    host: str | None = None,
) -> Ledger:
    """Open the memory ledger at ``url``, shared by every process that opens the same one.

    ``url``: ``None`` for the SQLite file in the state directory
    (:func:`default_ledger_path`); ``"sqlite:///abs/path.db"`` or
    ``"sqlite://relative/path.db"`` for another file; ``"redis://host:port/db"``
    for a Redis shared by many hosts (needs the ``redis`` extra).
    ``capacity`` (``{"cpu": "16GiB", "gpu0": 24 * 2**30}``) is written to the
    ledger for every process; without it the stored capacity is used, and when
    none is stored for this host the detected one (RAM, GPU memory) is stored.
    ``ttl``: seconds a lease outlives its holder's last renewal (the holder
    renews every ``ttl / 3``). ``host`` names this host in a store shared by
    many (default: the host name); such a store keeps device ``"gpu0"`` of host
    ``A`` as ``"A/gpu0"``.
    """
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0:
        raise InvalidArgumentError(f"ttl must be a positive number of seconds, not {ttl!r}", param="ttl")
    if host is not None and (not isinstance(host, str) or not host or "/" in host):
        raise InvalidArgumentError(f"host must be a non-empty name without '/', not {host!r}", param="host")
    wanted = None if capacity is None else _parse_capacity(capacity)
    store, shared = await anyio.to_thread.run_sync(_store_for, url)
    ledger = Ledger(store, ttl=float(ttl), host=host or socket.gethostname(), shared=shared)
    try:
        await ledger._set_up(wanted)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await ledger.close()
        raise
    return ledger


def _parse_capacity(capacity: Mapping[str, str | int]) -> dict[str, int]:
    if not isinstance(capacity, Mapping) or not capacity:
        raise InvalidArgumentError(
            f"capacity must be a mapping of device to memory, e.g. {{'cpu': '16GiB'}}, not {capacity!r}",
            param="capacity",
        )
    parsed = {}
    for device, memory in capacity.items():
        _check_device(device, param="capacity")
        size = parse_size(memory, param="capacity")
        if size <= 0:
            raise InvalidArgumentError(f"the capacity of {device!r} must be positive, not {memory!r}", param="capacity")
        parsed[device] = size
    return parsed


def _check_device(device: object, *, param: str) -> str:
    if not isinstance(device, str) or not device.strip():
        raise InvalidArgumentError(f"a device is a non-empty name like 'cpu' or 'gpu0', not {device!r}", param=param)
    return device


def _store_for(url: str | None) -> tuple[Store, bool]:
    """The store at ``url``, and whether many hosts may share it (so device names carry the host)."""
    if url is None:
        return SQLiteStore(default_ledger_path()), False
    if not isinstance(url, str):
        raise InvalidArgumentError(f"url must be a string or None, not {url!r}", param="url")
    if url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
        if not path:
            raise InvalidArgumentError(
                f"no file in the ledger url {url!r}: e.g. 'sqlite:///path/ledger.db'", param="url"
            )
        return SQLiteStore(Path(path)), False
    if url.startswith(("redis://", "rediss://", "unix://")):
        try:
            module: Any = importlib.import_module("llamaproc.ledger._redis")
        except ModuleNotFoundError as e:
            raise LedgerError(
                f"a Redis ledger needs redis-py: pip install 'llamaproc[redis]' (cannot import {e.name})"
            ) from e
        return cast(Store, module.RedisStore(url)), True
    raise InvalidArgumentError(
        f"unknown ledger url {url!r}: expected 'sqlite:///path/ledger.db' or 'redis://host:port/db'", param="url"
    )


def _default_holder() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name or "python"


def _thread_safe_caller() -> Callable[[Callable[[], None]], None]:
    """A function that runs a callback soon in the current event loop, from any thread, without waiting.

    After the loop has ended the callback is dropped (nobody is left to wake).
    """
    native = anyio.lowlevel.current_token().native_token
    if isinstance(native, asyncio.AbstractEventLoop):
        loop = native

        def call_asyncio(callback: Callable[[], None]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(callback)

        return call_asyncio

    import trio

    token = cast(trio.lowlevel.TrioToken, native)

    def call_trio(callback: Callable[[], None]) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(callback)

    return call_trio


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """One live lease in a listing (:meth:`Ledger.leases`). Times are the store's clock (seconds since the epoch).

    ``device`` is the name the store keeps (``"host/gpu0"`` in a store shared
    by many hosts, the plain name in SQLite); ``host`` is the holder's host.
    """

    id: str
    token: int
    device: str
    memory: int
    priority: Priority
    holder: str
    pid: int
    host: str
    granted: float
    expires: float
    preempt_requested: bool


class Lease:
    """Memory held on one device, renewed in the background until :meth:`release`.

    ``token`` is a fencing number that grows with every grant of the store.
    Watch :meth:`preempted`: it returns when a waiter of higher priority asks
    this holder to yield, or when the lease is lost; the ledger never takes a
    live lease away, the holder decides when to release.
    """

    def __init__(self, ledger: Ledger, record: LeaseRecord) -> None:
        self._ledger = ledger
        self._record = record
        self._memory = record.memory
        self._signal = anyio.Event()
        self._released = False
        self._lost: str | None = None  # why, once lost
        self._preempt_requested = False
        self._listeners: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        state = "lost" if self._lost else "released" if self._released else "held"
        return (
            f"<Lease {self.id} token={self.token} {self.device} {self.memory} bytes {self.priority} "
            f"holder={self.holder!r} {state}>"
        )

    @property
    def id(self) -> str:
        return self._record.id

    @property
    def token(self) -> int:
        return self._record.token

    @property
    def device(self) -> str:
        """The device as the store names it (with the host in a store shared by many hosts)."""
        return self._record.device

    @property
    def memory(self) -> int:
        """Bytes held (changed by :meth:`resize`)."""
        return self._memory

    @property
    def priority(self) -> Priority:
        return self._record.priority

    @property
    def holder(self) -> str:
        return self._record.holder

    @property
    def granted(self) -> float:
        """When the store granted it, by the store's clock (seconds since the epoch)."""
        return self._record.granted

    @property
    def lost(self) -> bool:
        """True once the lease is no longer held: it expired or vanished from the store, or the ledger closed."""
        return self._lost is not None

    @property
    def preempt_requested(self) -> bool:
        """True once a waiter of higher priority asked this holder to yield."""
        return self._preempt_requested

    async def preempted(self) -> None:
        """Return when a waiter asked this holder to yield (release soon), or when the lease is lost."""
        await self._signal.wait()

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when a preemption is requested and when the lease is lost (at once if it was).

        It runs in the event loop's thread, between tasks, when the ledger's
        renewal thread hears the news: a way to react to :meth:`preempted`
        without a task waiting on it. It must not block; it may call
        :meth:`release_nowait`.
        """
        self._listeners.append(callback)
        if self._signal.is_set():
            callback()

    def release_nowait(self) -> None:
        """Give the memory back without waiting: from any thread, in a callback, in a finalizer.

        The lease stops being renewed at once; the ledger's renewal thread
        releases it in the store soon after (or it expires within the TTL).
        Idempotent.
        """
        if self._released:
            return
        self._released = True
        self._ledger._release_soon(self.id, release=not self.lost)

    async def release(self) -> None:
        """Give the memory back. Idempotent; shielded from cancellation.

        When the store cannot be reached the lease is no longer renewed, so it
        expires within the ledger's TTL.
        """
        if self._released:
            return
        self._released = True
        await self._ledger._forget(self.id, release=not self.lost)

    async def resize(self, memory: str | int) -> bool:
        """Change the memory held (a load measured what it really uses); ``False`` when growing does not fit.

        Raises :class:`LeaseLostError` when the lease is no longer held.
        """
        size = parse_size(memory, param="memory")
        if size <= 0:
            raise InvalidArgumentError(f"memory must be positive, not {memory!r}", param="memory")
        self._check_held()
        if await self._ledger._call(self._ledger._store.resize, self.id, size):
            shrunk = size < self._memory
            self._memory = size
            if shrunk:
                self._ledger._wake_waiters()
            return True
        live = await self._ledger._call(self._ledger._store.leases, self.device)
        if not any(record.id == self.id for record in live):
            self._mark_lost("the lease is no longer in the ledger")
            self._check_held()
        return False

    def _check_held(self) -> None:
        if self._lost is not None:
            raise LeaseLostError(f"lease {self.id} on {self.device} is lost: {self._lost}")
        if self._released:
            raise ClosedError(f"lease {self.id} was released")

    def _mark_lost(self, reason: str) -> None:
        """In the event loop's thread."""
        if self._lost is None:
            self._lost = reason
            self._signal.set()
            self._notify()

    def _mark_preempted(self) -> None:
        if not self._preempt_requested:
            self._preempt_requested = True
            self._signal.set()
            self._notify()

    def _notify(self) -> None:
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:  # noqa: BLE001 - a listener's failure must not stop the others
                _log.exception("a listener of lease %s failed", self.id)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()


class Ledger:
    """Memory leases on a shared store (made by :func:`open_ledger`; close it, or use ``async with``).

    A ledger belongs to the event loop that opened it. :meth:`close` stops its
    renewal thread, cancels its waiters and releases the leases still held
    through it (their holders see them lost); it touches nothing of other
    ledgers, in this process or another.
    """

    def __init__(self, store: Store, *, ttl: float, host: str, shared: bool) -> None:
        self._store = store
        self.ttl = ttl
        self.host = host
        self._shared = shared
        self._closed = False
        self._call_soon = _thread_safe_caller()
        # Shared with the renewal thread, under _lock: held lease ids (None until the Lease object exists)
        # and waiting ids.
        self._lock = threading.Lock()
        self._leases: dict[str, Lease | None] = {}
        self._waiting: set[str] = set()
        self._changed = anyio.Event()  # set (and replaced) when memory is given back through this ledger
        self._busy = 0  # store calls in flight
        self._idle: anyio.Event | None = None
        self._stop = threading.Event()
        self._kick = threading.Event()  # wakes the renewal thread: leases to release, or stop
        self._to_release: list[str] = []  # under _lock: leases given back by release_nowait()
        self._thread = threading.Thread(target=self._renew_loop, name="llamaproc-ledger-renewal", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<Ledger {type(self._store).__name__} ttl={self.ttl} {'closed' if self._closed else 'open'}>"

    async def _set_up(self, wanted: dict[str, int] | None) -> None:
        if wanted is not None:
            for device, memory in wanted.items():
                await self._call(self._store.set_capacity, self._qualify(device), memory)
            return
        stored = await self._call(self._store.capacities)
        prefix = f"{self.host}/" if self._shared else ""
        if any(name.startswith(prefix) for name in stored):
            return
        detected = await anyio.to_thread.run_sync(detect_capacity)
        for device, memory in detected.items():
            await self._call(self._store.set_capacity_if_absent, self._qualify(device), memory)

    def _qualify(self, device: str) -> str:
        """The store's name of a device: with this host's name in a store shared by many hosts."""
        if self._shared and "/" not in device:
            return f"{self.host}/{device}"
        return device

    # --- leases ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def acquire(
        self,
        memory: str | int,
        *,
        device: str = "cpu",
        priority: Priority = "normal",
        holder: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Lease]:
        """Hold ``memory`` on ``device`` for the ``async with`` block; released on exit, whatever ends it.

        The same arguments as :meth:`lease`.
        """
        lease = await self.lease(memory, device=device, priority=priority, holder=holder, timeout=timeout)
        try:
            yield lease
        finally:
            await lease.release()

    async def lease(
        self,
        memory: str | int,
        *,
        device: str = "cpu",
        priority: Priority = "normal",
        holder: str | None = None,
        timeout: float | None = None,
    ) -> Lease:
        """Wait for ``memory`` (bytes or ``"2GiB"``) on ``device`` and return the lease; :meth:`Lease.release` it.

        Waiters are served in priority order (``urgent``, ``high``, ``normal``,
        ``low``, ``batch``), then by arrival. The first waiter asks holders of
        lower priority to yield (lowest first, only as many as it needs).
        Raises :class:`LeaseTimeoutError` after ``timeout`` seconds (``None``:
        wait as long as it takes), and :class:`InvalidArgumentError` at once for
        a request larger than the device's capacity or an unknown device.
        """
        self._check_open()
        size = parse_size(memory, param="memory")
        if size <= 0:
            raise InvalidArgumentError(f"memory must be positive, not {memory!r}", param="memory")
        if priority not in PRIORITIES:
            raise InvalidArgumentError(
                f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}", param="priority"
            )
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0
        ):
            raise InvalidArgumentError(f"timeout must be None or seconds >= 0, not {timeout!r}", param="timeout")
        if holder is not None and not isinstance(holder, str):
            raise InvalidArgumentError(f"holder must be a string, not {holder!r}", param="holder")
        name = self._qualify(_check_device(device, param="device"))
        capacity = await self._call(self._store.capacity, name)
        if capacity is None:
            known = ", ".join(sorted(await self._call(self._store.capacities))) or "none"
            raise InvalidArgumentError(f"the ledger has no device {name!r} (devices: {known})", param="device")
        if size > capacity:
            raise InvalidArgumentError(
                f"{size} bytes requested on {name}, more than its capacity of {capacity} bytes", param="memory"
            )
        waiter = Waiter(
            id=uuid.uuid4().hex, device=name, memory=size, priority=priority,
            holder=holder if holder is not None else _default_holder(), pid=os.getpid(), host=self.host,
        )  # fmt: skip
        record = await self._wait(waiter, timeout)
        lease = Lease(self, record)
        with self._lock:
            self._leases[record.id] = lease
        return lease

    async def _wait(self, waiter: Waiter, timeout: float | None) -> LeaseRecord:
        deadline = None if timeout is None else anyio.current_time() + timeout
        with self._lock:
            self._waiting.add(waiter.id)
        granted: LeaseRecord | None = None
        try:
            delay = POLL_MIN
            while True:
                self._check_open()
                changed = self._changed
                grant = await self._call(self._try_grant, waiter)
                if grant.lease is not None:
                    granted = grant.lease
                    self._check_open()  # closing released it
                    return granted
                if grant.capacity and waiter.memory > grant.capacity:
                    raise InvalidArgumentError(
                        f"{waiter.memory} bytes requested on {waiter.device}, more than its capacity "
                        f"of {grant.capacity} bytes (it was lowered while waiting)",
                        param="memory",
                    )
                now = anyio.current_time()
                if deadline is not None and now >= deadline:
                    raise LeaseTimeoutError(
                        f"no {waiter.memory} bytes on {waiter.device} within {timeout} s: "
                        f"{grant.free} of {grant.capacity} bytes free",
                        memory=waiter.memory, free=grant.free, capacity=grant.capacity, device=waiter.device,
                    )  # fmt: skip
                with anyio.move_on_after(delay if deadline is None else min(delay, deadline - now)):
                    await changed.wait()
                delay = min(delay * 2, POLL_MAX)
        finally:
            with self._lock:
                self._waiting.discard(waiter.id)
                orphan = granted is None and self._leases.pop(waiter.id, "absent") is None
            if granted is None and not self._closed:
                # Cancelled or failed: forget the waiter, or give back a grant that arrived as it was cancelled.
                with anyio.CancelScope(shield=True), contextlib.suppress(LlamaprocError):
                    if orphan:
                        await self._call(self._store.release, waiter.id)
                    else:
                        await self._call(self._store.cancel, waiter.id)

    def _try_grant(self, waiter: Waiter) -> Grant:
        """In a worker thread: one poll; a grant is recorded as held before the thread returns."""
        grant = self._store.try_grant(waiter, self.ttl, True)
        if grant.lease is not None:
            with self._lock:
                self._leases[grant.lease.id] = None
        return grant

    async def _forget(self, lease_id: str, *, release: bool) -> None:
        with self._lock:
            held = self._leases.pop(lease_id, "absent") != "absent"
        if held and release and not self._closed:
            with anyio.CancelScope(shield=True), contextlib.suppress(LlamaprocError):
                await self._call(self._store.release, lease_id)
        self._wake_waiters()

    def _release_soon(self, lease_id: str, *, release: bool) -> None:
        """Any thread: stop renewing the lease; the renewal thread releases it in the store."""
        with self._lock:
            held = self._leases.pop(lease_id, "absent") != "absent"
            if held and release and not self._closed:
                self._to_release.append(lease_id)
        self._kick.set()

    def _release_pending(self) -> None:
        """In the renewal thread: release the leases given back by :meth:`Lease.release_nowait`."""
        with self._lock:
            pending, self._to_release = self._to_release, []
        for lease_id in pending:
            with contextlib.suppress(Exception):
                self._store.release(lease_id)
        if pending:
            self._call_soon(self._wake_waiters)

    def _wake_waiters(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # --- listings -------------------------------------------------------------------------------

    async def leases(self, device: str | None = None) -> list[LeaseInfo]:
        """The live leases of every process (on ``device``), oldest first."""
        self._check_open()
        name = None if device is None else self._qualify(_check_device(device, param="device"))
        records = await self._call(self._store.leases, name)
        return [
            LeaseInfo(
                id=r.id,
                token=r.token,
                device=r.device,
                memory=r.memory,
                priority=r.priority,
                holder=r.holder,
                pid=r.pid,
                host=r.host,
                granted=r.granted,
                expires=r.expires,
                preempt_requested=r.preempt_requested is not None,
            )  # fmt: skip
            for r in records
        ]

    async def capacity(self) -> dict[str, int]:
        """The capacity of every device in the ledger, in bytes, by the store's names."""
        self._check_open()
        return await self._call(self._store.capacities)

    # --- store calls, renewal, closing ----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the ledger is closed")

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        """Run a store call in a worker thread; counted so that :meth:`close` waits for the calls in flight."""
        self._busy += 1
        try:
            return await anyio.to_thread.run_sync(function, *args)
        finally:
            self._busy -= 1
            if self._busy == 0 and self._idle is not None:
                self._idle.set()

    def _renew_loop(self) -> None:
        """The renewal thread: renew every ttl / 3 until stopped; report preemption and loss to the loop."""
        period = self.ttl / 3
        last_renewed = time.monotonic()
        next_renewal = last_renewed + period
        while True:
            self._kick.wait(max(0.0, next_renewal - time.monotonic()))
            if self._stop.is_set():
                return
            self._kick.clear()
            self._release_pending()
            if time.monotonic() < next_renewal:
                continue
            next_renewal = time.monotonic() + period
            with self._lock:
                lease_ids = list(self._leases)
                waiter_ids = list(self._waiting)
            if not lease_ids and not waiter_ids:
                last_renewed = time.monotonic()
                continue
            try:
                renewal = self._store.renew(lease_ids, waiter_ids, self.ttl)
            except Exception as e:  # noqa: BLE001 - any failure to renew counts toward loss
                if self._stop.is_set():
                    return
                if time.monotonic() - last_renewed > self.ttl:
                    self._report(lease_ids, (), f"renewal failed for longer than the TTL ({self.ttl} s): {e}")
                continue
            last_renewed = time.monotonic()
            self._report(renewal.lost, renewal.preempted, "it expired or was removed from the ledger")

    def _report(self, lost: Any, preempted: Any, reason: str) -> None:
        """In the renewal thread: flag the leases and wake their holders in the event loop."""
        with self._lock:
            lost_leases = [lease for i in lost if (lease := self._leases.get(i)) is not None]
            asked = [lease for i in preempted if (lease := self._leases.get(i)) is not None]
            for lease in lost_leases:
                self._leases.pop(lease.id, None)
        news = [lease for lease in asked if not lease._preempt_requested] + lost_leases
        if not news:
            return

        def deliver() -> None:
            for lease in asked:
                lease._mark_preempted()
            for lease in lost_leases:
                lease._mark_lost(reason)

        self._call_soon(deliver)

    async def close(self) -> None:
        """Stop renewing, cancel this ledger's waiters and release its leases; close the store. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._busy:
                self._idle = anyio.Event()
                await self._idle.wait()
            self._stop.set()
            self._kick.set()
            await anyio.to_thread.run_sync(self._thread.join)
            with self._lock:
                held = dict(self._leases)
                waiting = list(self._waiting)
                pending, self._to_release = self._to_release, []
                self._leases.clear()
                self._waiting.clear()
            await anyio.to_thread.run_sync(self._give_back, [*held, *pending], waiting)
            for lease in held.values():
                if lease is not None:
                    lease._mark_lost("the ledger was closed")
            self._wake_waiters()

    def _give_back(self, lease_ids: list[str], waiter_ids: list[str]) -> None:
        try:
            for lease_id in lease_ids:
                with contextlib.suppress(LlamaprocError):
                    self._store.release(lease_id)
            for waiter_id in waiter_ids:
                with contextlib.suppress(LlamaprocError):
                    self._store.cancel(waiter_id)
        finally:
            self._store.close()

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
