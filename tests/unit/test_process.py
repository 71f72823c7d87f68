"""The process layer, against fake servers (small Python scripts, see ``fakes.py``)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import psutil
import pytest
from fakes import PYTHON
from process_helpers import fake, line_value, reader_alive, survivors

from llamaproc.errors import LlamaprocError, StartupError, StartupTimeoutError
from llamaproc.process import OutputBuffer, ServerProcess

SRC = str(Path(__file__).resolve().parents[2] / "src")
BOTH_BACKENDS = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
T = TypeVar("T")


# -- helpers --------------------------------------------------------------------------------------


def dead(proc: psutil.Process) -> bool:
    """Gone, or a zombie nobody has reaped yet (it runs no code either way)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_dead(proc: psutil.Process, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dead(proc):
            return True
        time.sleep(0.01)
    return dead(proc)


def without_waiting(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end in one step and return its value; fail if it waits for anything.

    What "returns at once" means, without a clock: a coroutine that waits suspends,
    handing the event loop something to wait for.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError(f"{coro!r} waited for something")


def record_signals(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The signals the process layer sends (to the child's process group) from now on, in order."""
    sent: list[int] = []
    killpg = os.killpg

    def record(pgid: int, sig: int) -> None:
        sent.append(sig)
        killpg(pgid, sig)

    monkeypatch.setattr(os, "killpg", record)
    return sent


async def sigkill_after(pid: int, seconds: float) -> None:
    """A safety net for a test of stop() with a long grace: stop() is shielded, so end the child instead."""
    await anyio.sleep(seconds)
    os.kill(pid, signal.SIGKILL)





# -- a healthy server -----------------------------------------------------------------------------


@BOTH_BACKENDS
@pytest.mark.anyio
async def test_start_and_stop_a_healthy_server(tag: str, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    proc = await ServerProcess.start(PYTHON, fake(tag, "--pidfile", str(pidfile)), startup_timeout=10)
    try:
        assert proc.running and proc.returncode is None
        assert proc.pid == int(pidfile.read_text())
        assert proc.argv[-4:] == ["--port", "0", "--host", "127.0.0.1"]
        assert proc.port is not None and proc.port > 0
        assert proc.base_url == f"http://127.0.0.1:{proc.port}"
        assert line_value(proc, "0.00.100.000 I srv  llama_server: listening on ") == proc.base_url
        async with httpx.AsyncClient() as http:
            response = await http.get(f"{proc.base_url}/health")
        assert response.json() == {"status": "ok"}
        assert f"pid={proc.pid}" in repr(proc) and "running" in repr(proc)
    finally:
        code = await proc.stop()
    assert code == proc.returncode == -signal.SIGTERM  # it went on the first SIGTERM
    assert not proc.running
    assert "exited -15" in repr(proc)
    assert not survivors(tag)
    assert not reader_alive(proc.pid)
    assert await proc.stop() == -signal.SIGTERM  # idempotent


@BOTH_BACKENDS
@pytest.mark.anyio
async def test_stop_escalates_to_sigkill(
    tag: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = await ServerProcess.start(PYTHON, fake(tag, "--ignore-term"), startup_timeout=10)
    caplog.set_level(logging.WARNING, logger="llamaproc.process")
    sent = record_signals(monkeypatch)
    code = await proc.stop(grace=0.3)
    assert code == proc.returncode == -signal.SIGKILL
    # Two SIGTERMs, the SIGKILL, then SIGKILL to what is left of the group once the exit is seen.
    assert sent == [signal.SIGTERM, signal.SIGTERM, signal.SIGKILL, signal.SIGKILL]
    assert not survivors(tag)
    warnings = [r for r in caplog.records if r.name == "llamaproc.process" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert str(proc.pid) in message and "ignored SIGTERM for 0.3 s" in message and "SIGKILL" in message


@pytest.mark.anyio
async def test_stop_uses_the_grace_given_at_start(tag: str, caplog: pytest.LogCaptureFixture) -> None:
    proc = await ServerProcess.start(PYTHON, fake(tag, "--ignore-term"), startup_timeout=10, grace=0.2)
    caplog.set_level(logging.WARNING, logger="llamaproc.process")
    assert await proc.stop() == -signal.SIGKILL
    [warning] = [r for r in caplog.records if r.name == "llamaproc.process" and r.levelno == logging.WARNING]
    assert "ignored SIGTERM for 0.2 s; sending SIGKILL" in warning.getMessage()  # not the default 5 s


@BOTH_BACKENDS
@pytest.mark.anyio
async def test_a_child_that_exits_within_the_grace_is_not_killed(tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SIGKILL waits for the grace: a child that ignores SIGTERM but then exits by itself exits its way."""
    proc = await ServerProcess.start(PYTHON, fake(tag, "--ignore-term", "--usr1-exits", "7"), startup_timeout=10)
    sent = record_signals(monkeypatch)

    async def exit_after_the_second_sigterm() -> None:
        while sent.count(signal.SIGTERM) < 2:
            await anyio.sleep(0.01)
        os.kill(proc.pid, signal.SIGUSR1)  # long before the grace ends

    async with anyio.create_task_group() as tg:
        tg.start_soon(exit_after_the_second_sigterm)
        tg.start_soon(sigkill_after, proc.pid, 30)
        code = await proc.stop(grace=3600)
        tg.cancel_scope.cancel()
    assert code == proc.returncode == 7
    assert sent == [signal.SIGTERM, signal.SIGTERM, signal.SIGKILL]  # the SIGKILL to the group after the exit
    assert not survivors(tag)


# -- start-up failures ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_exit_during_startup_raises_at_once(tag: str) -> None:
    args = fake(tag, "--say", "I loading model", "--say", "error: invalid magic characters",
                "--say", "I cleaning up", "--exit", "3")
    # Safety net only: waiting for the start-up timeout would hang for an hour.
    with anyio.fail_after(30), pytest.raises(StartupError) as info:
        await ServerProcess.start(PYTHON, args, startup_timeout=3600)
    exc = info.value
    assert type(exc) is StartupError  # the exit, not a timeout
    assert exc.returncode == 3
    assert exc.pid is not None
    assert "code 3" in str(exc)
    assert "error: invalid magic characters" in str(exc)
    assert "error: invalid magic characters" in exc.output
    assert "I cleaning up" in exc.output  # the last lines come along too
    assert not survivors(tag)


@pytest.mark.anyio
async def test_timeout_counts_from_the_last_line(tag: str) -> None:
    """Printing progress keeps a slow start alive past ``startup_timeout``; silence for it ends the start.

    The fake prints a line every 0.1 s for 1.5 s (its own sleeps make that phase last at least that
    long), then "progress done", then nothing.
    """
    with anyio.fail_after(30), pytest.raises(StartupTimeoutError) as info:
        await ServerProcess.start(PYTHON, fake(tag, "--progress", "1.5", "--never-listen"), startup_timeout=1.0)
    exc = info.value
    lines = exc.output.splitlines()
    assert "loading tensor" in exc.output
    # Not ended while it printed (longer than startup_timeout): only once it had fallen silent.
    assert lines[-1] == "progress done", lines[-3:]
    assert "no progress for 1 s" in str(exc)
    assert "never said which port" in str(exc)
    assert not survivors(tag)  # stopped before the error reached us


@pytest.mark.anyio
async def test_start_waits_while_the_server_answers_loading(tag: str) -> None:
    proc = await ServerProcess.start(PYTHON, fake(tag, "--loading", "0.5"), startup_timeout=10)
    try:
        with anyio.fail_after(30):  # the fake logs its answer just before sending it: let the reader catch up
            while "request /health 200" not in proc.output.lines():
                await anyio.sleep(0.01)
        lines = proc.output.lines()
        assert "request /health 503" in lines
        assert lines[-1] == "request /health 200"
        assert lines.count("request /health 200") == 1
    finally:
        await proc.stop()


@pytest.mark.anyio
async def test_port_found_without_the_log_line(tag: str) -> None:
    proc = await ServerProcess.start(PYTHON, fake(tag, "--quiet"), startup_timeout=10)
    try:
        assert not any("listening on" in line for line in proc.output.lines())
        assert proc.port is not None
        assert psutil.Process(proc.pid).net_connections(kind="tcp")[0].laddr.port == proc.port
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{proc.base_url}/health")).status_code == 200
    finally:
        await proc.stop()


@BOTH_BACKENDS
@pytest.mark.anyio
async def test_cancelled_start_stops_the_child(tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[ServerProcess] = []
    init = ServerProcess.__init__

    def record(self: ServerProcess, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(ServerProcess, "__init__", record)
    returned: list[ServerProcess] = []

    async def start() -> None:
        returned.append(await ServerProcess.start(PYTHON, fake(tag, "--never-listen"), startup_timeout=3600))

    with anyio.fail_after(30):  # safety net: stop() after the cancellation must not hang
        async with anyio.create_task_group() as tg:
            tg.start_soon(start)
            while not started:  # the child runs; start() waits for it to listen, which it never does
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert returned == []
    [proc] = started
    assert proc.returncode is not None and not proc.running
    assert not survivors(tag)
    assert not reader_alive(proc.pid)


@pytest.mark.anyio
async def test_missing_binary(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-llama-server"
    with pytest.raises(LlamaprocError) as info:
        await ServerProcess.start(missing, startup_timeout=1)
    assert isinstance(info.value, StartupError)
    assert str(missing) in str(info.value)
    assert "No such file" in str(info.value)


@pytest.mark.anyio
async def test_binary_not_executable(tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    with pytest.raises(StartupError, match="Permission denied") as info:
        await ServerProcess.start(binary, startup_timeout=1)
    assert str(binary) in str(info.value)


# -- environment ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "0"),
        ({"devices": "1,2"}, "1,2"),
        ({"devices": None}, "7"),
        ({"env": {"HIP_VISIBLE_DEVICES": "1"}}, "1"),
        ({"devices": "2", "env": {"HIP_VISIBLE_DEVICES": "1"}}, "1"),
    ],
)
@pytest.mark.anyio
async def test_hip_visible_devices(tag: str, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, object],
                                   expected: str) -> None:
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "7")
    proc = await ServerProcess.start(
        PYTHON, fake(tag, "--print-env", "HIP_VISIBLE_DEVICES"), startup_timeout=10, **kwargs  # type: ignore[arg-type]
    )
    try:
        assert line_value(proc, "env HIP_VISIBLE_DEVICES=") == expected
    finally:
        await proc.stop()
    assert os.environ["HIP_VISIBLE_DEVICES"] == "7"  # ours is untouched


@pytest.mark.anyio
async def test_env_is_added_to_ours(tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAPROC_TEST_PARENT", "inherited")
    proc = await ServerProcess.start(PYTHON, fake(tag, "--print-env", "LLAMAPROC_TEST_PARENT"),
                                     env={"LLAMAPROC_TEST_CHILD": "x"}, startup_timeout=10)
    await proc.stop()
    assert line_value(proc, "env LLAMAPROC_TEST_PARENT=") == "inherited"


# -- output -------------------------------------------------------------------------------------


def test_output_buffer_keeps_head_and_tail() -> None:
    buf = OutputBuffer(head=3, tail=4)
    for i in range(20):
        buf.append(f"line {i}\n".encode())
    assert buf.line_count == 20
    assert buf.lines() == ["line 0", "line 1", "line 2", "... 13 lines omitted ...",
                           "line 16", "line 17", "line 18", "line 19"]
    assert buf.text() == "\n".join(buf.lines())


def test_output_buffer_without_overflow_has_no_marker() -> None:
    buf = OutputBuffer(head=3, tail=4)
    for i in range(7):
        buf.append(f"line {i}\r\n".encode())
    assert buf.lines() == [f"line {i}" for i in range(7)]
    assert "omitted" not in buf.text()


def test_output_buffer_relevant_lines() -> None:
    buf = OutputBuffer(head=2, tail=2)
    buf.append(b"0.00.001.000 I srv  load_model: loading model\n")
    buf.append(b"0.00.001.000 I srv  ok\n")
    buf.append(b"0.00.002.000 E llama_model_load: error loading model: invalid magic\n")  # falls out
    for i in range(10):
        buf.append(f"0.00.003.000 I srv  noise {i}\n".encode())
    buf.append(b"GGML_ASSERT(x) failed\n")
    buf.append(b"terminate called after throwing an instance of 'std::out_of_range'\n")
    buf.append(b"  what():  _Map_base::at\n")
    buf.append(b"Segmentation fault\n")
    buf.append(b"the end\n")
    assert "invalid magic" not in "".join(buf.lines()[:2] + buf.lines()[-2:])
    assert buf.relevant() == [
        "0.00.002.000 E llama_model_load: error loading model: invalid magic",
        "GGML_ASSERT(x) failed",
        "terminate called after throwing an instance of 'std::out_of_range'",
        "  what():  _Map_base::at",
        "Segmentation fault",
    ]
    summary = buf.summary(tail=2).splitlines()
    assert summary[0] == "0.00.002.000 E llama_model_load: error loading model: invalid magic"
    assert summary[-1] == "the end"
    assert len(summary) == len(set(summary)) == 6  # 5 relevant + "the end", no duplicates


def test_output_buffer_long_and_broken_lines() -> None:
    buf = OutputBuffer()
    buf.append(b"x" * 10_000 + b"\n")
    buf.append(b"caf\xc3\xa9 \xff\n")
    long, broken = buf.lines()
    assert len(long) == 4096
    assert broken == "café \ufffd"


@pytest.mark.anyio
async def test_output_is_forwarded_to_a_logger(tag: str, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.llama")
    caplog.set_level(logging.DEBUG, logger="test.llama")
    lines = [
        "0.00.001.000 E srv  load: something broke",
        "0.00.002.000 W srv  llama_server: CORS is open",
        "0.00.003.000 I srv  load_model: loading model",
        "0.00.004.000 D srv  params: n_ctx = 2048",
        "AMX is not ready to be used!",
    ]
    args = fake(tag, *[a for line in lines for a in ("--say", line)])
    proc = await ServerProcess.start(PYTHON, args, startup_timeout=10, logger=logger)
    await proc.stop()
    got = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "test.llama"]
    prefix = f"[{proc.pid}] "
    assert got[:5] == [
        (logging.ERROR, prefix + lines[0]),
        (logging.WARNING, prefix + lines[1]),
        (logging.INFO, prefix + lines[2]),
        (logging.DEBUG, prefix + lines[3]),
        (logging.INFO, prefix + lines[4]),
    ]
    assert any("listening on" in message for _, message in got[5:])


# -- no orphans ---------------------------------------------------------------------------------


# (A SIGKILLed parent takes its child with it: test_process_edges.py, on both spawn paths.)


@pytest.mark.parametrize("ignores_term", [False, True], ids=["plain", "ignores-sigterm"])
@pytest.mark.anyio
async def test_stop_kills_the_process_group(tag: str, ignores_term: bool) -> None:
    options = ["--grandchild"] + (["--grandchild-ignores-term"] if ignores_term else [])
    proc = await ServerProcess.start(PYTHON, fake(tag, *options), startup_timeout=10)
    grandchild = psutil.Process(int(line_value(proc, "grandchild ")))
    try:
        assert grandchild.name() == "sleep" and not dead(grandchild)
        await proc.stop(grace=2.0)
        # The output pipe, which the grandchild shared, was closed when stop() returned: it did not
        # give up on the output thread (it waits up to 2 s for it).
        assert not reader_alive(proc.pid)
        assert proc.returncode == -signal.SIGTERM  # the child went on SIGTERM
        assert wait_dead(grandchild, 10.0), "the grandchild survived stop()"
    finally:
        if not dead(grandchild):
            grandchild.kill()


@pytest.mark.anyio
async def test_exit_during_startup_does_not_block_the_event_loop(
    tag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grandchild holding the output pipe open must not stall other tasks.

    The output thread is joined (for up to 1 s) to collect the last lines. Each join here first
    waits until a task of the event loop has run: true only if the join does not block the loop.
    """
    pending: list[threading.Event] = []
    loop_ran: list[bool] = []
    init = ServerProcess.__init__

    def record(self: ServerProcess, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        join = self._reader.join

        def join_while_the_loop_runs(timeout: float | None = None) -> None:
            woken = threading.Event()
            pending.append(woken)
            loop_ran.append(woken.wait(10))
            join(timeout)

        self._reader.join = join_while_the_loop_runs  # type: ignore[method-assign]

    async def tick() -> None:
        while True:
            for woken in pending:
                woken.set()
            await anyio.sleep(0.01)

    monkeypatch.setattr(ServerProcess, "__init__", record)
    args = fake(tag, "--grandchild", "--say", "error: bad", "--exit", "2")
    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        with pytest.raises(StartupError) as info:
            await ServerProcess.start(PYTHON, args, startup_timeout=10)
        tg.cancel_scope.cancel()
    assert info.value.returncode == 2
    assert "error: bad" in str(info.value)
    pid = int(next(line for line in info.value.output.splitlines() if line.startswith("grandchild "))[11:])
    try:
        grandchild = psutil.Process(pid)
    except psutil.NoSuchProcess:
        pass
    else:  # SIGKILL was sent by stop(); the kernel may take a moment to finish it off
        assert wait_dead(grandchild, 10.0), "the grandchild survived a failed start"
    assert loop_ran and all(loop_ran)  # the output thread was joined while the event loop ran on


# -- progress during start-up ---------------------------------------------------------------------

# A fake for start-up behaviours fakes.py does not have; ``--mode``:
#   loading     print one line, then answer /health with 503 "Loading model" forever, printing nothing
#               and never the "listening on" line (the port is found from the socket)
#   busy        burn CPU silently for ``--seconds``, then serve
#   reading     read /dev/zero slowly and silently (little CPU) for ``--seconds``, then serve
#   two-terms   serve; ignore the first SIGTERM, exit with code 1 on the second (as llama-server does
#               while a request is in flight)
STARTUP_FAKE = r"""
import argparse, http.server, os, signal, sys, time

p = argparse.ArgumentParser()
p.add_argument("--tag")
p.add_argument("--mode")
p.add_argument("--seconds", type=float, default=0.0)
p.add_argument("--port", type=int, default=0)
p.add_argument("--host", default="127.0.0.1")
a = p.parse_args()

loading = a.mode == "loading"
if loading:
    print("0.00.001.000 I srv    load_model: loading model 'big.gguf'", file=sys.stderr, flush=True)
elif a.mode == "busy":
    end = time.monotonic() + a.seconds
    while time.monotonic() < end:
        pass
elif a.mode == "reading":
    end = time.monotonic() + a.seconds
    with open("/dev/zero", "rb", buffering=0) as f:
        while time.monotonic() < end:
            f.read(65536)
            time.sleep(0.01)
elif a.mode == "two-terms":
    terms = []

    def on_term(signum, frame):
        terms.append(signum)
        if len(terms) == 2:
            os._exit(1)

    signal.signal(signal.SIGTERM, on_term)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if loading:
            code, body = 503, b'{"error":{"code":503,"message":"Loading model"}}'
        else:
            code, body = 200, b'{"status":"ok"}'
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer((a.host, a.port), Handler)
if not loading:
    print(f"0.00.100.000 I srv  llama_server: listening on http://{a.host}:{server.server_address[1]}",
          file=sys.stderr, flush=True)
server.serve_forever()
"""


def startup_fake(tag: str, mode: str, seconds: float = 0.0) -> list[str]:
    return ["-c", STARTUP_FAKE, "--tag", tag, "--mode", mode, "--seconds", str(seconds)]


@pytest.mark.anyio
async def test_answering_loading_forever_is_not_progress(tag: str) -> None:
    """A server that says "loading" (503) forever and does nothing else times out."""
    with anyio.fail_after(30), pytest.raises(StartupTimeoutError) as info:  # safety net: it must not wait for ever
        await ServerProcess.start(PYTHON, startup_fake(tag, "loading"), startup_timeout=1.0)
    assert "no progress for 1 s" in str(info.value)
    assert "loading model" in info.value.output
    assert not survivors(tag)


@pytest.mark.parametrize("mode", ["busy", "reading"])
@pytest.mark.anyio
async def test_silent_cpu_or_reads_count_as_progress(tag: str, mode: str) -> None:
    """Loading a big model prints nothing for a long time, but uses the CPU or reads the file.

    The fake is silent for 1.5 s (its own clock) before it listens: three times ``startup_timeout``.
    """
    proc = await ServerProcess.start(PYTHON, startup_fake(tag, mode, 1.5), startup_timeout=0.5)
    try:
        assert proc.running and proc.port is not None
    finally:
        await proc.stop()


# -- stopping ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_second_sigterm_comes_before_the_grace_ends(tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama-server with a request in flight ignores one SIGTERM for ~30 s and exits on the second.

    (How soon the second one comes shows in bench/: ``close_latency.queued``.)
    """
    proc = await ServerProcess.start(PYTHON, startup_fake(tag, "two-terms"), startup_timeout=10)
    sent = record_signals(monkeypatch)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sigkill_after, proc.pid, 30)
        code = await proc.stop(grace=3600)
        tg.cancel_scope.cancel()
    assert code == 1  # its exit on the second SIGTERM, not a SIGKILL after the grace
    assert sent == [signal.SIGTERM, signal.SIGTERM, signal.SIGKILL]  # the SIGKILL to the group after the exit


@BOTH_BACKENDS
@pytest.mark.anyio
async def test_repeated_stop_returns_at_once_and_signals_nothing(
    tag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = await ServerProcess.start(PYTHON, fake(tag), startup_timeout=10)
    sent: list[tuple[int, int]] = []
    killpg = os.killpg

    def record(pgid: int, sig: int) -> None:
        sent.append((pgid, sig))
        killpg(pgid, sig)

    monkeypatch.setattr(os, "killpg", record)
    assert await proc.stop() == -signal.SIGTERM
    # SIGTERM, then SIGKILL to what is left of the group when the exit is seen: once.
    assert sent == [(proc.pid, signal.SIGTERM), (proc.pid, signal.SIGKILL)]
    sent.clear()
    for _ in range(3):
        assert without_waiting(proc.stop()) == -signal.SIGTERM
    assert proc.returncode == -signal.SIGTERM and not proc.running
    # The group id may name someone else's group by now: nothing is sent to it any more.
    assert sent == []


@pytest.mark.anyio
async def test_concurrent_stops_stop_once(tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = await ServerProcess.start(PYTHON, fake(tag, "--ignore-term"), startup_timeout=10, grace=0.3)
    sent: list[int] = []
    killpg = os.killpg

    def record(pgid: int, sig: int) -> None:
        sent.append(sig)
        killpg(pgid, sig)

    monkeypatch.setattr(os, "killpg", record)
    codes: list[int | None] = []

    async def stop() -> None:
        codes.append(await proc.stop())

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(stop)
    assert codes == [-signal.SIGKILL] * 3
    assert sent == [signal.SIGTERM, signal.SIGTERM, signal.SIGKILL, signal.SIGKILL]


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.anyio
async def test_no_descriptor_outlives_start_up_but_the_output_pipe(tag: str) -> None:
    """The wake-up pipe is closed when start() returns, even while a grandchild holds the output open."""
    before = _fds()
    proc = await ServerProcess.start(PYTHON, fake(tag, "--grandchild"), startup_timeout=10)
    try:
        new = _fds() - before
        targets = {os.readlink(f"/proc/self/fd/{fd}") for fd in new if os.path.exists(f"/proc/self/fd/{fd}")}
        assert len(new) == 1 and all(t.startswith("pipe:") for t in targets), targets  # the child's output
    finally:
        await proc.stop()
    assert not reader_alive(proc.pid)
    assert _fds() - before == set()


@pytest.mark.anyio
async def test_failed_start_leaves_no_descriptor(tag: str) -> None:
    before = _fds()
    with pytest.raises(StartupError):
        await ServerProcess.start(PYTHON, fake(tag, "--say", "error: bad", "--exit", "2"), startup_timeout=10)
    assert _fds() - before == set()


# -- the address ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "connect"), [("127.0.0.2", "127.0.0.2"), ("0.0.0.0", "127.0.0.1")])
@pytest.mark.parametrize("quiet", [False, True], ids=["from-log", "from-args"])
@pytest.mark.anyio
async def test_host_given_in_args_is_used(tag: str, quiet: bool, host: str, connect: str) -> None:
    """``--host`` in args: the child listens there, and base_url must say so (not 127.0.0.1)."""
    args = fake(tag, "--host", host, *(["--quiet"] if quiet else []))
    proc = await ServerProcess.start(PYTHON, args, startup_timeout=5)
    try:
        assert proc.argv.count("--host") == 1
        assert proc.base_url == f"http://{connect}:{proc.port}"
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{proc.base_url}/health")).status_code == 200
    finally:
        await proc.stop()


IPV6_FAKE = r"""
import http.server, socket, sys

class Server(http.server.HTTPServer):
    address_family = socket.AF_INET6

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass

server = Server(("::1", 0), Handler)
print(f"0.00.100.000 I srv  llama_server: listening on http://[::1]:{server.server_address[1]}", flush=True)
server.serve_forever()
"""


@pytest.mark.anyio
async def test_ipv6_address_from_the_log(tag: str) -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    proc = await ServerProcess.start(PYTHON, ["-c", IPV6_FAKE, tag], startup_timeout=5)
    try:
        assert proc.host == "::1"
        assert proc.base_url == f"http://[::1]:{proc.port}"
    finally:
        await proc.stop()
