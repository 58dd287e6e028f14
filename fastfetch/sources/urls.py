"""URL lists (any LAION-style parquet/csv/tsv/jsonl/json/txt) and the LAION preset.

Planning streams the lists once and cuts them into deterministic chunks of ``--unit-size``
rows, each saved as a small parquet file under ``--out/_work/urls/``; a unit's items are then
read back from its own file, so a rerun (or another node) never re-reads the big lists. Keys are
``<unit><row>`` positions: unique by construction and stable for the same input, where a URL
hash would collide on duplicate rows and break exactly-once downstream.

Planning also decides what is the same across the whole list, not per unit: a URL seen before
(``fastfetch.urlset``) is dropped as ``duplicate_url`` (the first occurrence wins, so a
longer ``--limit`` or another ``--unit-size`` keeps the same URLs; ``--url-dedup file`` or
``none`` bounds what the planner keeps at billions of rows), and each kept column gets one type
for the list however its files disagree (``fastfetch.columns``).

Planning streams: the kept columns' types are settled first from the files' schemas (parquet
footers, csv headers; only jsonl/json rows must be read for them), then the lists are cut in a
thread, and the run starts on each unit as soon as its file is written, while the rest of the
list is still being read (``plan_batches``). plan.json, which lets a rerun skip planning, is
written after the last unit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import hashlib
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import orjson

from fastfetch import columns as kinds
from fastfetch import hub, storage
from fastfetch.arrow import pa, pc, pq
from fastfetch.errors import Reason as R
from fastfetch.errors import UsageError
from fastfetch.formats import MOSAIC_LIST_COLUMNS, MOSAIC_WRITTEN, OutputFormat
from fastfetch.lists import as_text, expand_paths, find_column, list_format, list_schema, read_batches
from fastfetch.mds import BASE_COLUMNS
from fastfetch.ranged import AccessDenied, download_file
from fastfetch.sources.base import PREFILTERED, Item, RunContext, Source, SourceOptions, Unit, flag
from fastfetch.storage import is_remote
from fastfetch.urlset import SeenUrls, trimmed

_PLAN_FILE = "plan.json"
# plans of another version are made again (v2: global URL dedup, column kinds; v3: kinds from
# the files' schemas, settled before the first unit)
_PLAN_VERSION = 3
#: units planned ahead of the run (their files written, their Unit objects queued)
PLAN_AHEAD = 256
T = TypeVar("T")
#: columns a URL list's rows always have: a kept column may not take one of these names
RESERVED = frozenset(BASE_COLUMNS) | {"url"}


@dataclass(frozen=True, slots=True)
class UrlsOptions(SourceOptions):
    urls: tuple[str, ...] | None = flag(
        None,
        nargs="+",
        metavar="PATH",
        help="URL list files or folders; local paths, hf://datasets/<repo>/<path or glob>, or http(s):// "
        "(required for --dataset urls and laion)",
    )
    url_col: str | None = flag(None, help="URL column (default: url; laion: URL)")
    caption_col: str | None = flag(None, help="caption column (default: caption; laion: TEXT); '' for lists without captions")
    keep_cols: str | None = flag(
        None,
        help="comma-separated extra columns copied into each MDS row (default: none; laion: "
        "similarity, punsafe, pwatermark, aesthetic score where present)",
    )
    listed_size: str | None = flag(
        None,
        metavar="W,H",
        help="the list's width and height columns: rows listed with a short side below --min-size "
        "(listed_too_small) or above --max-aspect-ratio (aspect_ratio) are dropped before downloading "
        "(default: none; laion: WIDTH,HEIGHT; '' turns it off)",
    )
    url_dedup: str = flag(
        "list",
        choices=("list", "file", "none"),
        help="drop a row whose URL an earlier row has (duplicate_url, the first wins): over the whole list "
        "(default; the planner keeps 16 bytes per distinct URL), within each list file (memory bounded by the "
        "largest file), or not at all (lists already deduplicated)",
    )

    def resolved(self) -> UrlsOptions:
        urls = tuple(u if is_remote(u) else str(Path(u).expanduser().absolute()) for u in self.urls or ())
        return dataclasses.replace(self, urls=urls or None)


@dataclass(frozen=True, slots=True)
class LaionOptions(UrlsOptions):
    max_punsafe: float | None = flag(None, type=float, help="laion: drop rows with punsafe above this (default: keep all)")
    max_pwatermark: float | None = flag(None, type=float, help="laion: drop rows with pwatermark above this (default: keep all)")
    min_aesthetic: float | None = flag(
        None, type=float, help="laion: drop rows with an aesthetic score below this (default: keep all)"
    )


@dataclass(frozen=True, slots=True)
class UnitRows:
    """A unit of a URL list as shipped to a process that did not plan it: its rows (the plan's
    parquet file) and the kinds of the kept columns over the whole list."""

    table: bytes
    kinds: dict[str, str]


class UrlsSource(Source):
    name = "urls"
    help = "any URL list: txt, csv, tsv, jsonl, json or parquet files (optionally .gz), local, hf:// or http(s)://"
    default_url_col: ClassVar[str] = "url"
    default_caption_col: ClassVar[str] = "caption"
    default_keep_cols: ClassVar[tuple[str, ...]] = ()
    default_listed_size: ClassVar[str | None] = None

    Options: ClassVar[type[SourceOptions]] = UrlsOptions
    options: UrlsOptions

    def __init__(self, options: SourceOptions, ctx: RunContext) -> None:
        super().__init__(options, ctx)
        self._shipped: dict[str, UnitRows] = {}  # units whose rows came with them (prepare_unit)
        self._kinds: dict[str, str] | None = None  # the kept columns' kinds over the whole list

    # -- configuration -------------------------------------------------------------------------
    @property
    def url_col(self) -> str:
        return self.options.url_col or self.default_url_col

    @property
    def caption_col(self) -> str:
        return self.default_caption_col if self.options.caption_col is None else self.options.caption_col

    def keep_cols(self) -> dict[str, str]:
        """The kept columns: output name → list column (``--keep-cols SRC`` or ``SRC:NAME``)."""
        if self.options.keep_cols is None:
            defaults = self.default_keep_cols
            if self.ctx.format is OutputFormat.MOSAIC:  # the columns mosaic's rows carry
                defaults = tuple(dict.fromkeys((*defaults, *MOSAIC_LIST_COLUMNS)))
            return {c: c for c in defaults}
        kept: dict[str, str] = {}
        reserved = RESERVED | (MOSAIC_WRITTEN if self.ctx.format is OutputFormat.MOSAIC else set())
        for entry in (e.strip() for e in self.options.keep_cols.split(",")):
            if not entry:
                continue
            source, _, name = entry.partition(":")
            source, name = source.strip(), (name.strip() or source.strip())
            if not source:
                raise UsageError(f"--keep-cols {entry!r}: give a column name (SRC, or SRC:NEW_NAME)")
            if name.lower() in reserved:
                raise UsageError(
                    f"--keep-cols {entry}: {name!r} is a column fastfetch writes itself ({', '.join(sorted(reserved))}); "
                    f"keep the list's column under another name, e.g. --keep-cols {source}:list_{name}"
                )
            if name in kept:
                raise UsageError(f"--keep-cols names the column {name!r} twice")
            kept[name] = source
        return kept

    def fingerprint(self) -> dict[str, Any]:
        kept = self.keep_cols()
        return {
            "url_col": self.url_col,
            "caption_col": self.caption_col,
            "keep_cols": [n if n == src else f"{src}:{n}" for n, src in kept.items()],
            # changes what a unit holds; the default stays unrecorded, so outputs made before the flag resume
            **({"url_dedup": self.options.url_dedup} if self.options.url_dedup != "list" else {}),
        }

    def extra_columns(self) -> dict[str, str]:
        return {"url": "str", **{name: kinds.ENCODING[kind] for name, kind in self._known_kinds().items()}}

    def _known_kinds(self) -> dict[str, str]:
        """The kept columns' kinds over the whole list: settled by planning, or read from the plan."""
        if self._kinds is None:
            self._kinds = (self._load_plan() or {}).get("kinds", {})
        return self._kinds

    @property
    def plan_dir(self) -> Path:
        return self.ctx.work_dir

    # -- planning ------------------------------------------------------------------------------
    async def plan(self) -> list[Unit]:
        return [unit async for batch in self.plan_batches() for unit in batch]

    async def plan_batches(self) -> AsyncIterator[list[Unit]]:
        """The cached plan, or a new one cut in a thread while the run starts on its first
        units: the columns are settled first (``_list_kinds``), then each unit is yielded as
        soon as its file is written."""
        if not self.options.urls:
            raise UsageError(f"--dataset {self.name} needs --urls PATH [PATH ...] (files, folders, hf:// or http(s)://)")
        files = await self._local_files()
        key = self._plan_key(files)
        cached = self._load_plan()
        if cached and cached["key"] == key and all((self.plan_dir / f"{u[0]}.parquet").exists() for u in cached["units"]):
            self._kinds = cached["kinds"]
            yield [Unit(uid, spec, spec["rows"]) for uid, spec in cached["units"]]
            return
        self._kinds = None
        async for steps in _in_thread(self._steps(files, key), PLAN_AHEAD):
            units = [step for step in steps if isinstance(step, Unit)]
            if isinstance(steps[0], dict):  # the first step: the columns' kinds, before any unit
                self._kinds = steps[0]
            if units:
                yield units

    def _steps(self, files: list[Path], key: dict[str, Any]) -> Iterator[dict[str, str] | Unit]:
        """What the planner's thread does: settle the kinds (the first step), then cut the units."""
        list_kinds = self._list_kinds(files)
        yield list_kinds
        yield from self._cut(files, key, list_kinds)

    async def _local_files(self) -> list[Path]:
        local: list[Path] = []
        for spec in self.options.urls or ():
            if spec.startswith("hf://"):
                local.extend(await self._download_hf(spec))
            elif spec.startswith(("http://", "https://")):
                name = spec.rstrip("/").rsplit("/", 1)[-1].split("?")[0] or "list.txt"
                local.append(await self._download(spec, f"{hashlib.sha1(spec.encode()).hexdigest()[:10]}-{name}"))
            else:
                local.append(Path(spec).expanduser())
        own = ("mds", "_work", "_nodes", "_archives", "stats.json")  # what a run writes under --out
        return expand_paths(local, skip=tuple(self.ctx.local_root / name for name in own))

    async def _download_hf(self, spec: str) -> list[Path]:
        """``hf://datasets/<org>/<name>[@revision]/<path or glob>`` → local copies of the lists."""
        parts = spec.removeprefix("hf://").split("/")
        if len(parts) < 4 or parts[0] != "datasets":
            raise UsageError(f"{spec}: expected hf://datasets/<org>/<name>/<path or glob>")
        repo, _, revision = "/".join(parts[1:3]).partition("@")
        pattern = "/".join(parts[3:])
        fixed = pattern.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
        folder = fixed.rsplit("/", 1)[0] if "/" in fixed else ""
        files = [
            f
            for f in await hub.list_files(self.ctx.fetcher, repo, folder, revision=revision or hub.DEFAULT_REVISION)
            if fnmatch.fnmatchcase(f.path, pattern)
        ]
        if not files:
            raise UsageError(f"{spec} matches no file of the Hugging Face dataset {repo} ({hub.dataset_page(repo)})")
        return [
            await self._download(
                hub.file_url(repo, f.path, revision or hub.DEFAULT_REVISION),
                f"{repo.replace('/', '__')}__{f.oid[:12]}__{f.path.replace('/', '__')}",
                hub.headers(),
                repo,
            )
            for f in files
        ]

    async def _download(self, url: str, name: str, headers: dict[str, str] | None = None, repo: str | None = None) -> Path:
        """A remote list file into the work folder (resumable; kept for reruns)."""
        try:
            return await download_file(self.ctx.fetcher, url, self.plan_dir / "lists" / name, headers)
        except AccessDenied as exc:
            if repo:
                raise hub.access_error(repo, exc.status) from exc
            raise UsageError(f"cannot download the URL list {url}: HTTP {exc.status}") from exc
        except Exception as exc:
            raise UsageError(f"cannot download the URL list {url}: {type(exc).__name__}: {exc}") from exc

    def _plan_key(self, files: list[Path]) -> dict[str, Any]:
        return {
            "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
            "unit_size": self.ctx.unit_size,
            "limit": self.ctx.limit,
            "filters": self.filters(),
            "url_dedup": self.options.url_dedup,
            "version": _PLAN_VERSION,
            **self.fingerprint(),
        }

    def _load_plan(self) -> dict[str, Any] | None:
        path = self.plan_dir / _PLAN_FILE
        return orjson.loads(path.read_bytes()) if path.exists() else None

    def _list_kinds(self, files: list[Path]) -> dict[str, str]:
        """Each kept column's kind over the whole list, settled before the first unit is cut
        (every unit is written with the list's columns): from the files' schemas (parquet
        footers, csv headers, without reading rows), and for jsonl/json, which have none,
        from a first reading of their rows."""
        if not self.keep_cols():
            return {}
        found: dict[str, str] = {}
        for path in files:  # a file's missing columns are refused when its rows are cut, not here
            schema = list_schema(path)
            if schema is None:
                rows = self._rows([path], Counter(), strict=False)
                per_batch: Iterable[dict[str, str]] = (
                    (k for _, _, k in rows) if self.ctx.limit is None else _first_rows(rows, self.ctx.limit)
                )  # with --limit: no file gives more rows than that to the plan
            else:
                mapping = self._resolve_columns(path, schema, strict=False)
                per_batch = [{name: _kind(path, actual, schema.field(actual).type) for name, actual in mapping["keep"].items()}]
            for batch_kinds in per_batch:
                for name, kind in batch_kinds.items():
                    found[name] = kinds.widen(found.get(name, kinds.NULL), kind)
        return dict(sorted(found.items()))

    def _cut(self, files: list[Path], key: dict[str, Any], list_kinds: dict[str, str]) -> Iterator[Unit]:
        """Read the lists once and cut them into unit files, yielding each unit once its file
        is written; plan.json (what makes the plan reusable) is written after the last one."""
        self.plan_dir.mkdir(parents=True, exist_ok=True)
        # The unit files are rewritten in place: the old plan goes first, so a run killed while
        # planning leaves no plan that names half-rewritten unit files (the next run plans anew).
        (self.plan_dir / _PLAN_FILE).unlink(missing_ok=True)
        storage.fsync_path(self.plan_dir)
        unit_size, dedup = self.ctx.unit_size, self.options.url_dedup
        units: list[Unit] = []
        pending: list[tuple[pa.RecordBatch, dict[str, str]]] = []
        pending_rows = 0
        filtered: Counter[str] = Counter()
        seen, seen_in = SeenUrls(), None
        row_total = 0

        def flush() -> Unit:
            nonlocal pending, pending_rows
            uid = f"{len(units):05d}"
            table = _unit_table(pending, list_kinds)
            _write_parquet(table, self.plan_dir / f"{uid}.parquet")
            digest = hashlib.blake2b(
                b"\n".join(v.encode() for v in table.column("url").to_pylist() if v), digest_size=12
            ).hexdigest()
            # captions and kept values too: a list edited between runs redoes the units it changed
            content = hashlib.blake2b(orjson.dumps(table.drop_columns(["url"]).to_pydict()), digest_size=12).hexdigest()
            spec = {"rows": table.num_rows, "digest": digest, "content": content, PREFILTERED: dict(+filtered)}
            units.append(Unit(uid, spec, table.num_rows))
            pending, pending_rows = [], 0
            filtered.clear()  # the same counter: the reader counts into it too
            return units[-1]

        for path, batch, batch_kinds in self._rows(files, filtered):
            if self.ctx.limit is not None:
                batch = batch.slice(0, max(0, self.ctx.limit - row_total))
            row_total += batch.num_rows
            if dedup == "file" and seen_in != path:
                seen, seen_in = SeenUrls(), path
            if dedup != "none":
                batch = _first_occurrences(batch, seen, filtered)
            while batch.num_rows:
                take = min(batch.num_rows, unit_size - pending_rows)
                pending.append((batch.slice(0, take), batch_kinds))
                pending_rows += take
                batch = batch.slice(take)
                if pending_rows == unit_size:
                    yield flush()
            if self.ctx.limit is not None and row_total >= self.ctx.limit:
                break
        if pending_rows:
            yield flush()
        if not units:
            raise UsageError(
                f"the URL list ({', '.join(map(str, files))}) has no rows to fetch"
                + (f" after the filters ({dict(filtered)})" if filtered else "")
            )
        plan = {
            "key": key,
            "columns": {name: kinds.ENCODING[kind] for name, kind in list_kinds.items()},
            "kinds": list_kinds,
            "units": [[u.id, u.spec] for u in units],
        }
        storage.write_atomically(self.plan_dir / _PLAN_FILE, orjson.dumps(plan))  # after every unit file

    def _rows(
        self, files: list[Path], filtered: Counter[str], strict: bool = True
    ) -> Iterator[tuple[Path, pa.RecordBatch, dict[str, str]]]:
        """Normalised batches (url, caption, kept columns in their kinds) with the list filters
        applied, each with its file and its kept columns' kinds. A jsonl or json list has no
        schema: a key may first appear in any row, so its columns are looked up batch by batch,
        and one that appears nowhere in the file is an error (when ``strict``) only once the
        whole file is read."""
        for path in files:
            schemaless = list_format(path) in ("jsonl", "json")
            mapping: dict[str, Any] | None = None
            found: set[str] = set()
            for batch in read_batches(path, skipped=filtered):
                if mapping is None or schemaless:
                    mapping = self._resolve_columns(path, batch.schema, strict=not schemaless)
                    found.update(k for k in ("url", "caption") if mapping[k])
                    found.update(f"keep:{name}" for name in mapping["keep"])
                yield (path, *self._normalise(path, batch, mapping, filtered))
            if schemaless and mapping is not None and strict:
                wanted_cols = {"url": (self.url_col, "--url-col"), "caption": (self.caption_col, "--caption-col")}
                for key, (column, flag) in wanted_cols.items():
                    if key not in found and column and not (key == "caption" and list_format(path) == "txt"):
                        raise UsageError(f"{path} has no {key} column {column!r} in any row; pass {flag} NAME")
                if self.options.keep_cols is not None:
                    for name, wanted in self.keep_cols().items():
                        if f"keep:{name}" not in found:
                            raise UsageError(f"{path} has no column {wanted!r} (from --keep-cols) in any row")

    def _resolve_columns(self, path: Path, schema: pa.Schema, strict: bool = True) -> dict[str, Any]:
        """Where the URL, caption, kept and filter columns are in ``schema``; a missing one is an
        error when ``strict``, else None (all null in this batch)."""
        names = schema.names
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UsageError(f"{path} names the column(s) {', '.join(map(repr, twice))} more than once; rename them")
        if list_format(path) == "txt":
            url: str | None = "url"
        else:
            url = find_column(names, self.url_col)
            if url is None and strict:
                raise UsageError(f"{path} has no URL column {self.url_col!r}; its columns are {names}. Pass --url-col NAME")
        caption = None
        if self.caption_col and list_format(path) != "txt":
            caption = find_column(names, self.caption_col)
            if caption is None and strict:
                raise UsageError(
                    f"{path} has no caption column {self.caption_col!r}; its columns are {names}. "
                    "Pass --caption-col NAME, or --caption-col '' for a list without captions"
                )
        keep: dict[str, str] = {}
        explicit = self.options.keep_cols is not None
        for name, wanted in self.keep_cols().items():
            actual = find_column(names, wanted)
            if actual is None:
                if explicit and strict:
                    raise UsageError(f"{path} has no column {wanted!r} (from --keep-cols); its columns are {names}")
                continue  # a preset's column this file lacks: null in its rows
            if actual == url:
                raise UsageError(f"--keep-cols {wanted}: that is the URL column, already stored (without credentials) as url")
            keep[name] = actual
        filters = {col: find_column(names, col) for _, col, _, _ in self._filter_columns()}
        if self.options.listed_size and strict:  # named by the user: a list without them is a mistake
            for col in self.size_cols or ():
                if filters.get(col) is None:
                    raise UsageError(f"{path} has no column {col!r} (from --listed-size); its columns are {names}")
        return {"url": url, "caption": caption, "keep": keep, "filters": filters}

    def _normalise(
        self, path: Path, batch: pa.RecordBatch, mapping: dict[str, Any], filtered: Counter[str]
    ) -> tuple[pa.RecordBatch, dict[str, str]]:
        mask = self._filter_mask(path, batch, mapping["filters"], filtered)
        if mask is not None:
            batch = batch.filter(mask)
        arrays = {"url": as_text(_column(batch, mapping["url"]) if mapping["url"] else pa.nulls(batch.num_rows))}
        # A missing caption is "" (rejected as no_caption); a list without a caption column at
        # all (txt, --caption-col '') stores null, which is allowed and stored as "".
        arrays["caption"] = (
            pc.fill_null(as_text(_column(batch, mapping["caption"])), "")
            if mapping["caption"]
            else pa.nulls(batch.num_rows, pa.string())
        )
        batch_kinds: dict[str, str] = {}
        for name, actual in mapping["keep"].items():
            col = _column(batch, actual)
            kind = batch_kinds[name] = _kind(path, actual, col.type)
            arrays[f"x_{name}"] = kinds.stored(col, kind, actual, str(path))
        return pa.RecordBatch.from_pydict(arrays), batch_kinds

    # -- filters (listed sizes when the list has them; the LAION preset adds its own) -----------
    @property
    def size_cols(self) -> tuple[str, str] | None:
        """The list's width and height columns (``--listed-size``; laion: WIDTH,HEIGHT), or None."""
        spec = self.default_listed_size if self.options.listed_size is None else self.options.listed_size
        if not spec:
            return None
        parts = [p.strip() for p in spec.split(",")]
        if len(parts) != 2 or not all(parts):
            raise UsageError(f"--listed-size {spec!r}: give the width and height columns, e.g. --listed-size width,height")
        return parts[0], parts[1]

    def filters(self) -> dict[str, Any]:
        sizes = self.size_cols
        if sizes is None:
            return {}
        aspect = self.ctx.max_aspect_ratio
        return {"listed_size": ",".join(sizes), "min_size": self.ctx.min_size, **({"max_aspect_ratio": aspect} if aspect else {})}

    def _filter_columns(self) -> list[tuple[str, str, str, float]]:
        """The active filters as (reason, column, 'max'|'min', threshold). The listed size
        predicts the real one: rows listed too small are never downloaded."""
        sizes = self.size_cols
        if sizes is None:
            return []
        return [
            (R.LISTED_TOO_SMALL, sizes[0], "min", self.ctx.min_size),
            (R.LISTED_TOO_SMALL, sizes[1], "min", self.ctx.min_size),
        ]

    def _filter_mask(
        self, path: Path, batch: pa.RecordBatch, found: dict[str, str | None], filtered: Counter[str]
    ) -> pa.Array | None:
        keep = None

        def drop(reason: str, bad: pa.Array) -> None:
            nonlocal keep
            bad = pc.fill_null(bad, False)  # an unknown value drops nothing
            if keep is not None:
                bad = pc.and_(bad, keep)  # count each row under its first failing filter only
            filtered[reason] += pc.sum(bad).as_py() or 0
            keep = pc.invert(bad) if keep is None else pc.and_(keep, pc.invert(bad))

        sizes = self.size_cols or ()
        for reason, col, op, threshold in self._filter_columns():
            actual = found.get(col)
            if actual is not None:
                values = _sizes(batch, actual) if col in sizes else _numbers(path, batch, actual, reason)
                drop(reason, pc.greater(values, threshold) if op == "max" else pc.less(values, threshold))
        limit = self.ctx.max_aspect_ratio
        if sizes and limit is not None and found.get(sizes[0]) and found.get(sizes[1]):
            w, h = (_sizes(batch, found[c] or "") for c in sizes)
            drop(R.ASPECT_RATIO, pc.greater(pc.max_element_wise(w, h), pc.multiply(pc.min_element_wise(w, h), limit)))
        return keep

    # -- items ---------------------------------------------------------------------------------
    def unit_payload(self, unit: Unit) -> UnitRows:
        return UnitRows((self.plan_dir / f"{unit.id}.parquet").read_bytes(), self._known_kinds())

    async def prepare_unit(self, unit: Unit, payload: Any) -> None:
        if not isinstance(payload, UnitRows):
            await self.plan()
            return
        self._shipped[unit.id] = payload

    def _unit_rows(self, unit: Unit) -> tuple[pa.Table, dict[str, str]]:
        """A unit's rows and the list's column kinds: shipped with the unit, or from the plan."""
        shipped = self._shipped.get(unit.id)
        if shipped is not None:
            return pq.read_table(pa.BufferReader(shipped.table)), shipped.kinds
        return pq.read_table(self.plan_dir / f"{unit.id}.parquet"), self._known_kinds()

    async def items(self, unit: Unit) -> AsyncIterator[Item]:
        table, list_kinds = self._unit_rows(unit)
        unit_kinds = orjson.loads((table.schema.metadata or {}).get(kinds.KINDS_KEY, b"{}"))
        width = max(4, len(str(self.ctx.unit_size - 1)))
        for row, rec in enumerate(table.to_pylist()):
            url, caption = rec["url"], rec["caption"]
            key = f"{unit.id}{row:0{width}d}"
            extra = {"url": url or ""}
            for name, kind in list_kinds.items():
                extra[name] = kinds.to_final(rec.get(f"x_{name}"), unit_kinds.get(name, kinds.NULL), kind)
            reject = None
            if not url or not url.strip():
                reject = R.INVALID_URL
            elif caption is not None and not caption.strip():
                reject = R.NO_CAPTION
            yield Item(key, caption or "", url=(url or "").strip(), extra=extra, reject=reject)


