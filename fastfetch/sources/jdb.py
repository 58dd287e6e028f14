"""JourneyDB (HF dataset ``JourneyDB/JourneyDB``, gated): one unit per ``data/<split>/imgs/NNN.tgz``.

``--split train valid`` takes both splits in one run, as the seed prepares them (unit ids then
carry the split: ``valid-000``). Prompts come from each split's annotation file, a tgz holding one JSONL (``img_path`` such as
``./000/<hash>.jpg``, ``prompt``), streamed once into a SQLite lookup keyed by file name; the
image tgz itself is unpacked from the response stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from fastfetch.sources.archive_source import CaptionIndex, HubArchiveSource, HubSplitOptions, SplitSource, caption_item
from fastfetch.sources.base import Item, Unit

ANNOTATIONS = {
    "train": "data/train/train_anno_realease_repath.jsonl.tgz",
    "valid": "data/valid/valid_anno_repath.jsonl.tgz",
}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


class JourneyDBSource(SplitSource, HubArchiveSource):
    name = "jdb"
    help = "JourneyDB (gated HF dataset JourneyDB/JourneyDB): Midjourney images with their prompts, one unit per tgz"
    repo = "JourneyDB/JourneyDB"
    Options = HubSplitOptions
    options: HubSplitOptions
    split_names = tuple(ANNOTATIONS)
    default_splits = ("train",)  # the seed prepares valid too, but trains on train only

    async def plan(self) -> list[Unit]:
        units: list[Unit] = []
        several = len(self.splits) > 1
        for split in self.splits:
            units += await self.hub_units(
                f"data/{split}/imgs", r"(\d+)\.tgz", lambda m, split=split: f"{split}-{m.group(1)}" if several else m.group(1)
            )
        await self.lookups()
        return units

    async def lookups(self) -> None:
        self.prompts: dict[str, CaptionIndex] = {split: await self._prompt_index(split) for split in self.splits}

    async def _prompt_index(self, split: str) -> CaptionIndex:
        """Stream the split's annotation tgz once into ``prompts-<split>.sqlite`` (file name → prompt)."""
        prompts = CaptionIndex(self.ctx.work_dir / f"prompts-{split}.sqlite")
        if prompts.ready:
            return prompts
        path = ANNOTATIONS[split]
        url = self.hub_url(path)
        with self.side_errors(url, self.repo), prompts.writer() as add:
            async for member in self.tar_members(url, path.rsplit("/", 1)[-1], self.hub_headers()):
                if member.name.endswith(".jsonl"):
                    async for record in _jsonl(member.chunks()):
                        img, prompt = record.get("img_path"), record.get("prompt")
                        if isinstance(img, str):
                            add(img.rsplit("/", 1)[-1], prompt if isinstance(prompt, str) else None)
        return prompts

    async def items(self, unit: Unit) -> AsyncIterator[Item]:
        split = unit.spec["path"].split("/")[1]  # data/<split>/imgs/NNN.tgz
        prompts = self.prompts[split]
        # every split numbers its tars from 000: a kept copy of another split than train (the
        # default, whose names stay) says its split, or train's and valid's 000.tgz would meet
        name = unit.spec["path"].rsplit("/", 1)[-1]
        async for member in self.unit_tar(unit, name if split == "train" else f"{split}-{name}"):
            base = member.name.rsplit("/", 1)[-1]
            if not base.lower().endswith(IMAGE_EXTS):
                continue
            data = await member.read_body()
            found = prompts.get(base)
            yield caption_item(base.rsplit(".", 1)[0], data or b"", found[0] if found else None, {}, member.problem)

    async def close(self) -> None:
        for prompts in getattr(self, "prompts", {}).values():
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
