"""Resumable HTTP reads: a body streamed to its end across broken connections, and byte ranges.

A multi-GB archive must not start over because one connection broke at 90 %: when a stream
breaks, the next request asks for ``Range: bytes=<received>-`` with ``If-Range`` set to the
first response's ETag (or Last-Modified), and the answer is accepted only if it continues the
same file (206, matching Content-Range start, total length and ETag). A server that answers 200
instead has either changed the file (the unit fails and is redone whole on the next run) or
ignores ranges (the already received prefix is skipped from the new body).

Every request goes through the run's guarded client (``Fetcher.request``): the same scheme,
address and redirect checks as an image download.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from fastfetch import storage
from fastfetch.http import Fetcher

_READ_BUFFER = 4 << 20
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class RemoteChanged(Exception):
    """The remote file changed between two requests of one download (its validator differs)."""


class AccessDenied(Exception):
    """The server answered 401 or 403 (a gated or private file, or an expired link)."""

    def __init__(self, url: str, status: int) -> None:
        super().__init__(f"HTTP {status} for {url}")
        self.url = url
        self.status = status


@dataclass(slots=True)
class Validator:
    """What identifies one version of a remote file: ETag, Last-Modified and total length."""

    etag: str | None = None
    last_modified: str | None = None
    length: int | None = None

    @classmethod
    def from_response(cls, resp: aiohttp.ClientResponse) -> Validator:
        length: int | None = None
        crange = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if resp.status == 206 and crange and crange.group(3) != "*":
            length = int(crange.group(3))
        elif resp.status == 200 and resp.content_length is not None and not resp.headers.get("Content-Encoding"):
            length = resp.content_length
        etag = resp.headers.get("ETag") or resp.headers.get("X-Linked-Etag")
        return cls(etag, resp.headers.get("Last-Modified"), length)

    def if_range(self) -> str | None:
        """The ``If-Range`` value: a strong ETag, else the Last-Modified date (RFC 9110 §13.1.5)."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    def same_as(self, other: Validator) -> bool:
        if self.etag and other.etag and self.etag != other.etag:
            return False
        if self.length is not None and other.length is not None and self.length != other.length:
            return False
        if not (self.etag and other.etag) and self.last_modified and other.last_modified:
            return self.last_modified == other.last_modified
        return True

    def to_json(self) -> dict[str, Any]:
        return {"etag": self.etag, "last_modified": self.last_modified, "length": self.length}


@dataclass
class ResumableStream:
    """The body of ``url`` (or of ``[start, end]`` of it) as chunks, resumed across breaks.

    ``validator`` may be given (a ranged read of a file whose version is known) or is learned
    from the first response; ``resumes`` counts the Range requests made after a break.
    """

    client: Fetcher
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    start: int = 0
    end: int | None = None  # inclusive; None = to the end of the file
    validator: Validator | None = None
    retries: int = 5  # consecutive failed attempts (without a byte of progress) before giving up
    read_timeout: float = 60.0
    backoff: float = 0.5
    resumes: int = 0
    received: int = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        failures = 0
        while True:
            pos = self.start + self.received
            if self.end is not None and pos > self.end:
                return
            try:
                async for chunk in self._one_request(pos):
                    self.received += len(chunk)
                    failures = 0
                    yield chunk
                if self._complete():
                    return
                failure: Exception = aiohttp.ClientPayloadError("body ended early")
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError, ConnectionError) as exc:
                failure = exc
            failures += 1
            if failures > self.retries:
                raise failure
            self.resumes += 1
            await asyncio.sleep(self.backoff * 2 ** (failures - 1) * (0.5 + random.random()))

    def _complete(self) -> bool:
        if self.end is not None:
            return self.start + self.received > self.end
        if self.validator is None or self.validator.length is None:
            return True  # nothing to compare with: a clean end of body is the end
        return self.start + self.received >= self.validator.length

    async def _one_request(self, pos: int) -> AsyncIterator[bytes]:
        headers = {"Accept-Encoding": "identity", **self.headers}  # byte offsets are of the file as stored
        if pos > 0 or self.end is not None:
            headers["Range"] = f"bytes={pos}-" + ("" if self.end is None else str(self.end))
            if self.validator is not None and self.validator.if_range():
                headers["If-Range"] = self.validator.if_range() or ""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=self.read_timeout)
        # A large read buffer: an archive is one long body read by few connections, and with
        # aiohttp's 64 KiB default the connection is paused and resumed every 128 KiB.
        async with self.client.request(self.url, headers, timeout, _READ_BUFFER) as resp:
            if resp.status in (401, 403):
                raise AccessDenied(self.url, resp.status)
            if resp.status >= 500 or resp.status == 429:
                raise aiohttp.ClientConnectionError(f"HTTP {resp.status} for {self.url}")
            if resp.status not in (200, 206):
                resp.raise_for_status()
                raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status, message="unexpected status")
            seen = Validator.from_response(resp)
            if self.validator is None:
                self.validator = seen
            elif not self.validator.same_as(seen):
                raise RemoteChanged(f"{self.url} changed while it was being read ({self.validator} → {seen})")
            skip = 0
            if resp.status == 206:
                crange = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if not crange or int(crange.group(1)) != pos:
                    raise RemoteChanged(f"{self.url}: asked for bytes from {pos}, got {resp.headers.get('Content-Range')!r}")
            elif pos > 0:
                # 200 to a ranged request: the If-Range validator matched nothing (file changed),
                # or the server ignores Range. Same validator ⇒ same file: skip what we have.
                if self.validator.etag is None and self.validator.last_modified is None:
                    raise RemoteChanged(f"{self.url} ignores Range and has no validator; cannot resume safely")
                skip = pos
            remaining = None if self.end is None else self.end - pos + 1
            async for chunk, _ in resp.content.iter_chunks():  # as received: no re-joining
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                    if not chunk:
                        continue
                if remaining is not None:
                    chunk = chunk[:remaining]
                    remaining -= len(chunk)
                yield chunk
                if remaining == 0:
                    return


