"""The real rpc-server (``ggml-rpc-server`` beside llama-server): start, probe, stop, no orphans."""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import psutil
import pytest

import llamaproc
from llamaproc import WorkerUnreachableError, probe_worker, start_worker
from llamaproc.errors import StartupError
from llamaproc.process import _process, _worker, parse_address

SRC = str(Path(__file__).resolve().parents[2] / "src")

#: Starts a worker, prints its pid, and waits to be killed.
OWNER = r"""
import anyio
from llamaproc import start_worker

async def main():
    worker = await start_worker()
    print(worker.pid, flush=True)
    await anyio.sleep(60)

anyio.run(main)
"""

HELLO = bytes([14]) + struct.pack("<Q", 24) + bytes(24)


@pytest.fixture(autouse=True)
def _rpc_server(backend: llamaproc.Backend) -> None:
    if backend.rpc_server is None:
        pytest.fail(f"no ggml-rpc-server beside {backend.binary}: the [server] extra ships one")


def gone(pid: int) -> bool:
    """The process is reaped, or a zombie (it runs no code either way)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@contextmanager
def holding(address: str) -> Iterator[socket.socket]:
    """A client that holds the worker, as a coordinator does: connected and past the HELLO."""
    host, port = parse_address(address)
    with socket.create_connection((host, port), timeout=30) as client:
        client.sendall(HELLO)
        reply = b""
        while len(reply) < 8 + 28:  # the reply may come in pieces
            chunk = client.recv(64)
            assert chunk, f"the worker closed the connection after {reply!r}"
            reply += chunk
        assert len(reply) == 8 + 28
        yield client


@pytest.mark.anyio
async def test_a_worker_starts_and_offers_its_devices() -> None:
    async with await start_worker(threads=2) as worker:
        assert worker.address == f"127.0.0.1:{worker.port}" and worker.host == "127.0.0.1"
        assert worker.returncode is None and psutil.Process(worker.pid).is_running()
        assert worker.devices and all(d.total > 0 and d.free > 0 for d in worker.devices)
        assert worker.devices[0].name == "CPU"  # named after its banner
        assert "-t" in worker.argv and "2" in worker.argv
        assert "Starting RPC server v5." in worker.output.text()
        probed = await probe_worker(worker.address, timeout=10)
        assert [d.total for d in probed] == [d.total for d in worker.devices]
        assert [d.name for d in probed] == [f"RPC device {i}" for i in range(len(probed))]
        assert worker.cpu_seconds() is not None
        assert f"RpcWorker {worker.address} pid={worker.pid} running" in repr(worker)
    assert worker.returncode == -signal.SIGTERM
    assert worker.cpu_seconds() is None
    assert await worker.close() == -signal.SIGTERM  # idempotent


@pytest.mark.anyio
async def test_two_workers_get_different_ports() -> None:
    async with await start_worker() as one, await start_worker() as two:
        assert one.port != two.port
        assert (await probe_worker(one.address, timeout=10)) and (await probe_worker(two.address, timeout=10))


@pytest.mark.anyio
async def test_a_given_busy_port_is_named() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StartupError) as info:
            await start_worker(port=port)
    assert str(info.value).startswith(f"rpc-server could not listen on 127.0.0.1:{port}: the port is in use")
    assert info.value.returncode == 0
    assert "Failed to create server socket" in info.value.output


@pytest.mark.anyio
async def test_a_given_free_port_is_used() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with await start_worker(port=port) as worker:
        assert worker.port == port and worker.address == f"127.0.0.1:{port}"


@pytest.mark.anyio
async def test_a_picked_port_taken_meanwhile_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        picks = iter([taken])
        free_port = _worker._free_port
        monkeypatch.setattr(_worker, "_free_port", lambda host: next(picks, None) or free_port(host))
        async with await start_worker() as worker:
            assert worker.port != taken
            assert await probe_worker(worker.address, timeout=10)


@pytest.mark.anyio
async def test_a_stopped_worker_fails_the_probe_within_its_deadline() -> None:
    """SIGSTOPped, it still accepts connections; the probe waits for the HELLO reply and gives up."""
    async with await start_worker() as worker:
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            with anyio.fail_after(30):  # a safety net only
                with pytest.raises(WorkerUnreachableError) as info:
                    await probe_worker(worker.address, timeout=0.5)
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        assert f"{worker.address} accepted the connection but did not answer within 0.5 s" in str(info.value)
        assert info.value.address == worker.address
        # The probe that gave up reset its connection: the worker, resumed, does not answer it and die.
        assert await probe_worker(worker.address, timeout=10)
        assert worker.returncode is None


@pytest.mark.anyio
async def test_a_busy_worker_times_out_and_survives_the_probe() -> None:
    """An rpc-server serves one client at a time; a probe that gives up must not kill it later (SIGPIPE)."""
    async with await start_worker() as worker:
        with holding(worker.address):
            with pytest.raises(WorkerUnreachableError, match="busy with another coordinator"):
                await probe_worker(worker.address, timeout=0.5)
        # The coordinator has gone: the worker gets to the probe's connection, finds it reset, serves the next.
        assert await probe_worker(worker.address, timeout=10)
        assert worker.returncode is None


@pytest.mark.anyio
async def test_close_leaves_no_process() -> None:
    worker = await start_worker()
    pid = worker.pid
    assert not gone(pid)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await worker.close()  # shielded: it finishes even in a cancelled scope
    assert worker.returncode is not None
    assert not psutil.pid_exists(pid) or gone(pid)
    with pytest.raises(WorkerUnreachableError, match="connection refused"):
        await probe_worker(worker.address)


@pytest.mark.anyio
async def test_kill_then_wait() -> None:
    worker = await start_worker()
    try:
        worker.kill()
        with anyio.fail_after(30):  # a safety net only
            assert await worker.wait() == -signal.SIGKILL
    finally:
        await worker.close()


@pytest.mark.anyio
async def test_a_dropped_worker_is_killed_with_a_warning() -> None:
    worker = await start_worker()
    pid = worker.pid
    with pytest.warns(ResourceWarning, match=f"unclosed RpcWorker pid {pid}: its process group was killed"):
        del worker
        gc.collect()
    assert gone(pid)


@pytest.mark.parametrize("spawn_path", ["setpriv", "preexec"])
def test_a_worker_dies_with_its_owner(spawn_path: str) -> None:
    """The owner is SIGKILLed: the kernel kills its worker too (PR_SET_PDEATHSIG, on both spawn paths)."""
    env = {**os.environ, "PYTHONPATH": SRC}
    if spawn_path == "preexec":
        env[_process.ENV_NO_SETPRIV] = "1"
    elif _process._setpriv() is None:
        pytest.skip("no setpriv with --pdeathsig on this machine (the preexec_fn path is used)")
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert owner.stdout is not None
        ready, _, _ = select.select([owner.stdout], [], [], 60)
        assert ready, "the owner did not start its worker"
        worker = psutil.Process(int(owner.stdout.readline()))
        assert worker.ppid() == owner.pid and "rpc-server" in " ".join(worker.cmdline())
        owner.kill()
        owner.wait(10)
        deadline = time.monotonic() + 30  # a safety net only
        while not gone(worker.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gone(worker.pid), "the worker outlived its owner"
    finally:
        owner.kill()
        owner.wait(10)
        if owner.stdout is not None:
            owner.stdout.close()
