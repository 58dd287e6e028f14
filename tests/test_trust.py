"""The README's promises against inputs the rest of the suite never tried (issue 14).

One test (or a few) per class of failure found from outside: each failed on the code before
the fix. Every server is a loopback one started here.
"""

from __future__ import annotations

import asyncio
import decimal
import fcntl
import io
import json
import os
import sqlite3
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from fastfetch.archive import ArchiveError
from fastfetch.archive.tarstream import MAX_META, iter_tar
from fastfetch.archive.ziprange import zip_entries
from fastfetch.http import FetchConfig, Fetcher, Refused
from fastfetch.ranged import ResumableStream, probe
from fastfetch.redact import public_url, redact
from tests.conftest import ROOT, LoopbackServer, flaky, make_image, read_mds, run_fetch
from tests.fakehub import ServedFile, file_handler, make_zip
from tests.test_fetch_urls import stats_of, write_list

NET = ("--allow-private-networks", "--workers", "2")


def _serve_images(server: LoopbackServer, n: int, prefix: str = "/i") -> list[str]:
    urls = []
    for i in range(n):
        server.routes[f"{prefix}/{i}.jpg"] = make_image(300 + 10 * (i % 5), 280, seed=i)
        urls.append(server.url(f"{prefix}/{i}.jpg"))
    return urls


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


# -- 1. only what fastfetch started is ever removed ----------------------------------------------
def test_a_rerun_removes_only_what_fastfetch_started(tmp_path: Path, server: LoopbackServer) -> None:
    urls = _serve_images(server, 12)
    listing = write_list(tmp_path / "l.jsonl", [{"url": u, "caption": f"c{i}"} for i, u in enumerate(urls)])
    out = tmp_path / "o"
    args = ("--dataset", "urls", "--urls", listing, "--out", out, "--unit-size", "4", *NET)
    assert run_fetch(*args, "--limit", "4").returncode == 0
    # what a user put there: latents (the encoder accepts any folder), another tool's MDS
    for folder in ("latents", "r00000-c00000", "other"):
        (out / "mds" / folder).mkdir()
        (out / "mds" / folder / "index.json").write_text('{"version": 2, "shards": []}')
        (out / "mds" / folder / "shard.00000.mds").write_bytes(b"user data")
    # what fastfetch started and did not finish: a planned unit's folder that is not done
    assert run_fetch(*args, "--limit", "8", "--ids", "0").returncode == 0  # plans unit 00001, leaves it pending
    (out / "mds" / "00001").mkdir()
    (out / "mds" / "00001" / "index.json").write_text('{"version": 2, "shards": []}')
    proc = run_fetch(*args)
    assert proc.returncode == 0, proc.stderr
    for folder in ("latents", "r00000-c00000", "other"):
        assert (out / "mds" / folder / "shard.00000.mds").read_bytes() == b"user data"
    assert sorted(r["caption"] for r in read_mds(out / "mds")) == sorted(f"c{i}" for i in range(12))


def test_the_encoder_refuses_an_out_inside_or_around_its_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import encode_models  # noqa: F401  (the repo on sys.path, offline hub)

    from encode.run import parse_args

    data = tmp_path / "fetched" / "mds"
    data.mkdir(parents=True)
    (data / "index.json").write_text('{"version": 2, "shards": []}')
    for out, says in (
        (data / "latents", "is inside --data"),
        (data, "is --data itself"),
        (tmp_path / "fetched", "is inside --out"),
    ):
        with pytest.raises(SystemExit) as stopped:
            parse_args(["--data", str(data), "--out", str(out), "--vae", "x", "--text-encoder", "openclip:x"])
        assert stopped.value.code == 2 and says in capsys.readouterr().err
    assert not (data / "latents").exists() and (data / "index.json").exists()


# -- 2. kept columns never replace fastfetch's own ----------------------------------------------
def test_kept_columns_never_replace_fastfetch_columns(tmp_path: Path, server: LoopbackServer) -> None:
    urls = _serve_images(server, 3)
    rows = [
        {"url": u, "caption": f"c{i}", "key": "same", "width": 7, "height": 9, "jpg": "bytes", "similarity": 0.5}
        for i, u in enumerate(urls)
    ]  # img2dataset parquets carry key, width and height
    listing = write_list(tmp_path / "l.parquet", rows)
    for cols in ("key", "similarity,width", "jpg", "url", "original_width", "caption", "KEY", "Url"):
        proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", tmp_path / cols, "--keep-cols", cols, *NET)
        assert proc.returncode == 2, proc.stderr
        assert "fastfetch writes itself" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", tmp_path / "u", "--keep-cols", "url:raw_url", *NET)
    assert proc.returncode == 2 and "URL column" in proc.stderr  # it would store the URL with its credentials
    out = tmp_path / "renamed"
    proc = run_fetch(
        "--dataset",
        "urls",
        "--urls",
        listing,
        "--out",
        out,
        "--keep-cols",
        "key:list_key,width:list_width,jpg:list_jpg,similarity",
        *NET,
    )
    assert proc.returncode == 0, proc.stderr
    stored = read_mds(out / "mds")
    assert len(stored) == 3 and len({r["key"] for r in stored}) == 3
    for r in stored:
        assert r["list_key"] == "same" and r["list_width"] == 7 and r["list_jpg"] == "bytes" and r["similarity"] == 0.5
        assert r["width"] >= 256 and r["width"] == r["original_width"]  # the real image, not the list's 7
        assert not isinstance(r["jpg"], str)


