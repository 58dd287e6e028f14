"""Archive members without extracting anything: what the two readers share.

``tarstream`` parses tar (and gzip-compressed tar) incrementally from the async byte stream of a
download, one 512-byte header at a time, so nothing of the archive ever lands on disk and memory
holds at most one member. ``ziprange`` reads zip by random access (ranged HTTP reads of a
:class:`fastfetch.ranged.RemoteFile`, or a spooled :class:`fastfetch.ranged.LocalFile`), since
zip keeps its table of contents at the end. Both yield only regular files with safe relative
names (``safe_name``): links, devices, absolute paths and ``..`` are skipped, and nothing is
ever written to disk by name. What an archive declares is bounded before anything is held, and
a member that cannot be read faithfully (too large, sparse, a bomb) says why in its
``problem`` instead of being skipped unseen.
"""

from __future__ import annotations

import posixpath

MAX_MEMBER = 256 * 1024 * 1024  # a member larger than this is never held in memory
THREAD_MIN = 1 << 16  # inflate chunks at least this large in a thread (zlib releases the GIL)


class ArchiveError(Exception):
    """The archive is unreadable (bad header, truncated, not a tar/zip)."""


def safe_name(name: str) -> str | None:
    """A member name normalised to a relative POSIX path, or None when it is unsafe."""
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    if not name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../") or "/../" in f"/{norm}/":
        return None
    return norm
