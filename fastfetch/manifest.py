"""The SQLite ledger of work units under ``--out``: what is planned, running, done or failed.

The manifest is the single source of truth for "what is in the dataset": a unit is done only
after its MDS directory has been finished and renamed into place, so a crash at any moment
leaves either a done unit with a complete directory, or a not-done unit whose directory (if
any) is discarded and redone. SQLite gives atomic commits for free; WAL keeps readers (a
``--merge`` or a progress query) from blocking the writer.

Nothing secret is stored: an item that failed for a transient reason is remembered by its key
only (``--retry-failed`` reads it again from its unit), never by its URL, caption or columns,
and unit errors arrive redacted.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from fastfetch.sources.base import PREFILTERED, RETRY_OF, Unit

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"

#: (key, reason) of an item that failed for a transient reason
FailedRow = tuple[str, str]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS units (
    id TEXT PRIMARY KEY,
    ord INTEGER NOT NULL,
    spec TEXT NOT NULL,
    rows INTEGER,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    counts TEXT NOT NULL DEFAULT '{}',
    bytes_in INTEGER NOT NULL DEFAULT 0,
    bytes_out INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    dirs TEXT NOT NULL DEFAULT '[]',
    updated REAL
);
CREATE TABLE IF NOT EXISTS failed_keys (
    unit TEXT NOT NULL,
    key TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (unit, key)
);
"""
# Manifests written before keys alone were kept stored each failed item's URL, caption and
# columns: their keys and reasons move over, and the old table's pages are overwritten.
_MIGRATE = """
INSERT OR IGNORE INTO failed_keys(unit, key, reason) SELECT unit, key, reason FROM failed_items;
DROP TABLE failed_items;
"""


@dataclass(frozen=True, slots=True)
class UnitRecord:
    """A unit as the manifest knows it."""

    id: str
    spec: dict[str, Any]
    rows: int | None
    state: str
    attempts: int
    counts: dict[str, int]
    bytes_in: int
    bytes_out: int
    error: str | None
    dirs: list[str]

    @property
    def retry_of(self) -> str | None:
        """The unit whose failed items this one refetched (a ``--retry-failed`` unit), or None."""
        return self.spec.get(RETRY_OF)


