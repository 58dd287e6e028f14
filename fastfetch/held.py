"""Temporary folders held by the process that made them, so that another process on the same
machine tells a dead try's leftovers (a Ray task killed with its worker, a SIGKILLed run) from
a living one's work.

A folder ``X`` comes with ``X.held``, locked (``flock``) by its maker while it works in it; the
kernel drops the lock when the process dies, however it dies, and ``sweep_abandoned`` removes the
folders whose lock nobody holds. No library does this (``tempfile`` folders outlive a killed
process, ``filelock`` removes nothing). ``flock`` is reliable on a machine's own disk only: callers
sweep their machine's own folders (a remote output's ``--local-cache``), never a shared
filesystem, where the run's driver clears the temporary folders before it schedules anything.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

SUFFIX = ".held"


class HeldFolder:
    """A fresh folder at ``path`` (anything there before is removed), held until ``release``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = path.with_name(path.name + SUFFIX)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = _hold(self._lock)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()

    def release(self) -> None:
        """Remove the folder, then its lock file (unlinked while still held, so no sweeper can
        take it for an abandoned one in between)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            self._lock.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def _hold(path: Path) -> int:
    """An exclusive lock on ``path`` (created), held until its descriptor is closed; taken again
    when a sweeper removed the file between its creation and the lock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def sweep_abandoned(parent: Path) -> None:
    """Remove the held folders under ``parent`` whose maker is gone (nobody holds the lock)."""
    for lock in parent.glob(f"*{SUFFIX}"):
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(lock).st_ino:
                continue  # removed and made again meanwhile: someone else's now
            shutil.rmtree(lock.with_name(lock.name.removesuffix(SUFFIX)), ignore_errors=True)
            lock.unlink()
        except (BlockingIOError, FileNotFoundError):
            continue  # alive, or swept by another process
        finally:
            os.close(fd)
