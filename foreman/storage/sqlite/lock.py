"""One daemon per SQLite queue: an exclusive lock on a file beside the database, held while the store is open.

Two daemons on one file both recover "running" jobs at boot and both claim:
jobs run twice and the first one's worker trips over rows it did not write.
The lock is taken before the file is opened, so a second daemon changes
nothing. It is `flock` on `<database>.lock`, which the kernel releases when
the holder exits however it exits (kill -9 included); the file keeps the
holder's pid so the refusal can name it, and is never deleted (deleting it
would let a third daemon lock a new file while the second holds the old).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from foreman.errors import StoreBusy, StoreError


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


# Locks taken ahead of the store that will hold them (`QueueLock.reserve`), by lock file.
_reserved: dict[Path, QueueLock] = {}


class QueueLock:
    """The held lock of one queue file; `release()` lets it go."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def reserve(cls, path: Path) -> None:
        """Take the lock now, for the next `take` of `path` in this process (`foreman serve`, before it binds).

        So that a second daemon started on the same port too is told who holds the database,
        not only that the port is taken.
        """
        _reserved[lock_path(path).absolute()] = cls._lock(path)

    @classmethod
    def take(cls, path: Path) -> QueueLock:
        """Lock the queue at `path` for this process; StoreBusy naming the holder if another has it."""
        reserved = _reserved.pop(lock_path(path).absolute(), None)
        return reserved if reserved is not None else cls._lock(path)

    @classmethod
    def _lock(cls, path: Path) -> QueueLock:
        where = lock_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(where, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot lock {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StoreBusy(
                f"{path} is in use by another foreman ({holder}, lock {where}); one daemon per database:"
                " stop that one, or point FOREMAN_DB at another file"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def _holder(fd: int) -> str:
    """What the lock file says of its holder: 'pid N', or that it did not say."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip())
        return f"pid {pid}"
    return "pid unknown"
