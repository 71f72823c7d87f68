"""A pid file guarded by ``flock``, so only one ``llamaproc serve`` runs per file.

The lock, not the file's existence, says whether a daemon is running: the
kernel drops an ``flock`` when its holder dies, even by ``SIGKILL``, so a pid
file left behind by a killed daemon is simply taken over.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from ..errors import AlreadyRunningError, UsageError

__all__ = ["AlreadyRunningError", "PidLock", "read_pid"]


class PidLock:
    """An exclusive, non-blocking lock on a pid file holding our pid.

    Use as a context manager, or call :meth:`acquire` and :meth:`release`.
    Acquiring creates missing parent directories (mode 0700), locks the file
    and writes the current pid; it raises :class:`AlreadyRunningError` if a
    live process holds the lock. Releasing removes the file and unlocks.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        """Whether this object currently holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock and write our pid, or raise :class:`AlreadyRunningError`."""
        if self._fd is not None:
            raise UsageError(f"pid lock {self.path} is already held by this object")
        _make_parents(self.path.parent)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid_fd(fd)
                os.close(fd)
                raise AlreadyRunningError(self.path, pid) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder may have removed the file between our open and
            # our lock; then we locked an orphan inode and must start again.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Remove the pid file and unlock. Does nothing if the lock is not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"PidLock({str(self.path)!r}, locked={self.locked})"


def read_pid(path: str | os.PathLike[str]) -> int | None:
    """Return the pid of the live process holding the lock on ``path``, else ``None``.

    The probe locks a separate descriptor and, if that succeeds (nobody holds
    the lock), unlocks it at once; it never disturbs a running holder.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid_fd(fd)
            return pid if pid is not None and _alive(pid) else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _make_parents(directory: Path) -> None:
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_pid_fd(fd: int, *, attempts: int = 5, delay: float = 0.02) -> int | None:
    """The pid in the file, waiting briefly for a holder that has locked but not yet written."""
    for attempt in range(attempts):
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        if text.isdigit() and int(text) > 0:
            return int(text)
        if attempt + 1 < attempts:
            time.sleep(delay)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but owned by another user
        return True
    return True
