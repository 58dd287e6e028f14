"""Planning cost of a URL list: how long bin/fetch takes to cut a LAION-style parquet into units.

Planning streams the list once and writes one small parquet file per unit; since the trust work
it also decides URL duplicates over the whole list and one type per kept column, and hashes each
unit's captions and kept values. This measures `UrlsSource._list_kinds` and `_cut` alone (no network, no
resizing) on a synthetic `--dataset laion` list of N rows (unique URLs, a caption, WIDTH/HEIGHT,
similarity as float32, punsafe and pwatermark as float64), one fresh process per run, for each
given source tree in turn (alternating, so that the trees see the same machine load), and prints
the median wall and CPU seconds per tree.

    .venv/bin/python benchmarks/bench_plan.py --rows 1000000 --runs 3 --trees . /path/to/older/checkout
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "plan"

RUN = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
out = Path(sys.argv[3])
argv = ["--dataset", "laion", "--urls", sys.argv[2], "--out", str(out)]
try:  # a tree with the typed run configuration
    from fastfetch.cli import parse
    source = parse(argv).source(None)
except ImportError:  # older trees: sources took the argparse namespace
    from fastfetch.cli import build_parser
    from fastfetch.sources.base import RunContext
    from fastfetch.sources.urls import LaionSource
    args = build_parser().parse_args(argv)
    source = LaionSource(args, RunContext(out=out, fetcher=None, work_dir=out / "_work" / "laion", args=args))
wall, cpu = time.perf_counter(), time.process_time()
files = [Path(sys.argv[2])]
if hasattr(source, "_cut"):  # a tree whose plan streams
    units = list(source._cut(files, {"bench": 1}, source._list_kinds(files)))
else:
    units = source._write_plan(files, {"bench": 1})
print(len(units), time.perf_counter() - wall, time.process_time() - cpu)
"""


def make_list(rows: int) -> Path:
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = WORK / f"laion-{rows}.parquet"
    if path.exists():
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    scores = [rng.random() for _ in range(rows)]
    pq.write_table(
        pa.table(
            {
                "URL": [f"https://images.example.com/{i}/photo.jpg?w={i % 7}" for i in range(rows)],
                "TEXT": [f"a caption number {i} with some words" for i in range(rows)],
                "WIDTH": [512] * rows,
                "HEIGHT": [512] * rows,
                "similarity": pa.array(scores, pa.float32()),
                "punsafe": scores,
                "pwatermark": scores,
            }
        ),
        path,
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--trees", nargs="+", default=["."], help="source trees to compare (repo roots)")
    args = parser.parse_args()
    listing = make_list(args.rows)
    results: dict[str, list[tuple[float, float]]] = {t: [] for t in args.trees}
    for run in range(args.runs):
        for tree in args.trees:
            out = WORK / "out"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            proc = subprocess.run(
                [sys.executable, "-c", RUN, os.path.abspath(tree), str(listing), str(out)],
                capture_output=True,
                text=True,
                check=True,
            )
            units, wall, cpu = proc.stdout.split()
            results[tree].append((float(wall), float(cpu)))
            print(f"run {run + 1} {tree}: {units} units, {float(wall):.2f} s wall, {float(cpu):.2f} s CPU", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    for tree, got in results.items():
        wall = statistics.median(w for w, _ in got)
        cpu = statistics.median(c for _, c in got)
        print(
            f"{tree}: median {wall:.2f} s wall, {cpu:.2f} s CPU for {args.rows:,} rows ({cpu / args.rows * 1e6:.2f} µs CPU a row)"
        )


if __name__ == "__main__":
    main()
