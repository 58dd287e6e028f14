"""``bin/fetch``'s command line: argparse → one validated, frozen ``RunConfig``; the run itself
is ``fastfetch.run``.

Exit codes: 0 every selected unit done; 1 some units failed (rerun to retry them);
2 bad arguments or unusable input; 130 / 143 after a clean stop on SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastfetch import __version__
from fastfetch.config import RunConfig, Selection
from fastfetch.dedup import NEAR_BITS, DedupMode
from fastfetch.errors import UsageError, transient_names
from fastfetch.formats import MOSAIC_BUCKETS, OutputFormat
from fastfetch.http import USER_AGENT, FetchConfig
from fastfetch.imaging import HASHES, RESIZE_FILTERS, ResizeConfig
from fastfetch.nodes import Node, detect
from fastfetch.redact import redact
from fastfetch.resize_pool import default_workers
from fastfetch.run import run
from fastfetch.sources import SOURCES
from fastfetch.storage import is_remote

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fetch",
        description="Download an image-caption dataset, keep images whose short side is at least "
        "--min-size, resize the short side down to --max-size, and pack them into MosaicML "
        "Streaming (MDS) shards. Resumable: rerun the same command after any interruption.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        default="demo",
        choices=sorted(SOURCES),
        help="what to fetch: " + "; ".join(f"{n}: {c.help}" for n, c in sorted(SOURCES.items())),
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (MDS under OUT/mds, OUT/stats.json, manifest), or an object-storage URL such as s3://bucket/prefix (then --local-cache is needed); default: data/<dataset>",
    )
    parser.add_argument(
        "--local-cache",
        type=Path,
        default=None,
        help="with a remote --out: local folder for the manifest and shards in transit (shards are deleted once uploaded)",
    )
    parser.add_argument("--version", action="version", version=f"fastfetch {__version__}")

    sel = parser.add_argument_group("what to fetch")
    sel.add_argument(
        "--subset",
        choices=("all", "small"),
        default="all",
        help="small = a deterministic ~1%% of the units (at least one), for trying things out",
    )
    sel.add_argument(
        "--ids", type=int, nargs="+", default=None, help="explicit unit numbers to fetch (e.g. archive numbers); default: all"
    )
    sel.add_argument(
        "--limit", type=int, default=None, help="only the first N rows of a URL list (for trying things out); default: all"
    )
    sel.add_argument(
        "--retry-failed",
        action="store_true",
        help=f"refetch only the items that failed for transient reasons ({transient_names()}) in earlier runs, nothing else",
    )
    sel.add_argument(
        "--unit-size", type=int, default=10_000, help="rows of a URL list per work unit (one MDS folder, committed as a whole)"
    )

    img = parser.add_argument_group("images")
    img.add_argument(
        "--min-size",
        type=int,
        default=None,
        help="drop images whose short side is smaller (pixels); unset: 256, but 0 for --dataset coco, an evaluation set that keeps every image",
    )
    img.add_argument(
        "--max-size",
        type=int,
        default=512,
        help="resize images whose short side is larger down to this (pixels, aspect ratio kept)",
    )
    img.add_argument(
        "--max-aspect-ratio",
        type=float,
        default=None,
        metavar="R",
        help="drop images whose long side is more than R times their short side (aspect_ratio; default: "
        "keep all); URL lists with listed sizes (laion, --listed-size) drop them before downloading",
    )
    img.add_argument(
        "--hashes",
        default="",
        metavar="sha256[,md5]",
        help="store these digests of each kept image's original downloaded bytes as columns of the same names "
        "(hex; computed by the resize workers, no second pass; default: none)",
    )
    img.add_argument(
        "--dedup",
        choices=[m.value for m in DedupMode],
        default=None,
        help="drop images already kept before them in plan order, in earlier runs into the same --out, or in the "
        "datasets sharing --dedup-index: exact = the same downloaded bytes (duplicate_content); near = also a "
        f"perceptual hash within {NEAR_BITS} of 64 bits (near_duplicate: re-encoded, resized, slightly cropped copies)",
    )
    img.add_argument(
        "--dedup-index",
        default=None,
        metavar="FILE",
        help="the dedup index file (SQLite) to judge and record kept images in; give several datasets the same file to "
        "dedup across them (default: dedup.sqlite beside the manifest: in --out, or in --local-cache for a remote --out)",
    )
    img.add_argument(
        "--resize-filter", choices=sorted(RESIZE_FILTERS), default="bicubic", help="downscaling filter (antialiased)"
    )
    img.add_argument(
        "--quality", type=int, default=95, help="JPEG quality of re-encoded images (untouched JPEGs keep their bytes)"
    )
    img.add_argument("--workers", type=int, default=default_workers(), help="resize processes (default: cores available)")

    net = parser.add_argument_group("network")
    net.add_argument("--concurrency", type=int, default=256, help="requests in flight at once")
    net.add_argument("--per-host", type=int, default=16, help="connections at once to one host")
    net.add_argument(
        "--timeout",
        type=float,
        default=20.0,
        help="seconds per attempt (connect + read), after which a request counts as timeout",
    )
    net.add_argument(
        "--retries",
        type=int,
        default=2,
        help="extra attempts on timeouts, connection errors, 5xx and 429 (exponential backoff with jitter; Retry-After honoured)",
    )
    net.add_argument(
        "--max-bytes",
        type=int,
        default=32 * 1024 * 1024,
        help="largest response body accepted (bytes); larger counts as too_large",
    )
    net.add_argument(
        "--max-inflight-mb",
        type=int,
        default=1024,
        help="memory for response bodies held at once (downloading or waiting to be resized), in MiB; bounds peak memory at any --concurrency",
    )
    net.add_argument("--max-redirects", type=int, default=5, help="redirects followed per URL")
    net.add_argument(
        "--ignore-robots",
        action="store_true",
        help="ignore X-Robots-Tag noai/noimageai/noindex/noimageindex opt-outs (honoured by default)",
    )
    net.add_argument(
        "--allow-private-networks",
        action="store_true",
        help="allow URLs whose host is or resolves to a loopback, private, link-local or reserved address "
        "(refused by default and counted as private_address, so a URL list cannot reach your own network)",
    )
    net.add_argument(
        "--respect-robots-txt",
        action="store_true",
        help="check every image URL against its host's robots.txt (fetched once per host; the groups for "
        "--user-agent's name, else *; longest Allow/Disallow match wins; unreadable: 4xx allows all, "
        "5xx or unreachable disallows all); refused URLs count as robots_txt and are never requested",
    )
    net.add_argument(
        "--per-host-rps",
        type=float,
        default=None,
        metavar="N",
        help="at most N image requests a second to one host (on top of --per-host connections); a 429's "
        "Retry-After holds back every request to that host",
    )
    net.add_argument(
        "--user-agent",
        default=USER_AGENT,
        help="User-Agent header sent with every request; robots.txt groups match its name. Crawling the "
        "web, name yourself and a contact, e.g. 'acme-data-bot/1.0 (+https://acme.example/bot; data@acme.example)'",
    )

    out = parser.add_argument_group("output")
    out.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is still printed)")
    out.add_argument(
        "--format",
        choices=[f.value for f in OutputFormat],
        default=OutputFormat.FASTFETCH.value,
        help="MDS layout: fastfetch (jpg as an MDS jpeg column, our columns) or mosaic (what mosaicml/diffusion's "
        "LAION pipeline writes and its StreamingLAIONDataset reads: jpg as bytes, its 16 columns, its "
        "resolution-bucket folders 0-64 … 1024-1048576)",
    )
    out.add_argument(
        "--buckets",
        default=None,
        help="comma-separated short-side bounds, e.g. 0,256,512,768,1024: each kept image goes to the MDS subtree of its original short side (OUT/mds/short-0512/…), each bucket with its own index; default: one dataset",
    )

    multi = parser.add_argument_group("several machines (see README: Scale-out)")
    multi.add_argument(
        "--node-rank", type=int, default=None, help="this machine's rank (default: RANK from torchrun, else SLURM_PROCID, else 0)"
    )
    multi.add_argument(
        "--num-nodes",
        type=int,
        default=None,
        help="machines sharing the work (default: WORLD_SIZE from torchrun, else SLURM_NTASKS, else 1)",
    )
    multi.add_argument(
        "--merge",
        action="store_true",
        help="only merge: build OUT/mds/index.json and OUT/stats.json from every node's finished units",
    )
    multi.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="run the units as tasks on a Ray cluster: auto (the cluster this machine belongs to, or RAY_ADDRESS), "
        "HOST:PORT, or ray://HOST:PORT; this process plans, records and merges, --out must be a folder every node "
        "sees or object storage, --workers is each task's resize processes (and CPUs); default: no Ray",
    )
    multi.add_argument(
        "--ray-tasks",
        type=int,
        default=None,
        help="with --ray: units in flight at once (default: the cluster's CPUs / --workers, + 2)",
    )

    groups = {name: parser.add_argument_group(f"--dataset {name}") for name in sorted(SOURCES)}
    for own_only in (True, False):
        for name, cls in sorted(SOURCES.items()):
            cls.Options.add_arguments(groups[name], own_only)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse(argv)
    except UsageError as exc:
        print(f"fetch: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    return run(config)


def parse(argv: list[str] | None = None) -> RunConfig:
    """The run configuration from the command line; UsageError for values no run can use
    (argparse itself exits 2 for malformed ones)."""
    args = build_parser().parse_args(argv)
    source = SOURCES[args.dataset]
    min_size = source.default_min_size if args.min_size is None else args.min_size
    if min_size < 0:
        raise UsageError(f"--min-size must be 0 or more (got {min_size})")
    for flag in ("max_size", "concurrency", "per_host", "unit_size", "max_bytes", "max_inflight_mb"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive (got {getattr(args, flag)})")
    if min_size > args.max_size:
        raise UsageError(f"--min-size {min_size} is larger than --max-size {args.max_size}")
    if not 1 <= args.quality <= 100:
        raise UsageError(f"--quality must be in 1..100 (got {args.quality})")
    if args.max_aspect_ratio is not None and not 1 <= args.max_aspect_ratio < float("inf"):
        raise UsageError(f"--max-aspect-ratio is long side / short side: 1 or more (got {args.max_aspect_ratio})")
    asked = {h.strip().lower() for h in args.hashes.split(",") if h.strip()}
    if asked - set(HASHES):
        raise UsageError(f"--hashes {args.hashes}: choose among {', '.join(HASHES)} (comma-separated)")
    hashes = tuple(h for h in HASHES if h in asked)  # one order whatever the flag's: the same setting
    if args.per_host_rps is not None and not args.per_host_rps > 0:
        raise UsageError(f"--per-host-rps must be positive (got {args.per_host_rps})")
    if args.workers < 0 or args.retries < 0 or (args.limit is not None and args.limit <= 0):
        raise UsageError("--workers and --retries must be ≥ 0 and --limit ≥ 1")
    if args.ray is not None:
        _check_ray(args)
    node = Node() if args.ray else detect(args.node_rank, args.num_nodes)
    _check_dedup(args, node)
    output_format = OutputFormat(args.format)
    options = source.Options.from_namespace(args)
    fetch = FetchConfig(
        concurrency=args.concurrency,
        per_host=args.per_host,
        timeout=args.timeout,
        connect_timeout=min(10.0, args.timeout),
        read_timeout=min(10.0, args.timeout),
        retries=args.retries,
        max_bytes=args.max_bytes,
        max_inflight_bytes=args.max_inflight_mb << 20,
        max_redirects=args.max_redirects,
        respect_robots=not args.ignore_robots,
        robots_txt=args.respect_robots_txt,
        per_host_rps=args.per_host_rps,
        allow_private_networks=args.allow_private_networks or source.serves_locally,
        user_agent=args.user_agent,
    )
    return RunConfig(
        dataset=args.dataset,
        output=_output(args),
        local_cache=args.local_cache.expanduser().absolute() if args.ray and args.local_cache else args.local_cache,
        source_options=options.resolved() if args.ray else options,
        resize=ResizeConfig(
            min_size,
            args.max_size,
            args.resize_filter,
            args.quality,
            max_aspect_ratio=args.max_aspect_ratio,
            hashes=hashes,
            dedup=args.dedup or "",
        ),
        dedup_index=Path(args.dedup_index).expanduser().absolute() if args.dedup_index is not None else None,
        workers=args.workers,
        fetch=fetch,
        format=output_format,
        buckets=_buckets(args.buckets, output_format),
        unit_size=args.unit_size,
        limit=args.limit,
        selection=Selection(args.subset, tuple(args.ids or ()), args.retry_failed),
        node=node,
        merge_only=args.merge,
        progress=not args.no_progress,
        ray=args.ray,
        ray_tasks=args.ray_tasks,
    )


def _check_ray(args: argparse.Namespace) -> None:
    if args.node_rank is not None or args.num_nodes is not None:
        raise UsageError(
            "--ray schedules the units itself: drop --node-rank/--num-nodes (run one fetch, on any machine of the cluster)"
        )
    if args.merge:
        raise UsageError("--merge is for runs split with --node-rank/--num-nodes; a --ray run merges by itself")
    if args.per_host_rps is not None:
        raise UsageError(
            "--per-host-rps paces the requests of one process, and with --ray every unit task would pace on its own: "
            "run the list without --ray, or split it by host"
        )
    if args.ray_tasks is not None and args.ray_tasks <= 0:
        raise UsageError(f"--ray-tasks must be positive (got {args.ray_tasks})")
    if not args.ray.strip():
        raise UsageError("--ray needs an address: auto, HOST:PORT or ray://HOST:PORT")


def _check_dedup(args: argparse.Namespace, node: Node) -> None:
    if args.dedup_index is not None and not args.dedup_index.strip():
        raise UsageError("--dedup-index needs a file name (or leave it out: dedup.sqlite beside the manifest)")
    if args.dedup_index is not None and args.dedup is None:
        raise UsageError("--dedup-index is the index of --dedup: add --dedup exact (or near)")
    if args.dedup is None:
        return
    if args.ray is not None or node.count > 1:
        several = "--ray" if args.ray is not None else f"{node.count} nodes (--num-nodes, or torchrun's/Slurm's variables)"
        raise UsageError(
            f"--dedup judges each unit against every unit before it in plan order, which one machine's run decides, "
            f"and this run has {several}: run it on one machine (--num-nodes 1 overrides the variables), or store "
            "--hashes sha256 and drop duplicates afterwards"
        )
    if args.dedup_index is not None and (is_remote(args.dedup_index) or "://" in args.dedup_index):
        raise UsageError(f"--dedup-index {args.dedup_index}: the index is a local SQLite file (a path, not a URL)")
    if args.merge:
        raise UsageError("--merge only merges node summaries: drop --dedup")


def _output(args: argparse.Namespace) -> str:
    """--out as given; with --ray, a local folder as an absolute path (tasks run in other folders)."""
    out = args.out or str(Path("data") / args.dataset)
    if args.ray and not is_remote(out):
        return str(Path(out).expanduser().absolute())
    return out


def _buckets(spec: str | None, output_format: OutputFormat) -> tuple[int, ...]:
    if not spec:
        return MOSAIC_BUCKETS if output_format is OutputFormat.MOSAIC else ()
    try:
        values = sorted({int(v) for v in spec.split(",") if v.strip()})
    except ValueError:
        raise UsageError(f"--buckets takes comma-separated short-side sizes such as 0,256,512,768,1024 (got {spec!r})") from None
    if not values or values[0] < 0:
        raise UsageError(f"--buckets needs non-negative sizes (got {spec!r})")
    return tuple(values)
