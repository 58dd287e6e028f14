"""MS-COCO 2014 captions (val by default, for evaluation) from the COCO site or a mirror.

The unit is ``zips/val2014.zip`` (~6 GB, 40k images ``val2014/COCO_val2014_<id>.jpg``), read by
ranged requests; captions come from ``annotations/captions_val2014.json`` inside
``annotations/annotations_trainval2014.zip``, of which only that member is fetched (by ranges),
and are turned into a SQLite lookup keyed by file name. The caption is the first annotation of an
image; all of them are kept as JSON, with the COCO image id.

As an evaluation (FID) reference, the dataset keeps every image by default: ``--min-size``
defaults to 0 here (the seed keeps all 40,504 val2014 images); ``--max-size`` still applies.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from fastfetch.archive.ziprange import iter_zip, read_zip_member, zip_entries
from fastfetch.errors import UsageError
from fastfetch.sources.archive_source import (
    ArchiveOptions,
    ArchiveSource,
    CaptionIndex,
    Edition,
    SplitSource,
    caption_item,
    split_flag,
)
from fastfetch.sources.base import Item, Unit, flag

DEFAULT_BASE = "http://images.cocodataset.org"
ANNOTATIONS = "annotations/annotations_trainval2014.zip"


@dataclass(frozen=True, slots=True)
class CocoOptions(ArchiveOptions):
    split: tuple[str, ...] | None = split_flag()
    coco_base_url: str = flag(
        DEFAULT_BASE,
        help="coco: where zips/<split>2014.zip and annotations/annotations_trainval2014.zip live (a mirror)",
    )


class CocoSource(SplitSource, ArchiveSource):
    name = "coco"
    help = "MS-COCO 2014 captions (val2014 by default: 40k images, 6.2 GB zip) from images.cocodataset.org"
    columns = {"image_id": "int64", "captions": "json"}
    default_min_size = 0
    split_names = ("val", "train")
    default_splits = ("val",)

    Options = CocoOptions
    options: CocoOptions

    def url(self, path: str) -> str:
        return f"{self.options.coco_base_url.rstrip('/')}/{path}"

    async def plan(self) -> list[Unit]:
        units = []
        for split in self.splits:
            path = f"zips/{split}2014.zip"
            validator, _ = await self.check_access(self.url(path))
            spec = {"path": path, "size": validator.length, "etag": validator.etag or validator.last_modified}
            units.append(Unit(f"{split}2014", spec))
        await self.lookups()
        return units

    async def lookups(self) -> None:
        self.captions: dict[str, CaptionIndex] = {split: await self._caption_index(split) for split in self.splits}

    async def _caption_index(self, split: str) -> CaptionIndex:
        """``captions_<split>2014.json`` (one member of the annotations zip) → ``captions-<split>.sqlite``."""
        captions = CaptionIndex(self.ctx.work_dir / f"captions-{split}.sqlite")
        if captions.ready:
            return captions
        member = f"annotations/captions_{split}2014.json"
        url = self.url(ANNOTATIONS)
        with self.side_errors(url):
            async with self.random_access(url, ANNOTATIONS.rsplit("/", 1)[-1]) as f:
                entry = next((e for e in await zip_entries(f) if e.name == member), None)
                if entry is None:
                    raise UsageError(f"{url} has no {member}")
                data = await read_zip_member(f, entry)
            await asyncio.to_thread(captions.build, _caption_rows(orjson.loads(data)))
        return captions

    async def items(self, unit: Unit) -> AsyncIterator[Item]:
        path = unit.spec["path"]
        captions = self.captions[unit.id.removesuffix("2014")]
        async with self.random_access(self.url(path), path.rsplit("/", 1)[-1], edition=Edition.of(unit.spec)) as f:
            images = [e for e in await zip_entries(f) if e.name.lower().endswith(".jpg")]
            async for member in iter_zip(f, images):
                base = member.name.rsplit("/", 1)[-1]
                found = captions.get(base)
                caption, extra = (found[0], found[1]) if found else (None, {})
                extra = {"image_id": int(extra.get("image_id", _id_from_name(base))), "captions": extra.get("captions", [])}
                if member.data is None:
                    yield Item(base, caption or "", data=b"", extra=extra, reject=member.problem)
                else:
                    yield caption_item(base, member.data, caption, extra)

    async def close(self) -> None:
        for captions in getattr(self, "captions", {}).values():
            captions.close()


def _caption_rows(doc: dict[str, Any]) -> Iterator[tuple[str, str | None, dict[str, Any]]]:
    """(file name, first caption, {image_id, captions}) per image, captions in annotation order."""
    by_image: dict[int, list[str]] = {}
    for ann in doc.get("annotations", []):
        text = ann.get("caption")
        if isinstance(text, str) and text.strip():
            by_image.setdefault(ann["image_id"], []).append(text.strip())
    for image in doc.get("images", []):
        captions = by_image.get(image["id"], [])
        yield image["file_name"], captions[0] if captions else None, {"image_id": image["id"], "captions": captions}


def _id_from_name(name: str) -> int:
    digits = "".join(ch for ch in name.rsplit("_", 1)[-1] if ch.isdigit())
    return int(digits) if digits else -1
