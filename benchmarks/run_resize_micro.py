#!/usr/bin/env python3
"""Resize microbenchmark: decode / resize / encode per image size bucket, one process, one thread.

    python benchmarks/run_resize_micro.py            # Pillow, Pillow-SIMD, OpenCV (~3 min)
    python benchmarks/run_resize_micro.py --quick

Inputs are the corpus's baseline JPEGs grouped by short side. Every image goes through
decode → resize (short side to 512, bicubic / antialiased) → JPEG q95, timed stage by stage,
with each library's ways of doing it:

  Pillow / Pillow-SIMD  full decode; reduced-scale decode forced to 1/2, 1/4, 1/8 (``draft``;
                        only where the reduced image is still ≥ 512, else n/a); ``auto`` = the
                        largest reduction that keeps ≥ 512 (what fastfetch.imaging does)
  OpenCV                ``imdecode`` full and ``IMREAD_REDUCED_COLOR_2/4/8``; ``cv2.resize``
                        INTER_AREA (img2dataset's default downscale) and INTER_CUBIC

Pillow runs under benchmarks/_work/venv-stock (Pillow) and venv-simd (Pillow-SIMD built with
AVX2 by scripts/install-pillow-simd.sh); see benchmarks/setup.sh. Times are medians per image.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BUCKETS = [
    (512, 768),
    (768, 1024),
    (1024, 1536),
    (1536, 2048),
    (2048, 2600),
]  # every variant of a row set applies to all its images
TARGET = 512


def bucket_of(short: int) -> str | None:
    for lo, hi in BUCKETS:
        if lo < short <= hi:
            return f"{lo}-{hi}"
    return None


def target(w: int, h: int) -> tuple[int, int]:
    s = TARGET / min(w, h)
    return (TARGET, max(1, round(h * s))) if w <= h else (max(1, round(w * s)), TARGET)


def pick_inputs(corpus: Path, per_bucket: int) -> dict[str, list[str]]:
    items = json.loads((corpus / "web" / "items.json").read_text())
    out: dict[str, list[str]] = {f"{lo}-{hi}": [] for lo, hi in BUCKETS}
    for r in items:
        if r["kind"] != "jpeg":
            continue
        b = bucket_of(min(r["width"], r["height"]))
        if b and len(out[b]) < per_bucket:
            out[b].append(str(corpus / "web" / r["file"]))
    return out


# -- inner measurements ------------------------------------------------------------------------
def _t() -> float:
    return time.perf_counter()


def pillow_variants(data: bytes) -> dict[str, tuple[float, float, float] | None]:
    from PIL import Image

    res: dict[str, tuple[float, float, float] | None] = {}
    probe = Image.open(io.BytesIO(data))
    w, h = probe.size
    tw, th = target(w, h)
    for name, scale in (("full", 1), ("draft 1/2", 2), ("draft 1/4", 4), ("draft 1/8", 8), ("auto", 0)):
        if scale > 1 and min(w, h) / scale < TARGET:
            res[name] = None
            continue
        t0 = _t()
        im = Image.open(io.BytesIO(data))
        if scale == 0:
            im.draft("RGB", (tw, th))
        elif scale > 1:
            im.draft("RGB", (w // scale, h // scale))  # draft picks scale = min(w // rw, h // rh)
        im.load()
        t1 = _t()
        if im.size != (tw, th):
            im = im.resize((tw, th), Image.Resampling.BICUBIC, reducing_gap=None)
        t2 = _t()
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=95)
        t3 = _t()
        res[name] = (t1 - t0, t2 - t1, t3 - t2)
    return res


def opencv_variants(data: bytes) -> dict[str, tuple[float, float, float] | None]:
    import cv2
    import numpy as np

    cv2.setNumThreads(1)
    res: dict[str, tuple[float, float, float] | None] = {}
    buf = np.frombuffer(data, np.uint8)
    full = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    h, w = full.shape[:2]
    tw, th = target(w, h)
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
    for interp_name, interp in (("area", cv2.INTER_AREA), ("cubic", cv2.INTER_CUBIC)):
        for scale, flag in flags.items():
            name = f"{interp_name} " + ("full" if scale == 1 else f"reduced 1/{scale}")
            if scale > 1 and (min(w, h) / scale < TARGET or interp_name == "cubic"):
                continue
            t0 = _t()
            img = cv2.imdecode(buf, flag)
            t1 = _t()
            img = cv2.resize(img, (tw, th), interpolation=interp)
            t2 = _t()
            ok, enc = cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), 95])
            t3 = _t()
            res[name] = (t1 - t0, t2 - t1, t3 - t2)
    return res


def inner(inputs: dict[str, list[str]], lib: str, repeats: int) -> dict[str, Any]:
    fn = pillow_variants if lib == "pillow" else opencv_variants
    out: dict[str, dict[str, list[float]]] = {}
    for bucket, files in inputs.items():
        per: dict[str, list[tuple[float, float, float]]] = {}
        for f in files:
            data = Path(f).read_bytes()
            fn(data)  # warm-up
            best: dict[str, tuple[float, float, float]] = {}
            for _ in range(repeats):
                for name, t in fn(data).items():
                    if t is not None and (name not in best or sum(t) < sum(best[name])):
                        best[name] = t
            for name, t in best.items():
                per.setdefault(name, []).append(t)
        out[bucket] = {
            name: [statistics.median(x[k] for x in ts) * 1000 for k in range(3)] + [len(ts)] for name, ts in per.items()
        }
    if lib == "pillow":
        import importlib.metadata as m

        import PIL

        try:
            simd = m.version("pillow-simd")
        except m.PackageNotFoundError:
            simd = None
        flavour = ("Pillow-SIMD " if PIL.__version__ == simd else "Pillow ") + PIL.__version__
    else:
        import cv2

        flavour = f"OpenCV {cv2.__version__}"
    return {"lib": flavour, "buckets": out}


def main() -> None:
    import corpus as corpus_mod
    from common import md_table, save_result, venv_python

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    corpus_mod.add_corpus_arguments(p)
    p.add_argument("--per-bucket", type=int, default=12, help="images per size bucket")
    p.add_argument("--repeats", type=int, default=3, help="timings per image (the fastest counts)")
    p.add_argument("--inner", choices=("pillow", "opencv"), help=argparse.SUPPRESS)
    p.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        print(json.dumps(inner(json.loads(args.inputs.read_text()), args.inner, args.repeats)))
        return
    if args.quick:
        args.per_bucket, args.repeats = 3, 1
    corpus = corpus_mod.build(corpus_mod.params_from_args(args))
    inputs = pick_inputs(corpus, args.per_bucket)
    inputs_file = HERE / "_work" / "micro-inputs.json"
    inputs_file.write_text(json.dumps(inputs))
    jobs = []
    for venv in ("venv-stock", "venv-simd"):
        py = venv_python(venv)
        if py.exists():
            jobs.append((str(py), "pillow"))
    stock = venv_python("venv-stock")
    jobs.append((str(stock) if stock.exists() else sys.executable, "opencv"))
    results = []
    for py, lib in jobs:
        r = subprocess.run(
            [py, __file__, "--inner", lib, "--inputs", str(inputs_file), "--repeats", str(args.repeats)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if r.returncode != 0:
            print(f"{lib} under {py} failed:\n{r.stderr[-1500:]}", file=sys.stderr)
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        results.append(res)
        print(f"done: {res['lib']}", flush=True)
    rows = []
    for bucket in inputs:
        for res in results:
            for name, (dec, rsz, enc, n) in res["buckets"].get(bucket, {}).items():
                total = dec + rsz + enc
                rows.append(
                    [
                        bucket,
                        res["lib"],
                        name,
                        round(dec, 1),
                        round(rsz, 1),
                        round(enc, 1),
                        round(total, 1),
                        round(1000 / total, 1),
                        n,
                    ]
                )
    table = md_table(
        ["short side", "library", "variant", "decode ms", "resize ms", "encode ms", "total ms", "img/s (1 core)", "images"], rows
    )
    from common import loadavg

    path = save_result(
        "micro",
        {"command": " ".join(sys.argv), "corpus": str(corpus), "results": results, "table": table, "load_after": loadavg()},
    )
    print(table)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
