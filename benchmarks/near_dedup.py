#!/usr/bin/env python3
"""``--dedup near``: precision and recall on a planted set, and what it costs per image.

    python benchmarks/near_dedup.py            # ~2 min on 2 cores; a section for RESULTS.md
    python benchmarks/near_dedup.py --quick

The planted set is made from the photographs that ship inside scikit-image (nothing is
downloaded): each photo gives three distinct framings of one scene (60 % crops at different
places; the stereo pair motorcycle_left/right are two photos of one scene too), each upscaled to
a 600 px short side (so that it is resized to 512 and hashed from the resized pixels, while its
copies of 480 px or less are kept as they are and hashed from a 1/8 decode). Each framing gets copies: re-encoded at JPEG quality 50, 70 and 85,
resized to 80, 90 and 95 %, and cropped by 2 and 5 % (centred, and from one corner). Every image
goes through ``imaging.process_and_hash`` as a resize worker runs it (min 256, max 512), and the
whole set, shuffled, through ``DedupIndex.judge`` in units of 50, as a run commits them.

* precision: of the images dropped as near duplicates, those whose group (a framing and its
  copies) had an image kept before; recall: of the images that should go (all but one per
  group), those dropped. Distinct framings of one scene are separate groups: dropping one is a
  false positive.
* cost: the resize worker's time per image with ``--dedup near`` over ``exact``, on the
  benchmark corpus's images; ``judge``'s time per image; the near search's time per query in
  0.1M to 10M codes, against comparing every code.
"""

from __future__ import annotations

import argparse
import io
import itertools
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import md_table, save_result  # noqa: E402
from corpus import skimage_dir  # noqa: E402

from fastfetch.dedup import NEAR_BITS, DedupIndex, DedupMode, KeptRow  # noqa: E402
from fastfetch.imaging import ResizeConfig, hamming, process_and_hash  # noqa: E402
from fastfetch.nearsearch import HammingIndex  # noqa: E402

PHOTOS = [
    "astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg", "ihc.png",
    "camera.png", "moon.png", "brick.png", "grass.png", "gravel.png", "coins.png", "page.png", "clock_motion.png",
    "cell.png", "motorcycle_left.png", "motorcycle_right.png", "color.png",
]  # fmt: skip
NEAR = ResizeConfig(dedup="near")


def jpeg(im: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    im.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def framings() -> list[tuple[str, str, Image.Image]]:
    """(scene, framing name, image): three 60 % crops of each photo, 600 px short side."""
    out = []
    for name in PHOTOS:
        im = Image.open(skimage_dir() / name).convert("RGB")
        scene = "motorcycle" if name.startswith("motorcycle") else name
        w, h = im.size
        for j in range(3):
            cw, ch = int(w * 0.6), int(h * 0.6)
            x, y = int((w - cw) * j / 2), int((h - ch) * ((j * 7) % 3) / 2)
            crop = im.crop((x, y, x + cw, y + ch))
            scale = 600 / min(crop.size)
            out.append(
                (
                    scene,
                    f"{name}/{j}",
                    crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.Resampling.LANCZOS),
                )
            )
    return out


