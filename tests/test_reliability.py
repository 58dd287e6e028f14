"""Hostile servers, hostile inputs, crashes, signals and full disks (issue 6)."""

from __future__ import annotations

import asyncio
import gzip
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from fastfetch.http import BlockedAddress, FetchConfig, Fetcher, GuardedResolver, is_public_address
from tests.conftest import FETCH, LoopbackServer, fetch_env, flaky, make_image, read_mds, run_fetch, serve_numbered, start_fetch
from tests.test_fetch_urls import stats_of, write_list

NET = ("--allow-private-networks", "--workers", "2")


# -- the chaos server ---------------------------------------------------------------------------
def _stream(chunks: list[bytes], delay: float, headers: dict[str, str] | None = None, close: bool = False):
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg", **(headers or {})})
        await resp.prepare(request)
        for chunk in chunks:
            await resp.write(chunk)
            await asyncio.sleep(delay)
        if close and request.transport is not None:
            request.transport.close()
        return resp

    return handler


async def _endless(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
    await resp.prepare(request)
    block = b"\xff" * 65536
    for _ in range(100_000):
        await resp.write(block)
    return resp


def _sequence(*responses: web.Response | bytes):
    """Answer the n-th request with the n-th response (the last one repeats)."""
    calls = {"n": 0}

    async def handler(request: web.Request) -> web.Response:
        i = min(calls["n"], len(responses) - 1)
        calls["n"] += 1
        r = responses[i]
        return (
            web.Response(body=r, content_type="image/jpeg")
            if isinstance(r, bytes)
            else web.Response(status=r.status, headers=r.headers)
        )

    return handler


def test_chaos_server(tmp_path: Path, server: LoopbackServer) -> None:
    good = make_image(500, 400, seed=1)
    u = server.url
    gzip_bomb = gzip.compress(b"\0" * (64 << 20))
    server.routes.update(
        {
            "/good.jpg": good,
            "/trickle": _stream([good[i : i + 100] for i in range(0, 2000, 100)], 0.4),  # slow-loris: beats the total timeout
            "/stall": _stream([good[:1000]], 10),  # stalls past the read timeout
            "/burst": _sequence(web.Response(status=503), web.Response(status=502), web.Response(status=500), good),
            "/busy": _sequence(web.Response(status=429), good),  # 429 without Retry-After: backoff
            "/busy-ra": _sequence(web.Response(status=429, headers={"Retry-After": "1"}), good),
            "/r1": _redirect("/r2"),
            "/r2": _redirect("/r3"),
            "/r3": _redirect("/good.jpg"),  # a chain that ends well
            "/loop-a": _redirect("/loop-b"),
            "/loop-b": _redirect("/loop-a"),
            "/to-file": _redirect("file:///etc/passwd"),
            "/to-js": _redirect("javascript:alert(1)"),
            "/long-cl": _stream([good[:3000]], 0, {"Content-Length": str(len(good) + 5000)}, close=True),
            "/short-cl": _stream([good], 0, {"Content-Length": "3000"}),
            "/gzip-bomb": _stream([gzip_bomb], 0, {"Content-Encoding": "gzip", "Content-Length": str(len(gzip_bomb))}),
            "/endless": _endless,
            "/html": _stream([b"<!doctype html><html>" + b"x" * 5000], 0),
            "/trunc.jpg": good[:-2000],
            "/huge.png": _bomb_png(),
            "/cmyk.jpg": make_image(600, 500, "JPEG", "CMYK"),
            "/i16.png": make_image(600, 500, "PNG", "I;16"),
            "/pa.png": make_image(600, 500, "PNG", "P", transparency=0),
            "/anim.gif": _animated(),
        }
    )
    good_rows = ["/good.jpg", "/burst", "/busy", "/busy-ra", "/r1", "/cmyk.jpg", "/i16.png", "/pa.png", "/anim.gif"]
    rows = [{"url": u(p), "caption": f"good {p}"} for p in good_rows]
    rows.append({"url": u("/good.jpg") + "?long", "caption": "é" * 1_000_000})  # megabyte caption
    bad = {
        "/trickle": "timeout",
        "/stall": "timeout",
        "/loop-a": "too_many_redirects",
        "/to-file": "bad_scheme",
        "/to-js": "bad_scheme",
        "/long-cl": "connection",
        "/short-cl": "decode_error",
        "/gzip-bomb": "too_large",
        "/endless": "too_large",
        "/html": "not_an_image",
        "/trunc.jpg": "decode_error",
        "/huge.png": "decompression_bomb",
    }
    rows += [{"url": u(p), "caption": "bad"} for p in bad]
    listing = tmp_path / "list.jsonl"
    lines = [orjson.dumps(r) for r in rows] + [b"{not json", b'["a list"]', orjson.dumps(rows[0])]
    listing.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    proc = run_fetch(
        "--dataset",
        "urls",
        "--urls",
        listing,
        "--out",
        out,
        "--timeout",
        "3",
        "--retries",
        "3",
        "--max-bytes",
        str(4 << 20),
        *NET,
    )
    assert proc.returncode == 0, proc.stderr
    stats = stats_of(out)
    expected: dict[str, int] = {"malformed_row": 2, "duplicate_url": 1}
    for reason in bad.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert stats["rejected"] == expected
    stored = read_mds(out / "mds")
    assert stats["kept"] == len(stored) == len(good_rows) + 1
    assert {r["caption"] for r in stored} == {f"good {p}" for p in good_rows} | {"é" * 1_000_000}
    assert server.hits["/burst"] == 4 and server.hits["/busy"] == 2


def _redirect(target: str):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": target})

    return handler


def _bomb_png() -> bytes:
    import zlib

    png = make_image(300, 300, "PNG")
    ihdr = b"IHDR" + (50000).to_bytes(4, "big") * 2 + png[24:29]
    return png[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + png[33:]


def _animated() -> bytes:
    import io

    from PIL import Image

    frames = [Image.new("RGB", (400, 300), c) for c in ((200, 0, 0), (0, 200, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def test_non_utf8_and_odd_csv_rows(tmp_path: Path, server: LoopbackServer) -> None:
    server.routes["/a.jpg"] = make_image(400, 300)
    server.routes["/b.jpg"] = make_image(400, 300, seed=2)
    listing = tmp_path / "list.csv"
    listing.write_bytes(
        b"url,caption\n"
        + f"{server.url('/a.jpg')},caf\xe9 latin-1\n".encode("latin-1")
        + f'"{server.url("/b.jpg")}","a caption, with a comma\nand a newline"\n'.encode()
        + b"not a url,caption\n,\n"
    )
    out = tmp_path / "out"
    proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", out, *NET)
    assert proc.returncode == 0, proc.stderr
    captions = sorted(r["caption"] for r in read_mds(out / "mds"))
    assert captions == ["a caption, with a comma\nand a newline", "caf\ufffd latin-1"]
    assert stats_of(out)["rejected"] == {"invalid_url": 2}


# -- SSRF ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("224.0.0.1", False),
        ("0.0.0.0", False),
        ("240.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("ff02::1", False),
        ("fe80::1%eth0", False),
    ],
)
def test_address_classification(address: str, public: bool) -> None:
    assert is_public_address(address) is public


def test_resolver_refuses_private_answers_even_when_dns_changes() -> None:
    answers = iter([["93.184.216.34"], ["127.0.0.1"], ["10.0.0.5", "93.184.216.34"]])

    class Flipping:
        async def resolve(self, host: str, port: int, family: int) -> list[dict]:
            return [{"hostname": host, "host": a, "port": port, "family": 2, "proto": 0, "flags": 0} for a in next(answers)]

        async def close(self) -> None:
            pass

    async def go() -> None:
        resolver = GuardedResolver()
        resolver._inner = Flipping()  # type: ignore[assignment]
        assert [a["host"] for a in await resolver.resolve("example.test", 80)] == ["93.184.216.34"]
        with pytest.raises(BlockedAddress):
            await resolver.resolve("example.test", 80)  # the same name now points inside
        assert [a["host"] for a in await resolver.resolve("example.test", 80)] == ["93.184.216.34"]

    asyncio.run(go())


def test_redirect_to_private_address_is_refused(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """127.0.0.1 plays a public host here; its redirect to 127.0.0.2 (private) must be refused."""
    import fastfetch.http as http

    monkeypatch.setattr(http, "is_public_address", lambda a: a == "127.0.0.1")
    server.routes["/img.jpg"] = make_image(300, 300)
    server.routes["/go-inside"] = _redirect(f"http://127.0.0.2:{server.port}/img.jpg")
    server.routes["/go-localhost"] = _redirect(f"http://localhost:{server.port}/img.jpg")

    async def go() -> list[str | None]:
        async with Fetcher(FetchConfig(retries=0)) as fetcher:
            results = [await fetcher.fetch(server.url(p)) for p in ("/img.jpg", "/go-inside", "/go-localhost")]
        return [r.reason for r in results]

    assert asyncio.run(go()) == [None, "private_address", "private_address"]
    assert server.hits["/img.jpg"] == 1


# -- bounded resources --------------------------------------------------------------------------
def _tree_rss_mb(pid: int) -> tuple[float, float]:
    """(RSS of the process, largest RSS of one of its children) in MB, read from /proc."""

    def rss(p: int) -> float:
        try:
            with open(f"/proc/{p}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
        except (OSError, StopIteration):
            return 0.0

    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    return rss(pid), max((rss(c) for c in children), default=0.0)


def test_memory_and_sockets_stay_bounded(tmp_path: Path, server: LoopbackServer) -> None:
    """256 requests in flight (counted on the server) against slow and endless bodies with
    --max-inflight-mb 256: the process stays within the README's 0.2 GB + 2 × 256 MB, each resize
    worker under 150 MB (both measured from outside, /proc), sockets under --concurrency plus a
    margin, and every good image is kept."""
    good = make_image(500, 400)
    in_flight = {"now": 0, "peak": 0}

    def counted(handler):  # type: ignore[no-untyped-def]
        async def wrapped(request: web.Request) -> web.StreamResponse:
            in_flight["now"] += 1
            in_flight["peak"] = max(in_flight["peak"], in_flight["now"])
            try:
                return await handler(request)
            finally:
                in_flight["now"] -= 1

        return wrapped

    slow = _stream([good[i : i + 4096] for i in range(0, len(good), 4096)], 0.3)
    for i in range(150):
        server.routes[f"/e{i}"] = counted(_endless)
        server.routes[f"/s{i}"] = counted(slow)
    rows = [{"url": server.url(f"/{k}{i}"), "caption": "c"} for i in range(150) for k in ("e", "s")]
    listing = write_list(tmp_path / "list.parquet", rows)
    out = tmp_path / "out"
    proc = start_fetch(
        "--dataset",
        "urls",
        "--urls",
        listing,
        "--out",
        out,
        "--concurrency",
        "256",
        "--per-host",
        "256",
        "--max-bytes",
        str(16 << 20),
        "--max-inflight-mb",
        "256",
        "--timeout",
        "60",
        *NET,
    )
    peak_fds, peak_rss, peak_worker = 0, 0.0, 0.0
    while proc.poll() is None:
        try:
            peak_fds = max(peak_fds, len(os.listdir(f"/proc/{proc.pid}/fd")))
        except FileNotFoundError:
            break
        rss, worker = _tree_rss_mb(proc.pid)
        peak_rss, peak_worker = max(peak_rss, rss), max(peak_worker, worker)
        time.sleep(0.1)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    stats = stats_of(out)
    assert stats["kept"] == 150
    assert set(stats["rejected"]) <= {"too_large", "memory_limit"} and sum(stats["rejected"].values()) == 150
    assert 200 <= in_flight["peak"] <= 256, in_flight  # the requests were really in flight together, and no more
    assert 0 < peak_rss < 200 + 2 * 256 and stats["this_run"]["peak_rss_mb"] < 200 + 2 * 256, (peak_rss, stats["this_run"])
    assert 0 < peak_worker < 150 and 0 < stats["this_run"]["peak_worker_rss_mb"] < 150, peak_worker
    assert peak_fds < 256 + 64


# -- signals -------------------------------------------------------------------------------------
def _slow_list(tmp_path: Path, server: LoopbackServer, n: int, delay: float) -> Path:
    return write_list(tmp_path / "l.parquet", serve_numbered(server, "/s", n, delay))


def _wait_hits(server: LoopbackServer, proc: subprocess.Popen, n: int) -> None:
    deadline = time.monotonic() + 60
    while sum(server.hits.values()) < n:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)


def test_sigterm_exits_143_and_second_ctrl_c_exits_at_once(tmp_path: Path, server: LoopbackServer) -> None:
    listing = _slow_list(tmp_path, server, 80, 0.3)
    out = tmp_path / "o"
    args = ("--dataset", "urls", "--urls", listing, "--out", out, "--unit-size", "10", "--concurrency", "4", *NET)
    proc = start_fetch(*args)
    _wait_hits(server, proc, 12)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    # the graceful stop: units rolled back, index and stats.json published, the summary printed
    assert proc.returncode == 143 and "rolling back" in err and "fastfetch: interrupted" in err, err
    graceful = (out / "stats.json").read_bytes()
    assert orjson.loads(graceful)["status"] == "interrupted" and (out / "mds" / "index.json").exists()

    # A second run whose graceful stop takes a while: its one worker is busy with 16-megapixel
    # images and finishes the one it is on before it stops. Ctrl-C, then Ctrl-C again.
    heavy = make_image(4000, 4000, "PNG")
    for i in range(20):
        server.routes[f"/heavy/{i}.png"] = heavy
    heavy_list = write_list(
        tmp_path / "heavy.jsonl", [{"url": server.url(f"/heavy/{i}.png"), "caption": f"h{i}"} for i in range(20)]
    )
    out = tmp_path / "o2"
    heavy_args = (
        "--dataset",
        "urls",
        "--urls",
        heavy_list,
        "--out",
        out,
        "--unit-size",
        "10",
        "--concurrency",
        "4",
        "--allow-private-networks",
        "--workers",
        "1",
    )
    proc = start_fetch(*heavy_args)
    _wait_hits(server, proc, sum(server.hits.values()) + 6)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    # the second Ctrl-C leaves at once: nothing published, no summary (the manifest is consistent)
    assert proc.returncode == 130, err
    assert "fastfetch:" not in err and not (out / "stats.json").exists(), err
    db = sqlite3.connect(out / "manifest.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    rerun = run_fetch(*heavy_args)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(r["caption"] for r in read_mds(out / "mds")) == sorted(f"h{i}" for i in range(20))


# -- crash consistency --------------------------------------------------------------------------
def _done_units(out: Path) -> int:
    """Done units in the manifest (read-only; retried while a killed writer's WAL is recovered)."""
    if not (out / "manifest.sqlite").exists():
        return 0
    for _ in range(50):
        try:
            db = sqlite3.connect(out / "manifest.sqlite", timeout=10)
            try:
                return db.execute("SELECT COUNT(*) FROM units WHERE state='done'").fetchone()[0]
            finally:
                db.close()
        except sqlite3.OperationalError:  # killed during start-up: no table yet
            time.sleep(0.05)
    return 0


def _kill_when(proc: subprocess.Popen, seen: Callable[[], bool], limit: float, every: float = 0.0002) -> bool:
    """SIGKILL ``proc`` the moment ``seen()`` holds (polled every ``every`` s); False if it
    ended or ``limit`` seconds passed first."""
    deadline = time.monotonic() + limit
    while proc.poll() is None and time.monotonic() < deadline:
        if seen():
            proc.kill()
            proc.wait()
            return True
        time.sleep(every)
    return False


def _rows(out: Path) -> list[tuple]:
    from tests.conftest import jpeg_bytes

    return sorted((r["key"], r["caption"], r["width"], r["height"], jpeg_bytes(r["jpg"])) for r in read_mds(out / "mds"))


@pytest.mark.slow
def test_sigkill_at_random_moments_converges_to_the_uninterrupted_dataset(tmp_path: Path, server: LoopbackServer) -> None:
    """SIGKILL at random moments (start-up, planning, mid-unit), the moment a unit's folder is
    renamed into place (between the rename and the manifest's commit), and during the final
    index write; the work must progress between kills, and the dataset that results is the
    uninterrupted one byte for byte."""
    # ~20 s of work in 40 units, so that every kill lands before the job is done
    rows = serve_numbered(server, "/k", 400, delay=0.2, variety=6)
    rows += [{"url": server.url("/missing.jpg"), "caption": "dead"}]
    listing = write_list(tmp_path / "l.parquet", rows)
    args = ("--dataset", "urls", "--urls", listing, "--unit-size", "10", "--concurrency", "4", *NET)

    clean = tmp_path / "clean"
    assert run_fetch(*args, "--out", clean).returncode == 0
    reference = _rows(clean)

    out = tmp_path / "killed"
    rng = random.Random(7)
    done_after: list[int] = []
    for _ in range(2):  # during start-up and planning
        proc = start_fetch(*args, "--out", out)
        time.sleep(rng.uniform(0.1, 0.6))
        proc.kill()
        proc.wait()
        done_after.append(_done_units(out))
    for _ in range(6):  # mid-unit, a random moment after this run finished a unit of its own
        before = _done_units(out)
        proc = start_fetch(*args, "--out", out)
        assert _kill_when(proc, lambda: _done_units(out) > before, 60, every=0.01), "no unit finished"
        time.sleep(rng.uniform(0.0, 0.8))
        proc.kill()
        proc.wait()
        done_after.append(_done_units(out))
    for _ in range(4):  # the moment a new unit folder appears: its commit is in flight
        before = {p.name for p in (out / "mds").iterdir()} if (out / "mds").is_dir() else set()
        proc = start_fetch(*args, "--out", out)
        assert _kill_when(proc, lambda: bool({p.name for p in (out / "mds").iterdir()} - before - {"_tmp"}), 60)
        done_after.append(_done_units(out))
    assert done_after == sorted(done_after) and len(set(done_after)) >= 7, done_after  # progress between kills
    assert done_after[-1] < 40, done_after  # the kills all landed before the work was done

    hit = 0
    for _ in range(20):  # a complete dataset's every run ends with the merge: kill it while it writes
        proc = start_fetch(*args, "--out", out)
        _kill_when(proc, lambda: any(p.name.startswith(".index.") for p in (out / "mds").iterdir()), 120)
        leftovers = [p for p in (out / "mds").iterdir() if p.name.startswith(".index.")]
        hit += bool(leftovers)
        if hit >= 2:
            break
    assert hit >= 2, "no kill landed inside the index write"

    final = run_fetch(*args, "--out", out)
    assert final.returncode == 0, final.stderr
    assert not [p for p in (out / "mds").iterdir() if p.name.startswith(".index.")]  # a killed write's leftovers go
    assert _rows(out) == reference
    assert stats_of(out)["kept"] == len(reference) and stats_of(out)["rejected"] == {"http_404": 1}
    _validate_shards(out / "mds")


def _validate_shards(root: Path) -> None:
    """Every shard listed in the merged index exists with the recorded size and xxh64 hash."""
    import xxhash

    index = orjson.loads((root / "index.json").read_bytes())
    for shard in index["shards"]:
        raw = shard["raw_data"]
        data = (root / raw["basename"]).read_bytes()
        assert len(data) == raw["bytes"]
        assert xxhash.xxh64(data).hexdigest() == raw["hashes"]["xxh64"]


# -- disk full -----------------------------------------------------------------------------------
_FULL_DISK = r"""
import json, shutil, sqlite3, subprocess, sys
mount, out, keep, *fetch = sys.argv[1:]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mount], check=True)
first = subprocess.run(fetch, capture_output=True, text=True)
db = sqlite3.connect(f"{out}/manifest.sqlite")
integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
done = db.execute("SELECT COUNT(*) FROM units WHERE state='done'").fetchone()[0]
db.close()
subprocess.run(["mount", "-o", "remount,size=64m", mount], check=True)
second = subprocess.run(fetch, capture_output=True, text=True)
shutil.copytree(f"{out}/mds", keep)  # the tmpfs goes with this namespace
print(json.dumps({"first": [first.returncode, first.stderr], "integrity": integrity, "done": done,
                  "second": [second.returncode, second.stderr]}))
"""


def test_disk_full_stops_clearly_and_resumes_after_space_is_freed(tmp_path: Path, server: LoopbackServer) -> None:
    """In a mount namespace of its own (a user namespace too, so no root is needed): a 3 MB
    tmpfs fills up, then grows to 64 MB and the same command finishes."""
    n = 40
    for i in range(n):
        server.routes[f"/d/{i}.jpg"] = make_image(500, 480, seed=i, quality=100)  # ~150 KB each: ~6 MB in all
    listing = write_list(tmp_path / "l.parquet", [{"url": server.url(f"/d/{i}.jpg"), "caption": f"c{i}"} for i in range(n)])
    mount = tmp_path / "small"
    mount.mkdir()
    out = mount / "out"
    fetch = [
        sys.executable,
        str(FETCH),
        "--no-progress",
        "--dataset",
        "urls",
        "--urls",
        str(listing),
        "--out",
        str(out),
        "--unit-size",
        "5",
        *NET,
    ]
    proc = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            sys.executable,
            "-c",
            _FULL_DISK,
            str(mount),
            str(out),
            str(tmp_path / "kept"),
            *fetch,
        ],
        capture_output=True,
        text=True,
        env=fetch_env(),
        timeout=300,
    )
    if proc.returncode != 0 and "unshare" in proc.stderr and os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip(f"no user namespaces here to mount a small tmpfs in: {proc.stderr.strip()}")  # never in CI
    assert proc.returncode == 0, proc.stderr
    got = orjson.loads(proc.stdout)
    code, err = got["first"]
    assert code == 1, err
    assert "no space left on the device holding" in err and str(out) in err
    assert "MB are needed" in err and "Traceback" not in err
    assert got["integrity"] == "ok" and 0 < got["done"] < 8
    assert got["second"][0] == 0, got["second"][1]
    assert sorted(r["caption"] for r in read_mds(tmp_path / "kept")) == sorted(f"c{i}" for i in range(n))


# -- --retry-failed ------------------------------------------------------------------------------
def test_retry_failed_refetches_only_transient_failures(tmp_path: Path, server: LoopbackServer) -> None:
    good = make_image(400, 300)
    state, down_then_good = flaky(good)
    for i in range(12):
        server.routes[f"/ok/{i}.jpg"] = good
    for i in range(4):
        server.routes[f"/flaky/{i}.jpg"] = down_then_good
    rows = [{"url": server.url(f"/ok/{i}.jpg"), "caption": f"ok{i}"} for i in range(12)]
    rows += [{"url": server.url(f"/flaky/{i}.jpg"), "caption": f"flaky{i}"} for i in range(4)]
    rows += [{"url": server.url("/gone.jpg"), "caption": "404 is not transient"}]
    listing = write_list(tmp_path / "l.jsonl", rows)
    out = tmp_path / "o"
    args = ("--dataset", "urls", "--urls", listing, "--out", out, "--retries", "0", "--unit-size", "6", *NET)
    assert run_fetch(*args).returncode == 0
    assert stats_of(out)["rejected"] == {"http_5xx": 4, "http_404": 1}
    state["down"] = False
    before = dict(server.hits)
    proc = run_fetch(*args, "--retry-failed")
    assert proc.returncode == 0, proc.stderr
    changed = {p for p in server.hits if server.hits[p] != before.get(p, 0)}
    assert changed == {f"/flaky/{i}.jpg" for i in range(4)}
    stats = stats_of(out)
    assert stats["kept"] == 16 and stats["rejected"] == {"http_404": 1}
    assert sorted(r["caption"] for r in read_mds(out / "mds")) == sorted(
        [f"ok{i}" for i in range(12)] + [f"flaky{i}" for i in range(4)]
    )
    # Nothing left to retry: a second --retry-failed fetches nothing.
    before = dict(server.hits)
    assert run_fetch(*args, "--retry-failed").returncode == 0
    assert dict(server.hits) == before


# -- secrets -------------------------------------------------------------------------------------
def test_tokens_never_reach_logs_stats_or_manifest(tmp_path: Path, server: LoopbackServer) -> None:
    """Secrets from the environment and in URLs, on every path that could carry them: a URL
    list that fails to download, list rows whose URLs fail transiently (remembered for
    --retry-failed), and a Hugging Face download sent with the bearer token that is refused
    (the unit's error is stored). Every file under OUT is searched, but the plan's copy of the
    user's own list (README: Reliability, secrets)."""
    from tests.conftest import fetch_env
    from tests.fakehub import FakeHub, make_tar

    token = "hf_" + "s3cr3t" * 6
    aws = "aws-secret-value-123"
    env = fetch_env(HF_TOKEN=token, AWS_SECRET_ACCESS_KEY=aws)

    async def echo(request: web.Request) -> web.Response:  # a server that puts what it got in its answer
        return web.Response(status=503, text=f"echo {request.headers.get('Authorization')} {request.query_string}")

    server.routes["/list.txt"] = echo
    server.routes["/a.jpg"] = echo
    out = tmp_path / "o"
    proc = run_fetch(
        "--dataset",
        "urls",
        "--urls",
        server.url("/list.txt") + f"?sig={token}&X-Amz-Signature={aws}",
        "--out",
        out,
        *NET,
        env=env,
    )
    assert proc.returncode == 2 and "cannot download the URL list" in proc.stderr
    listing = write_list(tmp_path / "l.jsonl", [{"url": server.url("/a.jpg") + f"?token={token}&k={aws}", "caption": "c"}])
    proc2 = run_fetch("--dataset", "urls", "--urls", listing, "--out", out, "--retries", "0", *NET, env=env)
    assert proc2.returncode == 0 and stats_of(out)["rejected"] == {"http_5xx": 1}  # remembered for --retry-failed

    hub = FakeHub(server)
    hub.add("pixparse/cc12m-wds", "cc12m-train-0000.tar", make_tar([("k.jpg", b"x")]))
    hub.gate("pixparse/cc12m-wds", "hf_another_token_that_is_wrong_0000")  # our token is refused: 403
    proc3 = run_fetch(
        "--allow-private-networks",
        "--dataset",
        "cc12m",
        "--out",
        tmp_path / "hub",
        env=fetch_env(HF_TOKEN=token, HF_ENDPOINT=hub.endpoint),
    )
    assert proc3.returncode == 2 and "no access to the Hugging Face dataset" in proc3.stderr
    assert any(h.get("Authorization") == f"Bearer {token}" for _, h in server.requests)  # the bearer path ran

    for text in (proc.stdout, proc.stderr, proc2.stdout, proc2.stderr, proc3.stdout, proc3.stderr):
        assert token not in text and aws not in text
    for root in (out, tmp_path / "hub"):
        for path in root.rglob("*"):
            if path.is_file() and not (path.parent.name == "urls" and path.parent.parent.name == "_work"):
                data = path.read_bytes()
                assert token.encode() not in data and aws.encode() not in data, path
