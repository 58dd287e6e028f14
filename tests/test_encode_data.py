"""Pure pieces of encode/data.py: partitioning, resize + crop, per-key seeds, collate."""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import encode_models as em  # noqa: E402,F401  (puts the repo on sys.path, sets HF_HUB_OFFLINE)

from encode import data  # noqa: E402


def test_rank_rows_are_disjoint_and_cover_every_row():
    for n in range(0, 60):
        for world in range(1, 6):
            parts = [data.rank_rows(n, r, world) for r in range(world)]
            assert sorted(i for p in parts for i in p) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_resize_crop_shapes():
    for w, h in ((512, 256), (256, 512), (300, 300), (1000, 333), (200, 180)):
        out = data.resize_crop(Image.new("RGB", (w, h), (10, 20, 30)), 128)
        assert out.shape == (128, 128, 3) and out.dtype == np.uint8
        assert (out == (10, 20, 30)).all()


def test_center_crop_keeps_the_middle():
    img = np.zeros((200, 600, 3), np.uint8)
    img[:, 200:400] = 255  # a white middle third
    out = data.resize_crop(Image.fromarray(img), 100)
    assert out[:, 10:90].min() > 240


def test_key_seed_is_stable_and_distinct():
    assert data.key_seed("a", 0) == data.key_seed("a", 0)
    assert len({data.key_seed(f"k{i}", 0) for i in range(1000)}) == 1000
    assert data.key_seed("a", 0) != data.key_seed("a", 1)


def test_jpeg_draft_decodes_at_reduced_scale():
    buf = io.BytesIO()
    Image.new("RGB", (2048, 1536), (1, 2, 3)).save(buf, format="JPEG")
    img = Image.open(io.BytesIO(buf.getvalue()))
    img.draft("RGB", (342, 256))
    assert img.size == (512, 384)  # libjpeg scaled by 1/4: still covers 256 on the short side


def test_collate_counts_failures_and_stacks_the_rest():
    good = {"key": "a", "caption": "c", "images": {64: torch.zeros(3, 64, 64, dtype=torch.uint8)},
            "ids": torch.zeros(77, dtype=torch.long), "mask": torch.ones(77, dtype=torch.long)}
    batch = data.collate([good, {"error": "decode_error:OSError"}, dict(good, key="b")])
    assert batch["key"] == ["a", "b"] and batch["errors"] == {"decode_error:OSError": 1}
    assert batch["images"][64].shape == (2, 3, 64, 64)
    assert data.collate([{"error": "decode_error:OSError"}])["key"] == []
