"""Object storage (a real S3 server, moto, on 127.0.0.1), several nodes, resolution buckets."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson

from tests.conftest import LoopbackServer, fetch_env, read_mds, run_fetch, serve_numbered, start_fetch
from tests.test_fetch_urls import _done_units, write_list

NET = ("--allow-private-networks", "--workers", "2")


def _corpus(server: LoopbackServer, n: int, delay: float = 0.0) -> list[dict[str, str]]:
    return serve_numbered(server, "/c", n, delay, variety=9)


def _remote_rows(env: dict[str, str], remote: str, cache: Path) -> list[dict]:
    """Read a remote MDS dataset back through streaming (in a subprocess: streaming's S3
    client reads the endpoint from the environment)."""
    code = (
        "import sys, orjson\n"
        "from streaming import StreamingDataset\n"
        "ds = StreamingDataset(remote=sys.argv[1], local=sys.argv[2], shuffle=False, batch_size=1)\n"
        "rows = [{k: (v.item() if hasattr(v, 'item') else v) for k, v in ds[i].items() if k != 'jpg'} for i in range(len(ds))]\n"
        "sys.stdout.buffer.write(orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, remote, str(cache)], capture_output=True, env={**os.environ, **env}, timeout=300
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return orjson.loads(proc.stdout)


def test_fetch_to_s3_and_read_back(tmp_path: Path, server: LoopbackServer, s3: dict[str, str]) -> None:
    rows = _corpus(server, 30)
    listing = write_list(tmp_path / "l.parquet", rows)
    cache = tmp_path / "cache"
    proc = run_fetch(
        "--dataset",
        "urls",
        "--urls",
        listing,
        "--out",
        "s3://data/plain",
        "--local-cache",
        cache,
        "--unit-size",
        "8",
        *NET,
        env=fetch_env(**s3),
    )
    assert proc.returncode == 0, proc.stderr
    got = _remote_rows(s3, "s3://data/plain/mds", tmp_path / "read")
    assert sorted(r["caption"] for r in got) == sorted(r["caption"] for r in rows)
    assert not list((cache / "mds").rglob("*.mds"))  # shards left the local cache once uploaded
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3["S3_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    stats = orjson.loads(client.get_object(Bucket="data", Key="plain/stats.json")["Body"].read())
    assert stats["kept"] == 30


def test_remote_fetch_resumes_after_sigkill(tmp_path: Path, server: LoopbackServer, s3: dict[str, str]) -> None:
    rows = _corpus(server, 80, delay=0.05)
    listing = write_list(tmp_path / "l.parquet", rows)
    cache = tmp_path / "cache"
    args = (
        "--dataset",
        "urls",
        "--urls",
        listing,
        "--out",
        "s3://data/resumed",
        "--local-cache",
        cache,
        "--unit-size",
        "8",
        "--concurrency",
        "4",
        *NET,
    )
    proc = start_fetch(*args, env=fetch_env(**s3))
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline
        if (cache / "manifest.sqlite").exists() and len(_done_units(cache)) >= 3:
            break
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    rerun = run_fetch(*args, env=fetch_env(**s3))
    assert rerun.returncode == 0, rerun.stderr
    got = _remote_rows(s3, "s3://data/resumed/mds", tmp_path / "read")
    keys = [r["key"] for r in got]
    assert len(keys) == len(set(keys)) == 80
    assert sorted(r["caption"] for r in got) == sorted(r["caption"] for r in rows)


def _dataset(rows: list[dict]) -> list[tuple]:
    return sorted((r["key"], r["caption"], r["width"], r["height"]) for r in rows)


def test_two_nodes_merge_to_the_single_node_dataset(tmp_path: Path, server: LoopbackServer) -> None:
    rows = _corpus(server, 50)
    listing = write_list(tmp_path / "l.jsonl", rows)
    base = ("--dataset", "urls", "--urls", listing, "--unit-size", "6", *NET)
    single = tmp_path / "single"
    assert run_fetch(*base, "--out", single).returncode == 0

    shared = tmp_path / "shared"
    # Node 1 through torchrun's variables, node 0 through flags: both ways are honoured. Node 1
    # finishes first, so node 0 (rank 0) finds every node complete and merges by itself.
    node1 = run_fetch(*base, "--out", shared, env=fetch_env(RANK="1", WORLD_SIZE="2"))
    assert node1.returncode == 0 and "once every node is done, run: bin/fetch --merge" in node1.stderr, node1.stderr
    assert not (shared / "mds" / "index.json").exists()  # nothing merged while node 0 is missing
    node0 = run_fetch(*base, "--out", shared, "--node-rank", "0", "--num-nodes", "2")
    assert node0.returncode == 0 and "merged 2 nodes" in node0.stderr, node0.stderr
    summaries = sorted(shared.glob("_nodes/*/summary.json"))
    assert [p.parent.name for p in summaries] == ["node-00-of-02", "node-01-of-02"]
    units = [set(orjson.loads(p.read_bytes())["dirs"]) for p in summaries]
    assert units[0] and units[1] and not units[0] & units[1]
    assert _dataset(read_mds(shared / "mds")) == _dataset(read_mds(single / "mds"))

    # the merge by hand (rank 0 finished before the others, or a third machine) gives the same
    (shared / "mds" / "index.json").unlink()
    (shared / "stats.json").unlink()
    merged = run_fetch("--merge", "--out", shared)
    assert merged.returncode == 0, merged.stderr
    assert _dataset(read_mds(shared / "mds")) == _dataset(read_mds(single / "mds"))
    stats = orjson.loads((shared / "stats.json").read_bytes())
    assert stats["kept"] == 50 and stats["incomplete_nodes"] == []
    # the settings a single node's stats.json records (encode/run.py reads the dataset from them)
    one = orjson.loads((single / "stats.json").read_bytes())["settings"]
    assert {k: v for k, v in stats["settings"].items() if k not in ("node_count", "dealing")} == one


def test_merge_reports_incomplete_nodes(tmp_path: Path, server: LoopbackServer) -> None:
    listing = write_list(tmp_path / "l.jsonl", _corpus(server, 12))
    shared = tmp_path / "shared"
    assert (
        run_fetch(
            "--dataset",
            "urls",
            "--urls",
            listing,
            "--unit-size",
            "4",
            "--out",
            shared,
            "--node-rank",
            "1",
            "--num-nodes",
            "2",
            *NET,
        ).returncode
        == 0
    )
    merged = run_fetch("--merge", "--out", shared)
    assert merged.returncode == 1 and "node-00-of-02" in merged.stderr


def test_resolution_buckets(tmp_path: Path, server: LoopbackServer) -> None:
    rows = _corpus(server, 27)
    listing = write_list(tmp_path / "l.jsonl", rows)
    out = tmp_path / "out"
    proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", out, "--buckets", "0,256,512,768,1024", *NET)
    assert proc.returncode == 0, proc.stderr
    everything = read_mds(out / "mds")
    assert len(everything) == 27
    seen = 0
    for low, high in ((0, 256), (256, 512), (512, 768), (768, 1024), (1024, 10**9)):
        bucket = out / "mds" / f"short-{low:04d}"
        rows_in = read_mds(bucket)
        seen += len(rows_in)
        for r in rows_in:
            assert low <= min(r["original_width"], r["original_height"]) < high
    assert seen == 27
    assert {len(read_mds(out / "mds" / f"short-{b:04d}")) > 0 for b in (256, 512)} == {True}


def test_two_nodes_into_s3_then_merge_by_hand(tmp_path: Path, server: LoopbackServer, s3: dict[str, str]) -> None:
    """Each node has only its own local cache; --merge on a third machine reads the node
    summaries and unit indexes back from S3."""
    rows = _corpus(server, 24)
    listing = write_list(tmp_path / "l.jsonl", rows)
    base = ("--dataset", "urls", "--urls", listing, "--unit-size", "5", "--out", "s3://data/nodes", *NET)
    for rank in (1, 0):  # rank 0 last: it sees both summaries complete and merges by itself
        proc = run_fetch(
            *base, "--local-cache", tmp_path / f"cache-{rank}", "--node-rank", str(rank), "--num-nodes", "2", env=fetch_env(**s3)
        )
        assert proc.returncode == 0, proc.stderr
    assert "merged 2 nodes" in proc.stderr
    # a third machine merges by hand, from what is on S3 alone: the index rank 0 wrote goes first
    import boto3

    bucket = boto3.client(
        "s3",
        endpoint_url=s3["S3_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    assert bucket.head_object(Bucket="data", Key="nodes/mds/index.json")
    bucket.delete_object(Bucket="data", Key="nodes/mds/index.json")
    merged = run_fetch("--merge", "--out", "s3://data/nodes", "--local-cache", tmp_path / "cache-merge", env=fetch_env(**s3))
    assert merged.returncode == 0, merged.stderr
    got = _remote_rows(s3, "s3://data/nodes/mds", tmp_path / "read")
    assert sorted(r["caption"] for r in got) == sorted(r["caption"] for r in rows)
