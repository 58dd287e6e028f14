#!/usr/bin/env python3
"""The encoder on a real GPU (issue 19): one prepared run that installs, builds, measures and checks.

On the GPU machine (one H200; Python 3.12, torch 2.11, transformers 5, no diffusers, open_clip or
mosaicml-streaming), from the repo root, with `benchmarks/gpu_wheels/` made here by
`bash benchmarks/gpu_wheels.sh` and carried along:

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_encode.py --out $OUT      # ~8 min (--budget 450 s)

Here, on CPU, every step with tiny models and images (a smoke test of the whole script):

    .venv/bin/python benchmarks/gpu_encode.py --tiny                    # a few minutes
    .venv/bin/python benchmarks/gpu_encode.py --flops-only              # the FLOP check alone

Steps, each logged (the whole log: OUT/gpu_encode.log; every figure: OUT/gpu_encode.json):

1. install the modules the machine lacks from the carried wheels (pip --no-index --no-deps
   --target), when they are missing;
2. a synthetic image MDS of 512-short-side JPEGs (crops of scikit-image's photographs, aspect
   ratios 1:1 to 2:1, quality 95 as bin/fetch stores a resized image);
3. FLOPs of the real architectures counted on the meta device (torch's FlopCounterMode: SDXL VAE
   encoder at 256² and 512², DFN5B ViT-H-14 text tower per 77-token caption) against the issue's
   figures, and from them the bf16 ceiling in images/s;
4. the models with random weights, built from their configs and saved as folders that encode/
   loads through the same code path a hub id takes: the SDXL VAE (AutoencoderKL) and open_clip's
   ViT-H-14-378-quickgelu (DFN5B's architecture; the text tower exactly, the vision tower shrunk
   to almost nothing: neither method runs it, and it would add 2.5 GB to every load);
5. alternating rounds of (a) the seed's precompute method re-implemented (`seed_precompute`:
   one process, its DataLoader, dtypes, transforms and loop, eager, channels-first) and
   (b) `encode/run.py` with its defaults (bf16, channels_last, torch.compile, batch 32, 4
   workers), round 1 through `torchrun --nproc_per_node 1` (nccl), round 2 as one plain process;
   steady rates (warm-up batches and compilation excluded), medians;
6. correctness: bf16 against an fp32 reference (TF32 off) on the same images and on fresh random
   pixels, ‖out − ref‖ / ‖ref‖; the latents encode/run.py wrote against the fp32 reference with
   the same noise; no NaN or Inf; identical bytes between the two encode/run.py runs (nccl world
   size 1 and one process, two runs);
7. variants in one process (DataLoader workers, GPU JPEG decoding, text precision and TF32,
   batch size, compile off / static shapes / CUDA graphs / max-autotune), and GPU-only
   microbenchmarks of each model, as long as the budget lasts;
8. a short table, last: images/s, fraction of the bf16 ceiling, GPU busy fraction, and whether
   the DataLoader or the GPU is the limit.

A time budget (`--budget`) guards every step: what does not fit is skipped and said so, and the
table is always printed. The internal sub-commands (`_seed`, `_check`, `_variants`) are the
worker processes the steps start.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WHEELS = os.path.join(HERE, "gpu_wheels")
RUN = os.path.join(REPO, "encode", "run.py")
PEAK_BF16 = 790e12  # dense bf16 matrix work measured on the H200 machine (device notes)
ISSUE_FLOPS = {"vae_256": 271e9, "vae_512": 1082e9, "text": 55e9}  # the issue's figures, to check
# module the machine may lack → its wheel (benchmarks/gpu_wheels.sh downloads them)
NEEDED = {
    "diffusers": "diffusers",
    "open_clip": "open_clip_torch",
    "streaming": "mosaicml_streaming",
    "brotli": "brotli",
    "snappy": "python_snappy",
    "cramjam": "cramjam",
    "zstd": "zstd",
    "catalogue": "catalogue",
    "ftfy": "ftfy",
    "wcwidth": "wcwidth",
}
DFN5B = "ViT-H-14-378-quickgelu"  # open_clip's name for hf-hub:apple/DFN5B-CLIP-ViT-H-14-378's architecture
SMALL_VISION = {"image_size": 28, "layers": 1, "width": 64, "patch_size": 14, "head_width": 32}
TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
TINY_VAE = {  # tests/encode_models.py's tiny VAE: 8× down like SDXL's
    "block_out_channels": [8, 16, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.13025,
}

_LOG: Any = None


def log(*parts: Any) -> None:
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    if _LOG is not None:
        _LOG.write(line + "\n")
        _LOG.flush()


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- packages


def _wheel_name(path: str) -> str:
    """A wheel's distribution name as NEEDED spells it (wheel files write - as _)."""
    return os.path.basename(path).split("-")[0].lower().replace(".", "_")


def ensure_packages(site: str) -> dict:
    """Install the missing modules of NEEDED from benchmarks/gpu_wheels into `site` (prepended to
    sys.path and to the children's PYTHONPATH); returns what was done."""
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if not missing:
        log("packages: every needed module is importable; nothing installed")
        return {"installed": []}
    wheels = sorted(glob.glob(os.path.join(WHEELS, "*.whl")))
    wanted = [w for w in wheels if _wheel_name(w) in {NEEDED[m] for m in missing}]
    log(f"packages: missing {missing}; installing {[os.path.basename(w) for w in wanted]} into {site}")
    if not wanted:
        raise SystemExit(f"missing {missing} and no wheels for them in {WHEELS}: run benchmarks/gpu_wheels.sh and carry it")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    subprocess.run([*cmd, "--upgrade", "--target", site, *wanted], check=True)
    sys.path.insert(0, site)
    importlib.invalidate_caches()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH", "")) if p)
    still = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if still:
        raise SystemExit(f"still missing after the install: {still}")
    return {"installed": [os.path.basename(w) for w in wanted], "site": site}


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TQDM_DISABLE": "1",  # encode/run.py's bar would fill the log
            "TQDM_MININTERVAL": "30",
        }
    )
    return env


# --------------------------------------------------------------------------- GPU utilisation


