"""``bin/fetch``: arguments, dataset lookup, the run, and its summary.

Exit codes: 0 every selected unit done; 1 some units failed (rerun to retry them);
2 bad arguments or unusable input; 130 / 143 after a clean stop on SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import gc
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastfetch import __version__
from fastfetch.formats import MOSAIC_BUCKETS, OutputFormat
from fastfetch.http import USER_AGENT, FetchConfig, Fetcher
from fastfetch.imaging import RESIZE_FILTERS, ResizeConfig
from fastfetch.manifest import Manifest
from fastfetch import storage
from fastfetch.mds import Layout
from fastfetch.storage import StorageError, is_remote
from fastfetch.nodes import Node, all_complete, detect, merge_nodes, write_summary
from fastfetch.pipeline import DiskFull, Pipeline, Selection
from fastfetch.redact import redact
from fastfetch.heap import keep_freed_memory
from fastfetch.resizer import ResizePool, default_workers
from fastfetch.sources import SOURCES, RunContext, UsageError
from fastfetch.stats import RunCounters, dataset_totals, print_summary, write_stats

EXIT_OK, EXIT_FAILED_UNITS, EXIT_USAGE = 0, 1, 2
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fetch",
        description="Download an image-caption dataset, keep images whose short side is at least "
        "--min-size, resize the short side down to --max-size, and pack them into MosaicML "
        "Streaming (MDS) shards. Resumable: rerun the same command after any interruption.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--dataset", default="demo", choices=sorted(SOURCES),
        help="what to fetch: " + "; ".join(f"{n}: {c.help}" for n, c in sorted(SOURCES.items())),
    )
    parser.add_argument("--out", default=None, help="output folder (MDS under OUT/mds, OUT/stats.json, manifest), or an object-storage URL such as s3://bucket/prefix (then --local-cache is needed); default: data/<dataset>")
    parser.add_argument("--local-cache", type=Path, default=None, help="with a remote --out: local folder for the manifest and shards in transit (shards are deleted once uploaded)")
    parser.add_argument("--version", action="version", version=f"fastfetch {__version__}")

    sel = parser.add_argument_group("what to fetch")
    sel.add_argument("--subset", choices=("all", "small"), default="all", help="small = a deterministic ~1%% of the units (at least one), for trying things out")
    sel.add_argument("--ids", type=int, nargs="+", default=None, help="explicit unit numbers to fetch (e.g. archive numbers); default: all")
    sel.add_argument("--limit", type=int, default=None, help="only the first N rows of a URL list (for trying things out); default: all")
    sel.add_argument("--retry-failed", action="store_true", help="refetch only the items that failed for transient reasons (timeout, connection, 5xx, 429) in earlier runs, nothing else")
    sel.add_argument("--unit-size", type=int, default=10_000, help="rows of a URL list per work unit (one MDS folder, committed as a whole)")

    img = parser.add_argument_group("images")
    img.add_argument("--min-size", type=int, default=None, help="drop images whose short side is smaller (pixels); unset: 256, but 0 for --dataset coco, an evaluation set that keeps every image")
    img.add_argument("--max-size", type=int, default=512, help="resize images whose short side is larger down to this (pixels, aspect ratio kept)")
    img.add_argument("--resize-filter", choices=sorted(RESIZE_FILTERS), default="bicubic", help="downscaling filter (antialiased)")
    img.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (untouched JPEGs keep their bytes)")
    img.add_argument("--workers", type=int, default=default_workers(), help="resize processes (default: cores available)")

    net = parser.add_argument_group("network")
    net.add_argument("--concurrency", type=int, default=256, help="requests in flight at once")
    net.add_argument("--per-host", type=int, default=16, help="connections at once to one host")
    net.add_argument("--timeout", type=float, default=20.0, help="seconds per attempt (connect + read), after which a request counts as timeout")
    net.add_argument("--retries", type=int, default=2, help="extra attempts on timeouts, connection errors, 5xx and 429 (exponential backoff with jitter; Retry-After honoured)")
    net.add_argument("--max-bytes", type=int, default=32 * 1024 * 1024, help="largest response body accepted (bytes); larger counts as too_large")
    net.add_argument("--max-inflight-mb", type=int, default=1024, help="memory for response bodies held at once (downloading or waiting to be resized), in MiB; bounds peak memory at any --concurrency")
    net.add_argument("--max-redirects", type=int, default=5, help="redirects followed per URL")
    net.add_argument("--ignore-robots", action="store_true", help="ignore X-Robots-Tag noai/noimageai/noindex/noimageindex opt-outs (honoured by default)")
    net.add_argument(
        "--allow-private-networks", action="store_true",
        help="allow URLs whose host is or resolves to a loopback, private, link-local or reserved address "
        "(refused by default and counted as private_address, so a URL list cannot reach your own network)",
    )
    net.add_argument("--user-agent", default=USER_AGENT, help="User-Agent header sent with every request")

    out = parser.add_argument_group("output")
    out.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is still printed)")
    out.add_argument(
        "--format", choices=[f.value for f in OutputFormat], default=OutputFormat.FASTFETCH.value,
        help="MDS layout: fastfetch (jpg as an MDS jpeg column, our columns) or mosaic (what mosaicml/diffusion's "
        "LAION pipeline writes and its StreamingLAIONDataset reads: jpg as bytes, its 16 columns, its "
        "resolution-bucket folders 0-64 … 1024-1048576)",
    )
    out.add_argument("--buckets", default=None, help="comma-separated short-side bounds, e.g. 0,256,512,768,1024: each kept image goes to the MDS subtree of its original short side (OUT/mds/short-0512/…), each bucket with its own index; default: one dataset")

    multi = parser.add_argument_group("several machines (see README: Scale-out)")
    multi.add_argument("--node-rank", type=int, default=None, help="this machine's rank (default: RANK from torchrun, else SLURM_PROCID, else 0)")
    multi.add_argument("--num-nodes", type=int, default=None, help="machines sharing the work (default: WORLD_SIZE from torchrun, else SLURM_NTASKS, else 1)")
    multi.add_argument("--merge", action="store_true", help="only merge: build OUT/mds/index.json and OUT/stats.json from every node's finished units")

    for name, cls in sorted(SOURCES.items()):
        cls.add_arguments(parser.add_argument_group(f"--dataset {name}"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out = args.out or str(Path("data") / args.dataset)
    try:
        _check_args(args)
        return _run_loop(_fetch(args))
    except UsageError as exc:
        print(f"fetch: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except StorageError as exc:  # after the run started (a --merge, an outage): nothing is lost
        print(f"fetch: error: {exc}; rerun the same command once the storage is reachable", file=sys.stderr)
        return EXIT_FAILED_UNITS


def _check_args(args: argparse.Namespace) -> None:
    if args.min_size is None:
        args.min_size = SOURCES[args.dataset].default_min_size
    if args.min_size < 0:
        raise UsageError(f"--min-size must be 0 or more (got {args.min_size})")
    for flag in ("max_size", "concurrency", "per_host", "unit_size", "max_bytes", "max_inflight_mb"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive (got {getattr(args, flag)})")
    if args.min_size > args.max_size:
        raise UsageError(f"--min-size {args.min_size} is larger than --max-size {args.max_size}")
    if not 1 <= args.quality <= 100:
        raise UsageError(f"--quality must be in 1..100 (got {args.quality})")
    if args.workers < 0 or args.retries < 0 or (args.limit is not None and args.limit <= 0):
        raise UsageError("--workers and --retries must be ≥ 0 and --limit ≥ 1")


def _run_loop(coro: Any) -> int:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(coro)


def _settings(args: argparse.Namespace, resize: ResizeConfig, fingerprint: dict[str, Any], node: Node) -> dict[str, Any]:
    """What decides the content of a unit: a rerun into the same --out must not change it (and
    on several machines, what every node must agree on: the merge compares them)."""
    nodes = {"node_count": node.count, "dealing": "unit-id-hash"} if node.count > 1 else {}
    return {
        **nodes,
        "dataset": args.dataset,
        "min_size": resize.min_size,
        "max_size": resize.max_size,
        "resize_filter": resize.resize_filter,
        "quality": resize.quality,
        "unit_size": args.unit_size,
        "buckets": list(_buckets(args)),
        **({"format": args.format} if args.format != OutputFormat.FASTFETCH.value else {}),
        **fingerprint,
    }


@dataclass(frozen=True, slots=True)
class Places:
    """Where a run keeps things: ``base`` is local (``--out``, or ``--local-cache`` when the
    output is on object storage); ``state`` holds this node's manifest, work files and stats."""

    out: str
    base: Path
    state: Path
    layout: Layout
    node: Node