# -- 3. one type per kept column over the whole list --------------------------------------------
def test_kept_column_types_are_unified_over_the_list(tmp_path: Path, server: LoopbackServer) -> None:
    urls = _serve_images(server, 5)
    folder = tmp_path / "laion"
    folder.mkdir()
    base = {"TEXT": "t", "WIDTH": 300, "HEIGHT": 300}
    pq.write_table(
        pa.table(
            {
                "URL": [urls[0]],
                "TEXT": ["a"],
                "WIDTH": [300],
                "HEIGHT": [300],
                "similarity": pa.array([0.25], pa.float32()),
                "punsafe": pa.array([1], pa.int64()),
            }
        ),
        folder / "0.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "URL": [urls[1]],
                "TEXT": ["b"],
                "WIDTH": [300],
                "HEIGHT": [300],
                "similarity": pa.array([0.5], pa.float64()),
                "punsafe": pa.array([0.5], pa.float64()),
            }
        ),
        folder / "1.parquet",
    )
    pq.write_table(pa.table({"URL": [urls[2]], **{k: [v] for k, v in base.items()}}), folder / "2.parquet")  # no similarity
    pq.write_table(
        pa.table(
            {
                "URL": [urls[3]],
                "TEXT": ["d"],
                "WIDTH": [300],
                "HEIGHT": [300],
                "similarity": pa.array([decimal.Decimal("0.75")], pa.decimal128(6, 4)),
                "pwatermark": pa.array(["0.1"]),
            }
        ),
        folder / "3.parquet",
    )
    out = tmp_path / "o"
    proc = run_fetch("--dataset", "laion", "--urls", folder, "--out", out, *NET)
    assert proc.returncode == 0, proc.stderr
    got = {r["url"]: r for r in read_mds(out / "mds")}
    sims = [got[u]["similarity"] for u in urls[:4]]
    assert sims[0] == 0.25 and sims[1] == 0.5 and sims[2] != sims[2] and sims[3] == 0.75  # NaN where missing
    assert [got[u]["punsafe"] for u in urls[:4]][:2] == [1.0, 0.5]  # int and float: float for all
    assert got[urls[3]]["pwatermark"] == "0.1" and got[urls[0]]["pwatermark"] == ""

    # a jsonl whose first batch (65,536 rows) says 0.5 and whose later rows say 2 and "n/a"
    many = [{"url": "", "caption": "x", "score": 0.5}] * 65_536
    many += [{"url": urls[4], "caption": "late", "score": 2}, {"url": urls[0], "caption": "text", "score": "n/a"}]
    listing = write_list(tmp_path / "big.jsonl", many)
    out = tmp_path / "o2"
    proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", out, "--keep-cols", "score", *NET)
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["score"] for r in read_mds(out / "mds")) == ["2", "n/a"]  # numbers and text: text for all

    # what MDS cannot hold is refused, naming the column
    odd = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"url": [urls[0]], "caption": ["c"], "wait": pa.array([5], pa.duration("s"))}), odd)
    proc = run_fetch("--dataset", "urls", "--urls", odd, "--out", tmp_path / "o3", "--keep-cols", "wait", *NET)
    assert proc.returncode == 2 and "'wait'" in proc.stderr and "Traceback" not in proc.stderr


# -- 4. duplicate URLs over the whole list ------------------------------------------------------
def test_duplicate_urls_are_dropped_over_the_whole_list(tmp_path: Path, server: LoopbackServer) -> None:
    urls = _serve_images(server, 10)
    order = [0, 1, 2, 3, 0, 4, 5, 1, 6, 7, 8, 9, 2, 9]  # repeats inside and across units
    listing = write_list(tmp_path / "l.parquet", [{"url": urls[i], "caption": f"row{n}"} for n, i in enumerate(order)])
    results = []
    for unit_size in ("3", "5", "100"):
        out = tmp_path / f"u{unit_size}"
        before = sum(server.hits.values())
        proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", out, "--unit-size", unit_size, *NET)
        assert proc.returncode == 0, proc.stderr
        assert sum(server.hits.values()) - before == 10  # each URL fetched once
        assert stats_of(out)["rejected"] == {"duplicate_url": 4}
        results.append(sorted((r["url"], r["caption"]) for r in read_mds(out / "mds")))
    assert results[0] == results[1] == results[2]
    assert sorted(c for _, c in results[0]) == sorted(f"row{n}" for n in (0, 1, 2, 3, 5, 6, 8, 9, 10, 11))  # first wins
    # a larger selection later: the same URLs as one run
    out = tmp_path / "grown"
    for limit in ("6", "9", "14"):
        assert (
            run_fetch("--dataset", "urls", "--urls", listing, "--out", out, "--unit-size", "3", "--limit", limit, *NET).returncode
            == 0
        )
    assert sorted((r["url"], r["caption"]) for r in read_mds(out / "mds")) == results[0]


# -- 5. no secret at rest -----------------------------------------------------------------------
def test_redact_removes_every_kind_of_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    token = "hf_" + "a1B2c3" * 6
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value-123")
    text = (
        f"GET https://user:pa55word@h.example/x.jpg?X-Amz-Signature=abc&w=3 failed; "
        f"headers {{'Authorization': 'Bearer {token}'}} aws-secret-value-123 ftp://u:p@h/ {token}"
    )
    out = redact(text)
    for secret in ("pa55word", "user:", "X-Amz-Signature=abc", token, "aws-secret-value-123", "u:p@"):
        assert secret not in out
    assert "https://<redacted>@h.example/x.jpg?<redacted>" in out
    assert (
        public_url("https://user:pw@h.example/a.jpg?w=500&X-Amz-Signature=s1&sig=s2&token=t")
        == "https://h.example/a.jpg?w=500&X-Amz-Signature=<redacted>&sig=<redacted>&token=<redacted>"
    )
    assert public_url("https://h.example/a.jpg?w=500&h=300&author=me") == "https://h.example/a.jpg?w=500&h=300&author=me"
    for name in ("auth_token", "api-key", "access-token", "client_secret", "private_token", "key", "Policy", "passwd"):
        assert public_url(f"https://h.example/a.jpg?{name}=s3cr3t&w=1") == f"https://h.example/a.jpg?{name}=<redacted>&w=1"


