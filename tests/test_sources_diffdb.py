"""DiffusionDB through the fake hub: zips by ranged reads (or spooled), prompts, nsfw filter, disk."""

from __future__ import annotations

from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import fetch_env, make_image, read_mds, run_fetch
from fakehub import DiskWatcher, FakeHub, make_zip

REPO = "poloclub/diffusiondb"


def part_zip(part: int, meta: list[dict]) -> tuple[bytes, dict[str, str]]:
    """7 webp images the metadata lists: 3 kept, 1 too small, 1 with an empty prompt, 1 nsfw image,
    1 nsfw prompt; a listed bomb; and a good image the metadata does not list (the seed skips it)."""
    members: list[tuple[str, bytes]] = []
    prompts: dict[str, dict] = {}
    kept: dict[str, str] = {}
    for i in range(7):
        name = f"{part:06d}-{i:02d}-aaaa-bbbb.webp"
        small = i == 3
        members.append(
            (name, make_image(120 if small else 300, 100 if small else 270, fmt="WEBP", seed=part * 10 + i, lossless=True))
        )
        prompt = "" if i == 4 else f"a render of thing {part}.{i}, trending on artstation"
        prompts[name] = {"p": f"the part's own json, not the caption {i}", "se": i, "c": 7.0, "st": 50, "sa": 8}
        image_nsfw, prompt_nsfw = (0.9 if i == 5 else 0.1), (0.5 if i == 6 else 0.05)
        meta.append({"image_name": name, "prompt": prompt, "part_id": part, "image_nsfw": image_nsfw, "prompt_nsfw": prompt_nsfw})
        if i < 3:
            kept[name.rsplit(".", 1)[0]] = prompt
    members.append((f"part-{part:06d}.json", orjson.dumps(prompts)))
    members.append(("bomb.webp", b"\0" * (4 << 20)))
    meta.append({"image_name": "bomb.webp", "prompt": "a bomb", "part_id": part, "image_nsfw": 0.0, "prompt_nsfw": 0.0})
    members.append((f"{part:06d}-99-unlisted.webp", make_image(300, 300, fmt="WEBP", seed=part, lossless=True)))
    return make_zip(members), kept


def setup(server) -> tuple[FakeHub, dict[str, str], dict[int, bytes]]:
    hub = FakeHub(server)
    meta: list[dict] = []
    kept: dict[str, str] = {}
    zips: dict[int, bytes] = {}
    for part in (1, 2, 10001):
        data, k = part_zip(part, meta)
        kept.update(k)
        zips[part] = data
        folder = "diffusiondb-large-part-1" if part <= 10000 else "diffusiondb-large-part-2"
        hub.add(REPO, f"{folder}/part-{part:06d}.zip", data, ranges=part != 2, throttle=0.05 if part == 2 else 0.0)
    table = pa.Table.from_pylist(meta)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    hub.add(REPO, "metadata-large.parquet", sink.getvalue().to_pybytes())
    return hub, kept, zips


def test_diffdb_ranged_zips_nsfw_selection(server, tmp_path: Path) -> None:
    hub, kept, zips = setup(server)
    env = fetch_env(HF_ENDPOINT=hub.endpoint)
    out = tmp_path / "diffdb"
    proc = run_fetch(
        "--allow-private-networks", "--dataset", "diffdb", "--out", out, "--subset", "small", "--max-nsfw", "0.2", env=env
    )
    assert proc.returncode == 0, proc.stderr
    rows = read_mds(out / "mds")
    assert {r["key"]: r["caption"] for r in rows} == {k: v for k, v in kept.items() if k.startswith("000001")}
    assert all(0 <= r["image_nsfw"] <= 0.2 and 0 <= r["prompt_nsfw"] <= 0.2 for r in rows)
    stats = orjson.loads((out / "stats.json").read_bytes())
    assert stats["rejected"] == {"nsfw": 2, "no_caption": 1, "too_small": 1, "zip_bomb": 1, "unlisted": 1} and stats[
        "kept"
    ] == len(rows), stats

    proc = run_fetch("--allow-private-networks", "--dataset", "diffdb", "--out", out, "--ids", "1", "10001", env=env)
    assert proc.returncode == 0, proc.stderr
    stats = orjson.loads((out / "stats.json").read_bytes())
    assert stats["settings"]["max_nsfw"] == 0.2  # the seed's threshold, by default
    assert stats["rejected"] == {"nsfw": 4, "no_caption": 2, "too_small": 2, "zip_bomb": 2, "unlisted": 2}, stats
    rows = read_mds(out / "mds")
    assert {r["key"]: r["caption"] for r in rows} == {k: v for k, v in kept.items() if not k.startswith("000002")}
    # ranged reads only: a handful of requests per zip, each asking for a range
    path = hub.resolve_path(REPO, "diffusiondb-large-part-2/part-010001.zip")
    ranges = [h.get("Range") for p, h in server.requests if p == path]
    assert ranges and all(r for r in ranges) and len(ranges) <= 6, ranges
    assert server.hits[hub.resolve_path(REPO, "metadata-large.parquet")] == 1
    assert not (out / "_work" / "diffdb" / "metadata-large.parquet").exists()

    # a changed flag into the same --out is refused
    proc = run_fetch("--allow-private-networks", "--dataset", "diffdb", "--out", out, "--ids", "1", "--max-nsfw", "none", env=env)
    assert proc.returncode == 2 and "max_nsfw" in proc.stderr

    # --max-nsfw none keeps the nsfw images, never what the metadata does not list
    proc = run_fetch(
        "--allow-private-networks", "--dataset", "diffdb", "--out", tmp_path / "all", "--ids", "1", "--max-nsfw", "none", env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["key"].split("-")[1] for r in read_mds(tmp_path / "all" / "mds")) == ["00", "01", "02", "05", "06"]
    stats = orjson.loads((tmp_path / "all" / "stats.json").read_bytes())
    assert stats["rejected"] == {"no_caption": 1, "too_small": 1, "zip_bomb": 1, "unlisted": 1}, stats
    for bad in ("1.5", "high"):
        proc = run_fetch("--dataset", "diffdb", "--out", tmp_path / "bad", "--max-nsfw", bad, env=env)
        assert proc.returncode == 2 and "--max-nsfw" in proc.stderr, proc.stderr


def test_diffdb_spools_without_ranges_and_cleans_up(server, tmp_path: Path) -> None:
    hub, kept, zips = setup(server)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = fetch_env(HF_ENDPOINT=hub.endpoint, TMPDIR=str(tmp))
    out = tmp_path / "spooled"
    stale = out / "_work" / "diffdb" / "spool" / "tmp_killed_run" / "part-000009.zip"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a SIGKILLed run")
    with DiskWatcher(out, tmp) as disk:
        proc = run_fetch(
            "--allow-private-networks", "--dataset", "diffdb", "--out", out, "--ids", "2", "--max-nsfw", "0.2", env=env
        )
    assert proc.returncode == 0, proc.stderr
    assert {r["key"]: r["caption"] for r in read_mds(out / "mds")} == {k: v for k, v in kept.items() if k.startswith("000002")}
    assert disk.largest <= len(zips[2]), (disk.largest, disk.largest_name)
    assert disk.spooled & {"part-000002.zip", "part-000002.zip.part"}, disk.spooled  # its server ignores Range
    assert not stale.exists()
    leftovers = [p for p in list(out.rglob("*")) + list(tmp.rglob("*")) if p.is_file() and p.suffix in (".zip", ".part")]
    assert not leftovers, leftovers
    assert not any((out / "_work" / "diffdb" / "spool").iterdir())