def _places(args: argparse.Namespace) -> Places:
    remote = is_remote(args.out)
    if remote and args.local_cache is None:
        raise UsageError(f"--out {args.out} is remote: also pass --local-cache DIR (a local folder for the manifest and shards in transit)")
    if remote:
        try:
            storage.check(args.out.rstrip("/"))
        except StorageError as exc:
            raise UsageError(f"--out {args.out} cannot be used: {exc}") from exc
    base = Path(args.local_cache if remote else args.out).expanduser()
    if base.exists() and not base.is_dir():
        flag = "--local-cache" if remote else "--out"
        raise UsageError(f"{flag} {base} is a file, not a folder: choose a folder (it is created when missing)")
    node = detect(args)
    layout = Layout(base / "mds", node.name, _buckets(args), f"{args.out.rstrip('/')}/mds" if remote else None,
                    OutputFormat(args.format))
    return Places(args.out.rstrip("/") if remote else args.out, base, base / "_nodes" / node.name if node.name else base, layout, node)


def _buckets(args: argparse.Namespace) -> tuple[int, ...]:
    spec = args.buckets
    if not spec:
        return MOSAIC_BUCKETS if args.format == OutputFormat.MOSAIC.value else ()
    try:
        values = sorted({int(v) for v in spec.split(",") if v.strip()})
    except ValueError:
        raise UsageError(f"--buckets takes comma-separated short-side sizes such as 0,256,512,768,1024 (got {spec!r})") from None
    if not values or values[0] < 0:
        raise UsageError(f"--buckets needs non-negative sizes (got {spec!r})")
    return tuple(values)


