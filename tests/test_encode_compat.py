"""Compatibility of the encoder and the loader with the two pipelines they stand in for.

- micro-budget diffusion (github SonyResearch/micro_diffusion @ 900d7d4): its training loader
  reads our latents unchanged (at the default resolutions 256 and 512), and our loader reads the
  latent folders its precompute script writes (no latents.json).
- mosaicml diffusion (github mosaicml/diffusion @ 49282fd): the encoder reads its LAION image MDS
  (`jpg` stored as MDS `bytes`), and with `--copy-columns` its StreamingLAIONDataset reads our
  output.

The two readers (`tests/peers.py`) re-implement those repositories' reading logic line for line
(their packages pin older torch/streaming and pull in training stacks, so they are not installed).
"""

from __future__ import annotations

import functools
import io
import json
import os
import sys
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import MDSWriter, Stream
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import encode_models as em  # noqa: E402
from peers import (  # noqa: E402
    MOSAIC_COLUMNS,
    MosaicStreamingLAIONDataset,
    seed_build_streaming_latents_dataloader,
)

from encode import data, writer  # noqa: E402
from encode.loader import build_streaming_latents_dataloader  # noqa: E402

# --------------------------------------------------------------------------- the micro-budget loader


def write_seed_latents(out: str, rows: int, caption=(1, 77, 1024), shapes=None, seed: int = 0) -> list[dict]:
    """A latent folder as the micro-budget precompute writes it (micro_diffusion/datasets/prepare/
    */precompute.py): no latents.json, columns caption str + fp16 bytes, compression None,
    256 MiB shards. Returns the arrays written."""
    shapes = shapes or {"latents_256": (4, 32, 32), "latents_512": (4, 64, 64)}
    columns = {"caption": "str", "caption_latents": "bytes", **{k: "bytes" for k in shapes}}
    rng = np.random.default_rng(seed)
    written = []
    with MDSWriter(out=out, columns=columns, compression=None, size_limit=256 * (2**20)) as w:
        for i in range(rows):
            row = {
                "caption": f"seed caption {i}",
                "caption_latents": rng.standard_normal(caption).astype(np.float16),
                **{k: rng.standard_normal(s).astype(np.float16) for k, s in shapes.items()},
            }
            written.append(row)
            w.write({k: np.reshape(v, -1).tobytes() if isinstance(v, np.ndarray) else v for k, v in row.items()})
    return written


def drain(loader: DataLoader) -> dict[str, Any]:
    """Every batch of `loader` concatenated per key."""
    batches = list(loader)
    return {
        k: torch.cat([b[k] for b in batches]) if isinstance(batches[0][k], torch.Tensor) else [x for b in batches for x in b[k]]
        for k in batches[0]
    }


@functools.cache
def default_latents() -> tuple[str, tuple[str, ...]]:
    """encode/run.py with its default resolutions over 6 images, with a text encoder of DFN5B's
    width (the tiny T5 with d_model 1024: caption_latents [77, 1024])."""
    images, keys = em.image_mds(6, seed=2)
    out = os.path.join(em.root(), "latents-default-resolutions")
    proc = em.run_encode(images, out, "--num-workers", "0", text="t5-1024", resolutions=None)
    assert proc.returncode == 0, proc.stderr
    return out, keys


def test_default_resolutions_are_256_and_512():
    from encode.run import parse_args

    images, _ = em.image_mds(6, seed=2)
    args = parse_args(
        ["--data", images, "--out", os.path.join(em.root(), "unused"), "--vae", "x", "--text-encoder", "openclip:x"]
    )
    assert args.resolutions == [256, 512] and args.text_dtype == "fp32" and args.dtype == "bf16"
    with open(os.path.join(default_latents()[0], "latents.json")) as f:
        meta = json.load(f)
    assert meta["resolutions"] == [256, 512]
    assert meta["shapes"] == {"latents_256": [4, 32, 32], "latents_512": [4, 64, 64], "caption_latents": [77, 1024]}


