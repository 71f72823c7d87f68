"""The Redis store of the ledger: one Redis server shared by the processes of many hosts.

Every step that reads and then writes is one Lua script, so Redis runs it
alone: no other client sees a half-done grant, and two grants cannot both
take the last free bytes. The scripts take the time from the server
(``TIME``), never from the clients, whose clocks may disagree. The fencing
token of a lease comes from ``INCR`` on one key, so it only grows.

Keys, all under ``prefix`` (so several ledgers can share one Redis database)::

    cap            hash    device -> capacity in bytes
    token          string  the last fencing token (INCR)
    seq            string  the last arrival number of a waiter (INCR)
    l:<id>         hash    one lease: token device memory priority rank holder pid host granted expires [preempt]
    lx             zset    lease id -> expiry (microseconds): what to purge
    ld:<device>    zset    lease id -> token: the leases of a device in grant order
    w:<id>         hash    one waiter: device memory priority rank holder pid host seq
    wx             zset    waiter id -> expiry (microseconds)
    wq:<device>    zset    waiter id -> rank * 1e13 + seq: the order in which the waiters of a device are served

Times are whole microseconds, which a Redis score (a double) holds exactly.
The waiters of a device are one sorted set whose score puts the priority
first and the arrival number second (arrival numbers from ``INCR`` are unique
and follow the order in which Redis ran the scripts; ``1e13`` arrivals per
rank are never reached), so the head of the set is the next waiter to serve.
Each script first purges the leases and waiters whose expiry has passed.
A lease whose hash is gone (deleted by hand, or evicted by a Redis that
runs short of memory) is gone: renewal tells its holder it is lost, and the
scripts drop it from the indexes they read, so it holds no memory.

The scripts build key names from the prefix, which works on one Redis
server (5 or newer: scripts that write after reading ``TIME``), not on a
Redis Cluster. A granted lease keeps the id of its waiter,
which makes a repeated grant call (a reply lost to a broken connection, then
retried) return the same lease instead of granting twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from ..errors import ClosedError, InvalidArgumentError, LedgerError
from ._records import PRIORITIES, Grant, LeaseRecord, Priority, Renewal, Waiter, rank

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError:  # pragma: no cover - the [redis] extra is not installed
    redis = None  # type: ignore[assignment]

__all__ = ["RedisStore"]

_T = TypeVar("_T")

#: Priority ranks are spaced this far apart in a waiter's score; arrival numbers fill the gap.
_RANK_SPAN = 10**13

# --- the scripts -----------------------------------------------------------------------------------
# ARGV[1] is always the key prefix. Numbers go back and forth as decimal strings: Lua's own number to
# string conversion keeps 14 digits, too few for microsecond times.

_COMMON = """
local P = ARGV[1]
local function fmt(n) return string.format('%d', n) end
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function purge(now)
  local ids = redis.call('ZRANGEBYSCORE', P .. 'lx', '-inf', fmt(now))
  for _, id in ipairs(ids) do
    local dev = redis.call('HGET', P .. 'l:' .. id, 'device')
    if dev then redis.call('ZREM', P .. 'ld:' .. dev, id) end
    redis.call('DEL', P .. 'l:' .. id)
    redis.call('ZREM', P .. 'lx', id)
  end
  ids = redis.call('ZRANGEBYSCORE', P .. 'wx', '-inf', fmt(now))
  for _, id in ipairs(ids) do
    local dev = redis.call('HGET', P .. 'w:' .. id, 'device')
    if dev then redis.call('ZREM', P .. 'wq:' .. dev, id) end
    redis.call('DEL', P .. 'w:' .. id)
    redis.call('ZREM', P .. 'wx', id)
  end
end
local LEASE_FIELDS = {'token', 'device', 'memory', 'priority', 'holder', 'pid', 'host', 'granted', 'expires', 'preempt'}
local function lease_row(id)
  local row = redis.call('HMGET', P .. 'l:' .. id, unpack(LEASE_FIELDS))
  table.insert(row, 1, id)
  return row
