"""An MDS shard writer that produces exactly the files of ``streaming.MDSWriter``, without
importing ``streaming``.

Why not use streaming's writer: ``import streaming`` imports torch and transformers (its
package ``__init__`` pulls in the dataloader and the text datasets): ~4 s of CPU and ~750 MB of
resident memory in every ``bin/fetch`` process and nothing of it is needed to append bytes to a
file. The format is small and versioned (streaming 0.13, ``format/mds/writer.py``): a shard is
``u32 samples``, ``u32 offsets[samples + 1]``, the JSON config, then each sample as the ``u32``
sizes of its variable-size columns followed by the column bytes in column-name order;
``index.json`` is version 2. ``tests/test_mdswriter.py`` checks the files byte for byte against
streaming's own writer, and everything is read back with streaming. Reading, remote upload and
downloading stay with streaming.

With ``background=True`` a full shard is written and hashed by a thread of the writer's own (one
at a time, in order) while the caller goes on appending samples: a 64 MB shard costs tens of
milliseconds, which on the fetch's event loop would stall every download in flight.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

import xxhash

from fastfetch.body import Body, body_len, body_pieces

_FIXED = {
    "int8": "<b",
    "int16": "<h",
    "int32": "<i",
    "int64": "<q",
    "uint8": "<B",
    "uint16": "<H",
    "uint32": "<I",
    "uint64": "<Q",
    "float16": "<e",
    "float32": "<f",
    "float64": "<d",
}
_VARIABLE = ("bytes", "str", "json", "jpeg", "png", "pil")
_BINARY = ("bytes", "jpeg", "png", "pil")  # the encodings whose values may come in pieces


class MDSWriter:
    """Write samples (dicts of column → value) into ``out`` as MDS shards of at most
    ``size_limit`` bytes, then ``index.json`` on ``finish``.

    Values of variable-size columns may be given as ``bytes`` or as a tuple of byte buffers
    (``fastfetch.body``; stored as they are, whatever the encoding: that is how a JPEG is
    stored without re-encoding), ``str`` (for ``str``) or any
    JSON value (for ``json``).
    """

    def __init__(
        self,
        out: str,
        columns: dict[str, str],
        hashes: list[str] | None = None,
        size_limit: int = 1 << 26,
        background: bool = False,
    ) -> None:
        unknown = sorted({e for e in columns.values() if e not in _FIXED and e not in _VARIABLE})
        if unknown:
            raise ValueError(f"MDS encodings {unknown} are not supported by fastfetch's writer")
        self.out = out
        os.makedirs(out, exist_ok=True)
        self.hashes = list(hashes or [])
        self.size_limit = size_limit
        self.names = sorted(columns)
        self.encodings = [columns[n] for n in self.names]
        self.sizes = [struct.calcsize(_FIXED[e]) if e in _FIXED else None for e in self.encodings]
        self.config = {
            "version": 2,
            "format": "mds",
            "compression": None,
            "hashes": self.hashes,
            "size_limit": size_limit,
            "column_names": self.names,
            "column_encodings": self.encodings,
            "column_sizes": self.sizes,
        }
        # streaming serialises the config with json.dumps(sort_keys=True): same separators here
        self._config_bytes = _json(self.config)
        self.shards: list[dict[str, Any]] = []
        self._samples: list[bytes] = []
        self._size = 8 + len(self._config_bytes)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mds-shard") if background else None
        self._pending: Future[dict[str, Any]] | None = None  # the shard the thread is writing (at most one)
        self._failed: BaseException | None = None  # what a shard's write raised: every later call raises it

    def write(self, sample: dict[str, Any]) -> None:
        if self._failed is not None:  # a shard was lost: the writer's output is not whole any more
            raise self._failed
        sizes: list[int] = []
        parts: list[bytes | memoryview] = []
        for name, encoding, size in zip(self.names, self.encodings, self.sizes):
            datum = _encode(encoding, sample[name])
            if size is None:
                sizes.append(body_len(datum))
            parts.extend(body_pieces(datum))
        data = b"".join([struct.pack(f"<{len(sizes)}I", *sizes), *parts])  # one copy of the JPEG
        if self._samples and self._size + len(data) + 4 > self.size_limit:
            self._flush()
        self._samples.append(data)
        self._size += len(data) + 4

    def finish(self, drop: Collection[int] = ()) -> None:
        """Write the last shard and ``index.json``. ``drop``: samples (numbered from 0 in the order
        written) to leave out after all: the shards holding them are written again without them
        (a shard left empty goes), the others stay as they are."""
        try:
            self.flush()
        finally:
            if self._thread is not None:
                self._thread.shutdown(wait=True)
        if drop:
            self._drop(set(drop))
        with open(os.path.join(self.out, "index.json"), "wb") as f:
            f.write(_json({"version": 2, "shards": self.shards}))

    def _flush(self) -> None:
        self._wait()  # at most one shard in the thread (memory stays at two shards); shards in order
        samples = self._samples
        self._samples = []
        self._size = 8 + len(self._config_bytes)
        sizes = [len(sample) for sample in samples]
        if self._thread is None:
            self.shards.append(self._write_shard(sizes, samples, len(self.shards)))
        else:
            self._pending = self._thread.submit(self._write_shard, sizes, samples, len(self.shards))

    def _wait(self) -> None:
        """Let the shard in the thread finish; what it raised (a full disk) fails the writer for good."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            self.shards.append(pending.result())
        except BaseException as exc:
            self._failed = exc
            raise

    def flush(self) -> None:
        """Write the samples held in memory as a shard now (a writer that waits before ``finish``
        holds none)."""
        if self._failed is not None:
            raise self._failed
        if self._samples:
            self._flush()
        self._wait()

    def _drop(self, drop: set[int]) -> None:
        kept_shards, first = [], 0
        for shard in self.shards:
            n = shard["samples"]
            gone = {i - first for i in range(first, first + n) if i in drop}
            first += n
            if not gone:
                kept_shards.append(shard)
                continue
            path = os.path.join(self.out, shard["raw_data"]["basename"])
            with open(path, "rb") as old:
                offsets = struct.unpack(f"<{n + 1}I", old.read(4 * (n + 2))[4:])
                kept = [i for i in range(n) if i not in gone]
                if kept:  # the kept samples are read one by one while the new shard is written: never the whole file at once
                    sizes = [offsets[i + 1] - offsets[i] for i in kept]
                    index = int(shard["raw_data"]["basename"].split(".")[1])
                    kept_shards.append(self._write_shard(sizes, _read_samples(old, offsets, kept), index, temporary=True))
                    os.replace(path + ".new", path)
            if not kept:
                os.unlink(path)
        self.shards = kept_shards

    def _write_shard(
        self, sizes: list[int], samples: Iterable[bytes | memoryview], index: int, temporary: bool = False
    ) -> dict[str, Any]:
        """Write shard ``index`` of samples of the given sizes (under ``<name>.new`` if
        ``temporary``), hashing it as it goes."""
        n = len(sizes)
        offsets = [4 + 4 * (n + 1) + len(self._config_bytes)]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        basename = f"shard.{index:05}.mds"
        hashers = [(a, hasher(a)) for a in self.hashes]
        written = 0
        with open(os.path.join(self.out, basename + (".new" if temporary else "")), "wb") as f:
            for piece in itertools.chain([struct.pack(f"<I{n + 1}I", n, *offsets), self._config_bytes], samples):
                f.write(piece)  # the shard is never joined into one more copy
                written += len(piece)
                for _, h in hashers:
                    h.update(piece)
        info = {"basename": basename, "bytes": written, "hashes": {a: h.hexdigest() for a, h in hashers}}
        return {"samples": n, "raw_data": info, "zip_data": None, **self.config}