def copies(im: Image.Image) -> list[tuple[str, bytes]]:
    out = [(f"quality {q}", jpeg(im, q)) for q in (50, 70, 85)]
    out += [
        (f"resized {f:.0%}", jpeg(im.resize((round(im.width * f), round(im.height * f)), Image.Resampling.BICUBIC)))
        for f in (0.8, 0.9, 0.95)
    ]
    for f in (0.02, 0.05):
        dx, dy = round(im.width * f), round(im.height * f)
        out.append(
            (f"crop {f:.0%} centred", jpeg(im.crop((dx // 2, dy // 2, im.width - (dx - dx // 2), im.height - (dy - dy // 2)))))
        )
        out.append((f"crop {f:.0%} corner", jpeg(im.crop((dx, dy, im.width, im.height)))))
    return out


def planted() -> list[tuple[str, str, str, str]]:
    """(group, kind, sha256, phash) of every planted image."""
    rows = []
    for _scene, group, im in framings():
        for kind, body in [("original", jpeg(im)), *copies(im)]:
            sha, ph = process_and_hash(body, NEAR).digests.split(",")
            rows.append((group, kind, sha, ph))
    return rows


def run_dedup(rows: list[tuple[str, str, str, str]], seed: int) -> dict[str, float]:
    """The planted set through the index as a run judges it, in a shuffled plan order."""
    order = rows[:]
    random.Random(seed).shuffle(order)
    with tempfile.TemporaryDirectory() as tmp:
        index = DedupIndex(Path(tmp) / "i.sqlite", "bench", DedupMode.NEAR)
        kept_groups: set[str] = set()
        tp = fp = 0
        for u in range(0, len(order), 50):
            unit = [KeptRow(i, ("", i), f"{u}-{i}", sha, ph, 0) for i, (_, _, sha, ph) in enumerate(order[u : u + 50])]
            dropped = index.judge(f"u{u}", unit)
            for row, (group, _, _, _) in zip(unit, order[u : u + 50]):
                if row.position in dropped:
                    tp += group in kept_groups
                    fp += group not in kept_groups
                else:
                    kept_groups.add(group)
        index.close()
    should_go = len(rows) - len({g for g, *_ in rows})
    return {"precision": tp / max(tp + fp, 1), "recall": tp / should_go, "dropped": tp + fp, "false_positives": fp}


def pair_distances(rows: list[tuple[str, str, str, str]]) -> tuple[dict[str, list[int]], list[int], list[int]]:
    """Bits between each copy and its original (by kind); between distinct framings of one
    scene; between framings of different scenes."""
    originals = {g: ph for g, kind, _, ph in rows if kind == "original"}
    by_kind: dict[str, list[int]] = {}
    for g, kind, _, ph in rows:
        if kind != "original":
            by_kind.setdefault(kind, []).append(hamming(originals[g], ph))
    same, other = [], []
    for (a, pa), (b, pb) in itertools.combinations(originals.items(), 2):
        scene_a, scene_b = ("motorcycle" if x.startswith("motorcycle") else x.split("/")[0] for x in (a, b))
        (same if scene_a == scene_b else other).append(hamming(pa, pb))
    return by_kind, same, other


def worker_cost(n: int) -> dict[str, float]:
    """ms per corpus image (its web mix: some too small, some broken) in process_and_hash with
    --dedup near, exact, and neither (wall time of one thread, best of 5 per image)."""
    files = sorted((Path(__file__).parent / "_work" / "corpus").glob("*/web/img/*"))[:n]
    if not files:
        sys.exit("no benchmark corpus: run python benchmarks/corpus.py first")
    bodies = [f.read_bytes() for f in files]
    configs = {"none": ResizeConfig(), "exact": ResizeConfig(dedup="exact"), "near": NEAR}
    best = {name: [float("inf")] * len(bodies) for name in configs}
    for _ in range(5):  # per image, the three back to back, the best of 5: drift in the machine's load cancels out
        for i, body in enumerate(bodies):
            for name, cfg in configs.items():
                t = time.perf_counter()
                process_and_hash(body, cfg)
                best[name][i] = min(best[name][i], time.perf_counter() - t)
    out = {name: sum(times) / len(bodies) * 1000 for name, times in best.items()}
    out["kept"] = sum(process_and_hash(b, NEAR).reason is None for b in bodies)
    out["images"] = len(bodies)
    return out


def judge_cost(sizes: list[int]) -> dict[int, float]:
    """ms per image for ``judge`` (near) of a 1000-row unit against an index of each size."""
    rng = np.random.default_rng(0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        index = DedupIndex(Path(tmp) / "i.sqlite", "bench", DedupMode.NEAR)
        have = 0
        for size in sizes:
            hashes = rng.integers(0, 2**63, size - have, dtype=np.int64)
            index.judge(
                "filler", [KeptRow(i, ("", 0), "k", f"{have + i:064x}", f"{int(h):016x}", 0) for i, h in enumerate(hashes)]
            )
            have = size
            rows = [  # digests of their own, never seen before (an exact duplicate is not searched)
                KeptRow(i, ("", i), "q", f"{10**12 * size + i:064x}", f"{int(h):016x}", 0)
                for i, h in enumerate(rng.integers(0, 2**63, 1000))
            ]
            index.judge("warm", rows[:1])  # loads the index's hashes once, as a run does
            t = time.perf_counter()
            index.judge("unit", rows[1:])
            out[size] = (time.perf_counter() - t) / (len(rows) - 1) * 1000
        index.close()
    return out


def search_cost(sizes: list[int]) -> dict[int, tuple[float, float]]:
    """ms per query of ``HammingIndex.near`` and of comparing every code, over uniformly random
    codes of each count (real hashes cluster, which fills some tables' buckets more)."""
    rng = np.random.default_rng(1)
    out = {}
    for size in sizes:
        codes = rng.integers(0, 2**64 - 1, size, dtype=np.uint64, endpoint=True)
        index = HammingIndex(NEAR_BITS)
        index.add(codes)
        queries = [int(q) for q in rng.integers(0, 2**64 - 1, 2000, dtype=np.uint64, endpoint=True)]
        t = time.perf_counter()
        for q in queries:
            index.near(q)
        tabled = (time.perf_counter() - t) / len(queries) * 1000
        t = time.perf_counter()
        for q in queries[:100]:
            np.bitwise_count(codes ^ np.uint64(q)).min()
        out[size] = (tabled, (time.perf_counter() - t) / 100 * 1000)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    rows = planted()
    kinds, same, other = pair_distances(rows)
    results = [run_dedup(rows, seed) for seed in range(1 if args.quick else 5)]
    sweep = []
    for t in (4, 6, 8, 10, 12, 14, 16, 18):
        positives = [d for ds in kinds.values() for d in ds]
        sweep.append(
            [t, f"{sum(d <= t for d in positives) / len(positives):.1%}", sum(d <= t for d in same), sum(d <= t for d in other)]
        )
    worker = worker_cost(100 if args.quick else 400)
    judge = judge_cost([10_000, 100_000])
    search = search_cost([100_000, 1_000_000] if args.quick else [100_000, 1_000_000, 10_000_000])
    groups = len({g for g, *_ in rows})
    summary = {
        "near_bits": NEAR_BITS,
        "images": len(rows),
        "groups": groups,
        "precision": statistics.median(r["precision"] for r in results),
        "recall": statistics.median(r["recall"] for r in results),
        "runs": results,
        "max_bits_by_kind": {k: max(v) for k, v in kinds.items()},
        "same_scene_min_bits": min(same),
        "other_scene_min_bits": min(other),
        "worker_ms": worker,
        "judge_ms_by_index_size": judge,
        "search_ms_by_index_size": search,
    }
    kind_table = md_table(["copy", "bits from its original: median", "max", f"within {NEAR_BITS}"], [
        [k, statistics.median(v), max(v), f"{sum(d <= NEAR_BITS for d in v)}/{len(v)}"] for k, v in kinds.items()
    ])  # fmt: skip
    sweep_table = md_table(["threshold (bits)", "copies within", "distinct same-scene pairs within", "other pairs within"], sweep)
    cost_table = md_table(
        ["", "ms per image"],
        [
            [f"resize worker, no dedup ({worker['images']} corpus images, {worker['kept']} kept)", f"{worker['none']:.3f}"],
            ["resize worker, --dedup exact (sha256)", f"{worker['exact']:.3f}"],
            ["resize worker, --dedup near (sha256 + phash)", f"{worker['near']:.3f}"],
            [
                "added per kept image: exact / near",
                f"{(worker['exact'] - worker['none']) * worker['images'] / worker['kept']:.3f} / "
                f"{(worker['near'] - worker['none']) * worker['images'] / worker['kept']:.3f}",
            ],
            *[
                [f"judge (near, a 1000-row unit, SQLite included) against {n:,} kept images", f"{ms:.3f}"]
                for n, ms in judge.items()
            ],
            *[
                [f"near search in {n:,} random codes: tables / every code compared", f"{a:.3f} / {b:.3f}"]
                for n, (a, b) in search.items()
            ],
        ],
    )
    text = (
        f"{len(rows)} images in {groups} groups ({len(same)} distinct same-scene pairs); threshold {NEAR_BITS} bits: "
        f"precision {summary['precision']:.1%}, recall {summary['recall']:.1%} (median of {len(results)} shuffled plan orders; "
        f"false positives per run {[r['false_positives'] for r in results]})\n\n{kind_table}\n\n{sweep_table}\n\n{cost_table}\n"
    )
    save_result("near-dedup", {"command": " ".join(sys.argv), "summary": summary, "text": text})
    print(text)


if __name__ == "__main__":
    main()
