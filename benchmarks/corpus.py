#!/usr/bin/env python3
"""Deterministic benchmark corpus: a LAION-like web-image mix made from real photographs.

    python benchmarks/corpus.py                # default sizes, into benchmarks/_work/corpus/
    python benchmarks/corpus.py --quick        # a small one for smoke tests
    python benchmarks/corpus.py --web 3000 --seed 1

The photographs are the sample images that ship inside scikit-image (astronaut, coffee,
chelsea, rocket, hubble, retina, motorcycle, …; nothing is downloaded). Each corpus image is a
random crop of one of them, rescaled to a LAION-like spread of sizes and saved in a web-like
mix of formats:

* sizes (short side): ~30 % below 256 (dropped by the rules), ~60 % 256–1024, ~10 % 1024–2500;
  aspect ratios 1:1 … 2:1, both orientations. Upscaled crops get film grain so that they
  compress (and decode) like real photographs rather than like smooth gradients;
* formats: ~68 % baseline JPEG (quality 70–95, 4:2:0 and some 4:4:4), 8 % progressive JPEG,
  5 % greyscale JPEG, 2 % JPEG with an EXIF rotation, 4 % RGBA PNG, 3 % palette PNG, 6 % WebP,
  2 % broken files (truncated JPEG, an HTML error page, a zero-byte file), plus 2 % of the URLs
  pointing at files that do not exist (404).

It also writes SA-1B-style tar archives (``sa_N.jpg`` + ``sa_N.json`` members with a ~100 KB
JSON of fake mask annotations, like the real ones) in two variants:

* ``archives/mixed``: the corpus's JPEGs (the web size spread);
* ``archives/sa1b``: SA-1B-like photographs, all ~1500 px short side (1500×2250 and friends),

each with the captions tar the SA-1B recipes read (``SA1B_caption.tar.gz`` of ``sa_N.txt``).

The same seed and sizes always give byte-identical files. URL lists and links files depend on
the server's port, so the runners write them (``write_url_list``, ``write_links``).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import shutil
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
CORPUS_VERSION = 3

COLOUR_PHOTOS = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
    "color.png",
]
GREY_PHOTOS = ["camera.png", "brick.png", "grass.png", "gravel.png", "moon.png", "coins.png", "cell.png", "clock_motion.png"]
ALPHA_IMAGES = ["logo.png", "horse.png"]

# (kind, weight) of the web mix; "missing" rows are URLs with no file behind them.
KINDS = [
    ("jpeg", 68),
    ("progressive", 8),
    ("grey", 5),
    ("exif_rotated", 2),
    ("png_rgba", 4),
    ("png_palette", 3),
    ("webp", 6),
    ("broken", 2),
    ("missing", 2),
]
ASPECTS = [(1.0, 20), (4 / 3, 25), (3 / 2, 25), (16 / 9, 15), (2.0, 5), (1.25, 10)]
WORDS = (
    "a photo of the cat dog astronaut rocket coffee cup on wooden table in space with blue sky "
    "red car motorcycle street city night light portrait close up landscape mountain river "
    "beautiful vintage modern art painting drawing illustration poster design logo white black "
    "green small large old new people woman man child sitting standing near next to under over"
).split()


def skimage_dir() -> Path:
    try:
        import skimage
    except ImportError:
        sys.exit("corpus.py needs scikit-image for its sample photographs: pip install scikit-image")
    return Path(skimage.__file__).resolve().parent / "data"


def _sources() -> dict[str, Image.Image]:
    d = skimage_dir()
    out = {}
    for name in COLOUR_PHOTOS + GREY_PHOTOS + ALPHA_IMAGES:
        im = Image.open(d / name)
        im.load()
        out[name] = im.convert("RGBA" if name in ALPHA_IMAGES else ("L" if name in GREY_PHOTOS else "RGB"))
    return out


_SRC: dict[str, Image.Image] = {}


def _src(name: str) -> Image.Image:
    if not _SRC:
        _SRC.update(_sources())
    return _SRC[name]


@dataclass
class Spec:
    index: int
    kind: str
    width: int
    height: int
    source: str
    seed: int
    quality: int = 90
    subsampling: int = 2  # 0 = 4:4:4, 2 = 4:2:0

    @property
    def ext(self) -> str:
        return {"png_rgba": "png", "png_palette": "png", "webp": "webp"}.get(self.kind, "jpg")

    @property
    def name(self) -> str:
        return f"{self.index:06d}.{self.ext}"


def _short_side(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.30:
        return int(round(np.exp(rng.uniform(np.log(64), np.log(255)))))
    if r < 0.90:
        return int(round(np.exp(rng.uniform(np.log(256), np.log(1024)))))
    return rng.randint(1025, 2500)


def _weighted(rng: random.Random, table: list[tuple]) -> object:
    return rng.choices([t[0] for t in table], weights=[t[1] for t in table])[0]


def plan_web(n: int, seed: int) -> list[Spec]:
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        kind = str(_weighted(rng, KINDS))
        short = _short_side(rng)
        aspect = float(_weighted(rng, ASPECTS)) * rng.uniform(0.97, 1.03)
        long_ = max(short, int(round(short * aspect)))
        w, h = (long_, short) if rng.random() < 0.65 else (short, long_)
        if kind == "grey":
            source = rng.choice(GREY_PHOTOS + COLOUR_PHOTOS)
        elif kind == "png_rgba":
            source = rng.choice(ALPHA_IMAGES + COLOUR_PHOTOS)
        else:
            source = rng.choice(COLOUR_PHOTOS + COLOUR_PHOTOS + GREY_PHOTOS[:2])
        specs.append(Spec(i, kind, w, h, source, rng.getrandbits(32), rng.randint(70, 95), 0 if rng.random() < 0.15 else 2))
    return specs


def _render(width: int, height: int, source: str, seed: int) -> Image.Image:
    """A random crop of a sample photo scaled to (width, height), with grain when upscaled."""
    rng = random.Random(seed)
    src = _src(source)
    sw, sh = src.size
    aspect = width / height
    cw = min(sw, sh * aspect)
    ch = cw / aspect
    scale = rng.uniform(0.55, 1.0)
    cw, ch = max(8.0, cw * scale), max(8.0, ch * scale)
    x0, y0 = rng.uniform(0, sw - cw), rng.uniform(0, sh - ch)
    im = src.resize((width, height), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    factor = width / cw
    if factor > 1.3 and im.mode in ("RGB", "L"):
        # Upscaling leaves a smooth picture; grain puts back photo-like high-frequency content.
        amp = int(min(7, 2 + 2 * factor))
        arr = np.asarray(im, dtype=np.int16)
        noise = np.random.default_rng(seed).integers(
            -amp, amp + 1, size=arr.shape[:2] + ((1,) if arr.ndim == 3 else ()), dtype=np.int16
        )
        arr = np.clip(arr + noise, 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, im.mode)
    return im


def _encode(spec: Spec) -> bytes:
    """The file bytes of one web corpus item (b"" for a missing URL)."""
    rng = random.Random(spec.seed ^ 0x5EED)
    if spec.kind == "missing":
        return b""
    if spec.kind == "broken":
        choice = spec.seed % 3
        if choice == 0:  # a JPEG cut short (connection dropped mid-transfer)
            full = _jpeg(_render(spec.width, spec.height, spec.source, spec.seed).convert("RGB"), spec.quality, 2)
            return full[: int(len(full) * rng.uniform(0.3, 0.8))]
        if choice == 1:  # an HTML error page served with 200 under an image URL
            return b"<!doctype html><html><head><title>Not found</title></head><body>" + b"gone " * 200 + b"</body></html>"
        return b""
    im = _render(spec.width, spec.height, spec.source, spec.seed)
    buf = io.BytesIO()
    if spec.kind == "jpeg":
        return _jpeg(im.convert("RGB"), spec.quality, spec.subsampling)
    if spec.kind == "progressive":
        im.convert("RGB").save(buf, "JPEG", quality=spec.quality, progressive=True, optimize=True)
    elif spec.kind == "grey":
        im.convert("L").save(buf, "JPEG", quality=spec.quality)
    elif spec.kind == "exif_rotated":
        # A phone photo: pixels stored sideways, EXIF orientation 6 says "rotate 90° clockwise".
        exif = Image.Exif()
        exif[0x0112] = 6
        im.convert("RGB").transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=spec.quality, exif=exif.tobytes())
    elif spec.kind == "png_rgba":
        im = im.convert("RGBA")
        if _src(spec.source).mode != "RGBA":
            # A cut-out: an elliptic alpha mask over the photo.
            yy, xx = np.mgrid[0 : im.height, 0 : im.width]
            mask = ((xx / im.width - 0.5) ** 2 + (yy / im.height - 0.5) ** 2) < 0.2
            alpha = Image.fromarray((mask * 255).astype(np.uint8), "L")
            im.putalpha(alpha)
        im.save(buf, "PNG")
    elif spec.kind == "png_palette":
        im.convert("RGB").quantize(256).save(buf, "PNG")
    elif spec.kind == "webp":
        im.convert("RGB").save(buf, "WEBP", quality=spec.quality, method=4)
    else:
        raise ValueError(spec.kind)
    return buf.getvalue()


def _jpeg(im: Image.Image, quality: int, subsampling: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def _write_web_item(args: tuple[Spec, str]) -> tuple[int, int]:
    spec, out_dir = args
    path = Path(out_dir) / spec.name
    if spec.kind == "missing":
        return spec.index, 0
    if path.exists():  # an interrupted build resumes (files are written whole, then renamed)
        return spec.index, path.stat().st_size
    data = _encode(spec)
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    os.replace(part, path)
    return spec.index, len(data)


def caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 24)))


# -- SA-1B-style archives ----------------------------------------------------------------------
def _fake_annotations(image_id: int, w: int, h: int, rng: random.Random) -> bytes:
    """An SA-1B-like JSON: image info plus ~60 masks whose RLE counts are random text."""
    anns = []
    for k in range(rng.randint(40, 80)):
        x, y = rng.uniform(0, w - 10), rng.uniform(0, h - 10)
        bw, bh = rng.uniform(5, w - x), rng.uniform(5, h - y)
        counts = base64.b85encode(rng.randbytes(rng.randint(600, 1600))).decode()
        anns.append(
            {
                "bbox": [round(x, 1), round(y, 1), round(bw, 1), round(bh, 1)],
                "area": int(bw * bh),
                "segmentation": {"size": [h, w], "counts": counts},
                "predicted_iou": round(rng.random(), 4),
                "point_coords": [[round(x + bw / 2, 2), round(y + bh / 2, 2)]],
                "crop_box": [0.0, 0.0, float(w), float(h)],
                "id": image_id * 1000 + k,
                "stability_score": round(rng.random(), 4),
            }
        )
    doc = {"image": {"image_id": image_id, "width": w, "height": h, "file_name": f"sa_{image_id}.jpg"}, "annotations": anns}
    return json.dumps(doc).encode()


def _sa1b_image(args: tuple[int, int]) -> bytes:
    """One SA-1B-like photo: ~1500 px short side, high-quality JPEG."""
    image_id, seed = args
    rng = random.Random(seed)
    short = rng.randint(1500, 1500) if rng.random() < 0.8 else rng.randint(1450, 1550)
    aspect = rng.choice([1.5, 1.5, 1.5, 4 / 3, 1.0, 16 / 9])
    long_ = int(round(short * aspect))
    w, h = (long_, short) if rng.random() < 0.7 else (short, long_)
    im = _render(w, h, rng.choice(COLOUR_PHOTOS), seed)
    return _jpeg(im.convert("RGB"), rng.randint(85, 95), 2)


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int = 1_700_000_000) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_archives(out: Path, items: list[tuple[int, bytes]], per_tar: int, seed: int) -> dict:
    """Pack (image_id, jpeg bytes) into sa_00000N.tar files + SA1B_caption.tar.gz."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tars = []
    captions: list[tuple[int, str]] = []
    for t in range(0, len(items), per_tar):
        name = f"sa_{t // per_tar:06d}.tar"
        chunk = items[t : t + per_tar]
        with tarfile.open(out / name, "w", format=tarfile.GNU_FORMAT) as tar:
            for image_id, data in chunk:
                try:
                    with Image.open(io.BytesIO(data)) as probe:
                        w, h = probe.size
                except Exception:  # the broken files (an HTML page under .jpg): the JSON still needs a size
                    w, h = 16, 16
                _add(tar, f"sa_{image_id}.jpg", data)
                _add(tar, f"sa_{image_id}.json", _fake_annotations(image_id, max(w, 16), max(h, 16), rng))
                captions.append((image_id, caption(rng)))
        tars.append({"file_name": name, "images": len(chunk), "bytes": (out / name).stat().st_size})
    with tarfile.open(out / "SA1B_caption.tar.gz", "w:gz", compresslevel=6) as tar:
        for image_id, text in captions:
            _add(tar, f"sa_{image_id}.txt", text.encode())
    return {"tars": tars, "images": len(items)}


