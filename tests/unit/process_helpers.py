"""Helpers of the process tests: the processes a test leaves, the fake server's arguments, its output."""

from __future__ import annotations

import threading

import psutil
from fakes import fake_args

from llamaproc.process import ServerProcess


def survivors(tag: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose command line carries ``tag``."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and tag in (p.info["cmdline"] or []):
            found.append(p)
    return found


def reader_alive(pid: int) -> bool:
    return any(t.name == f"llamaproc-output-{pid}" and t.is_alive() for t in threading.enumerate())


def line_value(proc: ServerProcess, prefix: str) -> str:
    for line in proc.output.lines():
        if line.startswith(prefix):
            return line[len(prefix):]
    raise AssertionError(f"no line starting with {prefix!r} in:\n{proc.output.text()}")


def fake(tag: str, *options: str) -> list[str]:
    return fake_args("--tag", tag, *options)
