"""TextCaps (lmms-lab/TextCaps parquet files with embedded images) through the fake hub."""

from __future__ import annotations

from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import fetch_env, make_image, read_mds, run_fetch
from fakehub import FakeHub

REPO = "lmms-lab/TextCaps"


def parquet(split: str, n: int) -> tuple[bytes, dict[str, list[str]]]:
    """3 captioned images, 1 too small, 1 without references, 1 repeated row."""
    rows, kept = [], {}
    for i in range(5):
        image_id = f"{split}{n}{i:03d}abc"
        small = i == 3
        refs = [] if i == 4 else [f"a sign that reads {split} {n} {i} number {j}" for j in range(5)]
        data = make_image(150 if small else 300, 120 if small else 280, seed=n * 10 + i)
        rows.append(
            {
                "image": {"bytes": data, "path": f"{image_id}.jpg"},
                "image_id": image_id,
                "image_width": 300,
                "image_height": 280,
                "reference_strs": refs,
                "caption_str": refs[0] if refs else None,
            }
        )
        if i < 3:
            kept[image_id] = refs
    rows.append(dict(rows[0]))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink, row_group_size=4)
    return sink.getvalue().to_pybytes(), kept


def test_textcaps_first_reference_all_kept(server, tmp_path: Path) -> None:
    hub = FakeHub(server)
    kept: dict[str, dict[str, list[str]]] = {"train": {}, "val": {}}
    for split, count in (("train", 2), ("val", 1)):
        for n in range(count):
            data, k = parquet(split, n)
            kept[split].update(k)
            hub.add(REPO, f"data/{split}-{n:05d}-of-{count:05d}.parquet", data)
    env = fetch_env(HF_ENDPOINT=hub.endpoint)
    out = tmp_path / "textcaps"
    proc = run_fetch("--allow-private-networks", "--dataset", "textcaps", "--out", out, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = read_mds(out / "mds")
    both = {**kept["train"], **kept["val"]}  # by default train + val, as the seed's train+validation
    assert {r["key"]: r["caption"] for r in rows} == {k: v[0] for k, v in both.items()}
    assert {r["key"]: r["captions"] for r in rows} == both
    stats = orjson.loads((out / "stats.json").read_bytes())
    assert stats["rejected"] == {"no_caption": 3, "too_small": 3, "duplicate": 3} and stats["kept"] == len(rows), stats
    assert stats["settings"]["split"] == "train+val"
    assert not list((out / "_work").rglob("*.parquet")), "a spooled parquet was left behind"

    proc = run_fetch(
        "--allow-private-networks", "--dataset", "textcaps", "--split", "val", "--out", tmp_path / "val", "--ids", "0", env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert {r["key"]: r["caption"] for r in read_mds(tmp_path / "val" / "mds")} == {k: v[0] for k, v in kept["val"].items()}
    # --ids picks that number in every split chosen; an unknown split is a usage error
    proc = run_fetch(
        "--allow-private-networks",
        "--dataset",
        "textcaps",
        "--split",
        "train,val",
        "--out",
        tmp_path / "ids",
        "--ids",
        "0",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    first = {k: v[0] for k, v in {**kept["train"], **kept["val"]}.items() if k.startswith(("train0", "val0"))}
    assert {r["key"]: r["caption"] for r in read_mds(tmp_path / "ids" / "mds")} == first
    proc = run_fetch("--dataset", "textcaps", "--split", "train", "valid", "--out", tmp_path / "bad", env=env)
    assert proc.returncode == 2 and "--split valid" in proc.stderr and "train, val, test" in proc.stderr, proc.stderr
