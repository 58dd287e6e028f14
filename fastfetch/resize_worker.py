"""A resize worker process: ``python -m fastfetch.resize_worker`` (started by ``ResizePool``).

The worker half of ``fastfetch.resize_pool``, kept apart so that a worker imports only what it
runs: the socket, Pillow and ``fastfetch.imaging``. Importing the pool's module would bring
asyncio and subprocess too, ~55 ms of every worker's start-up, spent while the parent is
still starting and competing with it for the same cores.

Frames on the socket (both directions, in order):

* a task: ``TASK`` (body length), then the body;
* a result: ``RESULT`` (reason length, width, height, original width and height, data length
  or -1 for "keep the original bytes", digests length), then the reason, the digests (ASCII),
  then the new JPEG.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import struct
import sys
from typing import Any

from fastfetch.heap import keep_freed_memory
from fastfetch.imaging import ResizeConfig, process_and_hash, warm_up

TASK = struct.Struct("<Q")  # body length
RESULT = struct.Struct("<iiiiiqi")  # reason length, width, height, original w, h, data length (-1: keep original), digests length


def serve(sock: socket.socket, cfg: ResizeConfig, parent: int) -> None:
    """Worker main loop: read a body, process it, answer; return at end of stream."""
    # A worker must not die of the parent's Ctrl-C: the parent decides when the workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # ... but it must die with the parent (Linux: PR_SET_PDEATHSIG), should it be SIGKILLed.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    keep_freed_memory()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)
    warm_up(cfg)
    while True:
        head = _read_exactly(sock, TASK.size)
        if head is None:
            return
        body = _read_exactly(sock, TASK.unpack(head)[0])
        if body is None:
            return
        out = process_and_hash(body, cfg)
        reason, digests = (out.reason or "").encode(), out.digests.encode()
        data = out.data
        assert data is None or isinstance(data, bytes)  # process() encodes into one bytes object
        frame = (
            RESULT.pack(
                len(reason),
                out.width,
                out.height,
                out.original_width,
                out.original_height,
                -1 if data is None else len(data),
                len(digests),
            )
            + reason
            + digests
        )
        _send(sock, frame, data)


def _send(sock: socket.socket, head: bytes, data: bytes | None) -> None:
    """A result's frame in one system call (the parent then reads it in one wake-up)."""
    if not data:
        sock.sendall(head)
        return
    sent = sock.sendmsg((head, data))
    if sent < len(head) + len(data):  # cut short by a signal: rare, so the copy does not matter
        sock.sendall((head + data)[sent:])


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes from a blocking socket, or None at end of stream.

    ``MSG_WAITALL`` receives straight into the returned ``bytes``, which Pillow then reads
    without copying (``io.BytesIO`` shares a ``bytes`` buffer but copies a ``bytearray``)."""
    data = sock.recv(n, socket.MSG_WAITALL)
    while len(data) < n:  # interrupted by a signal: rare, so the extra copy does not matter
        more = sock.recv(n - len(data), socket.MSG_WAITALL)
        if not more:
            return None
        data += more
    return data


def _main(argv: list[str]) -> None:
    if len(argv) != 3:
        sys.exit("usage: python -m fastfetch.resize_worker SOCKET_FD PARENT_PID CONFIG_JSON (started by ResizePool)")
    fd, parent, config = argv
    fields: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(config).items()
    }  # JSON has no tuples
    serve(socket.socket(fileno=int(fd)), ResizeConfig(**fields), int(parent))
    # Nothing is left to flush (every answer was sent with sendall): skip the interpreter's
    # teardown, which the parent would otherwise wait for at the end of every run.
    os._exit(0)


if __name__ == "__main__":
    _main(sys.argv[1:])