@pytest.mark.parametrize("size,side", [(256, 32), (512, 64)])
def test_the_seed_loader_reads_our_output_unchanged(size, side):
    """The micro-budget loader with its default arguments (cap_seq_size 77, cap_emb_dim 1024)
    over our default output: both resolutions, the right shapes, the same tensors as ours."""
    out, keys = default_latents()
    theirs = drain(seed_build_streaming_latents_dataloader(out, batch_size=4, image_size=size, shuffle=False, drop_last=False))
    ours = drain(build_streaming_latents_dataloader(out, 4, size, 77, 1024, shuffle=False, drop_last=False))
    assert set(theirs) == {"drop_caption_mask", "caption_latents", "image_latents"}
    assert theirs["image_latents"].shape == (len(keys), 4, side, side)
    assert theirs["caption_latents"].shape == (len(keys), 1, 77, 1024)
    assert theirs["image_latents"].dtype == theirs["caption_latents"].dtype == torch.float16
    assert torch.equal(theirs["image_latents"], ours["image_latents"])
    assert torch.equal(theirs["caption_latents"], ours["caption_latents"])
    assert theirs["drop_caption_mask"].tolist() == ours["drop_caption_mask"].tolist() == [1.0] * len(keys)


def test_the_seed_loader_with_a_narrow_text_encoder():
    """Another caption width goes through the seed builder's cap_emb_dim argument."""
    out = em.latents_dataset()  # openclip, width 48; resolutions 64 and 256
    theirs = drain(seed_build_streaming_latents_dataloader(out, 8, 256, cap_emb_dim=48, shuffle=False, drop_last=False))
    ours = drain(build_streaming_latents_dataloader(out, 8, 256, shuffle=False, drop_last=False))
    assert theirs["caption_latents"].shape == (37, 1, 77, 48)
    assert torch.equal(theirs["caption_latents"], ours["caption_latents"])
    assert torch.equal(theirs["image_latents"], ours["image_latents"])


# --------------------------------------------------------------------------- our loader, seed folders


@pytest.mark.parametrize("size", [256, 512])
def test_our_loader_reads_a_seed_folder_exactly(tmp_path, size):
    seed_dir = str(tmp_path / "seed")
    written = write_seed_latents(seed_dir, 10)
    for kwargs in ({}, {"cap_seq_size": 77, "cap_emb_dim": 1024, "latent_channels": 4}):  # inferred, then explicit
        ours = drain(build_streaming_latents_dataloader(seed_dir, 4, size, shuffle=False, drop_last=False, **kwargs))
        assert ours["caption"] == [r["caption"] for r in written]
        assert torch.equal(ours["caption_latents"], torch.from_numpy(np.stack([r["caption_latents"] for r in written])))
        want = np.stack([r[f"latents_{size}"] for r in written])
        assert torch.equal(ours["image_latents"], torch.from_numpy(want))
    theirs = drain(seed_build_streaming_latents_dataloader(seed_dir, 4, size, shuffle=False, drop_last=False))
    assert torch.equal(theirs["image_latents"], ours["image_latents"])
    assert torch.equal(theirs["caption_latents"], ours["caption_latents"])


def test_shapes_inferred_from_a_seed_folder(tmp_path):
    """A 16-channel VAE and a 77 × 4096 text encoder: channels and width from the byte counts."""
    folder = str(tmp_path / "wide")
    write_seed_latents(folder, 3, caption=(1, 77, 4096), shapes={"latents_256": (16, 32, 32)})
    batch = next(iter(build_streaming_latents_dataloader(folder, 3, 256, shuffle=False)))
    assert batch["image_latents"].shape == (3, 16, 32, 32) and batch["caption_latents"].shape == (3, 1, 77, 4096)


