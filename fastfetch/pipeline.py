"""Wires the stages: source units → items → fetch → resize → per-unit MDS → manifest commit.

Items of several units are in flight at once (the next unit starts as soon as the previous
one has handed out all its items), so the slow tail of one unit never idles the network or
the resize pool. A unit is committed only when all its items are accounted for and its MDS
folder is renamed into place; an interrupted unit is rolled back and redone on the next run.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
import shutil
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import orjson

from fastfetch import formats, storage
from fastfetch.config import RunConfig, Selection
from fastfetch.dedup import DedupIndex, JudgeOrder, KeptRow
from fastfetch.errors import UsageError, changes
from fastfetch.http import Fetcher
from fastfetch.manifest import DONE, Manifest
from fastfetch.mds import BASE_COLUMNS, Layout, clean_unfinished, merge_index
from fastfetch.nodes import Node
from fastfetch.redact import redact
from fastfetch.resize_pool import ResizePool
from fastfetch.sources.base import Item, Source, Unit
from fastfetch.stats import Progress, RunCounters
from fastfetch.storage import StorageError, is_disk_full
from fastfetch.unit import UnitFailed, UnitResult, UnitSpec, UnitWork, cancel_all, only

MAX_OPEN_UNITS = 4  # units fetching at once
#: with --dedup: units open at once, those whose rows are written and wait for their turn to be judged included
MAX_UNCOMMITTED = 4 * MAX_OPEN_UNITS
#: runs one unit in another process and returns its result (``fastfetch.cluster``)
Submit = Callable[[UnitSpec], Awaitable[UnitResult]]


class DiskFull(Exception):
    """The output filesystem is full: the run stops (units in flight are rolled back)."""

    def __init__(self, path: Path, needed: int) -> None:
        free = shutil.disk_usage(path if path.is_dir() else path.parent).free if path.parent.exists() else 0
        super().__init__(
            f"no space left on the device holding {path} ({free / 1e6:.1f} MB free; about "
            f"{needed / 1e6:.0f} MB are needed for the units in flight). Free some space or choose "
            "another --out, then rerun the same command: finished units are kept"
        )


def select(units: list[Unit], selection: Selection, node: Node, first: int = 0) -> list[Unit]:
    """The selected units this node works on, of a plan's units from position ``first`` on:
    those whose id hashes to this node. A unit belongs to the same node whatever the selection,
    so a run with a larger selection (``--subset all`` after ``small``) never gives a finished
    unit to another node."""
    selected = _selected(units, selection, first)
    if node.count == 1:
        return selected
    return [u for u in selected if node_of(u.id, node.count) == node.rank]


def _selected(units: list[Unit], selection: Selection, first: int) -> list[Unit]:
    if selection.ids:  # a number picks that unit of every split chosen (train-000 and valid-000), in plan order
        numbered = [(unit_number(u.id, i), u) for i, u in enumerate(units, first)]
        have = {n for n, _ in numbered}
        missing = [i for i in selection.ids if i not in have]
        if missing:
            shown = sorted(have)
            raise UsageError(
                f"--ids {' '.join(map(str, missing))}: no such unit; this dataset has units "
                f"{shown[0]}..{shown[-1]} ({len(units)} in all)"
            )
        wanted = set(selection.ids)
        return [u for n, u in numbered if n in wanted]
    if selection.subset == "small":
        return [u for i, u in enumerate(units, first) if i % 100 == 0]
    return units


class PlanDigest:
    """What identifies a plan: its units and their specs (nodes must plan the same units),
    hashed as they are planned."""

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(b"[", digest_size=16)
        self._units = 0

    def update(self, units: list[Unit]) -> None:
        for u in units:
            self._hash.update(b"," if self._units else b"")
            self._hash.update(orjson.dumps([u.id, u.spec], option=orjson.OPT_SORT_KEYS))
            self._units += 1

    def hexdigest(self) -> str:
        final = self._hash.copy()
        final.update(b"]")
        return final.hexdigest()


async def _batches(units: list[Unit]) -> AsyncIterator[list[Unit]]:
    if units:
        yield units


async def _each(batches: list[tuple[int, list[Unit]]]) -> AsyncIterator[tuple[int, list[Unit]]]:
    for batch in batches:
        yield batch


def node_of(unit_id: str, node_count: int) -> int:
    """The node a unit belongs to (a hash of its id: stable, and even over many units)."""
    return int.from_bytes(hashlib.blake2b(unit_id.encode(), digest_size=8).digest(), "little") % node_count


def unit_number(unit_id: str, position: int) -> int:
    """The number a user selects a unit by: trailing digits of its id (sa_000020 → 20)."""
    match = re.search(r"(\d+)\D*$", unit_id)
    return int(match.group(1)) if match else position


class Pipeline:
    """One fetch run over the selected units of one source: plans, schedules units (several
    open at once), and records each unit's result in the manifest (its only writer)."""

    def __init__(
        self,
        source: Source,
        layout: Layout,
        fetcher: Fetcher,
        resizer: ResizePool,
        manifest: Manifest,
        counters: RunCounters,
        node: Node,
        progress_enabled: bool = True,
        dedup: DedupIndex | None = None,
    ) -> None:
        self.source = source
        self.layout = layout
        self.fetcher = fetcher
        self.resizer = resizer
        self.manifest = manifest
        self.counters = counters
        self.node = node
        self.progress_enabled = progress_enabled
        self.dedup = dedup
        self.order = JudgeOrder()  # with --dedup, units are judged in the order they were scheduled
        self.progress: Progress | None = None
        self.columns: dict[str, str] = {}
        self.plan_digest = ""  # known once the plan is read to its end
        self.confirmed: set[str] = set()  # units this run's plan has recorded so far
        self.scheduled = 0  # units this run has started
        self._item_slots = asyncio.Semaphore(fetcher.cfg.concurrency + resizer.capacity)

    async def prepare(self, selection: Selection) -> AsyncIterator[list[Unit]]:
        """Start planning, drop unfinished leftovers, settle the columns; returns the units still
        to do, in batches as the source plans them, each batch recorded in the manifest first
        (with ``--retry-failed``: only retry units for earlier transient failures, once the
        whole plan is recorded). ``plan_digest`` is known once the batches are exhausted."""
        self.source.discard_leftovers()
        planned = aiter(self.source.plan_batches())
        first: list[Unit] = await anext(planned, [])  # the source's columns are settled once its first units are out
        if self.layout.remote:
            self._redo_units_missing_remotely()
        done = {r.id for r in self.manifest.records(DONE)}
        clean_unfinished(self.layout, self.manifest.ids(), done)
        if self.dedup is not None:
            self._check_dedup_index(bool(done))
            self.dedup.keep_only(done)
        self.columns = self._columns(bool(done))
        digest = PlanDigest()
        self._record(first, 0, done, digest)  # before anything can stop the run: what publishing relies on
        recorded = self._recorded(first, planned, done, digest)
        if selection.retry_failed:
            async for _ in recorded:  # the whole plan recorded, none of it run
                pass
            return _batches(self.manifest.retry_units())
        if selection.ids:  # a unit number is looked up in the whole plan
            units = [u async for _, batch in recorded for u in batch]
            return _batches([u for u in select(units, selection, self.node) if u.id not in done])
        if self.dedup is not None:  # every changed unit leaves the index before any unit is judged
            return self._todo(_each([batch async for batch in recorded]), selection, done)
        return self._todo(recorded, selection, done)

    def _check_dedup_index(self, have_done_units: bool) -> None:
        """The dedup index is the one the done units were judged against (not deleted, not
        replaced), and this dataset's entries are filed under the owner id its manifest keeps."""
        assert self.dedup is not None
        known = self.manifest.get_meta("dedup_index")
        if have_done_units and known is not None and known != self.dedup.id:
            raise UsageError(
                f"the dedup index {self.dedup.path} is not the one this output's finished units were judged against "
                "(it was deleted or replaced): put that file back, or choose a new --out"
            )
        self.manifest.set_meta("dedup_index", self.dedup.id)
        owner = self.manifest.get_meta("dedup_owner")
        if owner is None:
            owner = uuid.uuid4().hex
            self.manifest.set_meta("dedup_owner", owner)
        self.dedup.claim(owner, fresh=not have_done_units)
        if have_done_units and not self.dedup.holds_any() and any(r.counts.get("kept") for r in self.manifest.records(DONE)):
            raise UsageError(
                f"the dedup index {self.dedup.path} no longer holds this output's kept images (a dataset rebuilt where this "
                "one was before took them back): choose a new --out, or rebuild this one from scratch"
            )

    def _record(self, batch: list[Unit], position: int, done: set[str], digest: PlanDigest) -> None:
        """Record a batch of the plan (from ``position`` on) in the manifest: a unit whose spec
        changed is done no more, and its folders go."""
        digest.update(batch)
        self.confirmed.update(u.id for u in batch)
        changed = self.manifest.sync_plan(batch, position)
        if self.dedup is not None and changed:
            for dependent in sorted(self.dedup.dependents(changed) & done):  # they dropped images a changed unit had kept
                changed += self.manifest.redo(self.manifest.unit(dependent).retry_of or dependent)
            self.dedup.forget(changed)
        for changed_id in changed:
            done.discard(changed_id)
            for rel in self.layout.unit_rels(changed_id):
                shutil.rmtree(self.layout.root / rel, ignore_errors=True)

    async def _recorded(
        self, first: list[Unit], rest: AsyncIterator[list[Unit]], done: set[str], digest: PlanDigest
    ) -> AsyncIterator[tuple[int, list[Unit]]]:
        """Each batch of the plan with the position of its first unit, recorded before it is
        given (the first one already is); ``plan_digest`` is set once the plan is exhausted."""
        yield 0, first
        position = len(first)
        async for batch in rest:
            self._record(batch, position, done, digest)
            yield position, batch
            position += len(batch)
        self.plan_digest = digest.hexdigest()

    async def _todo(
        self, recorded: AsyncIterator[tuple[int, list[Unit]]], selection: Selection, done: set[str]
    ) -> AsyncIterator[list[Unit]]:
        """The selected units of each recorded batch that are not done yet."""
        async for position, batch in recorded:
            todo = [u for u in select(batch, selection, self.node, position) if u.id not in done]
            if todo:
                yield todo

    def _redo_units_missing_remotely(self) -> None:
        """A done unit whose objects are gone from the remote output (a lifecycle rule, a
        cleanup by hand) is done no more: it is redone, instead of being merged into an index
        that names missing shards."""
        assert self.layout.remote is not None
        present = set(storage.relative_names(self.layout.remote))
        redone: set[str] = set()
        for record in self.manifest.records(DONE):
            original = record.retry_of or record.id  # a retry's rows are its unit's
            if original in redone:
                continue
            for rel in record.dirs:
                local = self.layout.root / rel / "index.json"
                names = ["index.json"]
                if local.exists():
                    names += [s["raw_data"]["basename"] for s in orjson.loads(local.read_bytes())["shards"]]
                missing = [n for n in names if f"{rel}/{n}" not in present]
                if missing:
                    print(
                        f"unit {record.id}: {len(missing)} of its objects are missing from {self.layout.remote}/{rel}; "
                        f"redoing {original}",
                        file=sys.stderr,
                    )
                    for gone in self.manifest.redo(original):  # with its retry units: it is done again whole
                        for gone_rel in self.layout.unit_rels(gone):
                            shutil.rmtree(self.layout.root / gone_rel, ignore_errors=True)
                    redone.add(original)
                    break

    def _columns(self, have_done_units: bool) -> dict[str, str]:
        """The MDS columns of every unit: fastfetch's own, then the source's, which may never
        replace one of fastfetch's; and the same as the done units were written with."""
        extra = {**self.source.extra_columns(), **{name: "str" for name in self.resizer.cfg.hashes}}
        clash = sorted(set(self.source.extra_columns()) & (set(BASE_COLUMNS) | set(self.resizer.cfg.hashes)))
        if clash:
            raise UsageError(
                f"column(s) {', '.join(clash)} would replace the one(s) fastfetch writes itself; keep them under "
                f"another name (--keep-cols {clash[0]}:list_{clash[0]})"
            )
        columns = formats.columns(self.layout.format, BASE_COLUMNS, extra)
        previous = self.manifest.get_meta("columns")
        if have_done_units and previous is not None and previous != columns:
            diff = changes(previous, columns, show=str, absent="absent")
            raise UsageError(
                f"the input's columns changed since the finished units were written ({diff}); rerun with the "
                "lists that built them, or choose a new --out"
            )
        self.manifest.set_meta("columns", columns)
        return columns

    async def run(self, todo: AsyncIterator[list[Unit]]) -> None:
        """Run units with a bounded number open at once; returns when all are committed."""
        open_units: set[asyncio.Task[None]] = set()
        fatal: list[BaseException] = []  # what stops the run (a full disk, lost storage), from any unit

        def settle(task: asyncio.Task[None]) -> None:
            open_units.discard(task)
            if not task.cancelled() and task.exception() is not None:
                fatal.append(task.exception())  # type: ignore[arg-type]

        try:
            async for unit in self._scheduled(todo):
                handed_out = asyncio.Event()
                task = asyncio.create_task(self._run_unit(unit, handed_out, self.order.take()), name=f"unit-{unit.id}")
                open_units.add(task)
                task.add_done_callback(settle)
                waiter = asyncio.create_task(handed_out.wait())
                try:
                    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                while self._full(open_units) and not fatal:
                    moved = asyncio.create_task(self.order.moved())
                    try:
                        await asyncio.wait([*open_units, moved], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        moved.cancel()
                if fatal:
                    raise fatal[0]
            if open_units:
                await asyncio.wait(open_units, return_when=asyncio.FIRST_EXCEPTION)
            if fatal:
                raise fatal[0]
        finally:
            await cancel_all(open_units)
            self._close_progress()

    def _full(self, open_units: set[asyncio.Task[None]]) -> bool:
        """No unit may start now: enough are fetching (units waiting for their turn to be judged
        fetch no more), or too many are open."""
        return len(open_units) - self.order.waiting >= MAX_OPEN_UNITS or len(open_units) >= MAX_UNCOMMITTED

    async def run_elsewhere(self, todo: AsyncIterator[list[Unit]], submit: Submit, in_flight: int, config: RunConfig) -> None:
        """Run units in other processes (``submit`` runs one there and returns its result), at
        most ``in_flight`` at once; each result is recorded here as it comes back."""
        running: set[asyncio.Task[None]] = set()
        try:
            async for unit in self._scheduled(todo):
                while len(running) >= in_flight:
                    finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    for task in finished:
                        task.result()  # what stops the run (the manifest's disk is full) stops it here
                self.manifest.start(unit.id)
                running.add(asyncio.create_task(self._run_elsewhere(unit, submit, config), name=f"unit-{unit.id}"))
            while running:
                finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    task.result()
        finally:
            await cancel_all(running)
            self._close_progress()

    async def _scheduled(self, todo: AsyncIterator[list[Unit]]) -> AsyncIterator[Unit]:
        """The units to run, one by one, as planning gives them; the progress bar's total grows
        with each batch."""
        async for batch in todo:
            if self.progress is None:
                self.progress = Progress(0, self.counters, self.progress_enabled)
            self.progress.grow(sum(u.rows or 0 for u in batch))
            self.scheduled += len(batch)
            for unit in batch:
                yield unit

    def _close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()

    async def _run_elsewhere(self, unit: Unit, submit: Submit, config: RunConfig) -> None:
        try:
            result = await submit(self.unit_spec(unit, config))
        except asyncio.CancelledError:
            self.manifest.reset(unit.id)  # a stop: whatever the task left is unfinished, redone next run
            raise
        except StorageError:  # the output's storage went away: the run stops, as on one machine
            raise
        except Exception as exc:  # the unit failed there, or its task could not be run: the run goes on
            self._raise_if_disk_full(exc, unit)  # unless the output's disk is full
            if getattr(exc, "storage", False):
                raise StorageError(str(exc)) from exc
            self.manifest.fail(unit.id, redact(str(exc) if isinstance(exc, UnitFailed) else f"{type(exc).__name__}: {exc}"))
            self.counters.units_failed += 1
            return
        missing = [rel for rel in result.dirs if not self.layout.remote and not (self.layout.root / rel / "index.json").exists()]
        if missing:  # written on a machine whose folder this one does not see
            self.manifest.fail(
                unit.id,
                f"unit {unit.id} was written where this machine cannot see it ({self.layout.root / missing[0]} is missing): "
                "with --ray, --out must be a folder every node sees, or object storage (s3://…) with --local-cache",
            )
            self.counters.units_failed += 1
            return
        self._commit(unit, result)
        prefiltered = unit.prefiltered  # counted in the unit, not by this run's items
        for reason, n in result.counts.items():
            self._count_many(None if reason == "kept" else reason, n - prefiltered.get(reason, 0))
        self.counters.bytes_in += result.bytes_in
        self.counters.bytes_out += result.bytes_out

    def unit_spec(self, unit: Unit, config: RunConfig) -> UnitSpec:
        """What a unit needs to run in another process: a retry unit takes its original's
        items (the failed ones only); the source may ship the unit's input with it."""
        if unit.retry_of is None:
            return UnitSpec(config, unit, self.columns, payload=self.source.unit_payload(unit))
        original = self.manifest.unit(unit.retry_of)
        failed = frozenset(self.manifest.failed_keys(original.id))
        return UnitSpec(config, unit, self.columns, failed, original, self.source.unit_payload(original))

    def merge(self) -> int:
        """Rebuild the merged index over every done unit (also after an interruption)."""
        return merge_index(self.layout, self.done_dirs())

    def done_dirs(self) -> list[str]:
        """The MDS folders of every done unit (relative to the MDS root). Until this run has read
        its plan to the end, only of the units it confirmed: a done unit further on may be one
        the edited list changes, which the plan has not reached yet."""
        records = self.manifest.records(DONE)
        if not self.plan_digest:
            records = [r for r in records if (r.retry_of or r.id) in self.confirmed]
        return [rel for r in records for rel in r.dirs]

    # -- one unit ----------------------------------------------------------------------------
    async def _run_unit(self, unit: Unit, handed_out: asyncio.Event, ticket: int) -> None:
        try:
            await self._run_unit_in_turn(unit, handed_out, ticket)
        finally:
            self.order.release(ticket)

    async def _run_unit_in_turn(self, unit: Unit, handed_out: asyncio.Event, ticket: int) -> None:
        self.manifest.start(unit.id)
        judge = None if self.dedup is None else functools.partial(self._judge, ticket)
        work = UnitWork(self.layout, self.columns, self.fetcher, self.resizer, self._item_slots, self._count, judge=judge)
        committed: list[UnitResult] = []

        def commit(result: UnitResult) -> None:
            self._commit(unit, result)
            committed.append(result)

        try:
            await work.run(unit, self._items(unit), handed_out, commit)
        except asyncio.CancelledError:
            if not committed:  # a stop before the publish: the unit is redone by the next run
                self.manifest.reset(unit.id)
            raise
        except UnitFailed as exc:  # the run goes on without this unit (unless the disk is full)
            self._raise_if_disk_full(exc, unit)
            self.manifest.fail(unit.id, redact(str(exc)))
            self.counters.units_failed += 1
        except Exception as exc:  # publishing failed: the output is in trouble, the run stops
            self._raise_if_disk_full(exc, unit)
            raise

    async def _judge(self, ticket: int, unit: Unit, rows: list[KeptRow]) -> dict[int, str]:
        """--dedup: a unit's duplicates, once every unit scheduled before it was judged (the
        next may be judged as soon as this one is: its kept images are in the index); the run's
        counters move them from kept to their reason."""
        assert self.dedup is not None
        await self.order.turn(ticket)
        try:
            duplicates = await asyncio.to_thread(self.dedup.judge, unit.id, rows)
        finally:
            self.order.release(ticket)
        for row in rows:
            if row.position in duplicates:
                self.counters.kept -= 1
                self.counters.rejected[duplicates[row.position]] += 1
                self.counters.bytes_out -= row.nbytes
        return duplicates

    def _items(self, unit: Unit) -> AsyncIterator[Item]:
        """A unit's items: from its source, or (a --retry-failed unit) those items of the
        original unit whose keys the manifest remembers as failed."""
        if unit.retry_of is not None:
            original = self.manifest.unit(unit.retry_of)
            return only(self.source.items(original), self.manifest.failed_keys(original.id))
        return self.source.items(unit)

    def _commit(self, unit: Unit, result: UnitResult) -> None:
        counts, dirs, failed = result.counts, list(result.dirs), list(result.retryable)
        try:
            if unit.retry_of is not None:
                self.manifest.finish_retry(unit.id, unit.retry_of, counts, result.bytes_in, result.bytes_out, dirs, failed)
            else:
                self.manifest.finish(unit.id, counts, result.bytes_in, result.bytes_out, dirs, failed)
        except sqlite3.OperationalError as exc:
            self._raise_if_disk_full(exc, unit)
            raise
        self.counters.units_done += 1

    def _raise_if_disk_full(self, exc: BaseException, unit: Unit) -> None:
        if not (is_disk_full(exc) or getattr(exc, "disk_full", False)):
            return
        done = self.manifest.records(DONE)
        kept = sum(r.counts.get("kept", 0) for r in done)
        per_image = sum(r.bytes_out for r in done) / kept if kept else 100_000
        needed = int(per_image * (unit.rows or 10_000) * (MAX_UNCOMMITTED if self.dedup is not None else MAX_OPEN_UNITS))
        path = getattr(exc, "filename", None) or getattr(exc.__cause__, "filename", None) or self.layout.root
        raise DiskFull(Path(path), needed) from exc

    def _count(self, reason: str | None, bytes_in: int, bytes_out: int) -> None:
        self.counters.bytes_in += bytes_in
        self.counters.bytes_out += bytes_out
        self._count_many(reason, 1)

    def _count_many(self, reason: str | None, n: int) -> None:
        if n <= 0:
            return
        c = self.counters
        c.items += n
        if reason is None:
            c.kept += n
        else:
            c.rejected[reason] += n
        if self.progress is not None:
            self.progress.update(n)
