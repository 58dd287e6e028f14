#!/usr/bin/env python3
"""Archive mode: ``bin/fetch --dataset sa1b`` against the seed scripts' method on the same tars.

    python benchmarks/run_archive_bench.py --runs 3      # both archive variants (~6 min)
    python benchmarks/run_archive_bench.py --quick       # smoke test

nginx on 127.0.0.1 serves the corpus's SA-1B-style tars (``sa_N.jpg`` + ``sa_N.json``) and
the captions tar at the Hub path the sa1b recipe asks for (``HF_ENDPOINT`` points at nginx);
both pipelines get the same links file (``file_name<TAB>cdn_link``, header line). Variants:
``mixed`` (the web corpus's JPEGs: LAION-like sizes) and ``sa1b`` (all ~1500 px short side,
like the real SA-1B). Runs alternate seed / fetch. Reported: kept images/s (median), CPU
seconds per image, peak RSS, and peak disk used under each pipeline's folders (the seed
method keeps the tar, the extracted and the resized files on disk; the fetcher only its MDS).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus as corpus_mod  # noqa: E402
from common import (  # noqa: E402
    HERE,
    ROOT,
    WORK,
    Measurement,
    byte_compile,
    dir_size,
    fetch_env,
    fetch_help,
    fresh_dir,
    load_str,
    main_python,
    md_table,
    measure,
    median,
    pillow_flavour,
    run_dir,
    save_result,
    venv_python,
)
from run_ceiling import run_inner  # noqa: E402
from server import Nginx  # noqa: E402

CAPTION_REPO = "PixArt-alpha/SAM-LLaVA-Captions10M"


def serve_tree(corpus: Path, variant: str, repeat: int = 1) -> Path:
    """A folder nginx serves: /tars/sa_N.tar and the Hub path of SA1B_caption.tar.gz.

    ``repeat`` > 1 serves more tars than the corpus has: copies of its tars whose members are
    renamed (sa_N → sa_{N + r·10⁶}, as real SA-1B names are unique) with their captions added
    to the captions tar. More work per run without generating more images."""
    root = fresh_dir(WORK / "archive" / f"www-{variant}")
    src = corpus / "archives" / variant
    (root / "tars").mkdir()
    tars = sorted(src.glob("sa_*.tar"))
    captions = src / "SA1B_caption.tar.gz"
    if repeat > 1:
        tars, captions = _repeated(corpus, variant, repeat)
    for tar in tars:
        (root / "tars" / tar.name).symlink_to(tar)
    hub = root / "datasets" / CAPTION_REPO / "resolve" / "main"
    hub.mkdir(parents=True)
    (hub / "SA1B_caption.tar.gz").symlink_to(captions)
    return root


def _repeated(corpus: Path, variant: str, repeat: int) -> tuple[list[Path], Path]:
    import io
    import re
    import tarfile

    src = corpus / "archives" / variant
    out = WORK / "archive" / f"repeat-{corpus.name}-{variant}-x{repeat}"
    base = sorted(src.glob("sa_*.tar"))
    done = out / "done"
    if not done.exists():
        fresh_dir(out)
        with tarfile.open(src / "SA1B_caption.tar.gz") as t:
            caps = {m.name: t.extractfile(m).read() for m in t if m.isfile()}
        all_caps: dict[str, bytes] = {}
        for r in range(repeat):
            for i, tar_path in enumerate(base):
                name = f"sa_{r * len(base) + i:06d}.tar"
                with tarfile.open(tar_path) as tin, tarfile.open(out / name, "w", format=tarfile.GNU_FORMAT) as tout:
                    for m in tin:
                        data = tin.extractfile(m).read()
                        new = re.sub(r"sa_(\d+)", lambda g: f"sa_{int(g.group(1)) + r * 1_000_000}", m.name)
                        info = tarfile.TarInfo(new)
                        info.size, info.mtime, info.mode = len(data), m.mtime, m.mode
                        tout.addfile(info, io.BytesIO(data))
                for cname, text in caps.items():
                    all_caps[re.sub(r"sa_(\d+)", lambda g: f"sa_{int(g.group(1)) + r * 1_000_000}", cname)] = text
        with tarfile.open(out / "SA1B_caption.tar.gz", "w:gz") as t:
            for cname, text in sorted(all_caps.items()):
                info = tarfile.TarInfo(cname)
                info.size, info.mtime = len(text), 1_700_000_000
                t.addfile(info, io.BytesIO(text))
        done.touch()
    return sorted(out.glob("sa_*.tar")), out / "SA1B_caption.tar.gz"


def stock_python_with_main_packages() -> str:
    """venv-stock's Python (stock Pillow) seeing the project venv's packages after its own, so
    that the seed-style pipeline can run with stock Pillow while bin/fetch has Pillow-SIMD."""
    py = venv_python("venv-stock")
    if not py.exists():
        sys.exit("venv-stock missing: run benchmarks/setup.sh stock")
    main_site = subprocess.run(
        [main_python(), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    own_site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True
    ).stdout.strip()
    pth = Path(own_site) / "zz-fastfetch-main-venv.pth"
    if not pth.exists() or pth.read_text().strip() != main_site:
        pth.write_text(main_site + "\n")
    return str(py)


def mds_samples(mds: Path) -> int:
    index = mds / "index.json"
    if not index.exists():
        return 0
    return sum(s.get("samples", 0) for s in json.loads(index.read_text())["shards"])


def run_one(tool: str, i: int, variant: str, links: Path, srv: Nginx, args: argparse.Namespace, help_text: str) -> Measurement:
    out = fresh_dir(WORK / "archive" / f"{tool}-{variant}-{i}")
    env = fetch_env()
    if tool.startswith("seed"):
        python = main_python() if tool == "seed" else stock_python_with_main_packages()
        cmd = [
            python,
            str(HERE / "seed_baseline.py"),
            "--links",
            str(links),
            "--datadir",
            str(out),
            "--captions-url",
            srv.url(f"datasets/{CAPTION_REPO}/resolve/main/SA1B_caption.tar.gz"),
            "--num-proc",
            str(args.processes),
        ]
    else:
        env["HF_ENDPOINT"] = srv.base
        env["HF_HUB_OFFLINE"] = "0"
        cmd = [
            main_python(),
            str(ROOT / "bin" / "fetch"),
            "--dataset",
            "sa1b",
            "--links",
            str(links),
            "--out",
            str(out),
            "--no-progress",
            "--workers",
            str(args.processes),
            "--min-size",
            "256",
            "--max-size",
            "512",
            "--quality",
            "95",
        ]
        if "--allow-private-networks" in help_text:
            cmd.append("--allow-private-networks")
        if tool == "fetch-before":  # bin/fetch of an older commit (--before REV)
            from run_url_bench import snapshot

            cmd[1] = str(snapshot(args.before) / "bin" / "fetch")
    nginx0 = srv.cpu_seconds()
    m = measure(f"{tool}-{variant}", cmd, env=env, cwd=run_dir(cmd), disk_paths=[out], timeout=args.timeout)
    m.extra["nginx_cpu_s"] = round(srv.cpu_seconds() - nginx0, 2)
    if m.returncode != 0:
        print(f"{tool} failed ({m.returncode}):\n{m.stderr_tail}\n{m.stdout_tail}", file=sys.stderr)
        raise SystemExit(1)
    m.extra["kept"] = mds_samples(out / "mds")
    m.extra["final_disk_mb"] = dir_size(out) / 2**20
    m.extra["output_mb"] = dir_size(out / "mds") / 2**20
    if tool.startswith("fetch"):
        stats = json.loads((out / "stats.json").read_text())
        m.extra["rejected"] = stats["rejected"]
        m.extra["in_run_kept_per_s"] = stats["this_run"]["kept_per_s"]
    else:
        m.extra["pillow"] = pillow_flavour(cmd[0])
        lines = [line for line in m.stdout_tail.splitlines() if line.startswith("{")]
        m.extra["stages"] = json.loads(lines[-1]) if lines else {}
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    corpus_mod.add_corpus_arguments(p)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--processes", type=int, default=2, help="pool size of both pipelines")
    p.add_argument("--variants", default="mixed,sa1b")
    p.add_argument(
        "--tools",
        default="seed,fetch",
        help="comma list of seed, seed-stock (the seed method with stock Pillow: "
        "benchmarks/_work/venv-stock), fetch, fetch-before (bin/fetch of --before)",
    )
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--before", default="39e4671", help="commit whose bin/fetch the fetch-before tool runs")
    p.add_argument(
        "--repeat",
        default="mixed=1,sa1b=2",
        help="serve each variant's tars this many times (more work per run): N, or variant=N,…",
    )
    p.add_argument("--no-ceiling", action="store_true", help="skip the in-memory ceiling run in each round")
    p.add_argument(
        "--save-as",
        default="archive",
        help="result name: archive (the reference runs) or archive-long "
        "(the same with more images per run; report.py shows both)",
    )
    args = p.parse_args()
    if args.quick:
        args.runs, args.repeat = 1, "1"
    repeats = (
        {v: int(args.repeat) for v in ("mixed", "sa1b")}
        if args.repeat.isdigit()
        else {k: int(n) for k, n in (part.split("=") for part in args.repeat.split(","))}
    )
    byte_compile(ROOT)
    help_text = fetch_help()
    tools = args.tools.split(",")
    if "fetch" in tools and "--links" not in help_text:
        sys.exit("bin/fetch has no sa1b source yet (no --links in bin/fetch --help)")
    corpus = corpus_mod.build(corpus_mod.params_from_args(args))
    meta = json.loads((corpus / "corpus.json").read_text())
    summary: dict[str, Any] = {}
    all_runs: dict[str, list[Measurement]] = {}
    rows = []
    for variant in args.variants.split(","):
        repeat = repeats.get(variant, 1)
        n_images = meta["archives"][variant]["images"] * repeat
        tar_mb = max(t["bytes"] for t in meta["archives"][variant]["tars"]) / 2**20
        total_mb = sum(t["bytes"] for t in meta["archives"][variant]["tars"]) / 2**20 * repeat
        root = serve_tree(corpus, variant, repeat)
        with Nginx(root) as srv:
            links = WORK / "archive" / f"links-{variant}.txt"
            lines = ["file_name\tcdn_link"] + [
                f"{t.name}\t{srv.url('tars/' + t.name)}" for t in sorted((root / "tars").iterdir())
            ]
            links.write_text("\n".join(lines) + "\n")
            for f in (root / "tars").iterdir():
                f.read_bytes()  # page cache
            runs: dict[str, list[Measurement]] = {t: [] for t in tools}
            ceilings: list[dict[str, Any]] = []
            for i in range(args.runs):
                if not args.no_ceiling:
                    c = run_inner(main_python(), corpus, variant, "fast", args.processes)
                    ceilings.append(c)
                    print(
                        f"run {i} {variant} ceiling (in memory, fast path): {c['kept_per_s']:.1f} kept/s, load {c['load']}",
                        flush=True,
                    )
                for tool in tools if i % 2 == 0 else list(reversed(tools)):
                    m = run_one(tool, i, variant, links, srv, args, help_text)
                    runs[tool].append(m)
                    print(
                        f"run {i} {variant} {tool}: {m.wall_s:.1f}s kept {m.extra['kept']}/{n_images} → "
                        f"{m.extra['kept'] / m.wall_s:.1f} kept/s, cpu {m.cpu_s:.1f}s (main process {m.extra['cpu_main_s']}s), rss {m.peak_rss_mb:.0f} MB, "
                        f"peak disk {m.peak_disk_mb:.0f} MB (archive {tar_mb:.0f} MB), load {load_str(m)}, other cpu {m.other_cpu_s:.1f}s",
                        flush=True,
                    )
        for tool, ms in runs.items():
            kept = ms[-1].extra["kept"]
            s = {
                "kept_per_s": median([m.extra["kept"] / m.wall_s for m in ms]),
                "kept": kept,
                "images": n_images,
                "cpu_ms_per_image": median([m.cpu_s / n_images * 1000 for m in ms]),
                "peak_rss_mb": median([m.peak_rss_mb for m in ms]),
                "peak_disk_mb": median([m.peak_disk_mb for m in ms]),
                "output_mb": ms[-1].extra["output_mb"],
                "extra_disk_mb": max(0.0, median([m.peak_disk_mb - m.extra["output_mb"] for m in ms])),
                "largest_archive_mb": tar_mb,
                "archives_mb": total_mb,
                "rates": [round(m.extra["kept"] / m.wall_s, 1) for m in ms],
                "load": [load_str(m) for m in ms],
                "cpu_main_s": [m.extra.get("cpu_main_s") for m in ms],
            }
            if tool.startswith("fetch"):
                s["in_run_kept_per_s"] = median([m.extra["in_run_kept_per_s"] for m in ms])
            summary[f"{variant}/{tool}"] = s
            all_runs[f"{variant}/{tool}"] = ms
            rows.append(
                [
                    variant,
                    tool,
                    round(s["kept_per_s"], 1),
                    round(s["cpu_ms_per_image"], 1),
                    round(s["peak_rss_mb"]),
                    round(s["peak_disk_mb"]),
                    round(s["extra_disk_mb"]),
                    round(tar_mb),
                    kept,
                    n_images,
                    " ".join(map(str, s["rates"])),
                    " ".join(s["load"]),
                ]
            )
        if ceilings:
            c_rate = median([c["kept_per_s"] for c in ceilings])
            summary[f"{variant}/ceiling"] = {
                "kept_per_s": c_rate,
                "cpu_ms_per_image": median([c["cpu_s"] / c["items"] * 1000 for c in ceilings]),
                "rates": [round(c["kept_per_s"], 1) for c in ceilings],
                "load": [c["load"] for c in ceilings],
            }
            rows.append(
                [
                    variant,
                    "ceiling (in memory, fast path)",
                    round(c_rate, 1),
                    round(summary[f"{variant}/ceiling"]["cpu_ms_per_image"], 1),
                    "",
                    "",
                    "",
                    "",
                    ceilings[0]["kept"],
                    ceilings[0]["items"],
                    " ".join(map(str, summary[f"{variant}/ceiling"]["rates"])),
                    " ".join(c["load"] for c in ceilings),
                ]
            )
            if "fetch" in runs:
                summary[f"{variant}/fetch_fraction_of_ceiling"] = summary[f"{variant}/fetch"]["kept_per_s"] / c_rate
        for base in ("seed", "seed-stock"):
            for t in ("fetch", "fetch-before"):
                if {base, t} <= set(runs):
                    summary[f"{variant}/{t}_vs_{base}"] = (
                        summary[f"{variant}/{t}"]["kept_per_s"] / summary[f"{variant}/{base}"]["kept_per_s"]
                    )
                    summary[f"{variant}/{t}_cpu_ratio_vs_{base}"] = (
                        summary[f"{variant}/{base}"]["cpu_ms_per_image"] / summary[f"{variant}/{t}"]["cpu_ms_per_image"]
                    )
        if {"seed", "fetch"} <= set(runs):
            summary[f"{variant}/speedup"] = summary[f"{variant}/fetch"]["kept_per_s"] / summary[f"{variant}/seed"]["kept_per_s"]
    table = md_table(
        [
            "archives",
            "pipeline",
            "kept img/s (median)",
            "CPU ms / image",
            "peak RSS MB",
            "peak disk MB",
            "extra disk MB (peak − output)",
            "largest archive MB",
            "kept",
            "images",
            "kept img/s per run",
            "load 1m per run",
        ],
        rows,
    )
    path = save_result(
        args.save_as,
        {
            "command": " ".join(sys.argv),
            "corpus": str(corpus),
            "args": vars(args),
            "summary": summary,
            "table": table,
            "runs": all_runs,
        },
    )
    print(table)
    for k, v in summary.items():
        if k.endswith("speedup") or "_vs_" in k:
            print(f"{k}: {v:.2f}×")
        if k.endswith("fraction_of_ceiling"):
            print(f"{k}: {v:.1%}")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
