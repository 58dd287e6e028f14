#!/usr/bin/env python3
"""URL mode: ``bin/fetch --dataset urls`` against img2dataset on the same URL list, same run.

    python benchmarks/run_url_bench.py --runs 3          # the real thing (~5 min)
    python benchmarks/run_url_bench.py --quick           # smoke test (~1 min)
    python benchmarks/run_url_bench.py --sweep-threads   # find img2dataset's best thread count

Both tools read the same parquet (url, caption) of the corpus (benchmarks/corpus.py) served by
nginx on 127.0.0.1, with the same rules: drop short side < 256, resize the short side down to
512 when larger (aspect kept), JPEG quality 95, 2 processes. Runs alternate (fetch, img2dataset,
img2dataset, fetch, …) so that drift in machine load hits both alike. Reported per tool: kept
images/s (median), CPU seconds per input image, peak RSS of the process tree, kept counts, and
a per-URL comparison of what each kept, so that any difference is explained.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus as corpus_mod  # noqa: E402
from common import (  # noqa: E402
    ROOT,
    WORK,
    Measurement,
    byte_compile,
    fetch_env,
    fetch_help,
    fresh_dir,
    load_str,
    main_python,
    md_table,
    measure,
    median,
    run_dir,
    save_result,
    venv_python,
)
from run_ceiling import run_inner  # noqa: E402
from server import Nginx  # noqa: E402

I2D_VENV = "venv-img2dataset"


def fetch_cmd(urls: Path, out: Path, workers: int, concurrency: int, help_text: str) -> list[str]:
    cmd = [
        main_python(),
        str(ROOT / "bin" / "fetch"),
        "--dataset",
        "urls",
        "--urls",
        str(urls),
        "--out",
        str(out),
        "--no-progress",
        "--workers",
        str(workers),
        "--concurrency",
        str(concurrency),
        "--min-size",
        "256",
        "--max-size",
        "512",
        "--quality",
        "95",
        "--retries",
        "0",
    ]
    if "--allow-private-networks" in help_text:
        cmd.append("--allow-private-networks")
    return cmd


def i2d_cmd(urls: Path, out: Path, processes: int, threads: int, per_shard: int, skip_reencode: bool = False) -> list[str]:
    exe = venv_python(I2D_VENV).parent / "img2dataset"
    cmd = [
        str(exe),
        "--url_list",
        str(urls),
        "--input_format",
        "parquet",
        "--url_col",
        "url",
        "--caption_col",
        "caption",
        "--output_format",
        "webdataset",
        "--output_folder",
        str(out),
        "--processes_count",
        str(processes),
        "--thread_count",
        str(threads),
        "--resize_mode",
        "keep_ratio",
        "--resize_only_if_bigger",
        "True",
        "--image_size",
        "512",
        "--min_image_size",
        "256",
        "--encode_format",
        "jpg",
        "--encode_quality",
        "95",
        "--number_sample_per_shard",
        str(per_shard),
        "--timeout",
        "20",
        "--retries",
        "0",
        "--enable_wandb",
        "False",
    ]
    if skip_reencode:
        cmd += ["--skip_reencode", "True"]
    return cmd


def snapshot(rev: str) -> Path:
    """bin/ and fastfetch/ of commit ``rev`` extracted under _work (git archive; the work tree is untouched)."""
    import subprocess

    dest = WORK / f"fetch-{rev}"
    if not (dest / "bin" / "fetch").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev, "bin", "fastfetch"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    byte_compile(dest)
    return dest


def fetch_counts(out: Path) -> dict[str, Any]:
    stats = json.loads((out / "stats.json").read_text())
    return {"kept": stats["kept"], "items": stats["items"], "rejected": stats["rejected"], "this_run": stats["this_run"]}


def i2d_counts(out: Path) -> dict[str, Any]:
    kept = total = 0
    reasons: Counter[str] = Counter()
    for f in sorted(out.glob("*_stats.json")):
        s = json.loads(f.read_text())
        kept += s.get("successes", 0)
        total += s.get("count", 0)
        for reason, count in s.get("status_dict", {}).items():
            if reason != "success" and isinstance(count, int):
                short = reason.strip().splitlines()[0][:70] if reason.strip() else "?"
                reasons[short] += count
    return {"kept": kept, "items": total, "rejected": dict(reasons)}


def fetch_kept_urls(out: Path) -> set[str]:
    import orjson
    from streaming.base.format import reader_from_json

    root = out / "mds"
    index = orjson.loads((root / "index.json").read_bytes())
    urls = set()
    for info in index["shards"]:
        shard = reader_from_json(str(root), None, info)
        for i in range(shard.samples):
            urls.add(shard.decode_sample(shard.get_sample_data(i))["url"])
    return urls


def i2d_kept_urls(out: Path) -> set[str]:
    import pyarrow.parquet as pq

    urls = set()
    for f in out.glob("*.parquet"):
        t = pq.read_table(f, columns=["url", "status"]).to_pydict()
        urls.update(u for u, s in zip(t["url"], t["status"]) if s == "success")
    return urls


def explain_differences(items: list[dict], base: str, fetch_out: Path, i2d_out: Path) -> dict[str, Any]:
    by_url = {f"{base}/{r['file']}": r for r in items}
    a, b = fetch_kept_urls(fetch_out), i2d_kept_urls(i2d_out)
    only_fetch = Counter(by_url[u.split("?")[0]]["kind"] for u in a - b if u.split("?")[0] in by_url)
    only_i2d = Counter(by_url[u.split("?")[0]]["kind"] for u in b - a if u.split("?")[0] in by_url)
    return {"both": len(a & b), "only_fetch": dict(only_fetch), "only_img2dataset": dict(only_i2d)}


def run_one(
    tool: str, i: int, urls: Path, args: argparse.Namespace, help_text: str, srv: Nginx
) -> tuple[Measurement, dict[str, Any], Path]:
    out = fresh_dir(WORK / "url" / f"{tool}-{i}")
    if tool != "fetch":
        out.rmdir()  # img2dataset makes it (an existing folder + overwrite mode loses its _tmp)
    if tool.startswith("fetch"):
        cmd = fetch_cmd(urls, out, args.processes, args.concurrency, help_text)
        if tool == "fetch-before":  # bin/fetch of an older commit (--before REV): what a change gave
            cmd[1] = str(snapshot(args.before) / "bin" / "fetch")
        if tool == "fetch-dedup":  # the same run with content dedup (--repeat's copies are byte-identical: duplicates)
            cmd += ["--dedup", "exact"]
        if tool == "fetch-ray":  # the same run as Ray tasks (the Ray head at --ray-address); CPU/RSS: the driver only
            cmd[cmd.index("--workers") + 1] = str(args.ray_workers)
            cmd += ["--ray", args.ray_address]
        if args.unit_size:
            cmd += ["--unit-size", str(args.unit_size)]
    else:
        cmd = i2d_cmd(urls, out, args.processes, args.threads, args.per_shard, skip_reencode=(tool == "img2dataset-skip"))
    nginx0 = srv.cpu_seconds()
    m = measure(tool, cmd, env=fetch_env(), cwd=run_dir(cmd), timeout=args.timeout)
    m.extra["nginx_cpu_s"] = round(srv.cpu_seconds() - nginx0, 2)
    if m.returncode != 0:
        print(f"{tool} failed ({m.returncode}):\n{m.stderr_tail}", file=sys.stderr)
        raise SystemExit(1)
    counts = fetch_counts(out) if tool.startswith("fetch") else i2d_counts(out)
    m.extra["counts"] = counts
    return m, counts, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    corpus_mod.add_corpus_arguments(p)
    p.add_argument("--runs", type=int, default=3, help="alternating runs per tool")
    p.add_argument("--processes", type=int, default=2, help="resize processes of both tools")
    p.add_argument("--threads", type=int, default=32, help="img2dataset --thread_count (use --sweep-threads to pick)")
    p.add_argument("--concurrency", type=int, default=256, help="bin/fetch --concurrency")
    p.add_argument("--per-shard", type=int, default=0, help="img2dataset --number_sample_per_shard (default: items/20, ≥ 50)")
    p.add_argument(
        "--tools",
        default="fetch,img2dataset",
        help="comma list of fetch, img2dataset, img2dataset-skip (skip_reencode), fetch-before (bin/fetch of commit --before), "
        "fetch-ray (bin/fetch --ray --ray-address), fetch-dedup (bin/fetch --dedup exact)",
    )
    p.add_argument("--ray-address", default="auto", help="fetch-ray: the Ray cluster (run the whole benchmark inside unshare -n)")
    p.add_argument("--ray-workers", type=int, default=1, help="fetch-ray: --workers of each unit task (its CPUs)")
    p.add_argument("--unit-size", type=int, default=0, help="bin/fetch --unit-size for every fetch tool (default: its own)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="list every corpus URL this many times (copies differ by a ?copy=N "
        "query, which nginx ignores): more work per run, so start-up weighs as little as in a real job",
    )
    p.add_argument("--before", default="39e4671", help="commit whose bin/fetch the fetch-before tool runs")
    p.add_argument("--sweep-threads", action="store_true", help="one img2dataset run per thread count in --sweep, then stop")
    p.add_argument("--sweep", default="8,16,32,64,128", help="thread counts for --sweep-threads")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run before it is killed")
    p.add_argument("--no-ceiling", action="store_true", help="skip the in-memory ceiling run in each round")
    args = p.parse_args()
    if args.quick:
        args.runs = min(args.runs, 1)

    if not venv_python(I2D_VENV).exists() and "img2dataset" in args.tools:
        sys.exit("img2dataset venv missing: run benchmarks/setup.sh img2dataset")
    corpus = corpus_mod.build(corpus_mod.params_from_args(args))
    items = corpus_mod.load_items(corpus)
    n = len(items) * args.repeat
    args.per_shard = args.per_shard or max(50, n // 20)
    byte_compile(ROOT)
    help_text = fetch_help()
    tools = [t for t in args.tools.split(",") if t]

    with Nginx(corpus / "web") as srv:
        urls = WORK / "url" / "urls.parquet"
        corpus_mod.write_url_list(corpus, srv.base, urls, args.repeat)
        # Warm the page cache (and nginx's open-file cache) so that run 1 is not special.
        for r in items[: min(n, 20000)]:
            f = corpus / "web" / r["file"]
            if f.exists():
                f.read_bytes()

        if args.sweep_threads:
            rows = []
            for t in [int(x) for x in args.sweep.split(",")]:
                args.threads = t
                m, c, _ = run_one("img2dataset", 0, urls, args, help_text, srv)
                rows.append([t, round(c["kept"] / m.wall_s, 1), round(m.cpu_s / n * 1000, 1), c["kept"], load_str(m)])
                print(f"threads {t}: {rows[-1]}", flush=True)
            table = md_table(["thread_count", "kept img/s", "CPU ms/img", "kept", "load 1m"], rows)
            save_result("url-i2d-threads", {"corpus": str(corpus), "items": n, "table": table, "rows": rows})
            print(table)
            return

        runs: dict[str, list[Measurement]] = {t: [] for t in tools}
        outs: dict[str, Path] = {}
        ceilings: list[dict[str, Any]] = []
        for i in range(args.runs):
            order = tools if i % 2 == 0 else list(reversed(tools))
            for tool in order:
                m, counts, out = run_one(tool, i, urls, args, help_text, srv)
                runs[tool].append(m)
                outs[tool] = out
                print(
                    f"run {i} {tool}: {m.wall_s:.1f}s kept {counts['kept']} → {counts['kept'] / m.wall_s:.1f} kept/s, "
                    f"cpu {m.cpu_s:.1f}s (main process {m.extra['cpu_main_s']}s), rss {m.peak_rss_mb:.0f} MB, load {load_str(m)}, other cpu {m.other_cpu_s:.1f}s, "
                    f"nginx cpu {m.extra['nginx_cpu_s']}s",
                    flush=True,
                )
            if not args.no_ceiling:
                c = run_inner(main_python(), corpus, "web", "fast", args.processes)
                ceilings.append(c)
                print(
                    f"run {i} ceiling (in memory, fast path, same Pillow as bin/fetch): {c['kept_per_s']:.1f} kept/s, load {c['load']}",
                    flush=True,
                )
        diff = (
            explain_differences(items, srv.base, outs["fetch"], outs["img2dataset"])
            if {"fetch", "img2dataset"} <= set(outs)
            else {}
        )

    rows = []
    summary: dict[str, Any] = {}
    for tool, ms in runs.items():
        kept = ms[-1].extra["counts"]["kept"]
        rates = [m.extra["counts"]["kept"] / m.wall_s for m in ms]
        s = {
            "kept_per_s": median(rates),
            "urls_per_s": median([n / m.wall_s for m in ms]),
            "cpu_ms_per_url": median([m.cpu_s / n * 1000 for m in ms]),
            "cpu_ms_per_kept": median([m.cpu_s / kept * 1000 for m in ms]),
            "peak_rss_mb": median([m.peak_rss_mb for m in ms]),
            "kept": kept,
            "rejected": ms[-1].extra["counts"]["rejected"],
            "wall_s": [round(m.wall_s, 2) for m in ms],
            "rates": [round(r, 1) for r in rates],
            "load": [load_str(m) for m in ms],
            "other_cpu_s": [round(m.other_cpu_s, 1) for m in ms],
            "cpu_main_s": [m.extra.get("cpu_main_s") for m in ms],
        }
        if tool.startswith("fetch"):  # bin/fetch's own in-run rate (after imports and planning), for reference
            s["in_run_kept_per_s"] = median([m.extra["counts"]["this_run"]["kept_per_s"] for m in ms])
        summary[tool] = s
        rows.append(
            [
                tool,
                round(s["kept_per_s"], 1),
                round(s["urls_per_s"], 1),
                round(s["cpu_ms_per_url"], 1),
                round(s["peak_rss_mb"]),
                kept,
                " ".join(map(str, s["rates"])),
                " ".join(s["load"]),
            ]
        )
    if "fetch" in summary and "fetch-dedup" in summary:  # what --dedup exact costs: input rate and CPU per URL
        summary["dedup_rate_ratio"] = summary["fetch-dedup"]["urls_per_s"] / summary["fetch"]["urls_per_s"]
        summary["dedup_cpu_ratio"] = summary["fetch-dedup"]["cpu_ms_per_url"] / summary["fetch"]["cpu_ms_per_url"]
    if "fetch" in summary and "img2dataset" in summary:
        summary["speedup"] = summary["fetch"]["kept_per_s"] / summary["img2dataset"]["kept_per_s"]
    if ceilings:
        c_rate = median([c["kept_per_s"] for c in ceilings])
        # the ceiling runs over the corpus once (its rate does not depend on the copies)
        summary["ceiling"] = {
            "kept_per_s": c_rate,
            "kept": ceilings[0]["kept"],
            "cpu_ms_per_url": median([c["cpu_s"] / (n / args.repeat) * 1000 for c in ceilings]),
            "rates": [round(c["kept_per_s"], 1) for c in ceilings],
            "load": [c["load"] for c in ceilings],
        }
        rows.append(
            [
                "ceiling (in memory, fast path)",
                round(c_rate, 1),
                "",
                round(summary["ceiling"]["cpu_ms_per_url"], 1),
                "",
                ceilings[0]["kept"],
                " ".join(map(str, summary["ceiling"]["rates"])),
                " ".join(summary["ceiling"]["load"]),
            ]
        )
        if "fetch" in summary:
            summary["fetch_fraction_of_ceiling"] = summary["fetch"]["kept_per_s"] / c_rate
        for t in ("fetch", "fetch-before"):
            if t in summary:  # load-robust view: CPU per URL of the ceiling vs the tool's
                summary[f"{t}_cpu_fraction_of_ceiling"] = summary["ceiling"]["cpu_ms_per_url"] / summary[t]["cpu_ms_per_url"]
    for t in ("fetch", "fetch-before"):
        if t in summary and "img2dataset" in summary:
            summary[f"{t}_cpu_ratio_vs_img2dataset"] = summary["img2dataset"]["cpu_ms_per_url"] / summary[t]["cpu_ms_per_url"]
    table = md_table(
        ["tool", "kept img/s (median)", "URLs/s", "CPU ms / URL", "peak RSS MB", "kept", "kept img/s per run", "load 1m per run"],
        rows,
    )
    cmd = " ".join(sys.argv)
    path = save_result(
        "url",
        {
            "command": cmd,
            "corpus": str(corpus),
            "items": n,
            "args": vars(args),
            "summary": summary,
            "differences": diff,
            "table": table,
            "runs": {t: ms for t, ms in runs.items()},
        },
    )
    print(table)
    if "speedup" in summary:
        print(f"\nfetch / img2dataset = {summary['speedup']:.2f}×")
    if "fetch_fraction_of_ceiling" in summary:
        print(f"fetch / ceiling = {summary['fetch_fraction_of_ceiling']:.1%}")
    print("kept-set differences:", json.dumps(diff))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
