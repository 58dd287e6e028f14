"""Content dedup (``--dedup exact|near``): which kept images repeat an image kept before.

"Before" is plan order, and it must not depend on which download happened to finish first, so
a deduplicating run judges its units in the order it scheduled them (``JudgeOrder``: a unit whose
rows are written waits until every unit scheduled before it was judged). At its turn a unit's
kept rows are judged (``DedupIndex.judge``) against the index, which holds every image kept by the
units judged before it (in this run, in earlier runs into the same ``--out``, and in other
datasets sharing a ``--dedup-index``), and against each other (within a unit, the earlier item
wins); the images it keeps enter the index in the same transaction, so that two runs sharing
the index never both keep one image. Then the unit's shards are written again without the
duplicates and it is published and recorded as usual, while later units are judged.

A kill at any moment converges: the next run drops the index entries of its units that the
manifest does not hold as done (``keep_only``) and redoes those units, which lost nothing to the
units judged after them (those saw their entries). Until then, other datasets sharing the index
see a killed run's entries as kept.

* ``exact``: the same original bytes (sha256), counted ``duplicate_content``;
* ``near``: also a perceptual hash (``imaging.phash``, 64 bits) within ``NEAR_BITS`` of a kept
  one, counted ``near_duplicate``; the search is exact (``nearsearch.HammingIndex``, held in
  memory: ~24 bytes per kept image), its cost per image in benchmarks/RESULTS.md. An image too
  plain to have a perceptual hash (a flat colour) is judged on its bytes only.

The index is SQLite: one file, shared by datasets through ``--dedup-index`` (a judgement is one
write transaction: concurrent runs take turns through its lock). Each entry names its dataset
(``owner``: the output it was kept for) and unit, so that a dataset only ever drops its own
entries; the file records its mode (datasets sharing it dedup alike) and an id, which the
manifest remembers (a deleted or replaced index is noticed, not silently started anew).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import uuid
from collections.abc import Collection, Coroutine, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastfetch.errors import Reason as R
from fastfetch.errors import UsageError
from fastfetch.manifest import Transaction

if TYPE_CHECKING:
    from fastfetch.nearsearch import HammingIndex

#: the most bits two perceptual hashes may differ in for the images to be near duplicates
#: (re-encoded and resized copies differ in 0–6, crops of 2–5 % in up to 20, distinct photos of
#: one scene in 18 or more: benchmarks/RESULTS.md, "Near-duplicate dedup")
NEAR_BITS = 10

_TABLES = {"meta", "exact", "near", "sqlite_sequence"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS exact (digest BLOB PRIMARY KEY, owner TEXT NOT NULL, unit TEXT NOT NULL, key TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS exact_unit ON exact(owner, unit);
CREATE TABLE IF NOT EXISTS near (
    id INTEGER PRIMARY KEY AUTOINCREMENT, phash INTEGER NOT NULL, owner TEXT NOT NULL, unit TEXT NOT NULL, key TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS near_unit ON near(owner, unit);
"""


class DedupMode(Enum):
    EXACT = "exact"
    NEAR = "near"


@dataclass(frozen=True, slots=True)
class KeptRow:
    """A row a unit wrote, as dedup judges it."""

    position: int  # the item's place in its unit's plan order
    where: tuple[str, int]  # where the writer put it (bucket, row)
    key: str
    sha256: str
    phash: str  # "" unless --dedup near
    nbytes: int  # its stored image's bytes


