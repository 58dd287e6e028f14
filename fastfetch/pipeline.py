"""Wires the stages: source units → items → fetch → resize → per-unit MDS → manifest commit.

Items of several units are in flight at once (the next unit starts as soon as the previous
one has handed out all its items), so the slow tail of one unit never idles the network or
the resize pool. A unit is committed only when all its items are accounted for and its MDS
folder is renamed into place; an interrupted unit is rolled back and redone on the next run.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import re
import shutil
import sqlite3
import sys
from collections.abc import AsyncIterator
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from fastfetch import formats, storage
from fastfetch.body import Body, body_len
from fastfetch.errors import UsageError
from fastfetch.formats import OutputFormat
from fastfetch.http import Fetcher
from fastfetch.imaging import Processed
from fastfetch.manifest import DONE, Manifest
from fastfetch.mds import BASE_COLUMNS, Layout, UnitWriter, clean_unfinished, merge_index
from fastfetch.redact import public_url, redact
from fastfetch.resizer import ResizePool
from fastfetch.sources.base import Item, Source, Unit
from fastfetch.stats import Progress, RunCounters

MAX_OPEN_UNITS = 4
#: failures worth another try later (``--retry-failed``); the rest are properties of the item
TRANSIENT = frozenset({"timeout", "connection", "http_5xx", "http_429", "memory_limit"})


class DiskFull(Exception):
    """The output filesystem is full: the run stops (units in flight are rolled back)."""

    def __init__(self, path: Path, needed: int) -> None:
        free = shutil.disk_usage(path if path.is_dir() else path.parent).free if path.parent.exists() else 0
        super().__init__(
            f"no space left on the device holding {path} ({free / 1e6:.1f} MB free; about "
            f"{needed / 1e6:.0f} MB are needed for the units in flight). Free some space or choose "
            "another --out, then rerun the same command: finished units are kept"
        )


def is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC anywhere in the exception chain (SQLite reports it as 'database or disk is full')."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _null_value(encoding: str) -> Any:
    """What a missing value of an extra column is stored as (MDS has no nulls outside json)."""
    return {"float64": float("nan"), "float32": float("nan"), "str": ""}.get(encoding)


async def _only(items: AsyncIterator[Item], keys: set[str]) -> AsyncIterator[Item]:
    async for item in items:
        if item.key in keys:
            yield item


@dataclass(frozen=True, slots=True)
class Selection:
    """Which planned units this run works on."""

    subset: str = "all"  # "all" | "small" (a deterministic ~1%)
    ids: tuple[int, ...] = ()
    node_rank: int = 0
    node_count: int = 1

    def apply(self, units: list[Unit]) -> list[Unit]:
        """The selected units this node works on: those whose id hashes to this node. A unit
        belongs to the same node whatever the selection, so a run with a larger selection
        (``--subset all`` after ``small``) never gives a finished unit to another node."""
        selected = self._selected(units)
        if self.node_count == 1:
            return selected
        return [u for u in selected if node_of(u.id, self.node_count) == self.node_rank]

    def _selected(self, units: list[Unit]) -> list[Unit]:
        if self.ids:  # a number picks that unit of every split chosen (train-000 and valid-000)
            by_number: dict[int, list[Unit]] = {}
            for i, u in enumerate(units):
                by_number.setdefault(unit_number(u.id, i), []).append(u)
            missing = [i for i in self.ids if i not in by_number]
            if missing:
                shown = sorted(by_number)
                raise UsageError(
                    f"--ids {' '.join(map(str, missing))}: no such unit; this dataset has units "
                    f"{shown[0]}..{shown[-1]} ({len(units)} in all)"
                )
            return [u for i in dict.fromkeys(self.ids) for u in by_number[i]]
        if self.subset == "small":
            return [u for i, u in enumerate(units) if i % 100 == 0]
        return units


def plan_digest(units: list[Unit]) -> str:
    """What identifies a plan: its units and their specs (nodes must plan the same units)."""
    return hashlib.blake2b(orjson.dumps([[u.id, u.spec] for u in units], option=orjson.OPT_SORT_KEYS),
                           digest_size=16).hexdigest()


def node_of(unit_id: str, node_count: int) -> int:
    """The node a unit belongs to (a hash of its id: stable, and even over many units)."""
    return int.from_bytes(hashlib.blake2b(unit_id.encode(), digest_size=8).digest(), "little") % node_count


def unit_number(unit_id: str, position: int) -> int:
    """The number a user selects a unit by: trailing digits of its id (sa_000020 → 20)."""
    match = re.search(r"(\d+)\D*$", unit_id)
    return int(match.group(1)) if match else position


class Pipeline:
    """One fetch run over the selected units of one source."""

    def __init__(
        self,
        source: Source,
        layout: Layout,
        fetcher: Fetcher,
        resizer: ResizePool,
        manifest: Manifest,
        counters: RunCounters,
        progress_enabled: bool = True,
    ) -> None:
        self.source = source
        self.layout = layout
        self.fetcher = fetcher
        self.resizer = resizer
        self.manifest = manifest
        self.counters = counters
        self.progress_enabled = progress_enabled
        self.progress: Progress | None = None
        self.columns: dict[str, str] = {}
        self.plan_digest = ""
        self._item_slots = asyncio.Semaphore(fetcher.cfg.concurrency + resizer.capacity)

    async def prepare(self, selection: Selection, retry_failed: bool = False) -> list[Unit]:
        """Plan, record the plan, drop unfinished leftovers; returns the units still to do
        (with ``retry_failed``: only retry units for earlier transient failures)."""
        units = await self.source.plan()
        self.plan_digest = plan_digest(units)
        for changed in self.manifest.sync_plan(units):
            for rel in self.layout.unit_rels(changed):
                shutil.rmtree(self.layout.root / rel, ignore_errors=True)
        selected = selection.apply(units)
        if self.layout.remote:
            self._redo_units_missing_remotely()
        done = {r.id for r in self.manifest.records(DONE)}
        clean_unfinished(self.layout, self.manifest.ids(), done)
        self.columns = self._columns(bool(done))
        if retry_failed:
            return self.manifest.retry_units()
        return [u for u in selected if u.id not in done]

    def _redo_units_missing_remotely(self) -> None:
        """A done unit whose objects are gone from the remote output (a lifecycle rule, a
        cleanup by hand) is done no more: it is redone, instead of being merged into an index
        that names missing shards."""
        assert self.layout.remote is not None
        present = set(storage.relative_names(self.layout.remote))
        for record in self.manifest.records(DONE):
            for rel in record.dirs:
                local = self.layout.root / rel / "index.json"
                names = ["index.json"]
                if local.exists():
                    names += [s["raw_data"]["basename"] for s in orjson.loads(local.read_bytes())["shards"]]
                missing = [n for n in names if f"{rel}/{n}" not in present]
                if missing:
                    print(f"unit {record.id}: {len(missing)} of its objects are missing from {self.layout.remote}/{rel}; "
                          "redoing it", file=sys.stderr)
                    self.manifest.reset(record.spec.get("retry_of", record.id))  # a retry's rows are its unit's
                    self.manifest.reset(record.id)
                    break

    def _columns(self, have_done_units: bool) -> dict[str, str]:
        """The MDS columns of every unit: fastfetch's own, then the source's, which may never
        replace one of fastfetch's; and the same as the done units were written with."""
        extra = self.source.extra_columns()
        clash = sorted(set(extra) & set(BASE_COLUMNS))
        if clash:
            raise UsageError(
                f"column(s) {', '.join(clash)} would replace the one(s) fastfetch writes itself; keep them under "
                f"another name (--keep-cols {clash[0]}:list_{clash[0]})"
            )
        columns = formats.columns(self.layout.format, BASE_COLUMNS, extra)
        previous = self.manifest.get_meta("columns")
        if have_done_units and previous is not None and previous != columns:
            diff = ", ".join(
                f"{k}: {previous.get(k, 'absent')} → {columns.get(k, 'absent')}"
                for k in sorted(set(previous) | set(columns)) if previous.get(k) != columns.get(k)
            )
            raise UsageError(
                f"the input's columns changed since the finished units were written ({diff}); rerun with the "
                "lists that built them, or choose a new --out"
            )
        self.manifest.set_meta("columns", columns)
        return columns

    async def run(self, units: list[Unit]) -> None:
        """Run units with a bounded number open at once; returns when all are committed."""
        total = sum(u.rows or 0 for u in units)
        self.progress = Progress(total, self.counters, self.progress_enabled)
        open_units: set[asyncio.Task[None]] = set()
        fatal: list[BaseException] = []  # what stops the run (a full disk, lost storage), from any unit

        def settle(task: asyncio.Task[None]) -> None:
            open_units.discard(task)
            if not task.cancelled() and task.exception() is not None:
                fatal.append(task.exception())  # type: ignore[arg-type]

        try:
            for unit in units:
                handed_out = asyncio.Event()
                task = asyncio.create_task(self._run_unit(unit, handed_out), name=f"unit-{unit.id}")
                open_units.add(task)
                task.add_done_callback(settle)
                waiter = asyncio.create_task(handed_out.wait())
                try:
                    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                while len(open_units) >= MAX_OPEN_UNITS and not fatal:
                    await asyncio.wait(open_units, return_when=asyncio.FIRST_COMPLETED)
                if fatal:
                    raise fatal[0]
            if open_units:
                await asyncio.wait(open_units, return_when=asyncio.FIRST_EXCEPTION)
            if fatal:
                raise fatal[0]
        finally:
            for task in open_units:
                task.cancel()
            if open_units:
                await asyncio.gather(*open_units, return_exceptions=True)
            self.progress.close()

    def merge(self) -> int:
        """Rebuild the merged index over every done unit (also after an interruption)."""
        return merge_index(self.layout, self.done_dirs())

    def done_dirs(self) -> list[str]:
        """The MDS folders of every done unit (relative to the MDS root)."""
        return [rel for r in self.manifest.records(DONE) for rel in r.dirs]

    # -- one unit ----------------------------------------------------------------------------
    async def _run_unit(self, unit: Unit, handed_out: asyncio.Event) -> None:
        self.manifest.start(unit.id)
        writer = UnitWriter(self.layout, unit.id, self.columns)
        counts: Counter[str] = Counter(unit.spec.get("prefiltered", {}))
        retryable: list[tuple[str, str]] = []  # (key, reason) of transient failures, for --retry-failed
        keys: set[str] = set()
        bytes_in = 0
        tasks: set[asyncio.Task[None]] = set()

        async def handle(item: Item, held: int) -> None:
            nonlocal bytes_in
            try:
                reason, nbytes = await self._process(item, writer)
            finally:
                self._item_slots.release()
                if held:
                    self.fetcher.budget.give(held, body_len(item.data or b""))
            bytes_in += nbytes
            counts["kept" if reason is None else reason] += 1
            if reason in TRANSIENT and item.url:
                retryable.append((item.key, reason))
            self._count(reason, nbytes)

        try:
            async for item in self._items(unit):
                if item.key in keys and item.reject is None:
                    item.reject = "duplicate_key"  # an archive naming two members alike: the first one counts
                keys.add(item.key)
                await self._item_slots.acquire()
                try:
                    held = await self._hold(item)
                except BaseException:
                    self._item_slots.release()
                    raise
                task = asyncio.create_task(handle(item, held))
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
            self._raise_if_disk_full(exc, unit)
            self.manifest.fail(unit.id, redact(f"{type(exc).__name__}: {exc}"))
            self.counters.units_failed += 1
            return
        # Every item is accounted for: publish the unit. A stop request arriving now waits for
        # the commit instead of racing it (a half-renamed unit would be neither done nor undone).
        publish = asyncio.ensure_future(asyncio.to_thread(writer.finish))
        try:
            dirs = await asyncio.shield(publish)
        except asyncio.CancelledError:
            self._commit(unit, counts, bytes_in, writer, await publish, retryable)
            raise
        except Exception as exc:
            await asyncio.to_thread(writer.discard)
            self._raise_if_disk_full(exc, unit)
            raise
        self._commit(unit, counts, bytes_in, writer, dirs, retryable)

    def _items(self, unit: Unit) -> AsyncIterator[Item]:
        """A unit's items: from its source, or (a --retry-failed unit) those items of the
        original unit whose keys the manifest remembers as failed."""
        if "retry_of" in unit.spec:
            original = self.manifest.unit(unit.spec["retry_of"])
            return _only(self.source.items(original), self.manifest.failed_keys(original.id))
        return self.source.items(unit)

    async def _hold(self, item: Item) -> int:
        """Count a body the source already holds (an archive member) against --max-inflight-mb,
        waiting while the budget is spent; returns its ticket (0: nothing held)."""
        if item.data is None or not body_len(item.data):
            return 0
        return await self.fetcher.budget.hold(body_len(item.data))

    def _commit(self, unit: Unit, counts: Counter[str], bytes_in: int, writer: UnitWriter, dirs: list[str],
                failed: list[tuple[str, str]]) -> None:
        try:
            if "retry_of" in unit.spec:
                self.manifest.finish_retry(unit.id, unit.spec["retry_of"], dict(counts), bytes_in, writer.bytes, dirs, failed)
            else:
                self.manifest.finish(unit.id, dict(counts), bytes_in, writer.bytes, dirs, failed)
        except sqlite3.OperationalError as exc:
            self._raise_if_disk_full(exc, unit)
            raise
        self.counters.units_done += 1

    def _raise_if_disk_full(self, exc: BaseException, unit: Unit) -> None:
        if not is_disk_full(exc):
            return
        done = self.manifest.records(DONE)
        kept = sum(r.counts.get("kept", 0) for r in done)
        per_image = sum(r.bytes_out for r in done) / kept if kept else 100_000
        needed = int(per_image * (unit.rows or 10_000) * MAX_OPEN_UNITS)
        path = getattr(exc, "filename", None) or self.layout.root
        raise DiskFull(Path(path), needed) from exc

    async def _process(self, item: Item, writer: UnitWriter) -> tuple[str | None, int]:
        """Fetch (if needed), resize and write one item; returns (reason or None, bytes in)."""
        if item.reject:
            return item.reject, 0
        if item.data is not None:  # archive members count as bytes in
            return self._store(item, item.data, writer, await self.resizer.process(item.data)), body_len(item.data)
        result = await self.fetcher.fetch(item.url or "")
        if result.data is None:
            return result.reason, 0
        try:
            return self._store(item, result.data, writer, await self.resizer.process(result.data)), len(result.data)
        finally:
            self.fetcher.release(result)

    def _store(self, item: Item, data: Body, writer: UnitWriter, processed: Processed) -> str | None:
        """Write the kept image; returns the rejection reason instead when there is one."""
        if processed.reason is not None:
            return processed.reason
        row: dict[str, Any] = {k: _null_value(self.columns[k]) if v is None else v for k, v in item.extra.items() if k in self.columns}
        if row.get("url"):
            row["url"] = public_url(row["url"])  # no userinfo or signature is ever stored
        row.update(
            jpg=processed.data if processed.data is not None else data,
            caption=item.caption or "",
            width=processed.width,
            height=processed.height,
            original_width=processed.original_width,
            original_height=processed.original_height,
            key=item.key,
        )
        if self.layout.format is OutputFormat.MOSAIC:
            row = formats.to_mosaic(row, item.extra)
        writer.write(row)
        self.counters.bytes_out += body_len(row["jpg"])
        return None

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