class Manifest:
    """Thin typed wrapper over the SQLite file; every method is one committed transaction."""

    FILENAME = "manifest.sqlite"

    def __init__(self, out: Path) -> None:
        self.path = out / self.FILENAME
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA secure_delete=ON")  # deleted rows are zeroed, not left in free pages
        self.db.executescript(_SCHEMA)
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE name='failed_items'").fetchone():
            self.db.executescript("BEGIN IMMEDIATE;" + _MIGRATE + "COMMIT;")
            self.db.execute("VACUUM")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        self.db.close()

    # -- meta -------------------------------------------------------------------------------
    def get_meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return orjson.loads(row[0]) if row else None

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()),
        )

    # -- units ------------------------------------------------------------------------------
    def sync_plan(self, units: Iterable[Unit], first: int = 0) -> list[str]:
        """Record units of the plan (a batch of it, from position ``first`` on); returns the ids
        of units to redo from scratch (their spec changed) together with their retry units,
        which are dropped."""
        changed: list[str] = []
        with self._tx():
            for order, unit in enumerate(units, first):
                spec = orjson.dumps(unit.spec, option=orjson.OPT_SORT_KEYS).decode()
                row = self.db.execute("SELECT spec FROM units WHERE id=?", (unit.id,)).fetchone()
                known = row[0] if row else None
                if known is None:
                    self.db.execute(
                        "INSERT INTO units(id, ord, spec, rows, updated) VALUES(?,?,?,?,?)",
                        (unit.id, order, spec, unit.rows, time.time()),
                    )
                elif known != spec and _same_unit(orjson.loads(known), unit.spec):
                    # planned by an older version that recorded less about the unit: same unit
                    self.db.execute("UPDATE units SET spec=? WHERE id=?", (spec, unit.id))
                elif known != spec:
                    changed.extend(self._start_over(unit.id))
                    self.db.execute("UPDATE units SET ord=?, spec=?, rows=? WHERE id=?", (order, spec, unit.rows, unit.id))
        return changed

    def redo(self, unit_id: str) -> list[str]:
        """A done unit to be done again from scratch (its objects went missing): its retry units
        are dropped; returns its id and theirs (their folders are to go)."""
        with self._tx():
            return self._start_over(unit_id)

    def _start_over(self, unit_id: str) -> list[str]:
        """Within a transaction: the unit back to pending with nothing done, its retry units and
        failed keys gone; returns its id and its retry units' ids."""
        retries = [
            r[0] for r in self.db.execute(f"SELECT id FROM units WHERE json_extract(spec, '$.{RETRY_OF}') = ?", (unit_id,))
        ]
        self.db.executemany("DELETE FROM units WHERE id=?", [(r,) for r in retries])
        self.db.execute("DELETE FROM failed_keys WHERE unit=?", (unit_id,))
        self.db.execute(
            "UPDATE units SET state=?, counts='{}', bytes_in=0, bytes_out=0, error=NULL, updated=? WHERE id=?",
            (PENDING, time.time(), unit_id),
        )
        return [unit_id, *retries]

    def records(self, state: str | None = None) -> list[UnitRecord]:
        query = "SELECT id, spec, rows, state, attempts, counts, bytes_in, bytes_out, error, dirs FROM units"
        params: tuple[str, ...] = ()
        if state is not None:
            query += " WHERE state=?"
            params = (state,)
        return [
            UnitRecord(r[0], orjson.loads(r[1]), r[2], r[3], r[4], orjson.loads(r[5]), r[6], r[7], r[8], orjson.loads(r[9]))
            for r in self.db.execute(query + " ORDER BY ord", params)
        ]

    def ids(self) -> set[str]:
        """Every unit this manifest has planned (retry units included)."""
        return {r[0] for r in self.db.execute("SELECT id FROM units")}

    def unit(self, unit_id: str) -> Unit:
        """A planned unit as it was planned."""
        spec, rows = self.db.execute("SELECT spec, rows FROM units WHERE id=?", (unit_id,)).fetchone()
        return Unit(unit_id, orjson.loads(spec), rows)

    def start(self, unit_id: str) -> None:
        self.db.execute(
            "UPDATE units SET state=?, attempts=attempts+1, error=NULL, updated=? WHERE id=?",
            (RUNNING, time.time(), unit_id),
        )

    def finish(
        self, unit_id: str, counts: dict[str, int], bytes_in: int, bytes_out: int, dirs: list[str], failed: list[FailedRow]
    ) -> None:
        """Mark a unit done: its counts, its published MDS folders, and the items that failed for
        transient reasons (for --retry-failed)."""
        with self._tx():
            self.db.execute(
                "UPDATE units SET state=?, counts=?, bytes_in=?, bytes_out=?, dirs=?, error=NULL, updated=? WHERE id=?",
                (DONE, orjson.dumps(counts).decode(), bytes_in, bytes_out, orjson.dumps(dirs).decode(), time.time(), unit_id),
            )
            self._replace_failed(unit_id, failed)

    def _replace_failed(self, unit_id: str, failed: list[FailedRow]) -> None:
        self.db.execute("DELETE FROM failed_keys WHERE unit=?", (unit_id,))
        self.db.executemany("INSERT INTO failed_keys(unit, key, reason) VALUES(?,?,?)", [(unit_id, k, r) for k, r in failed])

    # -- --retry-failed ---------------------------------------------------------------------
    def retry_units(self) -> list[Unit]:
        """One retry unit per done unit with transient failures (ids ``<unit>-retry<n>``)."""
        with self._tx():
            rows = self.db.execute(
                "SELECT f.unit, COUNT(*) FROM failed_keys f JOIN units u ON u.id = f.unit "
                "WHERE u.state = ? GROUP BY f.unit ORDER BY u.ord",
                (DONE,),
            ).fetchall()
            units = []
            for original, count in rows:
                attempt = (
                    1
                    + self.db.execute(
                        f"SELECT COUNT(*) FROM units WHERE json_extract(spec, '$.{RETRY_OF}') = ? AND state = ?", (original, DONE)
                    ).fetchone()[0]
                )
                unit = Unit.retry(original, attempt, count)
                self.db.execute(
                    "INSERT OR IGNORE INTO units(id, ord, spec, rows, updated) VALUES(?, (SELECT COALESCE(MAX(ord), 0) + 1 FROM units), ?, ?, ?)",
                    (unit.id, orjson.dumps(unit.spec).decode(), count, time.time()),
                )
                units.append(unit)
        return units

    def failed_keys(self, unit_id: str) -> set[str]:
        """Keys of the unit's items that failed for transient reasons."""
        return {r[0] for r in self.db.execute("SELECT key FROM failed_keys WHERE unit=?", (unit_id,))}

    def finish_retry(
        self,
        retry_id: str,
        original: str,
        counts: dict[str, int],
        bytes_in: int,
        bytes_out: int,
        dirs: list[str],
        failed: list[FailedRow],
    ) -> None:
        """Commit a retry unit: its outcomes replace the original unit's transient failures."""
        with self._tx():
            (spec_counts,) = self.db.execute("SELECT counts FROM units WHERE id=?", (original,)).fetchone()
            merged = Counter(orjson.loads(spec_counts))
            for reason, n in self.db.execute(
                "SELECT reason, COUNT(*) FROM failed_keys WHERE unit=? GROUP BY reason", (original,)
            ):
                merged[reason] -= n
            merged.update(counts)
            self.db.execute(
                "UPDATE units SET counts=?, bytes_in=bytes_in+?, bytes_out=bytes_out+?, updated=? WHERE id=?",
                (orjson.dumps({k: v for k, v in merged.items() if v}).decode(), bytes_in, bytes_out, time.time(), original),
            )
            self.db.execute(
                "UPDATE units SET state=?, counts='{}', dirs=?, error=NULL, updated=? WHERE id=?",
                (DONE, orjson.dumps(dirs).decode(), time.time(), retry_id),
            )
            self._replace_failed(original, failed)

    def fail(self, unit_id: str, error: str) -> None:
        self.db.execute("UPDATE units SET state=?, error=?, updated=? WHERE id=?", (FAILED, error, time.time(), unit_id))

    def reset(self, unit_id: str) -> None:
        """Back to pending (an interrupted unit, rolled back)."""
        self.db.execute("UPDATE units SET state=?, updated=? WHERE id=?", (PENDING, time.time(), unit_id))

    def _tx(self) -> "Transaction":
        return Transaction(self.db)


def _same_unit(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """A new spec that keeps every key and value of the old one and only adds keys, but for the
    counts of rows the plan rejected (older versions lost those of every unit but the first)."""
    return all(k in new and new[k] == v for k, v in old.items() if k != PREFILTERED)


class Transaction:
    """``with Transaction(db):`` one immediate transaction, rolled back if the block raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
