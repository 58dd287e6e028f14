"""Where datasets live: local folders, or `s3://`-style remotes through MosaicML Streaming.

Every place that turns a user-given dataset path into something Streaming can open goes through
here. A remote output is written into a local mirror (`stream_location`) and its finished
pieces are uploaded with Streaming's uploaders; `pull_small_files` brings the small bookkeeping
files (chunk indexes, keys) of a remote output back into the mirror, so that a rerun on another
machine, or rank 0 merging chunks written by other nodes, sees them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.parse

from streaming.base.storage.download import CloudDownloader

INDEX = "index.json"


def is_remote(path: str) -> bool:
    """True for URLs with a scheme (s3://, gs://, oci://, hf://…); Streaming downloads those."""
    return urllib.parse.urlparse(str(path)).scheme not in ("", "file")


def stream_location(path: str, cache_dir: str | None = None) -> tuple[str | None, str]:
    """(remote, local) for a Streaming dataset at `path`.

    A remote gets a local cache folder: `cache_dir/<hash of the url>` so that several remotes can
    share one cache root, or a stable folder under the system temp dir when none is given.
    """
    if not is_remote(path):
        return None, os.path.abspath(path)
    digest = hashlib.sha1(path.encode()).hexdigest()[:16]
    root = cache_dir or os.path.join(tempfile.gettempdir(), "fastfetch-cache")
    return path, os.path.join(root, digest)


def fetch_small_file(path: str, name: str, cache_dir: str | None = None) -> str:
    """Local path of the file `name` inside dataset `path`, downloading it first if remote."""
    remote, local = stream_location(path, cache_dir)
    dest = os.path.join(local, name)
    if remote is not None and not os.path.exists(dest):
        os.makedirs(local, exist_ok=True)
        CloudDownloader.direct_download(f"{remote.rstrip('/')}/{name}", dest, timeout=60)
    return dest


def upload_files(local_dir: str, remote_dir: str, names: list[str]) -> None:
    """Upload `names` from `local_dir` to `remote_dir`, in the given order."""
    from streaming.base.storage.upload import CloudUploader

    uploader = CloudUploader.get(out=(local_dir, remote_dir), keep_local=True, exist_ok=True)
    for name in names:
        uploader.upload_file(name)


def remote_names(remote: str) -> set[str]:
    """Every object below `remote`, as paths relative to it."""
    from streaming.base.storage.upload import CloudUploader

    prefix = urllib.parse.urlparse(remote).path.strip("/")
    scratch = os.path.join(tempfile.gettempdir(), "fastfetch-lister")  # the uploader wants a local side
    lister = CloudUploader.get(out=(scratch, remote), keep_local=True, exist_ok=True)
    # the uploader lists below its own remote; keys come back full
    return {key[len(prefix):].lstrip("/") if prefix else key for key in lister.list_objects() or []}


def pull_small_files(remote: str, local: str, names: tuple[str, ...]) -> int:
    """Download every `<folder>/<name>` under `remote` whose name is in `names` and is missing
    locally; returns how many were fetched."""
    url = urllib.parse.urlparse(remote)
    prefix = url.path.strip("/")
    fetched = 0
    for rel in sorted(remote_names(remote)):
        if rel.count("/") != 1 or rel.rsplit("/", 1)[1] not in names:
            continue
        dest = os.path.join(local, rel)
        if not os.path.exists(dest):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            key = f"{prefix}/{rel}" if prefix else rel
            CloudDownloader.direct_download(f"{url.scheme}://{url.netloc}/{key}", dest, timeout=120)
            fetched += 1
    return fetched
