"""The tar stream reader: members of a tar (or tgz) as its bytes arrive, never extracted.

The parser reads one 512-byte header at a time from the download's chunks and keeps a queue of
the chunks received, joining only what a member's data needs. Metadata records (long names, pax
headers) are bounded at ``MAX_META``, members at ``MAX_MEMBER``; a sparse member says so in its
``problem``. Webdataset samples (``iter_tar_groups``) are built on top.
"""

from __future__ import annotations

import asyncio
import collections
import tarfile
import zlib
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple

from fastfetch.archive import MAX_MEMBER, THREAD_MIN, ArchiveError, safe_name
from fastfetch.body import Body, body_bytes, body_len
from fastfetch.errors import Reason as R

BLOCK = 512
MAX_META = 1 << 20  # a tar long name or pax header larger than this fails the archive


# -- byte streams ------------------------------------------------------------------------------
async def gunzip(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Decompress a gzip stream (any number of concatenated members) chunk by chunk."""
    d = zlib.decompressobj(31)
    async for chunk in chunks:
        while chunk:
            out = await _inflate(d, chunk)
            if out:
                yield out
            while d.unconsumed_tail:  # output was capped: keep draining the same input
                out = await _inflate(d, d.unconsumed_tail)
                if out:
                    yield out
            chunk = b""
            if d.eof:
                chunk = d.unused_data
                d = zlib.decompressobj(31)
                if chunk and chunk.lstrip(b"\0") == b"":  # trailing zero padding after the last member
                    chunk = b""
    tail = d.flush()
    if tail:
        yield tail


async def _inflate(d: zlib._Decompress, data: bytes) -> bytes:  # type: ignore[name-defined]
    try:
        if len(data) >= THREAD_MIN:
            return await asyncio.to_thread(d.decompress, data, 16 * 1024 * 1024)
        return d.decompress(data, 16 * 1024 * 1024)
    except zlib.error as exc:  # corrupt compressed data is an unreadable archive, not a crash
        raise ArchiveError(f"corrupt gzip data: {exc}") from exc


async def maybe_gunzip(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Pass a stream through, decompressing it first if it starts with the gzip magic."""
    it = chunks.__aiter__()
    first = b""
    async for chunk in it:
        first += chunk  # the magic may arrive split over tiny chunks: keep every byte
        if len(first) >= 2:
            break

    async def replay() -> AsyncIterator[bytes]:
        yield first
        async for chunk in it:
            yield chunk

    if first[:2] == b"\x1f\x8b":
        async for out in gunzip(replay()):
            yield out
    else:
        async for out in replay():
            yield out


class _Reader:
    """Exact-size reads over an async chunk stream (the tar parser's input).

    Chunks are queued as they arrive and only the bytes a caller asks for are taken: as the
    pieces of chunks they lie in (``read_body``, no copy) or joined (``read``, one copy);
    skipped members (SA-1B's mask JSONs) are never copied at all.
    """

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._it = chunks.__aiter__()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._head = 0  # bytes of _chunks[0] already consumed
        self._have = 0  # bytes queued and not consumed
        self.offset = 0  # bytes consumed so far

    async def _fill(self, n: int) -> bool:
        while self._have < n:
            try:
                chunk = await self._it.__anext__()
            except StopAsyncIteration:
                return False
            if chunk:
                self._chunks.append(chunk)
                self._have += len(chunk)
        return True

    def _consume(self, n: int) -> list[bytes | memoryview]:
        """Take ``n`` queued bytes (``n`` ≤ what is queued), as the pieces they lie in."""
        pieces: list[bytes | memoryview] = []
        self._have -= n
        self.offset += n
        while n:
            chunk = self._chunks[0]
            left = len(chunk) - self._head
            if left <= n:
                pieces.append(memoryview(chunk)[self._head :] if self._head else chunk)
                self._chunks.popleft()
                self._head = 0
                n -= left
            else:
                pieces.append(memoryview(chunk)[self._head : self._head + n])
                self._head += n
                n = 0
        return pieces

    async def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer only at the end of the stream."""
        return body_bytes(await self.read_body(n))

    async def read_body(self, n: int) -> Body:
        """Like ``read``, as the pieces of the received chunks (``fastfetch.body``): no copy."""
        await self._fill(n)
        pieces = self._consume(min(n, self._have))
        if len(pieces) == 1 and isinstance(pieces[0], bytes):
            return pieces[0]
        return tuple(pieces)

    async def drain(self) -> None:
        """Consume the rest of the stream (a few KiB of padding after a tar's end blocks)."""
        self._consume(self._have)
        async for chunk in self._it:
            self.offset += len(chunk)

    async def skip(self, n: int) -> None:
        while n > 0:
            if self._have == 0 and not await self._fill(1):
                raise ArchiveError("archive truncated")
            take = min(n, self._have)
            self._consume(take)
            n -= take


# -- tar ---------------------------------------------------------------------------------------
class TarMember:
    """A regular file of a streamed tar; its data must be read before the next member is asked for.

    Unread data is skipped by the parser, so a recipe can ignore members (SA-1B's mask JSONs)
    without holding them.
    """

    def __init__(self, name: str, size: int, reader: _Reader, sparse: bool = False) -> None:
        self.name = name
        self.size = size
        self._reader = reader
        self._left = size
        self._sparse = sparse

    @property
    def problem(self) -> str | None:
        """Why the data will not be read (``too_large``, ``sparse_member``), or None."""
        if self._sparse:
            return R.SPARSE_MEMBER  # the stored bytes are not the file's bytes
        return R.TOO_LARGE if self.size > MAX_MEMBER else None

    async def read(self, limit: int = MAX_MEMBER) -> bytes | None:
        """All the data, or None (data skipped) when it is larger than ``limit`` or has a
        ``problem``."""
        body = await self.read_body(limit)
        return None if body is None else body_bytes(body)

    async def read_body(self, limit: int = MAX_MEMBER) -> Body | None:
        """Like ``read``, without joining the chunks the data lies in (an image on its way to
        a resize worker and an MDS shard needs no contiguous copy of its own)."""
        if self.size > limit or self._sparse:
            return None
        body = await self._reader.read_body(self._left)
        self._left -= body_len(body)
        if self._left:
            raise ArchiveError(f"archive truncated inside {self.name}")
        return body

    async def chunks(self, size: int = 1 << 20) -> AsyncIterator[bytes]:
        """The data piece by piece (for members too large to hold, e.g. a JSONL of captions)."""
        while self._left:
            data = await self._reader.read(min(size, self._left))
            if not data:
                raise ArchiveError(f"archive truncated inside {self.name}")
            self._left -= len(data)
            yield data

    async def _finish(self) -> None:
        await self._reader.skip(self._left + (-self.size % BLOCK))
        self._left = 0


async def iter_tar(chunks: AsyncIterator[bytes]) -> AsyncIterator[TarMember]:
    """The regular-file members of a tar stream (gzip-compressed or not), in archive order."""
    reader = _Reader(maybe_gunzip(chunks))
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = await reader.read(BLOCK)
        if len(header) < BLOCK:
            if not header and reader.offset == 0:
                raise ArchiveError("empty archive")
            if header.strip(b"\0"):
                raise ArchiveError("archive truncated in a header")
            return  # a stream may end without the two zero blocks
        if header.count(0) == BLOCK:  # the end-of-archive zero blocks
            await reader.drain()  # and the padding after them, so that the download completes
            return
        info: _Header | tarfile.TarInfo | None = _regular_header(header)
        if info is None:  # anything but a plain file: the standard library's full parser
            try:
                info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                raise ArchiveError(f"bad tar header at byte {reader.offset - BLOCK}: {exc}") from exc
        size = info.size
        if size < 0:
            raise ArchiveError(f"bad tar header at byte {reader.offset - BLOCK}: negative size")
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE):
            if size > MAX_META:
                raise ArchiveError(
                    f"tar metadata record of {size:,} bytes at byte {reader.offset - BLOCK} (more than "
                    f"{MAX_META >> 20} MiB of long name or pax header): not read"
                )
            meta = await reader.read(size)
            await reader.skip(-size % BLOCK)
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = meta.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif info.type == tarfile.XHDTYPE:
                pax = _parse_pax(meta)
            continue
        name = pax.get("path") or long_name or info.name
        if "size" in pax:
            size = _pax_size(pax["size"], reader.offset)
        sparse = info.type == tarfile.GNUTYPE_SPARSE or any(k.startswith("GNU.sparse.") for k in pax)
        long_name, pax = None, {}
        safe = safe_name(name)
        if info.type not in tarfile.REGULAR_TYPES or safe is None:
            await reader.skip(size + (-size % BLOCK))
            continue
        member = TarMember(safe, size, reader, sparse)
        yield member
        await member._finish()


class _Header(NamedTuple):
    name: str
    size: int
    type: bytes


def _regular_header(block: bytes) -> _Header | None:
    """The header of a regular file, parsed the way ``tarfile.TarInfo.frombuf`` does, or None
    for anything else (other types, base-256 sizes, a checksum to look at more closely).

    Archives are almost all regular files: this keeps ``frombuf`` (~14 µs a header, against
    ~3.5 µs here; its checksum unpacks a 512-tuple) off the path of every image."""
    kind = block[156:157]
    if kind not in (tarfile.REGTYPE, tarfile.AREGTYPE) or block[124] & 0x80:
        return None
    try:
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        checksum = int(block[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    if checksum != sum(block) - sum(block[148:156]) + 256:  # 8 spaces stand for the field itself
        return None
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    prefix = block[345:500].split(b"\0", 1)[0]
    if prefix:
        name = prefix.decode("utf-8", "surrogateescape") + "/" + name
    if name.endswith("/"):  # a v7 directory
        return None
    return _Header(name, size, kind)


def _parse_pax(data: bytes) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records of a pax extended header."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ArchiveError(f"bad pax header record length {data[pos:space][:20]!r}") from None
        if length <= 0:
            break
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _pax_size(value: str, offset: int) -> int:
    try:
        size = int(value)
    except ValueError:
        raise ArchiveError(f"bad pax size {value[:20]!r} before byte {offset}") from None
    if size < 0:
        raise ArchiveError(f"bad pax size {size} before byte {offset}")
    return size


async def iter_tar_groups(chunks: AsyncIterator[bytes], want: Callable[[str], bool]) -> AsyncIterator[dict[str, bytes]]:
    """Webdataset samples: adjacent members sharing a key (``dir/key.ext``) as {ext: data, "__key__": key}.

    Only members whose extension ``want`` accepts are read; the key is the path up to the first
    dot of the file name, as webdataset defines it. A member repeating an extension of the
    current sample (``k.jpg``, ``k.txt``, ``k.jpg``) starts a new sample with the same key, which
    the pipeline counts as ``duplicate_key``. A wanted member that cannot be read puts its
    ``problem`` under ``"__problem__"`` (and its extension maps to ``b""``).
    """
    current: str | None = None
    group: dict[str, bytes] = {}
    async for member in iter_tar(chunks):
        folder, _, base = member.name.rpartition("/")
        stem, dot, ext = base.partition(".")
        key = f"{folder}/{stem}" if folder else stem
        if key != current or (dot and ext.lower() in group):  # a repeated name starts a sample of its own
            if group:
                yield {"__key__": current.encode(), **group}  # type: ignore[union-attr]
            current, group = key, {}
        if dot and want(ext.lower()):
            data = await member.read()
            if data is not None:
                group[ext.lower()] = data
            elif member.problem:
                group[ext.lower()] = b""
                group["__problem__"] = member.problem.encode()
    if group and current is not None:
        yield {"__key__": current.encode(), **group}
