"""Tiny real models and image MDS datasets for the encoder tests, built offline from configs.

Each builder saves to a folder laid out like the hub repo it imitates, so `encode/` loads it
through the same `from_pretrained` / open_clip code path that a hub id takes. Builders are
cached per test session (one temp root) because every test process would otherwise rebuild them.
"""

from __future__ import annotations

import atexit
import functools
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub lookup would otherwise hang ~45 s
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `import encode` without installing, whichever way pytest was started
    sys.path.insert(0, REPO)
PYTHON = sys.executable
TORCHRUN = os.path.join(os.path.dirname(PYTHON), "torchrun")
RUN = os.path.join(REPO, "encode", "run.py")
IMAGE_COLUMNS = {
    "jpg": "jpeg",
    "caption": "str",
    "width": "int32",
    "height": "int32",
    "original_width": "int32",
    "original_height": "int32",
    "key": "str",
}
WORDS = "a photo of red blue green cat dog house tree car sky river mountain painting small large old new".split()


@functools.cache
def root() -> str:
    path = tempfile.mkdtemp(prefix="encode-test-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))


# --------------------------------------------------------------------------- data


def jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A smooth random image (gradients + blobs + a little noise): JPEG-friendly, not constant."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([np.sin(xx / rng.uniform(8, 60) + rng.uniform(0, 6)) + np.cos(yy / rng.uniform(8, 60)) for _ in range(3)], -1)
    img = (img - img.min()) / (np.ptp(img) + 1e-6) * 220 + rng.normal(0, 8, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_image_mds(out: str, n: int, seed: int = 0, units: int = 2, prefix: str = "img") -> list[str]:
    """An image MDS like bin/fetch writes: one MDS folder per unit, merged index at `out`.

    Images have a short side in 256–512 and various aspect ratios. Returns the keys in order.
    """
    from streaming import MDSWriter
    from streaming.base.util import merge_index

    rng = np.random.default_rng(seed)
    keys, indexes = [], []
    for u in range(units):
        unit_dir = os.path.join(out, f"{u:05d}")
        with MDSWriter(out=unit_dir, columns=IMAGE_COLUMNS, size_limit=1 << 18, hashes=["xxh64"]) as w:
            for i in range(n * u // units, n * (u + 1) // units):
                short = int(rng.integers(256, 513))
                long = int(short * rng.choice([1.0, 1.0, 1.33, 1.5, 2.0]))
                width, height = (long, short) if rng.random() < 0.5 else (short, long)
                key = f"{prefix}-{i:06d}"
                w.write(
                    {
                        "jpg": jpeg(rng, width, height),
                        "caption": caption(rng),
                        "width": width,
                        "height": height,
                        "original_width": width * 2,
                        "original_height": height * 2,
                        "key": key,
                    }
                )
                keys.append(key)
        indexes.append(os.path.join(unit_dir, "index.json"))
    merge_index(indexes, out)
    return keys


def image_mds(n: int = 37, seed: int = 0) -> tuple[str, tuple[str, ...]]:
    """(folder, keys) of a cached image MDS with `n` rows."""
    return _image_mds(n, seed)


@functools.cache  # behind a wrapper so that f(37) and f(37, 0) share one cache entry
def _image_mds(n: int, seed: int) -> tuple[str, tuple[str, ...]]:
    out = os.path.join(root(), f"images-{n}-{seed}")
    return out, tuple(make_image_mds(out, n, seed, prefix=f"s{seed}"))


# --------------------------------------------------------------------------- models


@functools.cache
def sd_repo() -> str:
    """An SD-style folder: vae/ (4 blocks, so 8× down like SD/SDXL), tokenizer/, text_encoder/ (CLIP)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    path = os.path.join(root(), "sd-tiny")
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=[8, 16, 16, 16],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
    ).save_pretrained(os.path.join(path, "vae"))
    clip_tokenizer(os.path.join(path, "tokenizer"))
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
        )
    ).save_pretrained(os.path.join(path, "text_encoder"))
    return path


@functools.cache
def overflowing_vae() -> str:
    """The tiny VAE with a scaling factor so large that every latent overflows float16."""
    from diffusers import AutoencoderKL

    path = os.path.join(root(), "vae-overflow")
    vae = AutoencoderKL.from_pretrained(os.path.join(sd_repo(), "vae"))
    vae.register_to_config(scaling_factor=1e9)
    vae.save_pretrained(path)
    return path


def clip_tokenizer(path: str) -> None:
    """A real CLIPTokenizer written from the BPE vocabulary that ships inside open_clip."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    os.makedirs(path, exist_ok=True)
    vocab = {rename.get(t, t): i for t, i in simple.encoder.items()}
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    CLIPTokenizer(
        os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    ).save_pretrained(path)  # as SD's tokenizers


def t5_repo(d_model: int = 32) -> str:
    """A plain T5 encoder folder (like DeepFloyd/t5-v1_1-xxl) with a Unigram tokenizer trained here.

    `d_model=1024` gives caption embeddings of the micro-budget/mosaicml default shape [77, 1024]
    (with the default --max-length 77) from a model of a few hundred thousand weights: what their
    loaders' fixed reshapes need, at the cost of a tiny model."""
    return _t5_repo(d_model)


@functools.cache
def _t5_repo(d_model: int) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    path = os.path.join(root(), f"t5-tiny-{d_model}")
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    rng = np.random.default_rng(1)
    tok.train_from_iterator(
        [caption(rng) for _ in range(500)],
        trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"),
    )
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=tok, extra_ids=0).save_pretrained(path)
    torch.manual_seed(0)
    T5EncoderModel(
        T5Config(
            vocab_size=tok.get_vocab_size(),
            d_model=d_model,
            d_ff=64,
            d_kv=16,
            num_layers=2,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).save_pretrained(path)
    return path


@functools.cache
def openclip_dir() -> str:
    """A folder for open_clip's `local-dir:` schema: open_clip_config.json + open_clip_model.safetensors."""
    import open_clip
    from safetensors.torch import save_file

    path = os.path.join(root(), "openclip-tiny")
    os.makedirs(path, exist_ok=True)
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2},
    }
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {}}, f)
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, "open_clip_model.safetensors"))
    return path


