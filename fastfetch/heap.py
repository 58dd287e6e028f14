"""glibc heap tuning shared by the fetch process and its resize workers (``ctypes`` only, so a
worker's start-up stays light)."""

from __future__ import annotations

import ctypes


def keep_freed_memory() -> None:
    """Let glibc reuse freed large buffers instead of unmapping them (no-op elsewhere).

    Every image brings buffers of 0.1–1 MB (received chunks, the body, decoded pixels, the new
    JPEG) that glibc would map fresh and unmap again, page-faulting through every page of each
    (~3 % of a worker's CPU on SA-1B-size images, ~3 % of the parent's): kept in the heap, the
    next image's buffers reuse them. Called by the workers and by the parent process."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: heap, not mmap, below 64 MiB
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: give memory back past 256 MiB free
    except (OSError, AttributeError):
        pass