end
local WAITER_FIELDS = {'device', 'memory', 'priority', 'holder', 'pid', 'host', 'rank', 'seq'}
local function waiter_row(id)
  local row = redis.call('HMGET', P .. 'w:' .. id, unpack(WAITER_FIELDS))
  table.insert(row, 1, id)
  return row
end
local function live_leases(index)
  -- the ids in an index of leases (ld:<device> or lx) whose hash still exists; one whose hash was deleted
  -- behind the ledger's back (by hand, or evicted) is dropped from the index and holds no memory
  local ids = {}
  for _, id in ipairs(redis.call('ZRANGE', index, 0, -1)) do
    if redis.call('EXISTS', P .. 'l:' .. id) == 1 then
      table.insert(ids, id)
    else
      redis.call('ZREM', index, id)
      redis.call('ZREM', P .. 'lx', id)
    end
  end
  return ids
end
local function used_on(dev)
  local total = 0
  for _, id in ipairs(live_leases(P .. 'ld:' .. dev)) do
    total = total + tonumber(redis.call('HGET', P .. 'l:' .. id, 'memory'))
  end
  return total
end
local function capacity_of(dev)
  return tonumber(redis.call('HGET', P .. 'cap', dev) or '0')
end
"""

# ARGV: prefix, device, memory.
_SET_CAPACITY_IF_ABSENT = """
redis.call('HSETNX', P .. 'cap', ARGV[2], ARGV[3])
return redis.call('HGET', P .. 'cap', ARGV[2])
"""

# ARGV: prefix, id, device, memory, priority, rank, holder, pid, host, ttl (us), preempt ('1' or '0').
# Returns {granted (1/0), lease row or {}, ids asked to yield, free, capacity}.
_TRY_GRANT = """
local now = now_us()
purge(now)
local id = ARGV[2]
if redis.call('EXISTS', P .. 'l:' .. id) == 1 then
  -- granted by an earlier call whose reply was lost: the same lease, never a second one
  local dev = redis.call('HGET', P .. 'l:' .. id, 'device')
  local cap = capacity_of(dev)
  return {1, lease_row(id), {}, fmt(cap - used_on(dev)), fmt(cap)}
end
local wkey = P .. 'w:' .. id
local ttl = tonumber(ARGV[10])
if redis.call('EXISTS', wkey) == 0 then
  local seq = redis.call('INCR', P .. 'seq')
  redis.call('HSET', wkey, 'device', ARGV[3], 'memory', ARGV[4], 'priority', ARGV[5], 'rank', ARGV[6],
             'holder', ARGV[7], 'pid', ARGV[8], 'host', ARGV[9], 'seq', seq)
  redis.call('ZADD', P .. 'wq:' .. ARGV[3], fmt(tonumber(ARGV[6]) * 1e13 + seq), id)
end
redis.call('ZADD', P .. 'wx', fmt(now + ttl), id)
local w = redis.call('HMGET', wkey, 'device', 'memory', 'priority', 'rank', 'holder', 'pid', 'host')
local dev, mem, rk = w[1], tonumber(w[2]), tonumber(w[4])
local cap = capacity_of(dev)
local free = cap - used_on(dev)
local first = redis.call('ZRANK', P .. 'wq:' .. dev, id) == 0
if first and mem <= free then
  local token = redis.call('INCR', P .. 'token')
  redis.call('DEL', wkey)
  redis.call('ZREM', P .. 'wx', id)
  redis.call('ZREM', P .. 'wq:' .. dev, id)
  redis.call('HSET', P .. 'l:' .. id, 'token', token, 'device', dev, 'memory', w[2], 'priority', w[3],
             'rank', w[4], 'holder', w[5], 'pid', w[6], 'host', w[7], 'granted', fmt(now), 'expires', fmt(now + ttl))
  redis.call('ZADD', P .. 'lx', fmt(now + ttl), id)
  redis.call('ZADD', P .. 'ld:' .. dev, token, id)
  return {1, lease_row(id), {}, fmt(free - mem), fmt(cap)}
