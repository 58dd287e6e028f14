"""build_streaming_latents_dataloader over latent datasets written by encode/run.py."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import encode_models as em  # noqa: E402

from encode.loader import build_streaming_latents_dataloader  # noqa: E402


def test_yields_recorded_shapes():
    out = em.latents_dataset()
    for size, side in ((256, 32), (64, 8)):
        batch = next(iter(build_streaming_latents_dataloader(out, batch_size=8, image_size=size)))
        assert batch["image_latents"].shape == (8, 4, side, side)
        assert batch["image_latents"].dtype == torch.float16
        assert batch["caption_latents"].shape == (8, 1, 77, 48)
        assert batch["drop_caption_mask"].shape == (8,)
        assert len(batch["caption"]) == 8


def test_drop_last_and_no_shuffle_cover_every_row():
    out = em.latents_dataset()
    loader = build_streaming_latents_dataloader(out, batch_size=8, shuffle=False, drop_last=False)
    assert sum(len(b["caption"]) for b in loader) == 37
    assert len(list(build_streaming_latents_dataloader(out, batch_size=8))) == 37 // 8


def test_mixes_two_datasets():
    a, b = em.latents_dataset(), em.latents_dataset(20, 1)
    captions = {r["caption"] for r in em.read_rows(b)}
    seen = [c for batch in build_streaming_latents_dataloader([a, b], batch_size=4, drop_last=False) for c in batch["caption"]]
    assert len(seen) == 57
    assert captions <= set(seen)


def test_caption_drop():
    out = em.latents_dataset()
    for p, expect in ((0.0, {1.0}), (1.0, {0.0}), (0.5, {0.0, 1.0})):
        masks = torch.cat(
            [
                b["drop_caption_mask"]
                for b in build_streaming_latents_dataloader(out, batch_size=37, cap_drop_prob=p, drop_last=False)
            ]
        )
        assert set(masks.tolist()) == expect


def test_micro_budget_style_decoding():
    """Training code that reads the raw columns with fixed reshapes (as micro-budget loaders do)."""
    for row in em.read_rows(em.latents_dataset()):
        cap = torch.from_numpy(np.frombuffer(row["caption_latents"], dtype=np.float16).copy()).reshape(1, 77, 48)
        lat = torch.from_numpy(np.frombuffer(row["latents_256"], dtype=np.float16).copy()).reshape(-1, 32, 32)
        assert cap.shape == (1, 77, 48) and lat.shape == (4, 32, 32)


def test_wrong_resolution_is_a_clear_error():
    with pytest.raises(ValueError, match="no latents_512"):
        build_streaming_latents_dataloader(em.latents_dataset(), batch_size=4, image_size=512)


def test_not_a_latent_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="latents.json"):
        build_streaming_latents_dataloader(str(tmp_path), batch_size=4)
