"""The resize rules on real encoded images: filter, fast paths, orientation, modes, guards."""

from __future__ import annotations

import io
import zlib

import pytest
from PIL import Image

from fastfetch.imaging import ResizeConfig, process, target_size
from tests.conftest import make_image

CFG = ResizeConfig()


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


@pytest.mark.parametrize(
    ("size", "expected"),
    [((800, 600), (683, 512)), ((600, 800), (512, 683)), ((512, 300), (512, 300)), ((2500, 2500), (512, 512))],
)
def test_target_size_keeps_ratio_and_never_upscales(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert target_size(*size, 512) == expected


def test_small_jpeg_is_kept_byte_for_byte() -> None:
    data = make_image(400, 300)
    out = process(data, CFG)
    assert out.reason is None and out.data is None  # caller stores its own bytes
    assert (out.width, out.height, out.original_width, out.original_height) == (400, 300, 400, 300)


def test_large_jpeg_is_resized_with_reduced_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The draft path runs (libjpeg is asked for a reduced scale, and the decoded image is at
    most half size), and its result is the picture a full decode gives."""
    from PIL import JpegImagePlugin

    data = make_image(2400, 1600)
    decoded: list[tuple[int, int]] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def draft(self, mode, size):  # type: ignore[no-untyped-def]
        result = real_draft(self, mode, size)
        decoded.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    out = process(data, CFG)
    assert out.reason is None and out.data is not None
    im = decode(out.data)
    assert im.format == "JPEG" and im.mode == "RGB" and im.size == (768, 512)
    assert (out.original_width, out.original_height) == (2400, 1600)
    assert decoded and decoded[-1][0] <= 1200 and decoded[-1][1] >= 512  # ≥ 2× smaller, still covers 512
    full = process(data, ResizeConfig(reduced_decode=False))
    assert _mean_difference(im, decode(full.data)) < 3.0  # type: ignore[arg-type]


def _mean_difference(a: Image.Image, b: Image.Image) -> float:
    import numpy as np

    assert a.size == b.size
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


def test_too_small_is_rejected_from_the_header() -> None:
    assert process(make_image(300, 255), CFG).reason == "too_small"


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_gives_the_picture_as_displayed(orientation: int) -> None:
    """What a viewer shows: a picture whose top-left quarter is red, stored transformed with
    each EXIF orientation, comes out with the red quarter at its top left again."""
    shown = Image.new("RGB", (300, 400), (20, 40, 200))
    shown.paste((230, 20, 20), (0, 0, 150, 200))
    undo = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }[orientation]  # stored = shown with the orientation's inverse applied
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    shown.transpose(undo).save(buf, "JPEG", quality=95, exif=exif)
    out = process(buf.getvalue(), CFG)
    assert out.reason is None and out.data is not None
    got = decode(out.data)
    assert got.size == (300, 400) == (out.width, out.height)
    assert _mean_difference(got, shown) < 4.0, orientation


def test_rgba_is_composited_on_white() -> None:
    im = Image.new("RGBA", (300, 300), (255, 0, 0, 0))  # fully transparent red
    buf = io.BytesIO()
    im.save(buf, "PNG")
    out = process(buf.getvalue(), CFG)
    assert out.reason is None and out.data is not None
    r, g, b = decode(out.data).getpixel((150, 150))
    assert min(r, g, b) > 245


@pytest.mark.parametrize(
    ("fmt", "mode", "kw"),
    [
        ("JPEG", "CMYK", {}),
        ("JPEG", "L", {}),
        ("PNG", "P", {}),
        ("PNG", "LA", {}),
        ("WEBP", "RGB", {}),
        ("PNG", "I;16", {}),
        ("JPEG", "RGB", {"progressive": True}),
        ("GIF", "P", {}),
    ],
)
def test_any_mode_becomes_rgb_jpeg(fmt: str, mode: str, kw: dict) -> None:
    out = process(make_image(1200, 800, fmt, mode, **kw), CFG)
    assert out.reason is None and out.data is not None, out
    im = decode(out.data)
    assert im.mode == "RGB" and im.size == (768, 512)


def test_non_rgb_jpeg_within_bounds_is_reencoded_as_rgb() -> None:
    out = process(make_image(600, 400, "JPEG", "CMYK"), CFG)
    assert out.data is not None and decode(out.data).mode == "RGB"


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    im = Image.new("I;16", (300, 300), 32768)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    out = process(buf.getvalue(), CFG)
    assert out.data is not None
    assert abs(decode(out.data).getpixel((5, 5))[0] - 128) <= 2


def test_truncated_jpeg_is_rejected() -> None:
    data = make_image(400, 300)
    assert process(data[: len(data) // 2], CFG).reason == "decode_error"


def test_not_an_image() -> None:
    assert process(b"<html>nope</html>", CFG).reason == "not_an_image"


def test_decompression_bomb() -> None:
    # A valid PNG header declaring 30000 × 30000 pixels: rejected before any pixel is decoded.
    png = make_image(300, 300, "PNG")
    ihdr = b"IHDR" + (30000).to_bytes(4, "big") * 2 + png[24:29]
    bomb = png[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + png[33:]
    assert process(bomb, CFG).reason == "decompression_bomb"


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (300, 300), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = process(buf.getvalue(), CFG)
    assert out.data is not None
    r, _, b = decode(out.data).getpixel((10, 10))
    assert r > 200 and b < 60