# -- the whole corpus --------------------------------------------------------------------------
@dataclass
class CorpusParams:
    web: int = 4000
    mixed_archives: int = 4
    mixed_per_archive: int = 250
    sa1b_archives: int = 4
    sa1b_per_archive: int = 60
    seed: int = 0
    version: int = CORPUS_VERSION


def corpus_dir(params: CorpusParams, root: Path = WORK / "corpus") -> Path:
    p = params
    return (
        root
        / f"w{p.web}-m{p.mixed_archives}x{p.mixed_per_archive}-s{p.sa1b_archives}x{p.sa1b_per_archive}-seed{p.seed}-v{p.version}"
    )


QUICK = CorpusParams(web=200, mixed_archives=2, mixed_per_archive=40, sa1b_archives=2, sa1b_per_archive=8)


def build(params: CorpusParams, workers: int = 2, root: Path = WORK / "corpus") -> Path:
    """Build (or reuse) the corpus for these parameters; returns its folder."""
    out = corpus_dir(params, root)
    meta_path = out / "corpus.json"
    if meta_path.exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp / "archives", ignore_errors=True)
    (tmp / "web" / "img").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    specs = plan_web(params.web, params.seed)
    sizes: dict[int, int] = {}
    with ProcessPoolExecutor(workers) as pool:
        for index, size in pool.map(_write_web_item, [(s, str(tmp / "web" / "img")) for s in specs], chunksize=8):
            sizes[index] = size
        rng = random.Random(params.seed + 1)
        rows = []
        for s in specs:
            rows.append({**asdict(s), "file": f"img/{s.name}", "bytes": sizes[s.index], "caption": caption(rng)})
        (tmp / "web" / "items.json").write_text(json.dumps(rows))

        # Archives over the corpus: its JPEGs in order (web size spread, a few broken ones too).
        jpeg_rows = [r for r in rows if r["file"].endswith(".jpg") and r["kind"] != "missing" and r["bytes"] > 0]
        n_mixed = params.mixed_archives * params.mixed_per_archive
        picked = [jpeg_rows[i % len(jpeg_rows)] for i in range(n_mixed)]
        mixed = [(1 + i, (tmp / "web" / r["file"]).read_bytes()) for i, r in enumerate(picked)]
        mixed_meta = write_archives(tmp / "archives" / "mixed", mixed, params.mixed_per_archive, params.seed + 2)

        n_sa = params.sa1b_archives * params.sa1b_per_archive
        seeds = [(100_000 + i, params.seed * 7919 + i) for i in range(n_sa)]
        sa_imgs = list(pool.map(_sa1b_image, seeds, chunksize=2))
        sa_meta = write_archives(
            tmp / "archives" / "sa1b", [(i, d) for (i, _), d in zip(seeds, sa_imgs)], params.sa1b_per_archive, params.seed + 3
        )

    summary = _summarise(rows)
    meta = {
        "params": asdict(params),
        "seconds_to_build": round(time.time() - t0, 1),
        "web": summary,
        "archives": {"mixed": mixed_meta, "sa1b": sa_meta},
    }
    (tmp / "corpus.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _summarise(rows: list[dict]) -> dict:
    from collections import Counter

    kinds = Counter(r["kind"] for r in rows)
    shorts = [min(r["width"], r["height"]) for r in rows if r["kind"] not in ("missing", "broken")]
    buckets = Counter("<256" if s < 256 else "256-512" if s <= 512 else "513-1024" if s <= 1024 else ">1024" for s in shorts)
    total = sum(r["bytes"] for r in rows)
    return {"items": len(rows), "kinds": dict(kinds), "short_side_buckets": dict(buckets), "bytes": total}


def load_items(corpus: Path) -> list[dict]:
    return json.loads((corpus / "web" / "items.json").read_text())


def write_url_list(corpus: Path, base_url: str, out: Path, repeat: int = 1) -> int:
    """A LAION-like parquet (url, caption) over the web corpus at ``base_url`` (…/web/).

    ``repeat`` > 1 lists every image that many times, the copies told apart by a ``?copy=N``
    query (a static server ignores it): more URLs without generating more images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = load_items(corpus)
    base = [f"{base_url.rstrip('/')}/{r['file']}" for r in items]
    urls = [u if copy == 0 else f"{u}?copy={copy}" for copy in range(repeat) for u in base]
    captions = [r["caption"] for r in items] * repeat
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"url": urls, "caption": captions}), out)
    return len(urls)


def write_links(corpus: Path, variant: str, base_url: str, out: Path) -> int:
    """An SA-1B links file (``file_name\\tcdn_link`` with a header line) for one archive variant."""
    meta = json.loads((corpus / "corpus.json").read_text())
    tars = meta["archives"][variant]["tars"]
    lines = ["file_name\tcdn_link"] + [f"{t['file_name']}\t{base_url.rstrip('/')}/{t['file_name']}" for t in tars]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return len(tars)


def params_from_args(args: argparse.Namespace) -> CorpusParams:
    if getattr(args, "quick", False):
        return QUICK
    return CorpusParams(seed=getattr(args, "seed", 0), web=getattr(args, "web", None) or CorpusParams.web)


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small corpus and one short run (smoke test)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--web", type=int, default=None, help=f"web images in the corpus (default {CorpusParams.web})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_corpus_arguments(parser)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    out = build(params_from_args(args), args.workers)
    meta = json.loads((out / "corpus.json").read_text())
    print(out)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
