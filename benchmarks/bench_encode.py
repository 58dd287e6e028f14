#!/usr/bin/env python
"""Throughput of encode/run.py on this machine (CPU), and of the latents loader.

Encoder: the SDXL VAE architecture (AutoencoderKL, block_out_channels [128, 256, 512, 512],
4 latent channels, scaling 0.13025) with random weights, built from its config and saved to a
work folder, run end to end through `python encode/run.py` (one process, all cores) in two
configurations:

    eager      --dtype fp32 --no-channels-last --no-compile
    optimized  --dtype bf16 --channels-last --compile

at each resolution; `--runs` runs each, interleaved, and the medians are reported. Images/s is taken from the
run's stats.json over the steady state (after the first batch, which holds torch.compile's
compilation and DataLoader start-up); wall seconds of the whole command are reported too.
The text encoder is a small open_clip text transformer (same for both configurations), so the
numbers measure the VAE path, which dominates with real models as well.

Loader: samples/s of build_streaming_latents_dataloader over a synthetic latent dataset with
the real row format (latents_256 [4, 32, 32], caption_latents [77, 1024], float16).

    .venv/bin/python benchmarks/bench_encode.py            # prints a Markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import encode_models as em  # noqa: E402  (tests/encode_models.py: image MDS generator, runner env)

CONFIGS = {
    "eager fp32": ["--dtype", "fp32", "--no-channels-last", "--no-compile"],
    "bf16 + channels_last + compile": ["--dtype", "bf16", "--channels-last", "--compile"],
}


# The SDXL VAE config (as in stabilityai/stable-diffusion-xl-base-1.0/vae).
SDXL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}


def sdxl_vae(path: str) -> str:
    """The SDXL VAE config with random weights, saved to `path` (once)."""
    import torch
    from diffusers import AutoencoderKL

    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        AutoencoderKL(**SDXL_VAE).save_pretrained(path)
    return path


def encode_once(data: str, out: str, vae: str, text: str, res: int, batch: int, flags: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        em.PYTHON,
        em.RUN,
        "--data",
        data,
        "--out",
        out,
        "--vae",
        vae,
        "--text-encoder",
        f"openclip:{text}",
        "--resolutions",
        str(res),
        "--batch-size",
        str(batch),
        "--num-workers",
        "1",
        "--device",
        "cpu",
        "--latent-mode",
        "sample",
        *flags,
    ]
    env = {k: v for k, v in em.env().items() if k != "OMP_NUM_THREADS"}  # one process: use every core
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"encode/run.py failed:\n{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "stats.json")) as f:
        stats = json.load(f)
    return {"steady": stats["images_per_s_steady"], "wall": wall, "load": f"{load:.1f}", "cmd": " ".join(cmd)}


def synthetic_latents(out: str, rows: int) -> str:
    """A latent MDS with the real row format and sidecar, filled with random float16."""
    import numpy as np
    from streaming import MDSWriter

    from encode.writer import META_NAME, columns, write_json

    if os.path.exists(os.path.join(out, "index.json")):
        return out
    rng = np.random.default_rng(0)
    shapes = {"latents_256": [4, 32, 32], "caption_latents": [77, 1024]}
    with MDSWriter(out=out, columns=columns([256], False)) as w:
        for i in range(rows):
            w.write(
                {
                    "key": f"k{i}",
                    "caption": f"caption {i}",
                    "caption_length": 77,
                    **{k: rng.standard_normal(s, dtype=np.float32).astype(np.float16).tobytes() for k, s in shapes.items()},
                }
            )
    write_json(os.path.join(out, META_NAME), {"shapes": shapes, "resolutions": [256]})
    return out


def loader_rate(path: str, workers: int, batch: int) -> float:
    from encode.loader import build_streaming_latents_dataloader

    loader = build_streaming_latents_dataloader(path, batch_size=batch, num_workers=workers)
    start, n = time.perf_counter(), 0
    for b in loader:
        n += len(b["caption"])
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", default=os.path.join(HERE, "_work", "encode"), help="scratch folder")
    p.add_argument("--runs", type=int, default=3, help="runs per configuration (median reported)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], help="resolutions to time")
    p.add_argument("--images", type=int, nargs="+", default=[12, 4], help="images per run, per resolution")
    p.add_argument("--batch", type=int, nargs="+", default=[4, 1], help="batch size, per resolution")
    p.add_argument("--loader-rows", type=int, default=2048, help="rows of the synthetic latent dataset")
    args = p.parse_args()

    os.makedirs(args.work, exist_ok=True)
    vae = sdxl_vae(os.path.join(args.work, "sdxl-vae"))
    text = os.path.join(args.work, "openclip-tiny")  # kept, so that the printed command can be rerun
    if not os.path.exists(text):
        shutil.copytree(em.openclip_dir(), text)
    print(
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; uptime: "
        f"{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}; cores: {os.cpu_count()}"
    )
    print("\n| resolution | configuration | images/s steady (median) | runs (1-min load avg at start) | wall s (median) |")
    print("|---|---|---|---|---|")
    for res, n, batch in zip(args.resolutions, args.images, args.batch):
        data = os.path.join(args.work, f"images-{n}")
        if not os.path.exists(os.path.join(data, "index.json")):
            em.make_image_mds(data, n)
        results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
        for _ in range(args.runs):  # interleaved, so that both configurations see the same machine load
            for name, flags in CONFIGS.items():
                results[name].append(encode_once(data, os.path.join(args.work, "out"), vae, text, res, batch, flags))
        medians = {name: statistics.median(r["steady"] for r in rs) for name, rs in results.items()}
        for name, rs in results.items():
            runs = ", ".join(f"{r['steady']:.3f} (load {r['load']})" for r in rs)
            print(
                f"| {res} | {name} | {medians[name]:.3f} | {runs} | {statistics.median(r['wall'] for r in rs):.1f} |", flush=True
            )
        eager, fast = medians.values()
        print(f"| {res} | speed-up | **{fast / eager:.2f}×** | | |", flush=True)
    print(f"\ncommand (last run): {results[name][-1]['cmd']}")

    lat = synthetic_latents(os.path.join(args.work, f"latents-{args.loader_rows}"), args.loader_rows)
    print("\n| loader | samples/s (median of 3 epochs) |\n|---|---|")
    for workers in (0, 2):
        rates = [loader_rate(lat, workers, 64) for _ in range(3)]
        print(f"| batch 64, num_workers={workers}, latents_256 + caption 77×1024 | {statistics.median(rates):.0f} |", flush=True)


if __name__ == "__main__":
    main()
