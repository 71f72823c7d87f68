"""Worker addresses, the RPC probe against stand-ins (silent, HTTP, wrong version, a fake worker), and
start_worker's failures with fake rpc-server binaries.

The real rpc-server is in tests/integration/test_worker.py.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import llamaproc
from llamaproc import Device, InvalidArgumentError, WorkerUnreachableError, probe_worker
from llamaproc.errors import BinaryNotFoundError, StartupError, StartupTimeoutError
from llamaproc.process import _worker, parse_address

Handler = Callable[[anyio.abc.SocketStream], Awaitable[None]]

HELLO = bytes([14]) + struct.pack("<Q", 24) + bytes(24)


# -- addresses ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:50052", ("127.0.0.1", 50052)),
        ("worker-1.lan:1", ("worker-1.lan", 1)),
        ("[::1]:65535", ("::1", 65535)),
        ("[fe80::1%eth0]:50052", ("fe80::1%eth0", 50052)),
    ],
)
def test_an_address_splits_into_host_and_port(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize(
    "address",
    ["", "127.0.0.1", "127.0.0.1:", ":50052", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1:5e4",
     "::1:50052", "[::1]50052", "[::1]", "[127.0.0.1]:50052", "[nothost]:1", "host name:1", " 127.0.0.1:1",
     "127.0.0.1:1 ", "http://127.0.0.1:1", "127.0.0.1:٥٠"],
)
def test_a_bad_address_is_refused_by_name(address: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse_address(address)
    assert repr(address) in str(info.value) and "host:port" in str(info.value)
    assert info.value.param == "address"


def test_an_address_must_be_a_string() -> None:
    with pytest.raises(InvalidArgumentError, match="'host:port' string"):
        parse_address(50052)  # type: ignore[arg-type]


# -- stand-ins ----------------------------------------------------------------------------------------------


@asynccontextmanager
async def stand_in(handler: Handler) -> AsyncIterator[str]:
    """A TCP server on a free loopback port running ``handler`` per connection; yields its address."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        yield f"127.0.0.1:{port}"
        tg.cancel_scope.cancel()


@contextmanager
def closed_port() -> Iterator[str]:
    """An address where nothing listens: the port is bound (so no one else takes it) but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


async def read_command(reader: BufferedByteReceiveStream) -> tuple[int, bytes]:
    cmd, size = struct.unpack("<BQ", await reader.receive_exactly(9))
    return cmd, await reader.receive_exactly(size) if size else b""


def fake_worker(memories: list[tuple[int, int]], *, version: bytes = b"\x05\x00\x00") -> Handler:
    """A stand-in that speaks the three commands of the probe: HELLO, DEVICE_COUNT, GET_DEVICE_MEMORY."""

    async def handle(stream: anyio.abc.SocketStream) -> None:
        reader = BufferedByteReceiveStream(stream)
        async with stream:
            cmd, payload = await read_command(reader)
            assert (cmd, payload) == (14, bytes(24))
            reply = version + b"\x00" + bytes(24)
            await stream.send(struct.pack("<Q", len(reply)) + reply)
            while True:
                try:
                    cmd, payload = await read_command(reader)
                except (anyio.EndOfStream, anyio.IncompleteRead):
                    return
                if cmd == 15:
                    assert payload == b""
                    await stream.send(struct.pack("<QI", 4, len(memories)))
                elif cmd == 11:
                    (index,) = struct.unpack("<I", payload)
                    free, total = memories[index]
                    await stream.send(struct.pack("<QQQ", 16, free, total))
                else:
                    return

    return handle


async def silent(stream: anyio.abc.SocketStream) -> None:
    """Accepts and says nothing, like a stopped rpc-server or one busy with another client."""
    async with stream:
        await anyio.sleep_forever()


# -- the probe ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_a_worker_answers_with_its_devices() -> None:
    gib = 1 << 30
    async with stand_in(fake_worker([(3 * gib, 8 * gib), (1 * gib, 2 * gib)])) as address:
        devices = await probe_worker(address)
    assert devices == [
        Device(name="RPC device 0", total=8 * gib, free=3 * gib),
        Device(name="RPC device 1", total=2 * gib, free=1 * gib),
    ]


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_a_silent_server_times_out_and_its_connection_is_reset() -> None:
    """The probe waits for the HELLO reply, not the connect; giving up, it resets the connection.

    A plain close would leave the HELLO queued: a real rpc-server that gets
    to it later answers a client that has gone and dies of SIGPIPE.
    """
    ended = anyio.Event()
    how: list[str] = []

    async def swallow(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            reader = BufferedByteReceiveStream(stream)
            assert await reader.receive_exactly(len(HELLO)) == HELLO
            try:
                await stream.receive()
                how.append("data")
            except anyio.EndOfStream:
                how.append("closed")
            except (anyio.BrokenResourceError, ConnectionResetError):
                how.append("reset")
            ended.set()

    async with stand_in(swallow) as address:
        with pytest.raises(WorkerUnreachableError) as info:
            await probe_worker(address, timeout=0.3)
        with anyio.fail_after(30):  # a safety net only
            await ended.wait()
    message = str(info.value)
    assert info.value.address == address
    assert f"{address} accepted the connection but did not answer within 0.3 s" in message
    assert "busy with another coordinator" in message
    assert how == ["reset"]


@pytest.mark.anyio
async def test_a_server_that_never_reads_times_out() -> None:
    async with stand_in(silent) as address:
        with pytest.raises(WorkerUnreachableError, match="did not answer within 0.2 s"):
            await probe_worker(address, timeout=0.2)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_a_refused_port_is_reported() -> None:
    with closed_port() as address:
        with pytest.raises(WorkerUnreachableError) as info:
            await probe_worker(address)
    assert str(info.value) == f"cannot connect to the rpc worker at {address}: connection refused (nothing listens on that port)"
    assert info.value.address == address


@pytest.mark.anyio
async def test_an_http_server_is_not_an_rpc_server() -> None:
    async def http(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    async with stand_in(http) as address:
        with pytest.raises(WorkerUnreachableError) as info:
            await probe_worker(address)
    assert str(info.value).startswith(f"{address} is not an rpc-server: it answered the RPC hello with b'HTTP/1.1'")
    assert "(an HTTP server)" in str(info.value)


@pytest.mark.anyio
async def test_another_protocol_major_version_is_refused() -> None:
    async with stand_in(fake_worker([(1, 2)], version=b"\x03\x00\x00")) as address:
        with pytest.raises(WorkerUnreachableError) as info:
            await probe_worker(address)
    assert "speaks RPC protocol v3.0.0, not v5" in str(info.value)


@pytest.mark.anyio
async def test_a_server_that_hangs_up_on_the_hello_is_not_a_v5_rpc_server() -> None:
    """What an rpc-server of another protocol version does with a HELLO of the wrong size."""

    async def hang_up(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()

    async with stand_in(hang_up) as address:
        with pytest.raises(WorkerUnreachableError) as info:
            await probe_worker(address)
    assert str(info.value) == (
        f"the rpc worker at {address} closed the connection instead of answering the RPC hello: "
        "not an rpc-server, or one of another protocol version (this llamaproc speaks v5)"
    )


@pytest.mark.anyio
async def test_a_nonsense_device_count_is_not_trusted() -> None:
    async with stand_in(fake_worker([])) as address:
        with pytest.raises(WorkerUnreachableError, match="is not an rpc-server: it reports 0 devices"):
            await probe_worker(address)


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), True, "1"])
@pytest.mark.anyio
async def test_a_bad_timeout_is_refused(timeout: object) -> None:
    with pytest.raises(InvalidArgumentError, match="timeout must be a positive number"):
        await probe_worker("127.0.0.1:1", timeout=timeout)  # type: ignore[arg-type]


# -- start_worker with fake binaries ------------------------------------------------------------------------


def fake_rpc_server(directory: Path, body: str) -> Path:
    """An executable named like rpc-server running the Python ``body``."""
    binary = directory / "fake-rpc-server"
    binary.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    binary.chmod(0o755)
    return binary


BIND_FAILS = """
    import sys
    print("Starting RPC server v5.0.0")
    print("Failed to create server socket", file=sys.stderr)