def _read_samples(f: BinaryIO, offsets: Sequence[int], rows: list[int]) -> Iterator[bytes]:
    for i in rows:
        f.seek(offsets[i])
        yield f.read(offsets[i + 1] - offsets[i])


def _encode(encoding: str, value: Any) -> Body:
    if isinstance(value, bytes) or (isinstance(value, tuple) and encoding in _BINARY):
        return value  # bytes, or a body in pieces (fastfetch.body): stored as they are
    if encoding == "str":
        return value.encode("utf-8")
    if encoding in _FIXED:
        return struct.pack(_FIXED[encoding], value)
    if encoding == "json":
        return json.dumps(value).encode("utf-8")  # as streaming's JSON encoding: keys unsorted
    raise TypeError(f"cannot store a {type(value).__name__} in an MDS {encoding!r} column: give its bytes")


def _json(value: Any) -> bytes:
    """JSON as streaming writes its config and index: json.dumps(sort_keys=True)."""
    return json.dumps(value, sort_keys=True).encode("utf-8")


def hasher(algo: str) -> Any:
    """An incremental hasher for one of streaming's hash names (xxh*, or hashlib's); raises
    ValueError or AttributeError for a name neither knows."""
    if algo.startswith("xxh"):
        return getattr(xxhash, algo)()
    import hashlib

    return hashlib.new(algo)