def test_no_secret_reaches_disk_logs_or_stats(tmp_path: Path, server: LoopbackServer) -> None:
    token = "hf_" + "s3cr3t" * 6
    good = make_image(400, 300)
    state, down_then_good = flaky(good)
    server.routes["/ok.jpg"] = good
    server.routes["/flaky.jpg"] = down_then_good
    host = f"127.0.0.1:{server.port}"
    rows = [
        {"url": f"http://alice:pa55word-{token}@{host}/ok.jpg", "caption": "userinfo"},
        {"url": f"http://{host}/flaky.jpg?X-Amz-Signature=sigsecret-42&w=1", "caption": "signed"},
        {"url": f"http://bob:hunter2secret@{host}/flaky.jpg?token={token}", "caption": "both"},
    ]
    listing = write_list(tmp_path / "l.jsonl", rows)
    out = tmp_path / "o"
    args = ("--dataset", "urls", "--urls", listing, "--out", out, "--retries", "0", *NET)
    first = run_fetch(*args)
    assert first.returncode == 0, first.stderr
    assert stats_of(out)["rejected"] == {"http_5xx": 2}
    state["down"] = False
    second = run_fetch(*args, "--retry-failed")
    assert second.returncode == 0, second.stderr
    assert stats_of(out)["kept"] == 3  # the retry found its items without stored URLs
    secrets = ("pa55word", token, "sigsecret-42", "hunter2secret", "alice:", "bob:")
    logs = first.stdout + first.stderr + second.stdout + second.stderr
    for path in _files_under(out):
        if path.parent.name == "urls" and path.parent.parent.name == "_work":
            continue  # the plan's copy of the user's own list (needed to fetch; README: Reliability)
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, (path, secret)
    for secret in secrets:
        assert secret not in logs
    urls = sorted(r["url"] for r in read_mds(out / "mds"))
    assert urls == sorted(
        [
            f"http://{host}/ok.jpg",
            f"http://{host}/flaky.jpg?X-Amz-Signature=<redacted>&w=1",
            f"http://{host}/flaky.jpg?token=<redacted>",
        ]
    )


def test_old_manifests_lose_their_stored_urls(tmp_path: Path) -> None:
    from fastfetch.manifest import Manifest

    db = sqlite3.connect(tmp_path / "manifest.sqlite")
    db.executescript("""
        CREATE TABLE failed_items (unit TEXT NOT NULL, key TEXT NOT NULL, url TEXT NOT NULL, caption TEXT NOT NULL,
                                   extra TEXT NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (unit, key));
        INSERT INTO failed_items VALUES ('00000', '000000003', 'http://u:topsecret@h/x?sig=topsecret', 'c', '{}', 'timeout');
    """)
    db.commit()
    db.close()
    manifest = Manifest(tmp_path)
    assert manifest.failed_keys("00000") == {"000000003"}
    manifest.close()
    for path in _files_under(tmp_path):
        assert b"topsecret" not in path.read_bytes()


# -- 6. one guarded client for every request ----------------------------------------------------
def test_every_kind_of_request_is_guarded(tmp_path: Path, server: LoopbackServer) -> None:
    server.routes["/list.txt"] = b"http://example.invalid/a.jpg\n"
    proc = run_fetch("--dataset", "urls", "--urls", server.url("/list.txt"), "--out", tmp_path / "a")
    assert proc.returncode == 2 and "private address" in proc.stderr, proc.stderr
    proc = run_fetch("--dataset", "coco", "--coco-base-url", server.url("/mirror"), "--out", tmp_path / "b")
    assert proc.returncode == 2 and "private address" in proc.stderr and "--allow-private-networks" in proc.stderr
    env = {**os.environ, "HF_ENDPOINT": server.url(""), "HF_HUB_OFFLINE": "0"}
    proc = run_fetch("--dataset", "cc12m", "--out", tmp_path / "c", env=env)
    assert proc.returncode == 2 and "endpoint" in proc.stderr and "--allow-private-networks" in proc.stderr
    assert not [p for p in server.hits if p != "/list.txt"] and server.hits["/list.txt"] == 0


def _redirect(target: str, status: int = 302):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": target})

    return handler