end
local asked = {}
if first and ARGV[11] == '1' then
  -- make room by asking holders of lower priority to yield: lowest priority first, then the most
  -- recently granted, only as many as needed counting those already asked, and none if they cannot make room
  local need = mem - free
  local candidates = {}
  for _, lid in ipairs(live_leases(P .. 'ld:' .. dev)) do
    local f = redis.call('HMGET', P .. 'l:' .. lid, 'memory', 'rank', 'token', 'preempt')
    if f[4] then
      need = need - tonumber(f[1])
    elseif tonumber(f[2]) > rk then
      table.insert(candidates, {lid, tonumber(f[1]), tonumber(f[2]), tonumber(f[3])})
    end
  end
  if need > 0 then
    table.sort(candidates, function(a, b)
      if a[3] ~= b[3] then return a[3] > b[3] end
      return a[4] > b[4]
    end)
    local chosen = {}
    for _, c in ipairs(candidates) do
      if need <= 0 then break end
      table.insert(chosen, c[1])
      need = need - c[2]
    end
    if need <= 0 then
      for _, lid in ipairs(chosen) do
        redis.call('HSET', P .. 'l:' .. lid, 'preempt', fmt(now))
      end
      asked = chosen
    end
  end
end
return {0, {}, asked, fmt(free), fmt(cap)}
"""

# ARGV: prefix, waiter id.
_CANCEL = """
local wkey = P .. 'w:' .. ARGV[2]
local dev = redis.call('HGET', wkey, 'device')
if dev then redis.call('ZREM', P .. 'wq:' .. dev, ARGV[2]) end
redis.call('DEL', wkey)
redis.call('ZREM', P .. 'wx', ARGV[2])
return 1
"""

# ARGV: prefix, ttl (us), number of lease ids, lease ids..., waiter ids...
# Returns {lost lease ids, preempted lease ids}.
_RENEW = """
local now = now_us()
purge(now)
local expires = fmt(now + tonumber(ARGV[2]))
local n = tonumber(ARGV[3])
local lost, preempted = {}, {}
for i = 4, 3 + n do
  local id = ARGV[i]
  local key = P .. 'l:' .. id
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'expires', expires)
    redis.call('ZADD', P .. 'lx', expires, id)
    if redis.call('HEXISTS', key, 'preempt') == 1 then table.insert(preempted, id) end
  else
    table.insert(lost, id)
  end
end
for i = 4 + n, #ARGV do
  local id = ARGV[i]
  if redis.call('EXISTS', P .. 'w:' .. id) == 1 then
    redis.call('ZADD', P .. 'wx', expires, id)
  end
