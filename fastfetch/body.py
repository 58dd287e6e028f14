"""An image's bytes as they were received: one ``bytes``, or the pieces of received chunks.

An archive member usually spans several network chunks. Joining them costs a copy of every
image in the event loop's process (~0.3 ns a byte, 1–2 % of an archive run) and nobody needs
the joined copy: the pieces go to a resize worker's socket as they are (``writelines``), and
a JPEG kept as it is is joined once, into its MDS sample. So a body is either a ``bytes`` or
a tuple of byte buffers; these helpers are all the rest of the code needs to know about it.
"""

from __future__ import annotations

from typing import Union

Pieces = tuple[Union[bytes, memoryview], ...]
Body = Union[bytes, Pieces]


def body_len(body: Body) -> int:
    """The number of bytes in ``body``."""
    if isinstance(body, bytes):
        return len(body)
    return sum(piece.nbytes if isinstance(piece, memoryview) else len(piece) for piece in body)


def body_bytes(body: Body) -> bytes:
    """``body`` as one ``bytes`` (a copy only when it is in pieces)."""
    return body if isinstance(body, bytes) else b"".join(body)


def body_pieces(body: Body) -> Pieces:
    """``body`` as a tuple of buffers (for ``writelines`` and joins)."""
    return (body,) if isinstance(body, bytes) else body
