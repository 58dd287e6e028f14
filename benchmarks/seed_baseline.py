#!/usr/bin/env python3
"""The seed scripts' SA-1B method, as a baseline: everything through the disk, stage by stage.

    python benchmarks/seed_baseline.py --links links.txt --captions-url URL --datadir DIR --num-proc 2

What the per-dataset scripts this project replaces do (a download script, then a convert
script), written out faithfully so that the archive benchmark compares against their method:

1. download the caption archive (``SA1B_caption.tar.gz``) to disk and extract its ``sa_N.txt``
   files to disk;
2. a pool of ``--num-proc`` processes, one archive per task: download the tar to disk (8 KiB
   chunks), then for each ``.jpg`` member: extract it to disk, open it, skip it if its short
   side < ``--min-size``, resize the short side to ``--max-size`` with PIL bicubic when larger
   (torchvision ``Resize(512, BICUBIC)`` on a PIL image is exactly this), save it to disk with
   PIL's default JPEG quality (75), delete the extracted original; delete the tar;
3. a pool of ``--num-proc`` processes, each over a slice of the resized files: open each with
   PIL, read its caption file, write it into its own MDSWriter (``jpg`` column of type jpeg,
   which reads the file's bytes back); finally merge the per-process indexes.

Prints one JSON line: images written, seconds per stage.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tarfile
import time
import urllib.request
from multiprocessing import Pool

import numpy as np
from PIL import Image

CHUNK = 8192


def download(url: str, dest: str) -> None:
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
        while True:
            chunk = r.read(CHUNK)
            if not chunk:
                break
            f.write(chunk)


def download_and_extract(file_name: str, url: str, args: argparse.Namespace) -> int:
    tar_dir, images_dir = os.path.join(args.datadir, "compressed"), os.path.join(args.datadir, "raw")
    tar_path = os.path.join(tar_dir, file_name)
    download(url, tar_path)
    images_subdir = os.path.join(images_dir, os.path.splitext(file_name)[0])
    os.makedirs(images_subdir, exist_ok=True)
    kept = 0
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            if not member.name.endswith(".jpg"):
                continue
            try:
                tar.extract(member, path=images_dir)
                p = os.path.join(images_dir, member.name.strip("./"))
                new_p = os.path.join(images_subdir, member.name.strip("./"))
                img = Image.open(p)
                w, h = img.size
                if min(w, h) > args.max_size:
                    short, long_ = min(w, h), max(w, h)
                    new_long = int(args.max_size * long_ / short)
                    size = (args.max_size, new_long) if w <= h else (new_long, args.max_size)
                    img = img.resize(size, Image.Resampling.BICUBIC)
                if min(w, h) < args.min_size:
                    continue
                img.save(new_p)  # PIL default JPEG quality (75)
                os.remove(p)
                kept += 1
            except Exception as e:  # the seed prints and goes on
                print("Exception occured: ", e)
    os.remove(tar_path)
    return kept


def write_images(images_path: np.ndarray, args: argparse.Namespace, index: int) -> int:
    from streaming import MDSWriter

    columns = {"width": "int32", "height": "int32", "jpg": "jpeg", "caption": "str"}
    save_dir = os.path.join(args.datadir, "mds", str(index))  # the seed: current_process() index in its own script
    os.makedirs(save_dir, exist_ok=True)
    n = 0
    with MDSWriter(out=save_dir, columns=columns, compression=None, size_limit=256 * 2**20, max_workers=64) as writer:
        for f in images_path:
            try:
                img = Image.open(f)
                w, h = img.size
                cap_path = os.path.join(args.datadir, "captions", os.path.basename(f).split(".")[0] + ".txt")
                with open(cap_path) as cf:
                    cap = cf.read().strip()
                writer.write({"jpg": img, "caption": cap, "width": w, "height": h})
                n += 1
            except Exception as e:
                print(f"Something went wrong in reading image and caption, skipping writing this sample. Error: {e}")
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--links", required=True, help="file_name<TAB>cdn_link with a header line")
    p.add_argument("--captions-url", required=True)
    p.add_argument("--datadir", required=True)
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--min-size", type=int, default=256)
    p.add_argument("--max-size", type=int, default=512)
    args = p.parse_args()

    for sub in ("compressed", "raw", "captions"):
        os.makedirs(os.path.join(args.datadir, sub), exist_ok=True)
    t0 = time.perf_counter()
    cap_tar = os.path.join(args.datadir, "SA1B_caption.tar.gz")
    download(args.captions_url, cap_tar)
    with tarfile.open(cap_tar) as tar:
        tar.extractall(os.path.join(args.datadir, "captions"))
    t1 = time.perf_counter()

    with open(args.links) as f:
        links = [line.rstrip("\n").split("\t") for line in f.readlines()[1:] if line.strip()]
    with Pool(processes=args.num_proc) as pool:
        resized = pool.starmap(download_and_extract, [(name, url, args) for name, url in links])
    t2 = time.perf_counter()

    images = glob.glob(os.path.join(args.datadir, "raw", "**", "*jpg"))
    parts = np.array_split(images, args.num_proc)
    with Pool(processes=args.num_proc) as pool:
        written = pool.starmap(write_images, [(part, args, k) for k, part in enumerate(parts)])
    from streaming.base.util import merge_index

    mds = os.path.join(args.datadir, "mds")
    merge_index([os.path.join(mds, str(i), "index.json") for i in range(args.num_proc)], out=mds, keep_local=True)
    t3 = time.perf_counter()
    print(
        json.dumps(
            {
                "written": int(sum(written)),
                "resized": int(sum(resized)),
                "captions_s": t1 - t0,
                "download_extract_resize_s": t2 - t1,
                "convert_s": t3 - t2,
                "total_s": t3 - t0,
            }
        )
    )


if __name__ == "__main__":
    main()
