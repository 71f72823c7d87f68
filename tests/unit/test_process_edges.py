"""The process layer's edge cases: failures right after the spawn, finalizers, the setpriv spawn, long lines.

Against fake servers (small Python scripts, see ``fakes.py``).
"""

from __future__ import annotations

import errno
import gc
import io
import os
import re
import select
import signal
import subprocess
import textwrap
import threading
import time
import tracemalloc
import warnings
import weakref
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from fakes import FAKE_SERVER, PARENT, PYTHON
from process_helpers import fake, line_value, reader_alive, survivors

import llamaproc
from llamaproc import LlamaClient, TextModel
from llamaproc.backend import Backend
from llamaproc.errors import StartupError
from llamaproc.process import OutputBuffer, ServerProcess, _process

SRC = str(Path(__file__).resolve().parents[2] / "src")

#: The fake server, but first it prints its parent-death signal (PR_GET_PDEATHSIG) and its parent's pid.
PDEATHSIG_SERVER = textwrap.dedent(
    """
    import ctypes, os, sys
    _v = ctypes.c_int()
    ctypes.CDLL(None).prctl(2, ctypes.byref(_v), 0, 0, 0)
    print(f"pdeathsig {_v.value}", file=sys.stderr, flush=True)
    print(f"ppid {os.getppid()}", file=sys.stderr, flush=True)
    """
) + FAKE_SERVER

#: The fake server, but first it prints one line of ``sys.argv[1]`` MiB (with its newline only at the end).
HUGE_LINE_SERVER = textwrap.dedent(
    """
    import sys
    _n = int(sys.argv.pop(1)) << 20
    sys.stderr.buffer.write(b"huge " + b"x" * (_n - 5))
    sys.stderr.buffer.flush()
    sys.stderr.buffer.write(b"\\n")
    sys.stderr.buffer.flush()
    """
) + FAKE_SERVER


# -- helpers --------------------------------------------------------------------------------------


def gone(pid: int) -> bool:
    """The process is reaped, or a zombie (it runs no code either way)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def wait_gone(pid: int) -> None:
    with anyio.fail_after(30):  # a safety net only
        while not gone(pid):
            await anyio.sleep(0.01)


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(params=["setpriv", "preexec"])
def spawn_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with the child spawned through setpriv, then with the preexec_fn (a full fork)."""
    path: str = request.param
    if path == "preexec":
        monkeypatch.setenv(_process.ENV_NO_SETPRIV, "1")
    else:
        monkeypatch.delenv(_process.ENV_NO_SETPRIV, raising=False)
        if _process._setpriv() is None:
            pytest.skip("no setpriv with --pdeathsig on this machine (the preexec_fn path is used)")
    return path


def fake_llama_server(directory: Path) -> Path:
    """An executable that stands in for llama-server: the fake server, ignoring options it does not know."""
    binary = directory / "llama-server"
    script = FAKE_SERVER.replace("a = p.parse_args()", "a, _ = p.parse_known_args()")
    binary.write_text(f"#!{PYTHON}\n{script}")
    binary.chmod(0o755)
    return binary


# -- a failure right after the spawn -------------------------------------------------------------------


class _InjectedError(Exception):
    pass