async def _fetch(args: argparse.Namespace) -> int:
    places = _places(args)
    if args.merge:
        return _merge_only(places)
    try:
        places.state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output folder {places.state}: {exc.strerror or exc}; choose another --out") from exc
    lock = _lock(places.state)
    # The imported modules live for the whole run: keep the cyclic collector off them, and
    # let it run less often (each request allocates hundreds of short-lived objects).
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    resize = ResizeConfig(args.min_size, args.max_size, args.resize_filter, args.quality)
    resizer = ResizePool(resize, args.workers)  # first: the workers start while we plan
    keep_freed_memory()  # archive chunks and results are 0.1–1 MB each: reuse, don't remap
    fetch_cfg = FetchConfig(
        concurrency=args.concurrency, per_host=args.per_host, timeout=args.timeout,
        connect_timeout=min(10.0, args.timeout), read_timeout=min(10.0, args.timeout), retries=args.retries,
        max_bytes=args.max_bytes, max_inflight_bytes=args.max_inflight_mb << 20, max_redirects=args.max_redirects,
        respect_robots=not args.ignore_robots,
        allow_private_networks=args.allow_private_networks or args.dataset == "demo", user_agent=args.user_agent,
    )
    manifest = Manifest(places.state)
    counters = RunCounters()
    stopping: dict[str, int] = {}
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stopping:  # second signal: leave at once; the manifest is still consistent
            os._exit(EXIT_SIGNAL[signal.Signals(signum)])
        stopping["code"] = EXIT_SIGNAL[signal.Signals(signum)]
        print("\nstopping: rolling back units in flight (press Ctrl-C again to quit at once)", file=sys.stderr)
        assert main_task is not None
        main_task.cancel()

    for sig in EXIT_SIGNAL:
        loop.add_signal_handler(sig, on_signal, sig)

    status = "done"
    fatal = ""
    settings: dict[str, Any] = {}
    todo: list[Any] = []
    pipeline: Pipeline | None = None
    prepared = False  # a plan that fails (bad input) publishes nothing
    try:
        async with Fetcher(fetch_cfg) as fetcher:
            ctx = RunContext(out=places.base, fetcher=fetcher, work_dir=places.state / "_work" / args.dataset, args=args)
            source = SOURCES[args.dataset](args, ctx)
            await source.open()
            try:
                settings = _settings(args, resize, source.fingerprint(), places.node)
                _check_settings(manifest, settings, places.state)
                pipeline = Pipeline(source, places.layout, fetcher, resizer, manifest, counters, not args.no_progress)
                selection = Selection(args.subset, tuple(args.ids or ()), places.node.rank, places.node.count)
                todo = await pipeline.prepare(selection, args.retry_failed)
                prepared = True
                manifest.set_meta("settings", settings)
                if not todo:
                    print("nothing to do: every selected unit is already done", file=sys.stderr)
                await pipeline.run(todo)
            finally:
                await source.close()
    except asyncio.CancelledError:
        if not stopping:
            raise
        status = "interrupted"
    except DiskFull as exc:
        status = "disk full"
        fatal = str(exc)
    except StorageError as exc:  # the bucket went away or the network to it: units in flight roll back
        status = "storage unavailable"
        fatal = f"{exc}; rerun the same command once the storage is reachable: finished units are kept"
    finally:
        for sig in EXIT_SIGNAL:
            loop.remove_signal_handler(sig)
            # From here on the loop no longer dispatches signals (what follows blocks it: the
            # workers finishing their images, publishing): a signal now still means "quit at
            # once", with the signal's exit code.
            signal.signal(sig, _exit_at_once)
        counters.worker_peak_rss_mb = resizer.close()
        try:
            if pipeline is not None and prepared:
                complete = status == "done" and not counters.units_failed
                _publish(places, pipeline, manifest, counters, settings, status, complete)
        except Exception as exc:  # a full disk, an unreachable bucket: the manifest is what matters
            print(f"fetch: could not publish the index or stats.json: {redact(f'{type(exc).__name__}: {exc}')}; "
                  "rerun the same command to retry", file=sys.stderr)
            fatal = fatal or "the run's results were not published"
        manifest.close()
        lock.close()
    if stopping:
        return stopping["code"]
    if fatal:
        print(f"fetch: error: {fatal}", file=sys.stderr)
        return EXIT_FAILED_UNITS
    return EXIT_FAILED_UNITS if counters.units_failed else EXIT_OK


