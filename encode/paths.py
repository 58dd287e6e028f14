"""Where datasets live: local folders, or `s3://`-style remotes through MosaicML Streaming.

Every place that turns a user-given dataset path into something Streaming can open goes through
here. A remote output is written into a local mirror (`stream_location`) and its finished
pieces are uploaded through `fastfetch.storage` (Streaming's uploaders, one error type);
`pull_small_files` brings the small bookkeeping files (chunk indexes, keys) of a remote output
back into the mirror, so that a rerun on another machine, or rank 0 merging chunks written by
other nodes, sees them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from fastfetch import storage
from fastfetch.storage import is_remote

INDEX = "index.json"


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
        storage.download(f"{remote.rstrip('/')}/{name}", dest, timeout=60)
    return dest


def fetched_dataset(data: str, cache_dir: str | None = None) -> str | None:
    """The `--dataset` bin/fetch made the image MDS `data` from, as the `stats.json` beside its MDS
    root records it (`OUT/stats.json` for `OUT/mds`, and for a part of it such as a bucket folder
    `OUT/mds/256-512`); None when there is none or it is unreadable (another tool's MDS)."""
    path = data.rstrip("/") if is_remote(data) else os.path.abspath(data)
    parts = path.split("/")
    root = max((i for i, part in enumerate(parts) if part == "mds"), default=None)
    if root is None:  # bin/fetch writes its MDS under OUT/mds: this is some other folder
        return None
    out = "/".join(parts[:root]) or "/"
    try:
        with open(fetch_small_file(out, "stats.json", cache_dir)) as f:
            dataset = json.load(f).get("settings", {}).get("dataset")
    except (OSError, ValueError, AttributeError, storage.StorageError):
        return None
    return dataset if isinstance(dataset, str) else None


def pull_small_files(remote: str, local: str, names: tuple[str, ...]) -> None:
    """Download every `<chunk>/<name>` under `remote` whose name is in `names` and is missing
    locally (finished chunks never change)."""
    storage.pull(remote, local, lambda rel: rel.count("/") == 1 and rel.rsplit("/", 1)[1] in names, refresh=False)