def test_archive_reads_check_every_redirect_hop(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """127.0.0.1 plays a public host; redirects into 127.0.0.2 (private) or file:// are refused
    for archive streams and probes too, and credentials never follow a hop to another origin."""
    import fastfetch.http as http

    monkeypatch.setattr(http, "is_public_address", lambda a: a == "127.0.0.1")
    served = ServedFile(b"z" * 5000)
    server.routes["/file"] = file_handler(served)  # type: ignore[assignment]
    server.routes["/inside"] = _redirect(f"http://127.0.0.2:{server.port}/file")
    server.routes["/scheme"] = _redirect("file:///etc/passwd", 307)
    server.routes["/loop"] = _redirect("/loop")
    server.routes["/elsewhere"] = _redirect(f"http://localtest.invalid:{server.port}/file")
    server.routes["/same"] = _redirect("/file")

    async def go() -> list[str]:
        reasons = []
        async with Fetcher(FetchConfig()) as client:
            for path in ("/inside", "/scheme", "/loop"):
                for attempt in (
                    lambda: probe(client, server.url(path)),
                    lambda: _drain(ResumableStream(client, server.url(path), backoff=0.01)),
                ):
                    try:
                        await attempt()
                        reasons.append("fetched")
                    except Refused as exc:
                        reasons.append(exc.reason)
            body = await _drain(ResumableStream(client, server.url("/same"), {"Authorization": "Bearer t0ken"}))
            assert body == served.data
        return reasons

    assert asyncio.run(go()) == ["private_address"] * 2 + ["bad_scheme"] * 2 + ["too_many_redirects"] * 2
    assert server.hits["/file"] == 1
    assert [h.get("Authorization") for p, h in server.requests if p == "/file"] == ["Bearer t0ken"]  # same origin


async def _drain(stream: ResumableStream) -> bytes:
    return b"".join([c async for c in stream])


def test_credentials_do_not_follow_a_redirect_to_another_origin(server: LoopbackServer) -> None:
    served = ServedFile(b"y" * 3000)
    server.routes["/cdn/file"] = file_handler(served)  # type: ignore[assignment]
    server.routes["/hub"] = _redirect(f"http://localhost:{server.port}/cdn/file")  # another origin

    async def go() -> bytes:
        async with Fetcher(FetchConfig(allow_private_networks=True)) as client:
            return await _drain(ResumableStream(client, server.url("/hub"), {"Authorization": "Bearer t0ken"}))

    assert asyncio.run(go()) == served.data
    sent = dict(server.requests)
    assert sent["/hub"].get("Authorization") == "Bearer t0ken" and "Authorization" not in sent["/cdn/file"]


# -- 7. bounded tar metadata --------------------------------------------------------------------
@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE])
def test_tar_metadata_records_are_bounded(kind: bytes) -> None:
    header = tarfile.TarInfo("././@LongLink")
    header.type = kind
    header.size = 1 << 30  # declares a 1 GiB long name / pax header
    block = header.tobuf(tarfile.USTAR_FORMAT)
    pulled = {"bytes": 0}

    async def stream():
        yield block
        for _ in range(64):  # 64 MiB of it, as far as anybody asks
            pulled["bytes"] += 1 << 20
            yield b"a" * (1 << 20)

    async def go() -> None:
        async for _ in iter_tar(stream()):
            pass

    with pytest.raises(ArchiveError, match="metadata record"):
        asyncio.run(go())
    assert pulled["bytes"] <= 2 * MAX_META


