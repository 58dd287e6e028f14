"""Planning a URL list streams: the run starts on the first units while the rest of the list is
still being read, the columns are settled from the files' schemas before the first unit, URL
dedup has a scope, and a list that breaks after the first units keeps what was finished."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import LoopbackServer, read_mds, run_fetch, serve_numbered, start_fetch
from tests.test_fetch_urls import stats_of, write_list

NET = ("--allow-private-networks", "--workers", "2")
FIRST_BATCH = 65_536  # rows of a txt list read at once (fastfetch.lists.BATCH_ROWS)


def _units(out: Path, where: str = "state='done'") -> int:
    try:
        with sqlite3.connect(out / "manifest.sqlite", timeout=5) as db:
            return db.execute(f"SELECT COUNT(*) FROM units WHERE {where}").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def _wait_for_a_done_unit(out: Path, proc: object, where: str = "state='done'") -> None:
    deadline = time.monotonic() + 240  # generous: a bound on a hang, not a speed assertion
    while _units(out, where) == 0:
        assert proc.poll() is None, proc.communicate()  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "no unit finished while the list was still open"
        time.sleep(0.2)


def _pipe(path: Path) -> int:
    """A named pipe standing for a list file that is still being written (read-write, so that
    opening it never blocks); the reader sees its end when the returned descriptor is closed."""
    os.mkfifo(path)
    return os.open(path, os.O_RDWR)


def _write_in_thread(fd: int, data: bytes) -> threading.Thread:
    thread = threading.Thread(target=os.write, args=(fd, data), daemon=True)  # the pipe holds 64 KiB
    thread.start()
    return thread


def _bad_scheme_lines(n: int) -> bytes:
    return b"".join(b"ftp://example.invalid/%d\n" % i for i in range(n))  # rejected without a request


def test_the_run_starts_before_the_list_is_read_to_its_end(tmp_path: Path, server: LoopbackServer) -> None:
    rows = serve_numbered(server, "/s", 5)
    listing, out = tmp_path / "l.txt", tmp_path / "o"
    fd = _pipe(listing)
    writer = _write_in_thread(fd, _bad_scheme_lines(FIRST_BATCH))
    proc = start_fetch("--dataset", "urls", "--urls", listing, "--out", out, "--caption-col", "", "--unit-size", "20000", *NET)
    try:
        _wait_for_a_done_unit(out, proc)  # a unit finished: the list's end is not even written yet
        writer.join()
        os.write(fd, "".join(r["url"] + "\n" for r in rows).encode())
    finally:
        os.close(fd)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    stats = stats_of(out)
    assert stats["kept"] == 5 and stats["rejected"] == {"bad_scheme": FIRST_BATCH}
    assert sorted(r["url"] for r in read_mds(out / "mds")) == sorted(r["url"] for r in rows)


def test_a_list_that_breaks_after_the_first_units_keeps_them(tmp_path: Path, server: LoopbackServer) -> None:
    listing, out = tmp_path / "l.txt.gz", tmp_path / "o"
    # comment lines (not rows) after the first batch: gzip reads its input 128 KiB at a time,
    # and a pipe gives it the last, short read only when it is closed
    head = _bad_scheme_lines(FIRST_BATCH) + b"".join(b"# %s\n" % os.urandom(64).hex().encode() for _ in range(2048))
    gz = zlib.compressobj(wbits=31)  # gzip
    fd = _pipe(listing)
    writer = _write_in_thread(fd, gz.compress(head) + gz.flush(zlib.Z_SYNC_FLUSH))
    args = ("--dataset", "urls", "--urls", listing, "--out", out, "--caption-col", "", "--unit-size", "30000", *NET)
    proc = start_fetch(*args)
    try:
        _wait_for_a_done_unit(out, proc)
        writer.join()
    finally:
        os.close(fd)  # the gzip stream ends without its end marker: the list is broken
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "l.txt.gz" in err and "Traceback" not in err, err
    assert stats_of(out)["status"] == "failed"  # published for what finished, never as a finished dataset
    with sqlite3.connect(out / "manifest.sqlite") as db:
        kept = dict(db.execute("SELECT id, attempts FROM units WHERE state='done'").fetchall())
    assert kept and not (out / "_work" / "urls" / "plan.json").exists()

    listing.unlink()
    listing.write_bytes(zlib.compress(head, wbits=31))  # the whole list, mended
    proc2 = run_fetch(*args)
    assert proc2.returncode == 0, proc2.stderr
    with sqlite3.connect(out / "manifest.sqlite") as db:
        after = dict(db.execute("SELECT id, attempts FROM units WHERE state='done'").fetchall())
    assert {u: after[u] for u in kept} == kept  # the units finished before the break were not redone
    assert len(after) == 3 and stats_of(out)["rejected"] == {"bad_scheme": FIRST_BATCH}


def test_url_dedup_scope(tmp_path: Path, server: LoopbackServer) -> None:
    rows = serve_numbered(server, "/d", 4)
    folder = tmp_path / "lists"
    folder.mkdir()
    write_list(folder / "a.jsonl", [rows[0], rows[1], rows[0]])  # row 0 twice in a file
    write_list(folder / "b.jsonl", [rows[1], rows[2], rows[3]])  # row 1 again, in another file
    expected = {"list": ({"duplicate_url": 2}, 4), "file": ({"duplicate_url": 1}, 5), "none": ({}, 6)}
    for scope, (rejected, kept) in expected.items():
        out = tmp_path / scope
        before = sum(server.hits.values())
        proc = run_fetch("--dataset", "urls", "--urls", folder, "--out", out, "--url-dedup", scope, *NET)
        assert proc.returncode == 0, proc.stderr
        assert stats_of(out)["rejected"] == rejected and stats_of(out)["kept"] == kept
        assert sum(server.hits.values()) - before == kept  # a duplicate dropped is never downloaded
    # the scope changes what units hold: another one on the same --out is refused, naming it
    proc = run_fetch("--dataset", "urls", "--urls", folder, "--out", tmp_path / "list", "--url-dedup", "none", *NET)
    assert proc.returncode == 2 and "url_dedup" in proc.stderr, proc.stderr
    proc = run_fetch("--dataset", "urls", "--urls", folder, "--out", tmp_path / "file", "--url-dedup", "file", *NET)
    assert proc.returncode == 0 and "nothing to do" in proc.stderr, proc.stderr


def test_columns_come_from_every_file_before_the_first_unit(tmp_path: Path, server: LoopbackServer) -> None:
    rows = serve_numbered(server, "/k", 6)
    folder = tmp_path / "lists"
    folder.mkdir()
    table = pa.Table.from_pylist(rows[:3]).append_column("score", pa.array([1, 2, 3], pa.int64()))
    pq.write_table(table, folder / "a.parquet")
    table = pa.Table.from_pylist(rows[3:]).append_column("score", pa.array([0.5, 1.5, 2.5], pa.float64()))
    pq.write_table(table, folder / "b.parquet")
    out = tmp_path / "o"
    base = ("--dataset", "urls", "--urls", folder, "--out", out, "--keep-cols", "score", "--unit-size", "2", *NET)
    for limit in ("2", "6"):  # the first run reads only a.parquet's rows, yet its units have b's float type
        proc = run_fetch(*base, "--limit", limit)
        assert proc.returncode == 0, proc.stderr
    got = sorted((r["caption"], r["score"]) for r in read_mds(out / "mds"))
    assert got == [("c0", 1.0), ("c1", 2.0), ("c2", 3.0), ("c3", 0.5), ("c4", 1.5), ("c5", 2.5)]
    assert all(isinstance(s, float) for _, s in got)


def test_rows_the_list_filters_are_counted_in_every_unit(tmp_path: Path, server: LoopbackServer) -> None:
    rows = serve_numbered(server, "/f", 9)
    table = pa.Table.from_pylist(
        [
            {"URL": r["url"], "TEXT": r["caption"], "WIDTH": 300, "HEIGHT": 300, "punsafe": 0.9 if i % 3 == 0 else 0.1}
            for i, r in enumerate(rows)
        ]
    )
    pq.write_table(table, tmp_path / "l.parquet")
    out = tmp_path / "o"
    args = (
        "--dataset",
        "laion",
        "--urls",
        tmp_path / "l.parquet",
        "--out",
        out,
        "--max-punsafe",
        "0.5",
        "--unit-size",
        "2",
        *NET,
    )
    proc = run_fetch(*args)
    assert proc.returncode == 0, proc.stderr
    assert stats_of(out)["rejected"] == {"punsafe": 3} and stats_of(out)["kept"] == 6  # not only the first unit's


def test_odd_lists_for_the_column_pass(tmp_path: Path, server: LoopbackServer) -> None:
    rows = serve_numbered(server, "/o", 3)
    twice = tmp_path / "twice.csv"
    twice.write_text("url,caption,score,score\n" + "".join(f"{r['url']},{r['caption']},1,2\n" for r in rows))
    proc = run_fetch("--dataset", "urls", "--urls", twice, "--out", tmp_path / "o1", "--keep-cols", "score", *NET)
    assert proc.returncode == 2 and "'score' more than once" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # --limit: a file the limit never reaches is not read for its columns, nor refused
    folder = tmp_path / "lists"
    folder.mkdir()
    write_list(folder / "a.jsonl", [{**r, "s": i} for i, r in enumerate(rows)])
    write_list(folder / "b.jsonl", [{"link": "x", "s": 1.5}])  # no url column at all
    args = ("--dataset", "urls", "--urls", folder, "--keep-cols", "s", *NET)
    proc = run_fetch(*args, "--out", tmp_path / "o2", "--limit", "3")
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["s"] for r in read_mds(tmp_path / "o2" / "mds")) == [0, 1, 2]
    proc = run_fetch(*args, "--out", tmp_path / "o3")  # the whole list reaches b.jsonl
    assert proc.returncode == 2 and "b.jsonl" in proc.stderr, proc.stderr


def test_a_node_stopped_before_its_plan_ends_is_incomplete_not_odd(tmp_path: Path, server: LoopbackServer) -> None:
    """A node stopped while its plan is still being cut has no plan digest yet: the merge waits
    for it (incomplete) instead of calling it a node that planned another list."""
    lines = _bad_scheme_lines(FIRST_BATCH) + b"".join(b"ftp://example.invalid/tail/%d\n" % i for i in range(10))
    (tmp_path / "whole.txt").write_bytes(lines)
    shared = tmp_path / "shared"
    base = ("--dataset", "urls", "--out", shared, "--unit-size", "20000", "--num-nodes", "2", *NET)
    assert run_fetch(*base, "--urls", tmp_path / "whole.txt", "--node-rank", "0").returncode == 0

    fd = _pipe(tmp_path / "open.txt")
    writer = _write_in_thread(fd, _bad_scheme_lines(FIRST_BATCH))
    proc = start_fetch(*base, "--urls", tmp_path / "open.txt", "--node-rank", "1")
    try:
        _wait_for_a_done_unit(shared / "_nodes" / "node-01-of-02", proc, "1")  # its first units are planned
        writer.join()
        proc.send_signal(signal.SIGTERM)  # the list's end is never written: the plan stops short
        _, err = proc.communicate(timeout=120)
    finally:
        os.close(fd)
    assert proc.returncode == 143, err
    merged = run_fetch("--merge", "--out", shared)
    assert merged.returncode == 1 and "not every node is complete: node-01-of-02" in merged.stderr, merged.stderr
