"""Ray scenarios for ``tests/test_ray.py``, run as ``python -m tests.ray_scenarios NAME DIR`` inside
a network namespace that has only loopback (``unshare -n``): the image server, the object store,
the Ray cluster and ``bin/fetch`` all live in it, so nothing can reach or probe another address
(Ray looks for the machine's outside address by opening a socket towards a public DNS server;
here it finds none and binds 127.0.0.1).

Each scenario fetches the same URL list once without Ray (the reference) and once with
``--ray`` on a ``ray.cluster_utils.Cluster`` of 1-CPU nodes, and writes ``DIR/result.json``:
both datasets as {key: sha256 of the stored bytes and caption} plus what the scenario observed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.conftest import fetch_env, loopback_server, make_image, s3_client, start_s3

ROOT = Path(__file__).resolve().parent.parent
ROWS, UNIT = 48, 6  # 8 units
DELAY = 0.25  # seconds per image answer, two at a time per unit: a unit lasts ~1 s, long enough to lose a node in it
HITS: Counter[str] = Counter()


def serve(delay: float) -> tuple[int, list[dict[str, str]]]:
    """A loopback server in a thread with ROWS images (some too small: counted rejections)."""
    images = [make_image(200 + 70 * (i % 5), 260 + 50 * (i % 4), seed=i) for i in range(ROWS)]

    async def image(request: web.Request) -> web.Response:
        HITS[request.path] += 1
        await asyncio.sleep(delay)
        return web.Response(body=images[int(request.match_info["n"])], content_type="image/jpeg")

    ready, box = threading.Event(), {}

    async def start() -> None:
        app = web.Application()
        app.router.add_get("/img/{n}.jpg", image)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        box["port"] = runner.addresses[0][1]
        ready.set()

    loop = asyncio.new_event_loop()
    threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True).start()
    ready.wait(10)
    port = box["port"]
    return port, [{"url": f"http://127.0.0.1:{port}/img/{i}.jpg", "caption": f"c{i}"} for i in range(ROWS)]


def fetch_cmd(listing: Path, out: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "bin" / "fetch"),
        "--dataset",
        "urls",
        "--urls",
        str(listing),
        "--out",
        out,
        "--unit-size",
        str(UNIT),
        "--workers",
        "1",
        "--per-host",
        "2",
        "--allow-private-networks",
        "--no-progress",
        *extra,
    ]


def dataset(root: Path) -> dict[str, list[str]]:
    """{key: [sha256 of the stored sample's bytes (every column), caption]} of an MDS dataset."""
    import orjson
    from streaming.base.format import reader_from_json

    out: dict[str, list[str]] = {}
    rows = 0
    for info in orjson.loads((root / "index.json").read_bytes())["shards"]:
        shard = reader_from_json(str(root), None, info)
        for i in range(shard.samples):
            raw = shard.get_sample_data(i)
            sample = shard.decode_sample(raw)
            out[sample["key"]] = [hashlib.sha256(raw).hexdigest(), sample["caption"]]
            rows += 1
    assert len(out) == rows, "a key written twice"
    return out


def unit_folders(mds: Path) -> list[str]:
    return sorted(p.name for p in mds.iterdir() if p.is_dir() and not p.name.startswith("_"))


def download_prefix(env: dict[str, str], prefix: str, dest: Path) -> None:
    client = s3_client(env)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="data", Prefix=prefix):
        for obj in page.get("Contents", []):
            target = dest / obj["Key"][len(prefix) :].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file("data", obj["Key"], str(target))


def wait_for_done_units(out: Path, n: int, proc: subprocess.Popen[str], timeout: float = 120) -> int:
    """Wait until the manifest records ``n`` done units (read-only; the driver is its writer)."""
    import sqlite3

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            db = sqlite3.connect(f"file:{out / 'manifest.sqlite'}?mode=ro", uri=True, timeout=1)
            done = db.execute("SELECT COUNT(*) FROM units WHERE state='done'").fetchone()[0]
            db.close()
            if done >= n:
                return done
        except sqlite3.Error:
            pass
        time.sleep(0.1)
    return -1


def main(name: str, work: Path) -> None:
    from ray.cluster_utils import Cluster

    port, rows = serve(DELAY)
    listing = work / "list.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = fetch_env()
    result: dict[str, Any] = {"scenario": name}
    plain = subprocess.run(fetch_cmd(listing, str(work / "plain")), env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    result["plain"] = dataset(work / "plain" / "mds")
    HITS.clear()

    s3proc, s3env = start_s3() if name == "s3" else (None, {})
    os.environ.update(s3env)  # the nodes hold the storage credentials, as a cluster's machines do
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray_args = ("--ray", cluster.address)
    out = work / "ray"
    try:
        if name == "equal":
            proc = subprocess.run(fetch_cmd(listing, str(out), *ray_args), env=env, capture_output=True, text=True, timeout=300)
            result["rc"], result["stderr"] = proc.returncode, proc.stderr[-3000:]
        elif name == "node-lost":
            run = subprocess.Popen(
                fetch_cmd(listing, str(out), *ray_args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            result["done_before_loss"] = wait_for_done_units(out, 2, run)
            cluster.remove_node(workers[0])  # a node with a unit in flight, most likely: its task runs again elsewhere
            _, err = run.communicate(timeout=300)
            result["rc"], result["stderr"] = run.returncode, err[-3000:]
        elif name == "driver-killed":
            run = subprocess.Popen(
                fetch_cmd(listing, str(out), *ray_args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
            )
            result["done_before_kill"] = wait_for_done_units(out, 2, run)
            os.kill(run.pid, signal.SIGKILL)
            run.wait()
            time.sleep(2)  # Ray ends the dead driver's job and its tasks
            proc = subprocess.run(fetch_cmd(listing, str(out), *ray_args), env=env, capture_output=True, text=True, timeout=300)
            result["rc"], result["stderr"] = proc.returncode, proc.stderr[-3000:]
        elif name == "stopped":
            run = subprocess.Popen(
                fetch_cmd(listing, str(out), *ray_args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            result["done_before_stop"] = wait_for_done_units(out, 2, run)
            run.send_signal(signal.SIGTERM)  # a clean stop: units in flight roll back, exit 143
            _, err = run.communicate(timeout=120)
            result["stop_rc"], result["stop_stderr"] = run.returncode, err[-3000:]
            result["stop_status"] = json.loads((out / "stats.json").read_text())["status"]
            proc = subprocess.run(fetch_cmd(listing, str(out), *ray_args), env=env, capture_output=True, text=True, timeout=300)
            result["rc"], result["stderr"] = proc.returncode, proc.stderr[-3000:]
        elif name == "s3":
            env = {**env, **s3env}
            proc = subprocess.run(
                fetch_cmd(listing, "s3://data/run", "--local-cache", str(work / "cache"), *ray_args),
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            result["rc"], result["stderr"] = proc.returncode, proc.stderr[-3000:]
            out = work / "downloaded"
            download_prefix(s3env, "run", out)
        else:
            raise SystemExit(f"unknown scenario {name}")
        result["refetched"] = sorted(path for path, n in HITS.items() if n > 1)
        result["ray"] = dataset(out / "mds")
        result["unit_folders"] = unit_folders(out / "mds")
        result["stats"] = json.loads((out / "stats.json").read_text())
        result["leftovers"] = sorted(str(p.relative_to(out)) for p in (out / "mds").rglob("*.mds") if "_tmp" in p.parts)
    finally:
        cluster.shutdown()
        if s3proc is not None:
            s3proc.terminate()
    (work / "result.json").write_text(json.dumps(result))


def archives(work: Path) -> None:
    """SA-1B (tars streamed from a links file that only the driver has, captions from the hub's
    tar.gz) once without Ray and once on the cluster; the units are the archives."""
    from ray.cluster_utils import Cluster

    sys.path.insert(0, str(ROOT / "tests"))  # the source tests' helpers import conftest as pytest lets them
    from tests.fakehub import FakeHub, ServedFile, file_handler, make_tar
    from tests.test_sources_sa1b import CAPTION_REPO, sa1b_tar

    with loopback_server() as server:
        hub = FakeHub(server)
        lines, planted = ["file_name\tcdn_link"], []
        for n in range(3):
            data, _, plant = sa1b_tar(n)
            planted += plant
            server.routes[f"/sa1b/sa_{n:06d}.tar"] = file_handler(ServedFile(data, throttle=0.02))  # type: ignore[assignment]
            lines.append(f"sa_{n:06d}.tar\t{server.url(f'/sa1b/sa_{n:06d}.tar')}")
        hub.add(
            CAPTION_REPO, "SA1B_caption.tar.gz", make_tar([(f"SA1B_caption/{k}.txt", v.encode()) for k, v in planted], gz=True)
        )
        links = work / "links.txt"
        links.write_text("\n".join(lines) + "\n")
        env = fetch_env(HF_ENDPOINT=hub.endpoint)

        def fetch(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
            cmd = [sys.executable, str(ROOT / "bin" / "fetch"), "--dataset", "sa1b", "--links", str(links), "--out", str(out)]
            cmd += ["--workers", "1", "--allow-private-networks", "--no-progress", *extra]
            return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

        result: dict[str, Any] = {"scenario": "sa1b"}
        plain = fetch(work / "plain")
        assert plain.returncode == 0, plain.stderr
        result["plain"] = dataset(work / "plain" / "mds")
        os.environ["HF_ENDPOINT"] = hub.endpoint  # the nodes' environment, as on a real cluster
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        try:
            out = work / "ray"
            proc = fetch(out, "--ray", cluster.address)
            result["rc"], result["stderr"] = proc.returncode, proc.stderr[-3000:]
            result["ray"] = dataset(out / "mds")
            result["unit_folders"] = unit_folders(out / "mds")
            result["stats"] = json.loads((out / "stats.json").read_text())
            result["leftovers"] = sorted(str(p.relative_to(out)) for p in (out / "mds").rglob("*.mds") if "_tmp" in p.parts)
            result["caption_downloads"] = server.hits[hub.resolve_path(CAPTION_REPO, "SA1B_caption.tar.gz")]
        finally:
            cluster.shutdown()
    (work / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1] == "sa1b":
        archives(Path(sys.argv[2]))
    else:
        main(sys.argv[1], Path(sys.argv[2]))
