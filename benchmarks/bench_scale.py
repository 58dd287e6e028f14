"""What a LAION-5B-size run asks of the driver: the manifest and the merge at hundreds of
thousands of units, simulated with dummy units (no network, no images).

* manifest: ``sync_plan`` of N units (what every run's start does), then every unit started and
  finished as the driver records results (one transaction each, fsync'd), then the reads a run
  makes (``records(DONE)``); wall seconds, µs per unit, the file's size, the process's peak RSS;
* merge: N unit folders of 2 shards each (their ``index.json`` only), merged by
  ``mds.merge_index`` into one ``index.json``: wall seconds, its size, and what parsing it costs
  a reader (every rank of a training job parses it at start);
* plan (``--plan-rows``): a synthetic LAION-style list of that many rows (1M-row parquet files,
  unique URLs, a caption, WIDTH/HEIGHT, similarity) planned the way a run plans it
  (``UrlsSource.plan_batches``, units of 10,000 rows) in a fresh process per ``--url-dedup``
  scope: seconds until the first units are out (when a run starts fetching), seconds for the
  whole plan, rows/s, the process's peak RSS.

    .venv/bin/python benchmarks/bench_scale.py --units 50000 500000
    .venv/bin/python benchmarks/bench_scale.py --what plan --plan-rows 50000000
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastfetch.manifest import Manifest  # noqa: E402
from fastfetch.mds import Layout, merge_index  # noqa: E402
from fastfetch.sources.base import Unit  # noqa: E402
from fastfetch.sources.urls import PLAN_AHEAD  # noqa: E402

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
    for first in range(0, n, PLAN_AHEAD):  # batch by batch, as a streamed plan is recorded
        m.sync_plan(units[first : first + PLAN_AHEAD], first)
    plan_s = time.perf_counter() - t
    t = time.perf_counter()
    m.sync_plan(units)  # a rerun's start: the cached plan again, one batch
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


PLAN = """
import asyncio, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from fastfetch.cli import parse
source = parse(["--dataset", "laion", "--urls", sys.argv[2], "--out", sys.argv[3], "--url-dedup", sys.argv[4]]).source(None)

async def main():
    t = time.perf_counter()
    first, units, rows = None, 0, 0
    async for batch in source.plan_batches():
        first = first or time.perf_counter() - t
        units += len(batch)
        rows += sum(u.rows for u in batch)
    total = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"first_units_s": round(first, 2), "plan_s": round(total, 1), "units": units, "rows": rows,
                      "rows_per_s": round(rows / total), "peak_rss_mb": round(rss)}))

asyncio.run(main())
"""


def make_lists(rows: int) -> Path:
    """``rows`` rows in parquet files of 1M rows (what a LAION part file holds, ~1/20 of one)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder = WORK / f"lists-{rows}"
    if (folder / "done").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    per_file = 1_000_000
    for f, start in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - start)
        ids = pc.cast(pa.array(range(start, start + n), pa.int64()), pa.string())
        pq.write_table(
            pa.table(
                {
                    "URL": pc.binary_join_element_wise("https://images.example.com/", ids, "/photo.jpg", ""),
                    "TEXT": pc.binary_join_element_wise("a caption number ", ids, " with some words", ""),
                    "WIDTH": pa.array([512] * n, pa.int32()),
                    "HEIGHT": pa.array([512] * n, pa.int32()),
                    "similarity": pa.array([0.3] * n, pa.float32()),
                }
            ),
            folder / f"part-{f:05d}.parquet",
        )
    (folder / "done").touch()
    return folder


def bench_plan(rows: int, scopes: list[str]) -> list[dict]:
    lists = make_lists(rows)
    results = []
    for scope in scopes:
        out = WORK / "plan-out"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run(
            [sys.executable, "-c", PLAN, str(Path(__file__).resolve().parent.parent), str(lists), str(out), scope],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append({"rows": rows, "url_dedup": scope, **json.loads(proc.stdout)})
        shutil.rmtree(out, ignore_errors=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, nargs="+", default=[50_000])
    ap.add_argument("--what", choices=("manifest", "merge", "both", "plan"), default="both")
    ap.add_argument("--plan-rows", type=int, default=5_000_000)
    ap.add_argument("--scopes", nargs="+", default=["list", "file", "none"])
    args = ap.parse_args()
    if args.what == "plan":
        for result in bench_plan(args.plan_rows, args.scopes):
            print(json.dumps({"plan": result}), flush=True)
        return
    for n in args.units:
        if args.what in ("manifest", "both"):
            print(json.dumps({"manifest": bench_manifest(n)}), flush=True)
        if args.what in ("merge", "both"):
            print(json.dumps({"merge": bench_merge(n)}), flush=True)


if __name__ == "__main__":
    main()
