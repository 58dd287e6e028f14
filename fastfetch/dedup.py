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
  one's, with a mean colour within ``NEAR_COLOUR``, counted ``near_duplicate``; the search is exact (``nearsearch.HammingIndex``, held in
  memory: ~40 bytes per kept image), its cost per image in benchmarks/RESULTS.md. An image too
  plain to have a perceptual hash (a flat colour) is judged on its bytes only.

The index is SQLite: one file, shared by datasets through ``--dedup-index`` (a judgement is one
write transaction: concurrent runs take turns through its lock). Each entry names its dataset
(``owner``: an id the dataset's manifest keeps, so that a moved dataset is still itself; the
``owners`` table says where each was last, so that a dataset rebuilt from scratch at the same
place takes its predecessor's entries back) and unit, so that a dataset only ever drops its own
entries. ``drops`` records which units each unit's duplicates matched: a unit whose rows change
reopens the units that dropped copies of what it had kept (``dependents``). The file records
its mode (datasets sharing it dedup alike) and an id, which the manifest remembers (a deleted
or replaced index is noticed, not silently started anew).
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
from typing import Any

from fastfetch.errors import Reason as R
from fastfetch.errors import UsageError
from fastfetch.manifest import Transaction

#: the most bits two perceptual hashes may differ in for the images to be near duplicates
#: (re-encoded and resized copies differ in 0–6, crops of 2–5 % in up to 20, distinct photos of
#: one scene in 18 or more: benchmarks/RESULTS.md, "Near-duplicate dedup")
NEAR_BITS = 10
#: ... and the most their mean colours may differ in any channel (0–255): the hash is of the
#: grey image, and the same shape in another colour is another image
NEAR_COLOUR = 24

_TABLES = {"meta", "owners", "exact", "near", "drops", "sqlite_sequence"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS owners (owner TEXT PRIMARY KEY, place TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS exact (digest BLOB PRIMARY KEY, owner TEXT NOT NULL, unit TEXT NOT NULL, key TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS exact_unit ON exact(owner, unit);
CREATE TABLE IF NOT EXISTS near (
    id INTEGER PRIMARY KEY AUTOINCREMENT, phash INTEGER NOT NULL, colour INTEGER NOT NULL,
    owner TEXT NOT NULL, unit TEXT NOT NULL, key TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS near_unit ON near(owner, unit);
CREATE TABLE IF NOT EXISTS drops (
    owner TEXT NOT NULL, unit TEXT NOT NULL, matched_owner TEXT NOT NULL, matched_unit TEXT NOT NULL,
    PRIMARY KEY (owner, unit, matched_owner, matched_unit)
);
CREATE INDEX IF NOT EXISTS drops_matched ON drops(matched_owner, matched_unit);
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
    phash: str  # "" unless --dedup near (and "" for an image too plain for one): imaging.phash's hash and colour
    nbytes: int  # its stored image's bytes


class DedupIndex:
    """The kept images' digests, in an SQLite file; every method is one transaction.

    ``place`` is where this dataset is (its output, as the user named it); its entries are
    filed under an ``owner`` id its manifest keeps (``claim``), so that a dataset moved to
    another folder or machine still knows them as its own."""

    def __init__(self, path: Path, place: str, mode: DedupMode) -> None:
        self.path, self.place, self.mode = path, place, mode
        self.owner = ""  # known once claimed
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
        self._near: _NearCodes | None = None  # the index's perceptual hashes, loaded on first use
        self._lock = threading.Lock()  # judge runs in a thread, the rest on the event loop

    def close(self) -> None:
        with self._lock:  # a judge left running by a cancelled unit finishes first
            self.db.close()

    def claim(self, owner: str, fresh: bool) -> None:
        """File this dataset's entries under ``owner`` from now on, and note where it is. A
        ``fresh`` dataset (nothing done yet) is one rebuilt from scratch: the entries of the
        datasets that were at its place before are dropped (they were its own)."""
        with self._lock, self._tx():
            if fresh:
                gone = [o for (o,) in self.db.execute("SELECT owner FROM owners WHERE place=? AND owner<>?", (self.place, owner))]
                for table in ("exact", "near", "drops", "owners"):
                    self.db.executemany(f"DELETE FROM {table} WHERE owner=?", [(o,) for o in gone])
            self.db.execute(
                "INSERT INTO owners(owner, place) VALUES (?, ?) ON CONFLICT(owner) DO UPDATE SET place=excluded.place",
                (owner, self.place),
            )
            self.owner = owner
            self._near = None

    def holds_any(self) -> bool:
        """Whether the index holds any image this dataset kept."""
        with self._lock:
            return self.db.execute("SELECT 1 FROM exact WHERE owner=? LIMIT 1", (self.owner,)).fetchone() is not None

    def keep_only(self, done: Collection[str]) -> None:
        """Drop this dataset's entries of units that are not done (judged, then killed before the
        manifest recorded them)."""
        with self._lock, self._tx():
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS done_units (id TEXT PRIMARY KEY)")
            self.db.execute("DELETE FROM done_units")
            self.db.executemany("INSERT OR IGNORE INTO done_units VALUES (?)", [(u,) for u in done])
            for table in ("exact", "near", "drops"):
                self.db.execute(f"DELETE FROM {table} WHERE owner=? AND unit NOT IN (SELECT id FROM done_units)", (self.owner,))
            self._near = None

    def dependents(self, units: Collection[str]) -> set[str]:
        """This dataset's units that dropped an image because one of ``units`` had kept it, and
        the units that dropped one because of those, and so on: when ``units`` are redone (their
        rows changed), so must these be, or an image could end up in none of them."""
        found: set[str] = set()
        frontier = set(units)
        with self._lock:
            while frontier:
                marks = ",".join("?" * len(frontier))
                rows = self.db.execute(
                    f"SELECT DISTINCT unit FROM drops WHERE owner=? AND matched_owner=? AND matched_unit IN ({marks})",
                    (self.owner, self.owner, *frontier),
                )
                frontier = {u for (u,) in rows} - found - set(units)
                found |= frontier
        return found

    def forget(self, units: Iterable[str]) -> None:
        """Drop this dataset's entries of these units (their spec changed: they are redone)."""
        rows = [(self.owner, u) for u in units]
        if not rows:
            return
        with self._lock, self._tx():
            for table in ("exact", "near", "drops"):
                self.db.executemany(f"DELETE FROM {table} WHERE owner=? AND unit=?", rows)
            self._near = None

    def judge(self, unit_id: str, rows: list[KeptRow]) -> dict[int, str]:
        """The duplicates among a unit's kept rows (position → reason), judged against the index
        and against the unit's earlier rows; the rows it keeps enter the index at once, in the
        same transaction (until the manifest records the unit done, ``keep_only`` may drop them),
        and so does which units its drops matched (``dependents``)."""
        near = self.mode is DedupMode.NEAR
        with self._lock:
            if near:
                self._near_codes().settle()  # a large index is loaded and folded before the write lock is taken
            with self._tx():
                known = self._known_digests([r.sha256 for r in rows])
                indexed = self._near_codes() if near else None
                in_unit = _NearCodes() if near else None
                seen: set[str] = set()
                dropped: dict[int, str] = {}
                matched: set[tuple[str, str]] = set()
                kept: list[KeptRow] = []
                for row in sorted(rows, key=lambda r: r.position):
                    if row.sha256 in seen:
                        dropped[row.position] = R.DUPLICATE_CONTENT
                        continue
                    if row.sha256 in known:
                        dropped[row.position] = R.DUPLICATE_CONTENT
                        matched.add(known[row.sha256])
                        continue
                    if indexed is not None and in_unit is not None and row.phash:
                        hit = indexed.match(row.phash)
                        if hit is not None or in_unit.match(row.phash) is not None:
                            dropped[row.position] = R.NEAR_DUPLICATE
                            if hit is not None:
                                matched.add(self._near_owner(hit))
                            continue
                        in_unit.add([0], [row.phash])
                    seen.add(row.sha256)
                    kept.append(row)
                self.db.executemany(
                    "INSERT INTO exact(digest, owner, unit, key) VALUES (?,?,?,?)",
                    [(bytes.fromhex(r.sha256), self.owner, unit_id, r.key) for r in kept],
                )
                if near:
                    self.db.executemany(
                        "INSERT INTO near(phash, colour, owner, unit, key) VALUES (?,?,?,?,?)",
                        [(*_stored(r.phash), self.owner, unit_id, r.key) for r in kept if r.phash],
                    )
                self.db.executemany(
                    "INSERT OR IGNORE INTO drops(owner, unit, matched_owner, matched_unit) VALUES (?,?,?,?)",
                    [(self.owner, unit_id, o, u) for o, u in matched],
                )
                return dropped

    def _known_digests(self, digests: list[str]) -> dict[str, tuple[str, str]]:
        """Which of these digests the index holds: digest → (owner, unit) that kept it."""
        known: dict[str, tuple[str, str]] = {}
        for i in range(0, len(digests), 500):
            chunk = [bytes.fromhex(d) for d in digests[i : i + 500]]
            marks = ",".join("?" * len(chunk))
            for digest, owner, unit in self.db.execute(f"SELECT digest, owner, unit FROM exact WHERE digest IN ({marks})", chunk):
                known[digest.hex()] = (owner, unit)
        return known

    def _near_owner(self, entry: int) -> tuple[str, str]:
        owner, unit = self.db.execute("SELECT owner, unit FROM near WHERE id=?", (entry,)).fetchone()
        return owner, unit

    def _near_codes(self) -> _NearCodes:
        """The index's perceptual hashes in memory: loaded whole at first, then what was added
        since (by this run's units and by other datasets sharing the file). Entries other runs
        drop stay here until this run reloads (after a ``forget``): they are of units not done."""
        if self._near is None:
            self._near = _NearCodes()
        rows = self.db.execute("SELECT id, phash, colour FROM near WHERE id > ? ORDER BY id", (self._near.last,))
        while chunk := rows.fetchmany(1 << 18):  # a large index is read in pieces, not as one list of tuples
            self._near.add_stored(chunk)
        return self._near

    def _tx(self) -> Transaction:
        return Transaction(self.db)


class _NearCodes:
    """Perceptual hashes with their mean colours and index entry ids, searchable."""

    def __init__(self) -> None:
        import numpy as np  # numpy, only for --dedup near

        from fastfetch.nearsearch import HammingIndex

        self._np = np
        self.codes = HammingIndex(NEAR_BITS)
        self.ids = np.empty(0, dtype=np.int64)
        self.colours = np.empty((0, 3), dtype=np.int16)
        self.last = 0  # the last index entry loaded

    def add_stored(self, rows: list[tuple[int, int, int]]) -> None:
        """Entries as the index stores them: (id, signed 64-bit hash, 0xRRGGBB)."""
        np = self._np
        table = np.array(rows, dtype=np.int64)
        self.codes.add(table[:, 1].view(np.uint64))
        self.ids = np.concatenate([self.ids, table[:, 0]])
        self.colours = np.concatenate([self.colours, np.stack([table[:, 2] >> 16, table[:, 2] >> 8 & 255, table[:, 2] & 255], 1)])
        self.last = int(table[-1, 0])

    def add(self, ids: list[int], phashes: list[str]) -> None:
        self.add_stored([(i, *_stored(p)) for i, p in zip(ids, phashes, strict=True)])

    def settle(self) -> None:
        self.codes.settle()

    def match(self, phash: str) -> int | None:
        """The id of an entry near ``phash`` (hash within NEAR_BITS, colour within NEAR_COLOUR), or None."""
        code, colour = _stored(phash)
        found = self.codes.within(code & ((1 << 64) - 1))
        if not len(found):
            return None
        rgb = self._np.array([colour >> 16, colour >> 8 & 255, colour & 255])
        close = found[self._np.abs(self.colours[found] - rgb).max(axis=1) <= NEAR_COLOUR]
        return int(self.ids[close[0]]) if len(close) else None


def _stored(phash: str) -> tuple[int, int]:
    """``imaging.phash``'s text (16 hex digits of hash, 6 of mean colour) as the index stores it:
    the hash as SQLite's signed 64-bit integer, the colour as 0xRRGGBB."""
    code, colour = int(phash[:16], 16), int(phash[16:22] or "0", 16)
    return (code - (1 << 64) if code >= 1 << 63 else code), colour


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
