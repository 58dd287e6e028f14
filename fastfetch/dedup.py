"""Content dedup (``--dedup exact|near``): which kept images repeat an image kept before.

"Before" is plan order, and it must not depend on which download happened to finish first, so
a deduplicating run commits its units in the order it scheduled them (``CommitOrder``: a unit
that finished early waits, its shards unpublished). At its turn a unit's kept rows are judged
(``DedupIndex.judge``) against the index, which holds every image kept by the units committed
before it (in this run, in earlier runs into the same ``--out``, and in other datasets sharing a
``--dedup-index``), and against each other (within a unit, the earlier item wins); the unit's
shards are written again without the duplicates, and its digests enter the index just before the
manifest records it done. A kill at any moment converges: the next run drops the index entries
of its units that the manifest does not hold as done (``keep_only``) and redoes those units.

* ``exact``: the same original bytes (sha256), counted ``duplicate_content``;
* ``near``: also a perceptual hash (``imaging.phash``, 64 bits) within ``NEAR_BITS`` of a kept
  one, counted ``near_duplicate``; the search is exact (``nearsearch.HammingIndex``, held in
  memory: ~24 bytes per kept image), its cost per image in benchmarks/RESULTS.md.

The index is SQLite (one file, shared by datasets through ``--dedup-index``; runs writing into it
at once take turns through its lock). Each entry names its dataset (``owner``: the output it was
kept for) and unit, so that a dataset only ever drops its own entries.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from fastfetch.errors import Reason as R
from fastfetch.errors import UsageError
from fastfetch.manifest import Transaction

if TYPE_CHECKING:
    from fastfetch.nearsearch import HammingIndex

#: the most bits two perceptual hashes may differ in for the images to be near duplicates
#: (re-encoded and resized copies differ in 0–6, crops of 2–5 % in up to 20, distinct photos of
#: one scene in 18 or more: benchmarks/RESULTS.md, "Near-duplicate dedup")
NEAR_BITS = 10

_SCHEMA = """
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
            self.db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise UsageError(f"--dedup-index {path}: cannot be used as a dedup index ({exc}); choose another file") from exc
        self._near: HammingIndex | None = None  # the index's perceptual hashes, loaded on first use
        self._near_seen = 0  # the last ``near`` entry loaded
        self._lock = threading.Lock()  # judge runs in a thread, the rest on the event loop

    def close(self) -> None:
        self.db.close()

    def keep_only(self, done: Collection[str]) -> None:
        """Drop this dataset's entries of units that are not done (a kill between the index's
        commit and the manifest's, a unit redone)."""
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

    def judge(self, rows: list[KeptRow]) -> dict[int, str]:
        """The duplicates among a unit's kept rows: position → reason. A row is judged against
        the index and against the unit's earlier rows that were kept."""
        with self._lock:
            known = self._known_digests([r.sha256 for r in rows])
            seen: set[str] = set()
            near, in_unit = (self._near_codes(), _hamming_index()) if self.mode is DedupMode.NEAR else (None, None)
            dropped: dict[int, str] = {}
            for row in sorted(rows, key=lambda r: r.position):
                if row.sha256 in known or row.sha256 in seen:
                    dropped[row.position] = R.DUPLICATE_CONTENT
                    continue
                if near is not None and in_unit is not None:
                    code = int(row.phash, 16)
                    if near.near(code) or in_unit.near(code):
                        dropped[row.position] = R.NEAR_DUPLICATE
                        continue
                    in_unit.add(code)
                seen.add(row.sha256)
            return dropped

    def add(self, unit_id: str, rows: Iterable[KeptRow]) -> None:
        """Enter a unit's kept rows (after ``judge``; before the manifest records the unit)."""
        with self._lock:
            rows = list(rows)
            with self._tx():
                self.db.executemany(
                    "INSERT OR IGNORE INTO exact(digest, owner, unit, key) VALUES (?,?,?,?)",
                    [(bytes.fromhex(r.sha256), self.owner, unit_id, r.key) for r in rows],
                )
                if self.mode is DedupMode.NEAR:
                    self.db.executemany(
                        "INSERT INTO near(phash, owner, unit, key) VALUES (?,?,?,?)",
                        [(_signed(int(r.phash, 16)), self.owner, unit_id, r.key) for r in rows],
                    )

    def _known_digests(self, digests: list[str]) -> set[str]:
        known: set[str] = set()
        for i in range(0, len(digests), 500):
            chunk = [bytes.fromhex(d) for d in digests[i : i + 500]]
            marks = ",".join("?" * len(chunk))
            known.update(r[0].hex() for r in self.db.execute(f"SELECT digest FROM exact WHERE digest IN ({marks})", chunk))
        return known

    def _near_codes(self) -> HammingIndex:
        """The index's perceptual hashes in memory: loaded whole at first, then what was added
        since (by this run's units and by other datasets sharing the file)."""
        import numpy as np

        if self._near is None:
            self._near, self._near_seen = _hamming_index(), 0
        got = self.db.execute("SELECT id, phash FROM near WHERE id > ? ORDER BY id", (self._near_seen,)).fetchall()
        if got:
            self._near.add(np.array([h for _, h in got], dtype=np.int64).view(np.uint64))
            self._near_seen = got[-1][0]
        return self._near

    def _tx(self) -> Transaction:
        return Transaction(self.db)


def _hamming_index() -> HammingIndex:
    from fastfetch.nearsearch import HammingIndex  # numpy, only for --dedup near

    return HammingIndex(NEAR_BITS)


def _signed(value: int) -> int:
    """A 64-bit hash as SQLite's signed integer."""
    return value - (1 << 64) if value >= 1 << 63 else value


class CommitOrder:
    """Units commit in the order they were scheduled: each takes a ticket when scheduled, waits
    for its ``turn`` once its rows are written, and ``release``s the ticket once committed (or
    failed, or cancelled); a turn comes once every earlier ticket is released."""

    def __init__(self) -> None:
        self._issued = 0
        self._released: set[int] = set()
        self._first_held = 0
        self._moved = asyncio.Event()  # set (and replaced) whenever a unit starts waiting or a ticket is released
        self.waiting = 0  # units whose rows are written, waiting for their turn

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
        self._released.add(ticket)
        while self._first_held in self._released:
            self._released.discard(self._first_held)
            self._first_held += 1
        self._move()

    async def moved(self) -> None:
        """Returns once a unit starts waiting for its turn or a ticket is released."""
        await self._moved.wait()

    def _move(self) -> None:
        self._moved.set()
        self._moved = asyncio.Event()
