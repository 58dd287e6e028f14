"""Counters by reason, the progress bar, the final summary table and ``stats.json``.

Dataset totals come from the manifest (the done units' counts), so ``stats.json`` always
describes exactly what the merged index holds, however many runs built it; the throughput
figures describe the run that just ended.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from fastfetch import storage
from fastfetch.manifest import DONE, FAILED, Manifest


@dataclass
class RunCounters:
    """What this run did (all units it touched, finished or not)."""

    started: float = field(default_factory=time.monotonic)
    items: int = 0
    kept: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    units_done: int = 0
    units_failed: int = 0
    worker_peak_rss_mb: float = 0.0

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


class Progress:
    """A tqdm bar over items with kept/rejected counts and throughput (or nothing at all:
    without a bar, tqdm is not even imported, ~20 ms of every ``--no-progress`` start)."""

    def __init__(self, total: int, counters: RunCounters, enabled: bool = True) -> None:
        self.counters = counters
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                unit="img",
                dynamic_ncols=True,
                smoothing=0.1,
                mininterval=0.5,
                file=sys.stderr,
                desc="fetch",
            )
        self._last = 0.0

    def grow(self, n: int) -> None:
        """More items to do (a plan still being cut gives its units as it goes)."""
        if self.bar is not None and n:
            self.bar.total += n
            self.bar.refresh()

    def update(self, n: int = 1) -> None:
        if self.bar is None:
            return
        self.bar.update(n)
        now = time.monotonic()
        if now - self._last > 0.5:
            self._last = now
            self._set_counts()

    def close(self) -> None:
        if self.bar is not None:
            self._set_counts()  # the bar's last line shows the final counts, not the last refresh's
            self.bar.close()

    def _set_counts(self) -> None:
        c = self.counters
        self.bar.set_postfix(
            kept=c.kept,
            rejected=sum(c.rejected.values()),
            MBps=f"{c.bytes_in / 1e6 / max(c.seconds, 1e-9):.1f}",
            refresh=False,
        )


def dataset_totals(manifest: Manifest) -> dict[str, Any]:
    """Totals over the done units (what the merged index contains)."""
    records = [r for r in manifest.records() if r.retry_of is None]  # retries fold into their unit
    counts: Counter[str] = Counter()
    bytes_in = bytes_out = 0
    for r in records:
        if r.state == DONE:
            counts.update(r.counts)
            bytes_in += r.bytes_in
            bytes_out += r.bytes_out
    kept = counts.pop("kept", 0)
    states = Counter(r.state for r in records)
    return {
        "units": {"total": len(records), **{s: states.get(s, 0) for s in ("done", "pending", "running", "failed")}},
        "items": kept + sum(counts.values()),
        "kept": kept,
        "rejected": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "bytes_downloaded": bytes_in,
        "bytes_written": bytes_out,
        "failed_units": {r.id: r.error for r in records if r.state == FAILED},
    }


def write_stats(out: Path, manifest: Manifest, run: RunCounters, settings: dict[str, Any], status: str) -> dict[str, Any]:
    """Write ``out/stats.json`` atomically and return what was written."""
    secs = run.seconds
    stats = {
        **dataset_totals(manifest),
        "status": status,
        "this_run": {
            "seconds": round(secs, 3),
            "items": run.items,
            "kept": run.kept,
            "rejected": dict(run.rejected),
            "units_done": run.units_done,
            "units_failed": run.units_failed,
            "images_per_s": round(run.items / secs, 2) if secs else 0.0,
            "kept_per_s": round(run.kept / secs, 2) if secs else 0.0,
            "mb_per_s": round(run.bytes_in / 1e6 / secs, 2) if secs else 0.0,
            "peak_rss_mb": peak_rss_mb(),
            "peak_worker_rss_mb": run.worker_peak_rss_mb,
        },
        "settings": settings,
    }
    storage.write_atomically(out / "stats.json", orjson.dumps(stats, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return stats


def print_summary(stats: dict[str, Any], dataset: str, stats_path: Path) -> None:
    """The human-readable end of a run: one table of kept and rejected, then where things are.

    Plain aligned text: a rich table cost ~25 ms of import at the end of every run, a moment
    when the resize workers have already stopped and nothing else overlaps it."""
    run = stats["this_run"]
    rows = [
        ("", "dataset", "this run"),
        ("units done", f"{stats['units']['done']}/{stats['units']['total']}", str(run["units_done"])),
        ("items", f"{stats['items']:,}", f"{run['items']:,}"),
        ("kept", f"{stats['kept']:,}", f"{run['kept']:,}"),
    ]
    reasons = sorted(set(stats["rejected"]) | set(run["rejected"]), key=lambda r: -stats["rejected"].get(r, 0))
    for reason in reasons:
        rows.append((f"  rejected: {reason}", f"{stats['rejected'].get(reason, 0):,}", f"{run['rejected'].get(reason, 0):,}"))
    rows += [
        ("downloaded", _human(stats["bytes_downloaded"]), ""),
        ("written", _human(stats["bytes_written"]), ""),
        ("seconds", "", f"{run['seconds']:.1f}"),
        ("images/s", "", f"{run['images_per_s']:.1f}"),
        ("kept/s", "", f"{run['kept_per_s']:.1f}"),
    ]
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"fastfetch: {stats['status']}"]
    lines += [f"  {a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}".rstrip() for a, b, c in rows]
    if stats["failed_units"]:
        lines.append(f"{len(stats['failed_units'])} unit(s) failed (rerun the same command to retry):")
        lines += [f"  {uid}: {err}" for uid, err in list(stats["failed_units"].items())[:10]]
    lines.append(f"dataset: {dataset}   stats: {stats_path}")
    print("\n".join(lines), file=sys.stderr)


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident memory of a process in MB: its VmHWM (Linux), else this process's
    ru_maxrss. Not ru_maxrss first: the kernel carries it across exec, so a process started by
    a large one (a test runner, a notebook) would report its parent's size."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    if pid != "self":
        return 0.0
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"
