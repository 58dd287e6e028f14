"""`bin/fetch --format mosaic` as mosaicml/diffusion's own LAION code reads it.

`MosaicLAIONDataset` below re-implements the reading half of mosaic's `StreamingLAIONDataset`
(`diffusion/datasets/laion/laion.py`, mosaicml/diffusion at 49282fd): a StreamingDataset over one
resolution-bucket folder (`remote_download/<low>-<high>`), each row's `jpg` bytes opened with
PIL and converted to RGB, `caption` as text, and, where precomputed, `caption_latents` as float16
(77, 1024) and `latents_256`/`latents_512` as float16 (4, 32, 32)/(4, 64, 64). Its tokenizer and
transforms are left out: they act on what is read, not on how. The columns and types are those
its `scripts/laion_cloudwriter.py` declares.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch
from PIL import Image
from streaming import StreamingDataset

from tests.conftest import LoopbackServer, make_image, run_fetch
from tests.test_fetch_urls import NET, write_list

# mosaic's LAION writer: column → MDS encoding
MOSAIC_WRITER_COLUMNS = {
    "punsafe": "float64", "pwatermark": "float64", "similarity": "float64", "caption": "str", "url": "str",
    "key": "str", "status": "str", "error_message": "str", "width": "int32", "height": "int32",
    "original_width": "int32", "original_height": "int32", "exif": "str", "jpg": "bytes", "hash": "int64",
    "aesthetic_score": "float64",
}
MOSAIC_BUCKET_FOLDERS = ["0-64", "64-128", "128-256", "256-512", "512-768", "768-1024", "1024-1048576"]


class MosaicLAIONDataset(StreamingDataset):
    """The reading logic of mosaic's StreamingLAIONDataset (see the module docstring)."""

    def __init__(self, local: str, image_size: int | None = None) -> None:
        super().__init__(local=local, shuffle=False, batch_size=1)
        self.image_size = image_size

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        img = Image.open(io.BytesIO(sample["jpg"]))
        if img.mode != "RGB":
            img = img.convert("RGB")
        out: dict[str, Any] = {"image": img, "captions": sample["caption"]}
        if "caption_latents" in sample:
            out["caption_latents"] = torch.from_numpy(np.frombuffer(sample["caption_latents"], dtype=np.float16).copy()).reshape(77, 1024)
        if self.image_size == 256 and "latents_256" in sample:
            out["image_latents"] = torch.from_numpy(np.frombuffer(sample["latents_256"], dtype=np.float16).copy()).reshape(4, 32, 32)
        if self.image_size == 512 and "latents_512" in sample:
            out["image_latents"] = torch.from_numpy(np.frombuffer(sample["latents_512"], dtype=np.float16).copy()).reshape(4, 64, 64)
        return out


# (width, height) served → the bucket mosaic files the image under (its original short side)
SIZES = {"a": (300, 280), "b": (640, 512), "c": (900, 800), "d": (1200, 1100), "e": (520, 700)}
BUCKET = {"a": "256-512", "b": "512-768", "c": "768-1024", "d": "1024-1048576", "e": "512-768"}


def laion_rows(server: LoopbackServer) -> list[dict[str, Any]]:
    rows = []
    for i, (name, (w, h)) in enumerate(SIZES.items()):
        server.routes[f"/{name}.jpg"] = make_image(w, h, seed=i)
        row = {"URL": server.url(f"/{name}.jpg"), "TEXT": f"photo {name}", "WIDTH": w, "HEIGHT": h,
               "similarity": 0.3 + i / 100, "punsafe": 0.01 * i, "pwatermark": 0.1 * i, "hash": -(10**18) + i,
               "AESTHETIC_SCORE": 5.0 + i}
        if name == "e":  # a row with its scores missing
            row.update(punsafe=None, AESTHETIC_SCORE=None, hash=None)
        rows.append(row)
    return rows


def fetch_mosaic(tmp_path: Path, server: LoopbackServer, *extra: str) -> tuple[Path, list[dict[str, Any]]]:
    rows = laion_rows(server)
    listing = write_list(tmp_path / "laion.parquet", rows)
    out = tmp_path / "mosaic"
    proc = run_fetch("--dataset", "laion", "--urls", listing, "--out", out, "--format", "mosaic", *NET, *extra)
    assert proc.returncode == 0, proc.stderr
    return out / "mds", rows


def test_mosaic_format_reads_in_mosaics_own_loader(tmp_path: Path, server: LoopbackServer) -> None:
    mds, rows = fetch_mosaic(tmp_path, server)
    assert sorted(p.name for p in mds.iterdir() if p.is_dir() and not p.name.startswith("_")) == sorted(MOSAIC_BUCKET_FOLDERS)
    by_caption = {r["TEXT"]: r for r in rows}
    seen = {}
    for folder in MOSAIC_BUCKET_FOLDERS:
        index = orjson.loads((mds / folder / "index.json").read_bytes())
        for shard in index["shards"]:
            assert dict(zip(shard["column_names"], shard["column_encodings"])) == MOSAIC_WRITER_COLUMNS
        if not index["shards"]:
            continue
        dataset = MosaicLAIONDataset(str(mds / folder))
        raw = StreamingDataset(local=str(mds / folder), shuffle=False, batch_size=1)
        for i in range(len(dataset)):
            sample, row = dataset[i], raw[i]
            listed = by_caption[sample["captions"]]
            name = sample["captions"].split()[-1]
            assert folder == BUCKET[name]
            w, h = SIZES[name]
            scale = 512 / min(w, h) if min(w, h) > 512 else 1.0  # --max-size 512 by default
            assert sample["image"].mode == "RGB" and sample["image"].size == (row["width"], row["height"])
            assert (row["original_width"], row["original_height"]) == (w, h)
            assert min(row["width"], row["height"]) == round(min(w, h) * scale)
            assert row["url"] == listed["URL"] and row["status"] == "success" and row["error_message"] == "" and row["exif"] == ""
            assert row["similarity"] == pytest.approx(listed["similarity"])
            assert row["pwatermark"] == pytest.approx(listed["pwatermark"])
            if name == "e":  # missing in the list: NaN scores, aesthetic 0.0 and hash 0, as mosaic's writer stores them
                assert math.isnan(row["punsafe"]) and row["aesthetic_score"] == 0.0 and row["hash"] == 0
            else:
                assert row["punsafe"] == pytest.approx(listed["punsafe"])
                assert row["aesthetic_score"] == listed["AESTHETIC_SCORE"] and row["hash"] == listed["hash"]
            seen[name] = row["key"]
    assert sorted(seen) == sorted(SIZES) and len(set(seen.values())) == len(SIZES)
    # the whole dataset under the root index too (what encode/run.py reads)
    assert len(StreamingDataset(local=str(mds), shuffle=False, batch_size=1)) == len(SIZES)


def test_mosaic_format_is_part_of_the_settings(tmp_path: Path, server: LoopbackServer) -> None:
    mds, _ = fetch_mosaic(tmp_path, server)
    listing = tmp_path / "laion.parquet"
    proc = run_fetch("--dataset", "laion", "--urls", listing, "--out", mds.parent, *NET)
    assert proc.returncode == 2 and "format" in proc.stderr, proc.stderr
