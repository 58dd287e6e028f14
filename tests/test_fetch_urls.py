"""bin/fetch over URL lists, end to end against a loopback server."""

from __future__ import annotations

import asyncio
import gzip
import io
import sqlite3
import time
import zlib
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from PIL import Image

from tests.conftest import LoopbackServer, jpeg_bytes, make_image, read_mds, run_fetch, serve_numbered, start_fetch

NET = ("--allow-private-networks", "--workers", "2")


def stats_of(out: Path) -> dict:
    return orjson.loads((out / "stats.json").read_bytes())


def write_list(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format the file name says (.parquet/.csv/.tsv/.jsonl/.json/.txt[.gz])."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    if name.endswith(".jsonl"):
        data = b"\n".join(orjson.dumps(r) for r in rows) + b"\n"
    elif name.endswith(".json"):
        data = orjson.dumps(rows)
    elif name.endswith(".txt"):
        data = "\n".join(r["url"] for r in rows).encode() + b"\n"
    else:
        sep = "\t" if name.endswith(".tsv") else ","
        cols = list(rows[0])
        lines = [sep.join(cols)] + [sep.join(f'"{r[c]}"' if sep == "," else str(r[c]) for c in cols) for r in rows]
        data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@pytest.fixture
def corpus(server: LoopbackServer) -> dict[str, tuple[str, bool]]:
    """Mixed images on the server: url → (caption, should be kept)."""
    specs = [
        (640, 480, "JPEG", "RGB", {}),
        (300, 300, "JPEG", "RGB", {}),
        (2000, 1200, "JPEG", "RGB", {}),
        (512, 900, "JPEG", "RGB", {"progressive": True}),
        (1000, 700, "JPEG", "CMYK", {}),
        (700, 300, "JPEG", "L", {}),
        (800, 800, "PNG", "RGBA", {}),
        (600, 400, "PNG", "P", {}),
        (900, 500, "WEBP", "RGB", {}),
        (256, 256, "JPEG", "RGB", {}),
        (255, 900, "JPEG", "RGB", {}),
        (100, 80, "PNG", "RGB", {}),
        (1200, 200, "WEBP", "RGB", {}),
    ]
    expected: dict[str, tuple[str, bool]] = {}
    for i, (w, h, fmt, mode, kw) in enumerate(specs):
        path = f"/img/{i}.{fmt.lower()}"
        server.routes[path] = make_image(w, h, fmt, mode, seed=i, **kw)
        expected[server.url(path)] = (f"picture number {i}, {w}x{h} {fmt}", min(w, h) >= 256)
    return expected


def check_dataset(out: Path, expected: dict[str, tuple[str, bool]]) -> list[dict]:
    rows = read_mds(out / "mds")
    kept_urls = {u for u, (_, keep) in expected.items() if keep}
    assert sorted(r["url"] for r in rows) == sorted(kept_urls)
    assert len({r["key"] for r in rows}) == len(rows)
    for r in rows:
        im = Image.open(io.BytesIO(jpeg_bytes(r["jpg"])))
        im.load()
        assert im.format == "JPEG" and im.mode == "RGB"
        assert im.size == (r["width"], r["height"])
        short = min(im.size)
        assert 256 <= short <= 512
        assert short == min(512, min(r["original_width"], r["original_height"]))
        assert r["caption"] == expected[r["url"]][0]
    return rows


def test_happy_path_parquet(tmp_path: Path, server: LoopbackServer, corpus: dict) -> None:
    urls = write_list(tmp_path / "list.parquet", [{"url": u, "caption": c} for u, (c, _) in corpus.items()])
    out = tmp_path / "out"
    proc = run_fetch("--dataset", "urls", "--urls", urls, "--out", out, *NET)
    assert proc.returncode == 0, proc.stderr
    check_dataset(out, corpus)
    stats = stats_of(out)
    assert stats["kept"] == sum(k for _, k in corpus.values()) == 10
    assert stats["rejected"] == {"too_small": 3}
    assert "kept" in proc.stderr and "too_small" in proc.stderr  # the summary table


def test_original_jpeg_bytes_are_kept_when_no_resize_is_needed(tmp_path: Path, server: LoopbackServer, corpus: dict) -> None:
    urls = write_list(tmp_path / "list.jsonl", [{"url": u, "caption": c} for u, (c, _) in corpus.items()])
    out = tmp_path / "out"
    assert run_fetch("--dataset", "urls", "--urls", urls, "--out", out, *NET).returncode == 0
    rows = {r["url"]: r for r in read_mds(out / "mds")}
    small = server.url("/img/0.jpeg")
    assert jpeg_bytes(rows[small]["jpg"]) == server.routes["/img/0.jpeg"]


@pytest.mark.parametrize("name", ["list.csv", "list.tsv.gz", "list.json", "list.jsonl.gz", "list.txt", "list.parquet"])
def test_every_list_format(tmp_path: Path, server: LoopbackServer, corpus: dict, name: str) -> None:
    listing = write_list(tmp_path / name, [{"url": u, "caption": c} for u, (c, _) in corpus.items()])
    out = tmp_path / "out"
    proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", out, *NET)
    assert proc.returncode == 0, proc.stderr
    rows = read_mds(out / "mds")
    assert len(rows) == 10
    if not name.startswith("list.txt"):
        assert {r["caption"] for r in rows} == {c for c, k in corpus.values() if k}


def test_folder_of_lists_and_keep_cols(tmp_path: Path, server: LoopbackServer, corpus: dict) -> None:
    folder = tmp_path / "lists"
    folder.mkdir()
    items = list(corpus.items())
    write_list(folder / "a.parquet", [{"url": u, "caption": c, "score": 0.5, "tag": "a"} for u, (c, _) in items[:6]])
    write_list(folder / "b.parquet", [{"url": u, "caption": c, "score": 1.5, "tag": "b"} for u, (c, _) in items[6:]])
    out = tmp_path / "out"
    proc = run_fetch("--dataset", "urls", "--urls", folder, "--keep-cols", "score,tag", "--unit-size", "4", "--out", out, *NET)
    assert proc.returncode == 0, proc.stderr
    rows = read_mds(out / "mds")
    assert len(rows) == 10
    first_six = {u for u, _ in items[:6]}
    for r in rows:
        assert (r["score"], r["tag"]) == ((0.5, "a") if r["url"] in first_six else (1.5, "b"))
    assert stats_of(out)["units"]["done"] == 4  # 13 rows in units of 4


def test_laion_preset_filters_before_download(tmp_path: Path, server: LoopbackServer) -> None:
    server.routes["/a.jpg"] = make_image(600, 400)
    rows = [
        {
            "URL": server.url("/a.jpg"),
            "TEXT": "kept",
            "WIDTH": 600,
            "HEIGHT": 400,
            "punsafe": 0.1,
            "pwatermark": 0.2,
            "AESTHETIC_SCORE": 6.0,
        },
        {
            "URL": server.url("/unsafe.jpg"),
            "TEXT": "x",
            "WIDTH": 600,
            "HEIGHT": 400,
            "punsafe": 0.9,
            "pwatermark": 0.2,
            "AESTHETIC_SCORE": 6.0,
        },
        {
            "URL": server.url("/wm.jpg"),
            "TEXT": "x",
            "WIDTH": 600,
            "HEIGHT": 400,
            "punsafe": 0.1,
            "pwatermark": 0.9,
            "AESTHETIC_SCORE": 6.0,
        },
        {
            "URL": server.url("/ugly.jpg"),
            "TEXT": "x",
            "WIDTH": 600,
            "HEIGHT": 400,
            "punsafe": 0.1,
            "pwatermark": 0.1,
            "AESTHETIC_SCORE": 3.0,
        },
        {
            "URL": server.url("/tiny.jpg"),
            "TEXT": "x",
            "WIDTH": 600,
            "HEIGHT": 100,
            "punsafe": 0.1,
            "pwatermark": 0.1,
            "AESTHETIC_SCORE": 6.0,
        },
    ]
    listing = write_list(tmp_path / "laion.parquet", rows)
    out = tmp_path / "out"
    proc = run_fetch(
        "--dataset",
        "laion",
        "--urls",
        listing,
        "--out",
        out,
        "--max-punsafe",
        "0.5",
        "--max-pwatermark",
        "0.5",
        "--min-aesthetic",
        "5",
        *NET,
    )
    assert proc.returncode == 0, proc.stderr
    stats = stats_of(out)
    assert stats["kept"] == 1
    assert stats["rejected"] == {"punsafe": 1, "pwatermark": 1, "low_aesthetic": 1, "listed_too_small": 1}
    assert sum(server.hits.values()) == 1  # filtered rows never downloaded
    (row,) = read_mds(out / "mds")
    assert row["caption"] == "kept" and row["punsafe"] == pytest.approx(0.1) and row["AESTHETIC_SCORE"] == 6.0


async def _reset(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Length": "100000", "Content-Type": "image/jpeg"})
    await resp.prepare(request)
    await resp.write(b"\xff\xd8" + b"x" * 1000)
    assert request.transport is not None
    request.transport.close()
    return resp


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(5)
    return web.Response(body=b"late")


def _redirect_to(target: str):
    async def handler(request: web.Request) -> web.Response:
        raise web.HTTPFound(target)

    return handler


def _status(code: int, **headers: str):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=code, headers=headers)

    return handler


def _with_headers(body: bytes, **headers: str):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers, content_type="image/jpeg")

    return handler


