"""A fetch run as named stages, in the order they happen:

1. ``_check_output``: the output is usable (a remote one is reachable and has a local cache);
2. ``_locked``: this node's state folder exists and no other run writes into it;
3. ``_tune_memory``, then the resize pool starts (its workers warm up while we plan);
4. ``StopOnSignal``: the first SIGINT/SIGTERM rolls back the units in flight, a second quits;
5. ``_fetch_units``: open the source, check the settings against the output's, plan, run the
   pipeline;
6. ``_publish``: stats.json, the merged index (or this node's summary, and the global merge
   once every node is done);
7. ``_exit_code``.

Exit codes: 0 every selected unit done; 1 some units failed, or the run could not finish
(rerun to retry); 2 bad arguments or unusable input; 130 / 143 after a stop on SIGINT / SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import gc
import os
import signal
import sys
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastfetch import storage
from fastfetch.config import RunConfig
from fastfetch.errors import UsageError, changes
from fastfetch.heap import keep_freed_memory
from fastfetch.http import Fetcher
from fastfetch.manifest import Manifest
from fastfetch.nodes import all_complete, merge_nodes, write_summary
from fastfetch.pipeline import DiskFull, Pipeline
from fastfetch.redact import redact
from fastfetch.resize_pool import ResizePool
from fastfetch.stats import RunCounters, dataset_totals, print_summary, write_stats
from fastfetch.storage import StorageError

EXIT_OK, EXIT_FAILED_UNITS, EXIT_USAGE = 0, 1, 2
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


def run(cfg: RunConfig) -> int:
    """Run the fetch ``cfg`` describes; returns the exit code (messages go to stderr)."""
    try:
        return _run_loop(_run(cfg))
    except UsageError as exc:
        print(f"fetch: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except StorageError as exc:  # after the run started (a --merge, an outage): nothing is lost
        print(f"fetch: error: {exc}; rerun the same command once the storage is reachable", file=sys.stderr)
        return EXIT_FAILED_UNITS


def _run_loop(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(coro)
    return uvloop.run(coro)


@dataclass
class Outcome:
    """How the fetch ended, as the stages after it need to know."""

    status: str = "done"  # done | interrupted | disk full | storage unavailable | failed
    fatal: str = ""  # what stopped the run, for the user
    settings: dict[str, Any] = field(default_factory=dict)
    pipeline: Pipeline | None = None  # set once the plan is made: only then is anything published


async def _run(cfg: RunConfig) -> int:
    _check_output(cfg)
    if cfg.merge_only:
        return _merge_only(cfg)
    with _locked(cfg.state_dir):
        _tune_memory()
        # first: the workers start while we plan (with --ray the units resize on the cluster)
        resizer = ResizePool(cfg.resize, 0 if cfg.ray is not None else cfg.workers)
        counters = RunCounters()
        outcome = Outcome()
        with contextlib.closing(Manifest(cfg.state_dir)) as manifest:
            try:
                with StopOnSignal() as stop:
                    try:
                        await _fetch_units(cfg, resizer, manifest, counters, outcome)
                    except asyncio.CancelledError:
                        if stop.code is None:
                            raise
                        outcome.status = "interrupted"
                    except DiskFull as exc:
                        outcome.status, outcome.fatal = "disk full", str(exc)
                    except StorageError as exc:  # the bucket or the network to it went away: units in flight roll back
                        outcome.status = "storage unavailable"
                        outcome.fatal = f"{exc}; rerun the same command once the storage is reachable: finished units are kept"
                    except Exception:  # a list that breaks after its first units: what finished is kept, not "done"
                        outcome.status = "failed"
                        raise
            finally:
                counters.worker_peak_rss_mb = resizer.close()
                _publish_safely(cfg, manifest, counters, outcome)
    return _exit_code(stop.code, outcome, counters)


def _check_output(cfg: RunConfig) -> None:
    if cfg.output.startswith(("http://", "https://")):
        raise UsageError(
            f"--out {cfg.output}: fastfetch writes to a folder or to object storage (s3://, gs://, …), not to a web server"
        )
    if cfg.remote and cfg.local_cache is None:
        raise UsageError(
            f"--out {cfg.output} is remote: also pass --local-cache DIR (a local folder for the manifest and shards in transit)"
        )
    if cfg.remote:
        try:
            storage.check(cfg.output_url)
        except StorageError as exc:
            raise UsageError(f"--out {cfg.output} cannot be used: {exc}") from exc
    base = cfg.local_root
    if base.exists() and not base.is_dir():
        flag = "--local-cache" if cfg.remote else "--out"
        raise UsageError(f"{flag} {base} is a file, not a folder: choose a folder (it is created when missing)")


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    """The state folder, created, and held by this run alone while it lasts."""
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output folder {state}: {exc.strerror or exc}; choose another --out") from exc
    try:
        f = open(state / ".lock", "a+")
    except OSError as exc:
        raise UsageError(f"cannot write into {state}: {exc.strerror or exc}; choose another --out") from exc
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise UsageError(f"another fetch is already writing into {state}; wait for it or choose another --out") from exc
        yield


def _tune_memory() -> None:
    # The imported modules live for the whole run: keep the cyclic collector off them, and
    # let it run less often (each request allocates hundreds of short-lived objects).
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    keep_freed_memory()  # archive chunks and results are 0.1–1 MB each: reuse, don't remap


class StopOnSignal:
    """While entered: the first SIGINT/SIGTERM cancels the current task (the pipeline rolls
    back its units in flight) and records the exit code; a second quits at once (the manifest
    is consistent at every moment). On leaving, the event loop no longer dispatches signals
    (what follows blocks it: the workers finishing, publishing), so any signal quits at once."""

    def __init__(self) -> None:
        self.code: int | None = None

    def __enter__(self) -> StopOnSignal:
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        for sig in EXIT_SIGNAL:
            loop.add_signal_handler(sig, self._on_signal, sig, task)
        return self

    def _on_signal(self, signum: int, task: asyncio.Task[Any] | None) -> None:
        if self.code is not None:
            os._exit(EXIT_SIGNAL[signal.Signals(signum)])
        self.code = EXIT_SIGNAL[signal.Signals(signum)]
        print("\nstopping: rolling back units in flight (press Ctrl-C again to quit at once)", file=sys.stderr)
        if task is not None:
            task.cancel()

    def __exit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in EXIT_SIGNAL:
            loop.remove_signal_handler(sig)
            signal.signal(sig, _exit_at_once)


def _exit_at_once(signum: int, frame: Any) -> None:
    os._exit(EXIT_SIGNAL[signal.Signals(signum)])


async def _fetch_units(cfg: RunConfig, resizer: ResizePool, manifest: Manifest, counters: RunCounters, outcome: Outcome) -> None:
    with _cluster(cfg) as cluster:
        await _plan_and_run(cfg, resizer, manifest, counters, outcome, cluster)


@contextlib.contextmanager
def _cluster(cfg: RunConfig) -> Iterator[Any]:
    """With --ray, the connection to the cluster (made before planning: a wrong address fails at once)."""
    if cfg.ray is None:
        yield None
        return
    from fastfetch.cluster import RayUnits  # Ray is imported only for --ray

    cluster = RayUnits(cfg)
    try:
        yield cluster
    finally:
        cluster.close()


async def _plan_and_run(
    cfg: RunConfig, resizer: ResizePool, manifest: Manifest, counters: RunCounters, outcome: Outcome, cluster: Any
) -> None:
    async with Fetcher(cfg.fetch) as fetcher:
        source = cfg.source(fetcher)
        await source.open()
        try:
            settings = cfg.settings(source.fingerprint())
            _check_settings(manifest, settings, cfg.state_dir)
            dedup = cfg.dedup()
            try:
                pipeline = Pipeline(source, cfg.layout(), fetcher, resizer, manifest, counters, cfg.node, cfg.progress, dedup)
                todo = await pipeline.prepare(cfg.selection)
                outcome.settings, outcome.pipeline = settings, pipeline  # a plan that failed publishes nothing
                manifest.set_meta("settings", settings)
                if cluster is None:
                    await pipeline.run(todo)
                else:
                    await pipeline.run_elsewhere(todo, cluster.submit, cluster.in_flight, cfg)
                if not pipeline.scheduled:
                    print("nothing to do: every selected unit is already done", file=sys.stderr)
            finally:
                if dedup is not None:
                    dedup.close()
        finally:
            await source.close()


def _check_settings(manifest: Manifest, settings: dict[str, Any], out: Path) -> None:
    previous = manifest.get_meta("settings")
    if previous is None or previous == settings:
        return
    diff = changes(previous, settings)
    raise UsageError(
        f"{out} was built with other settings ({diff}); rerun with the original flags to resume, or choose a new --out"
    )


def _publish_safely(cfg: RunConfig, manifest: Manifest, counters: RunCounters, outcome: Outcome) -> None:
    if outcome.pipeline is None:
        return
    try:
        _publish(cfg, outcome.pipeline, manifest, counters, outcome)
    except Exception as exc:  # a full disk, an unreachable bucket: the manifest is what matters
        print(
            f"fetch: could not publish the index or stats.json: {redact(f'{type(exc).__name__}: {exc}')}; "
            "rerun the same command to retry",
            file=sys.stderr,
        )
        outcome.fatal = outcome.fatal or "the run's results were not published"


def _publish(cfg: RunConfig, pipeline: Pipeline, manifest: Manifest, counters: RunCounters, outcome: Outcome) -> None:
    """End of a run: this node's stats; on one machine the merged index too, on several the
    node summary (and, on rank 0 once every node is complete, the global merge)."""
    stats = write_stats(cfg.state_dir, manifest, counters, outcome.settings, outcome.status)
    out, node = cfg.output_url, cfg.node
    dataset = f"{out.rstrip('/')}/mds"
    if node.count > 1:
        dataset += f" (this node's units: {node.name} folders; the merged index.json comes with the merge)"
    print_summary(stats, dataset, cfg.state_dir / "stats.json")
    if node.count == 1:
        pipeline.merge()
        if cfg.remote:
            storage.upload(cfg.state_dir, out, ["stats.json"])
        return
    complete = outcome.status == "done" and not counters.units_failed
    write_summary(
        out,
        cfg.state_dir,
        node,
        pipeline.done_dirs(),
        dataset_totals(manifest),
        complete,
        {**outcome.settings, "plan": pipeline.plan_digest or None},  # None: the plan was not read to its end
    )
    if node.rank == 0 and all_complete(out, cfg.local_root, node.count):
        merged = merge_nodes(out, pipeline.layout, cfg.local_root)
        print(f"merged {len(merged['nodes'])} nodes: {merged['rows_in_index']:,} rows in {out}/mds/index.json", file=sys.stderr)
    else:
        print(
            f"node {node.name} finished; once every node is done, run: bin/fetch --merge --out {out}"
            f"{' --local-cache ' + str(cfg.local_root) if cfg.remote else ''}",
            file=sys.stderr,
        )


def _merge_only(cfg: RunConfig) -> int:
    """``--merge``: the global index and stats.json over every node's summary."""
    merged = merge_nodes(cfg.output_url, dataclasses.replace(cfg.layout(), node=""), cfg.local_root)
    print(
        f"merged {len(merged['nodes'])} node(s): {merged['rows_in_index']:,} rows in {cfg.output_url}/mds/index.json",
        file=sys.stderr,
    )
    if merged["incomplete_nodes"]:
        print(
            f"fetch: not every node is complete: {', '.join(merged['incomplete_nodes'])}; rerun them, then --merge again",
            file=sys.stderr,
        )
        return EXIT_FAILED_UNITS
    return EXIT_OK


def _exit_code(stopped: int | None, outcome: Outcome, counters: RunCounters) -> int:
    if stopped is not None:
        return stopped
    if outcome.fatal:
        print(f"fetch: error: {outcome.fatal}", file=sys.stderr)
        return EXIT_FAILED_UNITS
    return EXIT_FAILED_UNITS if counters.units_failed else EXIT_OK