def test_sparse_and_repeated_members_are_counted_not_guessed(tmp_path: Path, server: LoopbackServer) -> None:
    from tests.fakehub import FakeHub

    good = make_image(320, 300, seed=1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (
            ("k1.jpg", good),
            ("k1.txt", b"first"),
            ("k1.JPG", make_image(340, 300, seed=3)),
            ("k1.txt", b"adjacent repeat"),
            ("k2.jpg", good),
            ("k2.txt", b"second"),
            ("k1.jpg", make_image(330, 300, seed=2)),
            ("k1.txt", b"again"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("k3.jpg")  # a GNU sparse member: its stored bytes are not the file
        info.type = tarfile.GNUTYPE_SPARSE
        info.size = len(good)
        tar.addfile(info, io.BytesIO(good))
        tar.addfile(tarfile.TarInfo("k3.txt"), io.BytesIO(b""))
    hub = FakeHub(server)
    hub.add("pixparse/cc12m-wds", "cc12m-train-0000.tar", buf.getvalue())
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0"}
    out = tmp_path / "o"
    proc = run_fetch("--allow-private-networks", "--dataset", "cc12m", "--out", out, env=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["caption"] for r in read_mds(out / "mds")) == ["first", "second"]
    assert stats_of(out)["rejected"] == {"duplicate_key": 2, "sparse_member": 1}


# -- 8. archive members count against --max-inflight-mb -----------------------------------------
def test_archive_members_are_bounded_by_max_inflight_mb(tmp_path: Path, server: LoopbackServer) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (2200, 2400, 3), dtype=np.uint8)).save(png, "PNG", compress_level=0)
    member = png.getvalue()  # ~16 MB that take the one worker a while to decode
    names = [f"COCO_val2014_{i:012d}.jpg" for i in range(40)]
    images_zip = make_zip([(f"val2014/{n}", member) for n in names], compress=False)
    captions = orjson.dumps(
        {
            "images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
            "annotations": [{"id": i, "image_id": i, "caption": f"c{i}"} for i in range(len(names))],
        }
    )
    server.routes["/m/zips/val2014.zip"] = file_handler(ServedFile(images_zip))  # type: ignore[assignment]
    server.routes["/m/annotations/annotations_trainval2014.zip"] = file_handler(  # type: ignore[assignment]
        ServedFile(make_zip([("annotations/captions_val2014.json", captions)]))
    )
    del images_zip
    out = tmp_path / "o"
    proc = run_fetch(
        "--allow-private-networks",
        "--dataset",
        "coco",
        "--coco-base-url",
        server.url("/m"),
        "--out",
        out,
        "--workers",
        "1",
        "--max-inflight-mb",
        "32",
    )
    assert proc.returncode == 0, proc.stderr
    stats = stats_of(out)
    assert stats["kept"] == 40
    # the budget (32 MB) + one member being read + a zip read run (16 MB) on top of the ~0.2 GB base
    assert stats["this_run"]["peak_rss_mb"] < 350, stats["this_run"]


# -- 9. the encoder checks its input first ------------------------------------------------------
def _encode(data: str, out: str, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    import encode_models as em

    return subprocess.run(em.run_cmd(data, out, *extra), env=em.env(), capture_output=True, text=True, timeout=timeout)


def _copy_of_image_mds(tmp_path: Path) -> tuple[Path, dict]:
    import shutil

    sys.path.insert(0, str(ROOT / "tests"))
    import encode_models as em

    source, _ = em.image_mds(37)
    data = tmp_path / "mds"
    shutil.copytree(source, data)
    return data, json.loads((data / "index.json").read_text())


@pytest.mark.parametrize("damage", ["missing", "truncated", "header", "flipped_byte", "empty", "listed_twice", "locked"])
def test_the_encoder_names_what_is_wrong_with_its_input(tmp_path: Path, damage: str) -> None:
    data, index = _copy_of_image_mds(tmp_path)
    shard = data / index["shards"][1]["raw_data"]["basename"]
    blob = bytearray(shard.read_bytes())
    out = tmp_path / "latents"
    lock = None
    if damage == "missing":
        shard.unlink()
        says = f"{shard}: missing"
    elif damage == "truncated":
        shard.write_bytes(blob[:-100])
        says = "truncated or replaced"
    elif damage == "header":
        blob[0:4] = struct.pack("<I", 0xFFFFFF)
        shard.write_bytes(blob)
        says = "damaged"
    elif damage == "flipped_byte":
        blob[len(blob) // 2] ^= 0xFF
        shard.write_bytes(blob)
        says = "corrupted"
    elif damage == "empty":
        (data / "index.json").write_text('{"version": 2, "shards": []}')
        says = "holds no rows"
    elif damage == "listed_twice":  # every row of it would be encoded twice
        (data / "index.json").write_text(json.dumps({**index, "shards": index["shards"] + index["shards"][1:2]}))
        says = "more than once"
    else:
        (out / ".locks").mkdir(parents=True)
        lock = open(out / ".locks" / "rank00000", "a+")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        says = "another encode run is writing into"
    proc = _encode(str(data), str(out))
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    if lock is not None:
        lock.close()


# -- 10. messages, not tracebacks; permanent faults are not retried -----------------------------
def test_out_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("x")
    for args in (("--out", target), ("--out", target / "sub")):
        proc = run_fetch("--dataset", "demo", *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert str(target) in proc.stderr


async def _raw_server(responses: dict[str, bytes]) -> tuple[asyncio.base_events.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        path = line.split()[1].decode() if len(line.split()) > 1 else "/"
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        hits[path] = hits.get(path, 0) + 1
        writer.write(responses.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


hits: dict[str, int] = {}


def test_protocol_faults_are_permanent_and_never_retried() -> None:
    good = make_image(300, 300)
    responses = {
        "/bad-gzip": b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 10\r\n\r\n0123456789",
        "/bad-deflate": b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nContent-Length: 10\r\n\r\n0123456789",
        "/header-flood": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(20000)) + b"\r\n",
        "/long-header": b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 100_000 + b"\r\nContent-Length: 3\r\n\r\nabc",
        "/bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n0\r\n\r\n",
        "/bad-status": b"HTTX/1.1 200 OK\r\n\r\n",
        "/cut": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(good) + 10) + good,
    }

    async def go() -> dict[str, str | None]:
        srv, port = await _raw_server(responses)
        async with srv, Fetcher(FetchConfig(allow_private_networks=True, retries=2, backoff=0.01)) as fetcher:
            return {p: (await fetcher.fetch(f"http://127.0.0.1:{port}{p}")).reason for p in responses}

    hits.clear()
    reasons = asyncio.run(go())
    assert reasons == {
        "/bad-gzip": "bad_encoding",
        "/bad-deflate": "bad_encoding",
        "/header-flood": "bad_response",
        "/long-header": "bad_response",
        "/bad-chunk": "bad_response",
        "/bad-status": "bad_response",
        "/cut": "connection",
    }
    assert {p: n for p, n in hits.items() if n > 1} == {"/cut": 3}  # only the broken-off body is tried again


def test_a_node_summary_names_the_dataset_where_it_is(tmp_path: Path, server: LoopbackServer) -> None:
    urls = _serve_images(server, 4)
    listing = write_list(tmp_path / "l.jsonl", [{"url": u, "caption": "c"} for u in urls])
    out = tmp_path / "shared"
    proc = run_fetch(
        "--dataset", "urls", "--urls", listing, "--out", out, "--unit-size", "2", "--node-rank", "1", "--num-nodes", "2", *NET
    )
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.startswith("dataset: "))
    assert line.startswith(f"dataset: {out}/mds ") and "_nodes" not in line.split("stats:")[0]


def test_a_zip_directory_that_lies_is_refused_before_it_is_read() -> None:
    cd_offset, cd_size = 50 << 20, 300 << 20  # a 300 MiB central directory, as the end record says
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, cd_size, cd_offset, 0)
    reads: list[int] = []

    class Lying:
        size = cd_offset + cd_size + len(eocd)

        async def read(self, offset: int, length: int) -> bytes:
            reads.append(length)
            data = bytearray(length)
            tail = self.size - len(eocd)
            if offset + length > tail:
                start = max(tail, offset)
                data[start - offset :] = eocd[start - tail : start - tail + offset + length - start]
            return bytes(data)

    with pytest.raises(ArchiveError, match="central directory"):
        asyncio.run(zip_entries(Lying()))
    assert max(reads) < 1 << 20  # refused from the end record, before reading the directory


# -- object storage that fails ------------------------------------------------------------------
def test_object_storage_outages_stop_clearly_and_resume(tmp_path: Path, server: LoopbackServer, s3: dict[str, str]) -> None:
    import time

    from tests.conftest import TcpProxy, fetch_env, serve_numbered, start_fetch

    listing = write_list(tmp_path / "l.parquet", serve_numbered(server, "/o", 30, delay=0.2))
    missing = run_fetch(
        "--dataset",
        "urls",
        "--urls",
        listing,
        "--out",
        "s3://no-such-bucket/x",
        "--local-cache",
        tmp_path / "c0",
        *NET,
        env=fetch_env(**s3),
    )
    assert missing.returncode == 2 and "no-such-bucket" in missing.stderr and "Traceback" not in missing.stderr

    proxy = TcpProxy(int(s3["S3_ENDPOINT_URL"].rsplit(":", 1)[1]))
    env = fetch_env(**{**s3, "S3_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "AWS_MAX_ATTEMPTS": "1"})
    cache = tmp_path / "cache"
    args = (
        "--dataset",
        "urls",
        "--urls",
        listing,
        "--out",
        "s3://data/outage",
        "--local-cache",
        cache,
        "--unit-size",
        "3",
        "--concurrency",
        "2",
        *NET,
    )
    proc = start_fetch(*args, env=env)
    deadline = time.monotonic() + 120
    while not (cache / "mds" / "00001" / "index.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proxy.cut()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert "storage is reachable" in err and "s3://data/outage" in err and "Traceback" not in err
    proxy.restore()
    rerun = run_fetch(*args, env=env)
    assert rerun.returncode == 0, rerun.stderr
    from tests.test_scaleout import _remote_rows

    got = _remote_rows(s3, "s3://data/outage/mds", tmp_path / "read")
    assert sorted(r["caption"] for r in got) == sorted(f"c{i}" for i in range(30))
    assert stats_of(cache)["kept"] == 30


# -- several machines: what they must agree on --------------------------------------------------
def test_nodes_keep_their_units_when_the_selection_grows(tmp_path: Path, server: LoopbackServer) -> None:
    from tests.conftest import serve_numbered

    listing = write_list(tmp_path / "l.jsonl", serve_numbered(server, "/n", 40))
    base = ("--dataset", "urls", "--urls", listing, "--unit-size", "4", *NET)
    shared = tmp_path / "shared"
    for selection in (("--ids", "1", "2"), ()):  # a try-out first, then everything (README: Resume)
        for rank in ("0", "1"):
            proc = run_fetch(*base, *selection, "--out", shared, "--node-rank", rank, "--num-nodes", "2")
            assert proc.returncode == 0, proc.stderr
    merged = run_fetch("--merge", "--out", shared)
    assert merged.returncode == 0, merged.stderr
    rows = read_mds(shared / "mds")
    assert len(rows) == len({r["key"] for r in rows}) == 40
    assert sorted(r["caption"] for r in rows) == sorted(f"c{i}" for i in range(40))


def test_merge_refuses_nodes_built_with_different_settings(tmp_path: Path, server: LoopbackServer) -> None:
    from tests.conftest import serve_numbered

    listing = write_list(tmp_path / "l.jsonl", serve_numbered(server, "/m", 12))
    shared = tmp_path / "shared"
    for rank, size in (("0", "256"), ("1", "300")):
        proc = run_fetch(
            "--dataset",
            "urls",
            "--urls",
            listing,
            "--unit-size",
            "3",
            "--out",
            shared,
            "--node-rank",
            rank,
            "--num-nodes",
            "2",
            "--min-size",
            size,
            *NET,
        )
        assert proc.returncode in (0, 2), proc.stderr  # rank 1 finishes last and its merge refuses
    merged = run_fetch("--merge", "--out", shared)
    assert merged.returncode == 2 and "different settings" in merged.stderr and "min_size" in merged.stderr
    assert not (shared / "mds" / "index.json").exists()


# -- the encoder and loader with datasets that do not belong together -----------------------------
def test_latents_of_other_data_or_models_are_not_mixed(tmp_path: Path) -> None:
    import shutil

    sys.path.insert(0, str(ROOT / "tests"))
    import encode_models as em

    from encode.loader import build_streaming_latents_dataloader

    out = tmp_path / "latents"
    shutil.copytree(em.latents_dataset(resolutions=(64, 128)), out)
    other, _ = em.image_mds(37, seed=1)
    proc = _encode(other, str(out))
    assert proc.returncode == 2 and "holds latents of" in proc.stderr, proc.stderr

    sd15 = tmp_path / "sd15-latents"
    shutil.copytree(out, sd15)
    meta = json.loads((sd15 / "latents.json").read_text())
    meta["models"]["vae"], meta["models"]["scaling_factor"] = "runwayml/stable-diffusion-v1-5", 0.18215
    (sd15 / "latents.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="different models"):
        build_streaming_latents_dataloader([str(out), str(sd15)], batch_size=2, image_size=64)


# -- found by the second look (a red team of this change) ---------------------------------------
def test_jsonl_keys_that_first_appear_in_later_rows(tmp_path: Path, server: LoopbackServer) -> None:
    urls = _serve_images(server, 4)
    rows = [{"URL": urls[0], "TEXT": "safe", "WIDTH": 300, "HEIGHT": 300}]  # no punsafe in the first row
    rows += [{"URL": u, "TEXT": f"unsafe{i}", "WIDTH": 300, "HEIGHT": 300, "punsafe": 0.99} for i, u in enumerate(urls[1:])]
    listing = write_list(tmp_path / "l.jsonl", rows)
    out = tmp_path / "o"
    proc = run_fetch("--dataset", "laion", "--urls", listing, "--out", out, "--max-punsafe", "0.5", *NET)
    assert proc.returncode == 0, proc.stderr
    assert [r["caption"] for r in read_mds(out / "mds")] == ["safe"]
    assert stats_of(out)["rejected"]["punsafe"] == 3 and sum(server.hits.values()) == 1  # never downloaded
    # a caption and a kept column that the first row lacks
    rows = [{"url": urls[0]}, {"url": urls[1], "caption": "late", "score": 0.5}]
    listing = write_list(tmp_path / "late.jsonl", rows)
    proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", tmp_path / "o2", "--keep-cols", "score", *NET)
    assert proc.returncode == 0, proc.stderr
    assert [(r["caption"], r["score"]) for r in read_mds(tmp_path / "o2" / "mds")] == [("late", 0.5)]
    assert stats_of(tmp_path / "o2")["rejected"] == {"no_caption": 1}
    # one mixed column does not turn the others into text
    rows = [{"url": urls[i], "caption": "c", "sim": 0.5 + i, "tag": [1, "a", None, 2.5][i]} for i in range(4)]
    listing = write_list(tmp_path / "mixed.jsonl", rows)
    proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", tmp_path / "o3", "--keep-cols", "sim,tag", *NET)
    assert proc.returncode == 0, proc.stderr
    got = sorted((r["sim"], r["tag"]) for r in read_mds(tmp_path / "o3" / "mds"))
    assert got == [(0.5, "1"), (1.5, "a"), (2.5, ""), (3.5, "2.5")]


def test_odd_list_files_are_read_or_refused_clearly(tmp_path: Path, server: LoopbackServer) -> None:
    urls = _serve_images(server, 3)
    bom = tmp_path / "bom"
    bom.mkdir()
    (bom / "a.txt").write_bytes(b"\xef\xbb\xbf" + urls[0].encode() + b"\r\n" + urls[1].encode() + b"\r\n")
    (bom / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + orjson.dumps({"url": urls[2], "caption": "c"}) + b"\n")
    proc = run_fetch("--dataset", "urls", "--urls", bom, "--out", tmp_path / "o1", "--caption-col", "", *NET)
    assert proc.returncode == 0, proc.stderr
    assert stats_of(tmp_path / "o1")["kept"] == 3 and stats_of(tmp_path / "o1")["rejected"] == {}
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"url": urls[0], "caption": "only"}))
    proc = run_fetch("--dataset", "urls", "--urls", one, "--out", tmp_path / "o2", *NET)
    assert proc.returncode == 0 and [r["caption"] for r in read_mds(tmp_path / "o2" / "mds")] == ["only"]
    uneven = tmp_path / "uneven.json"
    uneven.write_text(json.dumps({"url": urls, "caption": ["a", "b"]}))
    proc = run_fetch("--dataset", "urls", "--urls", uneven, "--out", tmp_path / "o3", *NET)
    assert proc.returncode == 2 and "different lengths" in proc.stderr and "Traceback" not in proc.stderr


def _folder_of_lists(server: LoopbackServer, folder: Path, n: int) -> Path:
    folder.mkdir()
    write_list(folder / "a.jsonl", [{"url": u, "caption": f"c{i}"} for i, u in enumerate(_serve_images(server, n))])
    return folder


def test_an_out_inside_the_folder_of_lists_is_not_read_as_lists(tmp_path: Path, server: LoopbackServer) -> None:
    data = _folder_of_lists(server, tmp_path / "data", 6)
    args = ("--dataset", "urls", "--urls", data, "--out", data / "laion", "--unit-size", "2", *NET)
    assert run_fetch(*args, "--ids", "0").returncode == 0
    proc = run_fetch(*args)  # the rerun finds plan.json, stats.json, index.json under --urls
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["caption"] for r in read_mds(data / "laion" / "mds")) == [f"c{i}" for i in range(6)]


def test_an_edited_list_redoes_the_units_it_changed(tmp_path: Path, server: LoopbackServer) -> None:
    urls = _serve_images(server, 6)
    listing = tmp_path / "l.jsonl"
    args = ("--dataset", "urls", "--urls", listing, "--out", tmp_path / "o", "--unit-size", "3", "--keep-cols", "score", *NET)
    write_list(listing, [{"url": u, "caption": f"old{i}", "score": 1} for i, u in enumerate(urls)])
    assert run_fetch(*args).returncode == 0
    rows = [{"url": u, "caption": f"old{i}", "score": 1} for i, u in enumerate(urls)]
    rows[4] = {"url": urls[4], "caption": "new4", "score": 2}  # unit 00001 changes; unit 00000 does not
    write_list(listing, rows)
    before = dict(server.hits)
    assert run_fetch(*args).returncode == 0
    assert {p for p in server.hits if server.hits[p] != before.get(p)} == {f"/i/{i}.jpg" for i in (3, 4, 5)}
    got = sorted((r["caption"], r["score"]) for r in read_mds(tmp_path / "o" / "mds"))
    assert got == sorted([(f"old{i}", 1) for i in (0, 1, 2, 3, 5)] + [("new4", 2)])


def test_a_plan_cut_short_is_never_reused(tmp_path: Path, server: LoopbackServer) -> None:
    lists = _folder_of_lists(server, tmp_path / "lists", 6)
    args = ("--dataset", "urls", "--urls", lists, "--out", tmp_path / "o", "--unit-size", "2", *NET)
    assert run_fetch(*args, "--limit", "3").returncode == 0
    (lists / "b.parquet").write_bytes(b"PAR1 not a parquet file")  # planning stops here, after rewriting unit files
    proc = run_fetch(*args)
    assert proc.returncode == 2 and "b.parquet" in proc.stderr
    assert not (tmp_path / "o" / "_work" / "urls" / "plan.json").exists()
    (lists / "b.parquet").unlink()
    assert run_fetch(*args, "--limit", "3").returncode == 0
    rows = read_mds(tmp_path / "o" / "mds")
    assert sorted(r["caption"] for r in rows) == ["c0", "c1", "c2"]


def test_merge_refuses_nodes_that_planned_other_lists(tmp_path: Path, server: LoopbackServer) -> None:
    from tests.conftest import serve_numbered

    listing = write_list(tmp_path / "l.jsonl", serve_numbered(server, "/p", 12))
    shared = tmp_path / "shared"
    base = ("--dataset", "urls", "--urls", listing, "--unit-size", "3", "--out", shared, "--num-nodes", "2", *NET)
    assert run_fetch(*base, "--node-rank", "0", "--limit", "4").returncode == 0
    assert run_fetch(*base, "--node-rank", "1").returncode == 0
    merged = run_fetch("--merge", "--out", shared)
    assert merged.returncode == 2 and "plan" in merged.stderr


@pytest.mark.parametrize(
    "address",
    [
        "::127.0.0.1",
        "64:ff9b::7f00:1",
        "64:ff9b::a00:1",
        "64:ff9b:1::a00:1",
        "2002:7f00:1::",
        "2002:a00:1::5",
        "fec0::1",
        "::ffff:0:7f00:1",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    ],
)
def test_ipv6_forms_of_private_ipv4_addresses_are_refused(address: str) -> None:
    from fastfetch.http import is_public_address

    assert not is_public_address(address)
    assert is_public_address("64:ff9b::808:808") and is_public_address("2002:808:808::1")


def test_a_proxy_does_not_open_the_guard(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through an HTTP proxy the proxy resolves the name, so the guard judges it first; the
    proxy itself (the operator's, often on a private address) is trusted."""
    image = make_image(300, 300)

    async def proxy(request: web.Request) -> web.Response:  # answers any absolute-form GET
        return web.Response(body=image, content_type="image/jpeg")

    server.routes["/a.jpg"] = proxy  # the proxy's request line names the whole URL; aiohttp routes its path
    server.routes["/b.jpg"] = proxy
    monkeypatch.setenv("http_proxy", f"http://corp-proxy.test:{server.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    answers = {"public.test": "93.184.216.34", "internal.test": "10.1.2.3", "corp-proxy.test": "127.0.0.1"}

    class Fake:
        async def resolve(self, host: str, port: int = 0, family: int = 2) -> list[dict]:
            return [{"hostname": host, "host": answers[host], "port": port, "family": 2, "proto": 0, "flags": 0}]

        async def close(self) -> None:
            pass

    async def go() -> list[str | None]:
        async with Fetcher(FetchConfig(retries=0)) as fetcher:
            fetcher._resolver._inner = Fake()  # type: ignore[union-attr]
            return [(await fetcher.fetch(u)).reason for u in ("http://public.test/a.jpg", "http://internal.test/b.jpg")]

    assert asyncio.run(go()) == [None, "private_address"]
    assert [p for p, _ in server.requests] == ["/a.jpg"]


def test_a_kept_archive_of_an_older_edition_is_not_reused(tmp_path: Path, server: LoopbackServer) -> None:
    from tests.fakehub import FakeHub, make_tar

    hub = FakeHub(server)
    image = make_image(300, 280, seed=4)
    hub.add("pixparse/cc12m-wds", "cc12m-train-0000.tar", make_tar([("k1.jpg", image), ("k1.txt", b"first edition")]))
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0"}
    args = ("--allow-private-networks", "--dataset", "cc12m", "--out", tmp_path / "o", "--keep-archives")
    assert run_fetch(*args, env=env).returncode == 0
    # the file changes upstream: its unit is redone, and from the new file, not the kept copy
    hub.add("pixparse/cc12m-wds", "cc12m-train-0000.tar", make_tar([("k1.jpg", image), ("k1.txt", b"second edition")]))
    proc = run_fetch(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert [r["caption"] for r in read_mds(tmp_path / "o" / "mds")] == ["second edition"]
    kept = tmp_path / "o" / "_archives" / "cc12m"
    assert sorted(p.name for p in kept.iterdir()) == ["cc12m-train-0000.tar", "cc12m-train-0000.tar.edition"]


def test_seen_urls_agree_with_a_set() -> None:
    """The 16-bytes-a-URL dedup set against Python's own, batch by batch, with repeats inside
    and across batches and sliced Arrow arrays."""
    import random

    from fastfetch.urlset import SeenUrls, trimmed

    rng = random.Random(1)
    seen, reference = SeenUrls(), set()
    for _ in range(40):
        urls = [f"http://h.example/{rng.randrange(2000)}" for _ in range(rng.randrange(1, 400))]
        got = seen.first_seen(trimmed(pa.array(["x", "y"] + urls).slice(2))).tolist()
        want = []
        for url in urls:
            want.append(url not in reference)
            reference.add(url)
        assert got == want
    assert len(seen) == len(reference)


def test_units_whose_objects_disappeared_are_redone(tmp_path: Path, server: LoopbackServer, s3: dict[str, str]) -> None:
    import boto3

    from tests.conftest import fetch_env, flaky, make_image, serve_numbered
    from tests.test_scaleout import _remote_rows

    rows = serve_numbered(server, "/g", 9)
    state, server.routes["/g/4.jpg"] = flaky(make_image(300, 300, seed=4))  # unit 00001 gets a retry unit
    listing = write_list(tmp_path / "l.parquet", rows)
    args = (
        "--dataset",
        "urls",
        "--urls",
        listing,
        "--out",
        "s3://data/gone",
        "--local-cache",
        tmp_path / "cache",
        "--unit-size",
        "3",
        *NET,
    )
    assert run_fetch(*args, "--retries", "0", env=fetch_env(**s3)).returncode == 0
    state["down"] = False
    assert run_fetch(*args, "--retry-failed", env=fetch_env(**s3)).returncode == 0
    bucket = boto3.client(
        "s3",
        endpoint_url=s3["S3_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    bucket.delete_object(Bucket="data", Key="gone/mds/00001/shard.00000.mds")  # a lifecycle rule, a hand cleanup
    proc = run_fetch(*args, env=fetch_env(**s3))
    assert proc.returncode == 0 and "unit 00001" in proc.stderr, proc.stderr
    got = _remote_rows(s3, "s3://data/gone/mds", tmp_path / "read")
    assert sorted(r["caption"] for r in got) == sorted(f"c{i}" for i in range(9))  # the retry's row once, with its unit
