"""Archive readers and resumable reads on their own: tar edge cases, zip (ZIP64, bombs, CRC), resume."""

from __future__ import annotations

import asyncio
import gzip
import io
import tarfile
import zipfile
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from fakehub import ServedFile, file_handler, make_tar, make_zip

from fastfetch.archive import ArchiveError, safe_name
from fastfetch.archive.tarstream import _regular_header, iter_tar, iter_tar_groups
from fastfetch.archive.ziprange import iter_zip, zip_entries
from fastfetch.body import body_bytes, body_len
from fastfetch.http import FetchConfig, Fetcher
from fastfetch.ranged import RemoteChanged, RemoteFile, ResumableStream, download_file, probe


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def members(data: bytes, size: int = 7) -> dict[str, bytes]:
    out = {}
    async for m in iter_tar(chunked(data, size)):
        out[m.name] = await m.read()
    return out


def tricky_tar(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:

        def add(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.size, info.type, info.linkname = len(data), kind, link
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("dir", kind=tarfile.DIRTYPE)
        add("./dir/" + "long" * 40 + ".jpg", b"L" * 1000)
        add("dir/ünï.txt", "héllo".encode())
        add("link.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add("../evil.jpg", b"evil")
        add("/abs.jpg", b"abs")
        add("fifo", kind=tarfile.FIFOTYPE)
        add("empty.txt", b"")
        add("last.bin", bytes(range(256)) * 3)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_stream_keeps_only_safe_regular_files(fmt: int) -> None:
    if fmt == tarfile.USTAR_FORMAT:
        data = make_tar([("a/b.jpg", b"1"), ("c.txt", b"2" * 700)])
        assert asyncio.run(members(data)) == {"a/b.jpg": b"1", "c.txt": b"2" * 700}
        return
    got = asyncio.run(members(tricky_tar(fmt)))
    assert got == {
        "dir/" + "long" * 40 + ".jpg": b"L" * 1000,
        "dir/ünï.txt": "héllo".encode(),
        "empty.txt": b"",
        "last.bin": bytes(range(256)) * 3,
    }


def test_tgz_multi_member_gzip_and_skipping_unread_members() -> None:
    plain = make_tar([(f"{i}.jpg", bytes([i]) * (300 + i)) for i in range(5)])
    two = gzip.compress(plain[:5000]) + gzip.compress(plain[5000:])  # concatenated gzip members (pigz, bgzip)

    async def run() -> list[tuple[str, bytes | None]]:
        seen = []
        async for m in iter_tar(chunked(two, 1000)):
            seen.append((m.name, await m.read() if m.name != "2.jpg" else None))  # 2.jpg is skipped unread
        return seen

    seen = asyncio.run(run())
    assert [n for n, _ in seen] == [f"{i}.jpg" for i in range(5)]
    assert seen[4][1] == bytes([4]) * 304


@pytest.mark.parametrize("size", [1, 2, 3])
def test_a_stream_of_tiny_chunks_loses_no_byte(size: int) -> None:
    """The gzip magic test used to keep only the last chunk before it had two bytes: a stream
    whose first chunks were single bytes lost them (found by the strengthened fuzz test)."""
    plain = make_tar([("a.jpg", b"x" * 700), ("b.txt", b"caption")])
    for data in (plain, gzip.compress(plain)):
        assert asyncio.run(members(data, size)) == {"a.jpg": b"x" * 700, "b.txt": b"caption"}


def test_truncated_tar_is_an_error_and_groups_follow_keys() -> None:
    data = make_tar([("k1.jpg", b"a" * 2000), ("k1.txt", b"cap"), ("k2.jpg", b"b"), ("k3.txt", b"x")])
    with pytest.raises(ArchiveError):
        asyncio.run(members(data[:1500]))

    async def groups() -> list[dict[str, bytes]]:
        return [g async for g in iter_tar_groups(chunked(data, 100), lambda ext: ext in ("jpg", "txt"))]

    assert asyncio.run(groups()) == [
        {"__key__": b"k1", "jpg": b"a" * 2000, "txt": b"cap"},
        {"__key__": b"k2", "jpg": b"b"},
        {"__key__": b"k3", "txt": b"x"},
    ]


def test_safe_names() -> None:
    assert safe_name("./a/./b.jpg") == "a/b.jpg"
    for bad in ("../x", "a/../../x", "/etc/passwd", "C:\\x", "", "a/../.."):
        assert safe_name(bad) is None, bad


class MemFile:
    def __init__(self, data: bytes) -> None:
        self.data, self.size, self.reads = data, len(data), 0

    async def read(self, offset: int, length: int) -> bytes:
        self.reads += 1
        return self.data[offset : offset + length]


async def zip_members(f: MemFile) -> dict[str, tuple[bytes | None, str | None]]:
    entries = await zip_entries(f)
    return {m.name: (m.data, m.problem) async for m in iter_zip(f, entries)}


def test_zip_members_bombs_and_corruption() -> None:
    good = {f"img/{i}.webp": bytes([i]) * 5000 for i in range(20)}
    data = bytearray(make_zip(list(good.items()) + [("bomb.bin", b"\0" * (4 << 20)), ("../evil", b"x")]))
    f = MemFile(bytes(data))
    got = asyncio.run(zip_members(f))
    assert {k: v[0] for k, v in got.items() if k.startswith("img/")} == good
    assert got["bomb.bin"] == (None, "zip_bomb")
    assert "../evil" not in got and "evil" not in got
    assert f.reads <= 4, "neighbouring members must share a read"

    stored = bytearray(make_zip([("a.jpg", b"A" * 1000), ("b.jpg", b"B" * 1000)], compress=False))
    stored[stored.index(b"A" * 100) + 10] ^= 1
    got = asyncio.run(zip_members(MemFile(bytes(stored))))
    assert got == {"a.jpg": (None, "corrupt"), "b.jpg": (b"B" * 1000, None)}
    with pytest.raises(ArchiveError):
        asyncio.run(zip_members(MemFile(b"not a zip" * 10)))


def test_zip64_central_directory() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for i in range(0x10000):  # more entries than a classic end record can count
            z.writestr(zipfile.ZipInfo(f"{i}.txt"), b"")
        z.writestr("last.jpg", b"the end")
    entries = asyncio.run(zip_entries(MemFile(buf.getvalue())))
    assert len(entries) == 0x10001 and entries[-1].name == "last.jpg"


def run_with_session(coro_fn):  # type: ignore[no-untyped-def]
    """Run ``coro_fn(client)`` with the run's guarded client (loopback allowed: the test server)."""

    async def main():  # type: ignore[no-untyped-def]
        async with Fetcher(FetchConfig(allow_private_networks=True)) as client:
            return await coro_fn(client)

    return asyncio.run(main())


@pytest.mark.parametrize("ranges", [True, False])
def test_stream_resumes_after_a_break(server, ranges: bool) -> None:
    data = bytes(range(256)) * 4000
    served = ServedFile(data, cut_at=300_001, ranges=ranges)
    server.routes["/big.tar"] = file_handler(served)  # type: ignore[assignment]

    async def go(session: Fetcher) -> tuple[bytes, int]:
        stream = ResumableStream(session, server.url("/big.tar"), backoff=0.01)
        return b"".join([c async for c in stream]), stream.resumes

    body, resumes = run_with_session(go)
    assert body == data and resumes == 1
    second = server.requests[-1][1]
    if ranges:
        assert second["Range"] == "bytes=300001-" and second["If-Range"] == served.etag
    assert served.gets == 2


def test_stream_refuses_a_file_that_changed(server) -> None:
    served = ServedFile(b"a" * 200_000, cut_at=100_000)
    server.routes["/f"] = file_handler(served)  # type: ignore[assignment]

    async def go(session: Fetcher) -> None:
        async for _ in ResumableStream(session, server.url("/f"), backoff=0.01):
            served.data, served.etag = b"b" * 200_000, '"v2"'  # replaced upstream mid-download

    with pytest.raises(RemoteChanged):
        run_with_session(go)


def test_download_file_resumes_a_part_file_and_ranged_reads(server, tmp_path: Path) -> None:
    data = bytes(range(251)) * 1000
    served = ServedFile(data)
    server.routes["/x.parquet"] = file_handler(served)  # type: ignore[assignment]
    dest = tmp_path / "x.parquet"
    (tmp_path / "x.parquet.part").write_bytes(data[:1234])
    (tmp_path / "x.parquet.part.json").write_bytes(
        orjson.dumps({"etag": served.etag, "last_modified": None, "length": len(data)})
    )

    async def go(session: Fetcher) -> bytes:
        await download_file(session, server.url("/x.parquet"), dest)
        validator, ranged = await probe(session, server.url("/x.parquet"))
        assert ranged and validator.length == len(data)
        return await RemoteFile(session, server.url("/x.parquet"), validator).read(1000, 50)

    assert run_with_session(go) == data[1000:1050]
    assert dest.read_bytes() == data and not list(tmp_path.glob("*.part*"))
    assert server.requests[0][1]["Range"] == "bytes=1234-"
    assert zlib.crc32(dest.read_bytes()) == zlib.crc32(data)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_regular_header_fast_path_agrees_with_tarfile(fmt: int) -> None:
    names = ["a.jpg", "dir/b.json", "x" * 120 + "/long.jpg", "ünï/çödé.txt", "p" * 90 + "/" + "q" * 60 + ".jpg"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 37 * i
            t.addfile(info, io.BytesIO(b"z" * info.size))
    raw = buf.getvalue()
    fast = 0
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        for m in t:
            block = raw[m.offset : m.offset + 512]
            ref = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            got = _regular_header(block)
            if got is not None:  # None hands the header to tarfile: never a different answer
                fast += 1
                assert (got.name, got.size, got.type) == (ref.name, ref.size, ref.type)
    assert fast >= 2  # the short ASCII names at least (pax moves the others into extended headers)


@pytest.mark.parametrize("chunk", [7, 1000, 1 << 20])  # members over many chunks, a few, one
def test_read_body_gives_the_members_bytes_in_pieces_without_joining(chunk: int) -> None:
    files = [(f"{i}.jpg", bytes(range(256)) * (3 + 5 * i)) for i in range(6)]
    archive = make_tar(files)

    async def run() -> list[tuple[str, object]]:
        return [(m.name, await m.read_body()) async for m in iter_tar(chunked(archive, chunk))]

    for (name, body), (want_name, want) in zip(asyncio.run(run()), files, strict=True):
        assert name == want_name and body_len(body) == len(want) and body_bytes(body) == want
        if chunk == 7:  # spans chunks: pieces of them, not a new joined copy
            assert isinstance(body, tuple) and len(body) > 1
