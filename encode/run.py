#!/usr/bin/env python3
"""Encode an image MDS dataset into VAE latents + text embeddings (a latent MDS dataset).

    torchrun --nproc_per_node N encode/run.py --data DIR/mds --out DIR/latents \\
        --vae stabilityai/stable-diffusion-xl-base-1.0 \\
        --text-encoder openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378 --resolutions 256 512

One process per device (nccl on CUDA, gloo on CPU; `python encode/run.py` is one process).
The flow is setup → load models → loop → barrier → merge; rerunning the same command after a
crash continues where each rank stopped. Multi-node runs need `--out` on a shared filesystem.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # `python encode/run.py`
if __name__ == "__main__":  # `python3 encode/run.py` in a fresh shell runs the system Python
    from fastfetch.launch import ENCODE_NEEDS, use_project_python

    use_project_python(ENCODE_NEEDS)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

import encode  # noqa: E402
from encode import data, models, preflight, writer  # noqa: E402
from encode.paths import INDEX, fetched_dataset, pull_small_files, stream_location  # noqa: E402
from fastfetch import storage  # noqa: E402
from fastfetch.errors import UsageError  # noqa: E402
from fastfetch.storage import StorageError, is_remote  # noqa: E402

# Settings that change what is written: a resumed run must use the same ones.
SETTINGS = (
    "vae",
    "vae_subfolder",
    "text_encoder",
    "max_length",
    "resolutions",
    "dtype",
    "text_dtype",
    "latent_mode",
    "seed",
    "keep_images",
    "copy_columns",
    "clean",
)
# What a latents.json written before a setting existed implies for it (the text encoder then ran
# in --dtype; nothing but the JPEG could be copied).
LEGACY_SETTINGS = {"text_dtype": lambda old: old.get("dtype"), "copy_columns": lambda old: False, "clean": lambda old: False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--data",
        required=True,
        help="image MDS folder (or a remote URL): bin/fetch's, the micro-budget "
        "converters' or mosaicml's LAION MDS; needs a jpg column (jpeg, png, webp, pil, or bytes holding an "
        "image file) and a caption; rows are keyed by their key column, else #<row index>",
    )
    p.add_argument(
        "--out",
        required=True,
        help="latent MDS folder to create or resume, or a remote URL (s3://…: "
        "written into a local mirror under --cache-dir, each finished chunk uploaded)",
    )
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL: hub id or local folder")
    p.add_argument("--vae-subfolder", default=None, help="subfolder holding the VAE; default: try vae/, then the root")
    p.add_argument(
        "--text-encoder",
        required=True,
        type=models.TextSpec.parse,
        help="openclip:<hf-hub:repo|folder|architecture@tag>, hf-clip:<id|folder>, or t5:<id|folder>",
    )
    p.add_argument("--max-length", type=int, default=77, help="T5 token length (CLIP models fix their own)")
    p.add_argument(
        "--resolutions",
        type=int,
        nargs="+",
        default=[256, 512],
        help="square crop sizes to encode, each stored as latents_<size> (the micro-budget precompute's "
        "and mosaicml's pair: a 256 and a 512 training loader both find theirs)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per device step")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per process")
    p.add_argument("--prefetch-factor", type=int, default=2, help="batches loaded ahead per worker")
    p.add_argument("--dtype", choices=sorted(models.DTYPES), default="bf16", help="the VAE's autocast compute dtype")
    p.add_argument(
        "--text-dtype",
        choices=sorted(models.DTYPES),
        default="fp32",
        help="the text encoder's weights and compute dtype; fp32 is how the micro-budget precompute runs its "
        "open_clip text encoder (DFN5B; its hf-clip and T5 paths load in --dtype), bf16/fp16 trade "
        "fidelity for speed and memory (a T5-XXL is 19 GB in fp32)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the VAE encoder and text encoder; default: on for CUDA, off on CPU",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the VAE in channels_last memory format (faster convolutions on GPU and CPU)",
    )
    p.add_argument(
        "--latent-mode",
        choices=["sample", "mean"],
        default="sample",
        help="sample: latent_dist.sample() seeded per row key; mean: latent_dist.mean",
    )
    p.add_argument("--seed", type=int, default=0, help="mixed into every row's sampling seed")
    p.add_argument(
        "--keep-images",
        action="store_true",
        help="copy each row's image (the jpg column, its MDS encoding and bytes unchanged) into the output",
    )
    p.add_argument(
        "--copy-columns",
        action="store_true",
        help="copy every input column (MDS encoding and bytes unchanged) into the output rows next to the "
        "latents, e.g. so mosaicml's StreamingLAIONDataset reads the output; columns the encoder writes "
        "itself (key, caption, caption_latents, caption_length) and every latents_<n> of the input are "
        "not copied: the encoder's own take their place",
    )
    p.add_argument(
        "--clean-captions",
        choices=["auto", "on", "off"],
        default="auto",
        help="clean captions before encoding them, with the micro-budget seed's CC12M cleaner "
        "(fastfetch/captions.py); the latent dataset's caption column holds the cleaned text. auto: on "
        "for a dataset bin/fetch made from cc12m (its stats.json says so), off otherwise, as the seed does",
    )
    p.add_argument(
        "--chunk-rows", type=int, default=2048, help="rows per output chunk; a crash loses at most one unfinished chunk per rank"
    )
    p.add_argument("--device", default="auto", help="auto (cuda:<local rank> if available, else cpu), cpu or cuda")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="local cache for a remote --data, and the local mirror of a "
        "remote --out (default: a folder under the system temp dir)",
    )
    p.add_argument(
        "--verify-shards",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="before encoding, check every --data shard against the hash its index records "
        "(presence, size and header are always checked)",
    )
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0 or args.prefetch_factor < 1 or args.chunk_rows < 1:
        p.error("--batch-size, --prefetch-factor and --chunk-rows must be ≥ 1, --num-workers ≥ 0")
    overlap = _overlap(args.data, args.out)
    if overlap:
        p.error(overlap)
    # A remote --out is written into its local mirror; `remote_out` says where pieces go.
    args.remote_out = args.out.rstrip("/") if is_remote(args.out) else None
    if args.remote_out:
        args.out = stream_location(args.remote_out, args.cache_dir)[1]
    if not is_remote(args.data) and not os.path.exists(os.path.join(args.data, INDEX)):
        p.error(f"--data {args.data}: no {INDEX} there; point it at the mds folder bin/fetch wrote")
    return args


def _overlap(data_path: str, out: str) -> str | None:
    """Why --out may not be where it is: inside --data (a rerun of bin/fetch, or this run's
    own merge, would meet the latents there) or around it (the merge and stats.json would
    overwrite the image dataset's)."""

    def norm(path: str) -> str:
        return path.rstrip("/") + "/" if is_remote(path) else os.path.realpath(path) + os.sep

    d, o = norm(data_path), norm(out)
    if o == d:
        return f"--out {out} is --data itself: write the latents to a folder of their own (e.g. next to it)"
    if o.startswith(d):
        return f"--out {out} is inside --data {data_path}: write the latents next to the image dataset, not in it"
    if d.startswith(o):
        return f"--data {data_path} is inside --out {out}: write the latents to a folder of their own"
    return None


# --------------------------------------------------------------------------- setup


@dataclass
class Ctx:
    rank: int
    world_size: int
    device: torch.device
    distributed: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)


