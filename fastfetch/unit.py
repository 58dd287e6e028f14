"""One unit's work: its items fetched (when they carry a URL), resized and written into the unit's
MDS folder, which is published (renamed into place) once every item is accounted for.

``UnitWork.run`` is what the pipeline runs for each unit while several are in flight; it
returns a ``UnitResult`` and never touches the manifest: whoever schedules units records the
result (the pipeline, or the driver of a cluster run). ``run_unit`` runs one unit on its own,
with the run's resources set up and torn down around it: the function a scheduler calls on a
worker machine with a typed ``UnitSpec``.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastfetch import formats
from fastfetch.body import Body, body_len
from fastfetch.config import RunConfig
from fastfetch.dedup import KeptRow
from fastfetch.errors import TRANSIENT
from fastfetch.errors import Reason as R
from fastfetch.formats import OutputFormat
from fastfetch.http import Fetcher
from fastfetch.imaging import PHASH, Processed
from fastfetch.mds import Layout, UnitWriter
from fastfetch.redact import public_url
from fastfetch.resize_pool import ResizePool
from fastfetch.sources.base import Item, Unit
from fastfetch.storage import StorageError, is_disk_full

#: called once per item: (reason or None when kept, bytes in, bytes written)
OnItem = Callable[[str | None, int, int], None]
#: --dedup: judges a unit's kept rows once every item is written (waiting for the unit's turn);
#: returns the duplicates' positions and reasons
Judge = Callable[[Unit, list[KeptRow]], Awaitable[dict[int, str]]]


@dataclass(frozen=True, slots=True)
class UnitResult:
    """What a finished unit produced: counts by reason (``kept`` included), bytes, its
    published folders (relative to the MDS root) and the items worth retrying."""

    unit_id: str
    counts: dict[str, int]
    bytes_in: int
    bytes_out: int
    dirs: tuple[str, ...]
    retryable: tuple[tuple[str, str], ...]  # (key, reason) of transient failures, for --retry-failed


class UnitFailed(Exception):
    """The unit could not be produced (an unreadable archive, a list file gone, a full disk):
    nothing of it was published. The cause is chained where it happened; ``disk_full`` and
    ``storage`` say what kind it was, also after the error crossed a process boundary (a Ray
    task's failure is pickled, its chain is not)."""

    def __init__(self, unit_id: str, cause: Exception | str, disk_full: bool | None = None, storage: bool | None = None) -> None:
        super().__init__(cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}")
        self.unit_id = unit_id
        self.disk_full = is_disk_full(cause) if disk_full is None and isinstance(cause, BaseException) else bool(disk_full)
        self.storage = isinstance(cause, StorageError) if storage is None else storage

    def __reduce__(self) -> tuple[Any, ...]:
        return (UnitFailed, (self.unit_id, str(self), self.disk_full, self.storage))


@dataclass(frozen=True, slots=True)
class UnitSpec:
    """One unit to run on its own: the run's configuration, the unit as planned, the columns
    every unit of the run is written with; a ``--retry-failed`` unit takes the items of
    ``source_unit`` (its original), ``only_keys`` of them; ``payload`` is what the source ships
    with a unit (``Source.unit_payload``)."""

    config: RunConfig
    unit: Unit
    columns: dict[str, str]
    only_keys: frozenset[str] | None = None
    source_unit: Unit | None = None
    payload: Any = None


async def run_unit(spec: UnitSpec, resizer: ResizePool | None = None) -> UnitResult:
    """Get the source ready for the unit (``Source.prepare_unit``), run ``spec.unit`` and
    publish its folder under the run's output. Raises what the unit raised; nothing is published
    then. ``resizer``: a resize pool to use (a process that runs unit after unit keeps one
    running); by default one is started and stopped around the unit."""
    cfg = spec.config
    own_pool = resizer is None
    if resizer is None:
        resizer = ResizePool(cfg.resize, cfg.workers)
    try:
        async with Fetcher(cfg.fetch) as fetcher:
            source = cfg.source(fetcher)
            await source.open()
            try:
                of = spec.source_unit or spec.unit
                await source.prepare_unit(of, spec.payload)  # what items() reads (caption lookups, the rows)
                items = source.items(of)
                if spec.only_keys is not None:
                    items = only(items, spec.only_keys)
                slots = asyncio.Semaphore(fetcher.cfg.concurrency + resizer.capacity)
                attempt = uuid.uuid4().hex[:12]
                work = UnitWork(cfg.layout(), spec.columns, fetcher, resizer, slots, lambda *_: None, attempt)
                return await work.run(spec.unit, items, asyncio.Event())
            finally:
                await source.close()
    finally:
        if own_pool:
            resizer.close()


async def _enumerate(items: AsyncIterator[Item]) -> AsyncIterator[tuple[int, Item]]:
    position = 0
    async for item in items:
        yield position, item
        position += 1


async def only(items: AsyncIterator[Item], keys: frozenset[str] | set[str]) -> AsyncIterator[Item]:
    async for item in items:
        if item.key in keys:
            yield item


class UnitWork:
    """Runs units through fetch → resize → write, sharing the run's fetcher, resize pool and
    item slots (which bound the items in flight over every open unit)."""

    def __init__(
        self,
        layout: Layout,
        columns: dict[str, str],
        fetcher: Fetcher,
        resizer: ResizePool,
        slots: asyncio.Semaphore,
        on_item: OnItem,
        attempt: str = "",
        judge: Judge | None = None,
    ) -> None:
        self.layout = layout
        self.columns = columns
        self.fetcher = fetcher
        self.resizer = resizer
        self.slots = slots
        self.on_item = on_item
        self.attempt = attempt  # this try's own temporary folder (``UnitWriter``)
        self.judge = judge

    async def run(
        self,
        unit: Unit,
        items: AsyncIterator[Item],
        handed_out: asyncio.Event,
        on_published: Callable[[UnitResult], None] | None = None,
    ) -> UnitResult:
        """Run one unit; ``handed_out`` is set once its last item is in flight (the next unit
        may start). The unit's folder is published when every item is accounted for, and
        ``on_published`` records it: a cancellation arriving during the publish waits for both,
        so that a unit is never left renamed into place yet unrecorded. Before that, a failure
        (``UnitFailed``) or a cancellation leaves nothing behind; a failure to publish is raised
        as it is (the output itself is in trouble)."""
        writer = UnitWriter(self.layout, unit.id, self.columns, self.attempt)
        counts: Counter[str] = Counter(unit.prefiltered)
        retryable: list[tuple[str, str]] = []
        kept: list[KeptRow] = []  # with --dedup
        keys: set[str] = set()
        bytes_in = 0
        tasks: set[asyncio.Task[None]] = set()

        failures: list[Exception] = []  # an item whose handling raised (a shard that could not be written)

        async def handle(item: Item, position: int, reject: str | None, held: int) -> None:
            nonlocal bytes_in
            try:
                reason, nbytes, written = await self._process(item, reject, writer, position, kept)
            except Exception as exc:
                failures.append(exc)
                return
            finally:
                self.slots.release()
                if held:
                    self.fetcher.budget.give(held, body_len(item.data or b""))
            bytes_in += nbytes
            counts["kept" if reason is None else reason] += 1
            if reason in TRANSIENT and item.url:
                retryable.append((item.key, reason))
            self.on_item(reason, nbytes, written)

        try:
            async for position, item in _enumerate(items):
                reject = item.reject
                if reject is None and item.key in keys:
                    reject = R.DUPLICATE_KEY  # an archive naming two members alike: the first one counts
                keys.add(item.key)
                await self.slots.acquire()
                try:
                    held = await self._hold(item, reject)
                except BaseException:
                    self.slots.release()
                    raise
                task = asyncio.create_task(handle(item, position, reject, held))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            handed_out.set()
            while tasks:
                await asyncio.gather(*list(tasks))
            if failures:  # the unit is not whole: it fails, and is redone by the next run
                raise failures[0]
            drop = {}
            if self.judge is not None:
                await asyncio.to_thread(writer.flush)  # what waits for its turn waits on disk, not in memory
                drop = await self.judge(unit, kept)
        except BaseException as exc:
            handed_out.set()
            await cancel_all(tasks)
            await asyncio.to_thread(writer.discard)
            if isinstance(exc, Exception):
                raise UnitFailed(unit.id, exc) from exc
            raise

        dropped = [r for r in kept if r.position in drop]
        counts.update(drop.values())
        counts["kept"] -= len(dropped)

        def result(dirs: list[str]) -> UnitResult:
            return UnitResult(unit.id, +counts, bytes_in, writer.bytes, tuple(dirs), tuple(retryable))

        finish = functools.partial(writer.finish, [r.where for r in dropped], sum(r.nbytes for r in dropped))
        publish = asyncio.ensure_future(asyncio.to_thread(finish))
        try:
            done = result(await asyncio.shield(publish))
        except asyncio.CancelledError:
            try:
                done = result(await publish)
            except Exception:
                await asyncio.to_thread(writer.discard)
                raise
            if on_published is not None:
                on_published(done)
            raise
        except BaseException:
            await asyncio.to_thread(writer.discard)
            raise
        if on_published is not None:
            on_published(done)
        return done

    async def _hold(self, item: Item, reject: str | None) -> int:
        """Count a body the source already holds (an archive member) against --max-inflight-mb,
        waiting while the budget is spent; returns its ticket (0: nothing held)."""
        if reject is not None or item.data is None or not body_len(item.data):
            return 0
        return await self.fetcher.budget.hold(body_len(item.data))

    async def _process(
        self, item: Item, reject: str | None, writer: UnitWriter, position: int, kept: list[KeptRow]
    ) -> tuple[str | None, int, int]:
        """Fetch (if needed), resize and write one item: (reason or None, bytes in, bytes written);
        with --dedup, a kept row is noted in ``kept``."""
        if reject:
            return reject, 0, 0
        if item.data is not None:  # archive members count as bytes in
            reason, written = self._store(item, item.data, writer, await self.resizer.process(item.data), position, kept)
            return reason, body_len(item.data), written
        result = await self.fetcher.fetch(item.url or "")
        if result.data is None:
            return result.reason, 0, 0
        try:
            reason, written = self._store(item, result.data, writer, await self.resizer.process(result.data), position, kept)
            return reason, len(result.data), written
        finally:
            self.fetcher.release(result)

    def _store(
        self, item: Item, data: Body, writer: UnitWriter, processed: Processed, position: int, kept: list[KeptRow]
    ) -> tuple[str | None, int]:
        """Write the kept image: (None, bytes written), or (the rejection reason, 0)."""
        if processed.reason is not None:
            return processed.reason, 0
        row: dict[str, Any] = {
            k: _null_value(self.columns[k]) if v is None else v for k, v in item.extra.items() if k in self.columns
        }
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
        digests = dict(zip(self.resizer.cfg.digests, processed.digests.split(","), strict=True)) if processed.digests else {}
        row.update((name, digests[name]) for name in self.resizer.cfg.hashes)
        if self.layout.format is OutputFormat.MOSAIC:
            row = formats.to_mosaic(row, item.extra)
        where = writer.write(row)
        nbytes = body_len(row["jpg"])
        if self.judge is not None:
            kept.append(KeptRow(position, where, item.key, digests["sha256"], digests.get(PHASH, ""), nbytes))
        return None, nbytes


def _null_value(encoding: str) -> Any:
    """What a missing value of an extra column is stored as (MDS has no nulls outside json)."""
    return {"float64": float("nan"), "float32": float("nan"), "str": ""}.get(encoding)


async def cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel the tasks still running and wait until they have rolled back."""
    for task in list(tasks):
        task.cancel()
    if tasks:
        await asyncio.gather(*list(tasks), return_exceptions=True)