async def download_file(client: Fetcher, url: str, dest: Path, headers: dict[str, str] | None = None) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a ``.part`` left by a killed run.

    The ``.part`` file's validator is saved beside it, so a resumed run continues only the same
    version of the file.
    """
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    meta = dest.with_name(dest.name + ".part.json")
    start, validator = 0, None
    if part.exists() and meta.exists():
        start = part.stat().st_size
        validator = Validator(**orjson.loads(meta.read_bytes()))
    stream = ResumableStream(client, url, headers or {}, start=start, validator=validator)
    mode = "ab" if start else "wb"
    try:
        with open(part, mode) as f:
            async for chunk in stream:
                if stream.validator is not None and not meta.exists():
                    meta.write_bytes(orjson.dumps(stream.validator.to_json()))
                f.write(chunk)
    except RemoteChanged:
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        raise
    await asyncio.to_thread(storage.replace_durably, part, dest)  # a later run reuses `dest` as it is
    meta.unlink(missing_ok=True)
    return dest


async def probe(client: Fetcher, url: str, headers: dict[str, str] | None = None, attempts: int = 3) -> tuple[Validator, bool]:
    """The validator (ETag, Last-Modified, length) of ``url`` and whether it serves ranges.

    A one-byte ranged GET rather than a HEAD: some CDNs answer HEAD differently (or not at
    all), and the answer (206 or 200) says at once whether ranged reads will work.
    """
    req = {"Accept-Encoding": "identity", **(headers or {}), "Range": "bytes=0-0"}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
    for attempt in range(attempts):
        try:
            async with client.request(url, req, timeout) as resp:
                if resp.status in (401, 403):
                    raise AccessDenied(url, resp.status)
                if resp.status >= 500 and attempt + 1 < attempts:
                    continue
                resp.raise_for_status()
                return Validator.from_response(resp), resp.status == 206
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
            if attempt + 1 == attempts:
                raise
        await asyncio.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


class RemoteFile:
    """Random access to a remote file by ranged GETs (for zip central directories and members)."""

    def __init__(self, client: Fetcher, url: str, validator: Validator, headers: dict[str, str] | None = None) -> None:
        if validator.length is None:
            raise ValueError(f"{url}: size unknown, cannot read it by ranges")
        self.client = client
        self.url = url
        self.validator = validator
        self.headers = dict(headers or {})
        self.size = validator.length
        self.requests = 0

    async def read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        self.requests += 1
        stream = ResumableStream(
            self.client, self.url, self.headers, start=offset, end=offset + length - 1, validator=self.validator
        )
        out = bytearray()
        async for chunk in stream:
            out += chunk
        if len(out) != length:
            raise RemoteChanged(f"{self.url}: short ranged read at {offset} ({len(out)} of {length} bytes)")
        return bytes(out)


class LocalFile:
    """Random access to a local (spooled or kept) file, with the same interface as RemoteFile."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size
        self._f = open(path, "rb")

    async def read(self, offset: int, length: int) -> bytes:
        def _read() -> bytes:
            self._f.seek(offset)
            return self._f.read(length)

        return await asyncio.to_thread(_read)

    def close(self) -> None:
        self._f.close()
