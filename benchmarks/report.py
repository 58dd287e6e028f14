#!/usr/bin/env python3
"""Write the fetch benchmarks' sections of benchmarks/RESULTS.md from the latest results.

    python benchmarks/report.py            # print the sections
    python benchmarks/report.py --write    # replace them in RESULTS.md (other sections untouched)

The sections sit between two HTML comments (fetch-bench:begin / fetch-bench:end); everything
else in RESULTS.md (e.g. the encoder's section) is left as it is. The narrative part (what was
profiled, what each change predicted and gave) comes from benchmarks/PROFILING.md.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "_work" / "results"
DOC = HERE / "RESULTS.md"
BEGIN, END = "<!-- fetch-bench:begin -->", "<!-- fetch-bench:end -->"


def latest(name: str) -> dict | None:
    p = RESULTS / f"{name}-latest.json"
    return json.loads(p.read_text()) if p.exists() else None


def _machine(r: dict) -> str:
    m = r["machine"]
    return f"{m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB, Python {m['python']}, bin/fetch with {m['pillow_main_venv']}"


def _cmd(r: dict) -> str:
    cmd = r["command"]
    cmd = re.sub(r"^\S*python\S*\s+", "", cmd)
    cmd = cmd.replace(str(HERE.parent) + "/", "")
    return f"python {cmd}" if not cmd.startswith("python") else cmd


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def sections() -> str:
    out = []
    url, arch, ceil, micro = latest("url"), latest("archive"), latest("ceiling"), latest("micro")
    near = latest("near-dedup")
    out.append("## Fetch benchmarks: targets\n")
    rows = ["| target | measured | verdict |", "|---|---|---|"]
    if url and "speedup" in url["summary"]:
        s = url["summary"]
        rows.append(
            f"| URL mode ≥ 1.8× img2dataset (aim 2×), kept counts equal | {s['speedup']:.2f}× ({s['fetch']['kept_per_s']:.1f} vs {s['img2dataset']['kept_per_s']:.1f} kept img/s); kept {s['fetch']['kept']} vs {s['img2dataset']['kept']} | {verdict(s['speedup'] >= 1.8)} |"
        )
        if "fetch_fraction_of_ceiling" in s:
            f = s["fetch_fraction_of_ceiling"]
            rows.append(
                f"| URL mode ≥ 85 % of the in-memory ceiling (aim 90 %) | {f:.0%} ({s['fetch']['kept_per_s']:.1f} of {s['ceiling']['kept_per_s']:.1f} kept img/s) | {verdict(f >= 0.85)} |"
            )
        if "fetch-before" in s:
            b = s["fetch-before"]
            rows.append(
                f"| this session's changes (commit {url['args'].get('before')} → now), same run | {b['kept_per_s']:.1f} → {s['fetch']['kept_per_s']:.1f} kept img/s, CPU {b['cpu_ms_per_url']:.1f} → {s['fetch']['cpu_ms_per_url']:.1f} ms/URL, peak RSS {b['peak_rss_mb']:.0f} → {s['fetch']['peak_rss_mb']:.0f} MB | measured |"
            )
        for t in ("fetch", "fetch-before"):
            if f"{t}_cpu_ratio_vs_img2dataset" in s:
                extra = (
                    f", {s[f'{t}_cpu_fraction_of_ceiling']:.0%} of the ceiling's CPU efficiency"
                    if f"{t}_cpu_fraction_of_ceiling" in s
                    else ""
                )
                rows.append(
                    f"| (load-robust view) CPU per URL, {t} vs img2dataset | img2dataset uses {s[f'{t}_cpu_ratio_vs_img2dataset']:.2f}× the CPU of {t}{extra} | info |"
                )
    if url and "dedup_rate_ratio" in url["summary"]:
        s = url["summary"]
        d, f = s["fetch-dedup"], s["fetch"]
        rows.append(
            f"| URL mode with `--dedup exact` within 5 % of without (URLs/s; {d['rejected'].get('duplicate_content', 0)} duplicates dropped) | {d['urls_per_s']:.1f} vs {f['urls_per_s']:.1f} URLs/s ({s['dedup_rate_ratio'] - 1:+.1%}), CPU {d['cpu_ms_per_url']:.1f} vs {f['cpu_ms_per_url']:.1f} ms/URL ({s['dedup_cpu_ratio'] - 1:+.1%}) | {verdict(s['dedup_rate_ratio'] >= 0.95)} |"
        )
    if arch:
        s = arch["summary"]
        for v, name in (("mixed", "LAION-like sizes"), ("sa1b", "SA-1B-like, 1500 px")):
            fetch = s.get(f"{v}/fetch")
            if fetch and f"{v}/fetch_vs_seed-stock" in s:  # the seed scripts' method in their own environment
                sp = s[f"{v}/fetch_vs_seed-stock"]
                rows.append(
                    f"| archive mode ≥ 3× seed-style ({name}) | {sp:.2f}× (bin/fetch {fetch['kept_per_s']:.1f} vs {s[f'{v}/seed-stock']['kept_per_s']:.1f} kept img/s) | {verdict(sp >= 3)} |"
                )
            if fetch and f"{v}/speedup" in s:
                sp = s[f"{v}/speedup"]
                bound = ""
                if f"{v}/ceiling" in s:
                    bound = f"; the in-memory ceiling itself is {s[f'{v}/ceiling']['kept_per_s'] / s[f'{v}/seed']['kept_per_s']:.2f}× it"
                rows.append(
                    f"| (same, the seed-style method given our Pillow-SIMD) ({name}) | {sp:.2f}× ({fetch['kept_per_s']:.1f} vs {s[f'{v}/seed']['kept_per_s']:.1f} kept img/s{bound}) | info |"
                )
                if f"{v}/fetch_cpu_ratio_vs_seed" in s:
                    rows.append(
                        f"| (load-robust view) CPU per image, seed-style (Pillow-SIMD) vs bin/fetch ({name}) | seed-style uses {s[f'{v}/fetch_cpu_ratio_vs_seed']:.2f}× the CPU | info |"
                    )
            if fetch and f"{v}/seed" in s:
                ed, one = fetch["extra_disk_mb"], fetch["largest_archive_mb"]
                rows.append(
                    f"| archive mode: peak extra disk ≤ one archive ({name}) | {ed:.0f} MB (one archive: {one:.0f} MB; seed-style: {s[f'{v}/seed']['extra_disk_mb']:.0f} MB) | {verdict(ed <= one)} |"
                )
            if f"{v}/fetch-before" in s and fetch:
                b = s[f"{v}/fetch-before"]
                rows.append(
                    f"| this session's changes (commit {arch['args'].get('before')} → now, {name}), same run | {b['kept_per_s']:.1f} → {fetch['kept_per_s']:.1f} kept img/s, CPU {b['cpu_ms_per_image']:.1f} → {fetch['cpu_ms_per_image']:.1f} ms/image | measured |"
                )
            if f"{v}/fetch_fraction_of_ceiling" in s:
                f = s[f"{v}/fetch_fraction_of_ceiling"]
                rows.append(
                    f"| archive mode ≥ 85 % of the ceiling ({name}) | {f:.0%} ({fetch['kept_per_s']:.1f} of {s[f'{v}/ceiling']['kept_per_s']:.1f}) | {verdict(f >= 0.85)} |"
                )
    long_ = latest("archive-long")
    if long_:
        rows.extend(_long_rows(arch, long_))
    if ceil:
        by = {(r["source"], r["config"], r["pillow"]): r["kept_per_s"] for r in ceil["summary"]}
        stock = [k for k in by if k[2].startswith("Pillow ")]
        simd = [k for k in by if k[2].startswith("Pillow-SIMD")]
        if stock and simd:
            for src in ("web", "mixed", "sa1b"):
                for cfg in ("plain", "fast"):
                    a = next((by[k] for k in stock if k[0] == src and k[1] == cfg), None)
                    b = next((by[k] for k in simd if k[0] == src and k[1] == cfg), None)
                    if a and b:
                        rows.append(
                            f"| Pillow-SIMD gain, ceiling {src}/{cfg} | {b / a:.2f}× ({a:.1f} → {b:.1f} kept img/s) | measured |"
                        )
    out.append("\n".join(rows) + "\n")

    if url:
        s = url["summary"]
        out.append("## URL mode: bin/fetch vs img2dataset\n")
        out.append(f"Command: `{_cmd(url)}` — {url['date_utc']} — {_machine(url)}.\n")
        out.append(
            f"Corpus: {url['items']} URLs (benchmarks/corpus.py, seed {url['args'].get('seed', 0)}"
            + (
                f"; each of its images listed {url['args']['repeat']}× under distinct URLs"
                if url["args"].get("repeat", 1) > 1
                else ""
            )
            + ") served by nginx on 127.0.0.1. "
            f"Both tools: 2 processes, drop short side < 256, short side > 512 resized to 512, JPEG q95; "
            f"img2dataset {url['args']['threads']} threads, `resize_mode keep_ratio`, `resize_only_if_bigger`, webdataset output, "
            f"shards of {url['args']['per_shard']}; bin/fetch `--concurrency {url['args']['concurrency']}`. "
            f"Wall time is end to end (process start to exit, imports included). Runs alternate; medians of {url['args']['runs']}.\n"
        )
        out.append(url["table"] + "\n")
        if "speedup" in s:
            out.append(
                f"bin/fetch / img2dataset: **{s['speedup']:.2f}×**."
                + (f" bin/fetch / ceiling: **{s['fetch_fraction_of_ceiling']:.0%}**." if "fetch_fraction_of_ceiling" in s else "")
                + "\n"
            )
        d = url.get("differences") or {}
        if d:
            out.append(
                f"Kept sets (last run, by URL): {d['both']} kept by both; only bin/fetch: {d['only_fetch'] or 'none'}; only img2dataset: {d['only_img2dataset'] or 'none'}. "
                f"Rejections — bin/fetch: {s['fetch']['rejected']}; img2dataset: {s['img2dataset']['rejected']}.\n"
            )
        for t in ("fetch", "fetch-before"):
            if t in s and "in_run_kept_per_s" in s[t]:
                out.append(
                    f"{t}: its own in-run rate (stats.json, after start-up) {s[t]['in_run_kept_per_s']:.1f} kept img/s; top-process CPU per run {s[t].get('cpu_main_s')} s.\n"
                )
        out.append(
            "The rejections add up to the same total and differ only in their names: bin/fetch decides the size from the "
            "header before decoding, so a truncated JPEG smaller than 256 px is `too_small` for it and a decoding error for "
            "OpenCV; zero-byte bodies are `not_an_image` for bin/fetch and an `imdecode` assertion for OpenCV. Truncated JPEGs "
            "≥ 256 px are rejected by both (Pillow with LOAD_TRUNCATED_IMAGES off, OpenCV's libjpeg error), so the kept sets "
            "are identical URL for URL.\n"
        )
        out.append(
            f"CPU of the rest of the machine during each run (other processes), seconds: bin/fetch {s.get('fetch', {}).get('other_cpu_s')}, img2dataset {s.get('img2dataset', {}).get('other_cpu_s')}.\n"
        )
        out.append("![URL mode](plots/url.png)\n")
    thr = latest("url-i2d-threads")
    if thr:
        out.append(f"img2dataset thread count (one run each, {thr['date_utc']}, {thr['items']} URLs):\n\n{thr['table']}\n")
    if arch:
        out.append("## Archive mode: bin/fetch --dataset sa1b vs the seed-style pipeline\n")
        out.append(f"Command: `{_cmd(arch)}` — {arch['date_utc']} — {_machine(arch)}.\n")
        out.append(
            "Same SA-1B-style tars (sa_N.jpg + ~100 KB sa_N.json each) and captions tar served by nginx on 127.0.0.1 "
            "(the captions at the Hub path, HF_ENDPOINT pointing at nginx); the same links file. The seed-style pipeline "
            "(benchmarks/seed_baseline.py): download each tar to disk, extract to disk, PIL bicubic resize, save at PIL's "
            "default JPEG quality, read back into MDSWriter; pools of 2 processes. bin/fetch: 2 resize processes, JPEG q95. "
            "Peak disk is sampled every 0.25 s over each pipeline's folder; extra disk = peak − final MDS size. "
            f"Runs alternate; medians of {arch['args']['runs']}.\n"
        )
        out.append(arch["table"] + "\n")
        if arch.get("note"):
            out.append(f"Note: {arch['note']}\n")
        if _seed_stages(arch):
            out.append(f"Seed-style stages, stock Pillow (medians): {_seed_stages(arch)}.\n")
        for k, v in arch["summary"].items():
            if k.endswith(("/fetch", "/fetch-before")) and "in_run_kept_per_s" in v:
                out.append(
                    f"{k}: in-run rate (stats.json) {v['in_run_kept_per_s']:.1f} kept img/s; top-process CPU per run {v.get('cpu_main_s')} s.\n"
                )
        out.append("![Archive mode](plots/archive.png)\n")
    if long_:
        out.append("## Archive mode, longer runs\n")
        out.append(f"Command: `{_cmd(long_)}` — {long_['date_utc']} — {_machine(long_)}.\n")
        out.append(
            "The same benchmark with more copies of the archives per run (the `repeat` argument), the same code. "
            "Together with the table above it separates what each pipeline pays once per run (start-up, the seed "
            "method's imports and pools) from what it pays per image.\n"
        )
        out.append(long_["table"] + "\n")
        if _seed_stages(long_):
            out.append(f"Seed-style stages, stock Pillow (medians): {_seed_stages(long_)}.\n")
    if ceil:
        out.append("## Ceiling: in-memory decode → resize → encode\n")
        out.append(f"Command: `{_cmd(ceil)}` — {ceil['date_utc']} — {_machine(ceil)}.\n")
        out.append(
            "fastfetch.imaging.process over the corpus held in memory, 2 forked processes pulling from a shared counter; "
            "no network, disk or MDS. plain = full decode and always re-encode (what img2dataset and the seed scripts do); "
            "fast = bin/fetch's defaults (reduced-scale JPEG decode, untouched JPEGs kept). Medians of alternating runs.\n"
        )
        out.append(ceil["table"] + "\n")
        out.append("![Ceiling](plots/ceiling.png)\n")
    if near:
        out.append("## Near-duplicate dedup (`--dedup near`)\n")
        out.append(f"Command: `{_cmd(near)}` — {near['date_utc']} — {_machine(near)}.\n")
        out.append(
            "Planted set (benchmarks/near_dedup.py): three distinct framings of each of scikit-image's photographs (60 % "
            "crops; the stereo pair is one scene), each with copies re-encoded, resized and cropped; every image through "
            "`process_and_hash` as a resize worker runs it, then the set, shuffled, through `DedupIndex.judge` in units of "
            "50 as a run commits them. Precision: of the images dropped, those whose group had an image kept before; "
            "recall: of the images that should go, those dropped. Costs: CPU per corpus image in the worker (median of 5 "
            "alternating rounds), `judge` per image, and the near search per query (`nearsearch.HammingIndex`) against "
            "comparing every kept code.\n"
        )
        out.append(near["text"] + "\n")
    if micro:
        out.append("## Resize microbenchmark\n")
        out.append(f"Command: `{_cmd(micro)}` — {micro['date_utc']} — load after {micro.get('load_after')}.\n")
        out.append(
            "One process, one thread; median per image of the best of the repeats. `auto` is the reduced-scale decode "
            "fastfetch.imaging uses (largest DCT scale keeping the short side ≥ 512). OpenCV `area` is img2dataset's default downscale.\n"
        )
        out.append(micro["table"] + "\n")
        out.append("![Resize microbenchmark](plots/micro.png)\n")
    prof = HERE / "PROFILING.md"
    if prof.exists():
        out.append(prof.read_text().strip() + "\n")
    return "\n".join(out)


def _long_rows(short: dict | None, long_: dict) -> list[str]:
    """The longer run's ratios: the same targets when each run has more images per fixed cost."""
    rows = []
    for v, name in (("mixed", "LAION-like sizes"), ("sa1b", "SA-1B-like, 1500 px")):
        b = long_["summary"]
        shorter = (
            short is None
            or f"{v}/fetch" not in short["summary"]
            or short["summary"][f"{v}/fetch"]["images"] < b.get(f"{v}/fetch", {}).get("images", 0)
        )
        if shorter and f"{v}/fetch_vs_seed-stock" in b and f"{v}/fetch_fraction_of_ceiling" in b:
            n = b[f"{v}/fetch"]["images"]
            rows.append(
                f"| (longer runs, {n} images, {name}) vs seed-style with stock Pillow; vs the ceiling | "
                f"{b[f'{v}/fetch_vs_seed-stock']:.2f}× ({b[f'{v}/fetch']['kept_per_s']:.1f} vs {b[f'{v}/seed-stock']['kept_per_s']:.1f}); "
                f"{b[f'{v}/fetch_fraction_of_ceiling']:.0%} | info |"
            )
    return rows


