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

from fastfetch.archive import ArchiveError, safe_name
from fastfetch.archive.tarstream import iter_tar
from fastfetch.archive.ziprange import iter_zip, zip_entries
from fastfetch.imaging import ResizeConfig, process
from tests.conftest import make_image

CFG = ResizeConfig()
REASONS = {None, "too_small", "not_an_image", "decode_error", "decompression_bomb"}
SEEDS = [
    make_image(300, 260),
    make_image(700, 520, progressive=True),
    make_image(600, 600, "PNG", "RGBA"),
    make_image(640, 480, "WEBP"),
    make_image(300, 300, "GIF", "P"),
]
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


async def _drain_tar(data: bytes, size: int) -> list[tuple[str, bytes | None]]:
    """Every member the reader yields, checked as it comes: a safe relative name, and data
    that is exactly the size its header declared (or nothing, for one it will not hold)."""
    got: list[tuple[str, bytes | None]] = []
    try:
        async for member in iter_tar(_chunks(data, size)):
            body = await member.read()
            assert safe_name(member.name) == member.name and not member.name.startswith("/")
            assert body is None or len(body) == member.size
            got.append((member.name, body))
    except ArchiveError:
        pass
    return got


TAR_SEEDS = {_tar_bytes(False): False, _tar_bytes(True): True}


@FUZZ
@given(st.one_of(st.binary(max_size=4096), mutated(list(TAR_SEEDS))), st.integers(1, 700))
def test_tar_reader_never_crashes_or_hangs(data: bytes, chunk: int) -> None:
    members = asyncio.run(asyncio.wait_for(_drain_tar(data, chunk), 10))
    if data in TAR_SEEDS:  # an intact archive: exactly its members, byte for byte
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert members == [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


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


ZIP_PROBLEMS = {"corrupt", "zip_bomb", "encrypted", "unsupported_compression", "too_large"}


async def _drain_zip(data: bytes) -> list[tuple[str, bytes | None]]:
    """Every member the reader yields: its data, or a named problem and no data."""
    f = _Bytes(data)
    try:
        entries = await zip_entries(f)
    except ArchiveError:
        return []
    got = []
    async for member in iter_zip(f, entries):
        assert (member.data is None) == (member.problem is not None) and member.problem in ZIP_PROBLEMS | {None}
        assert safe_name(member.name) == member.name
        got.append((member.name, member.data))
    assert len(got) == len(entries)
    return got


@FUZZ
@given(st.one_of(st.binary(max_size=4096), mutated([_zip_bytes()])))
def test_zip_reader_never_crashes_or_hangs(data: bytes) -> None:
    members = asyncio.run(asyncio.wait_for(_drain_zip(data), 10))
    if data == _zip_bytes():  # an intact archive: exactly its members, byte for byte
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            assert sorted(members) == sorted((n, z.read(n)) for n in z.namelist())
    for name, body in members:  # what a damaged archive still yields is what the intact one holds
        if body is not None and name == "part-000001/a.webp":
            assert body == SEEDS[3]
