"""Where datasets live: local folders now, `s3://`-style remotes through MosaicML Streaming.

Every place that turns a user-given dataset path into something Streaming can open goes through
here, so that adding remote outputs later touches one module.
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
