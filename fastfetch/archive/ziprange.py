"""The zip range reader: members of a zip read by random access, never extracted.

A zip keeps its table of contents at the end: the end of central directory is read first, then
the central directory (ZIP64 included; bounded at ``MAX_DIRECTORY``), then the members in file
order, several per request. Each member's declared sizes are checked before it is inflated
(``bomb_check``), and its inflated size and CRC after.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from fastfetch.archive import MAX_MEMBER, THREAD_MIN, ArchiveError, safe_name
from fastfetch.errors import Reason as R

MAX_DIRECTORY = 256 * 1024 * 1024  # a zip central directory larger than this fails the archive


class RandomAccess(Protocol):
    size: int

    async def read(self, offset: int, length: int) -> bytes: ...


@dataclass(frozen=True, slots=True)
class ZipEntry:
    name: str
    offset: int  # of the local header
    csize: int
    usize: int
    method: int
    crc: int
    flags: int


@dataclass(slots=True)
class ZipMember:
    """A member's bytes, or the reason it was not read (``zip_bomb``, ``corrupt``, …)."""

    name: str
    data: bytes | None
    problem: str | None = None


_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOC = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CDIR = struct.Struct("<4s4B4HL2L5H2L")
_LOCAL = struct.Struct("<4s2B4HL2L2H")
_TAIL = 65535 + _EOCD.size + _EOCD64_LOC.size


async def zip_entries(f: RandomAccess) -> list[ZipEntry]:
    """The central directory of a zip (ZIP64 included), as entries sorted by file offset."""
    tail_start = max(0, f.size - _TAIL)
    tail = await f.read(tail_start, f.size - tail_start)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise ArchiveError("not a zip file (no end of central directory)")
    _, _, _, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        loc = at - _EOCD64_LOC.size
        sig, _, eocd64_offset, _ = _EOCD64_LOC.unpack_from(tail, loc) if loc >= 0 else (b"", 0, 0, 0)
        if sig != b"PK\x06\x07":
            raise ArchiveError("ZIP64 locator missing")
        fields = _EOCD64.unpack(await f.read(eocd64_offset, _EOCD64.size))
        if fields[0] != b"PK\x06\x06":
            raise ArchiveError("bad ZIP64 end of central directory")
        count, cd_size, cd_offset = fields[7], fields[8], fields[9]
    if cd_offset + cd_size > f.size:
        raise ArchiveError("central directory beyond the end of the file")
    if cd_size > MAX_DIRECTORY or count * _CDIR.size > cd_size:
        raise ArchiveError(
            f"central directory of {cd_size:,} bytes declaring {count:,} entries: too large or inconsistent "
            f"(at most {MAX_DIRECTORY >> 20} MiB, {_CDIR.size} bytes an entry)"
        )
    cd = await f.read(cd_offset, cd_size)
    entries: list[ZipEntry] = []
    pos = 0
    for _ in range(count):
        if cd[pos : pos + 4] != b"PK\x01\x02":
            raise ArchiveError("bad central directory entry")
        rec = _CDIR.unpack_from(cd, pos)
        flags, method, crc, csize, usize = rec[5], rec[6], rec[9], rec[10], rec[11]
        name_len, extra_len, comment_len, offset = rec[12], rec[13], rec[14], rec[18]
        pos += _CDIR.size
        raw = cd[pos : pos + name_len]
        extra = cd[pos + name_len : pos + name_len + extra_len]
        pos += name_len + extra_len + comment_len
        usize, csize, offset = _zip64_extra(extra, usize, csize, offset)
        name = raw.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        safe = safe_name(name)
        if safe is None or name.endswith("/"):
            continue
        entries.append(ZipEntry(safe, offset, csize, usize, method, crc, flags))
    entries.sort(key=lambda e: e.offset)
    return entries


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<2H", extra, pos)
        if tag == 1:
            vals = list(struct.unpack_from(f"<{size // 8}Q", extra, pos + 4))
            if usize == 0xFFFFFFFF and vals:
                usize = vals.pop(0)
            if csize == 0xFFFFFFFF and vals:
                csize = vals.pop(0)
            if offset == 0xFFFFFFFF and vals:
                offset = vals.pop(0)
            break
        pos += 4 + size
    return usize, csize, offset


def bomb_check(entry: ZipEntry, limit: int = MAX_MEMBER) -> str | None:
    """Why a member must not be inflated, judged from its declared sizes (None when fine)."""
    if entry.flags & 0x1:
        return R.ENCRYPTED
    if entry.method not in (0, 8):
        return R.UNSUPPORTED_COMPRESSION
    if entry.usize > limit:
        return R.TOO_LARGE
    if entry.method == 8 and entry.usize > 1 << 20 and entry.usize > 200 * max(entry.csize, 1):
        return R.ZIP_BOMB
    return None


