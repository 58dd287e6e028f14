"""Per-rank latent MDS output, written in finished-or-absent chunks, plus the sidecar JSON.

Layout of `--out`:

    latents.json              models, dtypes, shapes, scaling factor, resolutions, code version
    index.json                merged index over all chunks (written by rank 0 at the end)
    r00000-c00000/            one finished chunk: MDS shards + index.json + keys.json
    r00001-c00000/ ...
    .progress/rank00000.json  live counters of each rank (progress bar, summary, stats.json)
    .locks/rank00000          held by the rank writing into `out` (a second run is refused)

A chunk is written under a `.tmp` name and renamed once its MDSWriter has finished, so a killed
run leaves only whole chunks behind; their `keys.json` tells a rerun which rows are done.
Merging is one level deep because that is what `streaming`'s `merge_index` understands.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from streaming import MDSWriter
from streaming.base.util import merge_index

from fastfetch import storage

META_NAME = "latents.json"
CHUNK_BOOKKEEPING = ("index.json", "keys.json")  # what a rerun or the merge needs of a chunk
PROGRESS_DIR = ".progress"
LOCK_DIR = ".locks"  # one lock file per rank: a second run into the same --out is refused
TMP_SUFFIX = ".tmp"


def chunk_dirs(out: str) -> list[str]:
    """Finished chunk folders under `out`, in name order."""
    if not os.path.isdir(out):
        return []
    return sorted(
        os.path.join(out, d)
        for d in os.listdir(out)
        if d.startswith("r") and "-c" in d and not d.endswith(TMP_SUFFIX) and os.path.exists(os.path.join(out, d, "index.json"))
    )


def remove_unfinished(out: str) -> None:
    """Drop chunks a killed run left half-written and its progress files (rank 0, before anyone
    reads `out`)."""
    shutil.rmtree(os.path.join(out, PROGRESS_DIR), ignore_errors=True)
    if os.path.isdir(out):
        for d in os.listdir(out):
            if d.endswith(TMP_SUFFIX):
                shutil.rmtree(os.path.join(out, d), ignore_errors=True)


def done_keys(out: str) -> set[str]:
    """Keys of all rows already written by any rank of any earlier run."""
    keys: set[str] = set()
    for d in chunk_dirs(out):
        with open(os.path.join(d, "keys.json")) as f:
            keys.update(json.load(f))
    return keys


def columns(resolutions: Sequence[int], copied: Mapping[str, str] | None = None) -> dict[str, str]:
    """The latent MDS schema (see DESIGN.md: Contracts), plus the input columns in `copied`
    (name → MDS encoding, written unchanged; see `copied_columns`)."""
    cols = own_columns(resolutions)
    cols.update({k: v for k, v in (copied or {}).items() if k not in cols})
    return cols


def own_columns(resolutions: Sequence[int]) -> dict[str, str]:
    cols = {"key": "str", "caption": "str", "caption_latents": "bytes", "caption_length": "int32"}
    cols.update({f"latents_{r}": "bytes" for r in resolutions})
    return cols


def copied_columns(inputs: Mapping[str, str], resolutions: Sequence[int], copy_all: bool, keep_images: bool) -> dict[str, str]:
    """The input columns written next to the latents, with their encodings: all of them with
    `--copy-columns` (so a reader of the input format, e.g. mosaicml's StreamingLAIONDataset,
    reads the output too), only `jpg` with `--keep-images`. A column the encoder writes itself
    (`key`, `caption`, `caption_latents`, `caption_length`, `latents_<res>`) is not copied: the
    freshly computed one takes its place. Nor is any other `latents_<n>` of the input: latents of
    other models must not sit next to ours under a latents.json that names ours."""
    ours = own_columns(resolutions)
    wanted = inputs if copy_all else {k: v for k, v in inputs.items() if keep_images and k == "jpg"}
    return {k: v for k, v in wanted.items() if k not in ours and not _is_latents(k)}


def _is_latents(name: str) -> bool:
    return name.startswith("latents_") and name[len("latents_") :].isdigit()


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (readers may poll the file while it is rewritten)."""
    storage.write_atomically(path, json.dumps(obj, indent=1).encode())


