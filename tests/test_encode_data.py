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


def test_rows_decode_jpegs_at_reduced_scale_and_match_a_full_decode():
    """ImageRows._images asks libjpeg for the smallest DCT scale that still covers the largest
    resolution (the image object shrinks in place: the product's own decode path is seen), and
    its crops match those of a full-size decode."""
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((2048, 1536), Image.BICUBIC)
    buf = io.BytesIO()
    smooth.save(buf, format="JPEG", quality=95)
    rows = data.ImageRows(None, [], [128, 256], None, None, 0)
    img = Image.open(io.BytesIO(buf.getvalue()))
    out = rows._images(img)
    assert img.size == (512, 384)  # decoded at 1/4: still ≥ 256 on the short side
    full = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    for res in (128, 256):
        got = out[res].permute(1, 2, 0).numpy().astype(int)
        want = data.resize_crop(full, res).astype(int)
        assert got.shape == want.shape == (res, res, 3)
        assert np.abs(got - want).mean() < 2.0, res  # the same picture, within JPEG scaling noise


def test_collate_counts_failures_and_stacks_the_rest():
    good = {
        "key": "a",
        "caption": "c",
        "images": {64: torch.zeros(3, 64, 64, dtype=torch.uint8)},
        "ids": torch.zeros(77, dtype=torch.long),
        "mask": torch.ones(77, dtype=torch.long),
    }
    batch = data.collate([good, {"error": "decode_error:OSError"}, dict(good, key="b")])
    assert batch["key"] == ["a", "b"] and batch["errors"] == {"decode_error:OSError": 1}
    assert batch["images"][64].shape == (2, 3, 64, 64)
    assert data.collate([{"error": "decode_error:OSError"}])["key"] == []