end
return {lost, preempted}
"""

# ARGV: prefix, lease id.
_RELEASE = """
local key = P .. 'l:' .. ARGV[2]
local dev = redis.call('HGET', key, 'device')
if dev then redis.call('ZREM', P .. 'ld:' .. dev, ARGV[2]) end
redis.call('DEL', key)
redis.call('ZREM', P .. 'lx', ARGV[2])
return 1
"""

# ARGV: prefix, lease id, memory. Returns 1 (changed) or 0 (refused).
_RESIZE = """
local now = now_us()
purge(now)
local key = P .. 'l:' .. ARGV[2]
local f = redis.call('HMGET', key, 'device', 'memory')
if not f[1] then return 0 end
local old, mem = tonumber(f[2]), tonumber(ARGV[3])
if mem > old and used_on(f[1]) - old + mem > capacity_of(f[1]) then return 0 end
redis.call('HSET', key, 'memory', ARGV[3])
return 1
"""

# ARGV: prefix, '1' to list one device or '0' for all, device. Returns lease rows (unordered for all devices).
_LEASES = """
purge(now_us())
local ids
if ARGV[2] == '1' then ids = live_leases(P .. 'ld:' .. ARGV[3])
else ids = live_leases(P .. 'lx') end
local rows = {}
for _, id in ipairs(ids) do table.insert(rows, lease_row(id)) end
return rows
"""

# ARGV: as _LEASES. Returns waiter rows (in order for one device, unordered for all).
_WAITERS = """
purge(now_us())
local ids
if ARGV[2] == '1' then ids = redis.call('ZRANGE', P .. 'wq:' .. ARGV[3], 0, -1)
else ids = redis.call('ZRANGE', P .. 'wx', 0, -1) end
local rows = {}
for _, id in ipairs(ids) do table.insert(rows, waiter_row(id)) end
return rows
"""


class RedisStore:
    """A ledger :class:`~llamaproc.ledger._records.Store` kept in Redis (redis-py's synchronous client).

    ``url`` is a redis-py URL (``redis://host:port/db``, ``rediss://`` for
    TLS, ``unix:///path.sock``). Opening checks that the server answers, so
    a wrong address fails here with :class:`LedgerError` rather than at the
    first lease. ``connect_timeout`` bounds each connection attempt and
    ``socket_timeout`` each reply, so a server that goes away (or stops
    answering) while leases are held makes the next call fail with
    :class:`LedgerError` instead of hanging. A broken connection is retried
    once on a fresh one: every script is safe to repeat. The client is
    thread-safe (a bounded pool of ``max_connections`` connections).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "llamaproc:ledger:",
        connect_timeout: float = 2.0,
        socket_timeout: float = 5.0,
        max_connections: int = 32,
    ) -> None:
        if redis is None:
            raise LedgerError("a Redis ledger needs the redis package: pip install 'llamaproc[redis]'")
        if not isinstance(prefix, str) or not prefix:
            raise InvalidArgumentError("the key prefix must be a non-empty string", param="prefix")
        self._prefix = prefix
        self._where = _redact(url)
        try:
            pool = redis.BlockingConnectionPool.from_url(
                url,
                decode_responses=True,
                socket_connect_timeout=connect_timeout,
                socket_timeout=socket_timeout,
                # a broken connection is retried once on a fresh one; a reply that timed out is not, so a
                # server that stopped answering fails the call after one socket_timeout
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
                max_connections=max_connections,
                timeout=socket_timeout,  # waiting for a free connection of the pool
            )
        except (ValueError, TypeError) as exc:
            raise InvalidArgumentError(f"not a Redis URL: {self._where!r} ({exc})", param="url") from exc
        self._client = redis.Redis(connection_pool=pool)
        self._closed = False
        scripts = {
            "set_capacity_if_absent": _SET_CAPACITY_IF_ABSENT,
            "try_grant": _TRY_GRANT,
            "cancel": _CANCEL,
            "renew": _RENEW,
            "release": _RELEASE,
            "resize": _RESIZE,
            "leases": _LEASES,
            "waiters": _WAITERS,
        }
        self._scripts = {name: self._client.register_script(_COMMON + body) for name, body in scripts.items()}
        try:
            self._call(self._client.ping)
        except LedgerError:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r}, prefix={self._prefix!r})"

    # --- the Store protocol ----------------------------------------------------------------------

    def capacity(self, device: str) -> int | None:
        value = self._call(lambda: self._client.hget(self._prefix + "cap", device))
        return None if value is None else _int(value)

    def capacities(self) -> dict[str, int]:
        values = self._call(lambda: self._client.hgetall(self._prefix + "cap"))
        return {str(device): _int(memory) for device, memory in cast("dict[Any, Any]", values).items()}

    def set_capacity(self, device: str, memory: int) -> None:
        self._call(lambda: self._client.hset(self._prefix + "cap", device, str(int(memory))))

    def set_capacity_if_absent(self, device: str, memory: int) -> int:
        return _int(self._run("set_capacity_if_absent", device, str(int(memory))))

    def try_grant(self, waiter: Waiter, ttl: float, preempt: bool) -> Grant:
        granted, row, asked, free, capacity = self._run(
            "try_grant",
            waiter.id,
            waiter.device,
            str(int(waiter.memory)),
            waiter.priority,
            str(rank(waiter.priority)),
            waiter.holder,
            str(waiter.pid),
            waiter.host,
            _micros(ttl),
            "1" if preempt else "0",
        )
        lease = _lease(row) if granted else None
        return Grant(lease=lease, preempting=tuple(asked), free=_int(free), capacity=_int(capacity))

    def cancel(self, waiter_id: str) -> None:
        self._run("cancel", waiter_id)

    def renew(self, lease_ids: list[str], waiter_ids: list[str], ttl: float) -> Renewal:
        lost, preempted = self._run("renew", _micros(ttl), str(len(lease_ids)), *lease_ids, *waiter_ids)
        return Renewal(lost=tuple(lost), preempted=tuple(preempted))

    def release(self, lease_id: str) -> None:
        self._run("release", lease_id)

    def resize(self, lease_id: str, memory: int) -> bool:
        return bool(self._run("resize", lease_id, str(int(memory))))

    def leases(self, device: str | None = None) -> list[LeaseRecord]:
        rows = self._run("leases", "0" if device is None else "1", device or "")
        records = [_lease(row) for row in rows]
        records.sort(key=lambda record: record.token)
        return records

    def waiters(self, device: str | None = None) -> list[Waiter]:
        rows = self._run("waiters", "0" if device is None else "1", device or "")
        # rank and arrival number: already the order for one device, and a sensible one across devices
        rows.sort(key=lambda row: (_int(row[7]), _int(row[8])))
        return [
            Waiter(
                id=row[0],
                device=row[1],
                memory=_int(row[2]),
                priority=_priority(row[3]),
                holder=row[4],
                pid=_int(row[5]),
                host=row[6],
            )
            for row in rows
        ]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._client.close()
        self._client.connection_pool.disconnect()

    # --- plumbing --------------------------------------------------------------------------------

    def _run(self, script: str, *args: str) -> Any:
        """Run one of the scripts (EVALSHA, loading it again if the server forgot it)."""
        run = self._scripts[script]
        return self._call(lambda: run(keys=[], args=[self._prefix, *args]))

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run one Redis call, turning redis-py's errors into :class:`LedgerError`."""
        if self._closed:
            raise ClosedError("the Redis ledger store is closed")
        try:
            return fn()
        except redis.exceptions.ConnectionError as exc:
            raise LedgerError(f"the ledger's Redis at {self._where} cannot be reached: {exc}") from exc
        except redis.exceptions.TimeoutError as exc:
            raise LedgerError(f"the ledger's Redis at {self._where} did not answer in time: {exc}") from exc
        except redis.exceptions.RedisError as exc:
            raise LedgerError(f"the ledger's Redis at {self._where} refused a command: {exc}") from exc