class LaionSource(UrlsSource):
    name = "laion"
    help = "LAION parquet lists (URL, TEXT, WIDTH, HEIGHT, punsafe, pwatermark, aesthetic), with metadata filters"
    default_url_col = "URL"
    default_caption_col = "TEXT"
    default_keep_cols = ("similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE", "aesthetic")
    default_listed_size = "WIDTH,HEIGHT"

    Options = LaionOptions
    options: LaionOptions

    def filters(self) -> dict[str, Any]:
        return {
            "max_punsafe": self.options.max_punsafe,
            "max_pwatermark": self.options.max_pwatermark,
            "min_aesthetic": self.options.min_aesthetic,
            **super().filters(),
        }

    def _filter_columns(self) -> list[tuple[str, str, str, float]]:
        a = self.options
        active: list[tuple[str, str, str, float]] = []
        if a.max_punsafe is not None:
            active.append((R.PUNSAFE, "punsafe", "max", a.max_punsafe))
        if a.max_pwatermark is not None:
            active.append((R.PWATERMARK, "pwatermark", "max", a.max_pwatermark))
        if a.min_aesthetic is not None:
            active.append((R.LOW_AESTHETIC, "AESTHETIC_SCORE", "min", a.min_aesthetic))
        return active + super()._filter_columns()

    def _resolve_columns(self, path: Path, schema: pa.Schema, strict: bool = True) -> dict[str, Any]:
        mapping = super()._resolve_columns(path, schema, strict)
        if mapping["filters"].get("AESTHETIC_SCORE") is None:  # laion2B-aesthetic names it "aesthetic"
            mapping["filters"]["AESTHETIC_SCORE"] = find_column(schema.names, "aesthetic")
        if self.options.min_aesthetic is not None and mapping["filters"]["AESTHETIC_SCORE"] is None and strict:
            raise UsageError(
                f"--min-aesthetic given but {path} has no AESTHETIC_SCORE/aesthetic column; its columns are {schema.names}"
            )
        return mapping