def test_every_rejection_reason_is_counted(tmp_path: Path, server: LoopbackServer) -> None:
    good = make_image(400, 300)
    png = make_image(300, 300, "PNG")
    ihdr = b"IHDR" + (30000).to_bytes(4, "big") * 2 + png[24:29]
    bomb = png[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + png[33:]
    server.routes.update(
        {
            "/good.jpg": good,
            "/e500": _status(500),
            "/slow": _slow,
            "/reset": _reset,
            "/small.jpg": make_image(200, 100),
            "/page": _with_headers(b"<html>hello</html>"),
            "/big.jpg": make_image(3000, 3000, quality=100),
            "/optout.jpg": _with_headers(good, **{"X-Robots-Tag": "noai"}),
            "/other-bot.jpg": _with_headers(good, **{"X-Robots-Tag": "otherbot: noindex"}),
            "/trunc.jpg": good[: len(good) // 2],
            "/loop": _redirect_to("/loop"),
            "/bomb.png": bomb,
            "/to-ftp": _redirect_to("ftp://127.0.0.1/x.jpg"),
            "/hop": _redirect_to("/good.jpg"),
            "/e403": _status(403),
        }
    )
    u = server.url
    rows = [
        (u("/good.jpg"), "ok"),
        (u("/hop"), "redirected once"),
        (u("/other-bot.jpg"), "opt-out for another bot"),
        (u("/missing.jpg"), "x"),
        (u("/e500"), "x"),
        (u("/slow"), "x"),
        (u("/reset"), "x"),
        (u("/small.jpg"), "x"),
        (u("/page"), "x"),
        (u("/big.jpg"), "x"),
        (u("/optout.jpg"), "x"),
        (u("/trunc.jpg"), "x"),
        (u("/loop"), "x"),
        (u("/bomb.png"), "x"),
        (u("/to-ftp"), "x"),
        ("ftp://127.0.0.1/a.jpg", "x"),
        ("http://", "x"),
        ("", "x"),
        (u("/good.jpg"), "duplicate"),
        (u("/e403"), "x"),
        (u("/other.jpg"), ""),
    ]
    listing = write_list(tmp_path / "list.jsonl", [{"url": a, "caption": c} for a, c in rows])
    out = tmp_path / "out"
    proc = run_fetch(
        "--dataset", "urls", "--urls", listing, "--out", out, "--timeout", "1.5", "--retries", "1", "--max-bytes", "300000", *NET
    )
    assert proc.returncode == 0, proc.stderr
    stats = stats_of(out)
    assert stats["kept"] == 3
    assert stats["rejected"] == {
        "http_404": 1,
        "http_5xx": 1,
        "timeout": 1,
        "connection": 1,
        "too_small": 1,
        "not_an_image": 1,
        "too_large": 1,
        "robots_optout": 1,
        "decode_error": 1,
        "too_many_redirects": 1,
        "decompression_bomb": 1,
        "bad_scheme": 2,
        "invalid_url": 2,
        "duplicate_url": 1,
        "http_403": 1,
        "no_caption": 1,
    }
    assert server.hits["/other.jpg"] == 0  # no caption: never downloaded
    assert server.hits["/e500"] == 2 and server.hits["/e403"] == 1  # 5xx retried, 4xx not
    assert {r["caption"] for r in read_mds(out / "mds")} == {"ok", "redirected once", "opt-out for another bot"}


def test_ignore_robots_flag(tmp_path: Path, server: LoopbackServer) -> None:
    server.routes["/optout.jpg"] = _with_headers(make_image(400, 300), **{"X-Robots-Tag": "noimageai, noindex"})
    listing = write_list(tmp_path / "list.jsonl", [{"url": server.url("/optout.jpg"), "caption": "c"}])
    out = tmp_path / "out"
    assert run_fetch("--dataset", "urls", "--urls", listing, "--out", out, "--ignore-robots", *NET).returncode == 0
    assert stats_of(out)["kept"] == 1


def test_private_addresses_refused_by_default(tmp_path: Path, server: LoopbackServer) -> None:
    server.routes["/a.jpg"] = make_image(400, 300)
    rows = [
        {"url": server.url("/a.jpg"), "caption": "c"},
        {"url": f"http://localhost:{server.port}/a.jpg", "caption": "c"},
        {"url": f"http://[::1]:{server.port}/a.jpg", "caption": "c"},
    ]
    listing = write_list(tmp_path / "list.jsonl", rows)
    out = tmp_path / "out"
    proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", out, "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert stats_of(out)["rejected"] == {"private_address": 3}
    assert server.hits["/a.jpg"] == 0


def test_retries_then_success_and_retry_after(tmp_path: Path, server: LoopbackServer) -> None:
    good = make_image(400, 300)
    calls: dict[str, list[float]] = {"/flaky.jpg": [], "/busy.jpg": []}

    async def flaky(request: web.Request) -> web.Response:
        calls["/flaky.jpg"].append(time.monotonic())
        if len(calls["/flaky.jpg"]) <= 2:
            return web.Response(status=503)
        return web.Response(body=good, content_type="image/jpeg")

    async def busy(request: web.Request) -> web.Response:
        calls["/busy.jpg"].append(time.monotonic())
        if len(calls["/busy.jpg"]) == 1:
            return web.Response(status=429, headers={"Retry-After": "2"})
        return web.Response(body=good, content_type="image/jpeg")

    server.routes.update({"/flaky.jpg": flaky, "/busy.jpg": busy})
    listing = write_list(tmp_path / "list.jsonl", [{"url": server.url(p), "caption": p} for p in calls])
    out = tmp_path / "out"
    proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", out, "--retries", "2", *NET)
    assert proc.returncode == 0, proc.stderr
    assert stats_of(out)["kept"] == 2
    assert len(calls["/flaky.jpg"]) == 3 and len(calls["/busy.jpg"]) == 2
    assert calls["/busy.jpg"][1] - calls["/busy.jpg"][0] >= 1.9  # waited as Retry-After asked


def _done_units(out: Path) -> set[str]:
    db = sqlite3.connect(out / "manifest.sqlite")
    try:
        return {r[0] for r in db.execute("SELECT id FROM units WHERE state='done'")}
    except sqlite3.OperationalError:  # polled before the run created its schema
        return set()
    finally:
        db.close()


def test_resume_after_sigkill(tmp_path: Path, server: LoopbackServer) -> None:
    n = 240
    listing = write_list(tmp_path / "list.parquet", serve_numbered(server, "/r", n, delay=0.2))
    args = ("--dataset", "urls", "--urls", listing, "--unit-size", "20", "--concurrency", "4", *NET)  # ~12 s of work

    out = tmp_path / "killed"
    proc = start_fetch(*args, "--out", out)
    deadline = time.monotonic() + 120
    while len(_done_units(out) if (out / "manifest.sqlite").exists() else set()) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    done_before = _done_units(out)
    assert 3 <= len(done_before) < 12
    hits_before = dict(server.hits)

    rerun = run_fetch(*args, "--out", out)
    assert rerun.returncode == 0, rerun.stderr
    rows = read_mds(out / "mds")
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == n
    # Units done before the kill were not fetched again.
    for unit in done_before:
        for row in range(20):
            i = int(unit) * 20 + row
            assert server.hits[f"/r/{i}.jpg"] == hits_before[f"/r/{i}.jpg"] == 1

    clean = tmp_path / "clean"
    assert run_fetch(*args, "--out", clean).returncode == 0
    assert sorted(keys) == sorted(r["key"] for r in read_mds(clean / "mds"))
    assert {r["key"]: r["caption"] for r in rows} == {r["key"]: r["caption"] for r in read_mds(clean / "mds")}


def test_hf_and_http_list_locations(tmp_path: Path, server: LoopbackServer, corpus: dict) -> None:
    """hf://datasets/<repo>/<glob> lists come through huggingface_hub's endpoint and token
    (HF_ENDPOINT points at a fake hub on 127.0.0.1); http(s) lists are downloaded as they are."""
    import pyarrow as pa

    from tests.conftest import fetch_env
    from tests.fakehub import FakeHub

    items = list(corpus.items())
    hub = FakeHub(server)
    for i, chunk in enumerate((items[:7], items[7:])):
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist([{"url": u, "caption": c} for u, (c, _) in chunk]), buf)
        hub.add("org/lists", f"data/part-{i}.parquet", buf.getvalue().to_pybytes())
    hub.add("org/lists", "README.md", b"not a list")
    out = tmp_path / "hf"
    proc = run_fetch(
        "--dataset",
        "urls",
        "--urls",
        "hf://datasets/org/lists/data/*.parquet",
        "--out",
        out,
        *NET,
        env=fetch_env(HF_ENDPOINT=hub.endpoint),
    )
    assert proc.returncode == 0, proc.stderr
    assert len(read_mds(out / "mds")) == 10

    hub.gate("org/lists", "hf_right_token_0123456789abcdef")
    denied = run_fetch(
        "--dataset",
        "urls",
        "--urls",
        "hf://datasets/org/lists/data/*.parquet",
        "--out",
        tmp_path / "denied",
        *NET,
        env=fetch_env(HF_ENDPOINT=hub.endpoint),
    )
    assert denied.returncode == 2 and "huggingface-cli login" in denied.stderr

    server.routes["/lists/list.jsonl"] = b"\n".join(orjson.dumps({"url": u, "caption": c}) for u, (c, _) in items)
    out = tmp_path / "http"
    proc = run_fetch("--dataset", "urls", "--urls", server.url("/lists/list.jsonl"), "--out", out, *NET)
    assert proc.returncode == 0, proc.stderr
    assert len(read_mds(out / "mds")) == 10