def _seed_stages(result: dict) -> str:
    """Median seconds of the seed-style pipeline's stages, per variant (stock Pillow)."""
    parts = []
    for key, runs in result.get("runs", {}).items():
        if not key.endswith("/seed-stock"):
            continue
        stages = [r["extra"].get("stages", {}) for r in runs if r["extra"].get("stages")]
        if not stages:
            continue
        med = {
            k: sorted(st[k] for st in stages)[len(stages) // 2] for k in ("captions_s", "download_extract_resize_s", "convert_s")
        }
        parts.append(
            f"{key.split('/')[0]} ({stages[0]['written']} images): captions {med['captions_s']:.1f} s, download + extract + "
            f"resize {med['download_extract_resize_s']:.1f} s, read back into MDS {med['convert_s']:.1f} s"
        )
    return "; ".join(parts)


def write(text: str) -> None:
    block = f"{BEGIN}\n{text.rstrip()}\n{END}\n"
    doc = DOC.read_text() if DOC.exists() else "# Benchmark results\n\n"
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END) + 1 :]
    else:
        doc = doc.rstrip() + "\n\n" + block
    DOC.write_text(doc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    text = sections()
    if args.write:
        write(text)
        print(f"wrote {DOC}")
    else:
        print(text)


if __name__ == "__main__":
    main()
