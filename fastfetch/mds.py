"""Per-unit MDS folders: written under a temporary name, renamed into place when finished,
uploaded when the output is remote, and merged into one index (plus one per bucket).

Layout under the MDS root (``--out/mds``, or ``--local-cache/mds`` mirrored to ``--out``)::

    _tmp/…                          units being written (discarded if the run dies)
    [<bucket>/][<node>/]<unit>/     a finished unit: an MDS dataset of its own
    [<bucket>/]index.json           the buckets' own indexes (with --buckets)
    index.json                      every done unit (shard paths relative to the root)

``<bucket>`` (``short-0512``, or mosaic's ``512-768`` with ``--format mosaic``) appears with ``--buckets``, ``<node>`` (``node-01-of-04``) when
several machines share one output. The merged index is our own few lines rather than
``streaming``'s ``merge_index`` because that one picks up every ``index.json`` below the folder
(half-written units included) and writes in place; ours lists exactly the units the manifests
say are done and replaces the index atomically, so a reader never sees a partial file.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from fastfetch import storage
from fastfetch.body import body_len
from fastfetch.formats import OutputFormat, bucket_name
from fastfetch.held import HeldFolder, sweep_abandoned
from fastfetch.mdswriter import MDSWriter

BASE_COLUMNS: dict[str, str] = {
    "jpg": "jpeg",  # the JPEG bytes as stored; MDS writes bytes through unchanged
    "caption": "str",
    "width": "int32",
    "height": "int32",
    "original_width": "int32",
    "original_height": "int32",
    "key": "str",
}
TMP = "_tmp"
SHARD_BYTES = 1 << 26  # 64 MiB, streaming's default


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a unit's rows go: the local MDS root, its remote mirror, node and buckets."""

    root: Path
    node: str = ""
    buckets: tuple[int, ...] = ()
    remote: str | None = None
    format: OutputFormat = OutputFormat.FASTFETCH

    def bucket_of(self, short_side: int) -> str:
        """The bucket folder of an image whose original short side is ``short_side``."""
        if not self.buckets:
            return ""
        low = max((b for b in self.buckets if b <= short_side), default=self.buckets[0])
        return bucket_name(self.format, self.buckets, low)

    @property
    def bucket_folders(self) -> list[str]:
        return [bucket_name(self.format, self.buckets, b) for b in self.buckets]

    def unit_rel(self, unit_id: str, bucket: str = "") -> str:
        return "/".join(p for p in (bucket, self.node, unit_id) if p)

    def unit_rels(self, unit_id: str) -> list[str]:
        """Every place a unit may have written to (one per bucket)."""
        return [self.unit_rel(unit_id, b) for b in self.bucket_folders or [""]]


class UnitWriter:
    """Writes one unit's rows (one MDS writer per bucket, opened on first use) and publishes
    them with ``finish``."""

    def __init__(self, layout: Layout, unit_id: str, columns: dict[str, str], attempt: str = "") -> None:
        """``attempt`` names this try's temporary folder apart from any other's (a unit retried
        on another node while the first try may still be writing on a shared folder)."""
        self.layout = layout
        self.unit_id = unit_id
        self.columns = columns
        self.tmp = layout.root / TMP / (layout.node or "_") / (f"{unit_id}.{attempt}" if attempt else unit_id)
        self._held: HeldFolder | None = None
        if attempt:  # a task's try: its folder is held while it lives, and a dead try's is swept
            self._held = HeldFolder(self.tmp)
            sweep_abandoned(self.tmp.parent)
        else:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(parents=True)
        self._writers: dict[str, MDSWriter] = {}
        self._written: dict[str, int] = {}  # rows written per bucket
        self.rows = 0
        self.bytes = 0

    def write(self, sample: dict[str, Any]) -> tuple[str, int]:
        """Append a row; returns where it went (its bucket, its number there), what ``finish`` may drop."""
        bucket = self.layout.bucket_of(min(sample["original_width"], sample["original_height"]))
        writer = self._writers.get(bucket)
        if writer is None:
            writer = self._writers[bucket] = MDSWriter(
                str(self.tmp / (bucket or "all")), self.columns, hashes=["xxh64"], size_limit=SHARD_BYTES, background=True
            )
        writer.write(sample)
        self.rows += 1
        self.bytes += body_len(sample["jpg"])
        row = self._written.get(bucket, 0)
        self._written[bucket] = row + 1
        return bucket, row

    def flush(self) -> None:
        """Write every row held in memory to its shard file (a unit about to wait holds none)."""
        for writer in self._writers.values():
            writer.flush()

    def finish(self, drop: Collection[tuple[str, int]] = (), dropped_bytes: int = 0) -> list[str]:
        """Flush, sync and rename every bucket folder into place; upload them when the output
        is remote. Returns the published folders (relative to the root). ``drop``: rows (as
        ``write`` placed them) left out after all, ``dropped_bytes`` their images' bytes."""
        published = []
        self.rows -= len(drop)
        self.bytes -= dropped_bytes
        for bucket, writer in self._writers.items():
            writer.finish({row for b, row in drop if b == bucket})
            src = self.tmp / (bucket or "all")
            for path in src.iterdir():
                storage.fsync_path(path)
            rel = self.layout.unit_rel(self.unit_id, bucket)
            final = self.layout.root / rel
            if final.exists():  # left by a crash between rename and manifest commit
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            storage.replace_durably(src, final)
            published.append(rel)
        self._release()
        if self.layout.remote:
            for rel in published:
                upload_unit(self.layout, rel)
        return published

    def discard(self) -> None:
        """Drop everything written so far (an interrupted or failed unit)."""
        for writer in self._writers.values():
            try:
                writer.finish()
            except Exception:  # the writer may be mid-shard; the folder goes anyway
                pass
        self._release()

    def _release(self) -> None:
        if self._held is not None:
            self._held.release()
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def upload_unit(layout: Layout, rel: str) -> None:
    """Upload a finished unit (shards first, its index.json last), then free the local shards;
    the small index.json stays for merging."""
    assert layout.remote is not None
    local = layout.root / rel
    names = sorted(p.name for p in local.iterdir())
    storage.upload(local, f"{layout.remote}/{rel}", [n for n in names if n != "index.json"] + ["index.json"])
    for name in names:
        if name != "index.json":
            (local / name).unlink()