@pytest.mark.parametrize("step", ["pipe", "thread"])
@pytest.mark.anyio
async def test_a_failure_after_the_spawn_kills_the_child(
    tag: str, step: str, spawn_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors or threads once the child runs: it is killed and reaped before the error is raised."""
    spawned: list[subprocess.Popen[bytes]] = []

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EMFILE, "Too many open files") if step == "pipe" else RuntimeError("can't start new thread")

    class Popen(subprocess.Popen[bytes]):
        def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
            super().__init__(args, *rest, **kwargs)
            if tag in args:  # the fake server, not setpriv's trial run: the next step fails
                spawned.append(self)
                if step == "pipe":
                    monkeypatch.setattr(os, "pipe", fail)
                else:
                    monkeypatch.setattr(threading.Thread, "start", fail)

    before = fds()
    monkeypatch.setattr(subprocess, "Popen", Popen)
    try:
        with pytest.raises(StartupError, match="cannot watch") as info:
            await ServerProcess.start(PYTHON, fake(tag, "--never-listen"), startup_timeout=10)
    finally:
        monkeypatch.undo()
    [popen] = spawned
    assert isinstance(info.value.__cause__, OSError if step == "pipe" else RuntimeError)
    assert info.value.pid == popen.pid
    assert popen.returncode == -signal.SIGKILL  # killed and reaped
    assert not psutil.pid_exists(popen.pid)
    assert not reader_alive(popen.pid)
    assert fds() == before  # the output pipe and any wake pipe are closed


# -- closing a model ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_close_stops_the_child_when_closing_the_client_fails(tag: str, tmp_path: Path) -> None:
    class BrokenClient(LlamaClient):
        async def aclose(self) -> None:
            await super().aclose()
            raise RuntimeError("the client broke while closing")

    proc = await ServerProcess.start(PYTHON, fake(tag), startup_timeout=10)
    backend = Backend(binary=Path(PYTHON), flavour="cpu")
    model = TextModel(proc, BrokenClient(proc.base_url), path=tmp_path / "m.gguf", backend=backend)
    with pytest.raises(RuntimeError, match="broke while closing"):
        await model.close()
    assert model.closed
    assert proc.returncode == -signal.SIGTERM
    assert gone(proc.pid) and not survivors(tag)
    assert not reader_alive(proc.pid)


# -- finalizers ------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_unclosed_model_is_killed_with_a_warning(tmp_path: Path) -> None:
    binary = fake_llama_server(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    model = await llamaproc.load_model(tmp_path / "m.gguf", binary=binary, startup_timeout=10)
    pid = model.pid
    assert not gone(pid)
    ref = weakref.ref(model)
    with pytest.warns(ResourceWarning) as record:
        del model
        gc.collect()
    assert ref() is None  # nothing keeps a dropped model alive
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages  # the model's warning only, not also its process's
    assert messages[0].startswith(f"unclosed TextModel m.gguf (llama-server pid {pid})")
    await wait_gone(pid)
    with anyio.fail_after(30):
        while reader_alive(pid):
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_a_closed_model_leaves_nothing_to_finalize(tmp_path: Path) -> None:
    binary = fake_llama_server(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    model = await llamaproc.load_model(tmp_path / "m.gguf", binary=binary, startup_timeout=10)
    await model.close()
    ref = weakref.ref(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        del model
        gc.collect()
    assert ref() is None
    assert [str(w.message) for w in record] == []


@pytest.mark.anyio
async def test_an_unstopped_server_process_is_killed_with_a_warning(tag: str) -> None:
    proc = await ServerProcess.start(PYTHON, fake(tag, "--grandchild"), startup_timeout=10)
    pid = proc.pid
    grandchild = int(line_value(proc, "grandchild "))
    ref = weakref.ref(proc)
    with pytest.warns(ResourceWarning, match=f"unstopped ServerProcess pid {pid}"):
        del proc
        gc.collect()
    assert ref() is None  # the output thread does not keep it alive
    await wait_gone(pid)
    await wait_gone(grandchild)  # the whole group


@pytest.mark.anyio
async def test_a_stopped_or_exited_server_process_does_not_warn(tag: str) -> None:
    stopped = await ServerProcess.start(PYTHON, fake(tag), startup_timeout=10)
    await stopped.stop()
    exited = await ServerProcess.start(PYTHON, fake(tag), startup_timeout=10)
    os.kill(exited.pid, signal.SIGKILL)  # exits by itself, never stopped
    with anyio.fail_after(30):  # its exit is seen (and reaped) by its owner
        await exited.wait()
    ours = re.compile(rf"\b(?:ServerProcess pid|subprocess) (?:{stopped.pid}|{exited.pid})\b")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        del stopped, exited
        gc.collect()
    # Only these two count: garbage of earlier tests may be collected here too.
    assert [str(w.message) for w in record if ours.search(str(w.message))] == []


@pytest.mark.anyio
async def test_kill_is_immediate_and_stop_after_it_only_waits(tag: str) -> None:
    proc = await ServerProcess.start(PYTHON, fake(tag, "--ignore-term", "--grandchild"), startup_timeout=10)
    grandchild = int(line_value(proc, "grandchild "))
    assert proc.kill_and_reap() == -signal.SIGKILL
    assert gone(proc.pid)
    await wait_gone(grandchild)
    assert await proc.stop() == -signal.SIGKILL
    assert proc.kill_and_reap() == -signal.SIGKILL  # idempotent


EXIT_SCRIPT = textwrap.dedent(
    """
    import sys, anyio, llamaproc

    async def main():
        global model
        model = await llamaproc.load_model(sys.argv[1], binary=sys.argv[2], startup_timeout=10)
        print(model.pid, flush=True)

    anyio.run(main)
    # The interpreter exits with the model still referenced and never closed.
    """
)


def test_an_unclosed_model_is_killed_at_interpreter_exit(tmp_path: Path) -> None:
    binary = fake_llama_server(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run(
        [PYTHON, "-W", "always::ResourceWarning", "-c", EXIT_SCRIPT, str(tmp_path / "m.gguf"), str(binary)],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout)
    assert f"ResourceWarning: unclosed TextModel m.gguf (llama-server pid {pid})" in done.stderr, done.stderr
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert gone(pid)


# -- spawning through setpriv ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_child_has_the_death_signal_and_its_own_pid(
    tag: str, tmp_path: Path, spawn_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned: list[tuple[list[str], object]] = []

    class Popen(subprocess.Popen[bytes]):
        def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
            spawned.append((list(args), kwargs.get("preexec_fn")))
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", Popen)
    pidfile = tmp_path / "pid"
    args = ["-c", PDEATHSIG_SERVER, "--tag", tag, "--pidfile", str(pidfile)]
    proc = await ServerProcess.start(PYTHON, args, startup_timeout=10)
    try:
        command, preexec = spawned[-1]
        if spawn_path == "setpriv":  # no preexec_fn, so that CPython can vfork
            assert os.path.basename(command[0]) == "setpriv" and preexec is None
            assert command[command.index("--") + 1:][-len(proc.argv):] == proc.argv
        else:
            assert command == proc.argv and preexec is not None
        assert line_value(proc, "pdeathsig ") == str(int(signal.SIGKILL))
        assert line_value(proc, "ppid ") == str(os.getpid())
        assert proc.pid == int(pidfile.read_text())  # setpriv and sh exec in place
        assert proc.argv == [PYTHON, *args, "--port", "0", "--host", "127.0.0.1"]  # what we ran, unwrapped
        assert psutil.Process(proc.pid).cmdline() == proc.argv
        assert os.getpgid(proc.pid) == proc.pid  # it leads its own process group
    finally:
        await proc.stop()


def test_the_wrapper_refuses_to_start_the_binary_for_another_parent(tmp_path: Path) -> None:
    """If this process died before setpriv set the signal, the orphan must not run llama-server."""
    if _process._setpriv() is None:
        pytest.skip("no setpriv with --pdeathsig on this machine")
    marker = tmp_path / "ran"
    argv = [PYTHON, "-c", f"open({str(marker)!r}, 'w').close()"]
    ours, _ = _process._spawn_command(argv, env=os.environ, cwd=None)
    assert subprocess.run(ours, check=False).returncode == 0 and marker.exists()  # our own child runs
    marker.unlink()
    # The same command line as if it had been built by a parent that is now gone (pid 1 adopted the child).
    orphan = [part.replace(f"= {os.getpid()} ]", "= 1 ]") for part in ours]
    assert orphan != ours
    assert subprocess.run(orphan, check=False).returncode == 1
    assert not marker.exists()


def test_without_setpriv_the_preexec_fn_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _process._setpriv.cache_clear()
    try:
        monkeypatch.setenv("PATH", str(tmp_path))  # no setpriv there
        monkeypatch.delenv(_process.ENV_NO_SETPRIV, raising=False)
        command, preexec = _process._spawn_command([PYTHON], env=os.environ, cwd=None)
        assert command == [PYTHON] and preexec is not None
    finally:
        _process._setpriv.cache_clear()


@pytest.mark.anyio
async def test_a_binary_named_without_a_path_is_found_on_the_childs_path(tag: str, spawn_path: str) -> None:
    name = os.path.basename(PYTHON)
    path = os.path.dirname(PYTHON)
    proc = await ServerProcess.start(name, fake(tag), env={"PATH": path}, startup_timeout=10)
    try:
        assert proc.argv[0] == name
        assert psutil.Process(proc.pid).exe() == os.path.realpath(PYTHON)
    finally:
        await proc.stop()


@pytest.mark.parametrize("kind", ["missing", "not-executable", "directory"])
@pytest.mark.anyio
async def test_a_binary_that_cannot_run_fails_as_exec_would(tmp_path: Path, spawn_path: str, kind: str) -> None:
    binary = tmp_path / "llama-server"
    if kind == "not-executable":
        binary.write_text("#!/bin/sh\n")
    elif kind == "directory":
        binary.mkdir()
    with pytest.raises(StartupError) as info:
        await ServerProcess.start(binary, startup_timeout=5)
    assert str(info.value).startswith(f"cannot start {binary}: ")
    assert ("No such file" if kind == "missing" else "Permission denied") in str(info.value)


def test_the_child_dies_with_its_parent(tag: str, spawn_path: str) -> None:
    """PR_SET_PDEATHSIG on both spawn paths: a SIGKILLed parent takes its child with it."""
    env = {**os.environ, "PYTHONPATH": SRC}
    parent = subprocess.Popen([PYTHON, "-c", PARENT, FAKE_SERVER, "--tag", tag],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert parent.stdout is not None
        ready, _, _ = select.select([parent.stdout], [], [], 30)
        assert ready, "the parent did not start its server"
        child = psutil.Process(int(parent.stdout.readline()))
        assert child.ppid() == parent.pid and not gone(child.pid)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 30  # a safety net only
        while not gone(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gone(child.pid), "the child outlived its parent"
    finally:
        parent.kill()
        parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()


# -- long lines -----------------------------------------------------------------------------------------------


class _Owner:
    """Stands in for the ServerProcess the output thread reports to."""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.reports = 0
        self.wakes = 0

    @property
    def _last_progress(self) -> float:
        return 0.0

    @_last_progress.setter
    def _last_progress(self, value: float) -> None:
        self.reports += 1

    def _wake(self) -> None:
        self.wakes += 1

    def _close_wake_writer(self) -> None:
        pass


def test_a_huge_line_is_read_in_bounded_pieces() -> None:
    huge = 32 << 20
    data = (
        b"0.00.001.000 I first\n"
        + b"huge " + b"x" * huge + b" listening on http://127.0.0.7:1111\n"  # not a line of its own: ignored
        + b"0.00.100.000 I srv  llama_server: listening on http://127.0.0.9:4321\n"
        + b"last line without a newline"
    )
    stdout = io.BufferedReader(io.BytesIO(data))  # type: ignore[arg-type]
    del data
    owner = _Owner()
    output = OutputBuffer()
    ref: Any = weakref.ref(owner)
    tracemalloc.start()
    try:
        _process._drain(ref, stdout, output, None, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"reading a {huge >> 20} MiB line took {peak / (1 << 20):.1f} MiB"
    first, long, listening, last = output.lines()
    assert first == "0.00.001.000 I first"
    assert long == "huge " + "x" * (4096 - 5)  # its first piece, cut to the kept line length
    assert listening.endswith("listening on http://127.0.0.9:4321")
    assert last == "last line without a newline"
    assert (owner.host, owner.port) == ("127.0.0.9", 4321)
    assert owner.reports >= huge // _process._READ_LIMIT  # every piece counts as progress
    assert stdout.closed


@pytest.mark.anyio
async def test_start_sees_the_listening_line_after_a_huge_line(tag: str) -> None:
    args = ["-c", HUGE_LINE_SERVER, "16", "--tag", tag]
    proc = await ServerProcess.start(PYTHON, args, startup_timeout=10)
    try:
        lines = proc.output.lines()
        assert lines[0] == "huge " + "x" * (4096 - 5)
        assert line_value(proc, "0.00.100.000 I srv  llama_server: listening on ") == proc.base_url
    finally:
        await proc.stop()

