"""The test hosts of tests/netns.py: a real ggml-rpc-server on another "host", and a link that can be cut."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from netns import Host, NetnsError, links, namespaces, require_netns
from support import require

import llamaproc

PORT = 50052  # each namespace has its own ports: this one is always free there
HELLO = 14  # RPC_CMD_HELLO (static_assert'ed in ggml-rpc.cpp)
CONN_CAPS = 24  # protocol v5: HELLO carries 24 bytes of connection capabilities (all zero: none)
SAFETY = 30.0  # an upper bound for things that take milliseconds, never a measure of speed
QUIET = 2.0  # how long a cut link must stay silent for the test to count it as silent


@pytest.fixture(autouse=True)
def _netns() -> None:
    require_netns()


def _send_hello(sock: socket.socket) -> None:
    sock.sendall(struct.pack("<BQ", HELLO, CONN_CAPS) + bytes(CONN_CAPS))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {data!r}")
        data += chunk
    return data


def _recv_hello(sock: socket.socket) -> tuple[int, int, int]:
    """The server's version from a HELLO reply: an 8-byte little-endian size, then major, minor, patch, ..."""
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
    assert 3 <= size <= 4096, size
    major, minor, patch = _recv_exact(sock, size)[:3]
    return major, minor, patch


def _connect(address: str, port: int) -> socket.socket:
    """A connection to a server that may not listen yet (refused until it does)."""
    deadline = time.monotonic() + SAFETY
    while True:
        try:
            sock = socket.create_connection((address, port), timeout=SAFETY)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        sock.settimeout(SAFETY)
        return sock


@contextmanager
def _rpc_server(host: Host, backend: llamaproc.Backend, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    binary = backend.rpc_server
    require("ggml-rpc-server", binary is not None, f"none next to {backend.binary}")
    assert binary is not None
    with log.open("wb") as out:
        proc = host.popen(
            [binary, "-H", host.address, "-p", str(PORT)],
            env={**os.environ, **backend.env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    yield proc


def test_an_rpc_server_in_a_namespace_answers_from_the_host(backend: llamaproc.Backend, tmp_path: Path) -> None:
    with Host() as host, _rpc_server(host, backend, tmp_path / "rpc.log") as proc:
        assert host.address != host.host_address
        assert proc.pid in host.pids()  # it runs inside, not here
        # Not reachable from this namespace's loopback: only at the namespace's address.
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", PORT), timeout=SAFETY):
            pass
        with _connect(host.address, PORT) as sock:
            _send_hello(sock)
            major, _minor, _patch = _recv_hello(sock)
        assert major >= 3, (major, (tmp_path / "rpc.log").read_text())
        assert proc.poll() is None


def test_a_cut_link_hangs_a_connection_silently_and_restore_resumes_it(
    backend: llamaproc.Backend, tmp_path: Path
) -> None:
    with Host() as host, _rpc_server(host, backend, tmp_path / "rpc.log"):
        with _connect(host.address, PORT) as sock:
            host.cut()
            assert host.is_cut
            _send_hello(sock)  # the kernel takes it: nothing says the link is gone
            sock.settimeout(QUIET)
            with pytest.raises(TimeoutError):  # no reply, and no reset (that would raise ConnectionResetError)
                sock.recv(1)
            # A new connection is not answered either: it fails (no route to host) or times out.
            with pytest.raises(OSError), socket.create_connection((host.address, PORT), timeout=QUIET):
                pass

            host.restore()
            assert not host.is_cut
            # The same connection was never torn down: the held-back HELLO now gets its reply.
            sock.settimeout(SAFETY)
            major, _minor, _patch = _recv_hello(sock)
            assert major >= 3


def test_leaving_removes_the_namespace_the_link_and_every_process(tmp_path: Path) -> None:
    marker = tmp_path / "grandchild.pid"
    with pytest.raises(RuntimeError, match="the test failed"), Host() as host:
        name, device = host.name, host.host_device
        assert name in namespaces() and device in links()
        # A child that starts a grandchild of its own: only `ip netns pids` can find that one.
        child = host.popen(["sh", "-c", f'sleep 1000 & echo $! > "{marker}"; wait'])
        deadline = time.monotonic() + SAFETY
        while not (marker.exists() and marker.read_text().strip()):
            assert time.monotonic() < deadline, "the child never started its grandchild"
            time.sleep(0.02)
        grandchild = int(marker.read_text())
        assert {child.pid, grandchild} <= set(host.pids())
        raise RuntimeError("the test failed")

    assert name not in namespaces()
    assert device not in links()
    assert child.returncode is not None
    assert not psutil.pid_exists(child.pid)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def test_a_set_up_that_fails_half_way_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Host) -> None:
        raise NetnsError("no address for you")

    monkeypatch.setattr(Host, "_address_link", broken)
    host = Host()
    with pytest.raises(NetnsError, match="no address for you"), host:
        pass
    assert host.name not in namespaces()
    assert host.host_device not in links()


def test_hosts_at_once_get_their_own_names_and_subnets() -> None:
    with Host() as a, Host() as b:
        assert len({a.name, b.name}) == 2
        assert len({a.address, a.host_address, b.address, b.host_address}) == 4
        # Each namespace sees only its own link (and lo).
        ip_b = subprocess.run(
            ["ip", "-n", b.name, "-o", "-4", "addr"], capture_output=True, text=True, check=True
        ).stdout
        assert b.address in ip_b and a.address not in ip_b


def test_leftovers_of_a_killed_run_are_removed_by_the_next_host() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    name, device = f"lptest-{dead.pid}-0", f"lp{dead.pid:x}-0h"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "link", "add", device, "type", "veth", "peer", "name", f"lp{dead.pid:x}-0n"], check=True)
    try:
        with Host():
            assert name not in namespaces()
            assert device not in links()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", device], capture_output=True, check=False)
