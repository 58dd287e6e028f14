"""The peers' own reading code, re-implemented here line for line for the compatibility tests
(their packages pin older torch and streaming and pull in training stacks, so they cannot be
installed beside ours): the micro-budget diffusion training loader and mosaicml's LAION dataset,
with the columns mosaic's LAION writer declares."""

from __future__ import annotations

import io
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from streaming import Stream, StreamingDataset
from torch.utils.data import DataLoader


class SeedStreamingLatentsDataset(StreamingDataset):
    """micro_diffusion/datasets/latents_loader.py @ 900d7d4 (SonyResearch/micro_diffusion),
    `StreamingLatentsDataset`: the same constructor and `__getitem__`, unchanged."""

    def __init__(
        self,
        streams: Optional[List[Stream]] = None,
        shuffle: bool = False,
        image_size: Optional[int] = None,
        cap_seq_size: Optional[int] = None,
        cap_emb_dim: Optional[int] = None,
        cap_drop_prob: float = 0.0,
        batch_size: Optional[int] = None,
        **kwargs,
    ) -> None:
        super().__init__(streams=streams, shuffle=shuffle, batch_size=batch_size)
        self.image_size = image_size
        self.cap_seq_size = cap_seq_size
        self.cap_emb_dim = cap_emb_dim
        self.cap_drop_prob = cap_drop_prob

    def __getitem__(self, index: int) -> Dict[str, Union[torch.Tensor, str, float]]:
        sample = super().__getitem__(index)
        out = {}
        out["drop_caption_mask"] = 0.0 if torch.rand(1) < self.cap_drop_prob else 1.0
        out["caption_latents"] = torch.from_numpy(np.frombuffer(sample["caption_latents"], dtype=np.float16).copy()).reshape(
            1, self.cap_seq_size, self.cap_emb_dim
        )
        if self.image_size == 256 and "latents_256" in sample:
            out["image_latents"] = torch.from_numpy(np.frombuffer(sample["latents_256"], dtype=np.float16).copy()).reshape(
                -1, 32, 32
            )
        if self.image_size == 512 and "latents_512" in sample:
            out["image_latents"] = torch.from_numpy(np.frombuffer(sample["latents_512"], dtype=np.float16).copy()).reshape(
                -1, 64, 64
            )
        # out['caption'] = sample['caption']
        return out


def seed_build_streaming_latents_dataloader(
    datadir: Union[str, List[str]],
    batch_size: int,
    image_size: int = 256,
    cap_seq_size: int = 77,
    cap_emb_dim: int = 1024,
    cap_drop_prob: float = 0.0,
    shuffle: bool = True,
    drop_last: bool = True,
    **dataloader_kwargs,
) -> DataLoader:
    """The same file's `build_streaming_latents_dataloader`, unchanged (defaults included)."""
    if isinstance(datadir, str):
        datadir = [datadir]
    streams = [Stream(remote=None, local=d) for d in datadir]
    dataset = SeedStreamingLatentsDataset(
        streams=streams,
        shuffle=shuffle,
        image_size=image_size,
        cap_seq_size=cap_seq_size,
        cap_emb_dim=cap_emb_dim,
        cap_drop_prob=cap_drop_prob,
        batch_size=batch_size,
    )
    return DataLoader(dataset=dataset, batch_size=batch_size, sampler=None, drop_last=drop_last, **dataloader_kwargs)


class MosaicStreamingLAIONDataset(StreamingDataset):
    """diffusion/datasets/laion/laion.py @ 49282fd (mosaicml/diffusion), `StreamingLAIONDataset`:
    the constructor's arguments that matter here and `__getitem__` unchanged. Left out: the
    module-level `Image.MAX_IMAGE_PIXELS = None` (a process-wide switch, and no image here is
    near the limit)."""

    def __init__(
        self,
        streams: Optional[Sequence[Stream]] = None,
        shuffle: bool = False,
        tokenizer_name_or_path: str = "stabilityai/stable-diffusion-2-base",
        caption_drop_prob: float = 0.0,
        transform=None,
        batch_size: Optional[int] = None,
        image_size: Optional[int] = None,
    ) -> None:
        super().__init__(streams=streams, shuffle=shuffle, keep_zip=False, validate_hash=None, batch_size=batch_size)
        from transformers import CLIPTokenizer

        self.transform = transform
        self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_name_or_path, subfolder="tokenizer")
        self.caption_drop_prob = caption_drop_prob
        self.image_size = image_size

    def __getitem__(self, index):
        sample = super().__getitem__(index)
        img = Image.open(io.BytesIO(sample["jpg"]))
        if img.mode != "RGB":
            img = img.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        if torch.rand(1) < self.caption_drop_prob:
            caption = ""
        else:
            caption = sample["caption"]
        tokenized_caption = self.tokenizer(
            caption, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True
        )["input_ids"]
        tokenized_caption = torch.tensor(tokenized_caption)
        out = {"image": img, "captions": tokenized_caption}
        if "caption_latents" in sample:
            out["caption_latents"] = torch.from_numpy(np.frombuffer(sample["caption_latents"], dtype=np.float16).copy()).reshape(
                77, 1024
            )
        if self.image_size == 256 and "latents_256" in sample:
            out["image_latents"] = torch.from_numpy(np.frombuffer(sample["latents_256"], dtype=np.float16).copy()).reshape(
                4, 32, 32
            )
        if self.image_size == 512 and "latents_512" in sample:
            out["image_latents"] = torch.from_numpy(np.frombuffer(sample["latents_512"], dtype=np.float16).copy()).reshape(
                4, 64, 64
            )
        return out


MOSAIC_COLUMNS = {  # scripts/laion_cloudwriter.py @ 49282fd, in its order
    "punsafe": "float64",
    "pwatermark": "float64",
    "similarity": "float64",
    "caption": "str",
    "url": "str",
    "key": "str",
    "status": "str",
    "error_message": "str",
    "width": "int32",
    "height": "int32",
    "original_width": "int32",
    "original_height": "int32",
    "exif": "str",
    "jpg": "bytes",
    "hash": "int64",
    "aesthetic_score": "float64",
}
