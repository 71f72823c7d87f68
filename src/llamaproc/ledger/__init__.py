"""Memory leases shared across processes (SQLite on one host, Redis for many)."""
