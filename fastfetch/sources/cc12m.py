"""CC12M as webdataset tars (HF dataset ``pixparse/cc12m-wds``): one unit per ``cc12m-train-NNNN.tar``.

Each sample is a run of adjacent members sharing a key: ``key.jpg`` (the image), ``key.txt``
(the alt-text caption) and ``key.json`` (url and sizes); the tar is unpacked from the stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson

from fastfetch.archive.tarstream import iter_tar_groups
from fastfetch.sources.archive_source import Edition, HubArchiveSource, caption_item
from fastfetch.sources.base import Item, Unit

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class CC12MSource(HubArchiveSource):
    name = "cc12m"
    help = "CC12M webdataset tars from the HF dataset pixparse/cc12m-wds (2176 tars, ~10M images with alt-text)"
    repo = "pixparse/cc12m-wds"
    columns = {"url": "str"}

    async def plan(self) -> list[Unit]:
        return await self.hub_units("", r"cc12m-train-(\d{4})\.tar", lambda m: f"cc12m-train-{m.group(1)}")

    async def items(self, unit: Unit) -> AsyncIterator[Item]:
        path = unit.spec["path"]
        chunks = self.stream(self.hub_url(path), path.rsplit("/", 1)[-1], self.hub_headers(), Edition.of(unit.spec))
        async for sample in iter_tar_groups(chunks, lambda ext: ext in IMAGE_EXTS or ext in ("txt", "json")):
            image = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
            if image is None:
                continue  # a caption without an image is not a candidate
            key = sample["__key__"].decode()
            meta = _json(sample.get("json"))
            caption = sample["txt"].decode("utf-8", "replace") if "txt" in sample else None
            problem = sample["__problem__"].decode() if "__problem__" in sample else None
            yield caption_item(key, image, caption, {"url": str(meta.get("url") or "")}, problem)


def _json(data: bytes | None) -> dict:
    try:
        value = orjson.loads(data) if data else {}
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
