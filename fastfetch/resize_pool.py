"""The resize processes that run ``imaging.process``: bytes in, bytes (or a reason) out.

Each worker owns one Unix socket to the parent's event loop; a task is a length-prefixed
body, a result a small fixed header (+ reason, + new JPEG). There is no thread in between,
no pickling and no shared queue: ``concurrent.futures.ProcessPoolExecutor`` hands every task
through a manager thread and a feeder thread, and with the event loop holding the GIL those
hand-offs wait for the interpreter's switch interval (5 ms), which starves workers whose
images take 2–20 ms (benchmarks/PROFILING.md). Here the loop writes straight into a socket
and reads results as they arrive, so a worker's queue is refilled as soon as the loop runs.

A worker processes its socket in order, so results come back in the order tasks were sent:
the parent keeps one FIFO of pending futures per worker. A kept-as-is JPEG comes back as a
flag rather than as a second copy of its bytes. Workers are fresh interpreters running
``python -m fastfetch.resize_worker`` (the worker half and the frame formats, in a module of
its own so that a worker imports only Pillow and ``fastfetch.imaging``), and get their socket
by descriptor inheritance; they are not forks, because the parent runs an event loop and
threads, which ``fork`` does not copy safely.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import select
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastfetch.body import Body, body_bytes, body_len, body_pieces
from fastfetch.imaging import Processed, ResizeConfig, process_and_hash
from fastfetch.resize_worker import RESULT, TASK
from fastfetch.stats import peak_rss_mb

#: tasks queued per worker: enough that a worker never waits for the loop even on a run of
#: small images, few enough that the last images of a run are shared evenly between the
#: workers (the measurements behind 8: benchmarks/PROFILING.md, "Resize pool queue depth")
DEPTH = 8
_BUFFER = 4 << 20  # socket buffers: a few bodies in flight without waking the other side
_START_ATTEMPTS = 3  # workers in a row exiting before their first answer: they cannot start
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # where ``import fastfetch`` works from


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    sock: socket.socket
    pending: collections.deque[tuple[asyncio.Future[Processed], Body]] = field(default_factory=collections.deque, repr=False)
    connecting: asyncio.Task[asyncio.Transport] = field(init=False, repr=False)  # set by ResizePool._start
    waiting: int = 0  # tasks given to this worker that wait for its socket to be on the loop
    answered: int = 0  # results received from it

    @property
    def load(self) -> int:
        """Tasks given to this worker and not answered yet."""
        return len(self.pending) + self.waiting


class _Results(asyncio.BufferedProtocol):
    """One worker's socket on the event loop: each result frame completes the oldest pending
    future (a worker answers in order).

    A buffered protocol: the loop reads a frame's header into a fixed buffer and its reason
    and new JPEG straight into one buffer of their exact size, which becomes the result's
    data. A plain protocol would get every read as a fresh ``bytes``, copy it into a frame
    buffer and copy the JPEG out again: three copies, and page faults on each, of every
    resized image. Reads never go past the field being read, so a frame never has to be cut
    out of a read that holds the next one. A result costs no coroutine, future or task of
    its own on the way back."""

    def __init__(self, worker: _Worker, on_lost: Callable[[_Worker], None]) -> None:
        self._worker = worker
        self._on_lost = on_lost
        self._header = bytearray(RESULT.size)
        self._fields: tuple[int, ...] | None = None  # the header of the frame whose body is being read
        self._body = bytearray()
        self._target = memoryview(self._header)  # what the next bytes received fill
        self._filled = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._target[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._filled < len(self._target):
            return
        if self._fields is None:  # a header: then its reason and data, if it has any
            fields = RESULT.unpack(self._header)
            size = fields[0] + fields[6] + max(fields[5], 0)
            if size:
                self._fields, self._body = fields, bytearray(size)
                self._target, self._filled = memoryview(self._body), 0
                return
            self._complete(fields, b"")
        else:
            self._complete(self._fields, self._body)
            self._fields = None
        self._target, self._filled = memoryview(self._header), 0

    def _complete(self, fields: tuple[int, ...], body: bytearray | bytes) -> None:
        rlen, width, height, ow, oh, dlen, hlen = fields
        reason = body[:rlen].decode() if rlen else None
        digests = body[rlen : rlen + hlen].decode() if hlen else ""
        out: Body | None = (memoryview(body)[rlen + hlen :],) if dlen > 0 else (b"" if dlen == 0 else None)
        future, _ = self._worker.pending.popleft()
        self._worker.answered += 1
        if not future.done():  # the caller may have been cancelled meanwhile
            future.set_result(Processed(reason, out, width, height, ow, oh, digests))

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost(self._worker)


class ResizePool:
    """Asynchronous front of ``workers`` resize processes (``workers=0`` runs inline, for debugging).

    ``process(data)`` sends the body to the least-busy worker and waits for its answer; at
    most ``workers × DEPTH`` bodies are with the workers at once. A worker that dies (out of
    memory on a hostile image, killed) costs only the image it was on, counted as a decode
    error: it is replaced and its queued images are sent again.
    """

    def __init__(self, cfg: ResizeConfig, workers: int) -> None:
        """Made on the running event loop, which the workers' sockets join at once."""
        self.cfg = cfg
        self.workers = workers
        # Started now, so that the interpreters start while the source plans its units.
        self._workers = [self._start() for _ in range(workers)]
        self.capacity = max(1, workers) * DEPTH
        self._slots = asyncio.Semaphore(self.capacity)
        self._closed = False
        self._failed_starts = 0  # workers in a row that exited with an error before any answer
        self._broken: str | None = None  # why every image fails: the workers cannot start at all

    async def process(self, data: Body) -> Processed:
        async with self._slots:
            if self._broken is not None:
                raise RuntimeError(self._broken)  # a new one each time: a shared instance's traceback would grow
            if not self._workers:
                return process_and_hash(body_bytes(data), self.cfg)
            worker = min(self._workers, key=lambda w: w.load)
            future: asyncio.Future[Processed] = asyncio.get_running_loop().create_future()
            await self._send(worker, future, data)
            return await future

    async def _send(self, worker: _Worker, future: asyncio.Future[Processed], data: Body) -> None:
        # Counted while it waits: a burst of tasks at the start of a run (a whole first
        # archive chunk's images) must not all go to the worker that looks idle only because
        # its socket is not connected yet, leaving the other workers idle.
        worker.waiting += 1
        try:
            transport = await worker.connecting
        finally:
            worker.waiting -= 1
        worker.pending.append((future, data))
        # Bodies in flight are bounded by DEPTH per worker (and by the fetcher's memory
        # budget), so the transport's buffer needs no drain here.
        transport.writelines((TASK.pack(body_len(data)), *body_pieces(data)))  # pieces: no join

    async def _connect(self, worker: _Worker) -> asyncio.Transport:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_unix_connection(lambda: _Results(worker, self._lost), sock=worker.sock)
        return transport

    def _lost(self, worker: _Worker) -> None:
        if not self._closed:
            self._replace(worker)

    def _replace(self, dead: _Worker) -> None:
        """A worker died: its current image is a decode error, the rest go to its successor.

        A worker killed by a signal (out of memory on a hostile image) is simply replaced. One
        that exited with an error before answering anything failed to start (a broken Pillow,
        a bad interpreter): no image is blamed, and after ``_START_ATTEMPTS`` in a row every
        image fails with an error that says so, instead of respawning workers forever."""
        if dead not in self._workers:
            return
        _reap(dead.process, 1)
        dead.sock.close()
        status = dead.process.returncode
        failed_start = dead.answered == 0 and status is not None and status > 0
        self._failed_starts = self._failed_starts + 1 if failed_start else 0
        queued = list(dead.pending)
        if self._failed_starts >= _START_ATTEMPTS:
            self._broken = (
                f"the resize workers exit at start ({_START_ATTEMPTS} in a row, last exit status {status}; their "
                f"error is printed above). Check that `{sys.executable} -c 'import PIL.Image'` works in this "
                "environment, then rerun the same command"
            )
            self._workers.remove(dead)
            for future, _ in queued:
                if not future.done():
                    future.set_exception(RuntimeError(self._broken))
            return
        successor = self._start()
        self._workers[self._workers.index(dead)] = successor
        if queued and not failed_start:
            first, _ = queued.pop(0)
            if not first.done():
                first.set_result(Processed("decode_error"))
        for future, data in queued:
            if not future.done():
                asyncio.ensure_future(self._send(successor, future, data))

    def _start(self) -> _Worker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (parent, child):
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                s.setsockopt(socket.SOL_SOCKET, opt, _BUFFER)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
        # -P: the current directory is not put on sys.path, so a worker runs the package this
        # process runs (PYTHONPATH above), never a ``fastfetch`` folder where the user stands.
        cmd = [
            sys.executable,
            "-P",
            "-m",
            "fastfetch.resize_worker",
            str(child.fileno()),
            str(os.getpid()),
            json.dumps(dataclasses.asdict(self.cfg)),
        ]
        proc = subprocess.Popen(cmd, pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL)
        child.close()
        worker = _Worker(proc, parent)
        worker.connecting = asyncio.get_running_loop().create_task(self._connect(worker))  # ready before the first task
        return worker

    def close(self) -> float:
        """Stop the workers; returns the largest peak resident memory of one worker, in MB."""
        self._closed = True
        peak = max((peak_rss_mb(w.process.pid) for w in self._workers), default=0.0)
        for w in self._workers:
            try:  # end of stream now, whoever else holds the descriptor: the worker exits
                w.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if not w.connecting.done():
                w.connecting.cancel()
            elif not w.connecting.cancelled() and w.connecting.exception() is None:
                w.connecting.result().close()
            w.sock.close()
        for w in self._workers:
            _reap(w.process, 5)
        for w in self._workers:
            for future, _ in w.pending:
                future.cancel()
        self._workers = []
        return peak


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for a worker that was told to stop (end of stream); kill it if it does not.

    ``Popen.wait(timeout)`` polls with sleeps that grow to 50 ms, which is most of the time a
    run spends stopping its workers; a pidfd (Linux) wakes exactly when the worker exits."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux ≥ 5.3, or already reaped
        pidfd = None
    if pidfd is not None:
        try:
            waiter = select.poll()  # not select(): descriptors may be numbered past 1024
            waiter.register(pidfd, select.POLLIN)
            waiter.poll(timeout * 1000)
        finally:
            os.close(pidfd)
    try:
        proc.wait(0 if pidfd is not None else timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def default_workers() -> int:
    """One resize process per core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