class GpuSampler(threading.Thread):
    """NVML's utilisation of GPU 0 (percent of time a kernel ran), sampled every `period` s
    (pynvml, else nvidia-smi); nothing on a machine without one."""

    def __init__(self, period: float = 0.2):
        super().__init__(daemon=True)
        self.period, self.samples, self.stopped = period, [], threading.Event()
        self.read: Callable[[], float] | None = None
        self.source = "none"
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.read = lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            self.read()
            self.source = "nvml"
        except Exception:
            if shutil.which("nvidia-smi"):
                self.read, self.source = self._smi, "nvidia-smi"
                try:
                    self.read()
                except Exception:
                    self.read, self.source = None, "none"

    @staticmethod
    def _smi() -> float:
        q = ["nvidia-smi", "-i", "0", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        return float(subprocess.run(q, capture_output=True, text=True, timeout=5, check=True).stdout.split()[0])

    def run(self) -> None:
        while self.read is not None and not self.stopped.is_set():
            try:
                self.samples.append((time.time(), self.read()))
            except Exception:
                pass
            self.stopped.wait(self.period)

    def mean(self, t0: float | None, t1: float | None) -> float | None:
        if t0 is None or t1 is None:
            return None
        vals = [u for t, u in self.samples if t0 <= t <= t1]
        return round(sum(vals) / len(vals) / 100, 3) if vals else None


# --------------------------------------------------------------------------- children


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and its descendants (torchrun starts its ranks in sessions of their own)."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    try:
        import encode_models as em

        em.kill_tree(pid)
    except Exception:
        pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_child(tag: str, cmd: list[str], timeout: float, poll: Callable[[], None] | None = None) -> dict:
    """Run `cmd` from the repo root with its output streamed into the log; killed (with its
    children) after `timeout` s. Returns rc (None when killed), start and end times."""
    log(f"$ {' '.join(cmd)}    (limit {timeout:.0f} s)")
    t0 = time.time()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log(f"  [{tag}] {line.rstrip()}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    killed = False
    while proc.poll() is None:
        if poll is not None:
            poll()
        if time.time() - t0 > timeout:
            log(f"  [{tag}] over its {timeout:.0f} s: killed")
            kill_tree(proc.pid)
            killed = True
            break
        time.sleep(0.5)
    proc.wait()
    reader.join(timeout=10)
    if poll is not None:
        poll()
    return {"rc": None if killed else proc.returncode, "start": t0, "end": time.time(), "wall_s": round(time.time() - t0, 1)}


def worker_cmd(role: str, cfg: dict, work: str) -> list[str]:
    path = os.path.join(work, f"cfg-{role}-{time.time_ns()}.json")
    write_json(path, cfg)
    return [sys.executable, os.path.abspath(__file__), role, path]


def read_result(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- data


def _photo_jpeg(args: tuple[int, int, int]) -> tuple[bytes, int, int, str]:
    """Image `i`: a crop of one of scikit-image's photographs with the short side `short` (as
    benchmarks/corpus.py renders them), JPEG quality 95, 4:2:0; smooth synthetic (the tests'
    generator) when scikit-image or its photographs are missing."""
    i, short, seed = args
    rng = random.Random(seed * 1_000_003 + i)
    for path in (HERE, os.path.join(REPO, "tests")):
        if path not in sys.path:
            sys.path.insert(0, path)
    import corpus

    aspect = rng.choices([a for a, _ in corpus.ASPECTS], [w for _, w in corpus.ASPECTS])[0]
    long_side = round(short * aspect)
    w, h = (long_side, short) if rng.random() < 0.5 else (short, long_side)
    if not corpus._SRC:  # the photographs this scikit-image has (newer ones fetch some on demand)
        try:
            from PIL import Image

            d = corpus.skimage_dir()
            for name in corpus.COLOUR_PHOTOS:
                try:
                    corpus._SRC[name] = Image.open(d / name).convert("RGB")
                except OSError:
                    pass
        except (SystemExit, ImportError):
            pass
        corpus._SRC.setdefault("", None)  # looked once
    photos = [k for k, v in corpus._SRC.items() if v is not None]
    if photos:
        im = corpus._render(w, h, rng.choice(sorted(photos)), rng.getrandbits(32)).convert("RGB")
        return corpus._jpeg(im, 95, 2), w, h, "photo"
    import encode_models as em
    import numpy as np

    return em.jpeg(np.random.default_rng(seed * 1_000_003 + i), w, h), w, h, "synthetic"


def make_image_mds(work: str, n: int, n_seed: int, short: int, seed: int = 0) -> dict:
    """Two image MDS folders as bin/fetch writes them (jpg as MDS jpeg, caption, width, height,
    key; xxh64 hashes): `n` rows for encode/run.py and the variants, its first `n_seed` for the
    seed's method."""
    from multiprocessing import Pool

    data = os.path.join(work, f"images-{n}-{short}")
    seed_data = os.path.join(work, f"images-{n_seed}-{short}")
    info_path = os.path.join(work, f"images-{n}-{short}.json")
    if all(os.path.exists(os.path.join(d, "index.json")) for d in (data, seed_data)) and os.path.exists(info_path):
        with open(info_path) as f:
            return json.load(f)
    t0 = time.time()
    with Pool(min(16, os.cpu_count() or 1)) as pool:
        items = pool.map(_photo_jpeg, [(i, short, seed) for i in range(n)], chunksize=8)
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import encode_models as em
    import numpy as np
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    captions = [em.caption(rng) for _ in range(n)]
    cols = {"jpg": "jpeg", "caption": "str", "width": "int32", "height": "int32", "key": "str"}
    for path, count in ((data, n), (seed_data, n_seed)):
        shutil.rmtree(path, ignore_errors=True)
        with MDSWriter(out=path, columns=cols, hashes=["xxh64"], size_limit=1 << 26) as w:
            for i in range(count):
                jpg, width, height, _ = items[i]
                w.write({"jpg": jpg, "caption": captions[i], "width": width, "height": height, "key": f"img-{i:06d}"})
    pixels = sum(w * h for _, w, h, _ in items)
    info = {
        "data": data,
        "seed_data": seed_data,
        "rows": n,
        "seed_rows": n_seed,
        "short_side": short,
        "kinds": dict(Counter(k for *_, k in items)),
        "mean_kb": round(sum(len(j) for j, *_ in items) / n / 1024, 1),
        "bits_per_pixel": round(sum(len(j) for j, *_ in items) * 8 / pixels, 2),
        "mean_pixels": round(pixels / n),
        "seconds": round(time.time() - t0, 1),
    }
    write_json(info_path, info)
    return info


# --------------------------------------------------------------------------- models and FLOPs


def clip_config(tiny: bool) -> dict:
    """DFN5B's open_clip configuration with the vision tower shrunk (the text tower is what runs);
    the tiny one also shrinks the text tower."""
    import copy

    import open_clip

    cfg = copy.deepcopy(open_clip.get_model_config(DFN5B))
    if cfg is None:
        raise SystemExit(f"open_clip has no {DFN5B} config")
    cfg["vision_cfg"] = dict(SMALL_VISION)
    if tiny:
        cfg["text_cfg"] = dict(TINY_TEXT)
        cfg["embed_dim"] = 64
    return cfg


def build_models(work: str, tiny: bool) -> dict:
    """The VAE and text encoder folders (random weights), built once per work folder."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    sys.path.insert(0, HERE)
    import bench_encode

    t0 = time.time()
    vae_dir = os.path.join(work, "vae-tiny" if tiny else "sdxl-vae")
    if tiny and not os.path.exists(os.path.join(vae_dir, "config.json")):
        torch.manual_seed(0)
        AutoencoderKL(**TINY_VAE).save_pretrained(vae_dir)
    elif not tiny:
        bench_encode.sdxl_vae(vae_dir)
    cfg = clip_config(tiny)
    text_dir = os.path.join(work, "clip-tiny" if tiny else "dfn5b-clip-h14")
    weights = os.path.join(text_dir, "open_clip_model.safetensors")
    if not os.path.exists(weights):
        import open_clip

        os.makedirs(text_dir, exist_ok=True)
        with open(os.path.join(text_dir, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": cfg, "preprocess_cfg": {}}, f)
        torch.manual_seed(0)
        model = open_clip.CLIP(**cfg)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights + ".tmp")
        os.replace(weights + ".tmp", weights)
        del model
    log(f"models: {vae_dir}, {text_dir} ({time.time() - t0:.1f} s)")
    return {"vae": vae_dir, "text": text_dir, "vae_cfg": dict(AutoencoderKL.load_config(vae_dir)), "clip_cfg": cfg}


def count_flops(vae_cfg: dict, clip_cfg: dict, resolutions: list[int]) -> dict[str, float]:
    """FLOPs of one image's VAE encode per resolution and of one caption's text features, counted by
    torch's FlopCounterMode on the meta device (matrix work: convolutions, matmuls, attention)."""
    import open_clip
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from encode.models import OpenClipText

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_cfg)
        text = OpenClipText(open_clip.CLIP(**clip_cfg))
    out = {}
    with torch.no_grad():
        for r in resolutions:
            with FlopCounterMode(display=False) as fc:
                vae.encode(torch.empty(1, 3, r, r, device="meta"))
            out[f"vae_{r}"] = float(fc.get_total_flops())
        ids = torch.zeros(1, int(clip_cfg["text_cfg"].get("context_length", 77)), dtype=torch.long, device="meta")
        with FlopCounterMode(display=False) as fc:
            text(ids, ids)
        out["text"] = float(fc.get_total_flops())
    return out


def real_flops() -> dict:
    """The issue's check: the real SDXL VAE and DFN5B text tower, at 256² and 512²."""
    sys.path.insert(0, HERE)
    import bench_encode

    counted = count_flops(dict(bench_encode.SDXL_VAE), clip_config(tiny=False), [256, 512])
    total = sum(counted.values())
    return {
        "counted": counted,
        "issue": ISSUE_FLOPS,
        "per_image_256_512_text": total,
        "ceiling_images_per_s": PEAK_BF16 / total,
    }


def flop_table(f: dict) -> str:
    rows = ["| part | counted GFLOP | the issue's | counted / issue |", "|---|---|---|---|"]
    names = {"vae_256": "SDXL VAE encoder, 256²", "vae_512": "SDXL VAE encoder, 512²", "text": "DFN5B text tower, 77 tokens"}
    for k, name in names.items():
        c, i = f["counted"][k], f["issue"][k]
        rows.append(f"| {name} | {c / 1e9:,.1f} | ~{i / 1e9:,.0f} | {c / i:.3f} |")
    rows.append(
        f"| one image at 256 + 512 + its caption | {f['per_image_256_512_text'] / 1e9:,.1f} | ~1,408 | "
        f"ceiling at {PEAK_BF16 / 1e12:.0f} TFLOP/s: {f['ceiling_images_per_s']:.0f} images/s |"
    )
    return "\n".join(rows)


# --------------------------------------------------------------------------- worker helpers


def _device(cfg: dict):
    import torch

    dev = torch.device(cfg["device"])
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


class Busy:
    """Time the device spends on each batch: CUDA events on a GPU, the host clock on CPU."""

    def __init__(self, dev):
        import torch

        self.cuda = dev.type == "cuda"
        self.torch, self.pairs, self.host, self.t = torch, [], 0.0, 0.0

    def start(self) -> None:
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            self.pairs.append([e, None])
        else:
            self.t = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            self.pairs[-1][1] = e
        else:
            self.host += time.perf_counter() - self.t

    def reset(self) -> None:
        self.pairs, self.host = [], 0.0

    def seconds(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.pairs if b is not None) / 1000
        return self.host


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed_repeat(fn: Callable[[], Any], dev, seconds: float, at_least: int = 2) -> tuple[int, float]:
    """Run `fn` after one warm-up call until `seconds` have passed (at least `at_least` times);
    (calls, seconds)."""
    fn()
    _sync(dev)
    n, t0 = 0, time.perf_counter()
    while n < at_least or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
        if n % 4 == 0:
            _sync(dev)
    _sync(dev)
    return n, time.perf_counter() - t0


def loader_rate(loader, batch_images: Callable[[dict], int], seconds: float) -> float | None:
    """Images/s of a DataLoader alone (decode, resize, tokenize, collate), first batch excluded."""
    it = iter(loader)
    try:
        next(it)
    except StopIteration:
        return None
    n, t0 = 0, time.perf_counter()
    for batch in it:
        n += batch_images(batch)
        if time.perf_counter() - t0 >= seconds:
            break
    dt = time.perf_counter() - t0
    del it
    return round(n / dt, 2) if n and dt > 0 else None


# --------------------------------------------------------------------------- (a) the seed's method


def worker_seed(cfg: dict) -> dict:
    """The micro-budget seed's precompute loop (micro_diffusion/datasets/prepare/*/precompute.py),
    re-implemented for one process on one device: what it runs and in which dtypes.

    - data: a StreamingDataset subclass over the image MDS, iterated by a DataLoader with 2
      workers, prefetch 2, persistent workers, pinned memory and a collate that keeps lists; per
      image, the open_clip tokenizer on the caption ([1, 77] ids) and, per resolution, torchvision
      Resize(short side, bicubic) → CenterCrop → ToTensor → Normalize(0.5, 0.5) on the PIL image
      (float32 [-1, 1] tensors travel from the workers);
    - models: AutoencoderKL.from_pretrained(..., torch_dtype=bfloat16) (bf16 weights),
      channels-first, eager; the whole open_clip model in fp32 (create_model_and_transforms);
    - loop: stack → .to(device) per resolution; under no_grad and autocast(bf16):
      vae.encode(x).latent_dist.sample() × scaling_factor → float16, and the text features under the
      text wrapper's own autocast in float32 (its dtype argument never reaches it: fp32 compute)
      → float16; .cpu().numpy(); one MDSWriter row per image, in the loop.
    """
    import numpy as np
    import open_clip
    import torch
    from diffusers import AutoencoderKL
    from streaming import MDSWriter, Stream, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory
    from torch.utils.data import DataLoader
    from torchvision import transforms

    clean_stale_shared_memory()
    dev = _device(cfg)
    seed = 2024  # the seed script's default --seed, plus the process index (0)
    torch.manual_seed(seed)
    np.random.seed(seed)
    if dev.type == "cuda":
        torch.cuda.manual_seed(seed)
    text_name = f"local-dir:{cfg['text']}"
    resolutions = cfg["resolutions"]

    class SeedPrecomputeDataset(StreamingDataset):
        def __init__(self, streams, tfms, batch_size, tokenizer_name):
            super().__init__(streams=streams, shuffle=False, batch_size=batch_size)
            self.tfms = tfms
            self.tokenizer = open_clip.get_tokenizer(tokenizer_name)

        def __getitem__(self, index):
            sample = super().__getitem__(index)
            ret = {"caption": self.tokenizer(sample["caption"]).clone().detach()}  # [1, 77]
            for i, tfm in enumerate(self.tfms):
                img = sample["jpg"]
                if img.mode != "RGB":
                    img = img.convert("RGB")
                ret[f"image_{i}"] = tfm(img)
            ret["sample"] = sample
            return ret

    def keep_lists(items):
        out: dict[str, list] = {k: [] for k in items[0]}
        for item in items:
            for k, v in item.items():
                out[k].append(v)
        return out

    tfms = [
        transforms.Compose(
            [
                transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
            ]
        )
        for size in resolutions
    ]
    dataset = SeedPrecomputeDataset([Stream(remote=None, local=cfg["data"])], tfms, cfg["batch_size"], text_name)
    loader = DataLoader(
        dataset,
        batch_size=cfg["batch_size"],
        drop_last=False,
        collate_fn=keep_lists,
        prefetch_factor=2,
        num_workers=2,
        persistent_workers=True,
        pin_memory=dev.type == "cuda",
    )
    t_load = time.time()
    vae = AutoencoderKL.from_pretrained(cfg["vae"], torch_dtype=torch.bfloat16).to(dev)
    clip = open_clip.create_model_and_transforms(text_name)[0].to(dev)
    log(f"seed: models loaded in {time.time() - t_load:.1f} s; {len(dataset)} rows; device {dev}")
    seq_first = not getattr(clip.transformer, "batch_first", True)  # the seed's open_clip ran L, N, D

    def text_features(ids):
        cast = clip.transformer.get_cast_dtype()
        with torch.autocast(dev.type, dtype=torch.float32, enabled=dev.type == "cuda"):  # CPU autocast has no fp32
            x = clip.token_embedding(ids).to(cast) + clip.positional_embedding.to(cast)
            x = x.permute(1, 0, 2) if seq_first else x
            x = clip.transformer(x, attn_mask=clip.attn_mask)
            x = x.permute(1, 0, 2) if seq_first else x
            return clip.ln_final(x).unsqueeze(1)  # [B, 1, 77, width]

    def encode(batch):
        images = [torch.stack(batch[f"image_{i}"]).to(dev) for i in range(len(resolutions))]
        captions = torch.stack(batch["caption"]).to(dev)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            lat = [(vae.encode(x)["latent_dist"].sample().data * vae.config.scaling_factor).to(torch.float16) for x in images]
            cond = text_features(captions.view(-1, captions.shape[-1])).to(torch.float16)
        return lat, cond

    columns = {"caption": "str", "caption_latents": "bytes", **{f"latents_{r}": "bytes" for r in resolutions}}
    shutil.rmtree(cfg["out"], ignore_errors=True)
    writer = MDSWriter(out=cfg["out"], columns=columns, compression=None, size_limit=256 * 2**20, max_workers=64)
    busy = Busy(dev)
    warm, t_start, n_steady, n_all, t0, last = cfg["warmup"], None, 0, 0, time.time(), None
    for step, batch in enumerate(loader):
        busy.start()
        lat, cond = encode(batch)
        busy.stop()
        lat_np = [x.detach().cpu().numpy() for x in lat]
        cond_np = cond.detach().cpu().numpy()
        for i in range(len(batch["sample"])):
            row = {"caption": batch["sample"][i]["caption"], "caption_latents": np.reshape(cond_np[i], -1).tobytes()}
            row.update({f"latents_{r}": lat_np[k][i].tobytes() for k, r in enumerate(resolutions)})
            writer.write(row)
        n_all += len(batch["sample"])
        if step + 1 == warm:
            t_start = time.time()
            busy_warm = busy.seconds()
        elif step + 1 > warm:
            n_steady += len(batch["sample"])
        last = batch
    writer.finish()
    t_end = time.time()
    res: dict[str, Any] = {"rows": n_all, "seconds": round(t_end - t0, 2), "steady_window": [t_start, t_end]}
    if t_start is not None and n_steady:
        res["images_per_s"] = round(n_steady / (t_end - t_start), 2)
        res["busy"] = round((busy.seconds() - busy_warm) / (t_end - t_start), 3)
    # What limits it: the DataLoader alone, then the device part alone on the last batch.
    res["loader_only"] = loader_rate(loader, lambda b: len(b["sample"]), cfg["probe_s"])
    if last is not None:
        calls, dt = timed_repeat(lambda: encode(last), dev, cfg["probe_s"])
        res["gpu_only"] = round(calls * len(last["sample"]) / dt, 2)
    return res


# --------------------------------------------------------------------------- (b) encode/run.py's loop, in process


class JpegRows:
    """Rows with their JPEG bytes undecoded (for decoding on the GPU) plus what ImageRows adds:
    tokens and per-key noise."""

    def __init__(self, source, n: int, tokenize, noise_shapes: dict | None, seed: int = 0):
        self.source, self.n, self.tokenize, self.noise_shapes, self.seed = source, n, tokenize, noise_shapes, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        import torch

        from encode import data as edata

        row = self.source[i]
        key, caption = edata.row_key(row, i), row["caption"].decode()
        ids, mask = self.tokenize(caption)
        item = {"key": key, "caption": caption, "jpeg": torch.frombuffer(bytearray(row["jpg"].data), dtype=torch.uint8)}
        item["ids"], item["mask"] = ids, mask
        if self.noise_shapes:
            gen = torch.Generator().manual_seed(edata.key_seed(key, self.seed))
            item["noise"] = {r: torch.randn(s, generator=gen) for r, s in self.noise_shapes.items()}
        return item


def collate_jpeg(items: list[dict]) -> dict:
    import torch

    batch: dict = {"errors": Counter(), "key": [it["key"] for it in items], "caption": [it["caption"] for it in items]}
    batch["jpeg"] = [it["jpeg"] for it in items]
    batch["ids"] = torch.stack([it["ids"] for it in items])
    batch["mask"] = torch.stack([it["mask"] for it in items])
    if "noise" in items[0]:
        batch["noise"] = {r: torch.stack([it["noise"][r] for it in items]) for r in items[0]["noise"]}
    return batch


def decode_on_device(jpegs: list, resolutions: list[int], dev) -> dict:
    """torchvision.io.decode_jpeg (nvJPEG on CUDA) for the batch, then per image: short side to
    each resolution (bicubic, antialiased), centred square crop, uint8 as the DataLoader's."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    imgs = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=dev)
    out: dict[int, list] = {r: [] for r in resolutions}
    for img in imgs:
        h, w = img.shape[1:]
        x = img.unsqueeze(0).float()
        for r in resolutions:
            scale = r / min(h, w)
            nh, nw = max(r, round(h * scale)), max(r, round(w * scale))
            y = x if (nh, nw) == (h, w) else F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
            top, left = (nh - r) // 2, (nw - r) // 2
            out[r].append(y[..., top : top + r, left : left + r].round().clamp(0, 255).to(torch.uint8))
    return {r: torch.cat(v) for r, v in out.items()}


def ours_loop(enc, ds, v: dict, cfg: dict, dev, sink: str) -> dict:
    """encode/run.py's loop (DataLoader → Encoder → AsyncWriter) over `ds`: steady images/s after
    the warm-up batches (compilation included there), for at most `cfg['variant_s']` s."""
    import torch

    from encode import data as edata
    from encode import writer

    gpu_decode = bool(v.get("gpu_decode"))
    nw = v.get("num_workers", cfg["num_workers"])
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=v.get("batch_size", cfg["batch_size"]),
        num_workers=nw,
        collate_fn=collate_jpeg if gpu_decode else edata.collate,
        pin_memory=dev.type == "cuda",
        prefetch_factor=2 if nw else None,
    )
    shutil.rmtree(sink, ignore_errors=True)
    stats: Counter = Counter()
    out = writer.AsyncWriter(writer.ChunkWriter(sink, 0, writer.columns(cfg["resolutions"]), 2048), stats)
    busy = Busy(dev)
    warm, t_start, n_steady, t_first = cfg["warmup"], None, 0, None
    t0 = time.perf_counter()
    last = None
    it = iter(loader)
    for step, batch in enumerate(it):
        if gpu_decode:
            batch["images"] = decode_on_device(batch.pop("jpeg"), cfg["resolutions"], dev)
        busy.start()
        encoded = enc(batch)
        busy.stop()
        out.submit(batch, encoded)
        if step == 0:
            t_first = time.perf_counter() - t0
        if step + 1 == warm:
            _sync(dev)
            t_start = time.perf_counter()
            busy.reset()
        elif step + 1 > warm:
            n_steady += len(batch["key"])
        last = batch
        if t_start is not None and time.perf_counter() - t_start >= cfg["variant_s"]:
            break
    del it
    out.close()
    _sync(dev)
    t_end = time.perf_counter()
    res: dict[str, Any] = {
        "first_batch_s": round(t_first or 0.0, 1),
        "rows": stats["rows"],
        "non_finite": stats["skipped_non_finite"],
    }
    if t_start is not None and n_steady:
        res["images_per_s"] = round(n_steady / (t_end - t_start), 2)
        res["busy"] = round(busy.seconds() / (t_end - t_start), 3)
    if v.get("probe_loader") and not gpu_decode:
        res["loader_only"] = loader_rate(loader, lambda b: len(b["key"]), cfg["probe_s"])
    if v.get("probe_gpu") and last is not None and not gpu_decode:
        calls, dt = timed_repeat(lambda: enc(last), dev, cfg["probe_s"])
        res["gpu_only"] = round(calls * len(last["key"]) / dt, 2)
    shutil.rmtree(sink, ignore_errors=True)
    return res


def micro(vae, texts: Callable[[str], Any], cfg: dict, dev) -> list[dict]:
    """GPU-only rates of each model on fixed inputs, eager: the VAE encoder per resolution as
    encode/run.py runs it (bf16 autocast, channels_last) and as the seed does (bf16 weights,
    channels-first); the text tower in fp32, TF32 and bf16 at two batch sizes (text batching)."""
    import copy

    import torch

    out = []
    bs = cfg["batch_size"]
    saved = [(m, m._compiled_call_impl) for m in (vae.encoder, *(texts(d).module for d in ("fp32", "bf16")))]
    for m, _ in saved:  # eager here, whatever the variants compiled; put back at the end
        m._compiled_call_impl = None
    vae_cl = vae.to(dev, memory_format=torch.channels_last)
    vae_seed = copy.deepcopy(vae).to(dev, dtype=torch.bfloat16)
    for r in cfg["resolutions"]:
        x = torch.randn(bs, 3, r, r, device=dev)
        for name, model, fmt in (
            ("bf16 autocast, channels_last", vae_cl, torch.channels_last),
            ("seed: bf16 weights", vae_seed, None),
        ):
            xi = x.contiguous(memory_format=fmt) if fmt else x

            def step(model=model, xi=xi):
                with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16):
                    return model.encode(xi).latent_dist.mean

            calls, dt = timed_repeat(step, dev, cfg["probe_s"] / 2)
            out.append({"part": f"VAE {r}², {name}, batch {bs}", "per_s": round(calls * bs / dt, 1), "flops_key": f"vae_{r}"})
    del vae_seed
    for dtype_name, tf32 in (("fp32", False), ("fp32", True), ("bf16", False)):
        te = texts(dtype_name)
        module = te.module.to(dev)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for b in (bs, 4 * bs):
            ids = torch.randint(1, 49000, (b, te.seq_len), device=dev)
            dt_ = torch.float32 if dtype_name == "fp32" else torch.bfloat16

            def tstep(ids=ids, module=module, dt_=dt_):
                from encode.models import encode_text

                return encode_text(module, ids, ids, dt_)

            calls, dt = timed_repeat(tstep, dev, cfg["probe_s"] / 3)
            name = f"text {dtype_name}{' + TF32' if tf32 else ''}, batch {b}"
            out.append({"part": name, "per_s": round(calls * b / dt, 1), "flops_key": "text"})
    torch.backends.cuda.matmul.allow_tf32 = False
    for m, impl in saved:
        m._compiled_call_impl = impl
    return out


def worker_variants(cfg: dict) -> dict:
    """Variants of encode/run.py's loop in one process (models loaded once), in priority order,
    each skipped when the deadline is too near; results written after each."""
    import torch
    from streaming.base.util import clean_stale_shared_memory

    from encode import data as edata
    from encode import models

    clean_stale_shared_memory()
    dev = _device(cfg)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as encode/run.py's setup
    for name in ("recompile_limit", "cache_size_limit"):  # many variants share one module's code
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    vae = models.load_vae(cfg["vae"])
    spec = models.TextSpec("openclip", cfg["text"])
    loaded: dict[str, Any] = {}

    def texts(dtype: str):
        if dtype not in loaded:
            loaded[dtype] = models.load_text_encoder(spec, 77, models.DTYPES[dtype])
        return loaded[dtype]

    source = edata.open_source(cfg["data"])
    noise = {r: models.latent_shape(vae, r) for r in cfg["resolutions"]}
    n = source.num_samples
    results: list[dict] = []
    path = cfg["result"]
    compiled: dict[int, tuple] = {}  # id(module) → how it is compiled now
    last_global: tuple | None = None

    def ensure_compiled(module, key: tuple, mode: str | None) -> None:
        if compiled.get(id(module)) != key:
            module._compiled_call_impl = None  # what nn.Module.compile sets; None runs eager
            if mode:
                module.compile(**({} if mode == "default" else {"mode": mode}))
            compiled[id(module)] = key

    for v in cfg["variants"]:
        left = cfg["deadline"] - time.time()
        entry: dict[str, Any] = {"name": v["name"]}
        if left < v["est_s"]:
            entry["skipped"] = f"time: {left:.0f} s left, needs ~{v['est_s']} s"
            log(f"variant {v['name']}: {entry['skipped']}")
            results.append(entry)
            continue
        t0 = time.time()
        try:
            if v.get("micro"):
                entry["micro"] = micro(vae, texts, cfg, dev)
            else:
                mode, static, tf32 = v.get("compile", cfg["compile"]), bool(v.get("static_shapes")), bool(v.get("tf32"))
                if (mode, static) != last_global:  # another compile configuration: start from a clean slate
                    torch._dynamo.reset()
                    compiled.clear()
                    last_global = (mode, static)
                torch.backends.cuda.matmul.allow_tf32 = tf32
                torch._dynamo.config.automatic_dynamic_shapes = not static
                text_dtype = v.get("text_dtype", "fp32")
                te = texts(text_dtype)
                enc = models.Encoder(
                    vae,
                    te,
                    device=dev,
                    dtype=torch.bfloat16,
                    text_dtype=models.DTYPES[text_dtype],
                    batch_size=v.get("batch_size", cfg["batch_size"]),
                    latent_mode="sample",
                    compile=False,
                    channels_last=True,
                )
                ensure_compiled(enc.vae.encoder, (mode, static), mode)
                ensure_compiled(enc.text, (mode, static, tf32), mode)
                ds = (
                    JpegRows(source, n, te.tokenize, noise)
                    if v.get("gpu_decode")
                    else edata.ImageRows(source, range(n), cfg["resolutions"], te.tokenize, noise, 0)
                )
                entry.update(ours_loop(enc, ds, v, cfg, dev, os.path.join(cfg["work"], "variant-out")))
                if v.get("gpu_decode"):
                    entry["pixels_vs_pillow"] = _decode_difference(source, te, cfg, dev)
        except Exception as e:  # one variant failing must not stop the others
            entry["error"] = f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
        entry["wall_s"] = round(time.time() - t0, 1)
        log(f"variant {v['name']}: {json.dumps(entry, default=str)}")
        results.append(entry)
        write_json(path, {"variants": results})
    torch.backends.cuda.matmul.allow_tf32 = False
    return {"variants": results}


def _decode_difference(source, te, cfg: dict, dev) -> dict:
    """Mean and max |pixel difference| between GPU decode + resize and the DataLoader's Pillow path
    on the first 8 images, per resolution."""
    from encode import data as edata

    rows = edata.ImageRows(source, range(8), cfg["resolutions"], te.tokenize, None, 0)
    pil = edata.collate([rows[i] for i in range(8)])["images"]
    raw = collate_jpeg([JpegRows(source, 8, te.tokenize, None)[i] for i in range(8)])
    gpu = decode_on_device(raw["jpeg"], cfg["resolutions"], dev)
    out = {}
    for r in cfg["resolutions"]:
        d = (gpu[r].cpu().int() - pil[r].int()).abs().float()
        out[str(r)] = {"mean": round(float(d.mean()), 3), "max": int(d.max())}
    return out


# --------------------------------------------------------------------------- (c) correctness


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def worker_check(cfg: dict) -> dict:
    """bf16 against fp32 on the same images and on fresh random pixels; the stored latents of an
    encode/run.py run against the fp32 reference with the same noise; NaN/Inf."""
    import copy

    import torch
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    from encode import data as edata
    from encode import models

    clean_stale_shared_memory()
    dev = _device(cfg)
    torch.backends.cudnn.allow_tf32 = False  # an fp32 reference is fp32: no TF32 convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    res_list = cfg["resolutions"]
    n = cfg["check_images"]
    vae = models.load_vae(cfg["vae"])
    spec = models.TextSpec("openclip", cfg["text"])
    text32 = models.load_text_encoder(spec, 77, torch.float32)
    text16 = models.load_text_encoder(spec, 77, torch.bfloat16)
    source = edata.open_source(cfg["data"])
    noise = {r: models.latent_shape(vae, r) for r in res_list}
    rows = edata.ImageRows(source, range(n), res_list, text32.tokenize, noise, 0)
    batch = edata.collate([rows[i] for i in range(n)])

    def encoder(v, text, dtype, channels_last, mode="sample", **kw):
        return models.Encoder(
            v, text, device=dev, dtype=dtype, batch_size=n, latent_mode=mode, compile=False, channels_last=channels_last, **kw
        )

    out: dict[str, Any] = {"images": n}
    ref = encoder(vae, text32, torch.float32, False)(batch)  # fp32 everywhere, sampled as encode/run.py
    ref = {k: v.cpu() for k, v in ref.items()}
    bf16 = {k: v.cpu() for k, v in encoder(vae, text32, torch.bfloat16, True)(batch).items()}
    out["bf16_vs_fp32"] = {k: rel_err(bf16[k].float(), ref[k].float()) for k in ref if k != "finite"}
    text_bf16 = encoder(vae, text16, torch.bfloat16, True, text_dtype=torch.bfloat16)(batch)["caption_latents"].cpu()
    out["text_bf16_vs_fp32"] = rel_err(text_bf16.float(), ref["caption_latents"].float())
    # The seed's dtypes: bf16 weights, channels-first, bf16 autocast (means: no noise).
    means32 = {k: v.cpu() for k, v in encoder(vae, text32, torch.float32, False, mode="mean")(batch).items()}
    vae_seed = copy.deepcopy(vae).to(torch.bfloat16)
    seed_means = {k: v.cpu() for k, v in encoder(vae_seed, text32, torch.bfloat16, False, mode="mean")(batch).items()}
    out["seed_dtypes_vs_fp32"] = {
        k: rel_err(seed_means[k].float(), means32[k].float()) for k in means32 if k.startswith("latents")
    }
    del vae_seed
    # Fresh random pixels (uniform uint8), bf16 vs fp32.
    gen = torch.Generator().manual_seed(1)
    rand = dict(batch)
    rand["images"] = {r: torch.randint(0, 256, t.shape, dtype=torch.uint8, generator=gen) for r, t in batch["images"].items()}
    r32 = encoder(vae, text32, torch.float32, False, mode="mean")(rand)
    r16 = encoder(vae, text32, torch.bfloat16, True, mode="mean")(rand)
    out["random_pixels_bf16_vs_fp32"] = {
        k: rel_err(r16[k].float().cpu(), r32[k].float().cpu()) for k in r32 if k.startswith("latents")
    }
    out["finite"] = {
        "fp32": bool(ref["finite"].all()),
        "bf16": bool(bf16["finite"].all()),
        "random_bf16": bool(r16["finite"].all()),
        "seed_dtypes": all(bool(torch.isfinite(v.float()).all()) for k, v in seed_means.items() if k.startswith("latents")),
    }
    # What encode/run.py wrote (compiled, bf16, channels_last) against the fp32 reference, same noise.
    if cfg.get("run_out") and os.path.exists(os.path.join(cfg["run_out"], "index.json")):
        import numpy as np

        ds = StreamingDataset(local=cfg["run_out"], shuffle=False, batch_size=1)
        stored = [ds[i] for i in range(n)]
        keys_match = [r["key"] for r in stored] == batch["key"]
        errs = {}
        for k in ref:
            if k == "finite":
                continue
            got = torch.from_numpy(np.stack([np.frombuffer(r[k], dtype=np.float16) for r in stored]).astype(np.float32))
            errs[k] = rel_err(got, ref[k].float().reshape(n, -1))
        out["run_output_vs_fp32"] = {"keys_match": keys_match, **errs}
        del ds
    log(f"check: {json.dumps(out)}")
    return out


def compare_outputs(a: str, b: str, rows_to_diff: int = 256) -> dict:
    """The two outputs' shard files byte for byte (same chunk layout, same rows → same bytes);
    where they differ, the largest |difference| per column over the first `rows_to_diff` rows."""
    import hashlib

    def shards(out: str) -> dict[str, tuple[int, str]]:
        found = {}
        for path in sorted(glob.glob(os.path.join(out, "r*-c*", "*.mds"))):
            with open(path, "rb") as f:
                found[os.path.relpath(path, out)] = (os.path.getsize(path), hashlib.sha256(f.read()).hexdigest())
        return found

    sa, sb = shards(a), shards(b)
    res: dict[str, Any] = {"shards": [len(sa), len(sb)], "identical": bool(sa) and sa == sb}
    res["differing_shards"] = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
    if not res["identical"]:
        import numpy as np
        from streaming import StreamingDataset

        da = StreamingDataset(local=a, shuffle=False, batch_size=1)
        db = StreamingDataset(local=b, shuffle=False, batch_size=1)
        res["rows"], diff, n_diff = [da.num_samples, db.num_samples], {}, 0
        for i in range(min(da.num_samples, db.num_samples, rows_to_diff)):
            ra, rb = da[i], db[i]
            n_diff += ra != rb
            for k in ra:
                if k.startswith(("latents", "caption_latents")) and ra[k] != rb.get(k):
                    x, y = (np.frombuffer(r[k], np.float16).astype(np.float32) for r in (ra, rb))
                    diff[k] = max(diff.get(k, 0.0), float(np.abs(x - y).max()))
        res["differing_rows_of_first"] = [n_diff, min(rows_to_diff, da.num_samples)]
        res["max_abs_diff"] = diff
        del da, db
    return res


# --------------------------------------------------------------------------- orchestration


def variants_plan(tiny: bool) -> list[dict]:
    """In priority order, with the seconds each needs at least (compilation included)."""
    s = 0.25 if tiny else 1.0
    plan = [
        {"name": "defaults (in process)", "est_s": 60, "probe_loader": True, "probe_gpu": True},
        {"name": "GPU-only microbenchmarks", "micro": True, "est_s": 25},
        {"name": "8 DataLoader workers", "num_workers": 8, "est_s": 20, "probe_loader": True},
        {"name": "12 DataLoader workers", "num_workers": 12, "est_s": 20, "probe_loader": True},
        {"name": "GPU JPEG decode (nvJPEG) + GPU resize", "gpu_decode": True, "est_s": 20},
        {"name": "text encoder bf16", "text_dtype": "bf16", "est_s": 40, "probe_gpu": True},
        {"name": "text fp32 with TF32 matmuls", "tf32": True, "est_s": 40, "probe_gpu": True},
        {"name": "no torch.compile", "compile": None, "est_s": 20, "probe_gpu": True},
        {"name": "batch 64", "batch_size": 64, "est_s": 70, "probe_gpu": True},
        {"name": "compile with static shapes", "static_shapes": True, "est_s": 70, "probe_gpu": True},
        {"name": "compile reduce-overhead (CUDA graphs)", "compile": "reduce-overhead", "est_s": 90, "probe_gpu": True},
        {"name": "compile max-autotune-no-cudagraphs", "compile": "max-autotune-no-cudagraphs", "est_s": 240, "probe_gpu": True},
    ]
    if tiny:  # CPU, 2 cores: fewer workers, a smaller batch; compiling the tiny models once is enough
        plan[2].update(name="0 DataLoader workers", num_workers=0)
        plan[3].update(name="1 DataLoader worker", num_workers=1)
        plan[8].update(name="batch 16", batch_size=16)
        plan[9].update(name="compile with static shapes (CPU: the only compiled variant)", compile="default")
        plan = plan[:10]
    for v in plan:
        v["est_s"] = max(5, int(v["est_s"] * s))
    return plan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models and images, every step")
    p.add_argument("--flops-only", action="store_true", help="print the FLOP check of the real architectures and stop")
    p.add_argument("--out", default=None, help="log and JSON folder (default: $OUT, else benchmarks/_work/gpu_encode-out)")
    p.add_argument("--work", default=None, help="models, images and outputs (default: benchmarks/_work/gpu_encode[-tiny])")
    p.add_argument("--budget", type=float, default=None, help="seconds for everything (default 450 on GPU, 900 tiny)")
    p.add_argument("--images", type=int, default=None, help="rows for encode/run.py and the variants (default 3072; tiny 48)")
    p.add_argument("--seed-images", type=int, default=None, help="rows for the seed's method (default 1024; tiny 32)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of seed method / encode/run.py")
    p.add_argument("--no-variants", action="store_true", help="skip the in-process variants")
    args = p.parse_args(argv)
    tiny = args.tiny
    out = args.out or os.environ.get("OUT") or os.path.join(HERE, "_work", "gpu_encode-out" + ("-tiny" if tiny else ""))
    work = args.work or os.path.join(HERE, "_work", "gpu_encode" + ("-tiny" if tiny else ""))
    os.makedirs(out, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    global _LOG
    _LOG = open(os.path.join(out, "gpu_encode.log"), "a")
    t_begin = time.time()
    budget = args.budget or (900.0 if tiny else 450.0)
    deadline = t_begin + budget

    def left() -> float:
        return deadline - time.time()

    R: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "tiny": tiny, "budget_s": budget}
    json_path = os.path.join(out, "gpu_encode.json")
    log(f"== gpu_encode {'(tiny, CPU)' if tiny else ''} {R['started']}; out {out}; work {work}; budget {budget:.0f} s")
    sys.path[:0] = [REPO, HERE, os.path.join(REPO, "tests")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sampler = None
    try:
        R["packages"] = ensure_packages(os.path.join(work, "site"))
        versions = subprocess.run(
            [sys.executable, "-c", VERSIONS], capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=300
        )
        log(versions.stdout.strip() + versions.stderr.strip()[-3000:])
        if versions.returncode:
            raise SystemExit("the packages do not import: see above")
        R["environment"] = json.loads(versions.stdout.strip().splitlines()[-1])
        if args.flops_only:
            R["flops_real"] = real_flops()
            log(flop_table(R["flops_real"]))
            return 0
        gpu = R["environment"].get("cuda") and not tiny
        device = "cuda:0" if gpu else "cpu"
        if not gpu and not tiny:
            log("no CUDA device: this is the GPU run; use --tiny on CPU")
            return 2
        if gpu:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
            log(smi.stdout)
        sampler = GpuSampler()
        sampler.start()
        R["gpu_sampler"] = sampler.source

        n = args.images or (48 if tiny else 3072)
        n_seed = args.seed_images or (32 if tiny else 1024)
        resolutions = [64, 128] if tiny else [256, 512]
        t = time.time()
        R["data"] = make_image_mds(work, n, n_seed, short=128 if tiny else 512)
        log(f"data: {json.dumps(R['data'])} ({time.time() - t:.1f} s)")

        t = time.time()
        R["flops_real"] = real_flops()
        log("FLOPs of the real architectures (meta device):\n" + flop_table(R["flops_real"]))
        m = build_models(work, tiny)
        used = count_flops(m["vae_cfg"], m["clip_cfg"], resolutions)
        R["flops_used"] = used
        R["ceiling"] = PEAK_BF16 / sum(used.values())
        log(
            f"FLOPs per image of the models run here: {json.dumps(used)}; bf16 ceiling {R['ceiling']:.1f} images/s ({time.time() - t:.1f} s)"
        )
        write_json(json_path, R)

        common = {
            "device": device,
            "vae": m["vae"],
            "text": m["text"],
            "resolutions": resolutions,
            "batch_size": 8 if tiny else 32,
            "warmup": 1 if tiny else 3,
            "probe_s": 1.0 if tiny else 3.0,
        }
        run_base = [RUN, "--vae", m["vae"], "--text-encoder", f"openclip:{m['text']}", "--resolutions", *map(str, resolutions)]
        if tiny:
            run_base += ["--device", "cpu", "--batch-size", "8", "--num-workers", "2"]
        R["seed_runs"], R["run_py"] = [], []
        need = {
            "seed": 40 if tiny else 75,
            "ours_cold": 60 if tiny else 220,
            "ours": 40 if tiny else 100,
            "check": 30 if tiny else 60,
        }
        for rnd in range(args.rounds):
            if left() < need["seed"]:
                log(f"round {rnd + 1}: skipped, {left():.0f} s left")
                break
            res_path = os.path.join(work, f"seed-{rnd}.json")
            cfg = {**common, "data": R["data"]["seed_data"], "out": os.path.join(work, f"seed-out-{rnd}"), "result": res_path}
            run = run_child(f"seed {rnd + 1}", worker_cmd("_seed", cfg, work), timeout=min(left() - 5, 240))
            got = read_result(res_path) or {}
            got.update(run)
            got["gpu_util"] = sampler.mean(*got["steady_window"]) if got.get("steady_window") else None
            R["seed_runs"].append(got)
            log(f"seed round {rnd + 1}: {json.dumps(got)}")
            write_json(json_path, R)

            cold = rnd == 0
            if left() < (need["ours_cold"] if cold else need["ours"]):
                log(f"encode/run.py round {rnd + 1}: skipped, {left():.0f} s left")
                break
            run_out = os.path.join(work, f"run-out-{rnd}")
            shutil.rmtree(run_out, ignore_errors=True)
            launcher = (
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc_per_node",
                    "1",
                    "--master_addr",
                    "127.0.0.1",
                    "--master_port",
                    str(_free_port()),
                ]
                if rnd % 2 == 0
                else [sys.executable]
            )
            cmd = [*launcher, *run_base[:1], "--data", R["data"]["data"], "--out", run_out, *run_base[1:]]
            seen: dict[str, float] = {}
            progress = os.path.join(run_out, ".progress", "rank00000.json")

            def watch(progress=progress, seen=seen) -> None:
                got = read_result(progress)
                if got and "first_batch_s" in got.get("timing", {}) and "first" not in seen:
                    seen["first"] = time.time()
                if got and got.get("done") and "done" not in seen:
                    seen["done"] = time.time()

            run = run_child(f"encode/run.py {rnd + 1}", cmd, timeout=min(left() - 5, 420), poll=watch)
            stats = read_result(os.path.join(run_out, "stats.json")) or {}
            entry = {
                "launch": f"torchrun --nproc_per_node 1 ({'nccl' if gpu else 'gloo'})" if rnd % 2 == 0 else "one process",
                "out": run_out,
                **run,
                **{
                    k: stats.get(k)
                    for k in ("images_per_s_steady", "images_per_s", "rows", "seconds", "skipped", "world_size", "device")
                },
                "gpu_util": sampler.mean(seen.get("first"), seen.get("done")),
            }
            R["run_py"].append(entry)
            log(f"encode/run.py round {rnd + 1}: {json.dumps(entry)}")
            write_json(json_path, R)

            if rnd == 0 and left() >= need["check"]:
                res_path = os.path.join(work, "check.json")
                cfg = {
                    **common,
                    "data": R["data"]["data"],
                    "run_out": run_out,
                    "check_images": 4 if tiny else 16,
                    "result": res_path,
                }
                run_child("check", worker_cmd("_check", cfg, work), timeout=min(left() - 5, 180))
                R["check"] = read_result(res_path)
                write_json(json_path, R)

        outs = [e["out"] for e in R["run_py"] if e.get("rc") == 0]
        if len(outs) >= 2 and left() > 10:
            R["bytes"] = compare_outputs(outs[0], outs[1])
            log(f"encode/run.py outputs compared: {json.dumps(R['bytes'])}")
            write_json(json_path, R)

        if not args.no_variants and left() > 30:
            res_path = os.path.join(work, "variants.json")
            cfg = {
                **common,
                "data": R["data"]["data"],
                "work": work,
                "num_workers": 2 if tiny else 4,
                "compile": None if tiny else "default",
                "variant_s": 2.0 if tiny else 8.0,
                "variants": variants_plan(tiny),
                "deadline": deadline - 15,
                "result": res_path,
            }
            run_child("variants", worker_cmd("_variants", cfg, work), timeout=max(10, left() - 8))
            R["variants"] = (read_result(res_path) or {}).get("variants", [])
            write_json(json_path, R)
    except SystemExit as e:
        R["error"] = str(e)
        log(f"stopped: {e}")
    except Exception as e:
        R["error"] = f"{type(e).__name__}: {e}"
        log(traceback.format_exc())
    finally:
        if sampler is not None:
            sampler.stopped.set()
        R["seconds"] = round(time.time() - t_begin, 1)
        write_json(json_path, R)
        if not args.flops_only:
            log(summary(R, out))
    return 1 if R.get("error") else 0


VERSIONS = """
import json, sys, importlib
import torch
out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.cuda.is_available()}
if out["cuda"]:
    out["gpu"] = torch.cuda.get_device_name(0)
    out["capability"] = list(torch.cuda.get_device_capability(0))
for m in ("torchvision", "diffusers", "open_clip", "streaming", "transformers", "huggingface_hub", "numpy", "PIL"):
    try:
        out[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception as e:
        out[m] = "error: " + repr(e)
out["cpus"] = __import__("os").cpu_count()
print(json.dumps(out))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _limit(loader: float | None, gpu: float | None, busy: float | None) -> str:
    if loader and gpu:
        return f"{'DataLoader' if loader < gpu else 'GPU'} ({loader:.0f} vs {gpu:.0f} img/s alone)"
    if busy is not None:
        return "GPU (busy ≥ 85%)" if busy >= 0.85 else "host side: DataLoader or launches (busy < 85%)"
    return "?"


def _fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def summary(R: dict, out: str) -> str:
    """The short table printed last."""
    ceiling = R.get("ceiling")
    env = R.get("environment", {})
    where = f"{env.get('gpu', 'CPU (tiny smoke test: fractions are against the H200 bf16 peak, meaningless here)')}"
    lines = [
        "",
        f"== encoder on {where}; torch {env.get('torch', '?')}; {R.get('seconds', 0):.0f} s",
        f"   bf16 ceiling {_fmt(ceiling)} images/s for the models and resolutions run"
        + (
            f" ({sum(R['flops_used'].values()) / 1e9:,.1f} GFLOP/image at {PEAK_BF16 / 1e12:.0f} TFLOP/s)"
            if R.get("flops_used")
            else ""
        ),
        "",
        "| run | images/s | runs | of ceiling | GPU busy: events / NVML | limit |",
        "|---|---|---|---|---|---|",
    ]

    def row(name: str, rates: list, events: float | None, nvml: float | None, limit: str) -> None:
        med = _median(rates)
        frac = f"{med / ceiling:.1%}" if med and ceiling else "–"
        runs = ", ".join(_fmt(r) for r in rates) or "–"
        lines.append(f"| {name} | {_fmt(med)} | {runs} | {frac} | {_fmt(events, '.0%')} / {_fmt(nvml, '.0%')} | {limit} |")

    seeds = R.get("seed_runs", [])
    if seeds:
        events, nvml = _median([s.get("busy") for s in seeds]), _median([s.get("gpu_util") for s in seeds])
        row(
            "seed precompute method (re-implemented)",
            [s.get("images_per_s") for s in seeds],
            events,
            nvml,
            _limit(_median([s.get("loader_only") for s in seeds]), _median([s.get("gpu_only") for s in seeds]), nvml or events),
        )
    runs = R.get("run_py", [])
    variants = R.get("variants", [])
    defaults = next((v for v in variants if v["name"].startswith("defaults")), {})
    if runs:
        nvml = _median([r.get("gpu_util") for r in runs])
        row(
            "encode/run.py defaults (torchrun world size 1 / one process)",
            [r.get("images_per_s_steady") for r in runs],
            None,
            nvml,
            _limit(defaults.get("loader_only"), defaults.get("gpu_only"), nvml),
        )
    for v in variants:
        if v.get("micro"):
            continue
        if "images_per_s" in v:
            limit = _limit(v.get("loader_only"), v.get("gpu_only"), v.get("busy"))
            row(f"variant: {v['name']}", [v["images_per_s"]], v.get("busy"), None, limit)
        else:
            lines.append(f"| variant: {v['name']} | {v.get('skipped') or v.get('error') or 'no steady batches'} | | | | |")
    micro_rows = next((v["micro"] for v in variants if v.get("micro")), [])
    flops = R.get("flops_used", {})
    if micro_rows:
        lines += ["", "| GPU only (eager) | per s | TFLOP/s | of bf16 peak |", "|---|---|---|---|"]
        for mr in micro_rows:
            tf = mr["per_s"] * flops.get(mr["flops_key"], 0) / 1e12
            lines.append(f"| {mr['part']} | {mr['per_s']:.1f} | {tf:.1f} | {tf * 1e12 / PEAK_BF16:.1%} |")
    s_med = _median([s.get("images_per_s") for s in seeds])
    o_med = _median([r.get("images_per_s_steady") for r in runs])
    lines.append("")
    if o_med and ceiling:
        lines.append(f"target ≥ 60% of the ceiling: {'met' if o_med >= 0.6 * ceiling else 'not met'} ({o_med / ceiling:.1%})")
    if o_med and s_med:
        lines.append(f"target ≥ 1.5× the seed's method: {'met' if o_med >= 1.5 * s_med else 'not met'} ({o_med / s_med:.2f}×)")
    chk = R.get("check") or {}
    if chk:

        def errs(d: dict) -> str:
            return ", ".join(f"{k} {v:.2e}" for k, v in d.items() if isinstance(v, float))

        lines.append(
            f"bf16 vs fp32 (same images): {errs(chk.get('bf16_vs_fp32', {}))}; text bf16 {chk.get('text_bf16_vs_fp32', 0):.2e}"
        )
        lines.append(f"bf16 vs fp32 (random pixels): {errs(chk.get('random_pixels_bf16_vs_fp32', {}))}")
        lines.append(f"seed dtypes vs fp32: {errs(chk.get('seed_dtypes_vs_fp32', {}))}")
        if "run_output_vs_fp32" in chk:
            lines.append(
                f"encode/run.py's stored output vs fp32 (same noise): {errs(chk['run_output_vs_fp32'])}; keys match: {chk['run_output_vs_fp32'].get('keys_match')}"
            )
        lines.append(f"finite: {chk.get('finite')}")
    else:
        lines.append("correctness check: not run")
    b = R.get("bytes")
    if b:
        how = (
            "identical bytes"
            if b["identical"]
            else f"DIFFERENT: shards {b['differing_shards']}, max |diff| {b.get('max_abs_diff')}"
        )
        skipped = [r.get("skipped") for r in runs]
        lines.append(
            f"encode/run.py rerun (torchrun world size 1 vs one process): {how} ({b['shards'][0]} shards); rows {[r.get('rows') for r in runs]}, skipped {skipped}"
        )
    else:
        lines.append("byte comparison of two encode/run.py runs: not run")
    if R.get("error"):
        lines.append(f"stopped early: {R['error']}")
    lines.append(f"full log: {os.path.join(out, 'gpu_encode.log')}; figures: {os.path.join(out, 'gpu_encode.json')}")
    return "\n".join(lines)


def worker_main(role: str, cfg_path: str) -> int:
    """Run one worker (a child process of main), its result written as JSON to cfg['result']."""
    sys.path[:0] = [REPO, HERE, os.path.join(REPO, "tests")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with open(cfg_path) as f:
        cfg = json.load(f)
    fn = {"_seed": worker_seed, "_check": worker_check, "_variants": worker_variants}[role]
    try:
        res = fn(cfg)
    except Exception:
        traceback.print_exc()
        write_json(cfg["result"], {**(read_result(cfg["result"]) or {}), "error": traceback.format_exc(limit=3)})
        return 1
    write_json(cfg["result"], res)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1].startswith("_"):
        sys.exit(worker_main(sys.argv[1], sys.argv[2]))
    sys.exit(main())
