"""README promises that had no test of their own (issue 15): each flag or behaviour the README
states, shown to hold on a loopback server, with what the server saw as the evidence."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from fastfetch.http import FetchConfig, Fetcher, GuardedResolver
from tests.conftest import LoopbackServer, fetch_env, make_image, read_mds, run_fetch, serve_numbered
from tests.fakehub import FakeHub, file_handler, make_tar
from tests.test_fetch_urls import stats_of, write_list

NET = ("--allow-private-networks", "--workers", "2")


def _fetched_once(server: LoopbackServer, prefix: str, n: int) -> None:
    assert {p: c for p, c in server.hits.items() if p.startswith(prefix)} == {f"{prefix}/{i}.jpg": 1 for i in range(n)}


# -- selection grows, settings do not change --------------------------------------------------------
def test_a_growing_limit_and_subset_fetch_only_what_is_new(tmp_path: Path, server: LoopbackServer) -> None:
    listing = write_list(tmp_path / "l.parquet", serve_numbered(server, "/g", 30))
    base = ("--dataset", "urls", "--urls", listing, "--unit-size", "3", *NET)
    for limit in ("4", "13", "30"):  # a larger --limit: the new rows, and the last unit it had cut short
        assert run_fetch(*base, "--out", tmp_path / "limit", "--limit", limit).returncode == 0
    twice = {"/g/3.jpg", "/g/12.jpg"}  # unit 00001 held row 3 alone under --limit 4, unit 00004 row 12 under 13
    assert {p: c for p, c in server.hits.items() if p.startswith("/g")} == {
        f"/g/{i}.jpg": 2 if f"/g/{i}.jpg" in twice else 1 for i in range(30)
    }
    assert sorted(r["caption"] for r in read_mds(tmp_path / "limit" / "mds")) == sorted(f"c{i}" for i in range(30))

    server.hits.clear()
    for subset in ("small", "all"):  # --subset all after small: only the units small left out
        assert run_fetch(*base, "--out", tmp_path / "subset", "--subset", subset).returncode == 0
        if subset == "small":
            _fetched_once(server, "/g", 3)  # every 100th unit: unit 0
    _fetched_once(server, "/g", 30)


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--quality", "90", "quality: 95 → 90"),
        ("--resize-filter", "lanczos", "resize_filter: 'bicubic' → 'lanczos'"),
        ("--min-size", "300", "min_size: 256 → 300"),
    ],
)
def test_settings_that_change_a_unit_are_refused(
    tmp_path: Path, server: LoopbackServer, flag: str, value: str, says: str
) -> None:
    listing = write_list(tmp_path / "l.jsonl", serve_numbered(server, "/q", 2))
    args = ("--dataset", "urls", "--urls", listing, "--out", tmp_path / "o", *NET)
    assert run_fetch(*args).returncode == 0
    proc = run_fetch(*args, flag, value)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr


# -- network flags ----------------------------------------------------------------------------------
def _redirect(target: str):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": target})

    return handler


def test_max_redirects_and_user_agent(tmp_path: Path, server: LoopbackServer) -> None:
    server.routes["/img.jpg"] = make_image(400, 300)
    server.routes["/r1"], server.routes["/r2"], server.routes["/r3"] = _redirect("/r2"), _redirect("/r3"), _redirect("/img.jpg")
    listing = write_list(tmp_path / "l.jsonl", [{"url": server.url("/r1"), "caption": "three hops"}])
    agent = "example-bot/1.0 (+mailto:data@example.org)"
    args = ("--dataset", "urls", "--urls", listing, *NET, "--user-agent", agent)
    assert run_fetch(*args, "--out", tmp_path / "two", "--max-redirects", "2").returncode == 0
    assert stats_of(tmp_path / "two")["rejected"] == {"too_many_redirects": 1} and server.hits["/img.jpg"] == 0
    assert run_fetch(*args, "--out", tmp_path / "three", "--max-redirects", "3").returncode == 0
    assert stats_of(tmp_path / "three")["kept"] == 1 and server.hits["/img.jpg"] == 1
    assert {h.get("User-Agent") for _, h in server.requests} == {agent}


def test_concurrency_and_per_host_bound_the_requests_in_flight(tmp_path: Path, server: LoopbackServer) -> None:
    """Counted on the server, per Host header: two host names of the same server."""
    image = make_image(300, 300)
    now: dict[str, int] = {}
    peak: dict[str, int] = {}

    async def slow(request: web.Request) -> web.Response:
        host = request.host.split(":")[0]
        now[host] = now.get(host, 0) + 1
        peak[host] = max(peak.get(host, 0), now[host])
        peak["all"] = max(peak.get("all", 0), sum(now.values()))
        try:
            await asyncio.sleep(0.3)
            return web.Response(body=image, content_type="image/jpeg")
        finally:
            now[host] -= 1

    rows = []
    for i in range(24):
        server.routes[f"/p/{i}.jpg"] = slow
        host = "127.0.0.1" if i % 2 else "localhost"
        rows.append({"url": f"http://{host}:{server.port}/p/{i}.jpg", "caption": f"c{i}"})
    listing = write_list(tmp_path / "l.jsonl", rows)
    args = ("--dataset", "urls", "--urls", listing, *NET)
    assert run_fetch(*args, "--out", tmp_path / "a", "--concurrency", "5", "--per-host", "16").returncode == 0
    assert peak["all"] == 5, peak
    peak.clear()
    assert run_fetch(*args, "--out", tmp_path / "b", "--concurrency", "20", "--per-host", "3").returncode == 0
    assert peak["localhost"] == 3 and peak["127.0.0.1"] == 3 and peak["all"] == 6, peak


def test_a_name_that_resolves_inside_is_refused_through_the_fetcher(server: LoopbackServer) -> None:
    """End to end through Fetcher.fetch (not the resolver alone): a name whose DNS answer is a
    private address is refused, and the server never sees a request."""
    server.routes["/a.jpg"] = make_image(300, 300)

    class Inside:
        async def resolve(self, host: str, port: int = 0, family: int = 2) -> list[dict]:
            return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": 2, "proto": 0, "flags": 0}]

        async def close(self) -> None:
            pass

    async def go() -> str | None:
        async with Fetcher(FetchConfig(retries=0)) as fetcher:
            assert isinstance(fetcher._resolver, GuardedResolver)
            fetcher._resolver._inner = Inside()  # type: ignore[assignment]
            return (await fetcher.fetch(f"http://images.inside.test:{server.port}/a.jpg")).reason

    assert asyncio.run(go()) == "private_address"
    assert server.hits["/a.jpg"] == 0


# -- buckets, splits, nodes -----------------------------------------------------------------------
def test_bucket_bounds_are_the_short_sides_given(tmp_path: Path, server: LoopbackServer) -> None:
    sides = {
        255: None,
        256: "short-0256",
        300: "short-0256",
        511: "short-0256",
        512: "short-0512",
        513: "short-0512",
        1200: "short-0512",
    }
    rows = []
    for short, _ in sides.items():
        server.routes[f"/b/{short}.png"] = make_image(short + 40, short, "PNG", seed=short)
        rows.append({"url": server.url(f"/b/{short}.png"), "caption": str(short)})
    listing = write_list(tmp_path / "l.jsonl", rows)
    out = tmp_path / "o"
    assert run_fetch("--dataset", "urls", "--urls", listing, "--out", out, "--buckets", "0,256,512", *NET).returncode == 0
    for bucket in ("short-0000", "short-0256", "short-0512"):
        got = sorted(int(r["caption"]) for r in read_mds(out / "mds" / bucket))
        assert got == sorted(s for s, b in sides.items() if b == bucket), bucket
    assert stats_of(out)["rejected"] == {"too_small": 1}


def test_textcaps_test_split_rows_count_as_no_caption(tmp_path: Path, server: LoopbackServer) -> None:
    rows = [
        {
            "image": {"bytes": make_image(300, 280, seed=i), "path": f"t{i}.jpg"},
            "image_id": f"t{i}",
            "reference_strs": None,
            "caption_str": None,
        }
        for i in range(3)
    ]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    hub = FakeHub(server)
    hub.add("lmms-lab/TextCaps", "data/test-00000-of-00001.parquet", sink.getvalue().to_pybytes())
    out = tmp_path / "o"
    proc = run_fetch(
        "--allow-private-networks",
        "--dataset",
        "textcaps",
        "--split",
        "test",
        "--out",
        out,
        env=fetch_env(HF_ENDPOINT=hub.endpoint),
    )
    assert proc.returncode == 0, proc.stderr
    assert stats_of(out)["kept"] == 0 and stats_of(out)["rejected"] == {"no_caption": 3}


def test_hf_revision_reads_the_pinned_revision(tmp_path: Path, server: LoopbackServer) -> None:
    """--hf-revision: the listing and every download come from the pinned tag, not from main."""
    hub = FakeHub(server)
    for revision, caption in (("main", "from main"), ("v1.0", "from the tag")):
        hub.add(
            "pixparse/cc12m-wds",
            "cc12m-train-0000.tar",
            make_tar([("k.jpg", make_image(300, 280)), ("k.txt", caption.encode())]),
            revision=revision,
        )
    out = tmp_path / "o"
    proc = run_fetch(
        "--allow-private-networks",
        "--dataset",
        "cc12m",
        "--out",
        out,
        "--hf-revision",
        "v1.0",
        env=fetch_env(HF_ENDPOINT=hub.endpoint),
    )
    assert proc.returncode == 0, proc.stderr
    assert [r["caption"] for r in read_mds(out / "mds")] == ["from the tag"]
    assert server.hits[hub.resolve_path("pixparse/cc12m-wds", "cc12m-train-0000.tar", "v1.0")] == 1
    assert server.hits[hub.resolve_path("pixparse/cc12m-wds", "cc12m-train-0000.tar")] == 0


@pytest.mark.parametrize(
    ("env", "flags", "expected"),
    [
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, {}, (2, 4)),
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "RANK": "1", "WORLD_SIZE": "3"}, {}, (1, 3)),  # torchrun first
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "RANK": "1", "WORLD_SIZE": "3"}, {"node_rank": 0, "num_nodes": 2}, (0, 2)),
        ({}, {}, (0, 1)),
    ],
)
def test_node_detection_and_its_precedence(
    monkeypatch: pytest.MonkeyPatch, env: dict, flags: dict, expected: tuple[int, int]
) -> None:
    from fastfetch.nodes import detect

    for name in ("SLURM_PROCID", "SLURM_NTASKS", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    node = detect(flags.get("node_rank"), flags.get("num_nodes"))
    assert (node.rank, node.count) == expected


# -- archives -------------------------------------------------------------------------------------
def test_an_archive_that_changes_upstream_fails_its_unit_then_is_redone_whole(tmp_path: Path, server: LoopbackServer) -> None:
    """The download breaks halfway; before it resumes the file is replaced upstream (new ETag):
    the unit fails (nothing of it is kept), and the next run does it whole, from the new file."""

    def shard(edition: str) -> bytes:
        return make_tar(
            [m for i in range(4) for m in ((f"k{i}.jpg", make_image(300, 280, seed=i)), (f"k{i}.txt", f"{edition} {i}".encode()))]
        )

    old, new = shard("old"), shard("new")
    hub = FakeHub(server)
    served = hub.add("pixparse/cc12m-wds", "cc12m-train-0000.tar", old, cut_at=len(old) // 2)
    cdn = next(p for p in server.routes if p.startswith("/cdn/pixparse/cc12m-wds/"))
    serve = file_handler(served)

    async def replaced_after_the_break(request: web.Request) -> web.StreamResponse:
        if served.cut_done and served.data is old:
            served.data, served.etag = new, '"v2"'
        return await serve(request)  # type: ignore[operator]

    server.routes[cdn] = replaced_after_the_break
    env = fetch_env(HF_ENDPOINT=hub.endpoint)
    out = tmp_path / "o"
    first = run_fetch("--allow-private-networks", "--dataset", "cc12m", "--out", out, env=env)
    assert first.returncode == 1 and "changed" in first.stderr, first.stderr
    assert stats_of(out)["failed_units"] and not (out / "mds" / "cc12m-train-0000").exists()
    second = run_fetch("--allow-private-networks", "--dataset", "cc12m", "--out", out, env=env)
    assert second.returncode == 0, second.stderr
    assert sorted(r["caption"] for r in read_mds(out / "mds")) == [f"new {i}" for i in range(4)]


def test_at_most_four_archives_are_spooled_at_once(tmp_path: Path, server: LoopbackServer) -> None:
    """A server without ranges makes every parquet unit spool its file; seven units, each file
    deleted when its unit is done, and never more than four on disk together."""
    import threading

    hub = FakeHub(server)
    for n in range(7):
        rows = [
            {
                "image": {"bytes": make_image(300, 280, seed=n * 10 + i), "path": f"{n}-{i}.jpg"},
                "image_id": f"{n}-{i}",
                "reference_strs": [f"caption {n} {i}"],
                "caption_str": None,
            }
            for i in range(3)
        ]
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        hub.add("lmms-lab/TextCaps", f"data/train-{n:05d}-of-00007.parquet", sink.getvalue().to_pybytes(), throttle=0.05)
    out = tmp_path / "o"
    spool = out / "_work" / "textcaps" / "spool"
    most, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                most[0] = max(most[0], sum(1 for p in spool.rglob("*.parquet*") if p.is_file()))
            except FileNotFoundError:  # a spool folder removed while it was being listed: look again
                pass
            stop.wait(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        proc = run_fetch(
            "--allow-private-networks",
            "--dataset",
            "textcaps",
            "--split",
            "train",
            "--out",
            out,
            env=fetch_env(HF_ENDPOINT=hub.endpoint),
        )
    finally:
        stop.set()
        watcher.join()
    assert proc.returncode == 0, proc.stderr
    assert stats_of(out)["kept"] == 21
    assert 1 <= most[0] <= 4, most
    assert not list(spool.rglob("*")) if spool.exists() else True


def test_remote_units_upload_their_index_last_and_count_only_once_uploaded(
    tmp_path: Path, server: LoopbackServer, s3: dict[str, str]
) -> None:
    """The order of the PUTs an S3 server receives: every unit's shards, then its index.json,
    and the merged index after all of them."""
    from tests.conftest import TcpProxy

    proxy = TcpProxy(int(s3["S3_ENDPOINT_URL"].rsplit(":", 1)[1]))
    listing = write_list(tmp_path / "l.parquet", serve_numbered(server, "/u", 9))
    env = fetch_env(**{**s3, "S3_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"})
    proc = run_fetch(
        "--dataset",
        "urls",
        "--urls",
        listing,
        "--out",
        "s3://data/order",
        "--local-cache",
        tmp_path / "c",
        "--unit-size",
        "3",
        *NET,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    keys = [r.split("/data/order/", 1)[1] for r in proxy.requests if r.startswith("PUT /data/order/")]
    for unit in ("00000", "00001", "00002"):
        mine = [i for i, k in enumerate(keys) if k.startswith(f"mds/{unit}/")]
        assert len(mine) >= 2 and keys[mine[-1]] == f"mds/{unit}/index.json", keys  # its shards, then its index
        assert keys.index("mds/index.json") > mine[-1]