def test_bytes_that_do_not_divide_are_a_clear_error(tmp_path):
    odd = str(tmp_path / "odd")
    write_seed_latents(odd, 2, caption=(1, 77, 1024), shapes={"latents_256": (4, 30, 30)})  # 30×30: not 256/8
    with pytest.raises(ValueError, match=r"latents_256.*latent_channels"):
        build_streaming_latents_dataloader(odd, 2, 256)
    with pytest.raises(ValueError, match=r"latents_256: 7200 bytes are not 16 × 32 × 32"):
        build_streaming_latents_dataloader(odd, 2, 256, latent_channels=16)
    with pytest.raises(ValueError, match="no latents_512"):
        build_streaming_latents_dataloader(odd, 2, 512)
    good = str(tmp_path / "good")
    write_seed_latents(good, 2, caption=(1, 77, 1024), shapes={"latents_256": (4, 32, 32)})
    with pytest.raises(ValueError, match=r"caption_latents: 157696 bytes are not 77 × 1000 .*cap_emb_dim"):
        build_streaming_latents_dataloader(good, 2, 256, cap_emb_dim=1000)
    with pytest.raises(ValueError, match=r"caption_latents: 157696 bytes are not 100 × width"):
        build_streaming_latents_dataloader(good, 2, 256, cap_seq_size=100)
    with pytest.raises(ValueError, match="disagree with its latents.json"):  # explicit shapes are checked too
        build_streaming_latents_dataloader(em.latents_dataset(), 2, 256, cap_emb_dim=1024)


def test_folders_without_latents_json_mix_with_known_ones_only_when_allowed(tmp_path):
    ours = em.latents_dataset()  # caption [77, 48], latents_256 [4, 32, 32]
    seed_a, seed_b = str(tmp_path / "a"), str(tmp_path / "b")
    write_seed_latents(seed_a, 5, caption=(1, 77, 48), shapes={"latents_256": (4, 32, 32)})
    write_seed_latents(seed_b, 3, caption=(1, 77, 48), shapes={"latents_256": (4, 32, 32)}, seed=1)
    both_seed = drain(build_streaming_latents_dataloader([seed_a, seed_b], 4, drop_last=False))
    assert len(both_seed["caption"]) == 8  # unknown with unknown: the seed's own recipe mixes five
    with pytest.raises(ValueError, match="allow_unknown_models"):
        build_streaming_latents_dataloader([ours, seed_a], 4)
    mixed = drain(build_streaming_latents_dataloader([ours, seed_a], 4, drop_last=False, allow_unknown_models=True))
    assert len(mixed["caption"]) == 37 + 5
    write_seed_latents(str(tmp_path / "c"), 2, caption=(1, 77, 1024), shapes={"latents_256": (4, 32, 32)})
    with pytest.raises(ValueError, match="disagree on"):  # allowed or not, shapes must agree
        build_streaming_latents_dataloader([ours, str(tmp_path / "c")], 4, allow_unknown_models=True)


# --------------------------------------------------------------------------- mosaicml


def write_mosaic_images(out: str, n: int) -> list[dict]:
    """A LAION image MDS as mosaicml's cloudwriter writes it: `jpg` raw image bytes (JPEG, and
    a PNG in palette mode, as img2dataset keeps whatever the server sent with --resize_mode no),
    NaN allowed in the floats (its get_float passes NaN through)."""
    rng = np.random.default_rng(5)
    rows = []
    with MDSWriter(out=out, columns=MOSAIC_COLUMNS, compression=None, hashes=[], size_limit=256 * (2**20)) as w:
        for i in range(n):
            width, height = int(rng.integers(256, 700)), int(rng.integers(256, 700))
            jpg = em.jpeg(rng, width, height)
            if i == 1:
                buf = io.BytesIO()
                Image.open(io.BytesIO(jpg)).convert("P").save(buf, format="PNG")
                jpg = buf.getvalue()
            row = {
                "punsafe": float("nan") if i == 2 else float(rng.random()),
                "pwatermark": float(rng.random()),
                "similarity": float(rng.random()),
                "caption": em.caption(rng),
                "url": f"http://127.0.0.1:9/{i}.jpg",
                "key": f"{i // 4:05d}{i % 4:04d}",
                "status": "success",
                "error_message": "",
                "width": width,
                "height": height,
                "original_width": width * 2,
                "original_height": height * 2,
                "exif": json.dumps({"Image Make": "cam"}) if i % 2 else "",
                "jpg": jpg,
                "hash": int(rng.integers(-(2**62), 2**62)),
                "aesthetic_score": float(rng.uniform(4, 7)),
            }
            rows.append(row)
            w.write(row)
    return rows


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float):  # NaN included
        return np.float64(a).tobytes() == np.float64(b).tobytes()
    return type(a)(b) == a