def setup(args: argparse.Namespace) -> Ctx:
    """Process group (nccl on CUDA, gloo on CPU), device, and Streaming's leftover shared memory."""
    from streaming.base.util import clean_stale_shared_memory

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers tokenize; avoid fork warnings
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    clean_stale_shared_memory()  # a killed run leaves Streaming's shm behind, which blocks the next
    return Ctx(dist.get_rank() if distributed else 0, dist.get_world_size() if distributed else 1, device, distributed)


def code_version() -> str:
    """Package version plus the git commit when run from a checkout (recorded in latents.json)."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{encode.__version__}+{rev}" if rev else encode.__version__


# --------------------------------------------------------------------------- models


@dataclass
class Loaded:
    encoder: models.Encoder
    text: models.TextEncoder
    meta: dict  # the sidecar JSON (the existing one when resuming)
    noise_shapes: dict[int, tuple[int, ...]] | None  # per resolution, for --latent-mode sample


def load_models(args: argparse.Namespace, ctx: Ctx) -> Loaded:
    """The encode step and the sidecar metadata; checks that a resumed `--out` used the same settings."""
    dtype, text_dtype = models.DTYPES[args.dtype], models.DTYPES[args.text_dtype]
    vae = models.load_vae(args.vae, args.vae_subfolder)
    text = models.load_text_encoder(args.text_encoder, args.max_length, text_dtype)
    try:
        shapes = {f"latents_{r}": list(models.latent_shape(vae, r)) for r in args.resolutions}
    except ValueError as e:
        raise UsageError(f"--resolutions: {e}") from e
    shapes["caption_latents"] = [text.seq_len, text.dim]
    settings = {k: getattr(args, k) for k in SETTINGS}
    settings["text_encoder"] = str(args.text_encoder)
    meta = {
        "format": "fastfetch-latents/1",
        "code_version": code_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "models": models.describe(vae, args.vae, text, args.text_encoder, args.text_dtype),
        "compute_dtype": args.dtype,
        "storage_dtype": "float16",
        "latent_mode": args.latent_mode,
        "resolutions": args.resolutions,
        "shapes": shapes,
        "columns": writer.columns(args.resolutions, args.copied),
    }
    data_id = args.data.rstrip("/") if is_remote(args.data) else os.path.realpath(args.data)
    meta["data"] = data_id
    old = writer.read_meta(args.out)
    if old is not None and old.get("data", data_id) != data_id:
        raise UsageError(
            f"{args.out} holds latents of {old['data']}, not of --data {args.data}: rows are matched by key, "
            "so another dataset's rows would be skipped or mixed in; choose a new --out (if it is the same "
            'dataset moved, set "data" in its latents.json to the new place)'
        )
    recorded = (
        None if old is None else {**{k: implied(old["settings"]) for k, implied in LEGACY_SETTINGS.items()}, **old["settings"]}
    )
    if recorded is not None and recorded != settings:
        diff = {k: (recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v}
        raise UsageError(
            f"{args.out} holds latents made with other settings {diff} (old, new); "
            "rerun with the old settings or choose a new --out"
        )
    compile_ = ctx.device.type == "cuda" if args.compile is None else args.compile
    enc = models.Encoder(
        vae,
        text,
        device=ctx.device,
        dtype=dtype,
        text_dtype=text_dtype,
        batch_size=args.batch_size,
        latent_mode=args.latent_mode,
        compile=compile_,
        channels_last=args.channels_last,
    )
    noise_shapes = {r: tuple(shapes[f"latents_{r}"]) for r in args.resolutions} if args.latent_mode == "sample" else None
    return Loaded(enc, text, meta if old is None else old, noise_shapes)


# --------------------------------------------------------------------------- loop


def encode_loop(args: argparse.Namespace, ctx: Ctx, m: Loaded, progress: writer.Progress) -> None:
    """Encode this rank's rows that no earlier run finished; counters go to `progress`."""
    source = data.open_source(args.data, args.cache_dir, args.validate_hash)
    done = frozenset(writer.done_keys(args.out))
    rows = data.rank_rows(source.num_samples, ctx.rank, ctx.world_size)
    loader = torch.utils.data.DataLoader(
        data.ImageRows(
            source,
            rows,
            args.resolutions,
            m.text.tokenize,
            m.noise_shapes,
            args.seed,
            list(args.copied),
            done,
            _caption_cleaner(args.clean),
        ),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        collate_fn=data.collate,
        pin_memory=ctx.device.type == "cuda",
        prefetch_factor=args.prefetch_factor if args.num_workers else None,
    )
    stats = Counter(already_done=0)
    bar = tqdm(total=source.num_samples - len(done), unit="img", dynamic_ncols=True, disable=not ctx.main)
    out = writer.AsyncWriter(
        writer.ChunkWriter(args.out, ctx.rank, writer.columns(args.resolutions, args.copied), args.chunk_rows, args.remote_out),
        stats,
    )
    start, timing = time.perf_counter(), {}
    for batch in loader:
        stats.update(batch["errors"])
        if batch["key"]:
            out.submit(batch, m.encoder(batch))
        stats["seen"] += len(batch["key"]) + sum(batch["errors"].values()) - batch["errors"]["already_done"]
        if batch["key"] and "first_batch_s" not in timing:  # the first encoded batch holds compilation
            timing["first_batch_s"], stats["seen_first_batch"] = time.perf_counter() - start, stats["seen"]
        timing["seconds"] = time.perf_counter() - start
        progress.update(stats, timing)
        _advance(bar, progress)
    out.close()
    timing["seconds"] = time.perf_counter() - start
    progress.update(stats, timing, done=True)
    while ctx.main:  # keep the bar moving until every rank has finished
        _advance(bar, progress)
        ranks = progress.read_all()
        if len(ranks) == ctx.world_size and all(p["done"] for p in ranks):
            break
        time.sleep(0.5)
    bar.close()


