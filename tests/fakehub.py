"""A loopback imitation of the Hugging Face Hub (and of plain file servers) for the source tests.

It serves ``/datasets/<repo>/resolve/<rev>/<path>`` as the Hub serves LFS files (access check,
then a 302 to a CDN path that honours Range, If-Range, ETag and Last-Modified), for any
revision (a branch, tag or commit: ``add(..., revision=…)``), ``/api/datasets/<repo>/tree/<rev>/<folder>`` listings as
huggingface_hub's ``list_repo_tree`` reads them, gated repos (401 without a token, 403 with the
wrong one), and files that break their connection once in the middle. Archive builders make
small tar/tgz/zip files in each dataset's real layout.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import tarfile
import threading
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from conftest import LoopbackServer

LAST_MODIFIED = "Wed, 21 Oct 2015 07:28:00 GMT"


@dataclass
class ServedFile:
    """One file with its serving behaviour."""

    data: bytes
    etag: str = ""
    cut_at: int | None = None  # break the connection after this byte, once
    ranges: bool = True  # honour Range requests (a server that does not answers 200)
    throttle: float = 0.0  # seconds to wait after each 64 KiB written (a slow server)
    cut_done: bool = False
    gets: int = 0

    def __post_init__(self) -> None:
        if not self.etag:
            self.etag = '"' + hashlib.sha256(self.data).hexdigest()[:32] + '"'


def file_handler(f: ServedFile, token: str | None = None) -> object:
    """An aiohttp handler serving ``f`` (optionally only to ``Authorization: Bearer <token>``)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if token is not None:
            auth = request.headers.get("Authorization", "")
            if not auth:
                return web.Response(
                    status=401, text="Access to this dataset is restricted", headers={"X-Error-Code": "GatedRepo"}
                )
            if auth != f"Bearer {token}":
                return web.Response(status=403, text="You must accept the conditions", headers={"X-Error-Code": "GatedRepo"})
        data, total = f.data, len(f.data)
        start, end, status = 0, total - 1, 200
        rng = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if rng and f.ranges and (if_range is None or if_range in (f.etag, LAST_MODIFIED)):
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if m:
                if m.group(1) == "":
                    start = max(0, total - int(m.group(2)))
                else:
                    start = int(m.group(1))
                    end = min(total - 1, int(m.group(2))) if m.group(2) else total - 1
                if start >= total:
                    return web.Response(status=416, headers={"Content-Range": f"bytes */{total}"})
                status = 206
        headers = {
            "ETag": f.etag,
            "Last-Modified": LAST_MODIFIED,
            "Accept-Ranges": "bytes" if f.ranges else "none",
            "Content-Type": "application/octet-stream",
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        if request.method == "HEAD":
            return web.Response(status=status, headers={**headers, "Content-Length": str(end - start + 1)})
        f.gets += 1
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = end - start + 1
        await resp.prepare(request)
        body = data[start : end + 1]
        if f.cut_at is not None and not f.cut_done and start < f.cut_at <= end:
            f.cut_done = True
            await resp.write(body[: f.cut_at - start])
            assert request.transport is not None
            request.transport.close()  # the connection breaks mid-body
            return resp
        for i in range(0, len(body), 1 << 16):
            await resp.write(body[i : i + (1 << 16)])
            if f.throttle:
                await asyncio.sleep(f.throttle)
        await resp.write_eof()
        return resp

    return handle


def _redirect(location: str, token: str | None) -> object:
    async def handle(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        if token is not None and auth != f"Bearer {token}":
            return web.Response(status=403 if auth else 401, text="gated", headers={"X-Error-Code": "GatedRepo"})
        return web.Response(status=302, headers={"Location": location, "X-Linked-Etag": '"linked"'})

    return handle


@dataclass
class FakeHub:
    """Dataset repos served on a LoopbackServer; point HF_ENDPOINT at ``endpoint``."""

    server: LoopbackServer
    files: dict[str, dict[str, ServedFile]] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)  # gated repo → the token that may read it
    revisions: dict[tuple[str, str], dict[str, ServedFile]] = field(default_factory=dict)  # (repo, revision) → files

    @property
    def endpoint(self) -> str:
        return self.server.url("")

    def add(self, repo: str, path: str, data: bytes, revision: str = "main", **behaviour: object) -> ServedFile:
        served = ServedFile(data, **behaviour)  # type: ignore[arg-type]
        self.revisions.setdefault((repo, revision), {})[path] = served
        if revision == "main":
            self.files.setdefault(repo, {})[path] = served
        self._install(repo, revision)
        return served

    def gate(self, repo: str, token: str) -> None:
        self.tokens[repo] = token
        for name, revision in list(self.revisions):
            if name == repo:
                self._install(repo, revision)

    def resolve_path(self, repo: str, path: str, revision: str = "main") -> str:
        return f"/datasets/{repo}/resolve/{revision}/{path}"

    def _install(self, repo: str, revision: str = "main") -> None:
        token = self.tokens.get(repo)
        folders = {""}
        files = self.revisions.get((repo, revision), {})
        for path, served in files.items():
            # like the Hub's LFS files: resolve checks access and redirects to a CDN URL
            cdn = f"/cdn/{repo}/{hashlib.sha256(served.data).hexdigest()}"
            self.server.routes[self.resolve_path(repo, path, revision)] = _redirect(cdn, token)  # type: ignore[assignment]
            self.server.routes[cdn] = file_handler(served)  # type: ignore[assignment]
            parts = path.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        for folder in folders:
            route = f"/api/datasets/{repo}/tree/{revision}" + (f"/{folder}" if folder else "")
            self.server.routes[route] = self._tree_handler(files, folder, token)  # type: ignore[assignment]

    def _tree_handler(self, files: dict[str, ServedFile], folder: str, token: str | None) -> object:
        async def handle(request: web.Request) -> web.StreamResponse:
            if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
                status = 403 if request.headers.get("Authorization") else 401
                return web.json_response({"error": "gated"}, status=status, headers={"X-Error-Code": "GatedRepo"})
            recursive = request.query.get("recursive", "False").lower() == "true"
            prefix = f"{folder}/" if folder else ""
            listing = []
            for path, served in sorted(files.items()):
                if not path.startswith(prefix) or (not recursive and "/" in path[len(prefix) :]):
                    continue
                sha = hashlib.sha256(served.data).hexdigest()
                listing.append(
                    {
                        "type": "file",
                        "oid": hashlib.sha1(served.data).hexdigest(),
                        "size": len(served.data),
                        "path": path,
                        "lfs": {"oid": sha, "size": len(served.data), "pointerSize": 134},
                    }
                )
            return web.json_response(listing)

        return handle


# -- archive builders ----------------------------------------------------------------------------
def make_tar(members: Iterable[tuple[str, bytes]], gz: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def make_zip(members: Iterable[tuple[str, bytes]], compress: bool = True) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for name, data in members:
            z.writestr(name, data)
    return out.getvalue()


class DiskWatcher:
    """Polls folders while a fetch runs: the largest file seen (outside MDS output), spool sightings."""

    def __init__(self, *roots: Path) -> None:
        self.roots = roots
        self.largest = 0
        self.largest_name = ""
        self.spooled: set[str] = set()  # names of the files seen in a spool folder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> DiskWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.is_set():
            for root in self.roots:
                for dirpath, _, files in os.walk(root):
                    where = dirpath + "/"
                    if "/spool/" in where:
                        self.spooled.update(files)
                    if "/mds/" in where:
                        continue
                    for name in files:
                        try:
                            size = os.path.getsize(os.path.join(dirpath, name))
                        except OSError:
                            continue
                        if size > self.largest:
                            self.largest, self.largest_name = size, os.path.join(dirpath, name)
            self._stop.wait(0.005)
