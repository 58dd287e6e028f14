"""CC12M (pixparse/cc12m-wds tars) through the fake hub: captions, filters, selection, resume."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
from conftest import fetch_env, make_image, read_mds, run_fetch
from fakehub import DiskWatcher, FakeHub, make_tar

REPO = "pixparse/cc12m-wds"


def shard(n: int) -> tuple[bytes, dict[str, str]]:
    """A webdataset tar: 5 captioned images, one too small, one without .txt, one .txt alone."""
    members: list[tuple[str, bytes]] = []
    captions: dict[str, str] = {}
    for i in range(8):
        key = f"{n:04d}{i:05d}"
        small = i == 5
        if i == 4:  # a big member between samples that no recipe reads: skipped in the stream
            members.append(("0000padding.bin", random.Random(n).randbytes(1 << 20)))
        data = make_image(120 if small else 300, 100 if small else 280, seed=n * 100 + i)
        if i < 7:
            members.append((f"{key}.jpg", data))
        members.append((f"{key}.json", orjson.dumps({"url": f"http://example.com/{key}.jpg", "key": key})))
        if i != 6:
            caption = f"photo {n}-{i} of a thing"
            members.append((f"{key}.txt", caption.encode()))
            if i < 5:
                captions[key] = caption
    return make_tar(members), captions


def setup_hub(server, units: int = 3, cut: int | None = None) -> tuple[FakeHub, dict[str, str], list[bytes]]:
    hub = FakeHub(server)
    captions: dict[str, str] = {}
    tars = []
    for n in range(units):
        data, caps = shard(n)
        tars.append(data)
        hub.add(REPO, f"cc12m-train-{n:04d}.tar", data, cut_at=cut if n == 0 else None)
        captions.update({k: v for k, v in caps.items()})
    hub.add(REPO, "_info.json", b"{}")
    return hub, captions, tars


def test_cc12m_selection_and_captions(server, tmp_path: Path) -> None:
    hub, captions, _ = setup_hub(server)
    env = fetch_env(HF_ENDPOINT=hub.endpoint)
    out = tmp_path / "cc12m"
    proc = run_fetch("--allow-private-networks", "--dataset", "cc12m", "--out", out, "--subset", "small", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = read_mds(out / "mds")
    assert {r["key"]: r["caption"] for r in rows} == {k: v for k, v in captions.items() if k.startswith("0000")}
    assert all(r["url"] == f"http://example.com/{r['key']}.jpg" for r in rows)
    stats = orjson.loads((out / "stats.json").read_bytes())
    assert stats["rejected"] == {"no_caption": 1, "too_small": 1} and stats["kept"] == len(rows), stats

    # a larger selection into the same --out fetches only the new units
    proc = run_fetch("--allow-private-networks", "--dataset", "cc12m", "--out", out, "--ids", "0", "2", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = read_mds(out / "mds")
    assert {r["key"]: r["caption"] for r in rows} == {k: v for k, v in captions.items() if k[:4] in ("0000", "0002")}
    tar0 = hub.resolve_path(REPO, "cc12m-train-0000.tar")
    assert hub.files[REPO]["cc12m-train-0000.tar"].gets == 1, "unit 0 was fetched again"
    assert server.hits[hub.resolve_path(REPO, "cc12m-train-0001.tar")] == 0
    assert tar0 in server.hits
    assert not list((out / "_work").rglob("*.tar*")), "an archive was left on disk"


def test_cc12m_resumes_a_broken_archive_with_range(server, tmp_path: Path) -> None:
    hub, captions, tars = setup_hub(server, units=1, cut=len(shard(0)[0]) // 2)
    env = fetch_env(HF_ENDPOINT=hub.endpoint)
    out = tmp_path / "cut"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with DiskWatcher(out, tmp) as disk:
        proc = run_fetch(
            "--allow-private-networks",
            "--dataset",
            "cc12m",
            "--out",
            out,
            env=fetch_env(HF_ENDPOINT=hub.endpoint, TMPDIR=str(tmp)),
        )
    assert proc.returncode == 0, proc.stderr
    assert disk.largest < len(tars[0]) // 4 and not disk.spooled, ("a streamed tar must not touch the disk", disk.largest_name)
    path = hub.resolve_path(REPO, "cc12m-train-0000.tar")
    ranges = [h.get("Range") for p, h in server.requests if p == path]
    cut = len(tars[0]) // 2
    assert f"bytes={cut}-" in ranges, ranges
    assert [h.get("If-Range") for p, h in server.requests if p == path and h.get("Range")] == [
        hub.files[REPO]["cc12m-train-0000.tar"].etag
    ]
    rows = read_mds(out / "mds")
    assert {r["key"]: r["caption"] for r in rows} == captions

    assert not list(out.rglob("*.tar")), "nothing kept without --keep-archives"

    # identical to an unbroken run
    hub.files[REPO]["cc12m-train-0000.tar"].cut_at = None
    again = tmp_path / "whole"
    proc = run_fetch("--allow-private-networks", "--dataset", "cc12m", "--out", again, "--keep-archives", env=env)
    assert proc.returncode == 0, proc.stderr
    assert (again / "_archives" / "cc12m" / "cc12m-train-0000.tar").read_bytes() == tars[0]  # opted in: kept
    whole = read_mds(again / "mds")
    assert sorted((r["key"], r["caption"], r["width"], r["height"]) for r in rows) == sorted(
        (r["key"], r["caption"], r["width"], r["height"]) for r in whole
    )
