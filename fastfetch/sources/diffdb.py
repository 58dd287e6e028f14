"""DiffusionDB Large (HF dataset ``poloclub/diffusiondb``): one unit per ``part-NNNNNN.zip``.

Parts 1–10000 live in ``diffusiondb-large-part-1/``, 10001–14000 in ``diffusiondb-large-part-2/``;
each zip holds ~1000 lossless WebP images (and ``part-NNNNNN.json``, unused). Zips are read by
ranged requests (central directory, then the members kept), never saved.

As the seed converts it: ``metadata-large.parquet`` (read once into a SQLite lookup) decides.
An image it does not list is dropped (``unlisted``); the caption is its ``prompt``; an image
whose ``image_nsfw`` or ``prompt_nsfw`` is above ``--max-nsfw`` (default 0.2; ``none`` keeps
all) is dropped (``nsfw``); an unknown (NaN) score does not drop it, as in the seed.
"""

from __future__ import annotations

import argparse
import asyncio
import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastfetch.archive.ziprange import iter_zip, zip_entries
from fastfetch.arrow import pq
from fastfetch.errors import Reason as R
from fastfetch.errors import UsageError
from fastfetch.sources.archive_source import CaptionIndex, Edition, HubArchiveSource, HubOptions, caption_item
from fastfetch.sources.base import Item, Unit, flag

FOLDERS = ("diffusiondb-large-part-1", "diffusiondb-large-part-2")
METADATA = "metadata-large.parquet"
IMAGE_EXTS = (".webp", ".png", ".jpg", ".jpeg")
DEFAULT_MAX_NSFW = 0.2  # the seed's safety threshold


def nsfw_limit(value: str) -> float | None:
    """``--max-nsfw``: a score in 0..1, or ``none`` for no limit."""
    if value.strip().lower() in ("none", "off"):
        return None
    try:
        limit = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a score in 0..1 nor 'none'") from None
    if not 0 <= limit <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not within 0..1 (or 'none' for no limit)")
    return limit


@dataclass(frozen=True, slots=True)
class DiffusionDBOptions(HubOptions):
    max_nsfw: float | None = flag(
        DEFAULT_MAX_NSFW,
        type=nsfw_limit,
        help="diffdb: drop images whose image_nsfw or prompt_nsfw score is above this (0..1, as the seed: 0.2); none keeps all",
    )


class DiffusionDBSource(HubArchiveSource):
    name = "diffdb"
    help = "DiffusionDB Large (HF dataset poloclub/diffusiondb): 14000 zips of 1000 Stable Diffusion images with prompts"
    repo = "poloclub/diffusiondb"
    columns = {"image_nsfw": "float64", "prompt_nsfw": "float64"}

    Options = DiffusionDBOptions
    options: DiffusionDBOptions

    def fingerprint(self) -> dict[str, Any]:
        return {"max_nsfw": self.options.max_nsfw, "listed_only": True}

    async def plan(self) -> list[Unit]:
        units: list[Unit] = []
        for folder in FOLDERS:
            try:
                units += await self.hub_units(folder, r"part-(\d{6})\.zip", lambda m: f"part-{m.group(1)}")
            except UsageError:
                if folder == FOLDERS[0]:
                    raise  # part 2 may be absent from a mirror; part 1 may not
        units.sort(key=lambda u: u.id)
        await self.lookups()
        return units

    async def lookups(self) -> None:
        """``metadata-large.parquet`` → ``metadata.sqlite`` (image name → prompt, nsfw scores)."""
        self.metadata = CaptionIndex(self.ctx.work_dir / "metadata.sqlite")
        if self.metadata.ready:
            return
        path = await self.hub_side_file(METADATA)
        with self.side_errors(str(path)):
            await asyncio.to_thread(self.metadata.build, _metadata_rows(path))
        if self.keep_dir is None:
            path.unlink()  # the lookup holds what we need; the parquet is GBs

    async def items(self, unit: Unit) -> AsyncIterator[Item]:
        path = unit.spec["path"]
        name = path.rsplit("/", 1)[-1]
        limit = self.options.max_nsfw
        async with self.random_access(self.hub_url(path), name, self.hub_headers(), Edition.of(unit.spec)) as f:
            wanted, listed = [], {}
            for entry in await zip_entries(f):
                base = entry.name.rsplit("/", 1)[-1]
                if not base.lower().endswith(IMAGE_EXTS):
                    continue
                key = base.rsplit(".", 1)[0]
                found = self.metadata.get(base)
                if found is None:  # the seed writes only what the metadata lists
                    yield Item(key, None, data=b"", extra=UNKNOWN, reject=R.UNLISTED)
                    continue
                scores = {k: _score(found[1].get(k)) for k in ("image_nsfw", "prompt_nsfw")}
                if limit is not None and any(v > limit for v in scores.values()):  # NaN > x is False
                    yield Item(key, found[0], data=b"", extra=scores, reject=R.NSFW)  # never read
                    continue
                wanted.append(entry)
                listed[entry.name] = (found[0], scores)
            async for member in iter_zip(f, wanted):
                key = member.name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
                caption, scores = listed[member.name]
                yield caption_item(key, member.data or b"", caption, scores, member.problem)

    async def close(self) -> None:
        metadata = getattr(self, "metadata", None)
        if metadata is not None:
            metadata.close()


def _metadata_rows(path: Path) -> Iterator[tuple[str, str | None, dict[str, Any]]]:
    """(image name, prompt, scores) rows of the metadata parquet, read a batch at a time."""
    wanted = ["image_name", "prompt", "image_nsfw", "prompt_nsfw"]
    f = pq.ParquetFile(path)
    columns = [c for c in wanted if c in f.schema_arrow.names]
    if "image_name" not in columns:
        raise UsageError(f"{path} has no image_name column (columns: {f.schema_arrow.names})")
    for batch in f.iter_batches(batch_size=65536, columns=columns):
        data = batch.to_pydict()
        n = batch.num_rows
        for i in range(n):
            yield (
                data["image_name"][i],
                data["prompt"][i] if "prompt" in data else None,
                {k: data[k][i] for k in ("image_nsfw", "prompt_nsfw") if k in data},
            )


UNKNOWN = {"image_nsfw": math.nan, "prompt_nsfw": math.nan}


def _score(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan
