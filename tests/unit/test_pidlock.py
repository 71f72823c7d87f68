from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from llamaproc import AlreadyRunningError
from llamaproc.errors import LlamaprocError, UsageError
from llamaproc.runtime import PidLock, read_pid

SRC = str(Path(__file__).resolve().parents[2] / "src")

HOLDER = """
import sys, time
from llamaproc.runtime import PidLock
lock = PidLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


@contextmanager
def holder(path: Path) -> Iterator[subprocess.Popen[str]]:
    """A separate process that holds the lock on ``path`` until killed."""
    env = {**os.environ, "PYTHONPATH": SRC}
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True, env=env
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "locked\n"
            yield proc
        finally:
            proc.kill()
            proc.wait()


def test_acquire_writes_pid_and_release_removes_file(tmp_path: Path) -> None:
    path = tmp_path / "serve.pid"
    lock = PidLock(path)
    lock.acquire()
    assert lock.locked
    assert path.read_text() == f"{os.getpid()}\n"
    lock.release()
    assert not lock.locked
    assert not path.exists()
    lock.release()  # releasing again is harmless


def test_context_manager(tmp_path: Path) -> None:
    path = tmp_path / "serve.pid"
    with PidLock(path) as lock:
        assert lock.locked
        assert read_pid(path) == os.getpid()
    assert not path.exists()
    assert read_pid(path) is None


def test_creates_parent_directories_private(tmp_path: Path) -> None:
    path = tmp_path / "run" / "llamaproc" / "serve.pid"
    with PidLock(path):
        assert path.exists()
        assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "run" / "llamaproc").stat().st_mode) == 0o700


def test_second_lock_in_same_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "serve.pid"
    with PidLock(path):
        with pytest.raises(AlreadyRunningError) as info:
            PidLock(path).acquire()
        assert info.value.pid == os.getpid()
        assert path.read_text() == f"{os.getpid()}\n"  # the refused attempt did not truncate the file
    with PidLock(path):  # free again once released
        pass


def test_acquire_twice_on_same_object_is_a_usage_error(tmp_path: Path) -> None:
    with PidLock(tmp_path / "serve.pid") as lock:
        with pytest.raises(UsageError, match="already held"):
            lock.acquire()
        assert lock.locked


def test_other_process_holds_lock_then_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "serve.pid"
    with holder(path) as proc:
        with pytest.raises(AlreadyRunningError) as info:
            PidLock(path).acquire()
        err = info.value
        assert isinstance(err, LlamaprocError)
        assert err.pid == proc.pid
        assert str(err) == f"already running: process {proc.pid} holds the lock on {path}"

        assert read_pid(path) == proc.pid
        # the probe neither took the lock away nor touched the file
        assert read_pid(path) == proc.pid
        assert path.read_text() == f"{proc.pid}\n"
        with pytest.raises(AlreadyRunningError):
            PidLock(path).acquire()

        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert path.read_text() == f"{proc.pid}\n"  # the stale file is left behind
        assert read_pid(path) is None

        with PidLock(path):
            assert path.read_text() == f"{os.getpid()}\n"
            assert read_pid(path) == os.getpid()
        assert not path.exists()


def test_stale_file_is_taken_over_and_truncated(tmp_path: Path) -> None:
    path = tmp_path / "serve.pid"
    path.write_text("123456789012345\n")
    assert read_pid(path) is None  # written but not locked
    with PidLock(path):
        assert path.read_text() == f"{os.getpid()}\n"


def test_read_pid_missing_or_unlocked(tmp_path: Path) -> None:
    path = tmp_path / "serve.pid"
    assert read_pid(path) is None
    assert not path.exists()  # probing does not create the file
    path.write_text(f"{os.getpid()}\n")  # a live pid, but nobody holds the lock
    assert read_pid(path) is None


def test_read_pid_when_holder_pid_is_dead(tmp_path: Path) -> None:
    path = tmp_path / "serve.pid"
    with subprocess.Popen([sys.executable, "-c", "pass"]) as proc:
        proc.wait()
    dead = proc.pid
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{dead}\n".encode())
        assert read_pid(path) is None
    finally:
        os.close(fd)


def test_retries_when_file_is_removed_between_open_and_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "serve.pid"
    real_flock = fcntl.flock
    calls: list[int] = []

    def flock(fd: int, operation: int) -> None:
        if not calls:  # the previous holder releases: removes the file, then unlocks
            path.unlink()
        calls.append(operation)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    with PidLock(path):
        assert len(calls) == 2
        assert path.read_text() == f"{os.getpid()}\n"


LIST_FDS = """
import os
for name in os.listdir("/proc/self/fd"):
    try:
        print(os.readlink("/proc/self/fd/" + name))
    except OSError:
        pass
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_lock_is_not_inherited_by_children(tmp_path: Path) -> None:
    path = tmp_path / "serve.pid"
    with PidLock(path):
        control = os.open(path, os.O_RDONLY)  # an inheritable descriptor, to show the check works
        os.set_inheritable(control, True)
        try:
            out = subprocess.run(
                [sys.executable, "-c", LIST_FDS], close_fds=False, capture_output=True, text=True, check=True
            ).stdout
        finally:
            os.close(control)
    assert out.splitlines().count(str(path)) == 1
