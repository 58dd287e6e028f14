"""DiffusionDB Large (HF dataset ``poloclub/diffusiondb``): one unit per ``part-NNNNNN.zip``.

Parts 1–10000 live in ``diffusiondb-large-part-1/``, 10001–14000 in ``diffusiondb-large-part-2/``;
each zip holds ~1000 lossless WebP images and ``part-NNNNNN.json`` (file name → {p: prompt, se,
c, st, sa}). Zips are read by ranged requests (central directory, then members), never saved.
The NSFW scores live only in ``metadata-large.parquet``, read once into a SQLite lookup; with
``--max-nsfw`` an image whose image or prompt score is above it is dropped and counted ``nsfw``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson

from fastfetch.archive import iter_zip, read_zip_member, zip_entries
from fastfetch.lists import pq
from fastfetch.sources.archived import Edition, CaptionIndex, HubArchiveSource, caption_item
from fastfetch.errors import UsageError
from fastfetch.sources.base import Item, Unit

FOLDERS = ("diffusiondb-large-part-1", "diffusiondb-large-part-2")
METADATA = "metadata-large.parquet"
IMAGE_EXTS = (".webp", ".png", ".jpg", ".jpeg")


class DiffusionDBSource(HubArchiveSource):
    name = "diffdb"
    help = "DiffusionDB Large (HF dataset poloclub/diffusiondb): 14000 zips of 1000 Stable Diffusion images with prompts"
    repo = "poloclub/diffusiondb"
    columns = {"image_nsfw": "float64", "prompt_nsfw": "float64"}

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        super().add_arguments(group)
        group.add_argument(
            "--max-nsfw", type=float, default=None,
            help="diffdb: drop images whose image_nsfw or prompt_nsfw score is above this (0..1; default: keep all)",
        )

    def fingerprint(self) -> dict[str, Any]:
        return {"max_nsfw": self.args.max_nsfw}

    async def plan(self) -> list[Unit]:
        if self.args.max_nsfw is not None and not 0 <= self.args.max_nsfw <= 1:
            raise UsageError(f"--max-nsfw must be within 0..1 (got {self.args.max_nsfw})")
        units: list[Unit] = []
        for folder in FOLDERS:
            try:
                units += await self.hub_units(folder, r"part-(\d{6})\.zip", lambda m: f"part-{m.group(1)}")
            except UsageError:
                if folder == FOLDERS[0]:
                    raise  # part 2 may be absent from a mirror; part 1 may not
        units.sort(key=lambda u: u.id)
        await self._metadata_index()
        return units

    async def _metadata_index(self) -> None:
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
        limit = self.args.max_nsfw
        async with self.random_access(self.hub_url(path), name, self.hub_headers(), Edition.of(unit.spec)) as f:
            entries = await zip_entries(f)
            part: dict[str, Any] = {}
            for entry in entries:
                if entry.name.endswith(".json"):
                    part.update(_dict(orjson.loads(await read_zip_member(f, entry))))
            images = [e for e in entries if e.name.lower().endswith(IMAGE_EXTS)]
            async for member in iter_zip(f, images):
                base = member.name.rsplit("/", 1)[-1]
                key = base.rsplit(".", 1)[0]
                found = self.metadata.get(base)
                caption = _dict(part.get(base)).get("p") or (found[0] if found else None)
                scores = {k: _score((found[1] if found else {}).get(k)) for k in ("image_nsfw", "prompt_nsfw")}
                if member.data is None:
                    yield Item(key, caption, data=b"", extra=scores, reject=member.problem)
                    continue
                reject = None
                if limit is not None and any(v > limit for v in scores.values() if not math.isnan(v)):
                    reject = "nsfw"
                yield caption_item(key, member.data, caption, scores, reject)

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


def _score(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
