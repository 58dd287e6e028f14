"""Per-unit MDS directories: written under a temporary name, renamed into place when finished.

Layout under ``--out/mds/``::

    _tmp/<unit>/          being written (discarded if the run dies)
    <unit>/index.json     a finished unit, one MDS dataset of its own
    index.json            all done units merged (shard paths prefixed with the unit folder)

The merged index is our own few lines rather than ``streaming``'s ``merge_index`` because that
one picks up every ``index.json`` below the folder (half-written units included) and writes
the result in place; ours lists exactly the units the manifest says are done and replaces the
index atomically, so a reader never sees a partial file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
from streaming import MDSWriter

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


class UnitWriter:
    """Writes one unit's rows into ``mds/_tmp/<unit>`` and publishes it with ``finish``."""

    def __init__(self, mds_root: Path, unit_id: str, columns: dict[str, str]) -> None:
        self.final = mds_root / unit_id
        self.tmp = mds_root / TMP / unit_id
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.rows = 0
        self.bytes = 0
        self._writer = MDSWriter(
            out=str(self.tmp), columns=columns, compression=None, hashes=["xxh64"], size_limit=SHARD_BYTES
        )

    def write(self, sample: dict[str, Any]) -> None:
        self._writer.write(sample)
        self.rows += 1
        self.bytes += len(sample["jpg"])

    def finish(self) -> None:
        """Flush the last shard and the unit index, sync them, and rename the folder into place."""
        self._writer.finish()
        for path in self.tmp.iterdir():
            _fsync(path)
        if self.final.exists():  # left by a crash between rename and manifest commit
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        _fsync(self.final.parent)

    def discard(self) -> None:
        """Drop everything written so far (an interrupted or failed unit)."""
        try:
            self._writer.finish()
        except Exception:  # the writer may be mid-shard; the folder goes anyway
            pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def clean_unfinished(mds_root: Path, done: set[str]) -> None:
    """Remove temporary folders and any unit folder the manifest does not count as done."""
    shutil.rmtree(mds_root / TMP, ignore_errors=True)
    if not mds_root.exists():
        return
    for path in mds_root.iterdir():
        if path.is_dir() and path.name not in done and (path / "index.json").exists():
            shutil.rmtree(path)


def merge_index(mds_root: Path, unit_ids: Iterable[str]) -> int:
    """Write ``mds_root/index.json`` over the given finished units; returns the total rows."""
    shards: list[dict[str, Any]] = []
    for uid in unit_ids:
        index = orjson.loads((mds_root / uid / "index.json").read_bytes())
        for shard in index["shards"]:
            for part in ("raw_data", "zip_data"):
                if shard.get(part):
                    shard[part]["basename"] = f"{uid}/{shard[part]['basename']}"
            shards.append(shard)
    mds_root.mkdir(parents=True, exist_ok=True)
    if (mds_root / TMP).is_dir() and not any((mds_root / TMP).iterdir()):
        (mds_root / TMP).rmdir()
    tmp = mds_root / "index.json.tmp"
    tmp.write_bytes(orjson.dumps({"version": 2, "shards": shards}))
    _fsync(tmp)
    os.replace(tmp, mds_root / "index.json")
    return sum(s["samples"] for s in shards)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