"""


@pytest.mark.anyio
async def test_a_given_port_that_cannot_be_bound_is_named(tmp_path: Path) -> None:
    binary = fake_rpc_server(tmp_path, BIND_FAILS)
    with pytest.raises(StartupError) as info:
        await llamaproc.start_worker(port=50999, binary=binary)
    assert str(info.value).startswith("rpc-server could not listen on 127.0.0.1:50999: the port is in use")
    assert info.value.returncode == 0  # exit codes lie: the output tells
    assert "Failed to create server socket" in info.value.output


@pytest.mark.anyio
async def test_a_free_port_taken_meanwhile_is_tried_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = fake_rpc_server(tmp_path, BIND_FAILS)
    picked: list[int] = []
    free_port = _worker._free_port

    def counting(host: str) -> int:
        picked.append(free_port(host))
        return picked[-1]

    monkeypatch.setattr(_worker, "_free_port", counting)
    with pytest.raises(StartupError) as info:
        await llamaproc.start_worker(binary=binary)
    assert len(picked) == _worker._PORT_ATTEMPTS
    assert str(info.value) == (
        f"rpc-server could not listen on 127.0.0.1 on any of the free ports tried ({', '.join(map(str, picked))})"
    )


@pytest.mark.anyio
async def test_a_worker_that_exits_during_start_up_says_why(tmp_path: Path) -> None:
    binary = fake_rpc_server(tmp_path, """
        import sys
        print("error: unknown device 'Vulkan7'", file=sys.stderr)
        sys.exit(3)
    """)
    with pytest.raises(StartupError) as info:
        await llamaproc.start_worker(binary=binary)
    assert str(info.value).splitlines()[0] == "rpc-server exited with code 3 during start-up: error: unknown device 'Vulkan7'"
    assert info.value.returncode == 3


@pytest.mark.anyio
async def test_a_worker_that_never_listens_times_out_and_is_stopped(tmp_path: Path) -> None:
    binary = fake_rpc_server(tmp_path, """
        import time
        time.sleep(60)
    """)
    with pytest.raises(StartupTimeoutError) as info:
        await llamaproc.start_worker(binary=binary, startup_timeout=0.3)
    assert "was not ready within 0.3 s (it never listened on its port)" in str(info.value)
    assert info.value.pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(info.value.pid, 0)  # stopped and reaped


@pytest.mark.anyio
async def test_a_llama_server_without_an_rpc_server_beside_it_is_reported(tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    with pytest.raises(BinaryNotFoundError, match="no ggml-rpc-server beside"):
        await llamaproc.start_worker(binary=binary)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("host", "::1", "rpc-server cannot listen on an IPv6 address"),
        ("host", "", "expected a host name or an IPv4 address"),
        ("port", 0, "port must be in 1..65535"),
        ("port", 70000, "port must be in 1..65535"),
        ("threads", 0, "threads must be a positive integer"),
        ("startup_timeout", 0, "startup_timeout must be a positive number"),
    ],
)
@pytest.mark.anyio
async def test_bad_start_options_are_refused(option: str, value: object, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message) as info:
        await llamaproc.start_worker(**{option: value})  # type: ignore[arg-type]
    assert info.value.param == option
