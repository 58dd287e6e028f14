"""`bin/fetch --format mosaic` as mosaicml/diffusion's own LAION code reads it, before and after
`encode/run.py --copy-columns` (its reader and its writer's columns: `tests/peers.py`).

mosaic's training code reads one resolution-bucket folder at a time (`remote_download/<low>-<high>`)
with its `StreamingLAIONDataset`: `jpg` bytes opened with PIL, the caption tokenized, and, where
precomputed, `caption_latents` (77, 1024) and `latents_256`/`latents_512` as float16.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from streaming import Stream, StreamingDataset

from tests.conftest import LoopbackServer, make_image, run_fetch
from tests.test_fetch_urls import NET, write_list

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import encode_models as em  # noqa: E402
from peers import MOSAIC_COLUMNS, MosaicStreamingLAIONDataset  # noqa: E402

MOSAIC_BUCKET_FOLDERS = ["0-64", "64-128", "128-256", "256-512", "512-768", "768-1024", "1024-1048576"]


def mosaic_reader(local: str, image_size: int | None = None) -> MosaicStreamingLAIONDataset:
    # an SD-style repo with tokenizer/, standing in for stabilityai/stable-diffusion-2-base
    return MosaicStreamingLAIONDataset(
        streams=[Stream(local=local)], tokenizer_name_or_path=em.sd_repo(), batch_size=1, image_size=image_size
    )


# (width, height) served → the bucket mosaic files the image under (its original short side)
SIZES = {"a": (300, 280), "b": (640, 512), "c": (900, 800), "d": (1200, 1100), "e": (520, 700)}
BUCKET = {"a": "256-512", "b": "512-768", "c": "768-1024", "d": "1024-1048576", "e": "512-768"}


def laion_rows(server: LoopbackServer) -> list[dict[str, Any]]:
    rows = []
    for i, (name, (w, h)) in enumerate(SIZES.items()):
        server.routes[f"/{name}.jpg"] = make_image(w, h, seed=i)
        row = {
            "URL": server.url(f"/{name}.jpg"),
            "TEXT": f"photo {name}",
            "WIDTH": w,
            "HEIGHT": h,
            "similarity": 0.3 + i / 100,
            "punsafe": 0.01 * i,
            "pwatermark": 0.1 * i,
            "hash": -(10**18) + i,
            "AESTHETIC_SCORE": 5.0 + i,
        }
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
            assert dict(zip(shard["column_names"], shard["column_encodings"])) == MOSAIC_COLUMNS
        if not index["shards"]:
            continue
        dataset = mosaic_reader(str(mds / folder))
        raw = StreamingDataset(local=str(mds / folder), shuffle=False, batch_size=1)
        for i in range(len(dataset)):
            sample, row = dataset[i], raw[i]
            listed = by_caption[row["caption"]]
            name = row["caption"].split()[-1]
            assert (
                sample["captions"].tolist()
                == dataset.tokenizer(
                    row["caption"], padding="max_length", max_length=dataset.tokenizer.model_max_length, truncation=True
                )["input_ids"]
            )
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


def test_mosaic_format_encoded_with_copy_columns_reads_in_mosaics_loader(tmp_path: Path, server: LoopbackServer) -> None:
    """The other half of mosaic's pipeline: our encoder reads the `jpg` bytes column, and with
    --copy-columns writes what its precompute step writes (every image column + the latents)."""
    mds, _ = fetch_mosaic(tmp_path, server)
    out = str(tmp_path / "latents")
    proc = em.run_encode(str(mds), out, "--copy-columns", "--num-workers", "0", text="t5-1024", resolutions=None)
    assert proc.returncode == 0, proc.stderr
    images = {r["key"]: r for r in (StreamingDataset(local=str(mds), shuffle=False, batch_size=1)[i] for i in range(len(SIZES)))}
    for size, side in ((256, 32), (512, 64)):
        dataset = mosaic_reader(out, size)
        latents = StreamingDataset(local=out, shuffle=False, batch_size=1)
        assert len(dataset) == len(SIZES)
        for i in range(len(dataset)):
            sample, row = dataset[i], latents[i]
            assert sample["caption_latents"].shape == (77, 1024) and sample["image_latents"].shape == (4, side, side)
            fetched = images[row["key"]]
            assert row["jpg"] == fetched["jpg"] and row["caption"] == fetched["caption"]
            assert {k: row[k] for k in ("url", "width", "height", "status")} == {
                k: fetched[k] for k in ("url", "width", "height", "status")
            }
            assert sample["image"].size == (fetched["width"], fetched["height"])


def test_mosaic_format_on_two_nodes_merged_by_hand_without_its_flags(tmp_path: Path, server: LoopbackServer) -> None:
    """`bin/fetch --merge --out OUT`, as the nodes print it, builds mosaic's bucket indexes from the
    settings the nodes ran with: the merging machine passes no --format."""
    listing = write_list(tmp_path / "laion.parquet", laion_rows(server))
    out = tmp_path / "nodes"
    for rank in ("1", "0"):
        proc = run_fetch(
            "--dataset",
            "laion",
            "--urls",
            listing,
            "--out",
            out,
            "--format",
            "mosaic",
            "--unit-size",
            "2",
            "--node-rank",
            rank,
            "--num-nodes",
            "2",
            *NET,
        )
        assert proc.returncode == 0, proc.stderr
    for index in (out / "mds").rglob("index.json"):
        if index.parent.parent == out / "mds" or index.parent == out / "mds":
            index.unlink()  # the merged indexes: only the units' own remain
    merged = run_fetch("--merge", "--out", out)
    assert merged.returncode == 0, merged.stderr
    found = {}
    for folder in MOSAIC_BUCKET_FOLDERS:
        if not orjson.loads((out / "mds" / folder / "index.json").read_bytes())["shards"]:
            continue
        dataset = mosaic_reader(str(out / "mds" / folder))
        raw = StreamingDataset(local=str(out / "mds" / folder), shuffle=False, batch_size=1)
        found.update({raw[i]["caption"].split()[-1]: folder for i in range(len(dataset))})
    assert found == BUCKET
    assert orjson.loads((out / "stats.json").read_bytes())["settings"]["format"] == "mosaic"


def test_mosaic_format_refuses_list_columns_under_the_names_it_fills(tmp_path: Path, server: LoopbackServer) -> None:
    listing = write_list(tmp_path / "laion.parquet", laion_rows(server))
    for name in ("status", "exif:error_message"):
        proc = run_fetch(
            "--dataset", "laion", "--urls", listing, "--out", tmp_path / "o", "--format", "mosaic", "--keep-cols", name, *NET
        )
        assert proc.returncode == 2 and "writes itself" in proc.stderr, proc.stderr
