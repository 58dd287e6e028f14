"""One unit run as a function (``fastfetch.unit.run_unit``): what a scheduler calls on a worker
machine. It must publish exactly the folder a whole run publishes for that unit, and leave
nothing behind when the unit fails."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fastfetch import formats, held
from fastfetch.cli import parse
from fastfetch.config import RunConfig
from fastfetch.http import Fetcher
from fastfetch.manifest import Manifest
from fastfetch.mds import BASE_COLUMNS, Layout, UnitWriter
from fastfetch.sources.base import Unit
from fastfetch.unit import UnitFailed, UnitResult, UnitSpec, run_unit
from tests.conftest import LoopbackServer, fetch_env, read_mds, run_fetch, serve_numbered
from tests.fakehub import FakeHub, ServedFile, file_handler, make_tar
from tests.test_fetch_urls import write_list
from tests.test_sources_diffdb import REPO as DIFFDB_REPO
from tests.test_sources_diffdb import setup as diffdb_setup
from tests.test_sources_sa1b import CAPTION_REPO, sa1b_tar

NET = ("--allow-private-networks", "--workers", "1", "--unit-size", "4")


async def _plan(cfg: RunConfig) -> tuple[list[Unit], dict[str, str]]:
    async with Fetcher(cfg.fetch) as fetcher:
        source = cfg.source(fetcher)
        units = await source.plan()
        return units, formats.columns(cfg.format, BASE_COLUMNS, source.extra_columns())


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_one_unit_run_as_a_function_publishes_what_a_whole_run_does(tmp_path: Path, server: LoopbackServer) -> None:
    rows = serve_numbered(server, "/u", 10)
    rows[5]["url"] = server.url("/missing.jpg")  # a failure the unit counts
    listing = write_list(tmp_path / "l.jsonl", rows)
    assert run_fetch("--dataset", "urls", "--urls", listing, "--out", tmp_path / "whole", *NET).returncode == 0

    cfg = parse(["--dataset", "urls", "--urls", str(listing), "--out", str(tmp_path / "one"), *NET])
    units, columns = asyncio.run(_plan(cfg))
    assert [u.id for u in units] == ["00000", "00001", "00002"]
    result = asyncio.run(run_unit(UnitSpec(cfg, units[1], columns)))

    assert isinstance(result, UnitResult) and result.unit_id == "00001" and result.dirs == ("00001",)
    assert result.counts == {"kept": 3, "http_404": 1} and result.retryable == ()
    whole, one = tmp_path / "whole" / "mds" / "00001", tmp_path / "one" / "mds" / "00001"
    assert _files(one) == _files(whole)  # byte for byte the same shards and index
    assert sorted(r["caption"] for r in read_mds(one)) == ["c4", "c6", "c7"]
    recorded = {r.id: r for r in Manifest(tmp_path / "whole").records()}["00001"]  # what the whole run recorded
    assert (result.counts, result.bytes_in, result.bytes_out, list(result.dirs)) == (
        recorded.counts,
        recorded.bytes_in,
        recorded.bytes_out,
        recorded.dirs,
    )
    assert not any((tmp_path / "one" / "mds").rglob("*.mds.tmp")) and not any((tmp_path / "one" / "mds" / "_tmp").rglob("*.mds"))


def test_a_unit_that_fails_leaves_nothing(tmp_path: Path, server: LoopbackServer) -> None:
    listing = write_list(tmp_path / "l.jsonl", serve_numbered(server, "/f", 4))
    cfg = parse(["--dataset", "urls", "--urls", str(listing), "--out", str(tmp_path / "o"), *NET])
    units, columns = asyncio.run(_plan(cfg))
    (tmp_path / "o" / "_work" / "urls" / "00000.parquet").write_bytes(b"not parquet")  # the unit's list is gone bad
    with pytest.raises(UnitFailed):
        asyncio.run(run_unit(UnitSpec(cfg, units[0], columns)))
    assert not (tmp_path / "o" / "mds" / "00000").exists()
    assert not any((tmp_path / "o" / "mds").rglob("*.mds"))


def test_a_shard_lost_in_the_writer_thread_fails_the_unit(tmp_path: Path, server: LoopbackServer, monkeypatch) -> None:
    """A shard that could not be written (the disk filled, then freed) must not leave a unit that
    is published with fewer rows than it counted: the unit fails, as a full disk, and nothing of
    it is visible."""
    import errno
    import pickle

    from fastfetch import mds, mdswriter

    listing = write_list(tmp_path / "l.jsonl", serve_numbered(server, "/s", 8))
    cfg = parse(["--dataset", "urls", "--urls", str(listing), "--out", str(tmp_path / "o"), *NET, "--unit-size", "8"])
    units, columns = asyncio.run(_plan(cfg))
    monkeypatch.setattr(mds, "SHARD_BYTES", 1)  # a shard per image
    real, calls = mdswriter.MDSWriter._write_shard, []

    def write_shard(self, *args, **kwargs):  # noqa: ANN002, ANN003 - the first shard meets a full disk, the rest do not
        calls.append(args)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(mdswriter.MDSWriter, "_write_shard", write_shard)
    with pytest.raises(UnitFailed) as failed:
        asyncio.run(run_unit(UnitSpec(cfg, units[0], columns)))
    assert failed.value.disk_full and "No space left" in str(failed.value)
    assert not (tmp_path / "o" / "mds" / "00000").exists()
    copy = pickle.loads(pickle.dumps(failed.value))  # as a Ray task's failure reaches the driver
    assert (copy.unit_id, str(copy), copy.disk_full, copy.storage) == ("00000", str(failed.value), True, False)


def test_a_dead_tries_temporary_folder_is_swept(tmp_path: Path) -> None:
    """A Ray task killed with its worker leaves its try's temporary folder behind; the next try
    on that machine removes it, and never a living try's folder nor another machine's."""
    parent = tmp_path / "mds" / "_tmp" / "_"
    parent.mkdir(parents=True)
    dead = parent / "00007.deadbeef0000"
    (dead / "all").mkdir(parents=True)
    (dead / "all" / "shard.00000.mds").write_bytes(b"x" * 4096)
    (parent / "00007.deadbeef0000.held").write_bytes(held._machine())  # made here; its process died
    elsewhere = parent / "00006.feedface0000"
    elsewhere.mkdir()
    (parent / "00006.feedface0000.held").write_bytes(b"other-node 5f1c")  # another machine's: its lock may not show here
    living = parent / "00008.0123456789ab"
    living.mkdir()
    holder = subprocess.Popen(  # another try on this machine, alive: it holds its lock
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from fastfetch.held import HeldFolder; "
            "HeldFolder(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()",
            str(living),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    layout = Layout(tmp_path / "mds")
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        UnitWriter(layout, "00009", BASE_COLUMNS, "a1").discard()
        assert not dead.exists() and not (parent / "00007.deadbeef0000.held").exists()
        assert living.exists() and elsewhere.exists()
    finally:
        holder.kill()
        holder.wait()
    UnitWriter(layout, "00010", BASE_COLUMNS, "a2").discard()  # the holder is gone now
    assert sorted(p.name for p in parent.iterdir()) == ["00006.feedface0000", "00006.feedface0000.held"]


async def _plan_shipping(cfg: RunConfig) -> tuple[list[Unit], dict[str, str], dict[str, Any]]:
    """What a --ray driver has for each unit: the plan, the columns, and what it ships with it."""
    async with Fetcher(cfg.fetch) as fetcher:
        source = cfg.source(fetcher)
        try:
            units = await source.plan()
            columns = formats.columns(cfg.format, BASE_COLUMNS, source.extra_columns())
            return units, columns, {u.id: source.unit_payload(u) for u in units}
        finally:
            await source.close()


async def _run_together(specs: list[UnitSpec]) -> list[UnitResult]:
    return list(await asyncio.gather(*(run_unit(spec) for spec in specs)))


@pytest.mark.parametrize("dataset", ["sa1b", "diffdb"])
def test_archive_units_run_on_a_machine_that_never_planned(
    tmp_path: Path, server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, dataset: str
) -> None:
    """A --ray task on another node: its --local-cache holds neither the driver's links file nor
    its caption lookups. The task gets sa1b's link with its unit, builds the lookup itself, once
    for the machine (two units start at once: one builds, the other waits), and publishes the
    bytes a whole run publishes."""
    if dataset == "sa1b":
        hub = FakeHub(server)
        lines, planted = ["file_name\tcdn_link"], []
        for n in range(2):
            data, _, plant = sa1b_tar(n)
            planted += plant
            server.routes[f"/sa1b/sa_{n:06d}.tar"] = file_handler(ServedFile(data))  # type: ignore[assignment]
            lines.append(f"sa_{n:06d}.tar\t{server.url(f'/sa1b/sa_{n:06d}.tar')}")
        captions = make_tar([(f"SA1B_caption/{k}.txt", v.encode()) for k, v in planted], gz=True)
        side = hub.resolve_path(CAPTION_REPO, "SA1B_caption.tar.gz")
        hub.add(CAPTION_REPO, "SA1B_caption.tar.gz", captions)
        (tmp_path / "links.txt").write_text("\n".join(lines) + "\n")
        args = ["--dataset", "sa1b", "--links", str(tmp_path / "links.txt")]
        node_args = ["--dataset", "sa1b", "--links", str(tmp_path / "the-driver-has-it.txt")]
    else:
        hub, _, _ = diffdb_setup(server)
        side = hub.resolve_path(DIFFDB_REPO, "metadata-large.parquet")
        args = node_args = ["--dataset", "diffdb"]
    env = {"HF_ENDPOINT": hub.endpoint}
    net = ["--allow-private-networks", "--workers", "1"]
    assert run_fetch(*args, "--out", tmp_path / "whole", *net, env=fetch_env(**env)).returncode == 0

    from huggingface_hub import constants

    # this process plans and runs units itself: the hub's address as HF_ENDPOINT gives it at import
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    driver = parse([*args, "--out", str(tmp_path / "driver"), *net])
    units, columns, payloads = asyncio.run(_plan_shipping(driver))
    node = parse([*node_args, "--out", str(tmp_path / "node"), *net])
    specs = [UnitSpec(node, u, columns, payload=payloads[u.id]) for u in units[:2]]
    results = asyncio.run(_run_together(specs))
    assert server.hits[side] == 3  # the whole run, the driver, the node: once each
    for unit, result in zip(units[:2], results, strict=True):
        assert result.dirs == (unit.id,)
        assert _files(tmp_path / "node" / "mds" / unit.id) == _files(tmp_path / "whole" / "mds" / unit.id)
    assert not any((tmp_path / "node").rglob("*.held")) and not any((tmp_path / "node" / "_work").rglob("spool/*"))