class DedupIndex:
    """The kept images' digests, in an SQLite file; every method is one transaction."""

    def __init__(self, path: Path, owner: str, mode: DedupMode) -> None:
        self.path, self.owner, self.mode = path, owner, mode
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, timeout=600, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            with self._tx():
                foreign = {n for (n,) in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")} - _TABLES
                if foreign:  # a manifest, another tool's database: never written into
                    raise UsageError(f"it holds tables of something else ({', '.join(sorted(foreign))})")
                for statement in filter(str.strip, _SCHEMA.split(";")):  # executescript would commit first
                    self.db.execute(statement)
                for key, value in (("mode", mode.value), ("id", uuid.uuid4().hex)):
                    self.db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))
                meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        except (OSError, sqlite3.Error, UsageError) as exc:
            raise UsageError(f"--dedup-index {path}: cannot be used as a dedup index ({exc}); choose another file") from exc
        if meta["mode"] != mode.value:
            raise UsageError(
                f"the dedup index {path} is one of --dedup {meta['mode']}: every dataset sharing an index dedups alike "
                f"(use --dedup {meta['mode']}, or another --dedup-index)"
            )
        self.id: str = meta["id"]  # what the manifest remembers, to notice an index deleted or replaced
        self._near: HammingIndex | None = None  # the index's perceptual hashes, loaded on first use
        self._near_seen = 0  # the last ``near`` entry loaded
        self._lock = threading.Lock()  # judge runs in a thread, the rest on the event loop

    def close(self) -> None:
        with self._lock:  # a judge left running by a cancelled unit finishes first
            self.db.close()

    def keep_only(self, done: Collection[str]) -> None:
        """Drop this dataset's entries of units that are not done (judged, then killed before the
        manifest recorded them)."""
        with self._lock, self._tx():
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS done_units (id TEXT PRIMARY KEY)")
            self.db.execute("DELETE FROM done_units")
            self.db.executemany("INSERT OR IGNORE INTO done_units VALUES (?)", [(u,) for u in done])
            for table in ("exact", "near"):
                self.db.execute(f"DELETE FROM {table} WHERE owner=? AND unit NOT IN (SELECT id FROM done_units)", (self.owner,))
            self._near = None

    def forget(self, units: Iterable[str]) -> None:
        """Drop this dataset's entries of these units (their spec changed: they are redone)."""
        rows = [(self.owner, u) for u in units]
        if not rows:
            return
        with self._lock, self._tx():
            for table in ("exact", "near"):
                self.db.executemany(f"DELETE FROM {table} WHERE owner=? AND unit=?", rows)
            self._near = None

    def judge(self, unit_id: str, rows: list[KeptRow]) -> dict[int, str]:
        """The duplicates among a unit's kept rows (position → reason), judged against the index
        and against the unit's earlier rows; the rows it keeps enter the index at once, in the
        same transaction (until the manifest records the unit done, ``keep_only`` may drop them)."""
        with self._lock, self._tx():
            known = self._known_digests([r.sha256 for r in rows])
            seen: set[str] = set()
            near, in_unit = (self._near_codes(), _hamming_index()) if self.mode is DedupMode.NEAR else (None, None)
            dropped: dict[int, str] = {}
            kept: list[KeptRow] = []
            for row in sorted(rows, key=lambda r: r.position):
                if row.sha256 in known or row.sha256 in seen:
                    dropped[row.position] = R.DUPLICATE_CONTENT
                    continue
                if near is not None and in_unit is not None and row.phash:
                    code = int(row.phash, 16)
                    if near.near(code) or in_unit.near(code):
                        dropped[row.position] = R.NEAR_DUPLICATE
                        continue
                    in_unit.add(code)
                seen.add(row.sha256)
                kept.append(row)
            self.db.executemany(
                "INSERT INTO exact(digest, owner, unit, key) VALUES (?,?,?,?)",
                [(bytes.fromhex(r.sha256), self.owner, unit_id, r.key) for r in kept],
            )
            if near is not None:
                self.db.executemany(
                    "INSERT INTO near(phash, owner, unit, key) VALUES (?,?,?,?)",
                    [(_signed(int(r.phash, 16)), self.owner, unit_id, r.key) for r in kept if r.phash],
                )
            return dropped

    def _known_digests(self, digests: list[str]) -> set[str]:
        known: set[str] = set()
        for i in range(0, len(digests), 500):
            chunk = [bytes.fromhex(d) for d in digests[i : i + 500]]
            marks = ",".join("?" * len(chunk))
            known.update(r[0].hex() for r in self.db.execute(f"SELECT digest FROM exact WHERE digest IN ({marks})", chunk))
        return known

    def _near_codes(self) -> HammingIndex:
        """The index's perceptual hashes in memory: loaded whole at first, then what was added
        since (by this run's units and by other datasets sharing the file). Entries other runs
        drop stay here until this run reloads (after a ``forget``): they are of units not done."""
        import numpy as np

        if self._near is None:
            self._near, self._near_seen = _hamming_index(), 0
        rows = self.db.execute("SELECT id, phash FROM near WHERE id > ? ORDER BY id", (self._near_seen,))
        while chunk := rows.fetchmany(1 << 18):  # a large index is read in pieces, not as one list of tuples
            pairs = np.array(chunk, dtype=np.int64)
            self._near.add(pairs[:, 1].view(np.uint64))
            self._near_seen = int(pairs[-1, 0])
        return self._near

    def _tx(self) -> Transaction:
        return Transaction(self.db)


def _hamming_index() -> HammingIndex:
    from fastfetch.nearsearch import HammingIndex  # numpy, only for --dedup near

    return HammingIndex(NEAR_BITS)


def _signed(value: int) -> int:
    """A 64-bit hash as SQLite's signed integer."""
    return value - (1 << 64) if value >= 1 << 63 else value


class JudgeOrder:
    """Units are judged in the order they were scheduled: each takes a ticket when scheduled,
    waits for its ``turn`` once its rows are written, and ``release``s the ticket once judged (or
    failed, or cancelled); a turn comes once every earlier ticket is released."""

    def __init__(self) -> None:
        self._issued = 0
        self._released: set[int] = set()
        self._first_held = 0
        self._moved = asyncio.Event()  # set (and replaced) whenever a unit starts waiting or a ticket is released
        self.waiting = 0  # units whose rows are written, waiting for their turn (they fetch no more)

    def take(self) -> int:
        self._issued += 1
        return self._issued - 1

    async def turn(self, ticket: int) -> None:
        self.waiting += 1
        self._move()
        try:
            while self._first_held != ticket:
                await self._moved.wait()
        finally:
            self.waiting -= 1

    def release(self, ticket: int) -> None:
        """Release a ticket (again: nothing happens)."""
        if ticket < self._first_held:
            return
        self._released.add(ticket)
        while self._first_held in self._released:
            self._released.discard(self._first_held)
            self._first_held += 1
        self._move()

    def moved(self) -> Coroutine[Any, Any, Any]:
        """What returns once a unit starts waiting for its turn or a ticket is released, from
        now on (the event is taken at the call, not when the coroutine first runs)."""
        return self._moved.wait()

    def _move(self) -> None:
        self._moved.set()
        self._moved = asyncio.Event()
