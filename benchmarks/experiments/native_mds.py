"""A streaming-free MDSWriter (experiment): the same files as streaming's MDSWriter, no torch.

Used by benchmarks/experiments/exp_fetch.py to measure what dropping the ``streaming`` import
from bin/fetch would give. Layout as streaming 0.13 writes it (format/mds/writer.py):
shard = u32 samples, u32 offsets[samples + 1], the JSON config, then each sample = u32 sizes of
its variable-size columns + the column bytes (columns sorted by name); index.json version 2.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

_FIXED = {"int8": "<b", "int16": "<h", "int32": "<i", "int64": "<q", "uint8": "<B", "uint16": "<H", "uint32": "<I",
          "uint64": "<Q", "float16": "<e", "float32": "<f", "float64": "<d"}


def _encode(encoding: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if encoding == "str":
        return value.encode("utf-8")
    if encoding in _FIXED:
        return struct.pack(_FIXED[encoding], value)
    if encoding == "json":
        return json.dumps(value).encode("utf-8")
    raise TypeError(f"experiment writer: unsupported encoding {encoding} for {type(value)}")


def _hash(algo: str, data: bytes) -> str:
    if algo.startswith("xxh"):
        import xxhash

        return getattr(xxhash, algo)(data).hexdigest()
    import hashlib

    return hashlib.new(algo, data).hexdigest()


class MDSWriter:
    def __init__(self, out: str, columns: dict[str, str], compression: str | None = None, hashes: list[str] | None = None,
                 size_limit: int | None = 1 << 26, keep_local: bool = False, **_: Any) -> None:
        assert compression is None, "experiment writer: no compression"
        self.local = str(out)
        os.makedirs(self.local, exist_ok=True)
        self.hashes = list(hashes or [])
        self.size_limit = size_limit
        self.names = sorted(columns)
        self.encodings = [columns[n] for n in self.names]
        self.sizes = [struct.calcsize(_FIXED[e]) if e in _FIXED else None for e in self.encodings]
        config = {"version": 2, "format": "mds", "compression": None, "hashes": self.hashes, "size_limit": size_limit,
                  "column_names": self.names, "column_encodings": self.encodings, "column_sizes": self.sizes}
        self.config = config
        self.config_data = json.dumps(config, sort_keys=True).encode("utf-8")
        self.shards: list[dict[str, Any]] = []
        self._reset()

    def _reset(self) -> None:
        self.samples: list[bytes] = []
        self.shard_size = 8 + len(self.config_data)

    def write(self, sample: dict[str, Any]) -> None:
        var_sizes = []
        parts = []
        for name, enc, size in zip(self.names, self.encodings, self.sizes):
            datum = _encode(enc, sample[name])
            if size is None:
                var_sizes.append(len(datum))
            parts.append(datum)
        data = struct.pack(f"<{len(var_sizes)}I", *var_sizes) + b"".join(parts)
        if self.size_limit and self.size_limit < self.shard_size + len(data) + 4 and self.samples:
            self._flush()
        self.samples.append(data)
        self.shard_size += len(data) + 4

    def _flush(self) -> None:
        n = len(self.samples)
        head = 4 + 4 * (n + 1) + len(self.config_data)
        offsets = [head]
        for s in self.samples:
            offsets.append(offsets[-1] + len(s))
        raw = struct.pack("<I", n) + struct.pack(f"<{n + 1}I", *offsets) + self.config_data + b"".join(self.samples)
        basename = f"shard.{len(self.shards):05}.mds"
        with open(os.path.join(self.local, basename), "wb") as f:
            f.write(raw)
        info = {"basename": basename, "bytes": len(raw), "hashes": {a: _hash(a, raw) for a in self.hashes}}
        self.shards.append({"samples": n, "raw_data": info, "zip_data": None, **self.config})
        self._reset()

    def finish(self) -> None:
        if self.samples:
            self._flush()
        with open(os.path.join(self.local, "index.json"), "w") as f:
            json.dump({"version": 2, "shards": self.shards}, f, sort_keys=True)

    def __enter__(self) -> "MDSWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()
