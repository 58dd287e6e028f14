"""What the archive recipes share: archive streams and files, caption lookups, caption items.

Every archive recipe (sa1b, jdb, diffdb, cc12m, textcaps, coco) does the same three things
around its own layout: read one archive per unit without keeping it (a resumable stream for
tar, ranged reads or a spooled file for zip and parquet), join each image to its caption
through a lookup built once from a side file, and turn a caption-less image into a
``no_caption`` count rather than a row. Those live here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import shutil
import sqlite3
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import aiohttp
import orjson

from fastfetch import hub, storage
from fastfetch.archive import ArchiveError
from fastfetch.archive.tarstream import TarMember, iter_tar
from fastfetch.archive.ziprange import RandomAccess
from fastfetch.body import Body
from fastfetch.errors import Reason as R
from fastfetch.errors import UsageError
from fastfetch.held import HeldFolder, sweep_abandoned
from fastfetch.http import Fetcher, Refused
from fastfetch.ranged import (
    AccessDenied,
    LocalFile,
    RemoteChanged,
    RemoteFile,
    ResumableStream,
    Validator,
    download_file,
    probe,
)
from fastfetch.sources.base import Item, Source, SourceOptions, Unit, flag


def split_flag() -> Any:
    """``--split``, shared by the recipes of datasets that come in splits (one or several)."""
    return flag(
        None,
        nargs="+",
        help="which splits, one or several (e.g. --split train valid): jdb train|valid (default train); "
        "textcaps train|val|test (default train val, as the seed); coco val|train (default val)",
    )


def splits_of(given: tuple[str, ...] | None, allowed: tuple[str, ...], default: tuple[str, ...], dataset: str) -> tuple[str, ...]:
    """The chosen splits (``--split train valid`` or ``train,valid``), each once and in the
    dataset's own order, so that the same splits in another order are the same run; anything not
    in ``allowed`` is a usage error."""
    chosen = {s.strip() for value in given or default for s in value.split(",") if s.strip()}
    bad = sorted(chosen - set(allowed))
    if bad or not chosen:
        raise UsageError(f"--split {' '.join(bad) or repr('')}: --dataset {dataset} has splits {', '.join(allowed)}")
    return tuple(s for s in allowed if s in chosen)


@dataclass(frozen=True, slots=True)
class ArchiveOptions(SourceOptions):
    keep_archives: bool = flag(
        False,
        action="store_true",
        help="archive datasets: also keep each downloaded archive under OUT/_archives/ (default: unpack "
        "from the stream and keep nothing)",
    )


@dataclass(frozen=True, slots=True)
class HubOptions(ArchiveOptions):
    hf_revision: str = flag(
        hub.DEFAULT_REVISION,
        help="Hugging Face datasets: the branch, tag or commit to read (pin a commit for a reproducible dataset)",
    )


@dataclass(frozen=True, slots=True)
class HubSplitOptions(HubOptions):
    split: tuple[str, ...] | None = split_flag()


def split_fingerprint(splits: tuple[str, ...]) -> str:
    """The splits as a run's settings record them (one split: its name, as before several were allowed)."""
    return "+".join(splits)


class SplitSource:
    """A recipe whose dataset comes in splits: ``--split`` (one or several), ``splits`` and the
    fingerprint that records them. Mixed in before the recipe's archive base class."""

    name: ClassVar[str]
    options: Any  # options with a ``split`` field (HubSplitOptions, CocoOptions)
    split_names: ClassVar[tuple[str, ...]]  # every split, in the dataset's order
    default_splits: ClassVar[tuple[str, ...]]

    @property
    def splits(self) -> tuple[str, ...]:
        return splits_of(self.options.split, self.split_names, self.default_splits, self.name)

    def fingerprint(self) -> dict[str, Any]:
        return {"split": split_fingerprint(self.splits)}


def caption_item(key: str, data: Body, caption: str | None, extra: dict[str, Any], reject: str | None = None) -> Item:
    """An archive image as an item; a missing or blank caption is a ``no_caption`` rejection."""
    caption = caption.strip() if isinstance(caption, str) else None
    if reject is None and not caption:
        reject = R.NO_CAPTION
    return Item(key, caption or "", data=data, extra=extra, reject=reject)


