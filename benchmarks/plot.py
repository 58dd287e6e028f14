#!/usr/bin/env python3
"""PNG plots of the latest benchmark results (benchmarks/_work/results/*-latest.json).

    python benchmarks/plot.py            # → benchmarks/plots/{url,archive,ceiling,micro}.png

Each plot is drawn only when its results exist; RESULTS.md links the PNGs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "_work" / "results"
PLOTS = HERE / "plots"


def latest(name: str) -> dict | None:
    p = RESULTS / f"{name}-latest.json"
    return json.loads(p.read_text()) if p.exists() else None


def _bars(ax, labels, values, colors=None, fmt="{:.0f}"):
    bars = ax.bar(labels, values, color=colors)
    for b, v in zip(bars, values):
        ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    return bars


def plot_url(res: dict, ceiling: dict | None) -> Path:
    s = res["summary"]
    tools = [t for t in ("img2dataset", "img2dataset-skip", "fetch-before", "fetch") if t in s]
    labels = {
        "img2dataset": "img2dataset",
        "img2dataset-skip": "img2dataset\n(skip_reencode)",
        "fetch": "bin/fetch",
        "fetch-before": "bin/fetch before\nthe last changes",
    }
    colors = {"img2dataset": "#999", "img2dataset-skip": "#bbb", "fetch": "#2a7", "fetch-before": "#9db"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    _bars(ax, [labels[t] for t in tools], [s[t]["kept_per_s"] for t in tools], [colors[t] for t in tools])
    if "ceiling" in s:
        c = s["ceiling"]["kept_per_s"]
        ax.axhline(c, ls="--", color="#c33", lw=1)
        ax.annotate(
            f"in-memory ceiling, same run (fast path) {c:.0f}",
            (0, c),
            xytext=(0, 3),
            textcoords="offset points",
            color="#c33",
            fontsize=8,
        )
    elif ceiling:
        for c in ceiling["summary"]:
            if c["source"] == "web" and c["config"] == "fast" and c["pillow"] == res["machine"]["pillow_main_venv"]:
                ax.axhline(c["kept_per_s"], ls="--", color="#c33", lw=1)
                ax.annotate(
                    f"ceiling (in-memory, fast path) {c['kept_per_s']:.0f}",
                    (0, c["kept_per_s"]),
                    xytext=(0, 3),
                    textcoords="offset points",
                    color="#c33",
                    fontsize=8,
                )
    ax.set_ylabel("kept images / s (median)")
    ax.set_title(
        f"URL mode, {res['items']} URLs over nginx on 127.0.0.1, 2 processes\n{res['machine']['pillow_main_venv']} in bin/fetch; {res['date_utc']}",
        fontsize=9,
    )
    return _save(fig, "url")


def plot_archive(res: dict) -> Path:
    s = res["summary"]
    variants = [v for v in ("mixed", "sa1b") if any(k.startswith(v + "/") for k in s)]
    tools = [t for t in ("seed-stock", "seed", "fetch-before", "fetch") if any(f"{v}/{t}" in s for v in variants)]
    names = {
        "seed-stock": "seed-style, stock Pillow",
        "seed": "seed-style, same venv as bin/fetch",
        "fetch": "bin/fetch",
        "fetch-before": "bin/fetch before the last changes",
    }
    colors = {"seed-stock": "#777", "seed": "#aaa", "fetch": "#2a7", "fetch-before": "#9db"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    w = 0.8 / max(1, len(tools))
    for k, tool in enumerate(tools):
        xs = [i + (k - (len(tools) - 1) / 2) * w for i in range(len(variants))]
        vals = [s.get(f"{v}/{tool}", {}).get("kept_per_s", 0) for v in variants]
        disk = [s.get(f"{v}/{tool}", {}).get("extra_disk_mb", 0) for v in variants]
        b1 = ax1.bar(xs, vals, w, color=colors[tool], label=names[tool])
        b2 = ax2.bar(xs, disk, w, color=colors[tool], label=names[tool])
        for b, v in zip(b1, vals):
            ax1.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
        for b, v in zip(b2, disk):
            ax2.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    for i, v in enumerate(variants):
        c = s.get(f"{v}/ceiling")
        if c:
            ax1.plot([i - 0.45, i + 0.45], [c["kept_per_s"]] * 2, "r--", lw=1)
        one = next((s[f"{v}/{t}"]["largest_archive_mb"] for t in tools if f"{v}/{t}" in s), None)
        if one:
            ax2.plot([i - 0.45, i + 0.45], [one] * 2, "r--", lw=1)
    labels = {"mixed": "LAION-like sizes", "sa1b": "SA-1B-like (1500 px)"}
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(variants)), [labels[v] for v in variants])
    ax1.legend(fontsize=7)
    ax1.set_ylabel("kept images / s (median)")
    ax1.set_title("throughput; red dashes: in-memory ceiling", fontsize=8)
    ax2.set_ylabel("extra disk at peak, MB")
    ax2.set_title("peak − output size; red dashes: one archive", fontsize=8)
    fig.suptitle(f"Archive mode (SA-1B-style tars over nginx, 2 processes); {res['date_utc']}", fontsize=9)
    return _save(fig, "archive")


def plot_ceiling(res: dict) -> Path:
    rows = res["summary"]
    sources = list(dict.fromkeys(r["source"] for r in rows))
    combos = list(dict.fromkeys((r["config"], r["pillow"]) for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / max(1, len(combos))
    for k, (config, pil) in enumerate(combos):
        vals = [
            next((r["kept_per_s"] for r in rows if r["source"] == s and r["config"] == config and r["pillow"] == pil), 0)
            for s in sources
        ]
        xs = [i + (k - (len(combos) - 1) / 2) * w for i in range(len(sources))]
        bars = ax.bar(xs, vals, w, label=f"{config}, {pil}")
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    names = {"web": "web mix (URL corpus)", "mixed": "JPEG archives, web sizes", "sa1b": "SA-1B-like 1500 px"}
    ax.set_xticks(range(len(sources)), [names.get(s, s) for s in sources])
    ax.set_ylabel("kept images / s, 2 processes, in memory")
    ax.legend(fontsize=7)
    ax.set_title(
        f"Ceiling: fastfetch.imaging.process in memory; plain = full decode + re-encode, fast = draft + keep JPEGs\n{res['date_utc']}",
        fontsize=9,
    )
    return _save(fig, "ceiling")


def plot_micro(res: dict) -> Path:
    results = res["results"]
    buckets = list(results[0]["buckets"]) if results else []
    series = []
    for r in results:
        for name in ("full", "auto", "area full", "area reduced 1/2", "cubic full"):
            if any(name in r["buckets"][b] for b in buckets):
                series.append((r["lib"], name))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    w = 0.8 / max(1, len(series))
    for k, (lib, name) in enumerate(series):
        lib_res = next(r for r in results if r["lib"] == lib)
        vals = [sum(lib_res["buckets"][b][name][:3]) if name in lib_res["buckets"][b] else 0 for b in buckets]
        xs = [i + (k - (len(series) - 1) / 2) * w for i in range(len(buckets))]
        ax.bar(xs, vals, w, label=f"{lib.split(' ')[0]} {name}")
    ax.set_xticks(range(len(buckets)), [f"short side {b}" for b in buckets])
    ax.set_ylabel("ms per image (decode + resize to 512 + JPEG q95), 1 core")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(
        f"Resize microbenchmark (median per image; auto = reduced-scale decode as fastfetch does it)\n{res['date_utc']}",
        fontsize=9,
    )
    return _save(fig, "micro")


def _save(fig, name: str) -> Path:
    PLOTS.mkdir(parents=True, exist_ok=True)
    path = PLOTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    made = []
    ceiling = latest("ceiling")
    if (r := latest("url")) is not None:
        made.append(plot_url(r, ceiling))
    if (r := latest("archive")) is not None:
        made.append(plot_archive(r))
    if ceiling is not None:
        made.append(plot_ceiling(ceiling))
    if (r := latest("micro")) is not None:
        made.append(plot_micro(r))
    for p in made:
        print(p)
    if not made:
        print("no results yet: run the benchmarks first", file=sys.stderr)


if __name__ == "__main__":
    main()
