"""bin/fetch as a user meets it: help, the demo, bad input, settings changes, Ctrl-C."""

from __future__ import annotations

import io
import signal
import time
from pathlib import Path

import orjson
from PIL import Image

from fastfetch.sources.demo import build_demo
from tests.conftest import LoopbackServer, make_image, read_mds, run_fetch, serve_numbered, start_fetch
from tests.test_fetch_urls import write_list


def test_help_documents_every_flag_with_its_default() -> None:
    """Every flag of the parser, as --help prints it: its name, its help and its default."""
    import argparse

    from fastfetch.cli import build_parser

    proc = run_fetch("--help")
    assert proc.returncode == 0
    printed = "".join(proc.stdout.split())  # argparse wraps lines, also at hyphens
    parser = build_parser()
    formatter = parser._get_formatter()
    flags = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")]
    assert len(flags) >= 40
    for action in flags:
        assert max(action.option_strings, key=len) in printed, action.option_strings
        rendered = "".join(formatter._expand_help(action).split())  # the help with its "(default: …)"
        assert rendered in printed, (action.option_strings, rendered)
        if action.default is not argparse.SUPPRESS:
            assert "".join(f"(default: {action.default})".split()) in rendered, action.option_strings


def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = run_fetch("--dataset", "demo", "--out", out)
    assert proc.returncode == 0, proc.stderr
    files, rows = build_demo()
    expected = set()
    for row in rows:
        found = files.get(row["url"])
        if not row["caption"] or found is None:
            continue
        try:
            im = Image.open(io.BytesIO(found[0]))
            im.load()
        except Exception:
            continue
        if min(im.size) >= 256:
            expected.add(row["caption"] + row["url"])
    stored = read_mds(out / "mds")
    assert {r["caption"] + "/" + r["url"].split("/", 3)[3] for r in stored} == expected
    assert len(stored) == len(expected) > 40
    stats = orjson.loads((out / "stats.json").read_bytes())
    assert stats["kept"] == len(expected)
    assert {"too_small", "http_404", "not_an_image", "decode_error", "no_caption"} <= set(stats["rejected"])
    assert "fastfetch: done" in proc.stderr
    # The summary table: kept and every rejection reason, with the dataset's and this run's counts.
    table = {words[words[0] == "rejected:"]: words[-2:] for words in map(str.split, proc.stderr.splitlines()) if len(words) >= 3}
    assert table["kept"] == [f"{len(expected):,}"] * 2
    for reason, n in stats["rejected"].items():
        assert table[reason] == [f"{n:,}"] * 2, reason
    # A second run has nothing left to do and changes nothing.
    again = run_fetch("--dataset", "demo", "--out", out)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert len(read_mds(out / "mds")) == len(expected)


def test_missing_list_file(tmp_path: Path) -> None:
    proc = run_fetch("--dataset", "urls", "--urls", tmp_path / "nope.parquet", "--out", tmp_path / "o")
    assert proc.returncode == 2
    assert "nope.parquet does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_urls_flag_required(tmp_path: Path) -> None:
    proc = run_fetch("--dataset", "urls", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "needs --urls" in proc.stderr


def test_unknown_column(tmp_path: Path) -> None:
    listing = write_list(tmp_path / "l.csv", [{"link": "http://127.0.0.1:9/a.jpg", "caption": "c"}])
    proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", tmp_path / "o")
    assert proc.returncode == 2
    assert "no URL column 'url'" in proc.stderr and "'link'" in proc.stderr and "--url-col" in proc.stderr
    proc = run_fetch(
        "--dataset", "urls", "--urls", listing, "--url-col", "link", "--caption-col", "text", "--out", tmp_path / "o2"
    )
    assert proc.returncode == 2 and "no caption column 'text'" in proc.stderr


def test_empty_list(tmp_path: Path) -> None:
    listing = tmp_path / "empty.txt"
    listing.write_text("\n")
    proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", tmp_path / "o")
    assert proc.returncode == 2 and "has no rows" in proc.stderr


def test_unknown_format_and_bad_flags(tmp_path: Path) -> None:
    odd = tmp_path / "list.xlsx"
    odd.write_text("x")
    proc = run_fetch("--dataset", "urls", "--urls", odd, "--out", tmp_path / "o")
    assert proc.returncode == 2 and "cannot tell the format" in proc.stderr
    proc = run_fetch("--min-size", "600", "--max-size", "512", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "--min-size 600 is larger than --max-size 512" in proc.stderr


def test_changed_settings_are_refused(tmp_path: Path, server: LoopbackServer) -> None:
    server.routes["/a.jpg"] = make_image(400, 300)
    listing = write_list(tmp_path / "l.jsonl", [{"url": server.url("/a.jpg"), "caption": "c"}])
    out = tmp_path / "o"
    assert run_fetch("--dataset", "urls", "--urls", listing, "--out", out, "--allow-private-networks").returncode == 0
    proc = run_fetch("--dataset", "urls", "--urls", listing, "--out", out, "--allow-private-networks", "--max-size", "256")
    assert proc.returncode == 2 and "max_size: 512 → 256" in proc.stderr


def test_ctrl_c_stops_cleanly_and_resumes(tmp_path: Path, server: LoopbackServer) -> None:
    listing = write_list(tmp_path / "l.parquet", serve_numbered(server, "/s", 60, delay=0.2))
    out = tmp_path / "o"
    args = (
        "--dataset",
        "urls",
        "--urls",
        listing,
        "--out",
        out,
        "--allow-private-networks",
        "--unit-size",
        "10",
        "--concurrency",
        "4",
    )
    proc = start_fetch(*args)
    deadline = time.monotonic() + 60
    while sum(server.hits.values()) < 15:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err  # the summary was printed
    stats = orjson.loads((out / "stats.json").read_bytes())
    assert stats["status"] == "interrupted"
    assert not list((out / "mds").glob("_tmp/*"))  # units in flight were rolled back
    assert len(read_mds(out / "mds")) == stats["kept"]
    rerun = run_fetch(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(r["caption"] for r in read_mds(out / "mds")) == sorted(f"c{i}" for i in range(60))


def test_the_progress_bar_ends_on_the_final_counts(capsys) -> None:
    """The bar's counts are refreshed at most every 0.5 s; its last line must not be stale."""
    from fastfetch.stats import Progress, RunCounters

    counters = RunCounters()
    bar = Progress(5, counters)
    for i in range(5):  # all within one refresh interval
        counters.kept += i % 2
        counters.rejected["too_small"] += 1 - i % 2
        bar.update()
    bar.close()
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "5/5" in last and "kept=2" in last and "rejected=3" in last, last
