"""Memory leases shared across processes (SQLite on one host, Redis for many)."""

from ._capacity import detect_capacity
from ._ledger import Lease, LeaseInfo, Ledger, default_ledger_path, open_ledger
from ._records import PRIORITIES, Grant, LeaseRecord, Priority, Renewal, Store, Waiter, rank
from ._size import parse_duration, parse_size
from ._sqlite import SQLiteStore

__all__ = [
    "PRIORITIES",
    "Grant",
    "Lease",
    "LeaseInfo",
    "LeaseRecord",
    "Ledger",
    "Priority",
    "Renewal",
    "SQLiteStore",
    "Store",
    "Waiter",
    "default_ledger_path",
    "detect_capacity",
    "open_ledger",
    "parse_duration",
    "parse_size",
    "rank",
]
