"""One node per data directory: an exclusive lock on ``<data_dir>/lock``.

Two nodes on one data directory would share one identity (each sees the other's peer id as its
own) and write one SQLite store. :func:`hold_data_dir` takes an exclusive ``flock`` on the
directory's lock file, writes this process's pid into it, and holds it while the node runs; a
second node on the same directory, in this process or another, gets a :class:`ConfigError`
naming the lock file and the pid of the process holding it. The kernel drops the lock when its
holder exits, even by SIGKILL, so a stale lock file never blocks a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import trio

from .errors import ConfigError

__all__ = ["LOCK_FILE", "DataDirLock", "hold_data_dir"]

LOCK_FILE = "lock"


class DataDirLock:
    """An exclusive lock on a data directory, held until :meth:`release`."""

    def __init__(self, data_dir: Path) -> None:
        """Take the lock (creating the directory and the lock file if need be).

        Raises:
            ConfigError: another node holds it (the message names the lock file and its pid),
                or the lock file cannot be opened.
        """
        self.path = data_dir / LOCK_FILE
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"data_dir: cannot open the lock file {self.path}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"data_dir: {data_dir} is in use by another node (process {holder}, lock file "
                f"{self.path}); stop that node or give this one another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Drop the lock (idempotent); the lock file stays, empty."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)


async def hold_data_dir(
    data_dir: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """A service for ``nursery.start``: lock ``data_dir``, report started, hold the lock until
    cancelled (the node stops).

    Raises:
        ConfigError: the directory is locked by another node.
    """
    lock = DataDirLock(data_dir)
    try:
        task_status.started()
        await trio.sleep_forever()
    finally:
        lock.release()
