"""The SQLite ledger of work units under ``--out``: what is planned, running, done or failed.

The manifest is the single source of truth for "what is in the dataset": a unit is done only
after its MDS directory has been finished and renamed into place, so a crash at any moment
leaves either a done unit with a complete directory, or a not-done unit whose directory (if
any) is discarded and redone. SQLite gives atomic commits for free; WAL keeps readers (a
``--merge`` or a progress query) from blocking the writer.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from fastfetch.sources.base import Unit

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"

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
    updated REAL
);
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


class Manifest:
    """Thin typed wrapper over the SQLite file; every method is one committed transaction."""

    FILENAME = "manifest.sqlite"

    def __init__(self, out: Path) -> None:
        self.path = out / self.FILENAME
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

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
    def sync_plan(self, units: Iterable[Unit]) -> list[str]:
        """Record the plan; returns the ids of done units whose spec changed (to be redone)."""
        changed: list[str] = []
        with self._tx():
            known = {r[0]: r[1] for r in self.db.execute("SELECT id, spec FROM units")}
            for order, unit in enumerate(units):
                spec = orjson.dumps(unit.spec, option=orjson.OPT_SORT_KEYS).decode()
                if unit.id not in known:
                    self.db.execute(
                        "INSERT INTO units(id, ord, spec, rows, updated) VALUES(?,?,?,?,?)",
                        (unit.id, order, spec, unit.rows, time.time()),
                    )
                elif known[unit.id] != spec:
                    changed.append(unit.id)
                    self.db.execute(
                        "UPDATE units SET ord=?, spec=?, rows=?, state=?, counts='{}', bytes_in=0,"
                        " bytes_out=0, error=NULL, updated=? WHERE id=?",
                        (order, spec, unit.rows, PENDING, time.time(), unit.id),
                    )
        return changed

    def records(self, state: str | None = None) -> list[UnitRecord]:
        query = "SELECT id, spec, rows, state, attempts, counts, bytes_in, bytes_out, error FROM units"
        params: tuple[str, ...] = ()
        if state is not None:
            query += " WHERE state=?"
            params = (state,)
        return [
            UnitRecord(r[0], orjson.loads(r[1]), r[2], r[3], r[4], orjson.loads(r[5]), r[6], r[7], r[8])
            for r in self.db.execute(query + " ORDER BY ord", params)
        ]

    def state_of(self, unit_id: str) -> str | None:
        row = self.db.execute("SELECT state FROM units WHERE id=?", (unit_id,)).fetchone()
        return row[0] if row else None

    def start(self, unit_id: str) -> None:
        self.db.execute(
            "UPDATE units SET state=?, attempts=attempts+1, error=NULL, updated=? WHERE id=?",
            (RUNNING, time.time(), unit_id),
        )

    def finish(self, unit_id: str, counts: dict[str, int], bytes_in: int, bytes_out: int) -> None:
        self.db.execute(
            "UPDATE units SET state=?, counts=?, bytes_in=?, bytes_out=?, error=NULL, updated=? WHERE id=?",
            (DONE, orjson.dumps(counts).decode(), bytes_in, bytes_out, time.time(), unit_id),
        )

    def fail(self, unit_id: str, error: str) -> None:
        self.db.execute(
            "UPDATE units SET state=?, error=?, updated=? WHERE id=?", (FAILED, error, time.time(), unit_id)
        )

    def reset(self, unit_id: str) -> None:
        """Back to pending (an interrupted unit, rolled back)."""
        self.db.execute("UPDATE units SET state=?, updated=? WHERE id=?", (PENDING, time.time(), unit_id))

    def _tx(self) -> "_Transaction":
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
