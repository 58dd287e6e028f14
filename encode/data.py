"""The image MDS as a map-style dataset for DataLoader workers: decode, resize + crop, tokenize.

Streaming's own iteration pads every rank to the same length with repeated samples; encoding
must see each input row exactly once, so this module splits the global row range into
contiguous, disjoint slices itself and reads rows by index (`StreamingDataset.__getitem__`).
Contiguous slices keep each worker on few shards.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from streaming import StreamingDataset

from encode.models import Tokenize
from encode.paths import stream_location

# Errors Pillow raises for bytes that are not a usable image.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def open_source(path: str, cache_dir: str | None = None, validate_hash: str | None = None) -> StreamingDataset:
    """The image MDS at `path` (local folder or remote URL), unshuffled, read by index only;
    `validate_hash` checks each downloaded shard of a remote one."""
    remote, local = stream_location(path, cache_dir)
    return StreamingDataset(remote=remote, local=local, shuffle=False, batch_size=1, validate_hash=validate_hash)


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
    img = img.resize((nw, nh), Image.BICUBIC).crop((left, top, left + size, top + size))
    return np.array(img, dtype=np.uint8)  # a writable copy, owned by the tensor that wraps it


def jpeg_bytes(img: Image.Image) -> bytes:
    """The stored JPEG bytes behind a lazily opened image (Streaming's `jpeg` decoding wraps the
    row's bytes in a BytesIO), so `--keep-images` copies them instead of re-encoding.
    Call it before the image is loaded: Pillow lets go of the buffer afterwards."""
    return img.fp.getvalue()


class ImageRows(torch.utils.data.Dataset):
    """Rows `indices` of an image MDS, prepared for the encoders.

    Each item is a dict with `key`, `caption`, uint8 CHW `images` per resolution, token `ids` and
    `mask`, optional `noise` per resolution (`--latent-mode sample`) and `jpg`; or
    `{'error': reason}` for a row that cannot be decoded (counted instead of stopping the run) or
    whose key is in `done` (written by an earlier run). Skipping here rather than before the
    loop lets the workers do a resume's key lookups in parallel with encoding.
    """

    def __init__(self, source: StreamingDataset, indices: Sequence[int], resolutions: Sequence[int],
                 tokenize: Tokenize, noise_shapes: dict[int, tuple[int, ...]] | None, seed: int,
                 keep_images: bool, done: frozenset[str] = frozenset()):
        self.source, self.indices, self.done = source, indices, done
        self.resolutions = sorted(resolutions)
        self.tokenize, self.noise_shapes, self.seed, self.keep_images = tokenize, noise_shapes, seed, keep_images

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        try:
            row = self.source[self.indices[i]]  # Streaming opens the JPEG here, lazily
            if row["key"] in self.done:
                return {"error": "already_done"}
            raw = jpeg_bytes(row["jpg"]) if self.keep_images else None  # before decoding drops the buffer
            item = {"key": row["key"], "caption": row["caption"], "images": self._images(row["jpg"])}
        except DECODE_ERRORS as e:
            return {"error": f"decode_error:{type(e).__name__}"}
        item["ids"], item["mask"] = self.tokenize(item["caption"])
        if self.noise_shapes:
            gen = torch.Generator().manual_seed(key_seed(item["key"], self.seed))
            item["noise"] = {r: torch.randn(s, generator=gen) for r, s in self.noise_shapes.items()}
        if raw is not None:
            item["jpg"] = raw
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
    if "jpg" in good[0]:
        batch["jpg"] = [it["jpg"] for it in good]
    return batch
