"""What an image MDS row looks like: fastfetch's own columns, or mosaicml's LAION layout.

``--format mosaic`` writes what mosaicml/diffusion's LAION pipeline writes (img2dataset, then
``scripts/laion_cloudwriter.py``) so that its ``StreamingLAIONDataset`` and its latent
precompute script read our output unchanged:

* its sixteen columns with its types: ``jpg`` as MDS ``bytes`` (the image file itself; the
  shards hold the same bytes as fastfetch's ``jpeg`` column, only the declared encoding
  differs), ``caption``, ``url``, ``key``, ``status`` (``success``), ``error_message`` and
  ``exif`` (empty: fastfetch keeps no EXIF), ``width``/``height`` of the stored image,
  ``original_width``/``original_height``, ``punsafe``/``pwatermark``/``similarity`` (NaN when
  the list has none, as a missing value reaches its writer), ``aesthetic_score`` (0.0 when the
  row has no ``AESTHETIC_SCORE``: mosaic's writer stores 0.0 for a file without that column and
  NaN for a null in one that has it, a distinction a merged list no longer carries) and ``hash``
  (the list's int64 ``hash`` column; 0 when absent or outside int64, a float truncated);
* its resolution buckets: folders ``0-64``, ``64-128``, …, ``1024-1048576`` under the MDS root,
  an image going to the one whose [low, high) range holds its short side. Mosaic stores images
  unresized, so its stored and original sizes are equal; fastfetch buckets by the original short
  side, so an image lands in the folder mosaic would put it in even when ``--max-size`` shrank it.

Columns a source adds beyond these (``image_id`` …) are kept under their own names.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any


class OutputFormat(str, Enum):
    FASTFETCH = "fastfetch"
    MOSAIC = "mosaic"


MOSAIC_COLUMNS: dict[str, str] = {
    "punsafe": "float64",
    "pwatermark": "float64",
    "similarity": "float64",
    "caption": "str",
    "url": "str",
    "key": "str",
    "status": "str",
    "error_message": "str",
    "width": "int32",
    "height": "int32",
    "original_width": "int32",
    "original_height": "int32",
    "exif": "str",
    "jpg": "bytes",
    "hash": "int64",
    "aesthetic_score": "float64",
}
MOSAIC_BUCKETS = (0, 64, 128, 256, 512, 768, 1024)
MOSAIC_TOP = 1 << 20  # the upper bound of mosaic's last bucket
#: list columns mosaic's writer reads its aesthetic score from, in order of preference
AESTHETIC_SOURCES = ("aesthetic_score", "AESTHETIC_SCORE", "aesthetic")
#: list columns the mosaic format turns into its own (kept from a URL list by default, where present)
MOSAIC_LIST_COLUMNS = ("similarity", "punsafe", "pwatermark", "hash", *AESTHETIC_SOURCES)
CONSUMED = set(MOSAIC_LIST_COLUMNS)
#: mosaic columns fastfetch fills itself: a list column may not be kept under one of these names
MOSAIC_WRITTEN = frozenset(set(MOSAIC_COLUMNS) - CONSUMED)


def columns(fmt: OutputFormat, base: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """The MDS columns of a run: ``base`` (fastfetch's own) and the source's ``extra``."""
    if fmt is OutputFormat.FASTFETCH:
        return {**base, **extra}
    return {**MOSAIC_COLUMNS, **{k: v for k, v in extra.items() if k not in CONSUMED and k not in MOSAIC_COLUMNS}}


def to_mosaic(row: dict[str, Any], listed: dict[str, Any]) -> dict[str, Any]:
    """A fastfetch row as mosaic's LAION writer would store it; ``listed`` holds the list's
    kept columns as read (its scores and hash, whatever their names and kinds)."""
    scores = [_float(listed.get(k)) for k in AESTHETIC_SOURCES]
    out = {k: v for k, v in row.items() if k not in CONSUMED}
    out.update(
        punsafe=_float(listed.get("punsafe")),
        pwatermark=_float(listed.get("pwatermark")),
        similarity=_float(listed.get("similarity")),
        hash=_int(listed.get("hash")),
        aesthetic_score=next((v for v in scores if not math.isnan(v)), 0.0),
        status="success",
        error_message="",
        exif="",
        url=row.get("url") or "",
    )
    return out


def bucket_name(fmt: OutputFormat, bounds: tuple[int, ...], low: int) -> str:
    """The folder of the bucket starting at ``low``: ``short-0512``, or mosaic's ``512-768``."""
    if fmt is OutputFormat.FASTFETCH:
        return f"short-{low:04d}"
    higher = [b for b in bounds if b > low]
    return f"{low}-{higher[0] if higher else MOSAIC_TOP}"


def _float(value: Any) -> float:
    try:
        return float(value) if value is not None and not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        return math.nan


def _int(value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return 0
    return number if -(1 << 63) <= number < (1 << 63) else 0
