"""A fetch's units as Ray tasks (``bin/fetch --ray ADDRESS``): the user's cluster does the work.

The driver (the ``bin/fetch`` process) plans, records and publishes exactly as a run on one
machine does; only the units' work moves. Each unit is one Ray task that calls
``fastfetch.unit.run_unit`` with a typed ``UnitSpec`` and returns its ``UnitResult``; the driver
records it in the manifest (its only writer). Ray places each task on a node with
``num_cpus`` = the task's resize workers free, and runs it again elsewhere when its worker or
node dies (``TASK_RETRIES``); the driver keeps a bounded number of tasks in flight, so memory
and the object store stay flat however many units there are.

Exactly once: a task writes its unit under a temporary name of its own and renames it into place
only when every item is accounted for, so a task that died with its node left nothing visible,
and its retry writes the unit once; the driver marks a unit done only when the result came back.
A driver killed and rerun with the same command resumes like any run: done units are kept,
everything else is scheduled again.

Ray is imported here only, and this module only with ``--ray``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from fastfetch.config import RunConfig
from fastfetch.errors import UsageError
from fastfetch.heap import keep_freed_memory
from fastfetch.imaging import ResizeConfig
from fastfetch.resize_pool import ResizePool
from fastfetch.storage import StorageError
from fastfetch.unit import UnitFailed, UnitResult, UnitSpec, run_unit

#: attempts after the first for a task whose worker or node died (not for a unit that failed)
TASK_RETRIES = 3
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)  # where ``import fastfetch`` works from


def _restore(handlers: dict[signal.Signals, Any]) -> None:
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def _unit_task(spec: UnitSpec) -> UnitResult:
    """The Ray task: one unit, on whichever node Ray chose."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = _WorkerRuntime()
    return _RUNTIME.run(spec)


class _WorkerRuntime:
    """What a Ray worker process keeps from one unit task to the next: an event loop in a thread
    of its own and the resize pool on it, so that a task does not pay for starting resize
    processes (Ray runs task after task in the same worker process)."""

    def __init__(self) -> None:
        try:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - platforms without uvloop
            self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="fastfetch-units", daemon=True).start()
        keep_freed_memory()  # as in a run on one machine: archive chunks and bodies reuse the heap
        self.pools: dict[tuple[ResizeConfig, int], ResizePool] = {}

    def run(self, spec: UnitSpec) -> UnitResult:
        return asyncio.run_coroutine_threadsafe(self._run(spec), self.loop).result()

    async def _run(self, spec: UnitSpec) -> UnitResult:
        key = (spec.config.resize, spec.config.workers)
        if key not in self.pools:
            self.pools[key] = ResizePool(*key)
        return await run_unit(spec, self.pools[key])


_RUNTIME: _WorkerRuntime | None = None


class RayUnits:
    """The connection to a Ray cluster and the remote unit task; ``submit`` runs one unit there."""

    def __init__(self, cfg: RunConfig) -> None:
        try:
            import ray
        except ImportError:
            raise UsageError("--ray needs Ray on this machine: pip install 'fastfetch[ray]' (or: pip install ray)") from None
        self._ray = ray
        address = cfg.ray or "auto"
        env = {"PYTHONPATH": os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)}
        # the Hugging Face endpoint and settings the driver planned with (a mirror, offline
        # switches), so that a task reads the same repository; tokens are secrets: never sent
        env.update({k: v for k, v in os.environ.items() if k == "HF_ENDPOINT" or k.startswith("HF_HUB_")})
        # ray.init puts its own SIGTERM handler in place of the run's (a stop that rolls back the
        # units in flight, exit 143): the run's handlers are put back as soon as it returns
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            ray.init(
                address=address,
                namespace="fastfetch",
                runtime_env={"env_vars": env},
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
        except Exception as exc:  # ConnectionError, a bad address, a version mismatch
            _restore(handlers)
            raise UsageError(
                f"--ray {address}: cannot connect to a Ray cluster ({type(exc).__name__}: {exc}); start one "
                "(README: Scale-out) or pass its address (auto, HOST:PORT or ray://HOST:PORT)"
            ) from exc
        _restore(handlers)
        self.cpus_per_task = max(1, cfg.workers)
        cluster_cpus = int(ray.cluster_resources().get("CPU", 0))
        if cluster_cpus < self.cpus_per_task:
            ray.shutdown()
            raise UsageError(
                f"--ray {address}: the cluster has {cluster_cpus} CPU(s), a unit task needs {self.cpus_per_task} "
                "(one per resize worker): lower --workers"
            )
        # enough tasks to keep every CPU busy, a few more so that a node never waits for the
        # driver between two units; no more, so that results and retries stay cheap
        self.in_flight = cfg.ray_tasks or max(1, cluster_cpus // self.cpus_per_task) + 2
        self._task = ray.remote(_unit_task).options(num_cpus=self.cpus_per_task, max_retries=TASK_RETRIES, retry_exceptions=False)
        print(
            f"ray: {cluster_cpus} CPUs in {len(ray.nodes())} node(s); units as tasks of {self.cpus_per_task} CPU(s), "
            f"up to {self.in_flight} at once",
            file=sys.stderr,
        )

    async def submit(self, spec: UnitSpec) -> UnitResult:
        """Run one unit as a task; raises ``UnitFailed`` for a unit that failed there, and the
        Ray error when the task could not be run (its node died more than ``TASK_RETRIES`` times)."""
        ref = self._task.remote(spec)
        try:
            return await asyncio.wrap_future(ref.future())
        except asyncio.CancelledError:
            self._ray.cancel(ref, force=True)
            raise
        except self._ray.exceptions.RayTaskError as exc:
            cause: Any = exc.cause
            if isinstance(cause, (UnitFailed, StorageError)):
                raise cause from None
            raise UnitFailed(spec.unit.id, cause if isinstance(cause, Exception) else exc) from exc

    def close(self) -> None:
        self._ray.shutdown()
