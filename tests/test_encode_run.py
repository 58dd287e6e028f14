"""encode/run.py end to end: real torchrun (gloo), real MDS, real diffusers/transformers/open_clip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import encode_models as em  # noqa: E402


def check_output(out: str, keys: tuple[str, ...], resolutions=(64, 128)) -> list[dict]:
    """One row per input key, columns with the shapes and dtypes that latents.json records."""
    with open(os.path.join(out, "latents.json")) as f:
        meta = json.load(f)
    assert meta["resolutions"] == list(resolutions)
    assert meta["storage_dtype"] == "float16"
    assert meta["models"]["scaling_factor"] == pytest.approx(0.13025)
    rows = em.read_rows(out)
    assert sorted(r["key"] for r in rows) == sorted(keys)
    for row in rows:
        for col, shape in meta["shapes"].items():
            arr = np.frombuffer(row[col], dtype=np.float16)
            assert arr.size == np.prod(shape), col
            assert np.isfinite(arr).all()
        assert isinstance(row["caption"], str) and row["caption"]
    return rows


@pytest.mark.parametrize("text,dim", [("openclip", 48), ("hf-clip", 32), ("t5", 32)])
def test_one_process_each_text_encoder(tmp_path, text, dim):
    data, keys = em.image_mds(37)
    out = str(tmp_path / "latents")
    proc = em.run_encode(data, out, text=text)
    assert proc.returncode == 0, proc.stderr
    rows = check_output(out, keys)
    assert len(rows[0]["caption_latents"]) == 77 * dim * 2
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["rows"] == stats["rows_this_run"] == 37
    assert "37 rows in" in proc.stdout


def test_torchrun_two_ranks_one_row_per_input(tmp_path):
    data, keys = em.image_mds(37)
    out = str(tmp_path / "latents")
    proc = em.run_encode(data, out, "--keep-images", nproc=2)
    assert proc.returncode == 0, proc.stderr
    rows = check_output(out, keys)
    assert {os.path.basename(d)[:6] for d in os.listdir(out) if d.startswith("r0")} == {"r00000", "r00001"}
    from encode.loader import build_streaming_latents_dataloader

    loader = build_streaming_latents_dataloader(out, batch_size=5, image_size=128, shuffle=False, drop_last=False)
    assert sum(len(b["caption"]) for b in loader) == 37
    # --keep-images copies the stored JPEG bytes unchanged
    originals = {r["key"]: r["jpg"] for r in em.read_rows(data)}
    assert all(r["jpg"].fp.getvalue() == originals[r["key"]].fp.getvalue() for r in rows)
    # latents are sampled with a per-key seed: a 1-process run gives the same bytes per key
    single = {r["key"]: r["latents_64"] for r in em.read_rows(em.latents_dataset(resolutions=(64, 128)))}
    assert all(r["latents_64"] == single[r["key"]] for r in rows)


def test_resume_after_sigkill(tmp_path):
    data, keys = em.image_mds(37)
    out = str(tmp_path / "latents")
    cmd = em.run_cmd(data, out, "--chunk-rows", "2", "--batch-size", "2", nproc=2)
    proc = subprocess.Popen(cmd, env=em.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not os.path.exists(os.path.join(out, "r00000-c00001", "keys.json")):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        em.kill_tree(proc.pid)  # torchrun and both ranks, like a node failure
        proc.wait()
    assert not os.path.exists(os.path.join(out, "index.json"))

    rerun = em.run_encode(data, out, "--chunk-rows", "2", "--batch-size", "2", nproc=2)
    assert rerun.returncode == 0, rerun.stderr
    check_output(out, keys)
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["skipped"]["already_done"] >= 4
    assert stats["rows"] == 37 == stats["rows_this_run"] + stats["skipped"]["already_done"]


def test_rerun_after_success_writes_nothing(tmp_path):
    data, keys = em.image_mds(37)
    out = str(tmp_path / "latents")
    for _ in range(2):
        proc = em.run_encode(data, out, "--num-workers", "0")
        assert proc.returncode == 0, proc.stderr
    check_output(out, keys)
    assert json.load(open(os.path.join(out, "stats.json")))["rows_this_run"] == 0


@pytest.mark.parametrize(
    "change,needle",
    [
        (["--data", "/nonexistent/mds"], "/nonexistent/mds"),
        (["--vae", "/nonexistent/vae"], "/nonexistent/vae"),
        (["--text-encoder", "bert:foo"], "--text-encoder"),
        (["--text-encoder", "t5:/nonexistent/t5"], "/nonexistent/t5"),
        (["--text-encoder", "openclip:ViT-H-14-378-quickgelu"], "@<tag>"),
        (["--resolutions", "100"], "resolution"),
    ],
)
def test_bad_arguments_exit_2(tmp_path, change, needle):
    data, _ = em.image_mds(37)
    cmd = em.run_cmd(data, str(tmp_path / "latents")) + change  # argparse: the last value wins
    proc = subprocess.run(cmd, env=em.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr


def test_resume_with_other_settings_exits_2(tmp_path):
    data, _ = em.image_mds(37)
    out = str(tmp_path / "latents")
    assert em.run_encode(data, out, "--num-workers", "0").returncode == 0
    proc = em.run_encode(data, out, "--num-workers", "0", resolutions=(64,))
    assert proc.returncode == 2
    assert "other settings" in proc.stderr and "resolutions" in proc.stderr


def test_resume_of_an_output_from_before_text_dtype(tmp_path):
    """A latents.json written before --text-dtype and --copy-columns existed: its text encoder ran
    in --dtype (bf16), so a resume needs --text-dtype bf16 and the new default fp32 is refused."""
    data, _ = em.image_mds(37)
    out = tmp_path / "latents"
    shutil.copytree(em.latents_dataset(resolutions=(64, 128)), out)
    meta = json.loads((out / "latents.json").read_text())
    for section in (meta["settings"], meta["models"]):
        section.pop("text_dtype"), section.pop("copy_columns", None)
    (out / "latents.json").write_text(json.dumps(meta))
    refused = em.run_encode(data, str(out), "--num-workers", "0")
    assert refused.returncode == 2 and "text_dtype" in refused.stderr and "'bf16', 'fp32'" in refused.stderr
    resumed = em.run_encode(data, str(out), "--num-workers", "0", "--text-dtype", "bf16")
    assert resumed.returncode == 0, resumed.stderr
    assert "encoded 0 rows" in resumed.stdout


def test_help_lists_defaults():
    proc = subprocess.run([em.PYTHON, em.RUN, "--help"], capture_output=True, text=True, env=em.env(), timeout=60)
    assert proc.returncode == 0
    for flag in (
        "--latent-mode",
        "--dtype",
        "--text-dtype",
        "--compile",
        "--num-workers",
        "--prefetch-factor",
        "--chunk-rows",
        "--copy-columns",
        "--keep-images",
    ):
        assert flag in proc.stdout
    assert "(default: bf16)" in proc.stdout and "(default: fp32)" in proc.stdout
    assert "(default: [256, 512])" in " ".join(proc.stdout.split())


@pytest.mark.slow
def test_compile_on_cpu_matches_eager(tmp_path):
    """torch.compile of the VAE encoder and text encoder (≈1–2 min of compilation on this CPU)."""
    data, _ = em.image_mds(37)
    outs = {}
    for flag in ("--no-compile", "--compile"):
        outs[flag] = str(tmp_path / flag)
        proc = em.run_encode(data, outs[flag], flag, "--latent-mode", "mean", "--dtype", "fp32", timeout=900)
        assert proc.returncode == 0, proc.stderr
    eager = {r["key"]: np.frombuffer(r["latents_128"], np.float16) for r in em.read_rows(outs["--no-compile"])}
    for r in em.read_rows(outs["--compile"]):
        np.testing.assert_allclose(np.frombuffer(r["latents_128"], np.float16), eager[r["key"]], rtol=1e-2, atol=1e-3)


def test_bad_images_are_counted_not_fatal(tmp_path):
    from streaming import MDSWriter

    data = str(tmp_path / "mds")
    rng = np.random.default_rng(3)
    good = em.jpeg(rng, 300, 260)
    payloads = {"good-0": good, "good-1": good, "garbage": b"not a jpeg at all", "truncated": good[: len(good) // 3]}
    with MDSWriter(out=data, columns=em.IMAGE_COLUMNS) as w:
        for key, jpg in payloads.items():
            w.write(
                {
                    "jpg": jpg,
                    "caption": "a cat",
                    "width": 300,
                    "height": 260,
                    "original_width": 300,
                    "original_height": 260,
                    "key": key,
                }
            )
    out = str(tmp_path / "latents")
    for run in range(2):  # the rerun skips the good rows and counts the bad ones again
        proc = em.run_encode(data, out, "--num-workers", "0")
        assert proc.returncode == 0, proc.stderr
        assert sorted(r["key"] for r in em.read_rows(out)) == ["good-0", "good-1"]
        skipped = json.load(open(os.path.join(out, "stats.json")))["skipped"]
        assert sum(v for k, v in skipped.items() if k.startswith("decode_error")) == 2
        assert skipped["already_done"] == 2 * run
        assert "decode_error" in proc.stdout


def test_non_finite_latents_are_counted_not_written(tmp_path):
    """A VAE whose latents overflow float16 (as the SDXL VAE does in fp16): no row, a count, a hint."""
    data, _ = em.image_mds(37)
    out = str(tmp_path / "latents")
    cmd = em.run_cmd(data, out, "--num-workers", "0") + ["--vae", em.overflowing_vae()]
    proc = subprocess.run(cmd, env=em.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["rows"] == 0 and stats["skipped"]["skipped_non_finite"] == 37
    assert "non-finite" in proc.stdout
