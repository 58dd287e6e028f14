"""One fetch run's settings, typed and frozen: what ``fastfetch.cli`` builds from the command line
and ``fastfetch.run`` (or a scheduler running single units) consumes. Nothing here parses
arguments or touches the disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastfetch import storage
from fastfetch.dedup import DedupIndex, DedupMode
from fastfetch.errors import UsageError
from fastfetch.formats import OutputFormat
from fastfetch.http import FetchConfig, Fetcher
from fastfetch.imaging import ResizeConfig
from fastfetch.mds import Layout
from fastfetch.nodes import Node
from fastfetch.sources import SOURCES, RunContext, Source, SourceOptions


@dataclass(frozen=True, slots=True)
class Selection:
    """Which planned units a run works on (before the split between nodes)."""

    subset: str = "all"  # "all" | "small" (a deterministic ~1%)
    ids: tuple[int, ...] = ()
    retry_failed: bool = False  # only the items that failed for transient reasons


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything a fetch run needs to know, validated."""

    dataset: str
    output: str  # --out: a local folder or an object-storage URL (s3://…)
    local_cache: Path | None  # with a remote output: the local folder for the manifest and shards in transit
    source_options: SourceOptions  # the source's own flags, typed by the source
    resize: ResizeConfig
    workers: int  # resize processes
    fetch: FetchConfig
    format: OutputFormat
    buckets: tuple[int, ...]  # short-side bounds of the MDS subtrees; () for one dataset
    unit_size: int  # rows of a URL list per unit
    limit: int | None  # only the first rows of a URL list
    selection: Selection
    node: Node
    merge_only: bool = False  # --merge: only build the global index from the nodes' summaries
    progress: bool = True
    ray: str | None = None  # --ray: the Ray cluster that runs the units (auto, HOST:PORT, ray://HOST:PORT)
    ray_tasks: int | None = None  # --ray-tasks: units in flight at once (None: from the cluster's CPUs)
    dedup_index: Path | None = None  # --dedup-index (None: dedup.sqlite in the state folder); the mode is resize.dedup

    @property
    def source_class(self) -> type[Source]:
        return SOURCES[self.dataset]

    # -- where things go: "output" is what the user named, "local_root" the local folder
    # -- standing for it (itself, or --local-cache for a remote output), "state_dir" this node's part
    @property
    def remote(self) -> bool:
        return storage.is_remote(self.output)

    @property
    def output_url(self) -> str:
        """The output without a trailing slash when remote (object keys are joined with /)."""
        return self.output.rstrip("/") if self.remote else self.output

    @property
    def local_root(self) -> Path:
        assert self.local_cache is not None or not self.remote
        return Path(self.local_cache if self.remote and self.local_cache is not None else self.output).expanduser()

    @property
    def state_dir(self) -> Path:
        """This node's manifest, lock, stats.json and work files."""
        return self.local_root / "_nodes" / self.node.name if self.node.name else self.local_root

    def layout(self) -> Layout:
        return Layout(
            self.local_root / "mds", self.node.name, self.buckets, f"{self.output_url}/mds" if self.remote else None, self.format
        )

    def dedup(self) -> DedupIndex | None:
        """--dedup's index, opened (None without --dedup). Not part of ``settings``: the index
        records an id the manifest checks, so the same file under another path is fine."""
        if not self.resize.dedup:
            return None
        path = self.dedup_index or (self.state_dir / "dedup.sqlite").absolute()
        mds = (self.local_root / "mds").resolve()
        if path.resolve().is_relative_to(mds):
            raise UsageError(f"--dedup-index {path} is inside the dataset's MDS folder {mds}: keep it outside")
        place = self.output_url if self.remote else str(self.local_root.resolve())
        return DedupIndex(path, place, DedupMode(self.resize.dedup))

    def source(self, fetcher: Fetcher) -> Source:
        """The run's source, not yet opened."""
        ctx = RunContext(
            local_root=self.local_root,
            fetcher=fetcher,
            work_dir=self.state_dir / "_work" / self.dataset,
            min_size=self.resize.min_size,
            max_aspect_ratio=self.resize.max_aspect_ratio,
            unit_size=self.unit_size,
            limit=self.limit,
            format=self.format,
        )
        return self.source_class(self.source_options, ctx)

    def settings(self, fingerprint: dict[str, Any]) -> dict[str, Any]:
        """What decides the content of a unit: a rerun into the same output must not change it
        (and on several machines, what every node must agree on: the merge compares them).
        ``fingerprint`` is the source's part."""
        nodes = {"node_count": self.node.count, "dealing": "unit-id-hash"} if self.node.count > 1 else {}
        return {
            **nodes,
            "dataset": self.dataset,
            "min_size": self.resize.min_size,
            "max_size": self.resize.max_size,
            "resize_filter": self.resize.resize_filter,
            "quality": self.resize.quality,
            **({"max_aspect_ratio": self.resize.max_aspect_ratio} if self.resize.max_aspect_ratio is not None else {}),
            **({"hashes": list(self.resize.hashes)} if self.resize.hashes else {}),
            **({"dedup": self.resize.dedup} if self.resize.dedup else {}),
            "unit_size": self.unit_size,
            "buckets": list(self.buckets),
            **({"format": self.format.value} if self.format is not OutputFormat.FASTFETCH else {}),
            **fingerprint,
        }