def _exit_at_once(signum: int, frame: Any) -> None:
    os._exit(EXIT_SIGNAL[signal.Signals(signum)])


def _publish(places: Places, pipeline: Pipeline, manifest: Manifest, counters: RunCounters,
             settings: dict[str, Any], status: str, complete: bool) -> None:
    """End of a run: this node's stats; on one machine the merged index too, on several the
    node summary (and, on rank 0 once every node is complete, the global merge)."""
    stats = write_stats(places.state, manifest, counters, settings, status)
    dataset = f"{places.out.rstrip('/')}/mds"
    if places.node.count > 1:
        dataset += f" (this node's units: {places.node.name} folders; the merged index.json comes with the merge)"
    print_summary(stats, dataset, places.state / "stats.json")
    if places.node.count == 1:
        pipeline.merge()
        if places.layout.remote:
            storage.upload(places.state, places.out, ["stats.json"])
        return
    write_summary(places.out, places.state, places.node, pipeline.done_dirs(), dataset_totals(manifest), complete,
                  {**settings, "plan": pipeline.plan_digest})
    if places.node.rank == 0 and all_complete(places.out, places.base, places.node.count):
        merged = merge_nodes(places.out, places.layout, places.base)
        print(f"merged {len(merged['nodes'])} nodes: {merged['rows_in_index']:,} rows in {places.out}/mds/index.json", file=sys.stderr)
    else:
        print(f"node {places.node.name} finished; once every node is done, run: bin/fetch --merge --out {places.out}"
              f"{' --local-cache ' + str(places.base) if places.layout.remote else ''}", file=sys.stderr)


def _merge_only(places: Places) -> int:
    """``--merge``: the global index and stats.json over every node's summary."""
    merged = merge_nodes(places.out, Layout(places.base / "mds", "", places.layout.buckets, places.layout.remote, places.layout.format), places.base)
    print(f"merged {len(merged['nodes'])} node(s): {merged['rows_in_index']:,} rows in {places.out}/mds/index.json", file=sys.stderr)
    if merged["incomplete_nodes"]:
        print(f"fetch: not every node is complete: {', '.join(merged['incomplete_nodes'])}; rerun them, then --merge again",
              file=sys.stderr)
        return EXIT_FAILED_UNITS
    return EXIT_OK


def _check_settings(manifest: Manifest, settings: dict[str, Any], out: Path) -> None:
    previous = manifest.get_meta("settings")
    if previous is None or previous == settings:
        return
    diff = ", ".join(
        f"{k}: {previous.get(k)!r} → {settings.get(k)!r}" for k in sorted(set(previous) | set(settings))
        if previous.get(k) != settings.get(k)
    )
    raise UsageError(
        f"{out} was built with other settings ({diff}); rerun with the original flags to resume, "
        "or choose a new --out"
    )


def _lock(out: Path) -> Any:
    try:
        f = open(out / ".lock", "a+")
    except OSError as exc:
        raise UsageError(f"cannot write into {out}: {exc.strerror or exc}; choose another --out") from exc
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise UsageError(f"another fetch is already writing into {out}; wait for it or choose another --out") from exc
    return f