def test_mosaic_laion_input_and_copy_columns_for_its_reader(tmp_path):
    images = str(tmp_path / "laion" / "256-512" / "1")
    written = write_mosaic_images(images, 6)
    out = str(tmp_path / "latents")
    proc = em.run_encode(images, out, "--copy-columns", "--num-workers", "0", text="t5-1024", resolutions=None)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(open(os.path.join(out, "latents.json")).read())
    assert {k: meta["columns"][k] for k in MOSAIC_COLUMNS} == MOSAIC_COLUMNS  # encodings unchanged
    assert meta["settings"]["copy_columns"] is True

    rows = em.read_rows(out)  # every input column copied, byte for byte (NaN and the PNG included)
    by_key = {r["key"]: r for r in written}
    assert sorted(r["key"] for r in rows) == sorted(by_key)
    for row in rows:
        for col in MOSAIC_COLUMNS:
            assert _same(by_key[row["key"]][col], row[col]), col

    tokenizer_repo = em.sd_repo()  # an SD-style repo with tokenizer/, as stabilityai/stable-diffusion-2-base
    ours = {size: drain(build_streaming_latents_dataloader(out, 3, size, shuffle=False, drop_last=False)) for size in (256, 512)}
    for size, side in ((256, 32), (512, 64)):
        dataset = MosaicStreamingLAIONDataset(
            streams=[Stream(local=out)], tokenizer_name_or_path=tokenizer_repo, batch_size=3, image_size=size
        )
        samples = [dataset[i] for i in range(dataset.num_samples)]
        assert len(samples) == 6
        for i, s in enumerate(samples):
            assert s["caption_latents"].shape == (77, 1024) and s["image_latents"].shape == (4, side, side)
            assert torch.equal(s["caption_latents"], ours[size]["caption_latents"][i, 0])
            assert torch.equal(s["image_latents"], ours[size]["image_latents"][i])
            expected_ids = dataset.tokenizer(ours[size]["caption"][i], padding="max_length", max_length=77, truncation=True)[
                "input_ids"
            ]
            assert s["captions"].tolist() == expected_ids
            row = next(r for r in written if r["caption"] == ours[size]["caption"][i])
            assert s["image"].size == (row["width"], row["height"]) and s["image"].mode == "RGB"
        del dataset


