"""JourneyDB (HF dataset ``JourneyDB/JourneyDB``, gated): one unit per ``data/<split>/imgs/NNN.tgz``.

Prompts come from the split's annotation file, a tgz holding one JSONL (``img_path`` such as
``./000/<hash>.jpg``, ``prompt``), streamed once into a SQLite lookup keyed by file name; the
image tgz itself is unpacked from the response stream.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Any

import orjson

from fastfetch.sources.archived import CaptionIndex, HubArchiveSource, add_split_flag, caption_item, split_of
from fastfetch.sources.base import Item, Unit

ANNOTATIONS = {
    "train": "data/train/train_anno_realease_repath.jsonl.tgz",
    "valid": "data/valid/valid_anno_repath.jsonl.tgz",
}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


class JourneyDBSource(HubArchiveSource):
    name = "jdb"
    help = "JourneyDB (gated HF dataset JourneyDB/JourneyDB): Midjourney images with their prompts, one unit per tgz"
    repo = "JourneyDB/JourneyDB"

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        super().add_arguments(group)
        add_split_flag(group)

    @property
    def split(self) -> str:
        return split_of(self.args, ("train", "valid"), self.name)

    def fingerprint(self) -> dict[str, Any]:
        return {"split": self.split}

    async def plan(self) -> list[Unit]:
        units = await self.hub_units(f"data/{self.split}/imgs", r"(\d+)\.tgz", lambda m: m.group(1))
        await self._prompt_index()
        return units

    async def _prompt_index(self) -> None:
        """Stream the split's annotation tgz once into ``prompts-<split>.sqlite`` (file name → prompt)."""
        self.prompts = CaptionIndex(self.ctx.work_dir / f"prompts-{self.split}.sqlite")
        if self.prompts.ready:
            return
        path = ANNOTATIONS[self.split]
        url = self.hub_url(path)
        with self.side_errors(url, self.repo), self.prompts.writer() as add:
            async for member in self.tar_members(url, path.rsplit("/", 1)[-1], self.hub_headers()):
                if member.name.endswith(".jsonl"):
                    async for record in _jsonl(member.chunks()):
                        img, prompt = record.get("img_path"), record.get("prompt")
                        if isinstance(img, str):
                            add(img.rsplit("/", 1)[-1], prompt if isinstance(prompt, str) else None)

    async def items(self, unit: Unit) -> AsyncIterator[Item]:
        async for member in self.unit_tar(unit):
            base = member.name.rsplit("/", 1)[-1]
            if not base.lower().endswith(IMAGE_EXTS):
                continue
            data = await member.read_body()
            found = self.prompts.get(base)
            yield caption_item(base.rsplit(".", 1)[0], data or b"", found[0] if found else None, {}, member.problem)

    async def close(self) -> None:
        prompts = getattr(self, "prompts", None)
        if prompts is not None:
            prompts.close()


async def _jsonl(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """JSON objects of a JSONL stream, line by line (bad lines skipped)."""
    pending = b""
    async for chunk in chunks:
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            record = _loads(line)
            if record is not None:
                yield record
    record = _loads(pending)
    if record is not None:
        yield record


def _loads(line: bytes) -> dict[str, Any] | None:
    line = line.strip()
    if not line:
        return None
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
