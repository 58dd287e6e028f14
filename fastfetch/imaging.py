"""Decode → filter → resize → encode, once per image, entirely in memory.

These are pure functions so that they run unchanged in the resize process pool, in the
benchmarks' ceiling loop and in tests. The fast paths matter more than anything else in the
project, because decoding is where a fetch spends its CPU:

* the size filter is decided from the header alone (no pixel is decoded for a too-small image);
* a JPEG that needs no resize, no rotation and no colour conversion is kept byte for byte;
* a JPEG that must shrink by 2× or more is decoded at reduced scale by libjpeg (``Image.draft``),
  which skips most of the IDCT work;
* everything else is decoded once, resized once (antialiased) and encoded once.

Content digests for ``--hashes`` and ``--dedup`` are computed here too, by the process that
holds the bytes and pixels anyway: hashlib digests of the original bytes, and ``phash``, the
perceptual hash of the decoded image (from the resized pixels when the image was resized; a
JPEG kept byte for byte is decoded for it at 1/8 scale, which costs a fraction of a full decode).
``phash`` is the usual DCT hash (imagehash's ``phash``: 32×32 greyscale, the 8×8 lowest
frequencies against their median, 64 bits; here from the image box-averaged to 64–127 px first,
which gives the same 32×32 at a third of the cost) written out in numpy: imagehash would bring
scipy and PyWavelets into every resize worker for one 32×32 transform.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

from PIL import Image, ImageFile, UnidentifiedImageError

from fastfetch.body import Body
from fastfetch.errors import Reason as R

# Truncated files are rejected, not silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

RESIZE_FILTERS: dict[str, Image.Resampling] = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "box": Image.Resampling.BOX,
}

# EXIF orientation → the transpose that undoes it (values 2..8; 1 means "as stored").
_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True, slots=True)
class ResizeConfig:
    """The rules every stored image obeys (short side in [min_size, max_size])."""

    min_size: int = 256
    max_size: int = 512
    resize_filter: str = "bicubic"
    quality: int = 95
    max_pixels: int = 89_478_485  # Pillow's own decompression-bomb threshold
    reduced_decode: bool = True  # libjpeg DCT scaling when shrinking ≥ 2×
    keep_original_jpeg: bool = True  # store untouched JPEG bytes when nothing needs changing
    max_aspect_ratio: float | None = None  # long side / short side above this: rejected (--max-aspect-ratio)
    hashes: tuple[str, ...] = ()  # hashlib names: digests of a kept image's original bytes stored as columns (--hashes)
    dedup: str = ""  # "exact" (a sha256 is needed) or "near" (and a phash) for --dedup; "" without

    @property
    def digests(self) -> tuple[str, ...]:
        """The digests computed for each kept image, in the order ``Processed.digests`` gives them:
        the stored ``hashes``, then what ``dedup`` needs besides."""
        needed = {"": (), "exact": ("sha256",), "near": ("sha256", PHASH)}[self.dedup]
        return self.hashes + tuple(d for d in needed if d not in self.hashes)


HASHES = ("sha256", "md5")  # what --hashes may ask for (md5: what mosaic's LAION pipeline records)
PHASH = "phash"  # the perceptual hash's name among the digests (16 hex digits, 64 bits)
PHASH_MIN_TERMS = 16  # of its 64 frequencies, those that must be non-zero for an image to have a phash


class Processed(NamedTuple):
    """What the resizer returns for one image.

    ``reason`` is ``None`` for a kept image, else the rejection reason counted in stats.
    ``data`` is ``None`` when the caller's original bytes are to be stored as they are: the
    original never crosses the process boundary a second time. From a resize worker it is
    the buffer the new JPEG was received into (a one-piece ``fastfetch.body.Body``).
    """

    reason: str | None
    data: Body | None = None
    width: int = 0
    height: int = 0
    original_width: int = 0
    original_height: int = 0
    digests: str = ""  # a kept image's ``ResizeConfig.digests``, hex, comma-separated


def process_and_hash(data: bytes, cfg: ResizeConfig) -> Processed:
    """``process``, and the digests of a kept image (``cfg.digests``), computed by the process
    that holds its bytes anyway (a resize worker), never in a second pass."""
    out = process(data, cfg)
    if cfg.digests and out.reason is None:
        # usedforsecurity=False: md5 as a content hash, allowed where FIPS mode forbids it for security
        values = [
            out.digests if name == PHASH else hashlib.new(name, data, usedforsecurity=False).hexdigest() for name in cfg.digests
        ]
        out = out._replace(digests=",".join(values))
    return out


def phash(im: Image.Image) -> str:
    """The 64-bit DCT perceptual hash of an image as 16 hex digits (imagehash's ``phash``: near
    copies differ in a few bits, ``hamming`` counts them), then its mean colour as 6 (RRGGBB:
    the hash is of the grey image); "" for an image too plain to have one (a flat colour, a
    one-way gradient: most of its coefficients are zero, and comparing zeros with their median
    would give bits of rounding noise)."""
    import numpy as np  # only a --dedup near run pays for numpy in its workers

    factor = min(im.size) // 64
    if factor >= 2:  # averaged down to 64–127 px first (as a JPEG's 1/8 decode is): the 32×32 comes the same, cheaply
        im = im.reduce(factor)
    small = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = _dct_rows() @ small @ _dct_rows().T  # the 8×8 lowest frequencies of the 2-D DCT-II
    if np.count_nonzero(np.abs(low) > 1e-6 * np.abs(low).max(initial=0.0)) < PHASH_MIN_TERMS:
        return ""
    bits = (low > np.median(low)).ravel()
    colour = np.asarray(im.convert("RGB").resize((8, 8), Image.Resampling.BOX), dtype=np.float64).reshape(-1, 3).mean(axis=0)
    red, green, blue = (int(round(c)) for c in colour)
    return f"{int(''.join('1' if bit else '0' for bit in bits), 2):016x}{red:02x}{green:02x}{blue:02x}"


def hamming(a: str, b: str) -> int:
    """Bits in which two ``phash`` values' hashes differ."""
    return (int(a[:16], 16) ^ int(b[:16], 16)).bit_count()