def read_meta(out: str) -> dict | None:
    path = os.path.join(out, META_NAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


class ChunkWriter:
    """Rows of one rank → a sequence of chunk folders of at most `chunk_rows` rows each."""

    def __init__(self, out: str, rank: int, cols: dict[str, str], chunk_rows: int, remote: str | None = None):
        self.out, self.rank, self.cols, self.chunk_rows, self.remote = out, rank, cols, chunk_rows, remote
        prefix = f"r{rank:05d}-c"
        taken = [int(os.path.basename(d)[len(prefix) :]) for d in chunk_dirs(out) if os.path.basename(d).startswith(prefix)]
        self.next_chunk = max(taken, default=-1) + 1
        self.writer: MDSWriter | None = None
        self.keys: list[str] = []

    def _path(self) -> str:
        return os.path.join(self.out, f"r{self.rank:05d}-c{self.next_chunk:05d}")

    def write(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            self.writer = MDSWriter(out=self._path() + TMP_SUFFIX, columns=self.cols, exist_ok=True)
        self.writer.write(row)
        self.keys.append(row["key"])
        if len(self.keys) >= self.chunk_rows:
            self.finish_chunk()

    def finish_chunk(self) -> None:
        """Close the open chunk and make it visible in one rename."""
        if self.writer is None:
            return
        self.writer.finish()
        tmp = self._path() + TMP_SUFFIX
        write_json(os.path.join(tmp, "keys.json"), self.keys)
        for name in os.listdir(tmp):  # a chunk is visible only once all of it is on the disk
            storage.fsync_path(os.path.join(tmp, name))
        storage.replace_durably(tmp, self._path())
        if self.remote:
            self._upload(self._path())
        self.writer, self.keys = None, []
        self.next_chunk += 1

    def _upload(self, chunk: str) -> None:
        """Shards first, the bookkeeping files last (a chunk counts once its keys.json is up),
        then free the local shards."""
        name = os.path.basename(chunk)
        shards = sorted(f for f in os.listdir(chunk) if f not in CHUNK_BOOKKEEPING)
        storage.upload(chunk, f"{self.remote}/{name}", shards + list(CHUNK_BOOKKEEPING))
        for f in shards:
            os.remove(os.path.join(chunk, f))


class AsyncWriter:
    """A thread that turns encoded batches into rows, so the device never waits on disk.

    The queue is bounded: if the disk is slower than the device, `submit` blocks instead of
    letting host memory grow. On CUDA, each batch carries an event recorded after its
    device→host copies; the thread waits on that event before touching the memory.
    """

    def __init__(self, chunks: ChunkWriter, stats: Counter, max_pending: int = 4):
        self.chunks, self.stats = chunks, stats
        for name in ("rows", "skipped_non_finite"):  # the thread only updates existing keys, so the
            stats.setdefault(name, 0)  # main thread can copy `stats` while it runs
        self.queue: queue.Queue = queue.Queue(max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="latent-writer", daemon=True)
        self.thread.start()

    def submit(self, batch: dict, encoded: dict[str, torch.Tensor]) -> None:
        """Queue one batch; `encoded` holds device tensors, copied to the host here (non-blocking)."""
        self._raise()
        host = {k: v.to("cpu", non_blocking=True) for k, v in encoded.items()}
        event = None
        if next(iter(encoded.values())).is_cuda:
            event = torch.cuda.Event()
            event.record()
        self.queue.put((batch, host, event))

    def close(self) -> None:
        """Drain the queue, finish the last chunk and re-raise any error from the thread."""
        self.queue.put(None)
        self.thread.join()
        self._raise()
        self.chunks.finish_chunk()

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError("the latent writer thread failed") from self.error

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._write(*item)
                except BaseException as e:  # reported to the main thread by submit/close
                    self.error = e

    def _write(self, batch: dict, host: dict[str, torch.Tensor], event) -> None:
        if event is not None:
            event.synchronize()
        finite = host["finite"].numpy()
        lengths = batch["mask"].sum(1).tolist()
        arrays = {k: v.numpy() for k, v in host.items() if k != "finite"}
        for i, key in enumerate(batch["key"]):
            if not finite[i]:
                self.stats["skipped_non_finite"] += 1
                continue
            row = dict(batch["copied"][i]) if "copied" in batch else {}  # raw bytes: MDSWriter keeps them as they are
            row.update({"key": key, "caption": batch["caption"][i], "caption_length": int(lengths[i])})
            row.update({k: np.ascontiguousarray(a[i]).tobytes() for k, a in arrays.items()})
            self.chunks.write(row)
            self.stats["rows"] += 1


class Progress:
    """This rank's counters in `out/.progress/rankNNNNN.json`, rewritten at most every `every` s.

    Files rather than collectives because ranks run different numbers of batches (resume,
    decode errors), and a collective per step would make the fastest rank wait for the slowest.
    """

    def __init__(self, out: str, rank: int, world_size: int, every: float = 2.0):
        self.dir = os.path.join(out, PROGRESS_DIR)
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, f"rank{rank:05d}.json")
        self.world_size, self.every, self.last = world_size, every, 0.0

    def update(self, stats: Counter, timing: dict[str, float], done: bool = False) -> None:
        now = time.monotonic()
        if done or now - self.last >= self.every:
            self.last = now
            write_json(self.path, {"stats": dict(stats), "timing": timing, "done": done})

    def read_all(self) -> list[dict]:
        """Every rank's latest counters (ranks that have not written yet are missing)."""
        found = []
        for r in range(self.world_size):
            try:
                with open(os.path.join(self.dir, f"rank{r:05d}.json")) as f:
                    found.append(json.load(f))
            except (FileNotFoundError, json.JSONDecodeError):
                continue
        return found


def merge(out: str) -> int:
    """Write `out/index.json` over all finished chunks; returns the number of rows."""
    indexes = [os.path.join(d, "index.json") for d in chunk_dirs(out)]
    if os.path.exists(os.path.join(out, "index.json")):  # from an earlier run; merge_index won't overwrite
        os.remove(os.path.join(out, "index.json"))
    if indexes:
        logging.disable(logging.WARNING)  # merge_index logs routine steps as warnings
        try:
            merge_index(indexes, out)
        finally:
            logging.disable(logging.NOTSET)
    else:  # nothing encoded (e.g. every row failed): still leave a valid empty dataset
        write_json(os.path.join(out, "index.json"), {"version": 2, "shards": []})
    rows = 0
    for path in indexes:
        with open(path) as f:
            rows += sum(s["samples"] for s in json.load(f)["shards"])
    return rows