def clean_unfinished(layout: Layout, planned: set[str], done: set[str]) -> None:
    """Remove what this node's earlier runs left unfinished: its temporary folders, and the
    folders of units it planned and did not finish. Nothing else under the MDS root is ever
    touched (another tool's output, a user's latents, another node's units)."""
    shutil.rmtree(layout.root / TMP / (layout.node or "_"), ignore_errors=True)
    if not layout.node:  # on several machines rank 0 may be writing the shared index right now
        for parent in {layout.root, *(layout.root / b for b in layout.bucket_folders)}:
            for leftover in parent.glob(".index.*"):  # an index write a kill cut short
                leftover.unlink(missing_ok=True)
    unfinished = planned - done
    for parent in {(layout.root / rel).parent for rel in layout.unit_rels("x")}:
        if parent.is_dir():
            for path in parent.iterdir():
                if path.name in unfinished and path.is_dir():
                    shutil.rmtree(path)


def merge_index(layout: Layout, unit_rels: Iterable[str]) -> int:
    """Write the merged ``index.json`` (and one per bucket) over the given unit folders;
    returns the total rows. Unit indexes missing locally are read from the remote."""
    by_bucket: dict[str, list[dict[str, Any]]] = defaultdict(list)
    every: list[dict[str, Any]] = []
    for rel in unit_rels:
        index = _read_unit_index(layout, rel)
        bucket = rel.split("/", 1)[0] if layout.buckets else ""
        for shard in index["shards"]:
            every.append(_rebased(shard, rel))
            if bucket:
                by_bucket[bucket].append(_rebased(shard, rel.split("/", 1)[1]))
    written = [_write_index(layout.root, every, "index.json")]
    for bucket in layout.bucket_folders:
        written.append(_write_index(layout.root, by_bucket.get(bucket, []), f"{bucket}/index.json"))
    if layout.remote:
        storage.upload(layout.root, layout.remote, written)
    tmp = layout.root / TMP
    if tmp.is_dir() and not any(tmp.rglob("*.mds")):
        shutil.rmtree(tmp, ignore_errors=True)
    return sum(s["samples"] for s in every)


def _rebased(shard: dict[str, Any], prefix: str) -> dict[str, Any]:
    shard = {k: (dict(v) if isinstance(v, dict) else v) for k, v in shard.items()}
    for part in ("raw_data", "zip_data"):
        if shard.get(part):
            shard[part]["basename"] = f"{prefix}/{shard[part]['basename']}"
    return shard


def _read_unit_index(layout: Layout, rel: str) -> dict[str, Any]:
    local = layout.root / rel / "index.json"
    if not local.exists() and layout.remote:
        storage.download(f"{layout.remote}/{rel}/index.json", local)
    return orjson.loads(local.read_bytes())


def _write_index(root: Path, shards: list[dict[str, Any]], rel: str) -> str:
    storage.write_atomically(root / rel, orjson.dumps({"version": 2, "shards": shards}))
    return rel
