"""encode/run.py between object stores: --data s3://… → --out s3://…, read back by the loader
(a real S3 server, moto, on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3

import tests.encode_models as em


def _upload(folder: str, s3: dict[str, str], bucket: str, prefix: str) -> None:
    client = boto3.client(
        "s3",
        endpoint_url=s3["S3_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            client.upload_file(path, bucket, f"{prefix}/{os.path.relpath(path, folder)}")


def _run(data: str, out: str, cache: Path, s3: dict[str, str], nproc: int = 1) -> subprocess.CompletedProcess:
    cmd = em.run_cmd(data, out, "--cache-dir", str(cache), "--chunk-rows", "8", "--num-workers", "0", nproc=nproc)
    return subprocess.run(cmd, env={**em.env(), **s3}, capture_output=True, text=True, timeout=600)


def test_remote_data_to_remote_latents_and_loader(tmp_path: Path, s3: dict[str, str]) -> None:
    data, keys = em.image_mds(37)
    _upload(data, s3, "data", "enc/images")
    out = "s3://data/enc/latents"
    proc = _run("s3://data/enc/images", out, tmp_path / "cache-a", s3, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list((tmp_path / "cache-a").rglob("r*-c*/shard.*.mds"))  # uploaded, then freed locally

    code = (
        "import sys, json\n"
        "from encode.loader import build_streaming_latents_dataloader\n"
        "loader = build_streaming_latents_dataloader(sys.argv[1], batch_size=1, image_size=64, shuffle=False,\n"
        "                                            drop_last=False, cache_dir=sys.argv[2])\n"
        "n, shapes = 0, set()\n"
        "for b in loader:\n"
        "    n += len(b['caption']); shapes.add(tuple(b['image_latents'].shape[1:]))\n"
        "print(json.dumps({'rows': n, 'shapes': sorted(shapes)}))\n"
    )
    read = subprocess.run(
        [sys.executable, "-c", code, out, str(tmp_path / "read")],
        env={**em.env(), **s3},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=em.REPO,
    )
    assert read.returncode == 0, read.stderr[-3000:]
    result = json.loads(read.stdout.strip().splitlines()[-1])
    assert result == {"rows": 37, "shapes": [[4, 8, 8]]}

    # Another machine (empty cache) resuming the same output finds every chunk done remotely.
    again = _run("s3://data/enc/images", out, tmp_path / "cache-b", s3)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "encoded 0 rows" in again.stdout and "37 rows" in again.stdout


def test_rerun_after_a_killed_run_left_its_shared_memory_behind(tmp_path: Path, s3: dict[str, str]) -> None:
    """A run SIGKILLed with its process group leaves Streaming's shared memory naming its cache
    folder, behind a prefix that has a file lock and no memory (what every finished run leaves),
    where Streaming's clean_stale_shared_memory stops looking; the same command run again must
    still finish (Streaming refuses a dataset whose cache folder a live one uses)."""
    data, _ = em.image_mds(37)
    _upload(data, s3, "data", "kill/images")
    cache = tmp_path / "cache"
    from encode.paths import stream_location

    remote, local = stream_location("s3://data/kill/images", str(cache))
    finished = (
        "from streaming import StreamingDataset\n"
        "StreamingDataset(remote=sys.argv[1], local=sys.argv[2] + '-other', batch_size=1)\n"
    )
    killed = (
        "from streaming import StreamingDataset\n"
        "StreamingDataset(remote=sys.argv[1], local=sys.argv[2], batch_size=1)\n"
        "os.killpg(0, signal.SIGKILL)\n"
    )  # and its resource tracker, which would unlink the memory
    for code in (finished, killed):
        ran = subprocess.run(
            [sys.executable, "-c", "import os, signal, sys\n" + code, remote, local],
            env={**em.env(), **s3},
            capture_output=True,
            text=True,
            timeout=300,
            cwd=em.REPO,
            start_new_session=True,
        )
        assert ran.returncode in (0, -9), ran.stderr[-2000:]
    from tests.conftest import _dataset_dirs, _streaming_prefixes

    assert any(_dataset_dirs(p) == [local] for p in _streaming_prefixes())  # the killed run's memory is there
    proc = _run(remote, str(tmp_path / "latents"), cache, s3)
    assert proc.returncode == 0, proc.stderr[-3000:]
