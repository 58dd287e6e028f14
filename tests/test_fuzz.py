"""Property tests: random and mutated bytes through the image path and the archive readers
end in a counted rejection or a clean ArchiveError, never a crash or a hang."""

from __future__ import annotations

import asyncio
import io
import tarfile
import zipfile
from collections.abc import AsyncIterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastfetch.archive import ArchiveError, iter_tar, iter_zip, zip_entries
from fastfetch.imaging import ResizeConfig, process
from tests.conftest import make_image

CFG = ResizeConfig()
REASONS = {None, "too_small", "not_an_image", "decode_error", "decompression_bomb"}
SEEDS = [make_image(300, 260), make_image(700, 520, progressive=True), make_image(600, 600, "PNG", "RGBA"),
         make_image(640, 480, "WEBP"), make_image(300, 300, "GIF", "P")]
FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed file with a few bytes flipped, a piece cut out or the tail dropped."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + data[cut + draw(st.integers(0, 200)) :]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@FUZZ
@given(st.one_of(st.binary(max_size=2048), mutated(SEEDS)))
def test_image_path_only_counts_rejections(data: bytes) -> None:
    out = process(data, CFG)
    assert out.reason in REASONS
    if out.reason is None:
        assert 256 <= min(out.width, out.height) <= 512


def _tar_bytes(gz: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for i, payload in enumerate((SEEDS[0], b"{}", b"caption")):
            info = tarfile.TarInfo(f"sa_{i}.jpg" if i == 0 else f"sa_{i}.txt")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def _drain_tar(data: bytes, size: int) -> int:
    n = 0
    try:
        async for member in iter_tar(_chunks(data, size)):
            await member.read()
            n += 1
    except ArchiveError:
        pass
    return n


@FUZZ
@given(st.one_of(st.binary(max_size=4096), mutated([_tar_bytes(False), _tar_bytes(True)])), st.integers(1, 700))
def test_tar_reader_never_crashes_or_hangs(data: bytes, chunk: int) -> None:
    assert asyncio.run(asyncio.wait_for(_drain_tar(data, chunk), 10)) >= 0


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    async def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("part-000001/a.webp", SEEDS[3])
        z.writestr("part-000001.json", b'{"a.webp": {"p": "prompt"}}')
    return buf.getvalue()


async def _drain_zip(data: bytes) -> int:
    f = _Bytes(data)
    try:
        entries = await zip_entries(f)
        return sum([1 async for _ in iter_zip(f, entries)])
    except ArchiveError:
        return 0


@FUZZ
@given(st.one_of(st.binary(max_size=4096), mutated([_zip_bytes()])))
def test_zip_reader_never_crashes_or_hangs(data: bytes) -> None:
    assert asyncio.run(asyncio.wait_for(_drain_zip(data), 10)) >= 0
