"""TextCaps (HF dataset ``lmms-lab/TextCaps``): one unit per ``data/<split>-NNNNN-of-MMMMM.parquet``.

By default the train and val splits together, as the seed uses them (its train+validation).

Each row holds one image with its bytes embedded (``image.bytes``), ``image_id`` and the five
human ``reference_strs``; the caption is the first reference, and all of them are kept as JSON.
A parquet file cannot be read from a stream, so each unit's file is spooled to the work dir
and deleted when the unit is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastfetch.arrow import pq
from fastfetch.errors import Reason as R
from fastfetch.sources.archive_source import Edition, HubArchiveSource, HubSplitOptions, SplitSource, caption_item
from fastfetch.sources.base import Item, Unit

SPLITS = ("train", "val", "test")


class TextCapsSource(SplitSource, HubArchiveSource):
    name = "textcaps"
    help = "TextCaps (HF dataset lmms-lab/TextCaps): 28k images with text in them, 5 reference captions each"
    repo = "lmms-lab/TextCaps"
    Options = HubSplitOptions
    options: HubSplitOptions
    columns = {"image_id": "str", "captions": "json"}
    split_names = SPLITS
    default_splits = ("train", "val")  # the seed's train+validation

    async def plan(self) -> list[Unit]:
        units: list[Unit] = []
        for split in self.splits:
            pattern = rf"{split}-(\d{{5}})-of-\d{{5}}\.parquet"
            units += await self.hub_units("data", pattern, lambda m, split=split: f"{split}-{m.group(1)}")
        return units

    async def items(self, unit: Unit) -> AsyncIterator[Item]:
        path = unit.spec["path"]
        async with self.spooled(self.hub_url(path), path.rsplit("/", 1)[-1], self.hub_headers(), Edition.of(unit.spec)) as local:
            f = pq.ParquetFile(local)
            columns = [c for c in ("image", "image_id", "reference_strs", "caption_str") if c in f.schema_arrow.names]
            seen: set[str] = set()
            for group in range(f.num_row_groups):
                table = await asyncio.to_thread(f.read_row_group, group, columns=columns)
                rows = table.to_pylist()
                for row in rows:
                    image_id = str(row.get("image_id") or "")
                    refs = [r for r in (row.get("reference_strs") or []) if isinstance(r, str) and r.strip()]
                    caption = refs[0] if refs else row.get("caption_str")
                    image = row.get("image") or {}
                    data = image.get("bytes") if isinstance(image, dict) else None
                    reject = R.DUPLICATE if image_id in seen else None if data else R.NO_IMAGE
                    seen.add(image_id)
                    yield caption_item(image_id, data or b"", caption, {"image_id": image_id, "captions": refs}, reject)