def _micros(seconds: float) -> str:
    if not seconds > 0:
        raise InvalidArgumentError(f"ttl must be a positive number of seconds, got {seconds!r}", param="ttl")
    return str(max(1, round(seconds * 1_000_000)))


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"the ledger's Redis holds a value that is not a number: {value!r}") from exc


def _priority(value: Any) -> Priority:
    if value not in PRIORITIES:
        raise LedgerError(f"the ledger's Redis holds an unknown priority: {value!r}")
    return cast(Priority, value)


def _lease(row: Sequence[Any]) -> LeaseRecord:
    """A lease from a script's row: id, token, device, memory, priority, holder, pid, host, granted, expires, preempt."""
    if len(row) != 11 or row[1] is None:
        raise LedgerError(f"the ledger's Redis holds a lease it cannot read: {row!r}")
    preempt = row[10]
    return LeaseRecord(
        id=str(row[0]),
        token=_int(row[1]),
        device=str(row[2]),
        memory=_int(row[3]),
        priority=_priority(row[4]),
        holder=str(row[5]),
        pid=_int(row[6]),
        host=str(row[7]),
        granted=_int(row[8]) / 1e6,
        expires=_int(row[9]) / 1e6,
        preempt_requested=None if preempt is None else _int(preempt) / 1e6,
    )


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    except ValueError:
        return "(unparsable URL)"