class CaptionIndex:
    """A SQLite lookup ``name → (caption, extra)`` built once from a dataset's caption side file.

    SA-1B has 11M captions and JourneyDB 4M prompts: a dict of them would cost gigabytes of
    memory in every run, a keyed SQLite table costs a few microseconds per lookup. The file
    is written under a temporary name and renamed when complete, so a killed build is redone.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    @property
    def ready(self) -> bool:
        return self.path.exists()

    def build(self, rows: Iterable[tuple[str, str | None, dict[str, Any] | None]]) -> int:
        """Write the lookup from (name, caption, extra) rows; the first row of a name wins."""
        with self.writer() as add:
            n = 0
            for name, caption, extra in rows:
                add(name, caption, extra)
                n += 1
        return n

    @contextlib.contextmanager
    def writer(self) -> Any:
        """A context giving ``add(name, caption, extra)``; the lookup appears only on success."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")  # several processes may build it at once
        tmp.unlink(missing_ok=True)
        db = sqlite3.connect(tmp)
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("CREATE TABLE captions (name TEXT PRIMARY KEY, caption TEXT, extra BLOB) WITHOUT ROWID")
        batch: list[tuple[str, str | None, bytes | None]] = []

        def add(name: str, caption: str | None, extra: dict[str, Any] | None = None) -> None:
            batch.append((name, caption, orjson.dumps(extra) if extra else None))
            if len(batch) >= 10_000:
                flush()

        def flush() -> None:
            db.executemany("INSERT OR IGNORE INTO captions VALUES (?, ?, ?)", batch)
            batch.clear()

        try:
            yield add
            flush()
            db.commit()
            db.close()
            storage.replace_durably(tmp, self.path)
        except BaseException:
            db.close()
            tmp.unlink(missing_ok=True)
            raise

    def get(self, name: str) -> tuple[str | None, dict[str, Any]] | None:
        """(caption, extra) for ``name``, or None when the side file does not know it."""
        if self._db is None:
            # immutable: the lookup never changes once renamed into place, so SQLite may skip
            # the file lock and change check it would otherwise make around every lookup
            uri = f"file:{urllib.parse.quote(str(self.path))}?mode=ro&immutable=1"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        row = self._db.execute("SELECT caption, extra FROM captions WHERE name=?", (name,)).fetchone()
        if row is None:
            return None
        return row[0], orjson.loads(row[1]) if row[1] else {}

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class Edition(NamedTuple):
    """Which version of an archive a unit was planned from: a tag (the hub's LFS hash, an ETag)
    and the size, where the source knows them."""

    tag: str | None = None
    size: int | None = None

    @classmethod
    def of(cls, spec: dict[str, Any]) -> Edition:
        tag = spec.get("oid") or spec.get("etag")
        return cls(str(tag) if tag else None, spec.get("size"))


NO_EDITION = Edition()