TEXT_ENCODERS = {
    "openclip": lambda: f"openclip:{openclip_dir()}",
    "hf-clip": lambda: f"hf-clip:{sd_repo()}",
    "t5": lambda: f"t5:{t5_repo()}",
    "t5-1024": lambda: f"t5:{t5_repo(1024)}",  # caption_latents [77, 1024], as DFN5B's
}


# --------------------------------------------------------------------------- running encode/run.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cmd(
    data: str, out: str, *extra: str, nproc: int = 1, text: str = "openclip", resolutions: tuple[int, ...] | None = (64, 128)
) -> list[str]:
    """The encode/run.py command line (torchrun with gloo on 127.0.0.1 when nproc > 1);
    `resolutions=None` leaves --resolutions at its default (256 512)."""
    launcher = (
        [PYTHON]
        if nproc == 1
        else [TORCHRUN, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    )
    return [
        *launcher,
        RUN,
        "--data",
        data,
        "--out",
        out,
        "--vae",
        sd_repo(),
        "--text-encoder",
        TEXT_ENCODERS[text](),
        *(["--resolutions", *map(str, resolutions)] if resolutions is not None else []),
        "--batch-size",
        "4",
        "--num-workers",
        "1",
        "--device",
        "cpu",
        *extra,
    ]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run_encode(*args, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run encode/run.py to completion (see `run_cmd` for the arguments)."""
    return subprocess.run(run_cmd(*args, **kwargs), env=env(), capture_output=True, text=True, timeout=timeout)


def latents_dataset(n: int = 37, seed: int = 0, resolutions: tuple[int, ...] = (64, 256)) -> str:
    """A cached latent dataset made by one `python encode/run.py` over `image_mds(n, seed)`."""
    return _latents_dataset(n, seed, resolutions)


@functools.cache
def _latents_dataset(n: int, seed: int, resolutions: tuple[int, ...]) -> str:
    data, _ = image_mds(n, seed)
    out = os.path.join(root(), f"latents-{n}-{seed}-{'-'.join(map(str, resolutions))}")
    proc = run_encode(data, out, resolutions=resolutions)
    assert proc.returncode == 0, proc.stderr
    return out


def read_rows(out: str) -> list[dict]:
    """Every row of an MDS folder, read with stock Streaming (as a training job would)."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=out, shuffle=False, batch_size=1)
    rows = [ds[i] for i in range(ds.num_samples)]
    del ds
    return rows


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process below it, as a node failure would.

    torchrun starts its ranks in sessions of their own, so killing the launcher's process group
    alone leaves the ranks running (and holding ~700 MB each): collect the whole tree first.
    """
    import signal

    def children(p: int) -> list[int]:
        found: list[int] = []
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    found.extend(int(c) for c in f.read().split())
        except OSError:
            pass
        return found

    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children(p))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
