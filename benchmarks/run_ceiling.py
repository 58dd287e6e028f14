#!/usr/bin/env python3
"""Ceiling: the pure in-memory decode → filter → resize → encode loop (fastfetch.imaging.process).

    python benchmarks/run_ceiling.py --runs 3             # web corpus + archive JPEGs, every Pillow
    python benchmarks/run_ceiling.py --quick

No network, no disk, no MDS: every input is read into memory first, then N processes (forked,
sharing the bytes copy-on-write, pulling the next index from a shared counter) run
``process(data, cfg)`` over all of it. This is the fastest this machine can turn the corpus into
stored images, so the fetcher's kept images/s are reported as a fraction of it.

Configurations:
  plain  full decode, always re-encode (``reduced_decode=False, keep_original_jpeg=False``):
         what img2dataset and the seed scripts do, in Pillow;
  fast   the fetcher's defaults: reduced-scale JPEG decode (draft) and JPEGs that need no
         change kept byte for byte.
Each runs under every available Python: the project's .venv (whatever Pillow it has) and the
benchmark venvs with stock Pillow and Pillow-SIMD (benchmarks/setup.sh).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

CONFIGS = {
    "plain": {"reduced_decode": False, "keep_original_jpeg": False},
    "fast": {},
}


# -- inner: runs under the Python being measured -----------------------------------------------
def load_inputs(corpus: Path, source: str) -> list[bytes]:
    """The corpus bytes: ``web`` (every served file) or ``mixed`` / ``sa1b`` (the tars' JPEGs)."""
    if source == "web":
        items = json.loads((corpus / "web" / "items.json").read_text())
        return [(corpus / "web" / r["file"]).read_bytes() for r in items if r["kind"] != "missing"]
    out = []
    for tar_path in sorted((corpus / "archives" / source).glob("sa_*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    out.append(tar.extractfile(m).read())
    return out


_DATA: list[bytes] = []


def _worker(cfg_kwargs: dict, counter: Any, kept: Any, barrier: Any) -> None:
    from fastfetch.imaging import ResizeConfig, process

    cfg = ResizeConfig(**cfg_kwargs)
    process(_DATA[0], cfg)  # warm-up: codecs loaded, caches touched
    barrier.wait()
    n = len(_DATA)
    mine = 0
    while True:
        with counter.get_lock():
            i = counter.value
            counter.value += 1
        if i >= n:
            break
        if process(_DATA[i], cfg).reason is None:
            mine += 1
    with kept.get_lock():
        kept.value += mine


def inner(corpus: Path, source: str, config: str, processes: int, limit: int = 0) -> dict[str, Any]:
    global _DATA
    _DATA = load_inputs(corpus, source)
    if limit:
        _DATA = _DATA[:limit]
    ctx = mp.get_context("fork")
    counter, kept = ctx.Value("q", 0), ctx.Value("q", 0)
    barrier = ctx.Barrier(processes + 1)
    procs = [ctx.Process(target=_worker, args=(CONFIGS[config], counter, kept, barrier)) for _ in range(processes)]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    cpu = _children_cpu_final()
    import PIL

    return {
        "source": source,
        "config": config,
        "processes": processes,
        "items": len(_DATA),
        "kept": kept.value,
        "seconds": wall,
        "kept_per_s": kept.value / wall,
        "items_per_s": len(_DATA) / wall,
        "cpu_s": cpu,
        "pillow": PIL.__version__,
    }


def _children_cpu_final() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# -- outer: orchestrates runs under several Pythons --------------------------------------------
def pythons() -> dict[str, str]:
    from common import main_python, pillow_flavour, venv_python

    out = {}
    for name in ("venv-stock", "venv-simd"):
        py = venv_python(name)
        if py.exists():
            out[pillow_flavour(py)] = str(py)
    main = main_python()
    flavour = pillow_flavour(main)
    out.setdefault(flavour, main)
    return out


def run_inner(
    python: str, corpus: Path, source: str, config: str, processes: int, limit: int = 0, timeout: float = 600
) -> dict[str, Any]:
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--inner",
        "--corpus",
        str(corpus),
        "--source",
        source,
        "--config",
        config,
        "--processes",
        str(processes),
        "--limit",
        str(limit),
    ]
    from common import loadavg

    before = loadavg()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(HERE.parent))
    if r.returncode != 0:
        raise RuntimeError(f"ceiling run failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["load"] = f"{before[0]:.2f}→{loadavg()[0]:.2f}"
    return res


def main() -> None:
    import corpus as corpus_mod
    from common import md_table, median, save_result

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    corpus_mod.add_corpus_arguments(p)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--sources", default="web,mixed,sa1b", help="comma list of web, mixed, sa1b")
    p.add_argument("--configs", default="plain,fast")
    p.add_argument("--pythons", default="", help="comma list of python executables (default: .venv + benchmark venvs)")
    p.add_argument("--limit", type=int, default=1500, help="at most this many inputs per corpus (0: all)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        print(json.dumps(inner(args.corpus, args.source, args.config, args.processes, args.limit)))
        return
    if args.quick:
        args.runs = 1
    corpus = corpus_mod.build(corpus_mod.params_from_args(args))
    pys = {f"{Path(x).parent.parent.name}": x for x in args.pythons.split(",") if x} if args.pythons else pythons()
    results: dict[tuple[str, str, str], list[dict]] = {}
    for i in range(args.runs):
        combos = [(s, c, name) for s in args.sources.split(",") for c in args.configs.split(",") for name in pys]
        if i % 2:
            combos.reverse()
        for source, config, name in combos:
            r = run_inner(pys[name], corpus, source, config, args.processes, args.limit)
            results.setdefault((source, config, name), []).append(r)
            print(
                f"run {i} {source:5s} {config:5s} {name:28s} kept {r['kept']}/{r['items']} {r['kept_per_s']:.1f} kept/s "
                f"({r['items_per_s']:.1f} items/s, cpu {r['cpu_s']:.1f}s) load {r['load']}",
                flush=True,
            )
    rows = []
    summary = []
    for (source, config, name), rs in results.items():
        s = {
            "source": source,
            "config": config,
            "pillow": name,
            "kept": rs[0]["kept"],
            "items": rs[0]["items"],
            "kept_per_s": median([r["kept_per_s"] for r in rs]),
            "items_per_s": median([r["items_per_s"] for r in rs]),
            "cpu_ms_per_item": median([r["cpu_s"] / r["items"] * 1000 for r in rs]),
            "runs": [round(r["kept_per_s"], 1) for r in rs],
            "load": [r["load"] for r in rs],
        }
        summary.append(s)
        rows.append(
            [
                source,
                config,
                name,
                s["kept"],
                s["items"],
                round(s["kept_per_s"], 1),
                round(s["items_per_s"], 1),
                round(s["cpu_ms_per_item"], 1),
                " ".join(map(str, s["runs"])),
                " ".join(s["load"]),
            ]
        )
    table = md_table(
        [
            "corpus",
            "config",
            "Pillow",
            "kept",
            "items",
            "kept img/s (median)",
            "items/s",
            "CPU ms / item",
            "kept img/s per run",
            "load 1m per run",
        ],
        rows,
    )
    path = save_result(
        "ceiling",
        {
            "command": " ".join(sys.argv),
            "corpus": str(corpus),
            "args": {k: str(v) for k, v in vars(args).items()},
            "summary": summary,
            "table": table,
        },
    )
    print(table)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
