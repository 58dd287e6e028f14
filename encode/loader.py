"""Training-side reader for the latent MDS that encode/run.py writes.

Shapes come from each dataset's sidecar `latents.json`, never from guesses, and the samples
look like the micro-budget training loaders' (`image_latents` [C, h, w] and `caption_latents`
[1, seq, dim] as float16, `drop_caption_mask` 0 = drop), so training code written for those
runs unchanged.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import torch
from streaming import Stream, StreamingDataset
from torch.utils.data import DataLoader

from encode.paths import fetch_small_file, stream_location
from encode.writer import META_NAME


def read_latents_meta(path: str, cache_dir: str | None = None) -> dict:
    """The sidecar JSON of the latent dataset at `path` (folder or remote URL)."""
    try:
        with open(fetch_small_file(path, META_NAME, cache_dir)) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no {META_NAME}; is this a folder written by encode/run.py?") from e


class StreamingLatentsDataset(StreamingDataset):
    """Latent rows decoded to tensors: `image_latents`, `caption_latents`, `caption`,
    `drop_caption_mask` (0. with probability `cap_drop_prob`, for classifier-free guidance)."""

    def __init__(self, *, streams: Sequence[Stream], image_shape: Sequence[int], caption_shape: Sequence[int],
                 image_size: int, cap_drop_prob: float, **kwargs: Any):
        super().__init__(streams=streams, **kwargs)
        self.image_key = f"latents_{image_size}"
        self.image_shape, self.caption_shape = tuple(image_shape), (1, *caption_shape)
        self.cap_drop_prob = cap_drop_prob

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        return {
            "caption": sample["caption"],
            "image_latents": _fp16(sample[self.image_key], self.image_shape),
            "caption_latents": _fp16(sample["caption_latents"], self.caption_shape),
            "drop_caption_mask": torch.tensor(0.0 if torch.rand(1).item() < self.cap_drop_prob else 1.0),
        }


def latent_space(meta: dict) -> dict:
    """What makes latents comparable across datasets: the same VAE and scaling, the same text
    encoder (equal shapes alone do not: SD 1.5's and SDXL's VAEs both give [4, 32, 32])."""
    models = meta.get("models", {})
    return {k: models.get(k) for k in ("vae", "scaling_factor", "shift_factor", "text_encoder")}


def _frozen(space: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in space.items()))


def _fp16(buf: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(buf, dtype=np.float16).copy()).reshape(shape)


def build_streaming_latents_dataloader(
    datadir: str | Sequence[str],
    batch_size: int,
    image_size: int = 256,
    cap_drop_prob: float = 0.0,
    shuffle: bool = True,
    drop_last: bool = True,
    *,
    cache_dir: str | None = None,
    **dataloader_kwargs: Any,
) -> DataLoader:
    """A DataLoader over one latent dataset or several mixed as streams.

    Each entry of `datadir` is a local folder or a remote URL (s3://…, read through Streaming with
    a local cache under `cache_dir`). All datasets must hold `latents_<image_size>` with the same
    latent and caption shapes, made by the same VAE and text encoder; anything else is an error
    rather than a silent reshape or a mix of latent spaces.
    """
    paths = [datadir] if isinstance(datadir, str) else list(datadir)
    if not paths:
        raise ValueError("datadir is empty")
    key = f"latents_{image_size}"
    streams, shapes, spaces = [], set(), {}
    for path in paths:
        meta = read_latents_meta(path, cache_dir)
        if key not in meta["shapes"]:
            have = sorted(int(k.split("_")[1]) for k in meta["shapes"] if k.startswith("latents_"))
            raise ValueError(f"{path} has no {key} (resolutions: {have}); pass one of those as image_size")
        shapes.add((tuple(meta["shapes"][key]), tuple(meta["shapes"]["caption_latents"])))
        spaces[path] = latent_space(meta)
        remote, local = stream_location(path, cache_dir)
        streams.append(Stream(remote=remote, local=local))
    if len(shapes) > 1:
        raise ValueError(f"datasets {paths} disagree on (latent, caption) shapes: {sorted(shapes)}")
    if len(set(map(_frozen, spaces.values()))) > 1:
        first, *others = paths
        odd = next(p for p in others if spaces[p] != spaces[first])
        diff = {k: (spaces[first].get(k), spaces[odd].get(k)) for k in spaces[first] if spaces[first].get(k) != spaces[odd].get(k)}
        raise ValueError(f"{first} and {odd} were encoded by different models {diff}: their latents do not mix")
    (image_shape, caption_shape), = shapes
    dataset = StreamingLatentsDataset(streams=streams, image_shape=image_shape, caption_shape=caption_shape,
                                      image_size=image_size, cap_drop_prob=cap_drop_prob, shuffle=shuffle,
                                      batch_size=batch_size)
    return DataLoader(dataset, batch_size=batch_size, drop_last=drop_last, **dataloader_kwargs)
