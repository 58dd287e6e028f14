"""The process pool that runs ``imaging.process``: bytes in, bytes (or a reason) out.

The rules travel to each worker once (pool initializer), so a task pickles only the image
bytes; a kept-as-is JPEG comes back as a flag rather than as a second copy of its bytes.
Workers are spawned, not forked: the parent runs an event loop and threads, which ``fork``
does not copy safely.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from fastfetch.imaging import Processed, ResizeConfig, process

_CFG: ResizeConfig | None = None


def _init(cfg: ResizeConfig, parent: int) -> None:
    global _CFG
    _CFG = cfg
    # A worker must not die of the parent's Ctrl-C: the parent decides when the pool stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # ... but it must die with the parent: after a SIGKILL the pool's pipes stay open in the
    # workers themselves, and they would wait for work forever (Linux: PR_SET_PDEATHSIG).
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def _run(data: bytes) -> Processed:
    assert _CFG is not None
    return process(data, _CFG)


class ResizePool:
    """Bounded asynchronous front of a process pool (``workers=0`` runs inline, for debugging)."""

    def __init__(self, cfg: ResizeConfig, workers: int) -> None:
        self.cfg = cfg
        self.workers = workers
        self._pool = self._new_pool() if workers > 0 else None
        # Enough queued work to keep every worker busy while results travel back.
        self._slots = asyncio.Semaphore(max(1, workers) * 4)

    async def process(self, data: bytes) -> Processed:
        async with self._slots:
            if self._pool is None:
                return process(data, self.cfg)
            try:
                return await asyncio.get_running_loop().run_in_executor(self._pool, _run, data)
            except BrokenProcessPool:
                # A worker died (out of memory on a hostile image, killed): count and go on.
                self._restart()
                return Processed("decode_error")

    def _restart(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init, initargs=(self.cfg, os.getpid())
        )

    def close(self) -> float:
        """Stop the workers; returns the largest peak resident memory of one worker, in MB."""
        if self._pool is None:
            return 0.0
        peak = max((_peak_rss_mb(pid) for pid in list(getattr(self._pool, "_processes", None) or {})), default=0.0)
        self._pool.shutdown(wait=True, cancel_futures=True)
        return peak


def _peak_rss_mb(pid: int) -> float:
    """VmHWM of a live process (Linux), 0 where unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def default_workers() -> int:
    """One resize process per core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
