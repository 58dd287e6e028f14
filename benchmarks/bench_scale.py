"""What a LAION-5B-size run asks of the driver: the manifest and the merge at hundreds of
thousands of units, simulated with dummy units (no network, no images).

* manifest: ``sync_plan`` of N units (what every run's start does), then every unit started and
  finished as the driver records results (one transaction each, fsync'd), then the reads a run
  makes (``records(DONE)``); wall seconds, µs per unit, the file's size, the process's peak RSS;
* merge: N unit folders of 2 shards each (their ``index.json`` only), merged by
  ``mds.merge_index`` into one ``index.json``: wall seconds, its size, and what parsing it costs
  a reader (every rank of a training job parses it at start).

    .venv/bin/python benchmarks/bench_scale.py --units 50000 500000
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastfetch.manifest import Manifest  # noqa: E402
from fastfetch.mds import Layout, merge_index  # noqa: E402
from fastfetch.sources.base import Unit  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work" / "scale"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shard(i: int, name: str) -> dict:
    return {
        "column_encodings": ["str", "int32", "int32", "jpeg", "str", "int32", "int32", "str", "int32"],
        "column_names": ["caption", "height", "original_height", "jpg", "key", "original_width", "width", "url", "x"],
        "column_sizes": [None, 4, 4, None, None, 4, 4, None, 4],
        "compression": None,
        "format": "mds",
        "hashes": ["xxh64"],
        "raw_data": {"basename": name, "bytes": 67_000_000, "hashes": {"xxh64": f"{i:016x}"}},
        "samples": 5000,
        "size_limit": 67108864,
        "version": 2,
        "zip_data": None,
    }


def bench_manifest(n: int) -> dict:
    folder = WORK / f"manifest-{n}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    units = [
        Unit(f"{i:06d}", {"rows": 10_000, "digest": f"{i:024x}", "content": f"{i:024x}", "prefiltered": {}}, 10_000)
        for i in range(n)
    ]
    m = Manifest(folder)
    t = time.perf_counter()
    m.sync_plan(units)
    plan_s = time.perf_counter() - t
    t = time.perf_counter()
    m.sync_plan(units)  # a rerun's start: the same plan again
    replan_s = time.perf_counter() - t
    sample = min(n, 20_000)  # recording results: one transaction per unit; timed on a sample
    t = time.perf_counter()
    for u in units[:sample]:
        m.start(u.id)
        m.finish(u.id, {"kept": 9000, "too_small": 1000}, 10**9, 6 * 10**8, [u.id], [])
    per_unit = (time.perf_counter() - t) / sample
    t = time.perf_counter()
    done = m.records("done")
    read_s = time.perf_counter() - t
    m.close()
    return {
        "units": n,
        "sync_plan_s": round(plan_s, 2),
        "resync_s": round(replan_s, 2),
        "record_ms_per_unit": round(per_unit * 1000, 3),
        "record_all_s_extrapolated": round(per_unit * n, 1),
        "records_done_s": round(read_s, 3),
        "done_read": len(done),
        "manifest_mb": round(sum(p.stat().st_size for p in folder.iterdir()) / 1e6, 1),
        "peak_rss_mb": round(rss_mb()),
    }


def bench_merge(n: int) -> dict:
    root = WORK / f"merge-{n}" / "mds"
    shutil.rmtree(root.parent, ignore_errors=True)
    rels = []
    for i in range(n):
        rel = f"{i:06d}"
        (root / rel).mkdir(parents=True)
        (root / rel / "index.json").write_text(
            json.dumps({"version": 2, "shards": [shard(2 * i, "shard.00000.mds"), shard(2 * i + 1, "shard.00001.mds")]})
        )
        rels.append(rel)
    t = time.perf_counter()
    rows = merge_index(Layout(root), rels)
    merge_s = time.perf_counter() - t
    size = (root / "index.json").stat().st_size
    t = time.perf_counter()
    index = json.loads((root / "index.json").read_bytes())
    parse_s = time.perf_counter() - t
    assert len(index["shards"]) == 2 * n and rows == 10_000 * n
    shutil.rmtree(root.parent, ignore_errors=True)
    return {
        "units": n,
        "shards": 2 * n,
        "merge_s": round(merge_s, 2),
        "index_mb": round(size / 1e6, 1),
        "reader_parse_s": round(parse_s, 2),
        "peak_rss_mb": round(rss_mb()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, nargs="+", default=[50_000])
    ap.add_argument("--what", choices=("manifest", "merge", "both"), default="both")
    args = ap.parse_args()
    for n in args.units:
        if args.what in ("manifest", "both"):
            print(json.dumps({"manifest": bench_manifest(n)}), flush=True)
        if args.what in ("merge", "both"):
            print(json.dumps({"merge": bench_merge(n)}), flush=True)


if __name__ == "__main__":
    main()
