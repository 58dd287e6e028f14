"""The image MDS as a map-style dataset for DataLoader workers: decode, resize + crop, tokenize.

Streaming's own iteration pads every rank to the same length with repeated samples; encoding
must see each input row exactly once, so this module splits the global row range into
contiguous, disjoint slices itself and reads rows by index (`StreamingDataset.__getitem__`).
Contiguous slices keep each worker on few shards.

Rows are read as raw column bytes (`Column`: the MDS encoding and the stored bytes) and only the
columns the encoder needs are decoded. That is what lets the image column be MDS `jpeg` (bin/fetch,
the micro-budget converters) or `bytes` (mosaicml's LAION writer), and lets `--copy-columns` write
every input column back byte for byte, whatever its encoding.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
from collections import Counter
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from streaming import StreamingDataset
from streaming.base.format.mds.encodings import mds_decode

from encode.models import Tokenize
from encode.paths import stream_location

# Errors Pillow raises for bytes that are not a usable image.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class Column(NamedTuple):
    """One stored value of a row: its MDS encoding and its bytes, not decoded."""

    encoding: str
    data: bytes

    def decode(self) -> Any:
        return mds_decode(self.encoding, self.data)


# Encodings whose bytes are an image file Pillow opens itself (`bytes`: mosaicml's LAION MDS).
IMAGE_FILE_ENCODINGS = ("jpeg", "png", "webp", "bytes")
IMAGE_ENCODINGS = (*IMAGE_FILE_ENCODINGS, "pil")
REQUIRED = {"jpg": IMAGE_ENCODINGS, "caption": ("str", "json")}


def _raw_sample(shard: Any, data: bytes) -> dict[str, Column]:
    """`MDSReader.decode_sample` without the decoding: the same walk over the column sizes."""
    sizes, idx = [], 0
    for size in shard.column_sizes:
        if size is None:
            size = int.from_bytes(data[idx : idx + 4], "little")
            idx += 4
        sizes.append(size)
    row: dict[str, Column] = {}
    for name, encoding, size in zip(shard.column_names, shard.column_encodings, sizes):
        row[name] = Column(encoding, data[idx : idx + size])
        idx += size
    return row


def open_source(path: str, cache_dir: str | None = None, validate_hash: str | None = None) -> StreamingDataset:
    """The image MDS at `path` (local folder or remote URL), unshuffled, read by index only;
    `validate_hash` checks each downloaded shard of a remote one. Rows come back as
    `{column: Column}`: each shard reader's decoding is replaced by `_raw_sample` (Streaming still
    locates, downloads and retries the shards)."""
    remote, local = stream_location(path, cache_dir)
    source = StreamingDataset(remote=remote, local=local, shuffle=False, batch_size=1, validate_hash=validate_hash)
    for shard in source.shards:
        shard.decode_sample = functools.partial(_raw_sample, shard)  # type: ignore[method-assign]  # a partial pickles into spawned workers
    return source


def input_columns(shards: Sequence[dict], uniform: bool) -> dict[str, str]:
    """Column → encoding of the image MDS whose index lists `shards`.

    Every shard must be MDS with a `jpg` image column (`jpeg`, `png`, `webp`, `pil`, or `bytes`
    holding an image file) and a `caption`. With `uniform` (columns are copied into the output,
    which has one schema) all shards must also have the same columns. Raises ValueError.
    """
    found: dict[str, str] | None = None
    for shard in shards:
        if shard.get("format", "mds") != "mds":
            raise ValueError(
                f"{shard.get('raw_data', {}).get('basename')}: format {shard.get('format')!r}, only MDS shards can be encoded"
            )
        cols = dict(zip(shard["column_names"], shard["column_encodings"]))
        for name, allowed in REQUIRED.items():
            if cols.get(name) not in allowed:
                have = f"is {cols[name]!r}" if name in cols else "is missing"
                raise ValueError(f"the input's {name!r} column {have}; expected one of {', '.join(allowed)}")
        if found is None:
            found = cols
        elif uniform and cols != found:
            raise ValueError(f"the input's shards have different columns ({found} and {cols}): copied columns need one schema")
    return found or {}


def row_key(row: dict[str, Column], index: int) -> str:
    """The row's `key` column; without one (or when it is empty) `#<index>`, the row's place in
    the input's merged index: unique and independent of the shard layout and world size. A URL
    is not used: web datasets repeat URLs, and keys must be unique (resume, per-row seeds)."""
    if "key" in row:
        key = row["key"].decode()
        if key not in (None, ""):
            return str(key)
    return f"#{index}"


def open_image(column: Column) -> Image.Image:
    """The row's image, opened lazily (decoded later, at reduced scale when it is a JPEG)."""
    if column.encoding in IMAGE_FILE_ENCODINGS:
        return Image.open(io.BytesIO(column.data))
    img = column.decode()
    if not isinstance(img, Image.Image):
        raise ValueError(f"a {column.encoding!r} value is not an image")
    return img


