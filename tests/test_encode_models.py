"""encode/models.py: hub-id-style loading of every supported layout, and what the encoders return."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import encode_models as em  # noqa: E402

from encode import models  # noqa: E402


def test_vae_from_repo_subfolder_root_or_explicit_subfolder():
    repo = em.sd_repo()
    for vae in (models.load_vae(repo), models.load_vae(os.path.join(repo, "vae")), models.load_vae(repo, "vae")):
        assert vae.config.scaling_factor == pytest.approx(0.13025)
        assert models.latent_shape(vae, 256) == (4, 32, 32)
    with pytest.raises(models.ModelLoadError, match="nope"):
        models.load_vae(repo, "nope")


def test_text_spec_parsing():
    assert models.TextSpec.parse("openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378") == models.TextSpec(
        "openclip", "hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"
    )
    for bad in ("bert:x", "openclip:", "t5"):
        with pytest.raises(ValueError):
            models.TextSpec.parse(bad)


def test_openclip_features_are_encode_text_before_pooling():
    """Pooling our per-token features at the EOT token and projecting gives open_clip's encode_text."""
    import open_clip

    text = models.load_text_encoder(models.TextSpec("openclip", em.openclip_dir()), 77, torch.float32)
    ids, mask = text.tokenize("a photo of a red cat")
    assert ids.shape == mask.shape == (77,) and mask.sum() == 8  # 6 words + start + end
    feats = text.module(ids[None], mask[None])
    assert feats.shape == (1, text.seq_len, text.dim) == (1, 77, 48)
    clip = open_clip.create_model(f"local-dir:{em.openclip_dir()}")
    pooled = feats[0, ids.argmax()] @ clip.text_projection
    torch.testing.assert_close(pooled, clip.encode_text(ids[None])[0], rtol=1e-4, atol=1e-5)


def test_hf_clip_from_sd_repo_and_plain_folder(tmp_path):
    plain = tmp_path / "clip"
    shutil.copytree(os.path.join(em.sd_repo(), "text_encoder"), plain)
    for f in os.listdir(os.path.join(em.sd_repo(), "tokenizer")):
        shutil.copy(os.path.join(em.sd_repo(), "tokenizer", f), plain)
    for path in (em.sd_repo(), str(plain)):
        text = models.load_text_encoder(models.TextSpec("hf-clip", path), 77, torch.float32)
        ids, mask = text.tokenize("a photo of a red cat")
        assert (text.seq_len, text.dim) == (77, 32) and ids.shape == (77,)
        assert text.module(ids[None], mask[None]).shape == (1, 77, 32)


def test_t5_uses_max_length_and_mask():
    text = models.load_text_encoder(models.TextSpec("t5", em.t5_repo()), 32, torch.float32)
    ids, mask = text.tokenize("a photo of a red cat")
    assert ids.shape == mask.shape == (32,) and (text.seq_len, text.dim) == (32, 32)
    assert 0 < mask.sum() < 32 and ids[mask.sum() - 1] == 1  # ends with </s>, then padding
    out = text.module(ids[None], mask[None])
    # With the mask, padding does not change the real tokens' features.
    ids2, mask2 = models.load_text_encoder(models.TextSpec("t5", em.t5_repo()), 48, torch.float32).tokenize(
        "a photo of a red cat"
    )
    out2 = text.module(ids2[None], mask2[None])
    n = int(mask.sum())
    torch.testing.assert_close(out[0, :n], out2[0, :n], rtol=1e-4, atol=1e-5)


def test_openclip_builtin_name_without_weights_is_refused():
    with pytest.raises(models.ModelLoadError, match="@<tag>"):
        models.load_text_encoder(models.TextSpec("openclip", "ViT-H-14-378-quickgelu"), 77, torch.float32)
