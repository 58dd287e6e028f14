"""Temporary folders held by the process that made them, so that another process on the same
machine tells a dead try's leftovers (a Ray task killed with its worker, a SIGKILLed run) from
a living one's work.

A folder ``X`` comes with ``X.held``, locked (``flock``) by its maker while it works in it and
naming the machine it runs on; the kernel drops the lock when the process dies, however it dies,
and ``sweep_abandoned`` removes the folders of this machine whose lock nobody holds. Only this
machine's: on a shared filesystem a lock taken on one machine may not be seen from another, so
another machine's folder is never judged. No library does this (``tempfile`` folders outlive a
killed process, ``filelock`` removes nothing).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from pathlib import Path

SUFFIX = ".held"


def _machine() -> bytes:
    """This machine: its name and this boot (two machines may share a name, containers a kernel)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()} {boot}".encode()


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
                os.ftruncate(fd, 0)
                os.pwrite(fd, _machine(), 0)
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def sweep_abandoned(parent: Path) -> None:
    """Remove the held folders under ``parent`` that a process of this machine made and that
    nobody holds any more (their maker died)."""
    me = _machine()
    for lock in parent.glob(f"*{SUFFIX}"):
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(lock).st_ino:
                continue  # removed and made again meanwhile: someone else's now
            if os.pread(fd, 4096, 0) != me:
                continue  # another machine's (its lock may not show here), or not written yet
            shutil.rmtree(lock.with_name(lock.name.removesuffix(SUFFIX)), ignore_errors=True)
            lock.unlink()
        except (BlockingIOError, FileNotFoundError):
            continue  # alive, or swept by another process
        finally:
            os.close(fd)
