"""Curation while downloading: shape filters on the listed sizes (before any request) and on the
real ones (--max-aspect-ratio, --listed-size), and content hashes of the downloaded bytes (--hashes)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.conftest import LoopbackServer, make_image, read_mds, run_fetch
from tests.test_fetch_urls import stats_of, write_list

NET = ("--allow-private-networks", "--workers", "1")


def _shapes(server: LoopbackServer) -> list[dict]:
    """(real size, listed size): a square; a panorama listed as one; a small image listed as
    one; a panorama listed as a square (the list lies: only its pixels tell); no listed size."""
    shapes = [
        ((300, 300), (300, 300)),
        ((900, 300), (900, 300)),
        ((200, 200), (200, 200)),
        ((700, 300), (300, 300)),
        ((300, 320), None),
    ]
    rows = []
    for i, (real, listed) in enumerate(shapes):
        server.routes[f"/s/{i}.jpg"] = make_image(*real, seed=i)
        row = {"url": server.url(f"/s/{i}.jpg"), "caption": f"c{i}"}
        if listed is not None:
            row |= {"width": listed[0], "height": listed[1]}
        rows.append(row)
    return rows


def test_aspect_ratio_and_listed_sizes(tmp_path: Path, server: LoopbackServer) -> None:
    listing = write_list(tmp_path / "l.jsonl", _shapes(server))
    base = ("--dataset", "urls", "--urls", listing, *NET)

    proc = run_fetch(*base, "--out", tmp_path / "real", "--max-aspect-ratio", "2")  # no listed sizes: the pixels decide
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["caption"] for r in read_mds(tmp_path / "real" / "mds")) == ["c0", "c4"]
    assert stats_of(tmp_path / "real")["rejected"] == {"aspect_ratio": 2, "too_small": 1}
    assert all(server.hits[f"/s/{i}.jpg"] == 1 for i in range(5))

    server.hits.clear()
    listed = ("--listed-size", "width,height", "--max-aspect-ratio", "2")
    proc = run_fetch(*base, "--out", tmp_path / "listed", *listed)
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["caption"] for r in read_mds(tmp_path / "listed" / "mds")) == ["c0", "c4"]
    assert stats_of(tmp_path / "listed")["rejected"] == {"aspect_ratio": 2, "listed_too_small": 1}
    assert [server.hits[f"/s/{i}.jpg"] for i in range(5)] == [1, 0, 0, 1, 1]  # the listed panorama and small one: never requested

    proc = run_fetch(*base, "--out", tmp_path / "listed", "--max-aspect-ratio", "3", "--listed-size", "width,height")
    assert proc.returncode == 2 and "max_aspect_ratio: 2.0 → 3.0" in proc.stderr, proc.stderr  # a setting that changes units
    proc = run_fetch(*base, "--out", tmp_path / "bad", "--max-aspect-ratio", "0.5")
    assert proc.returncode == 2 and "1 or more" in proc.stderr
    proc = run_fetch(*base, "--out", tmp_path / "bad", "--listed-size", "width")
    assert proc.returncode == 2 and "--listed-size" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_fetch(*base, "--out", tmp_path / "bad", "--max-aspect-ratio", "inf")
    assert proc.returncode == 2 and "1 or more" in proc.stderr


def test_listed_sizes_that_are_no_sizes(tmp_path: Path, server: LoopbackServer) -> None:
    """A csv's "NA", " 300 ", 0 or -1 as a listed size: unknown (judged on the pixels), never a
    plan that stops; a --listed-size column the list does not have is refused."""
    rows = _shapes(server)[:2]  # a square, and a panorama
    listing = tmp_path / "l.csv"
    listing.write_text(f"url,caption,w,h\n{rows[0]['url']},c0, 300 ,NA\n{rows[1]['url']},c1,0,-1\n")
    out = tmp_path / "o"
    proc = run_fetch(
        "--dataset", "urls", "--urls", listing, "--out", out, "--listed-size", "w,h", "--max-aspect-ratio", "2", *NET
    )
    assert proc.returncode == 0, proc.stderr
    assert stats_of(out)["rejected"] == {"aspect_ratio": 1} and server.hits["/s/1.jpg"] == 1  # the pixels told
    proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", tmp_path / "o2", "--listed-size", "width,height", *NET)
    assert proc.returncode == 2 and "'width' (from --listed-size)" in proc.stderr, proc.stderr


def test_content_hashes_of_the_original_bytes(tmp_path: Path, server: LoopbackServer) -> None:
    served = {f"/h/{i}.jpg": make_image(*((700, 600) if i % 2 else (300, 300)), seed=i) for i in range(4)}  # two resized
    server.routes.update(served)
    listing = write_list(tmp_path / "l.jsonl", [{"url": server.url(p), "caption": p} for p in served])
    for workers in ("1", "0"):  # in a resize worker, or inline
        out = tmp_path / f"w{workers}"
        args = ("--urls", listing, "--out", out, "--workers", workers, "--hashes", "md5,sha256")  # stored in one order
        proc = run_fetch("--dataset", "urls", "--allow-private-networks", *args)
        assert proc.returncode == 0, proc.stderr
        rows = read_mds(out / "mds")
        assert len(rows) == 4 and {min(r["width"], r["height"]) for r in rows} == {300, 512}
        for r in rows:  # of the bytes downloaded, also where the stored JPEG is a resized one
            assert r["sha256"] == hashlib.sha256(served[r["caption"]]).hexdigest()
            assert r["md5"] == hashlib.md5(served[r["caption"]]).hexdigest()
    assert "sha256" not in read_mds_columns(tmp_path / "plain", listing)  # off by default
    proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", tmp_path / "x", "--hashes", "sha1")
    assert proc.returncode == 2 and "sha256, md5" in proc.stderr


def read_mds_columns(out: Path, listing: Path) -> set[str]:
    assert run_fetch("--dataset", "urls", "--urls", listing, "--out", out, *NET).returncode == 0
    return set(read_mds(out / "mds")[0])
