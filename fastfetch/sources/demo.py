"""The bundled demo: images drawn at run time, served by the command itself on 127.0.0.1.

It exists so that a new user with no internet sees the whole flow (fetch, resize, reject,
MDS, summary) in seconds. The mix imitates the web: JPEGs of many sizes, progressive JPEGs,
PNGs with alpha and palettes, WebP, greyscale, CMYK, rotated EXIF, images too small to keep,
files that are not images, truncated files and dead links.
"""

from __future__ import annotations

import io
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import orjson
from PIL import Image, ImageDraw

from fastfetch.sources.base import Item, SourceOptions, Unit
from fastfetch.sources.urls import UrlsOptions, UrlsSource

_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 210),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "teal": (30, 160, 160),
    "pink": (240, 120, 170),
}
_SHAPES = ("circle", "square", "triangle", "ring")


def _draw(rng: random.Random, width: int, height: int) -> tuple[Image.Image, str]:
    """A gradient background with a few shapes, and a caption that describes it."""
    bg_name, fg_name = rng.sample(sorted(_COLOURS), 2)
    bg, fg = _COLOURS[bg_name], _COLOURS[fg_name]
    top = Image.new("RGB", (1, 2))
    top.putpixel((0, 0), bg)
    top.putpixel((0, 1), tuple(c // 3 for c in bg))
    im = top.resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(im)
    shape = rng.choice(_SHAPES)
    count = rng.randint(1, 4)
    for _ in range(count):
        r = rng.randint(min(width, height) // 10, min(width, height) // 4)
        x, y = rng.randint(r, width - r), rng.randint(r, height - r)
        box = (x - r, y - r, x + r, y + r)
        if shape == "circle":
            draw.ellipse(box, fill=fg)
        elif shape == "square":
            draw.rectangle(box, fill=fg)
        elif shape == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fg)
        else:
            draw.ellipse(box, outline=fg, width=max(2, r // 5))
    noun = shape if count == 1 else shape + "s"
    return im, f"{count} {fg_name} {noun} on a {bg_name} gradient"


def _encode(im: Image.Image, kind: str) -> tuple[bytes, str]:
    out = io.BytesIO()
    if kind == "jpeg":
        im.save(out, "JPEG", quality=90)
    elif kind == "progressive":
        im.save(out, "JPEG", quality=90, progressive=True)
    elif kind == "grey":
        im.convert("L").save(out, "JPEG", quality=90)
    elif kind == "cmyk":
        im.convert("CMYK").save(out, "JPEG", quality=90)
    elif kind == "rotated":
        exif = Image.Exif()
        exif[0x0112] = 6
        im.transpose(Image.Transpose.ROTATE_90).save(out, "JPEG", quality=90, exif=exif)
    elif kind == "png_alpha":
        rgba = im.convert("RGBA")
        rgba.putalpha(200)
        rgba.save(out, "PNG")
    elif kind == "png_palette":
        im.convert("P", palette=Image.Palette.ADAPTIVE).save(out, "PNG")
    elif kind == "webp":
        im.save(out, "WEBP", quality=85)
    else:
        raise ValueError(kind)
    return out.getvalue(), "image/png" if kind.startswith("png") else "image/webp" if kind == "webp" else "image/jpeg"


def build_demo(seed: int = 0) -> tuple[dict[str, tuple[bytes, str]], list[dict[str, str]]]:
    """The served files (path → (bytes, content type)) and the URL list rows (path-only URLs)."""
    rng = random.Random(seed)
    files: dict[str, tuple[bytes, str]] = {}
    rows: list[dict[str, str]] = []
    plan = [
        ("jpeg", 48),
        ("progressive", 8),
        ("grey", 6),
        ("cmyk", 4),
        ("rotated", 4),
        ("png_alpha", 8),
        ("png_palette", 4),
        ("webp", 8),
    ]
    n = 0
    for kind, count in plan:
        for _ in range(count):
            short = rng.choice([rng.randint(280, 512), rng.randint(513, 1400), rng.randint(100, 250)])
            long = int(short * rng.uniform(1.0, 1.8))
            w, h = (long, short) if rng.random() < 0.6 else (short, long)
            im, caption = _draw(rng, w, h)
            data, ctype = _encode(im, kind)
            ext = {"image/png": "png", "image/webp": "webp"}.get(ctype, "jpg")
            path = f"/img/{n:04d}.{ext}"
            files[path] = (data, ctype)
            rows.append({"url": path, "caption": caption})
            n += 1
    # Deliberately bad items: not an image, a truncated JPEG, dead links, no caption.
    files["/img/page.jpg"] = (b"<html><body>not an image</body></html>", "image/jpeg")
    rows.append({"url": "/img/page.jpg", "caption": "an HTML page served as a JPEG"})
    good = files["/img/0000.jpg"][0]
    files["/img/truncated.jpg"] = (good[: len(good) // 2], "image/jpeg")
    rows.append({"url": "/img/truncated.jpg", "caption": "a JPEG cut in half"})
    for i in range(4):
        rows.append({"url": f"/missing/{i}.jpg", "caption": "a link that died"})
    files["/img/uncaptioned.jpg"] = files["/img/0000.jpg"]
    rows.append({"url": "/img/uncaptioned.jpg", "caption": ""})
    return files, rows


class DemoSource(UrlsSource):
    name = "demo"
    help = "the bundled demo: ~100 generated images of mixed formats, sizes and faults, served on 127.0.0.1"

    Options: ClassVar[type[SourceOptions]] = SourceOptions  # no flags of its own
    serves_locally = True

    async def open(self) -> None:
        files, rows = build_demo()
        self.ctx.work_dir.mkdir(parents=True, exist_ok=True)
        listing = self.ctx.work_dir / "demo.jsonl"
        listing.write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n")
        self.options = UrlsOptions(urls=(str(listing),))

        from aiohttp import web  # the server side of aiohttp: only the demo needs it

        async def serve(request: web.Request) -> web.Response:
            found = files.get(request.path)
            if found is None:
                raise web.HTTPNotFound()
            return web.Response(body=found[0], content_type=found[1])

        app = web.Application()
        app.router.add_get("/{tail:.*}", serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        await self._runner.cleanup()

    @property
    def plan_dir(self) -> Path:
        return self.ctx.work_dir / "plan"

    async def items(self, unit: Unit) -> AsyncIterator[Item]:
        # The list holds paths only, so the plan stays the same whatever port the server gets.
        async for item in super().items(unit):
            item.url = self.base + (item.url or "")
            item.extra["url"] = item.url
            yield item
