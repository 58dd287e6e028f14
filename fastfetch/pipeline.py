"""Wires the stages: source units → items → fetch → resize → per-unit MDS → manifest commit.

Items of several units are in flight at once (the next unit starts as soon as the previous
one has handed out all its items), so the slow tail of one unit never idles the network or
the resize pool. A unit is committed only when all its items are accounted for and its MDS
folder is renamed into place; an interrupted unit is rolled back and redone on the next run.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastfetch.http import Fetcher
from fastfetch.imaging import Processed
from fastfetch.manifest import DONE, Manifest
from fastfetch.mds import BASE_COLUMNS, UnitWriter, clean_unfinished, merge_index
from fastfetch.resizer import ResizePool
from fastfetch.sources.base import Item, Source, Unit, UsageError
from fastfetch.stats import Progress, RunCounters

MAX_OPEN_UNITS = 4


@dataclass(frozen=True, slots=True)
class Selection:
    """Which planned units this run works on."""

    subset: str = "all"  # "all" | "small" (a deterministic ~1%)
    ids: tuple[int, ...] = ()

    def apply(self, units: list[Unit]) -> list[Unit]:
        if self.ids:
            by_number = {unit_number(u.id, i): u for i, u in enumerate(units)}
            missing = [i for i in self.ids if i not in by_number]
            if missing:
                shown = sorted(by_number)
                raise UsageError(
                    f"--ids {' '.join(map(str, missing))}: no such unit; this dataset has units "
                    f"{shown[0]}..{shown[-1]} ({len(shown)} in all)"
                )
            return [by_number[i] for i in self.ids]
        if self.subset == "small":
            return [u for i, u in enumerate(units) if i % 100 == 0]
        return units


def unit_number(unit_id: str, position: int) -> int:
    """The number a user selects a unit by: trailing digits of its id (sa_000020 → 20)."""
    match = re.search(r"(\d+)\D*$", unit_id)
    return int(match.group(1)) if match else position


class Pipeline:
    """One fetch run over the selected units of one source."""

    def __init__(
        self,
        source: Source,
        out: Path,
        fetcher: Fetcher,
        resizer: ResizePool,
        manifest: Manifest,
        counters: RunCounters,
        progress_enabled: bool = True,
    ) -> None:
        self.source = source
        self.out = out
        self.mds_root = out / "mds"
        self.fetcher = fetcher
        self.resizer = resizer
        self.manifest = manifest
        self.counters = counters
        self.progress_enabled = progress_enabled
        self.progress: Progress | None = None
        self.columns: dict[str, str] = {}
        self._item_slots = asyncio.Semaphore(fetcher.cfg.concurrency + resizer.workers * 4)

    async def prepare(self, selection: Selection) -> list[Unit]:
        """Plan, record the plan, drop unfinished leftovers; returns the units still to do."""
        units = await self.source.plan()
        for changed in self.manifest.sync_plan(units):
            shutil.rmtree(self.mds_root / changed, ignore_errors=True)
        selected = selection.apply(units)
        done = {r.id for r in self.manifest.records(DONE)}
        clean_unfinished(self.mds_root, done)
        self.columns = {**BASE_COLUMNS, **self.source.extra_columns()}
        return [u for u in selected if u.id not in done]

    async def run(self, units: list[Unit]) -> None:
        """Run units with a bounded number open at once; returns when all are committed."""
        total = sum(u.rows or 0 for u in units)
        self.progress = Progress(total, self.counters, self.progress_enabled)
        open_units: set[asyncio.Task[None]] = set()
        try:
            for unit in units:
                handed_out = asyncio.Event()
                task = asyncio.create_task(self._run_unit(unit, handed_out), name=f"unit-{unit.id}")
                open_units.add(task)
                task.add_done_callback(open_units.discard)
                waiter = asyncio.create_task(handed_out.wait())
                try:
                    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                while len(open_units) >= MAX_OPEN_UNITS:
                    await asyncio.wait(open_units, return_when=asyncio.FIRST_COMPLETED)
            if open_units:
                await asyncio.gather(*open_units)
        finally:
            for task in open_units:
                task.cancel()
            if open_units:
                await asyncio.gather(*open_units, return_exceptions=True)
            self.progress.close()

    def merge(self) -> int:
        """Rebuild the merged index over every done unit (also after an interruption)."""
        return merge_index(self.mds_root, [r.id for r in self.manifest.records(DONE)])

    # -- one unit ----------------------------------------------------------------------------
    async def _run_unit(self, unit: Unit, handed_out: asyncio.Event) -> None:
        self.manifest.start(unit.id)
        writer = UnitWriter(self.mds_root, unit.id, self.columns)
        counts: Counter[str] = Counter(unit.spec.get("prefiltered", {}))
        bytes_in = 0
        tasks: set[asyncio.Task[None]] = set()

        async def handle(item: Item) -> None:
            nonlocal bytes_in
            try:
                reason, nbytes = await self._process(item, writer)
            finally:
                self._item_slots.release()
            bytes_in += nbytes
            counts["kept" if reason is None else reason] += 1
            self._count(reason, nbytes)

        try:
            async for item in self.source.items(unit):
                await self._item_slots.acquire()
                task = asyncio.create_task(handle(item))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            handed_out.set()
            while tasks:
                await asyncio.gather(*list(tasks))
        except asyncio.CancelledError:
            await _cancel_all(tasks)
            await asyncio.to_thread(writer.discard)
            self.manifest.reset(unit.id)
            raise
        except Exception as exc:  # a unit-level failure (archive unreadable, …): the run goes on
            handed_out.set()
            await _cancel_all(tasks)
            await asyncio.to_thread(writer.discard)
            self.manifest.fail(unit.id, f"{type(exc).__name__}: {exc}")
            self.counters.units_failed += 1
            return
        # Every item is accounted for: publish the unit. A stop request arriving now waits for
        # the commit instead of racing it (a half-renamed unit would be neither done nor undone).
        publish = asyncio.ensure_future(asyncio.to_thread(writer.finish))
        try:
            await asyncio.shield(publish)
        except asyncio.CancelledError:
            await publish
            self._commit(unit, counts, bytes_in, writer)
            raise
        self._commit(unit, counts, bytes_in, writer)

    def _commit(self, unit: Unit, counts: Counter[str], bytes_in: int, writer: UnitWriter) -> None:
        self.manifest.finish(unit.id, dict(counts), bytes_in, writer.bytes)
        self.counters.units_done += 1

    async def _process(self, item: Item, writer: UnitWriter) -> tuple[str | None, int]:
        """Fetch (if needed), resize and write one item; returns (reason or None, bytes fetched)."""
        if item.reject:
            return item.reject, 0
        data, nbytes = item.data, len(item.data or b"")  # archive members count as bytes in
        if data is None:
            result = await self.fetcher.fetch(item.url or "")
            if result.data is None:
                return result.reason, 0
            data, nbytes = result.data, len(result.data)
        processed: Processed = await self.resizer.process(data)
        if processed.reason is not None:
            return processed.reason, nbytes
        row: dict[str, Any] = {
            "jpg": processed.data if processed.data is not None else data,
            "caption": item.caption or "",
            "width": processed.width,
            "height": processed.height,
            "original_width": processed.original_width,
            "original_height": processed.original_height,
            "key": item.key,
            **item.extra,
        }
        writer.write(row)
        self.counters.bytes_out += len(row["jpg"])
        return None, nbytes

    def _count(self, reason: str | None, nbytes: int) -> None:
        c = self.counters
        c.items += 1
        c.bytes_in += nbytes
        if reason is None:
            c.kept += 1
        else:
            c.rejected[reason] += 1
        if self.progress is not None:
            self.progress.update()


async def _cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    for task in list(tasks):
        task.cancel()
    if tasks:
        await asyncio.gather(*list(tasks), return_exceptions=True)
