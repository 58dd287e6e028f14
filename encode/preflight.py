"""Is the image MDS whole? Checked before any model loads, so a bad dataset is a message.

Streaming reads shards lazily, deep inside DataLoader workers: a missing local shard makes it
wait forever, a damaged header fails a worker with an IndexError, an empty index fails with
"Stream contains no samples". Here, before anything else, every shard the index lists is
checked to be present with the size the index records and a header that agrees with it (its
sample count, offsets inside the file), and, with ``verify``, its contents against the index's
hash. The work is dealt over the ranks (shard ``i`` to rank ``i % world``); the caller gathers
the problems so that every rank stops with the same message. A remote dataset's shards are
checked for presence; Streaming verifies their hashes as it downloads them (``validate_hash``).
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Any

from encode.paths import INDEX, stream_location
from fastfetch import storage
from fastfetch.mdswriter import hasher

_CHUNK = 8 << 20


@dataclass(frozen=True, slots=True)
class Dataset:
    """What the index of an image MDS promises."""

    root: str  # the local folder (a remote dataset's cache)
    remote: str | None
    shards: list[dict[str, Any]]

    @property
    def rows(self) -> int:
        return sum(int(s.get("samples", 0)) for s in self.shards)

    @property
    def hash_algo(self) -> str | None:
        """The hash every shard records (for Streaming's ``validate_hash``), or None."""
        common = None
        for shard in self.shards:
            names = set((shard.get("raw_data") or {}).get("hashes") or {})
            common = names if common is None else common & names
        return min(common) if common else None


def read_index(path: str, cache_dir: str | None = None) -> Dataset:
    """The index of the image MDS at ``path`` (downloaded into the cache when remote)."""
    remote, local = stream_location(path, cache_dir)
    index_path = os.path.join(local, INDEX)
    if remote is not None:
        from encode.paths import fetch_small_file

        try:
            index_path = fetch_small_file(path, INDEX, cache_dir)
        except Exception as exc:  # every storage backend has its own errors
            raise ValueError(f"cannot read {remote}/{INDEX}: {type(exc).__name__}: {exc}") from exc
    try:
        with open(index_path, "rb") as f:
            index = json.load(f)
        shards = index["shards"]
        if not isinstance(shards, list):
            raise TypeError("shards is not a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{index_path} is not an MDS index ({type(exc).__name__}: {exc})") from exc
    return Dataset(local, remote, shards)


def problems(ds: Dataset, rank: int = 0, world: int = 1, verify: bool = True) -> list[str]:
    """What is wrong with this rank's share of the shards (empty when they are whole)."""
    if not ds.rows:
        return [
            f"{ds.remote or ds.root} holds no rows ({len(ds.shards)} shards in its {INDEX}): nothing to encode; "
            "fetch some units first"
        ]
    twice = sorted(name for name, n in Counter(map(_stored_name, ds.shards)).items() if n > 1)
    if twice:  # every row of those shards would be encoded twice
        return [f"{ds.remote or ds.root}/{INDEX} lists {name} more than once" for name in twice[:5]]
    mine = [s for i, s in enumerate(ds.shards) if i % world == rank]
    if ds.remote is not None:
        present = set(storage.relative_names(ds.remote))
        return [f"{ds.remote}/{name}: missing (listed in {INDEX})" for name in map(_stored_name, mine) if name not in present]
    found: list[str] = []
    for shard in mine:
        problem = _check_local(ds.root, shard, verify)
        if problem:
            found.append(problem)
    return found


def _stored_name(shard: dict[str, Any]) -> str:
    raw, zipped = shard.get("raw_data") or {}, shard.get("zip_data") or {}
    return raw.get("basename") or zipped.get("basename") or "?"


def _check_local(root: str, shard: dict[str, Any], verify: bool) -> str | None:
    raw, zipped = shard.get("raw_data") or {}, shard.get("zip_data") or {}
    raw_path = os.path.join(root, raw.get("basename", ""))
    if raw.get("basename") and os.path.isfile(raw_path):
        info, path, is_raw = raw, raw_path, True
    elif zipped.get("basename") and os.path.isfile(os.path.join(root, zipped["basename"])):
        info, path, is_raw = zipped, os.path.join(root, zipped["basename"]), False
    else:
        return f"{raw_path}: missing (listed in {os.path.join(root, INDEX)})"
    size = os.path.getsize(path)
    if info.get("bytes") is not None and size != info["bytes"]:
        return f"{path}: {size:,} bytes, the index says {info['bytes']:,} (truncated or replaced)"
    if is_raw and shard.get("format", "mds") == "mds":
        problem = _check_header(path, size, int(shard.get("samples", 0)))
        if problem:
            return f"{path}: {problem}"
    if verify:
        for algo, expected in (info.get("hashes") or {}).items():
            try:
                h = hasher(algo)
            except (ValueError, AttributeError):
                continue  # an algorithm neither xxhash nor hashlib knows: the next one
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
            if h.hexdigest() != expected:
                return f"{path}: its {algo} is {h.hexdigest()}, the index says {expected} (corrupted)"
            break
    return None


def _check_header(path: str, size: int, samples: int) -> str | None:
    """An MDS shard starts with ``u32 samples`` and ``u32 offsets[samples + 1]``: the count must
    be the index's, and the offsets must rise within the file and end at its end."""
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4:
            return "too short for an MDS header"
        (count,) = struct.unpack("<I", head)
        if count != samples:
            return f"its header counts {count} samples, the index says {samples} (damaged)"
        table = f.read(4 * (count + 1))
    if len(table) < 4 * (count + 1):
        return "header cut short (damaged)"
    offsets = struct.unpack(f"<{count + 1}I", table)
    if offsets[0] < 4 * (count + 2) or any(b < a for a, b in zip(offsets, offsets[1:])) or offsets[-1] != size:
        return "its header's sample offsets do not fit the file (damaged)"
    return None