def _advance(bar: tqdm, progress: writer.Progress) -> None:
    if not bar.disable:
        bar.update(sum(p["stats"].get("seen", 0) for p in progress.read_all()) - bar.n)


# --------------------------------------------------------------------------- merge + summary


def summarize(args: argparse.Namespace, ctx: Ctx, progress: writer.Progress) -> dict:
    """Merged index, stats.json and the printed run summary (rank 0, after the barrier)."""
    ranks = progress.read_all()
    total: Counter = Counter()
    for p in ranks:
        total.update(p["stats"])
    seconds = max(p["timing"].get("seconds", 0.0) for p in ranks)
    # Throughput after each rank's first encoded batch (compilation, worker start-up); None when
    # no rank got past its first batch.
    after_first = [
        (p["stats"]["seen"] - p["stats"]["seen_first_batch"]) / (p["timing"]["seconds"] - p["timing"]["first_batch_s"])
        for p in ranks
        if "first_batch_s" in p["timing"] and p["stats"]["seen"] > p["stats"]["seen_first_batch"]
    ]
    steady = round(sum(after_first), 3) if after_first else None
    skipped = {k: v for k, v in sorted(total.items()) if k.startswith(("skipped", "decode_error", "already"))}
    stats = {
        "rows": writer.merge(args.out),
        "rows_this_run": total["rows"],
        "skipped": skipped,
        "seconds": round(seconds, 3),
        "images_per_s": round(total["seen"] / seconds, 3) if seconds else 0.0,
        "images_per_s_steady": steady,
        "world_size": ctx.world_size,
        "device": ctx.device.type,
    }
    writer.write_json(os.path.join(args.out, "stats.json"), stats)
    rate = f"{stats['images_per_s']:.2f} img/s" + (f", {steady:.2f} after the first batch" if steady else "")
    print(
        f"encoded {stats['rows_this_run']} rows in {seconds:.1f} s ({rate}) on {ctx.world_size} × "
        f"{ctx.device.type}; {stats['rows']} rows in {args.out}"
    )
    for reason, n in skipped.items():
        print(f"  {reason}: {n}")
    if total["skipped_non_finite"]:
        print(
            "  non-finite latents were not written; the SDXL VAE overflows in fp16: use --dtype bf16 or fp32, "
            "or an fp16-fixed VAE"
        )
    return stats