class ArchiveSource(Source):
    """Base of the recipes whose units are archives (tar streams, zips, parquet files).

    A unit runs anywhere (``--ray``): its spec names the archive, ``unit_payload`` ships what
    only the planning machine has (sa1b's expiring link), and ``lookups`` opens the caption
    lookups, built from their side files once per machine (or found built by the driver in a
    shared work folder): never the listing a plan makes."""

    Options: ClassVar[type[SourceOptions]] = ArchiveOptions
    options: ArchiveOptions

    async def lookups(self) -> None:
        """Open what ``items`` looks captions up in, building it from its side files first if
        this machine has not; ``plan`` calls it too. Default: nothing to look up."""

    async def prepare_unit(self, unit: Unit, payload: Any) -> None:
        # Several tasks may start on one machine at once: one builds the lookups, the others
        # wait for it and then open them (each build writes under a name of its own anyway).
        lock = self.ctx.work_dir / "lookups.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.2)  # a cancelled task stops waiting here
                except OSError:  # a shared filesystem without locks: the driver built them
                    break
            await self.lookups()
        finally:
            os.close(fd)

    def discard_leftovers(self) -> None:
        # A run killed with SIGKILL leaves its spooled archives behind; no other run can be
        # using them (one run per --out holds the lock), so they go before anything is fetched.
        shutil.rmtree(self.spool_dir, ignore_errors=True)

    # -- where things go -----------------------------------------------------------------------
    @property
    def keep_dir(self) -> Path | None:
        return self.ctx.local_root / "_archives" / self.name if self.options.keep_archives else None

    @property
    def spool_dir(self) -> Path:
        return self.ctx.work_dir / "spool"

    @property
    def client(self) -> Fetcher:
        return self.ctx.fetcher

    # -- reading archives ----------------------------------------------------------------------
    def _kept(self, name: str, edition: Edition) -> Path | None:
        """The kept copy of an archive when it is the edition the plan names. A copy of another
        edition (the file changed upstream since it was kept) is removed: the unit is redone
        from the new one. A copy kept before editions were recorded counts when its size fits."""
        keep = self.keep_dir
        if keep is None or not (keep / name).exists():
            return None
        path, stamp = keep / name, keep / f"{name}.edition"
        if edition.tag is None:
            return path
        if stamp.exists() and stamp.read_text() == edition.tag:
            return path
        if not stamp.exists() and edition.size == path.stat().st_size:
            stamp.write_text(edition.tag)
            return path
        path.unlink()
        stamp.unlink(missing_ok=True)
        return None

    def _stamp(self, name: str, edition: Edition) -> None:
        if self.keep_dir is not None and edition.tag is not None:
            storage.write_atomically(self.keep_dir / f"{name}.edition", edition.tag.encode())

    async def stream(
        self, url: str, name: str, headers: dict[str, str] | None = None, edition: Edition = NO_EDITION
    ) -> AsyncIterator[bytes]:
        """The bytes of one archive, resumed across broken connections (and kept if asked)."""
        kept = self._kept(name, edition)
        if kept is not None:
            with open(kept, "rb") as f:
                # in a thread: a kept archive read back from a cold page cache stalls for tens of ms
                while chunk := await asyncio.to_thread(f.read, 4 << 20):
                    yield chunk
            return
        keep = self.keep_dir
        body = ResumableStream(self.client, url, dict(headers or {}), read_timeout=max(60.0, self.ctx.fetcher.cfg.read_timeout))
        if keep is None:
            async for chunk in body:
                yield chunk
            return
        keep.mkdir(parents=True, exist_ok=True)
        part = keep / f"{name}.part"
        with open(part, "wb") as f:
            async for chunk in body:
                f.write(chunk)
                yield chunk
        await asyncio.to_thread(storage.replace_durably, part, keep / name)  # reruns trust a kept archive
        self._stamp(name, edition)

    async def tar_members(
        self, url: str, name: str, headers: dict[str, str] | None = None, edition: Edition = NO_EDITION
    ) -> AsyncIterator[TarMember]:
        async for member in iter_tar(self.stream(url, name, headers, edition)):
            yield member

    @contextlib.asynccontextmanager
    async def random_access(
        self, url: str, name: str, headers: dict[str, str] | None = None, edition: Edition = NO_EDITION
    ) -> AsyncIterator[RandomAccess]:
        """Random access to one archive: ranged reads when the server allows them, else a file
        spooled under the work dir and deleted as soon as the caller is done with it."""
        if self.keep_dir is None:
            validator, ranged = await probe(self.client, url, headers)
            if ranged and validator.length is not None:
                yield RemoteFile(self.client, url, validator, headers)
                return
        async with self.spooled(url, name, headers, edition) as path:
            local = LocalFile(path)
            try:
                yield local
            finally:
                local.close()

    @contextlib.asynccontextmanager
    async def spooled(
        self, url: str, name: str, headers: dict[str, str] | None = None, edition: Edition = NO_EDITION
    ) -> AsyncIterator[Path]:
        """One archive as a local file for the caller's lifetime: downloaded (resumably) into a
        private folder of the work dir and deleted on exit, or kept under OUT/_archives/."""
        keep = self.keep_dir
        if keep is not None:
            path = self._kept(name, edition) or await download_file(self.client, url, keep / name, headers)
            self._stamp(name, edition)
            yield path
            return
        tmp = HeldFolder(self.spool_dir / uuid.uuid4().hex[:16])
        sweep_abandoned(self.spool_dir)  # what a killed task spooled on this machine
        try:
            yield await download_file(self.client, url, tmp.path / name, headers)
        finally:
            tmp.release()

    @contextlib.contextmanager
    def side_errors(self, url: str, repo: str | None = None) -> Iterator[None]:
        """Turn a failure to read a plan-time side file into a usage error that says what to do.

        401/403 on a Hugging Face repo becomes the login message; anything else names the URL.
        """
        try:
            yield
        except AccessDenied as exc:
            if repo is not None:
                raise hub.access_error(repo, exc.status) from exc
            raise UsageError(f"no access to {url} (HTTP {exc.status})") from exc
        except Refused as exc:
            raise UsageError(
                f"refused to read {url}: {exc}"
                + ("; pass --allow-private-networks to read from your own network" if exc.reason == R.PRIVATE_ADDRESS else "")
            ) from exc
        except (aiohttp.ClientError, asyncio.TimeoutError, RemoteChanged, ArchiveError, OSError, ValueError) as exc:
            raise UsageError(f"cannot read {url}: {type(exc).__name__}: {exc}") from exc

    async def side_file(self, url: str, dest: Path, headers: dict[str, str] | None = None, repo: str | None = None) -> Path:
        """Download a caption side file once (resumable) into the work dir."""
        with self.side_errors(url, repo):
            return await download_file(self.client, url, dest, headers)

    async def check_access(
        self, url: str, repo: str | None = None, headers: dict[str, str] | None = None
    ) -> tuple[Validator, bool]:
        """Probe a file before planning on it: its validator, and whether it serves ranges."""
        with self.side_errors(url, repo):
            return await probe(self.client, url, headers)


