#!/usr/bin/env python3
"""Does the event loop of a ``bin/fetch`` run stall on disk I/O? Per-call timings of every
disk-touching site, on the loop thread or not, plus a loop-lag probe.

    .venv/bin/python benchmarks/bench_loop_stalls.py              # every scenario (~1 min on 2 cores)
    .venv/bin/python benchmarks/bench_loop_stalls.py --quick      # small sizes, a smoke test (~15 s)
    .venv/bin/python benchmarks/bench_loop_stalls.py --rev HEAD   # a committed tree (git archive) instead
    .venv/bin/python benchmarks/bench_loop_stalls.py --scenarios urls,urls-offload --keep-outputs

What it does (nothing in ``fastfetch/`` is changed; the run is instrumented from outside):

* builds synthetic inputs under ``--work`` (default ``/tmp/fastfetch-loop-stalls``): a pool of
  noisy JPEGs (short side 300-511 px, ~100 KB, stored byte for byte by the fast path, so the
  two cores go to moving bytes rather than resizing), SA-1B-style tars with their captions tar,
  and COCO-style zips;
* serves them from a separate process (aiohttp on 127.0.0.1 only; ``/norange/…`` ignores
  Range, which forces the spooled-download path of zip sources);
* runs ``fastfetch.cli.main`` in a child process (``--child``) that first wraps, with
  ``time.perf_counter``, the functions that touch the disk and records for every call its
  start, duration, bytes and whether it ran on the loop (main) thread:
  ``UnitWriter.write/finish``, ``MDSWriter.write/_flush/finish`` and the writes/close of the
  shard file, ``storage.fsync_path/replace_durably/write_atomically``, the ``Manifest``
  methods that commit (``start``, ``finish``, ``set_meta``, ``sync_plan``, …), the URL-list
  planning (``UrlsSource._list_kinds``, ``urls._write_parquet``; both in threads of their own), every ``write``/``read`` of a
  file opened by ``fastfetch.ranged`` (``download_file``: spooled archives, side files) and
  ``fastfetch.sources.archive_source`` (``--keep-archives`` tee of a streamed tar, re-reading a kept
  archive), and ``CaptionIndex.get``; and runs a loop-lag probe (a task that sleeps 1 ms in a
  loop and records how late it wakes up);
* prints, per scenario, the lag (p50/p99/max, ms) over the whole fetch phase, over the probe
  samples that overlapped a loop-thread disk call and over those that did not, then per site:
  calls on / off the loop, calls/s, bytes per call, per-call time median/p99/max and the share
  of the fetch phase the loop spent blocked in that site; and a probe of the output disk
  itself (64 MiB write + fsync, one SQLite WAL commit with synchronous=FULL).

Scenarios: ``demo`` (the bundled demo, as shipped), ``urls`` (a URL list into --out on disk),
``urls-tmpfs`` (the same into /dev/shm: no device under the writes), ``urls-offload`` (the
same as ``urls`` with a prototype of the fix patched in by this script: a full shard is written
and hashed by a writer thread, see ``offload_flush``), ``sa1b-keep`` (tars
streamed with --keep-archives), ``sa1b-kept`` (the same rerun from the kept archives, evicted
from the page cache first), ``coco-spool`` (zips from a server without Range: spooled to the
work dir). Raw per-call records go to ``WORK/results/<scenario>.json``; the summary to
``WORK/results/summary.json``. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: the source tree whose fastfetch runs (the child learns it from the environment)
TREE = Path(os.environ.get("BENCH_LOOP_STALLS_TREE", str(ROOT)))
CAPTION_REPO = "PixArt-alpha/SAM-LLaVA-Captions10M"
ALL_SCENARIOS = ("demo", "urls", "urls-tmpfs", "urls-offload", "sa1b-keep", "sa1b-kept", "coco-spool")
#: the sites whose loop-thread calls count as "disk" when lag samples are attributed
DISK_SITES = (
    "UnitWriter.write",
    "Manifest.start",
    "Manifest.finish",
    "Manifest.finish_retry",
    "Manifest.fail",
    "Manifest.reset",
    "Manifest.set_meta",
    "Manifest.sync_plan",
    "UrlsSource._list_kinds",
    "ranged.file.write",
    "archived.file.write",
    "archived.file.read",
    "CaptionIndex.get",
    "merge_index",
    "write_stats",
)


# ================================================================================================
# child: the instrumented fetch
# ================================================================================================
class Recorder:
    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[float, float, int, bool]]] = defaultdict(list)
        self.lag: list[tuple[float, float]] = []
        self.marks: dict[str, float] = {}
        self.main = threading.main_thread().ident

    def add(self, site: str, t0: float, dur: float, nbytes: int) -> None:
        self.calls[site].append((t0, dur, nbytes, threading.get_ident() == self.main))


REC = Recorder()


def _timed(
    site: str, fn: Callable[..., Any], before: Callable[..., int] | None = None, after: Callable[..., int] | None = None
) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*a: Any, **k: Any) -> Any:
        nbytes = before(*a, **k) if before else 0
        t0 = time.perf_counter()
        try:
            result = fn(*a, **k)
        finally:
            dur = time.perf_counter() - t0
        if after:
            nbytes = after(result, *a, **k)
        REC.add(site, t0, dur, nbytes)
        return result

    return wrapper


class _TimedFile:
    """A file object whose write/writelines/read/close are timed under ``prefix``."""

    def __init__(self, f: Any, prefix: str) -> None:
        self._f, self._p = f, prefix

    def write(self, data: Any) -> int:
        t0 = time.perf_counter()
        n = self._f.write(data)
        REC.add(self._p + ".write", t0, time.perf_counter() - t0, len(data))
        return n

    def writelines(self, pieces: Any) -> None:
        pieces = list(pieces)
        t0 = time.perf_counter()
        self._f.writelines(pieces)
        REC.add(self._p + ".writelines", t0, time.perf_counter() - t0, sum(map(len, pieces)))

    def read(self, *a: Any) -> Any:
        t0 = time.perf_counter()
        data = self._f.read(*a)
        REC.add(self._p + ".read", t0, time.perf_counter() - t0, len(data))
        return data

    def close(self) -> None:
        t0 = time.perf_counter()
        self._f.close()
        REC.add(self._p + ".close", t0, time.perf_counter() - t0, 0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _timed_open(prefix: str) -> Callable[..., Any]:
    import builtins

    def opener(*a: Any, **k: Any) -> Any:
        return _TimedFile(builtins.open(*a, **k), prefix)

    return opener


def _size(path: Any) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


MISSED: list[str] = []


def _patch(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    """Replace ``owner.name`` by ``make(original)``; a name the tree does not have is noted, not fatal."""
    original = getattr(owner, name, None)
    if original is None:
        MISSED.append(f"{getattr(owner, '__name__', owner)}.{name}")
        return
    setattr(owner, name, make(original))


def install() -> None:
    """Wrap the candidate functions (module attributes: every caller looks them up at call time)."""
    import importlib

    from fastfetch import manifest, mds, mdswriter, pipeline, ranged, storage
    from fastfetch.body import body_len
    from fastfetch.sources import archive_source as archived
    from fastfetch.sources import urls

    cli = importlib.import_module("fastfetch.cli")

    def sample_bytes(self: Any, sample: dict[str, Any]) -> int:
        return body_len(sample["jpg"])

    _patch(mds.UnitWriter, "write", lambda f: _timed("UnitWriter.write", f, sample_bytes))
    _patch(mds.UnitWriter, "finish", lambda f: _timed("UnitWriter.finish", f))

    def split_write(orig: Callable[..., None]) -> Callable[..., None]:  # appends vs shard-filling writes
        def mds_write(self: Any, sample: dict[str, Any]) -> None:
            shards = len(self.shards)
            t0 = time.perf_counter()
            orig(self, sample)
            REC.add(
                "MDSWriter.write+flush" if len(self.shards) != shards else "MDSWriter.write(append)",
                t0,
                time.perf_counter() - t0,
                body_len(sample["jpg"]),
            )

        return mds_write

    _patch(mdswriter.MDSWriter, "write", split_write)
    _patch(
        mdswriter.MDSWriter,
        "_flush",
        lambda f: _timed(
            "MDSWriter._flush",
            f,
            lambda self: 8 + len(self._config_bytes) + sum(map(len, self._samples)) + 4 * len(self._samples),
        ),
    )
    _patch(mdswriter.MDSWriter, "finish", lambda f: _timed("MDSWriter.finish", f))
    mdswriter.open = _timed_open("mds.file")  # the shard and index.json files

    _patch(storage, "fsync_path", lambda f: _timed("storage.fsync_path", f, lambda p: _size(p)))
    _patch(storage, "replace_durably", lambda f: _timed("storage.replace_durably", f))
    _patch(storage, "write_atomically", lambda f: _timed("storage.write_atomically", f, lambda p, d: len(d)))
    for name in ("start", "finish", "finish_retry", "fail", "reset", "set_meta", "sync_plan", "records"):
        _patch(manifest.Manifest, name, lambda f, name=name: _timed(f"Manifest.{name}", f))
    _patch(urls.UrlsSource, "_list_kinds", lambda f: _timed("UrlsSource._list_kinds", f))
    _patch(urls, "_write_parquet", lambda f: _timed("urls._write_parquet", f, after=lambda r, t, p: _size(p)))
    ranged.open = _timed_open("ranged.file")  # download_file's .part (spooled archives, side files), LocalFile
    archived.open = _timed_open("archived.file")  # --keep-archives tee, kept-archive re-reads
    _patch(archived.CaptionIndex, "get", lambda f: _timed("CaptionIndex.get", f))
    if hasattr(cli, "write_stats"):
        _patch(cli, "write_stats", lambda f: _timed("write_stats", f))
    _patch(pipeline, "merge_index", lambda f: _timed("merge_index", f))

    def marked(label: str) -> Callable[[Any], Any]:
        def make(orig: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(orig)
            async def wrapper(*a: Any, **k: Any) -> Any:
                REC.marks[f"{label}_start"] = time.perf_counter()
                try:
                    return await orig(*a, **k)
                finally:
                    REC.marks[f"{label}_end"] = time.perf_counter()

            return wrapper

        return make

    _patch(pipeline.Pipeline, "prepare", marked("prepare"))
    _patch(pipeline.Pipeline, "run", marked("run"))

    # the lag probe: whatever coroutine the CLI hands to uvloop.run / asyncio.run runs beside it
    async def with_probe(coro: Any) -> Any:
        probe = asyncio.get_running_loop().create_task(lag_probe())
        REC.marks["fetch_start"] = time.perf_counter()
        try:
            return await coro
        finally:
            REC.marks["fetch_end"] = time.perf_counter()
            probe.cancel()

    import uvloop

    for mod in (uvloop, asyncio):
        _patch(mod, "run", lambda f: functools.wraps(f)(lambda coro, *a, **k: f(with_probe(coro), *a, **k)))


def offload_flush() -> None:
    """A prototype of the fix, for the ``urls-offload`` scenario only (the project is not changed):
    a shard that fills on the loop thread is written and hashed by one writer thread per
    ``MDSWriter`` (in order), and ``finish`` (already off the loop) waits for it first."""
    from concurrent.futures import ThreadPoolExecutor

    from fastfetch import mdswriter

    cls = mdswriter.MDSWriter
    timed_flush, orig_finish = cls._flush, cls.finish

    def write_shard(self: Any, index: int, samples: list[bytes]) -> None:
        n = len(samples)
        offsets = [4 + 4 * (n + 1) + len(self._config_bytes)]
        for sample in samples:
            offsets.append(offsets[-1] + len(sample))
        pieces = [mdswriter.struct.pack(f"<I{n + 1}I", n, *offsets), self._config_bytes, *samples]
        basename = f"shard.{index:05}.mds"
        t0 = time.perf_counter()
        with mdswriter.open(os.path.join(self.out, basename), "wb") as f:
            f.writelines(pieces)
        hashers = [(a, mdswriter.hasher(a)) for a in self.hashes]
        for piece in pieces:
            for _, h in hashers:
                h.update(piece)
        info = {"basename": basename, "bytes": sum(map(len, pieces)), "hashes": {a: h.hexdigest() for a, h in hashers}}
        self.shards.append({"samples": n, "raw_data": info, "zip_data": None, **self.config})
        REC.add("MDSWriter._flush (writer thread)", t0, time.perf_counter() - t0, info["bytes"])

    def _flush(self: Any) -> None:
        if threading.get_ident() != REC.main:
            timed_flush(self)
            return
        if not hasattr(self, "_pool"):
            self._pool, self._next = ThreadPoolExecutor(1, thread_name_prefix="mds-writer"), len(self.shards)
        t0 = time.perf_counter()
        index, self._next = self._next, self._next + 1  # shards are appended in order by the one writer thread
        samples, self._samples = self._samples, []
        self._size = 8 + len(self._config_bytes)
        self._pool.submit(write_shard, self, index, samples)
        REC.add("MDSWriter._flush (hand-off on the loop)", t0, time.perf_counter() - t0, sum(map(len, samples)))

    def finish(self: Any) -> None:
        if hasattr(self, "_pool"):
            self._pool.shutdown(wait=True)
            del self._pool
        orig_finish(self)

    cls._flush, cls.finish = _flush, finish


async def lag_probe(period: float = 0.001) -> None:
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(period)
        REC.lag.append((t0, time.perf_counter() - t0 - period))


def child(report: Path, argv: list[str]) -> int:
    sys.path.insert(0, str(TREE))
    import uvloop

    async def idle() -> None:  # the probe's floor on an idle loop (uvloop timers are 1 ms)
        task = asyncio.get_running_loop().create_task(lag_probe())
        await asyncio.sleep(0.5)
        task.cancel()

    uvloop.run(idle())  # before install(): run() is not wrapped yet
    idle_lag = [lag for _, lag in REC.lag]
    REC.lag.clear()
    install()
    if os.environ.get("BENCH_LOOP_STALLS_OFFLOAD"):
        offload_flush()
    from fastfetch.cli import main

    t0 = time.perf_counter()
    code = main(argv)
    REC.marks["exit"] = time.perf_counter()
    REC.marks["main_start"] = t0
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(
        json.dumps(
            {
                "code": code,
                "argv": argv,
                "tree": str(TREE),
                "not_patched": MISSED,
                "marks": REC.marks,
                "idle_lag": idle_lag,
                "lag": REC.lag,
                "calls": REC.calls,
            }
        )
    )
    return code


# ================================================================================================
# server: 127.0.0.1 only
# ================================================================================================
def serve(root: Path, port_file: Path) -> None:
    from aiohttp import web

    images = {p.name: p.read_bytes() for p in (root / "img").iterdir()}

    async def image(request: web.Request) -> web.Response:
        data = images.get(request.match_info["name"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="image/jpeg")

    async def file(request: web.Request) -> web.StreamResponse:
        path = (root / "files" / request.match_info["path"]).resolve()
        if not path.is_relative_to(root / "files") or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)  # sendfile, Range, ETag

    async def norange(request: web.Request) -> web.StreamResponse:
        path = (root / "files" / request.match_info["path"]).resolve()
        if not path.is_relative_to(root / "files") or not path.is_file():
            raise web.HTTPNotFound()
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = path.stat().st_size
        await resp.prepare(request)
        try:
            with open(path, "rb") as f:  # noqa: ASYNC230 (a test server: blocking reads are fine here)
                while chunk := f.read(1 << 20):
                    await resp.write(chunk)
        except (ConnectionError, RuntimeError):
            pass  # the client read only the headers (a probe)
        return resp

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/img/{name}", image)
        app.router.add_get("/norange/{path:.*}", norange)
        app.router.add_get("/{path:.*}", file)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_file.write_text(str(runner.addresses[0][1]))
        await asyncio.Event().wait()

    asyncio.run(main())


# ================================================================================================
# inputs
# ================================================================================================
def build_inputs(www: Path, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    stamp = www / "inputs.json"
    params = {"pool": args.pool, "tars": args.tars, "tar_images": args.tar_images, "coco_images": args.coco_images, "v": 1}
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return params
    shutil.rmtree(www, ignore_errors=True)
    (www / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    pool: list[bytes] = []
    for i in range(args.pool):
        short = int(rng.integers(300, 512))
        long = int(short * rng.uniform(1.0, 1.8))
        w, h = (long, short) if i % 2 else (short, long)
        grad = np.linspace(0, 1, w)[None, :, None] * rng.integers(0, 255, 3)[None, None, :]
        px = np.clip(grad + rng.normal(0, 18, (h, w, 3)) + 40, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(px, "RGB").save(buf, "JPEG", quality=90)
        pool.append(buf.getvalue())
        (www / "img" / f"{i:04d}.jpg").write_bytes(buf.getvalue())
    masks = json.dumps(
        {
            "annotations": [
                {"segmentation": {"counts": "x" * 2000, "size": [1500, 2250]}, "bbox": [i, i, 10, 10]} for i in range(48)
            ]
        }
    ).encode()
    files = www / "files"
    tars = files / "tars"
    tars.mkdir(parents=True)
    captions: dict[str, bytes] = {}
    n = 0
    for t in range(args.tars):
        with tarfile.open(tars / f"sa_{t:06d}.tar", "w", format=tarfile.GNU_FORMAT) as tf:
            for _ in range(args.tar_images):
                for name, data in ((f"sa_{n}.jpg", pool[n % len(pool)]), (f"sa_{n}.json", masks)):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 1_700_000_000
                    tf.addfile(info, io.BytesIO(data))
                captions[f"sa_{n}.txt"] = f"a noisy gradient, photograph number {n}".encode()
                n += 1
    hub = files / "datasets" / CAPTION_REPO / "resolve" / "main"
    hub.mkdir(parents=True)
    with tarfile.open(hub / "SA1B_caption.tar.gz", "w:gz") as tf:
        for name, text in captions.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(text), 1_700_000_000
            tf.addfile(info, io.BytesIO(text))
    coco = files / "coco"
    (coco / "zips").mkdir(parents=True)
    (coco / "annotations").mkdir()
    doc: dict[str, list[dict[str, Any]]] = {"images": [], "annotations": []}
    with zipfile.ZipFile(coco / "zips" / "val2014.zip", "w", zipfile.ZIP_STORED) as zf:
        for i in range(1, args.coco_images + 1):
            name = f"COCO_val2014_{i:012d}.jpg"
            zf.writestr(f"val2014/{name}", pool[i % len(pool)])
            doc["images"].append({"id": i, "file_name": name})
            doc["annotations"].append({"id": i, "image_id": i, "caption": f"a noisy gradient number {i}"})
    with zipfile.ZipFile(coco / "annotations" / "annotations_trainval2014.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("annotations/captions_val2014.json", json.dumps(doc))
    stamp.write_text(json.dumps(params))
    return params


def write_url_list(path: Path, base: str, n: int, pool: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [f"{base}/img/{i % pool:04d}.jpg?copy={i}" for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": [f"a noisy gradient number {i}" for i in range(n)]}), path)


# ================================================================================================
# the disk itself
# ================================================================================================
def disk_probe(folder: Path, reps: int = 5) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    buf = os.urandom(1 << 20)
    write, fsync, small = [], [], []
    for i in range(reps):
        path = folder / f"probe-{i}.bin"
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            f.writelines(buf for _ in range(64))
        t1 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        t2 = time.perf_counter()
        write.append((t1 - t0) * 1e3)
        fsync.append((t2 - t1) * 1e3)
        path.unlink()
    db_path = folder / "probe.sqlite"
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    db.execute("INSERT INTO t VALUES (1, '')")
    for i in range(100):
        t0 = time.perf_counter()
        db.execute("UPDATE t SET v=? WHERE id=1", (str(i) * 50,))
        small.append((time.perf_counter() - t0) * 1e3)
    db.close()
    for p in folder.glob("probe.sqlite*"):
        p.unlink()

    def med(xs):
        return sorted(xs)[len(xs) // 2]

    return {
        "write_64MiB_ms": [round(x, 1) for x in write],
        "fsync_64MiB_ms": [round(x, 1) for x in fsync],
        "sqlite_wal_full_commit_ms_median": round(med(small), 2),
        "sqlite_wal_full_commit_ms_max": round(max(small), 2),
    }


# ================================================================================================
# analysis
# ================================================================================================
def pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else 0.0


def analyse(rep: dict[str, Any]) -> dict[str, Any]:
    import bisect

    marks = rep["marks"]
    run0, run1 = marks.get("run_start", marks["fetch_start"]), marks.get("run_end", marks["fetch_end"])
    run_s = max(run1 - run0, 1e-9)
    # union of loop-thread disk intervals, per site, for attributing lag samples
    intervals: dict[str, list[tuple[float, float]]] = {}
    for site in DISK_SITES:
        xs = sorted((t0, t0 + d) for t0, d, _, on_loop in rep["calls"].get(site, []) if on_loop)
        if xs:
            intervals[site] = xs
    starts = {s: [a for a, _ in xs] for s, xs in intervals.items()}

    def overlap(site: str, a: float, b: float) -> float:
        xs, ss = intervals[site], starts[site]
        i = bisect.bisect_left(ss, b)
        total = 0.0
        j = i - 1
        while j >= 0 and (i - j) < 50:
            s0, s1 = xs[j]
            if s1 > a:
                total += min(s1, b) - max(s0, a)
            j -= 1
        return total

    phases: dict[str, list[float]] = defaultdict(list)
    stalls: dict[str, list[float]] = defaultdict(list)  # site → lags (ms) of samples > 5 ms it overlapped most
    for t0, lag in rep["lag"]:
        t1 = t0 + 0.001 + lag
        ms = lag * 1e3
        phase = "plan" if t0 < run0 else "run" if t0 < run1 else "publish"  # by when the sleep began
        phases[phase].append(ms)
        if phase != "run":
            continue
        # a sample is "disk-blocked" when loop-thread disk calls fill ≥ 1 ms and ≥ half of its lateness
        # (tiny calls such as an in-memory MDS append overlap nearly every sample and explain nothing)
        best, best_ov, covered = None, 0.0, 0.0
        for site in intervals:
            ov = overlap(site, t0, t1)
            covered += ov
            if ov > best_ov:
                best, best_ov = site, ov
        blocked = covered >= max(0.001, 0.5 * lag)
        phases["run:disk-blocked samples" if blocked else "run:other samples"].append(ms)
        if ms > 5:
            stalls[best if blocked and best else "(not disk: CPU, GC, …)"].append(ms)

    def lag_stats(xs: list[float]) -> dict[str, float]:
        return {
            "n": len(xs),
            "p50": round(pct(xs, 50), 2),
            "p99": round(pct(xs, 99), 2),
            "max": round(max(xs, default=0), 1),
            ">5ms": sum(x > 5 for x in xs),
            ">20ms": sum(x > 20 for x in xs),
        }

    sites = {}
    for site, calls in sorted(rep["calls"].items()):
        for where, flag in (("loop", True), ("thread", False)):
            mine = [c for c in calls if c[3] == flag]
            if not mine:
                continue
            durs = [c[1] * 1e3 for c in mine]
            in_run = [c for c in mine if run0 <= c[0] < run1]
            sites[f"{site} [{where}]"] = {
                "calls": len(mine),
                "calls_per_s_in_run": round(len(in_run) / run_s, 2),
                "bytes_median": int(pct([c[2] for c in mine], 50)),
                "bytes_max": max(c[2] for c in mine),
                "ms_median": round(pct(durs, 50), 3),
                "ms_p99": round(pct(durs, 99), 3),
                "ms_max": round(max(durs), 2),
                "ms_total": round(sum(durs), 1),
                "loop_share_of_run_%": round(100 * sum(c[1] for c in in_run) / run_s, 2) if flag else None,
            }
    kept = sum(1 for c in rep["calls"].get("UnitWriter.write", []) if run0 <= c[0] < run1)
    return {
        "exit_code": rep["code"],
        "run_s": round(run_s, 2),
        "kept_per_s": round(kept / run_s, 1),
        "total_s": round(marks["exit"] - marks["main_start"], 2),
        "idle_lag": lag_stats([x * 1e3 for x in rep["idle_lag"]]),
        "lag": {k: lag_stats(v) for k, v in phases.items()},
        "stalls_over_5ms_by_site": {
            k: {"n": len(v), "max_ms": round(max(v), 1), "sum_ms": round(sum(v), 1)}
            for k, v in sorted(stalls.items(), key=lambda kv: -sum(kv[1]))
        },
        "sites": sites,
    }


def print_analysis(name: str, a: dict[str, Any], extra: str = "") -> None:
    print(
        f"\n=== {name}: exit {a['exit_code']}, fetch phase {a['run_s']} s ({a['kept_per_s']} kept/s), process {a['total_s']} s {extra}"
    )
    print(f"  loop lag ms (1 ms probe)        {'n':>6} {'p50':>6} {'p99':>7} {'max':>7} {'>5ms':>5} {'>20ms':>5}")
    for k, s in [("idle loop (floor)", a["idle_lag"]), *a["lag"].items()]:
        print(f"  {k:32}{s['n']:>6} {s['p50']:>6} {s['p99']:>7} {s['max']:>7} {s['>5ms']:>5} {s['>20ms']:>5}")
    if a["stalls_over_5ms_by_site"]:
        print("  lag samples > 5 ms during the fetch phase, by the loop-thread disk site that blocked them:")
        for k, s in a["stalls_over_5ms_by_site"].items():
            print(f"    {k:40} n={s['n']:<4} max {s['max_ms']} ms, sum {s['sum_ms']} ms")
    print(
        f"  {'site [thread]':42} {'calls':>6} {'/s':>7} {'B/call med':>11} {'B max':>10} {'ms med':>8} {'p99':>8} {'max':>8} {'loop %':>7}"
    )
    for k, s in a["sites"].items():
        share = "" if s["loop_share_of_run_%"] is None else f"{s['loop_share_of_run_%']:.2f}"
        print(
            f"  {k:42} {s['calls']:>6} {s['calls_per_s_in_run']:>7} {s['bytes_median']:>11} {s['bytes_max']:>10} "
            f"{s['ms_median']:>8} {s['ms_p99']:>8} {s['ms_max']:>8} {share:>7}"
        )


# ================================================================================================
# orchestration
# ================================================================================================
def child_env(port: int, tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AWS_")) and "proxy" not in k.lower()}
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{port}",
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=str(tree),
        BENCH_LOOP_STALLS_TREE=str(tree),
    )
    return env


def run_child(name: str, argv: list[str], work: Path, port: int, timeout: float, tree: Path) -> dict[str, Any]:
    env = child_env(port, tree)
    if name == "urls-offload":
        env["BENCH_LOOP_STALLS_OFFLOAD"] = "1"
    report = work / "results" / f"{name}.json"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(report), "--", *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if not report.exists():
        sys.exit(f"{name}: no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    if proc.returncode not in (0, 1):
        print(proc.stderr[-2000:], file=sys.stderr)
    print(
        f"[{name}] {time.perf_counter() - t0:.1f} s wall; {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}",
        flush=True,
    )
    return json.loads(report.read_text())


def evict(folder: Path) -> None:
    """Drop the files under ``folder`` from the page cache (flushed first), so rereads hit the disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/fastfetch-loop-stalls"), help="inputs, outputs and results")
    p.add_argument("--scenarios", default=",".join(ALL_SCENARIOS), help=f"comma list of {', '.join(ALL_SCENARIOS)}")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    p.add_argument("--images", type=int, default=20000, help="URL-list rows (urls, urls-tmpfs)")
    p.add_argument("--unit-size", type=int, default=5000, help="bin/fetch --unit-size for the URL list")
    p.add_argument("--pool", type=int, default=64, help="distinct JPEGs served (under many URLs)")
    p.add_argument("--tars", type=int, default=4, help="SA-1B-style tars")
    p.add_argument("--tar-images", type=int, default=1500, help="images per tar")
    p.add_argument("--coco-images", type=int, default=3000, help="images in the COCO-style zip")
    p.add_argument("--keep-outputs", action="store_true", help="keep each scenario's --out (default: removed once measured)")
    p.add_argument("--workers", type=int, default=2, help="bin/fetch --workers")
    p.add_argument("--timeout", type=float, default=300, help="seconds per fetch run")
    p.add_argument(
        "--rev",
        default=None,
        help="measure this git revision (exported with git archive under --work) "
        "instead of the working tree, e.g. HEAD while the working tree is mid-change",
    )
    p.add_argument("--tree", type=Path, default=None, help="measure the fastfetch of this source tree (default: this checkout)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        os._exit(child(args.child, args.rest))
    if args.serve:
        serve(args.serve, args.port_file)
        return
    if args.quick:
        args.images, args.unit_size, args.tars, args.tar_images, args.coco_images = 1500, 500, 2, 200, 300
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(ALL_SCENARIOS)
    if unknown:
        sys.exit(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(ALL_SCENARIOS)}")
    work = args.work.resolve()
    www = work / "www"
    tree = (args.tree or ROOT).resolve()
    if args.rev:
        sha = subprocess.run(["git", "rev-parse", args.rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        tree = work / f"tree-{sha[:10]}"
        if not (tree / "fastfetch").is_dir():
            tree.mkdir(parents=True, exist_ok=True)
            archive = subprocess.run(["git", "archive", sha], cwd=ROOT, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    print(f"measuring the fastfetch of {tree}", flush=True)
    t0 = time.perf_counter()
    build_inputs(www, args)
    print(f"inputs ready in {time.perf_counter() - t0:.1f} s under {www}", flush=True)
    summary: dict[str, Any] = {
        "tree": str(tree),
        "args": {k: str(v) for k, v in vars(args).items() if k not in ("child", "serve", "port_file", "rest")},
    }
    summary["disk_probe"] = {"disk (" + str(work) + ")": disk_probe(work / "probe")}
    if "urls-tmpfs" in scenarios and Path("/dev/shm").is_dir():
        summary["disk_probe"]["tmpfs (/dev/shm)"] = disk_probe(Path("/dev/shm/fastfetch-loop-stalls-probe"))
        shutil.rmtree("/dev/shm/fastfetch-loop-stalls-probe", ignore_errors=True)
    print("disk probe:", json.dumps(summary["disk_probe"]), flush=True)

    port_file = work / "port"
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", str(www), "--port-file", str(port_file)],
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        for _ in range(200):
            if port_file.exists() and port_file.read_text():
                break
            if server.poll() is not None:
                sys.exit("the server did not start")
            time.sleep(0.05)
        port = int(port_file.read_text())
        base = f"http://127.0.0.1:{port}"
        common = ["--no-progress", "--workers", str(args.workers)]
        for name in scenarios:
            out = (Path("/dev/shm/fastfetch-loop-stalls") if name == "urls-tmpfs" else work / "out") / name
            if name != "sa1b-kept":
                shutil.rmtree(out, ignore_errors=True)
            extra = ""
            if name == "demo":
                argv = ["--dataset", "demo", "--out", str(out), *common]
            elif name in ("urls", "urls-tmpfs", "urls-offload"):
                lst = work / "lists" / f"urls-{args.images}-{port}.parquet"
                lst.parent.mkdir(parents=True, exist_ok=True)
                if not lst.exists():
                    write_url_list(lst, base, args.images, args.pool)
                argv = [
                    "--dataset",
                    "urls",
                    "--urls",
                    str(lst),
                    "--out",
                    str(out),
                    "--unit-size",
                    str(args.unit_size),
                    "--allow-private-networks",
                    "--per-host",
                    "64",
                    *common,
                ]
            elif name in ("sa1b-keep", "sa1b-kept"):
                links = work / "lists" / f"links-{port}.txt"
                links.parent.mkdir(parents=True, exist_ok=True)
                links.write_text(
                    "file_name\tcdn_link\n"
                    + "".join(f"{t.name}\t{base}/tars/{t.name}\n" for t in sorted((www / "files" / "tars").iterdir()))
                )
                out = work / "out" / "sa1b-keep"
                if name == "sa1b-kept":  # same --out: drop the dataset, keep _archives/, evict them from the cache
                    if not (out / "_archives").is_dir():
                        print("[sa1b-kept] skipped: needs sa1b-keep first", flush=True)
                        continue
                    for leftover in ("mds", "stats.json", "manifest.sqlite", "manifest.sqlite-wal", "manifest.sqlite-shm"):
                        shutil.rmtree(out / leftover, ignore_errors=True) if (out / leftover).is_dir() else (
                            out / leftover
                        ).unlink(missing_ok=True)
                    evict(out / "_archives")
                    extra = "(kept archives evicted from the page cache first)"
                argv = [
                    "--dataset",
                    "sa1b",
                    "--links",
                    str(links),
                    "--out",
                    str(out),
                    "--keep-archives",
                    "--allow-private-networks",
                    *common,
                ]
            else:  # coco-spool
                argv = [
                    "--dataset",
                    "coco",
                    "--coco-base-url",
                    f"{base}/norange/coco",
                    "--out",
                    str(out),
                    "--allow-private-networks",
                    *common,
                ]
            load0 = os.getloadavg()[0]
            rep = run_child(name, argv, work, port, args.timeout, tree)
            extra += f" load 1m {load0:.2f}→{os.getloadavg()[0]:.2f}"  # other work on the machine skews lag
            if rep.get("not_patched"):
                print(f"[{name}] not in this tree, not measured: {', '.join(rep['not_patched'])}", flush=True)
            a = analyse(rep)
            summary[name] = a
            print_analysis(name, a, extra)
            if not args.keep_outputs and name != "sa1b-keep":  # sa1b-kept reruns from sa1b-keep's archives
                shutil.rmtree(out, ignore_errors=True)
            if not args.keep_outputs and name == "sa1b-kept":
                shutil.rmtree(work / "out" / "sa1b-keep", ignore_errors=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)
        shutil.rmtree("/dev/shm/fastfetch-loop-stalls", ignore_errors=True)
        if not args.keep_outputs:
            shutil.rmtree(work / "out", ignore_errors=True)
    (work / "results").mkdir(parents=True, exist_ok=True)
    (work / "results" / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nsummary: {work / 'results' / 'summary.json'}; raw per-call records: {work / 'results'}/<scenario>.json")


if __name__ == "__main__":
    main()