def _caption_cleaner(clean: bool):
    """The seed's CC12M caption cleaner when cleaning is on (imported only then: ftfy, bs4)."""
    if not clean:
        return None
    from fastfetch.captions import clean_caption

    return clean_caption


def check_inputs(args: argparse.Namespace, ctx: Ctx) -> list:
    """Before any model loads: the image dataset is whole (``encode.preflight``, the shards dealt
    over the ranks) and no other run writes this rank's share of --out. Every rank gets every
    rank's findings, so all stop together. Returns this rank's lock (held while the run lasts)."""
    found: list[str] = []
    try:
        dataset = preflight.read_index(args.data, args.cache_dir)
        found += preflight.problems(dataset, ctx.rank, ctx.world_size, args.verify_shards)
        inputs = data.input_columns(dataset.shards, uniform=args.copy_columns or args.keep_images)
        args.copied = writer.copied_columns(inputs, args.resolutions, args.copy_columns, args.keep_images)
        args.clean = args.clean_captions == "on" or (
            args.clean_captions == "auto" and fetched_dataset(args.data, args.cache_dir) == "cc12m"
        )
    except ValueError as e:
        found.append(str(e))
    locks = []
    try:
        os.makedirs(os.path.join(args.out, writer.LOCK_DIR), exist_ok=True)
        lock = open(os.path.join(args.out, writer.LOCK_DIR, f"rank{ctx.rank:05d}"), "a+")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locks.append(lock)
    except BlockingIOError:
        found.append(f"another encode run is writing into {args.out} (rank {ctx.rank}); wait for it or choose another --out")
    except OSError as e:
        found.append(f"cannot write into --out {args.out}: {e.strerror or e}")
    if ctx.distributed:
        everyone: list = [None] * ctx.world_size
        dist.all_gather_object(everyone, found)
        found = [msg for rank_found in everyone for msg in rank_found]
    if found:
        shown = sorted(set(found))
        more = f"\n  … and {len(shown) - 20} more" if len(shown) > 20 else ""
        raise UsageError("the input cannot be encoded:\n  " + "\n  ".join(shown[:20]) + more)
    args.validate_hash = dataset.hash_algo if dataset.remote else None
    return locks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = setup(args)
    try:
        locks = check_inputs(args, ctx)  # noqa: F841 (held until the process ends)
        loaded = load_models(args, ctx)
        if ctx.main:
            os.makedirs(args.out, exist_ok=True)
            writer.remove_unfinished(args.out)
            if args.remote_out:  # chunks finished by an earlier run, possibly elsewhere
                pull_small_files(args.remote_out, args.out, writer.CHUNK_BOOKKEEPING)
            writer.write_json(os.path.join(args.out, writer.META_NAME), loaded.meta)
        ctx.barrier()  # nobody reads `out` before rank 0 has cleaned it
        progress = writer.Progress(args.out, ctx.rank, ctx.world_size)
        encode_loop(args, ctx, loaded, progress)
        ctx.barrier()
        if ctx.main:
            if args.remote_out:  # chunks other nodes wrote into the same remote output
                pull_small_files(args.remote_out, args.out, writer.CHUNK_BOOKKEEPING)
            summarize(args, ctx, progress)
            if args.remote_out:
                storage.upload(args.out, args.remote_out, [writer.META_NAME, "stats.json", INDEX])
    except (UsageError, models.ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:  # the remote --data or --out failed: finished chunks are kept
        print(f"error: {e}; rerun the same command once the storage is reachable", file=sys.stderr)
        return 1
    finally:
        if ctx.distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
