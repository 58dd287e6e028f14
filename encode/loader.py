"""Training-side reader for latent MDS datasets: the ones encode/run.py writes, and the ones the
micro-budget precompute script writes (no sidecar).

The samples look like the micro-budget training loader's (`image_latents` [C, h, w] and
`caption_latents` [1, seq, dim] as float16, `drop_caption_mask` 0 = drop), and
`build_streaming_latents_dataloader` takes that loader's arguments in the same order, so training
code written for it runs unchanged, on either kind of folder.

Shapes come from each dataset's sidecar `latents.json` when it has one (explicit arguments must
then agree with it). A folder without one (the micro-budget precompute writes none) gets its
shapes from the explicit arguments, or else from the byte lengths of its first row:

- caption: `cap_seq_size` tokens (default 77, the CLIP context both micro-budget and mosaicml
  assume), `cap_emb_dim` = bytes / 2 / seq;
- image: `image_size // 8` square (the SD/SDXL VAEs' downsampling), `latent_channels` = bytes / 2 /
  side².

Bytes that do not divide are a ValueError, never a silent reshape. The models that made such a
folder are unknown: folders without a sidecar mix with each other (the micro-budget recipe mixes
five), but not with folders whose sidecar names their models unless `allow_unknown_models=True`,
because nothing shows that they share a latent space.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from streaming import Stream, StreamingDataset
from streaming.base.format import reader_from_json
from torch.utils.data import DataLoader

from encode.paths import INDEX, fetch_small_file, stream_location
from encode.writer import META_NAME
from fastfetch import storage
from fastfetch.storage import StorageError

CAPTION_SEQ = 77  # default caption length of a folder without latents.json
LATENT_DOWNSAMPLE = 8  # image pixels per latent pixel assumed for a folder without latents.json


def read_latents_meta(path: str, cache_dir: str | None = None) -> dict:
    """The sidecar JSON of the latent dataset at `path` (folder or remote URL)."""
    meta = _meta_or_none(path, cache_dir)
    if meta is None:
        raise FileNotFoundError(f"{path}: no {META_NAME}; is this a folder written by encode/run.py?")
    return meta


def _meta_or_none(path: str, cache_dir: str | None) -> dict | None:
    try:
        with open(fetch_small_file(path, META_NAME, cache_dir)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except StorageError:  # absent, or present and unreadable: backends report both alike; a listing tells
        remote = stream_location(path, cache_dir)[0]
        if remote is None or META_NAME in storage.relative_names(remote, META_NAME):
            raise
        return None


class StreamingLatentsDataset(StreamingDataset):
    """Latent rows decoded to tensors: `image_latents`, `caption_latents`, `caption`,
    `drop_caption_mask` (0. with probability `cap_drop_prob`, for classifier-free guidance)."""

    def __init__(
        self,
        *,
        streams: Sequence[Stream],
        image_shape: Sequence[int],
        caption_shape: Sequence[int],
        image_size: int,
        cap_drop_prob: float,
        **kwargs: Any,
    ):
        super().__init__(streams=streams, **kwargs)
        self.image_key = f"latents_{image_size}"
        self.image_shape, self.caption_shape = tuple(image_shape), (1, *caption_shape)
        self.cap_drop_prob = cap_drop_prob

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]  # rows by int only
        sample = super().__getitem__(index)
        return {
            "caption": sample["caption"],
            "image_latents": _fp16(sample[self.image_key], self.image_shape),
            "caption_latents": _fp16(sample["caption_latents"], self.caption_shape),
            "drop_caption_mask": torch.tensor(0.0 if torch.rand(1).item() < self.cap_drop_prob else 1.0),
        }


def latent_space(meta: dict) -> dict:
    """What makes latents comparable across datasets: the same VAE and scaling, the same text
    encoder run at the same precision (equal shapes alone do not: SD 1.5's and SDXL's VAEs both
    give [4, 32, 32]). A sidecar older than `text_dtype` ran the text encoder in `--dtype`."""
    models = meta.get("models", {})
    space = {k: models.get(k) for k in ("vae", "scaling_factor", "shift_factor", "text_encoder")}
    space["text_dtype"] = models.get("text_dtype", meta.get("settings", {}).get("dtype"))
    return space


@dataclass(frozen=True)
class LatentFolder:
    """One dataset as the loader sees it: its shapes and, when its sidecar says, its models."""

    path: str
    image_shape: tuple[int, ...]
    caption_shape: tuple[int, int]
    space: dict | None  # None: no latents.json, the models are unknown


def _frozen(space: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in space.items()))


def _fp16(buf: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(buf, dtype=np.float16).copy()).reshape(shape)


def _first_row(path: str, cache_dir: str | None) -> dict[str, Any]:
    """The first row of the MDS at `path`, read from its first non-empty shard (downloaded into
    the Streaming cache when remote, where the loader would put it anyway)."""
    try:
        with open(fetch_small_file(path, INDEX, cache_dir)) as f:
            shards = json.load(f)["shards"]
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: neither {META_NAME} nor {INDEX}; is this a latent dataset?") from e
    shard = next((s for s in shards if s.get("samples")), None)
    if shard is None:
        raise ValueError(f"{path} holds no rows")
    if shard.get("format", "mds") != "mds" or shard.get("compression"):
        raise ValueError(
            f"{path}: its shards are {shard.get('compression') or shard.get('format')}; pass "
            "cap_seq_size, cap_emb_dim and latent_channels instead of having them read from a row"
        )
    fetch_small_file(path, shard["raw_data"]["basename"], cache_dir)
    return reader_from_json(stream_location(path, cache_dir)[1], None, shard).get_item(0)


def _other(n_bytes: int, known: int, given: int | None, what: str, expect: str, hint: str) -> int:
    """`given`, or else the float16 values in `n_bytes` divided by `known`; a ValueError unless
    `known` × it is exactly the number of values."""
    values, odd = divmod(n_bytes, 2)
    other = given if given is not None else values // known
    if odd or other < 1 or known * other != values:
        raise ValueError(f"{what}: {n_bytes} bytes are not {expect} float16 values; {hint}")
    return other


def _layout(
    path: str,
    image_size: int,
    cap_seq_size: int | None,
    cap_emb_dim: int | None,
    latent_channels: int | None,
    cache_dir: str | None,
) -> LatentFolder:
    key = f"latents_{image_size}"
    meta = _meta_or_none(path, cache_dir)
    if meta is not None:
        if key not in meta["shapes"]:
            have = sorted(int(k.split("_")[1]) for k in meta["shapes"] if k.startswith("latents_"))
            raise ValueError(f"{path} has no {key} (resolutions: {have}); pass one of those as image_size")
        image_shape, caption_shape = tuple(meta["shapes"][key]), tuple(meta["shapes"]["caption_latents"])
        asked = {
            "cap_seq_size": (cap_seq_size, caption_shape[0]),
            "cap_emb_dim": (cap_emb_dim, caption_shape[1]),
            "latent_channels": (latent_channels, image_shape[0]),
        }
        wrong = {k: v for k, (v, recorded) in asked.items() if v is not None and v != recorded}
        if wrong:
            raise ValueError(
                f"{path}: {wrong} disagree with its {META_NAME} (caption {list(caption_shape)}, {key} {list(image_shape)})"
            )
        return LatentFolder(path, image_shape, (caption_shape[0], caption_shape[1]), latent_space(meta))
    side = image_size // LATENT_DOWNSAMPLE
    if cap_seq_size and cap_emb_dim and latent_channels:  # all given: no row to read (compressed shards too)
        return LatentFolder(path, (latent_channels, side, side), (cap_seq_size, cap_emb_dim), None)
    row = _first_row(path, cache_dir)
    if key not in row:
        have = sorted(int(k.split("_")[1]) for k in row if k.startswith("latents_") and k[8:].isdigit())
        raise ValueError(f"{path} has no {key} (resolutions: {have}); pass one of those as image_size")
    channels = _other(
        len(row[key]),
        side * side,
        latent_channels,
        f"{path} {key}",
        f"{latent_channels or 'channels'} × {side} × {side}",
        f"pass latent_channels, or check image_size ({LATENT_DOWNSAMPLE}× downsampling is assumed)",
    )
    seq = cap_seq_size or CAPTION_SEQ
    dim = _other(
        len(row["caption_latents"]),
        seq,
        cap_emb_dim,
        f"{path} caption_latents",
        f"{seq} × {cap_emb_dim or 'width'}",
        "pass cap_seq_size and cap_emb_dim",
    )
    return LatentFolder(path, (channels, side, side), (seq, dim), None)


def build_streaming_latents_dataloader(
    datadir: str | Sequence[str],
    batch_size: int,
    image_size: int = 256,
    cap_seq_size: int | None = None,
    cap_emb_dim: int | None = None,
    cap_drop_prob: float = 0.0,
    shuffle: bool = True,
    drop_last: bool = True,
    *,
    latent_channels: int | None = None,
    allow_unknown_models: bool = False,
    cache_dir: str | None = None,
    **dataloader_kwargs: Any,
) -> DataLoader:
    """A DataLoader over one latent dataset or several mixed as streams.

    The arguments up to `drop_last` are the micro-budget loader's, in its order. Each entry of
    `datadir` is a local folder or a remote URL (s3://…, read through Streaming with a local cache
    under `cache_dir`), written by encode/run.py or by the micro-budget precompute script (see
    the module docstring for how shapes are found without a latents.json). All datasets must
    hold `latents_<image_size>` with the same latent and caption shapes; those with a latents.json
    must name the same VAE, text encoder and text precision; folders without one join those only
    with `allow_unknown_models=True`. Anything else is an error rather than a silent reshape or a
    mix of latent spaces.
    """
    paths = [datadir] if isinstance(datadir, str) else list(datadir)
    if not paths:
        raise ValueError("datadir is empty")
    layouts = [_layout(p, image_size, cap_seq_size, cap_emb_dim, latent_channels, cache_dir) for p in paths]
    shapes = {(lay.image_shape, lay.caption_shape) for lay in layouts}
    if len(shapes) > 1:
        raise ValueError(f"datasets {paths} disagree on (latent, caption) shapes: {sorted(shapes)}")
    known = [lay for lay in layouts if lay.space is not None]
    unknown = [lay.path for lay in layouts if lay.space is None]
    if known and unknown and not allow_unknown_models:
        raise ValueError(
            f"{unknown[0]} has no {META_NAME}, so the models behind its latents are unknown, while "
            f"{known[0].path} was encoded by {known[0].space}: mixing them could mix latent spaces; "
            "pass allow_unknown_models=True if they were made by the same models"
        )
    for odd in known[1:]:
        a, b = known[0].space or {}, odd.space or {}
        if _frozen(a) != _frozen(b):
            diff = {k: (a.get(k), b.get(k)) for k in a if a.get(k) != b.get(k)}
            raise ValueError(f"{known[0].path} and {odd.path} were encoded by different models {diff}: their latents do not mix")
    ((image_shape, caption_shape),) = shapes
    streams = [Stream(remote=remote, local=local) for remote, local in (stream_location(p, cache_dir) for p in paths)]
    dataset = StreamingLatentsDataset(
        streams=streams,
        image_shape=image_shape,
        caption_shape=caption_shape,
        image_size=image_size,
        cap_drop_prob=cap_drop_prob,
        shuffle=shuffle,
        batch_size=batch_size,
    )
    return DataLoader(dataset, batch_size=batch_size, drop_last=drop_last, **dataloader_kwargs)