_DCT: list[object] = []


def _dct_rows() -> Any:
    """The first 8 rows of the (unnormalised, as scipy's) 32-point DCT-II matrix."""
    if not _DCT:
        import numpy as np

        k, n = np.arange(8)[:, None], np.arange(32)[None, :]
        _DCT.append(2 * np.cos(np.pi * k * (2 * n + 1) / 64))
    return _DCT[0]


def target_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """Size with the short side scaled down to ``max_size``, aspect ratio kept (no upscaling)."""
    short = min(width, height)
    if short <= max_size:
        return width, height
    scale = max_size / short
    if width <= height:
        return max_size, max(1, round(height * scale))
    return max(1, round(width * scale)), max_size


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # corrupt EXIF must not reject an otherwise good image
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _ends_with_eoi(data: bytes) -> bool:
    """True when the JPEG ends with its end-of-image marker (padding bytes allowed)."""
    return data[-64:].rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any mode to RGB; transparency is composited on white, 16-bit is scaled to 8-bit."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode.startswith("I;16"):
        # 16-bit greyscale: scale to 0..255 instead of clipping as Pillow's convert does.
        im = im.convert("I").point(lambda v: v / 256).convert("L")
    elif im.mode == "I":
        high = im.getextrema()[1]
        scale = 1 / 256 if isinstance(high, (int, float)) and high > 255 else 1
        im = im.point(lambda v: v * scale).convert("L")
    elif im.mode == "F":
        im = im.convert("L")
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def process(data: bytes, cfg: ResizeConfig) -> Processed:
    """Turn downloaded bytes into the stored JPEG, or into a counted rejection reason. When
    ``cfg`` asks for a ``phash``, a kept image's ``digests`` is that (``process_and_hash`` adds
    the others)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return Processed(R.DECOMPRESSION_BOMB)
    except Image.DecompressionBombWarning:
        return Processed(R.DECOMPRESSION_BOMB)
    except UnidentifiedImageError:
        return Processed(R.NOT_AN_IMAGE)
    except Exception:
        return Processed(R.DECODE_ERROR)
    try:
        return _process_open(im, data, cfg)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return Processed(R.DECOMPRESSION_BOMB)
    except MemoryError:
        return Processed(R.DECOMPRESSION_BOMB)
    except Exception:
        return Processed(R.DECODE_ERROR)
    finally:
        im.close()


def warm_up(cfg: ResizeConfig) -> None:
    """Run one image through decode, resize and encode before real work arrives.

    Pillow loads its format plugins and sets up its codecs on first use, ~10 ms that a resize
    worker would otherwise spend on the first image of a run, while the parent waits for it;
    at start-up the worker has nothing else to do."""
    buf = io.BytesIO()
    side = max(cfg.max_size, cfg.min_size) + 8  # large enough to be resized, not rejected
    Image.new("RGB", (side, side), (128, 128, 128)).save(buf, "JPEG")
    process(buf.getvalue(), cfg)


def _process_open(im: Image.Image, data: bytes, cfg: ResizeConfig) -> Processed:
    raw_w, raw_h = im.size
    if raw_w * raw_h > cfg.max_pixels:
        return Processed(R.DECOMPRESSION_BOMB)
    orientation = _orientation(im)
    swap = orientation in (5, 6, 7, 8)
    width, height = (raw_h, raw_w) if swap else (raw_w, raw_h)
    if min(width, height) < cfg.min_size:
        return Processed(R.TOO_SMALL, original_width=width, original_height=height)
    if cfg.max_aspect_ratio is not None and max(width, height) > cfg.max_aspect_ratio * max(min(width, height), 1):
        return Processed(R.ASPECT_RATIO, original_width=width, original_height=height)

    tw, th = target_size(width, height, cfg.max_size)
    is_jpeg = im.format == "JPEG"
    if (
        cfg.keep_original_jpeg
        and is_jpeg
        and (tw, th) == (width, height)
        and orientation == 1
        and im.mode == "RGB"
        and _ends_with_eoi(data)
    ):
        # Nothing to do: the caller stores its own bytes. A file cut short has no end-of-image
        # marker; such a file takes the full decode below, which rejects it.
        return Processed(None, None, width, height, width, height, _small_phash(im) if PHASH in cfg.digests else "")

    # Work in stored (unrotated) orientation until the end: rotating the small image is cheaper.
    raw_tw, raw_th = (th, tw) if swap else (tw, th)
    if is_jpeg and cfg.reduced_decode and (raw_tw, raw_th) != (raw_w, raw_h):
        # draft picks the largest DCT scale (1/2, 1/4, 1/8) that keeps the image ≥ the target.
        im.draft("RGB", (raw_tw, raw_th))
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    im.load()
    im = _to_rgb(im)
    if im.size != (raw_tw, raw_th):
        im = im.resize((raw_tw, raw_th), RESIZE_FILTERS[cfg.resize_filter], reducing_gap=None)
    if orientation != 1:
        im = im.transpose(_TRANSPOSE[orientation])
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=cfg.quality)
    return Processed(None, out.getvalue(), tw, th, width, height, phash(im) if PHASH in cfg.digests else "")


def _small_phash(im: Image.Image) -> str:
    """The phash of a JPEG not otherwise decoded: at the smallest DCT scale that keeps 32×32."""
    im.draft("RGB", (64, 64))  # in colour: the phash carries the mean colour
    return phash(im)
