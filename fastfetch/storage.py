"""Where outputs are kept: durable local writes, and object storage (``s3://``, ``gs://``,
``oci://``, …) through mosaicml-streaming, each in one place.

Local files that a rerun or a reader trusts (indexes, stats, plans, summaries, finished units,
kept archives) are written under a temporary name beside their final one, flushed to the disk
and renamed (``write_atomically``, ``replace_durably``): after a crash or a power loss the file
is its old version or its new one, whole, never a prefix.

Every upload, download and listing of a remote output goes through these few functions, so a
failure (a bucket that does not exist, refused credentials, an outage in the middle of a run)
always arrives as one ``StorageError`` that names the URL and the cause: before a run it is a
usage error (exit 2), during one it stops the run like a full disk (exit 1, finished units
kept). Streaming's uploaders know every backend's credentials and retries; what they do not do
is say which of our files failed, or fail the same way for every backend. ``streaming`` is
imported on first use only: it imports torch, seconds that a local run never pays.
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fastfetch.redact import redact

REMOTE_SCHEMES = ("s3://", "gs://", "oci://", "azure://", "azure-dl://", "hf://", "dbfs:/", "sftp://")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_SCRATCH = "fastfetch-storage"  # streaming's uploaders want a local side even to list


class StorageError(Exception):
    """Object storage refused or failed an operation; the message says which and why."""


def fsync_path(path: str | Path) -> None:
    """Flush a file, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: str | Path, final: str | Path) -> None:
    """Make ``tmp`` (a complete file, or a folder whose files are flushed) ``final`` in one rename,
    its bytes on the disk before the rename and the rename on the disk before returning."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(os.path.dirname(os.path.abspath(final)))


def write_atomically(path: str | Path, data: bytes) -> None:
    """Write ``data`` as the file ``path`` (its folder is created), all or nothing. The temporary
    file ``.<name>.<pid>.tmp`` beside it is unique per process, so two writers never share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    replace_durably(tmp, path)


def is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC anywhere in the exception chain (SQLite reports it as 'database or disk is full')."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_remote(path: str | Path) -> bool:
    """An object-storage or web URL (``s3://``, ``gs://``, ``hf://``, ``https://``, …) rather than a
    local path. Streaming reads every such URL; writing needs a storage scheme (``check`` says so)."""
    text = str(path)
    return text.startswith(REMOTE_SCHEMES) or (_URL.match(text) is not None and not text.startswith("file://"))


def upload(local_dir: str | Path, remote_dir: str, names: Iterable[str]) -> None:
    """Upload ``names`` from ``local_dir`` to ``remote_dir``, in the given order."""
    uploader = _uploader(str(local_dir), remote_dir)
    for name in names:
        with _failure(f"cannot upload {name} to {remote_dir}"):
            uploader.upload_file(name)


def download(remote_file: str, local_path: str | Path, timeout: float = 120) -> None:
    """Download one object to ``local_path`` (its folder is created)."""
    from streaming.base.storage.download import CloudDownloader

    os.makedirs(os.path.dirname(str(local_path)) or ".", exist_ok=True)
    with _failure(f"cannot download {remote_file}"):
        CloudDownloader.direct_download(remote_file, str(local_path), timeout=timeout)


def list_keys(remote: str, prefix: str = "") -> list[str]:
    """The full keys of the objects below ``remote`` (and ``prefix`` under it)."""
    uploader = _uploader(_scratch(), remote)
    with _failure(f"cannot list {remote}"):
        keys = uploader.list_objects(prefix) if prefix else uploader.list_objects()
    return list(keys or [])


def relative_names(remote: str, prefix: str = "") -> list[str]:
    """The objects below ``remote`` as paths relative to it."""
    root = urllib.parse.urlparse(remote).path.strip("/")
    return sorted(key[len(root) :].lstrip("/") if root else key for key in list_keys(remote, prefix))


def pull(remote: str, local: str | Path, want: Callable[[str], bool], prefix: str = "", refresh: bool = True) -> list[Path]:
    """Download every object below ``remote`` (and ``prefix`` under it) whose relative name
    ``want`` accepts into ``local/<name>``; with ``refresh`` off, a file already there is kept.
    Returns the local paths of every accepted object, in name order."""
    pulled = []
    for rel in relative_names(remote, prefix):
        if want(rel):
            dest = Path(local) / rel
            if refresh or not dest.exists():
                download(f"{remote.rstrip('/')}/{rel}", dest)
            pulled.append(dest)
    return pulled


def check(remote: str) -> None:
    """Raise ``StorageError`` unless ``remote`` can be reached and listed (the bucket exists,
    the credentials work): before a run writes anything."""
    list_keys(remote, "_nodes/")


def _uploader(local: str, remote: str) -> Any:
    import logging

    from streaming.base.storage.upload import CloudUploader

    # it warns about every non-empty local folder, which ours always are (exist_ok is the point)
    logging.getLogger("streaming.base.storage.upload").setLevel(logging.ERROR)
    with _failure(f"cannot open {remote}"):
        return CloudUploader.get(out=(local, remote), keep_local=True, exist_ok=True)


def _scratch() -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), _SCRATCH)


class _failure:
    """Any exception inside becomes a StorageError with ``what`` and the cause (redacted)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb: object) -> None:
        if exc is None or isinstance(exc, (StorageError, KeyboardInterrupt, SystemExit)) or not isinstance(exc, Exception):
            return
        raise StorageError(redact(f"{self.what}: {type(exc).__name__}: {exc}")) from exc