async def iter_zip(
    f: RandomAccess,
    entries: list[ZipEntry],
    span: int = 16 * 1024 * 1024,
    limit: int = MAX_MEMBER,
) -> AsyncIterator[ZipMember]:
    """The given members' data, reading runs of neighbouring members with one request each.

    Each member is checked against its declared sizes before inflating (bomb check), inflated
    with a cap one byte above its declared size, and verified against its CRC. The next run is
    requested while the current one is handed out, so the link does not idle between runs
    (memory: two runs of at most ``span`` bytes, or one member larger than that).
    """
    runs = _plan_runs(sorted(entries, key=lambda e: e.offset), span, limit, f.size)
    readable = [k for k, (_, problem, _) in enumerate(runs) if problem is None]
    tasks: dict[int, asyncio.Task[bytes]] = {}

    def prefetch(position: int) -> None:
        if position < len(readable):
            k = readable[position]
            members, _, end = runs[k]
            tasks[k] = asyncio.ensure_future(f.read(members[0].offset, end - members[0].offset))

    prefetch(0)
    position = 0
    try:
        for k, (members, problem, _) in enumerate(runs):
            if problem is not None:
                yield ZipMember(members[0].name, None, problem)
                continue
            task = tasks.pop(k)
            position += 1
            prefetch(position)
            block = await task
            for entry in members:
                yield await _carve(f, entry, block, entry.offset - members[0].offset)
    finally:
        for task in tasks.values():
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks.values(), return_exceptions=True)


def _plan_runs(entries: list[ZipEntry], span: int, limit: int, size: int) -> list[tuple[list[ZipEntry], str | None, int]]:
    """Members grouped into runs read with one request: (members, problem, end offset).

    A member that fails the bomb check is a run of its own with its problem and is never read.
    A local header + data fits in csize + 30 + name + a little extra field (a longer extra field
    is read separately by ``_carve``).
    """
    runs: list[tuple[list[ZipEntry], str | None, int]] = []
    i = 0
    while i < len(entries):
        first = entries[i]
        problem = bomb_check(first, limit)
        if problem:
            runs.append(([first], problem, 0))
            i += 1
            continue
        j, end = i + 1, _member_end(first)
        while j < len(entries) and bomb_check(entries[j], limit) is None:
            nxt = entries[j]
            if nxt.offset - end > (1 << 20) or _member_end(nxt) - first.offset > span:
                break
            end = max(end, _member_end(nxt))
            j += 1
        runs.append((entries[i:j], None, min(end, size)))
        i = j
    return runs


def _member_end(e: ZipEntry) -> int:
    return e.offset + _LOCAL.size + len(e.name.encode()) + 1024 + e.csize


async def _carve(f: RandomAccess, entry: ZipEntry, block: bytes, at: int) -> ZipMember:
    local = block[at : at + _LOCAL.size]
    if len(local) < _LOCAL.size or local[:4] != b"PK\x03\x04":
        return ZipMember(entry.name, None, R.CORRUPT)
    rec = _LOCAL.unpack(local)
    start = at + _LOCAL.size + rec[10] + rec[11]
    data = block[start : start + entry.csize]
    if len(data) < entry.csize:  # an unusually long local extra field: read the member alone
        data = await f.read(entry.offset + (start - at), entry.csize)
    try:
        if entry.method == 8:
            d = zlib.decompressobj(-15)
            if len(data) >= THREAD_MIN:
                out = await asyncio.to_thread(d.decompress, data, entry.usize + 1)
            else:
                out = d.decompress(data, entry.usize + 1)
        else:
            out = data
    except zlib.error:
        return ZipMember(entry.name, None, R.CORRUPT)
    if len(out) != entry.usize:
        return ZipMember(entry.name, None, R.ZIP_BOMB if len(out) > entry.usize else R.CORRUPT)
    if zlib.crc32(out) != entry.crc:
        return ZipMember(entry.name, None, R.CORRUPT)
    return ZipMember(entry.name, out)


async def read_zip_member(f: RandomAccess, entry: ZipEntry, limit: int = MAX_MEMBER) -> bytes:
    """One member's data (for side files such as a part's JSON); raises when unreadable."""
    async for member in iter_zip(f, [entry], limit=limit):
        if member.data is None:
            raise ArchiveError(f"{entry.name}: {member.problem}")
        return member.data
    raise ArchiveError(f"{entry.name}: not found")