def rank_rows(num_rows: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous slice of [0, num_rows); slices are disjoint and cover every row."""
    return range(num_rows * rank // world_size, num_rows * (rank + 1) // world_size)


def key_seed(key: str, seed: int) -> int:
    """A per-row seed from the row's key, so a rerun samples the same latent whatever the order."""
    return (int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") ^ seed) & (2**63 - 1)


def resize_crop(img: Image.Image, size: int) -> np.ndarray:
    """Short side to `size` (bicubic; Pillow antialiases when shrinking), then a centred square crop."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.resize((nw, nh), Image.Resampling.BICUBIC).crop((left, top, left + size, top + size))
    return np.array(img, dtype=np.uint8)  # a writable copy, owned by the tensor that wraps it


class ImageRows(torch.utils.data.Dataset):
    """Rows `indices` of an image MDS, prepared for the encoders.

    Each item is a dict with `key`, `caption`, uint8 CHW `images` per resolution, token `ids` and
    `mask` (of the caption, cleaned by `clean` when given), optional `noise` per resolution
    (`--latent-mode sample`) and `copied` (the raw bytes
    of the input columns named in `copy`, written unchanged); or
    `{'error': reason}` for a row that cannot be decoded (counted instead of stopping the run) or
    whose key is in `done` (written by an earlier run). Skipping here rather than before the
    loop lets the workers do a resume's key lookups in parallel with encoding.
    """

    def __init__(
        self,
        source: StreamingDataset,
        indices: Sequence[int],
        resolutions: Sequence[int],
        tokenize: Tokenize,
        noise_shapes: dict[int, tuple[int, ...]] | None,
        seed: int,
        copy: Sequence[str] = (),
        done: frozenset[str] = frozenset(),
        clean: Callable[[str], str] | None = None,
    ):
        self.source, self.indices, self.done, self.clean = source, indices, done, clean
        self.resolutions = sorted(resolutions)
        self.tokenize, self.noise_shapes, self.seed, self.copy = tokenize, noise_shapes, seed, tuple(copy)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        row: dict[str, Column] = self.source[index]
        try:
            key = row_key(row, index)
            if key in self.done:
                return {"error": "already_done"}
            caption = row["caption"].decode()
            if not isinstance(caption, str):
                raise ValueError(f"caption is a {type(caption).__name__}, not a str")
            if self.clean is not None:  # in the workers: ~0.3 ms a caption
                caption = self.clean(caption)
            item: dict[str, Any] = {"key": key, "caption": caption, "images": self._images(open_image(row["jpg"]))}
        except DECODE_ERRORS as e:
            return {"error": f"decode_error:{type(e).__name__}"}
        item["ids"], item["mask"] = self.tokenize(item["caption"])
        if self.noise_shapes:
            gen = torch.Generator().manual_seed(key_seed(item["key"], self.seed))
            item["noise"] = {r: torch.randn(s, generator=gen) for r, s in self.noise_shapes.items()}
        if self.copy:
            item["copied"] = {name: row[name].data for name in self.copy}
        return item

    def _images(self, img: Image.Image) -> dict[int, torch.Tensor]:
        """Decode once at the smallest JPEG scale that still covers the largest resolution."""
        largest = self.resolutions[-1]
        w, h = img.size
        scale = largest / min(w, h)
        img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        img = img.convert("RGB")
        # HWC → CHW view; collate's stack makes the one contiguous copy.
        return {r: torch.from_numpy(resize_crop(img, r)).permute(2, 0, 1) for r in self.resolutions}


def collate(items: list[dict]) -> dict:
    """Stack the good rows; rows that failed or were done before are only counted (`errors`)."""
    good = [it for it in items if "error" not in it]
    batch: dict = {
        "errors": Counter(it["error"] for it in items if "error" in it),
        "key": [it["key"] for it in good],
        "caption": [it["caption"] for it in good],
    }
    if not good:
        return batch
    batch["images"] = {r: torch.stack([it["images"][r] for it in good]) for r in good[0]["images"]}
    batch["ids"] = torch.stack([it["ids"] for it in good])
    batch["mask"] = torch.stack([it["mask"] for it in good])
    if "noise" in good[0]:
        batch["noise"] = {r: torch.stack([it["noise"][r] for it in good]) for r in good[0]["noise"]}
    if "copied" in good[0]:
        batch["copied"] = [it["copied"] for it in good]
    return batch