class HubArchiveSource(ArchiveSource):
    """An archive recipe whose units are files of a Hugging Face dataset repository."""

    repo: str
    Options: ClassVar[type[SourceOptions]] = HubOptions
    options: HubOptions

    @property
    def revision(self) -> str:
        return self.options.hf_revision or hub.DEFAULT_REVISION

    async def hub_units(self, folder: str, pattern: str, unit_id: Any) -> list[Unit]:
        """One unit per repo file matching ``pattern`` (a regex on the file name) under ``folder``.

        The spec holds the file's path, size and LFS hash, so a file changed upstream is redone.
        """
        files = await hub.list_files(self.client, self.repo, folder, pattern, self.revision)
        if not files:
            raise UsageError(
                f"no file matching {pattern!r} under {folder or '/'} of {hub.dataset_page(self.repo)}; "
                "check the dataset layout or HF_ENDPOINT"
            )
        units = []
        for f in files:
            match = re.fullmatch(pattern, f.path.rsplit("/", 1)[-1])
            assert match is not None
            units.append(Unit(unit_id(match), {"path": f.path, "size": f.size, "oid": f.oid}))
        return units

    def hub_url(self, path: str) -> str:
        return hub.file_url(self.repo, path, self.revision)

    def hub_headers(self) -> dict[str, str]:
        return hub.headers()

    async def hub_side_file(self, path: str, dest: Path | None = None) -> Path:
        """A side file of the repo (captions, metadata) downloaded once into the work dir."""
        dest = dest or self.ctx.work_dir / path.rsplit("/", 1)[-1]
        return await self.side_file(self.hub_url(path), dest, self.hub_headers(), repo=self.repo)

    def unit_tar(self, unit: Unit, name: str | None = None) -> AsyncIterator[TarMember]:
        """A unit's tar, read as a stream; ``name``: what a kept copy is called (default: the
        file's own name, which must not repeat among the run's units)."""
        path = unit.spec["path"]
        name = name or path.rsplit("/", 1)[-1]
        return self.tar_members(self.hub_url(path), name, self.hub_headers(), Edition.of(unit.spec))