def test_rows_without_a_key_column_get_their_global_index(tmp_path):
    """An input without `key` (or with an empty one): `#<row index in the merged index>`, the
    same whatever the shard layout; `jpg` as MDS bytes is decoded like jpeg."""
    from streaming.base.util import merge_index

    root = str(tmp_path / "mds")
    rng = np.random.default_rng(0)
    captions, indexes = [], []
    for unit in range(2):
        with MDSWriter(
            out=os.path.join(root, f"{unit:05d}"), columns={"jpg": "bytes", "caption": "str", "url": "str"}, size_limit=1 << 14
        ) as w:  # several shards per unit
            for i in range(5):
                captions.append(f"caption {unit}-{i}")
                w.write({"jpg": em.jpeg(rng, 300, 260), "caption": captions[-1], "url": "https://example.com/same.jpg"})
        indexes.append(os.path.join(root, f"{unit:05d}", "index.json"))
    merge_index(indexes, root)

    def tokenize(caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(77, dtype=torch.long), torch.ones(77, dtype=torch.long)

    source = data.open_source(root)
    rows = data.ImageRows(source, range(3, 10), [64], tokenize, None, 0, copy=["jpg", "url"])
    items = [rows[i] for i in range(len(rows))]
    assert [it["key"] for it in items] == [f"#{i}" for i in range(3, 10)]
    assert [it["caption"] for it in items] == captions[3:10]
    assert all(it["images"][64].shape == (3, 64, 64) for it in items)
    assert all(it["copied"]["url"] == b"https://example.com/same.jpg" for it in items)
    column = data.Column("str", b"")
    assert data.row_key({"key": column}, 12) == "#12" and data.row_key({"key": data.Column("str", b"k")}, 12) == "k"


def test_input_columns_and_what_is_copied():
    shard = {
        "format": "mds",
        "column_names": list(MOSAIC_COLUMNS) + ["caption_latents", "latents_256", "latents_1024"],
        "column_encodings": list(MOSAIC_COLUMNS.values()) + ["bytes"] * 3,
    }
    inputs = data.input_columns([shard, shard], uniform=True)
    copied = writer.copied_columns(inputs, [256, 512], copy_all=True, keep_images=False)
    assert set(copied) == set(MOSAIC_COLUMNS) - {"key", "caption"}  # ours replace those; no other model's latents
    assert copied["jpg"] == "bytes" and copied["punsafe"] == "float64"
    assert writer.copied_columns(inputs, [256], copy_all=False, keep_images=True) == {"jpg": "bytes"}
    assert writer.copied_columns(inputs, [256], copy_all=False, keep_images=False) == {}
    with pytest.raises(ValueError, match="'caption' column is missing"):
        data.input_columns([{"column_names": ["jpg"], "column_encodings": ["jpeg"]}], uniform=False)
    with pytest.raises(ValueError, match="'jpg' column is 'str'"):
        data.input_columns([{"column_names": ["jpg", "caption"], "column_encodings": ["str", "str"]}], uniform=False)
    other = dict(shard, column_names=shard["column_names"][:-1], column_encodings=shard["column_encodings"][:-1])
    with pytest.raises(ValueError, match="different columns"):
        data.input_columns([shard, other], uniform=True)
    assert data.input_columns([shard, other], uniform=False) == inputs


def test_an_input_without_captions_is_refused_before_models_load(tmp_path):
    images = str(tmp_path / "mds")
    with MDSWriter(out=images, columns={"jpg": "bytes", "key": "str"}) as w:
        w.write({"jpg": em.jpeg(np.random.default_rng(0), 300, 300), "key": "a"})
    proc = em.run_encode(images, str(tmp_path / "latents"))
    assert proc.returncode == 2 and "'caption' column is missing" in proc.stderr, proc.stderr


def test_a_remote_seed_folder_is_read_too(tmp_path, s3, monkeypatch):
    """No latents.json on S3 (a 404, not an error): the first row is fetched into the cache."""
    from tests.test_encode_remote import _upload

    for name, value in s3.items():
        monkeypatch.setenv(name, value)
    folder = str(tmp_path / "seed")
    written = write_seed_latents(folder, 5, shapes={"latents_256": (4, 32, 32)})
    _upload(folder, s3, "data", "seed/latents")
    got = drain(
        build_streaming_latents_dataloader(
            "s3://data/seed/latents", 2, 256, shuffle=False, drop_last=False, cache_dir=str(tmp_path / "cache")
        )
    )
    assert torch.equal(got["image_latents"], torch.from_numpy(np.stack([r["latents_256"] for r in written])))
    assert got["caption_latents"].shape == (5, 1, 77, 1024)


# --------------------------------------------------------------------------- the seed's CC12M caption cleaning

DIRTY = ["<b>A Photo</b> of a cat &amp; dog http://127.0.0.1:9/x.jpg", "@someone Check   THIS out!!! #12345", "a plain caption"]


def _dirty_mds(root: str, dataset: str | None) -> str:
    """An image MDS under `root/mds` with captions the cleaner changes, and the stats.json bin/fetch
    writes beside it naming `dataset` (none when `dataset` is None: another tool's MDS)."""
    rng = np.random.default_rng(3)
    mds = os.path.join(root, "mds")
    with MDSWriter(out=mds, columns=em.IMAGE_COLUMNS, hashes=["xxh64"]) as w:
        for i, text in enumerate(DIRTY):
            w.write(
                {
                    "jpg": em.jpeg(rng, 300, 256),
                    "caption": text,
                    "width": 300,
                    "height": 256,
                    "original_width": 300,
                    "original_height": 256,
                    "key": f"k{i}",
                }
            )
    if dataset is not None:
        with open(os.path.join(root, "stats.json"), "w") as f:
            json.dump({"settings": {"dataset": dataset}}, f)
    return mds


def test_cc12m_captions_are_cleaned_as_the_seed_does(tmp_path):
    from fastfetch.captions import clean_caption

    cleaned = {f"k{i}": clean_caption(t) for i, t in enumerate(DIRTY)}
    raw = {f"k{i}": t for i, t in enumerate(DIRTY)}
    assert cleaned != raw
    cases = [
        ("cc12m", (), cleaned),
        ("laion", (), raw),
        (None, (), raw),  # auto: cc12m only
        ("laion", ("--clean-captions", "on"), cleaned),
        ("cc12m", ("--clean-captions", "off"), raw),
    ]
    embeddings: dict[str, dict[str, bytes]] = {}
    for n, (dataset, flags, expected) in enumerate(cases):
        out = str(tmp_path / f"latents{n}")
        proc = em.run_encode(_dirty_mds(str(tmp_path / f"images{n}"), dataset), out, *flags, resolutions=(64,))
        assert proc.returncode == 0, proc.stderr
        rows = {r["key"]: r for r in em.read_rows(out)}
        assert {k: r["caption"] for k, r in rows.items()} == expected, (dataset, flags)
        meta = json.loads(open(os.path.join(out, "latents.json")).read())
        assert meta["settings"]["clean"] is (expected is cleaned)
        embeddings[f"{expected is cleaned}"] = {k: r["caption_latents"] for k, r in rows.items()}
    # what is embedded is the cleaned text: its embedding differs where the text does
    assert embeddings["True"]["k0"] != embeddings["False"]["k0"]
    assert embeddings["True"]["k2"] == embeddings["False"]["k2"]  # "a plain caption" is left as it is


def test_the_fetch_dataset_is_found_from_the_mds_root_or_a_part_of_it(tmp_path):
    """`--clean-captions auto` reads OUT/stats.json for OUT/mds and for a bucket folder in it
    (what a mosaic user encodes), nothing for a folder outside an `mds` root."""
    from encode.paths import fetched_dataset

    (tmp_path / "mds" / "256-512" / "node-00-of-02").mkdir(parents=True)
    (tmp_path / "stats.json").write_text(json.dumps({"settings": {"dataset": "cc12m"}}))
    for folder in ("mds", "mds/", "mds/256-512", "mds/256-512/node-00-of-02"):
        assert fetched_dataset(str(tmp_path / folder)) == "cc12m", folder
    (tmp_path / "other").mkdir()
    assert fetched_dataset(str(tmp_path / "other")) is None
    for bad in ("[]", "not json", json.dumps({"settings": None}), json.dumps({"settings": {"dataset": 3}})):
        (tmp_path / "stats.json").write_text(bad)
        assert fetched_dataset(str(tmp_path / "mds")) is None, bad


def test_a_compressed_folder_without_latents_json_reads_with_every_shape_given(tmp_path):
    out = str(tmp_path / "zstd")
    rng = np.random.default_rng(1)
    rows = [
        {
            "caption": f"c{i}",
            "caption_latents": rng.standard_normal((1, 77, 16)).astype(np.float16),
            "latents_256": rng.standard_normal((4, 32, 32)).astype(np.float16),
        }
        for i in range(4)
    ]
    with MDSWriter(
        out=out, columns={"caption": "str", "caption_latents": "bytes", "latents_256": "bytes"}, compression="zstd"
    ) as w:
        for r in rows:
            w.write({k: v.tobytes() if isinstance(v, np.ndarray) else v for k, v in r.items()})
    with pytest.raises(ValueError, match="cap_seq_size, cap_emb_dim and latent_channels"):
        build_streaming_latents_dataloader(out, 2, 256)
    got = drain(build_streaming_latents_dataloader(out, 2, 256, 77, 16, shuffle=False, latent_channels=4))
    assert torch.equal(got["image_latents"], torch.from_numpy(np.stack([r["latents_256"] for r in rows])))
    assert torch.equal(got["caption_latents"], torch.from_numpy(np.stack([r["caption_latents"] for r in rows])))
