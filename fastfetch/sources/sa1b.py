"""SA-1B (Meta's Segment Anything images) with the LLaVA captions of PixArt-alpha.

Meta hands out expiring CDN links in a links file (``file_name<TAB>cdn_link``, one header
line); each ``sa_NNNNNN.tar`` (~11 GB, ~11k images) holds ``sa_N.jpg`` + ``sa_N.json`` (masks,
never read). Captions come from ``SA1B_caption.tar.gz`` of the HF dataset
``PixArt-alpha/SAM-LLaVA-Captions10M`` (``sa_N.txt``), streamed once into a SQLite lookup.
A unit's spec holds the file name only: links expire and change, the archive does not.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastfetch.errors import UsageError
from fastfetch.ranged import AccessDenied
from fastfetch.sources.archive_source import CaptionIndex, HubArchiveSource, HubOptions, caption_item
from fastfetch.sources.base import Item, Unit, flag

LINKS_PAGE = "https://ai.meta.com/datasets/segment-anything-downloads/"
LINKS_NAME = "segment_anything_links.txt"
CAPTION_FILE = "SA1B_caption.tar.gz"
_TAR = re.compile(r"sa_(\d+)\.tar")
_IMAGE = re.compile(r"(?:.*/)?(sa_(\d+))\.jpg")


@dataclass(frozen=True, slots=True)
class SA1BOptions(HubOptions):
    links: Path | None = flag(
        None,
        type=Path,
        help=f"sa1b: Meta's links file (default: {LINKS_NAME} in --out, else in the current folder); get it from {LINKS_PAGE}",
    )

    def resolved(self) -> SA1BOptions:
        return dataclasses.replace(self, links=self.links.expanduser().absolute() if self.links else None)


class SA1BSource(HubArchiveSource):
    name = "sa1b"
    help = "SA-1B from Meta's links file (1000 tars of ~11k images, ~10 GB each) with the PixArt LLaVA captions"
    repo = "PixArt-alpha/SAM-LLaVA-Captions10M"
    columns = {"image_id": "int64"}

    Options = SA1BOptions
    options: SA1BOptions

    def links_path(self) -> Path:
        links = self.options.links
        if links is not None:
            if not links.is_file():
                raise UsageError(f"--links {links}: no such file. Download the links file from {LINKS_PAGE}")
            return links
        for candidate in (self.ctx.local_root / LINKS_NAME, Path.cwd() / LINKS_NAME):
            if candidate.is_file():
                return candidate
        raise UsageError(
            f"--dataset sa1b needs Meta's links file: accept the terms at {LINKS_PAGE}, download "
            f"{LINKS_NAME} and pass --links PATH (or put it in {self.ctx.local_root} or the current folder). "
            "The links expire after a few days; download a fresh file when they do"
        )

    def read_links(self) -> dict[str, str]:
        """file name → URL from the links file (tab-separated, one header line; blank lines ok)."""
        path = self.links_path()
        links: dict[str, str] = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            parts = line.strip().split("\t") if "\t" in line else line.split()
            if len(parts) < 2 or (n == 0 and not _TAR.fullmatch(parts[0])):
                continue
            name, url = parts[0].strip(), parts[1].strip()
            if _TAR.fullmatch(name):
                links[name] = url
        if not links:
            raise UsageError(f"{path} lists no sa_NNNNNN.tar links; download the links file from {LINKS_PAGE}")
        return links

    async def plan(self) -> list[Unit]:
        self.links = self.read_links()
        await self.lookups()
        names = sorted(self.links, key=lambda n: int(_TAR.fullmatch(n).group(1)))  # type: ignore[union-attr]
        return [Unit(name[: -len(".tar")], {"file": name}) for name in names]

    def unit_payload(self, unit: Unit) -> str:
        return self.links[unit.spec["file"]]  # the links file is the driver's; its links expire

    async def prepare_unit(self, unit: Unit, payload: Any) -> None:
        self.links = {unit.spec["file"]: payload} if isinstance(payload, str) else self.read_links()
        await super().prepare_unit(unit, payload)

    async def lookups(self) -> None:
        """Stream SA1B_caption.tar.gz once into ``captions.sqlite`` (sa_N → caption)."""
        self.captions = CaptionIndex(self.ctx.work_dir / "captions.sqlite")
        if self.captions.ready:
            return
        url, headers = self.hub_url(CAPTION_FILE), self.hub_headers()
        with self.side_errors(url, self.repo), self.captions.writer() as add:
            async for member in self.tar_members(url, CAPTION_FILE, headers):
                base = member.name.rsplit("/", 1)[-1]
                if base.startswith("sa_") and base.endswith(".txt"):
                    data = await member.read(1 << 20)
                    if data is not None:
                        add(base[: -len(".txt")], data.decode("utf-8", "replace"))

    async def items(self, unit: Unit) -> AsyncIterator[Item]:
        name = unit.spec["file"]
        try:
            async for member in self.tar_members(self.links[name], name):
                match = _IMAGE.fullmatch(member.name)
                if match is None:
                    continue  # the masks JSON: skipped in the stream, never held
                data = await member.read_body()
                found = self.captions.get(match.group(1))
                yield caption_item(
                    match.group(1), data or b"", found[0] if found else None, {"image_id": int(match.group(2))}, member.problem
                )
        except AccessDenied as exc:
            raise RuntimeError(
                f"the link for {name} was refused (HTTP {exc.status}); Meta's links expire: download a fresh "
                f"links file from {LINKS_PAGE} and rerun"
            ) from exc

    async def close(self) -> None:
        captions = getattr(self, "captions", None)
        if captions is not None:
            captions.close()