def _first_rows(batches: Iterator[tuple[Path, pa.RecordBatch, dict[str, str]]], rows: int) -> Iterator[dict[str, str]]:
    """The kinds of the batches that hold a file's first ``rows`` rows."""
    seen = 0
    for _, batch, batch_kinds in batches:
        if seen >= rows:
            return
        seen += batch.num_rows
        yield batch_kinds


def _numbers(path: Path, batch: pa.RecordBatch, actual: str, reason: str) -> pa.Array:
    """A column filtered on, as float64 (csv's bytes read as numbers; empty: null)."""
    column = _column(batch, actual)
    if pa.types.is_binary(column.type):
        column = pc.if_else(pc.equal(as_text(column), ""), None, as_text(column))
    try:
        return pc.cast(column, pa.float64(), safe=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise UsageError(
            f"column {actual!r} of {path} is filtered on as a number ({reason}) but holds "
            f"{column.type} values that are not numbers: {str(exc)[:120]}"
        ) from exc


def _sizes(batch: pa.RecordBatch, actual: str) -> pa.Array:
    """A listed width or height as float64; what is no positive number ("NA", "", 0, -1) is
    unknown (null): such a row is judged on its pixels, never dropped for its listing."""
    column = _column(batch, actual)
    try:
        values = pc.cast(pc.utf8_trim_whitespace(as_text(column)) if not _is_number(column) else column, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        values = pa.array([_positive(v) for v in column.to_pylist()], pa.float64())
    return pc.if_else(pc.greater(values, 0), values, pa.scalar(None, pa.float64()))


def _is_number(column: pa.Array) -> bool:
    return pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_decimal(column.type)


def _positive(value: Any) -> float | None:
    try:
        number = float(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError, UnicodeDecodeError):
        return None
    return number if number > 0 else None


def _kind(path: Path, column: str, arrow_type: pa.DataType) -> str:
    kind = kinds.kind_of(arrow_type)
    if kind is None:
        raise UsageError(
            f"column {column!r} of {path} is of type {arrow_type}, which fastfetch cannot store in MDS; drop it from --keep-cols"
        )
    return kind


async def _in_thread(steps: Iterator[T], ahead: int) -> AsyncIterator[list[T]]:
    """Run a blocking generator in a thread of its own, at most ``ahead`` steps ahead of the
    consumer; yields what it produced since the last batch (at least one step). Its exception
    is raised here; a consumer that stops early stops it at its next step."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()
    room, stop = threading.Semaphore(ahead), threading.Event()

    def hand(value: tuple[bool, Any]) -> bool:
        try:
            loop.call_soon_threadsafe(ready.put_nowait, value)
            return True
        except RuntimeError:  # the loop is closed: the run ended without waiting for the rest
            return False

    def produce() -> None:
        try:
            for step in steps:
                while not room.acquire(timeout=0.2):
                    if stop.is_set():
                        return
                if stop.is_set() or not hand((False, step)):
                    return
            hand((True, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            hand((True, exc))
        finally:
            if hasattr(steps, "close"):
                steps.close()

    threading.Thread(target=produce, name="fastfetch-plan", daemon=True).start()
    try:
        while True:
            batch: list[T] = []
            last, value = await ready.get()
            while True:
                if last:
                    if batch:
                        yield batch
                    if value is not None:
                        raise value
                    return
                batch.append(value)
                room.release()
                if ready.empty():
                    break
                last, value = ready.get_nowait()
            yield batch
    finally:
        stop.set()


def _column(batch: pa.RecordBatch, name: str) -> pa.Array:
    """A column of a batch; all nulls where a later batch of the same file lacks it (jsonl)."""
    at = batch.schema.get_field_index(name)
    return batch.column(at) if at >= 0 else pa.nulls(batch.num_rows)


def _first_occurrences(batch: pa.RecordBatch, seen: SeenUrls, filtered: Counter[str]) -> pa.RecordBatch:
    """The batch without URLs seen before in the list (counted as ``duplicate_url``). Empty
    URLs stay: each is rejected as ``invalid_url``."""
    urls = trimmed(batch.column(0))
    present = pc.not_equal(urls, "")
    candidates = urls.filter(present)
    if not len(candidates):
        return batch
    fresh = seen.first_seen(candidates)
    if fresh.all():
        return batch
    keep = np.ones(len(urls), dtype=bool)
    keep[np.flatnonzero(present.to_numpy(zero_copy_only=False))] = fresh
    filtered[R.DUPLICATE_URL] += len(fresh) - int(fresh.sum())
    return batch.filter(pa.array(keep))


def _unit_table(pending: list[tuple[pa.RecordBatch, dict[str, str]]], list_kinds: dict[str, str]) -> pa.Table:
    """A unit's batches as one table in the unit's kinds (the widest each column had among
    them), every kept column of the list so far present; the kinds go in its metadata."""
    unit_kinds: dict[str, str] = {}
    for _, batch_kinds in pending:
        for name, kind in batch_kinds.items():
            unit_kinds[name] = kinds.widen(unit_kinds.get(name, kinds.NULL), kind)
    for name in list_kinds:
        unit_kinds.setdefault(name, kinds.NULL)
    batches = []
    for batch, batch_kinds in pending:
        arrays = {"url": batch.column("url"), "caption": batch.column("caption")}
        for name, kind in sorted(unit_kinds.items()):
            have = batch_kinds.get(name)
            if have is None:
                arrays[f"x_{name}"] = pa.nulls(batch.num_rows, kinds.stored_type(kind))
            else:
                column = batch.column(f"x_{name}")
                arrays[f"x_{name}"] = column if have == kind else kinds.convert(column.to_pylist(), have, kind, name, "the list")
        batches.append(pa.RecordBatch.from_pydict(arrays))
    table = pa.Table.from_batches(batches).combine_chunks()
    return table.replace_schema_metadata({kinds.KINDS_KEY: orjson.dumps(unit_kinds)})


def _write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    storage.replace_durably(tmp, path)
