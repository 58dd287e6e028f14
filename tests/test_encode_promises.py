"""encode/run.py flags and behaviours the README states that had no test of their own (issue 15):
--seed, --vae-subfolder, --no-channels-last, --max-length, the VAE's shift factor, non-finite
text embeddings, and a remote --out resumed on another machine after a crash."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import boto3
import numpy as np

import tests.encode_models as em

RES = (64, 128)


def _rows(out: str | Path) -> dict[str, dict]:
    return {r["key"]: r for r in em.read_rows(str(out))}


def _fp(value: bytes) -> np.ndarray:
    return np.frombuffer(value, np.float16).astype(np.float32)


def test_seed_subfolder_and_channels_last(tmp_path: Path) -> None:
    data, keys = em.image_mds(37)
    reference = _rows(em.latents_dataset(resolutions=RES))  # --seed 0, vae/ found by itself, channels_last

    other_seed = tmp_path / "seed5"
    assert em.run_encode(data, str(other_seed), "--seed", "5", resolutions=RES).returncode == 0
    got = _rows(other_seed)
    assert sorted(got) == sorted(keys)
    for key, row in got.items():  # a sampled latent changes with the seed; the caption's embedding does not
        assert row["latents_64"] != reference[key]["latents_64"] and row["latents_128"] != reference[key]["latents_128"]
        assert row["caption_latents"] == reference[key]["caption_latents"]

    explicit = tmp_path / "explicit"
    proc = em.run_encode(data, str(explicit), "--vae-subfolder", "vae", "--no-channels-last", resolutions=RES)
    assert proc.returncode == 0, proc.stderr
    for key, row in _rows(explicit).items():  # the same weights, the other memory layout: the same latents
        for column in ("latents_64", "latents_128"):
            assert np.allclose(_fp(row[column]), _fp(reference[key][column]), atol=2e-2, rtol=2e-2), (key, column)
    wrong = em.run_encode(data, str(tmp_path / "wrong"), "--vae-subfolder", "text_encoder", resolutions=RES)
    assert wrong.returncode == 2, wrong.stderr


def test_max_length_sets_the_t5_sequence(tmp_path: Path) -> None:
    data, _ = em.image_mds(37)
    out = tmp_path / "t5"
    proc = em.run_encode(data, str(out), "--max-length", "16", text="t5", resolutions=(64,))
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "latents.json").read_text())
    assert meta["shapes"]["caption_latents"] == [16, 32]
    assert all(len(r["caption_latents"]) == 16 * 32 * 2 for r in _rows(out).values())


def test_the_vae_shift_factor_is_applied(tmp_path: Path) -> None:
    """latent = (mean - shift) × scale: the same VAE with shift 0.5 gives latents lower by
    0.5 × scale everywhere (--latent-mode mean, so nothing is sampled)."""
    from diffusers import AutoencoderKL

    shifted = tmp_path / "vae-shifted"
    vae = AutoencoderKL.from_pretrained(os.path.join(em.sd_repo(), "vae"))
    vae.register_to_config(shift_factor=0.5)
    vae.save_pretrained(shifted)
    data, _ = em.image_mds(37)
    plain, moved = tmp_path / "plain", tmp_path / "shifted"
    for out, extra in ((plain, []), (moved, ["--vae", str(shifted)])):
        cmd = em.run_cmd(data, str(out), "--latent-mode", "mean", resolutions=(64,)) + extra
        proc = subprocess.run(cmd, env=em.env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert json.loads((moved / "latents.json").read_text())["models"]["shift_factor"] == 0.5
    a, b = _rows(plain), _rows(moved)
    for key in a:
        difference = _fp(a[key]["latents_64"]) - _fp(b[key]["latents_64"])
        assert np.allclose(difference, 0.5 * 0.13025, atol=2e-3), key


def test_non_finite_text_embeddings_are_counted_not_written(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    poisoned = tmp_path / "openclip-inf"
    shutil.copytree(em.openclip_dir(), poisoned)
    weights = load_file(str(poisoned / "open_clip_model.safetensors"))
    weights["ln_final.weight"].fill_(float("inf"))
    save_file(weights, str(poisoned / "open_clip_model.safetensors"))
    data, _ = em.image_mds(37)
    out = tmp_path / "latents"
    cmd = em.run_cmd(data, str(out), "--num-workers", "0", resolutions=(64,)) + ["--text-encoder", f"openclip:{poisoned}"]
    proc = subprocess.run(cmd, env=em.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows"] == 0 and stats["skipped"]["skipped_non_finite"] == 37
    assert "non-finite" in proc.stdout


def test_a_remote_out_resumes_on_another_machine_after_a_crash(tmp_path: Path, s3: dict[str, str]) -> None:
    """Killed (SIGKILL to torchrun and both ranks) once chunks are on S3; a rerun with an empty
    cache (another machine) reads the finished chunks' keys back and ends with one row per input."""
    from tests.test_encode_remote import _upload

    data, keys = em.image_mds(37)
    _upload(data, s3, "data", "crash/images")
    out = "s3://data/crash/latents"
    client = boto3.client(
        "s3",
        endpoint_url=s3["S3_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )

    def uploaded_chunks() -> int:
        listed = client.list_objects_v2(Bucket="data", Prefix="crash/latents/").get("Contents", [])
        return sum(1 for o in listed if o["Key"].endswith("/keys.json"))

    cmd = em.run_cmd(
        "s3://data/crash/images", out, "--cache-dir", str(tmp_path / "cache-a"), "--chunk-rows", "2", "--batch-size", "2", nproc=2
    )
    proc = subprocess.Popen(
        cmd, env={**em.env(), **s3}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while uploaded_chunks() < 3:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        em.kill_tree(proc.pid)
        proc.wait()
    done_before = uploaded_chunks()
    cmd = em.run_cmd(
        "s3://data/crash/images", out, "--cache-dir", str(tmp_path / "cache-b"), "--chunk-rows", "2", "--batch-size", "2", nproc=2
    )
    rerun = subprocess.run(cmd, env={**em.env(), **s3}, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"encoded {37 - 2 * done_before} rows" in rerun.stdout, rerun.stdout  # the finished chunks not redone
    listed = client.list_objects_v2(Bucket="data", Prefix="crash/latents/").get("Contents", [])
    local = tmp_path / "read"
    for o in listed:
        path = local / o["Key"].removeprefix("crash/latents/")
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file("data", o["Key"], str(path))
    assert sorted(r["key"] for r in em.read_rows(str(local))) == sorted(keys)  # one row per input, none twice
