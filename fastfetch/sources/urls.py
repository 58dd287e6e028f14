"""URL lists (any LAION-style parquet/csv/tsv/jsonl/json/txt) and the LAION preset.

Planning streams the lists once and cuts them into deterministic chunks of ``--unit-size``
rows, each saved as a small parquet file under ``--out/_work/urls/``; a unit's items are then
read back from its own file, so a rerun (or another node) never re-reads the big lists. Keys are
``<unit><row>`` positions: unique by construction and stable for the same input, where a URL
hash would collide on duplicate rows and break exactly-once downstream.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import math
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import orjson

from fastfetch import hub
from fastfetch.lists import as_text, expand_paths, find_column, list_format, pa, pc, pq, read_batches
from fastfetch.ranged import AccessDenied, download_file
from fastfetch.sources.base import Item, Source, Unit, UsageError

_PLAN_FILE = "plan.json"


class UrlsSource(Source):
    name = "urls"
    help = "any URL list: txt, csv, tsv, jsonl, json or parquet files (optionally .gz), local, hf:// or http(s)://"
    default_url_col: ClassVar[str] = "url"
    default_caption_col: ClassVar[str] = "caption"
    default_keep_cols: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--urls", nargs="+", metavar="PATH",
            help="URL list files or folders; local paths, hf://datasets/<repo>/<path or glob>, or http(s):// "
            "(required for --dataset urls and laion)",
        )
        group.add_argument("--url-col", default=None, help="URL column (default: url; laion: URL)")
        group.add_argument(
            "--caption-col", default=None,
            help="caption column (default: caption; laion: TEXT); '' for lists without captions",
        )
        group.add_argument(
            "--keep-cols", default=None,
            help="comma-separated extra columns copied into each MDS row (default: none; laion: "
            "similarity, punsafe, pwatermark, aesthetic score where present)",
        )

    # -- configuration -------------------------------------------------------------------------
    @property
    def url_col(self) -> str:
        return self.args.url_col or self.default_url_col

    @property
    def caption_col(self) -> str:
        return self.default_caption_col if self.args.caption_col is None else self.args.caption_col

    def keep_cols(self) -> list[str]:
        if self.args.keep_cols is None:
            return list(self.default_keep_cols)
        return [c.strip() for c in self.args.keep_cols.split(",") if c.strip()]

    def fingerprint(self) -> dict[str, Any]:
        return {"url_col": self.url_col, "caption_col": self.caption_col, "keep_cols": self.keep_cols()}

    def extra_columns(self) -> dict[str, str]:
        plan = self._load_plan()
        return {"url": "str", **(plan["columns"] if plan else {})}

    @property
    def plan_dir(self) -> Path:
        return self.ctx.work_dir

    # -- planning ------------------------------------------------------------------------------
    async def plan(self) -> list[Unit]:
        if not self.args.urls:
            raise UsageError(f"--dataset {self.name} needs --urls PATH [PATH ...] (files, folders, hf:// or http(s)://)")
        files = await self._local_files()
        key = self._plan_key(files)
        cached = self._load_plan()
        if cached and cached["key"] == key and all((self.plan_dir / f"{u[0]}.parquet").exists() for u in cached["units"]):
            return [Unit(uid, spec, spec["rows"]) for uid, spec in cached["units"]]
        return self._write_plan(files, key)

    async def _local_files(self) -> list[Path]:
        local: list[Path] = []
        for spec in self.args.urls:
            if spec.startswith("hf://"):
                local.extend(await self._download_hf(spec))
            elif spec.startswith(("http://", "https://")):
                name = spec.rstrip("/").rsplit("/", 1)[-1].split("?")[0] or "list.txt"
                local.append(await self._download(spec, f"{hashlib.sha1(spec.encode()).hexdigest()[:10]}-{name}"))
            else:
                local.append(Path(spec).expanduser())
        return expand_paths(local)

    async def _download_hf(self, spec: str) -> list[Path]:
        """``hf://datasets/<org>/<name>[@revision]/<path or glob>`` → local copies of the lists."""
        parts = spec.removeprefix("hf://").split("/")
        if len(parts) < 4 or parts[0] != "datasets":
            raise UsageError(f"{spec}: expected hf://datasets/<org>/<name>/<path or glob>")
        repo, _, revision = "/".join(parts[1:3]).partition("@")
        pattern = "/".join(parts[3:])
        fixed = pattern.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
        folder = fixed.rsplit("/", 1)[0] if "/" in fixed else ""
        files = [f for f in await hub.list_files(repo, folder, revision=revision or hub.DEFAULT_REVISION)
                 if fnmatch.fnmatchcase(f.path, pattern)]
        if not files:
            raise UsageError(f"{spec} matches no file of the Hugging Face dataset {repo} ({hub.dataset_page(repo)})")
        return [
            await self._download(hub.file_url(repo, f.path, revision or hub.DEFAULT_REVISION),
                                 f"{repo.replace('/', '__')}__{f.oid[:12]}__{f.path.replace('/', '__')}", hub.headers(), repo)
            for f in files
        ]

    async def _download(self, url: str, name: str, headers: dict[str, str] | None = None, repo: str | None = None) -> Path:
        """A remote list file into the work folder (resumable; kept for reruns)."""
        try:
            return await download_file(self.ctx.fetcher.session, url, self.plan_dir / "lists" / name, headers)
        except AccessDenied as exc:
            if repo:
                raise hub.access_error(repo, exc.status) from exc
            raise UsageError(f"cannot download the URL list {url}: HTTP {exc.status}") from exc
        except Exception as exc:
            raise UsageError(f"cannot download the URL list {url}: {type(exc).__name__}: {exc}") from exc

    def _plan_key(self, files: list[Path]) -> dict[str, Any]:
        return {
            "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
            "unit_size": self.args.unit_size,
            "limit": self.args.limit,
            "filters": self.filters(),
            **self.fingerprint(),
        }

    def _load_plan(self) -> dict[str, Any] | None:
        path = self.plan_dir / _PLAN_FILE
        return orjson.loads(path.read_bytes()) if path.exists() else None

    def _write_plan(self, files: list[Path], key: dict[str, Any]) -> list[Unit]:
        self.plan_dir.mkdir(parents=True, exist_ok=True)
        unit_size: int = self.args.unit_size
        units: list[Unit] = []
        columns: dict[str, str] = {}
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        filtered: Counter[str] = Counter()
        row_total = 0

        def flush() -> None:
            nonlocal pending, pending_rows, filtered
            table = pa.Table.from_batches(pending).combine_chunks()
            uid = f"{len(units):05d}"
            _write_parquet(table, self.plan_dir / f"{uid}.parquet")
            digest = hashlib.blake2b(
                b"\n".join(v.encode() for v in table.column("url").to_pylist() if v), digest_size=12
            ).hexdigest()
            units.append(Unit(uid, {"rows": table.num_rows, "digest": digest, "prefiltered": dict(filtered)}, table.num_rows))
            pending, pending_rows, filtered = [], 0, Counter()

        for batch in self._rows(files, columns, filtered):
            if self.args.limit is not None:
                batch = batch.slice(0, max(0, self.args.limit - row_total))
            row_total += batch.num_rows
            while batch.num_rows:
                take = min(batch.num_rows, unit_size - pending_rows)
                pending.append(batch.slice(0, take))
                pending_rows += take
                batch = batch.slice(take)
                if pending_rows == unit_size:
                    flush()
            if self.args.limit is not None and row_total >= self.args.limit:
                break
        if pending_rows:
            flush()
        if not units:
            raise UsageError(
                f"the URL list ({', '.join(map(str, files))}) has no rows to fetch"
                + (f" after the filters ({dict(filtered)})" if filtered else "")
            )
        plan = {"key": key, "columns": columns, "units": [[u.id, u.spec] for u in units]}
        tmp = self.plan_dir / (_PLAN_FILE + ".tmp")
        tmp.write_bytes(orjson.dumps(plan))
        os.replace(tmp, self.plan_dir / _PLAN_FILE)
        return units

    def _rows(self, files: list[Path], columns: dict[str, str], filtered: Counter[str]) -> Iterator[pa.RecordBatch]:
        """Normalised batches (url, caption, kept columns) with the list filters applied."""
        for path in files:
            batches = read_batches(path, skipped=filtered)
            first = True
            for batch in batches:
                if first:
                    mapping = self._resolve_columns(path, batch.schema)
                    for name, (_, mds) in mapping["keep"].items():
                        columns.setdefault(name, mds)
                    first = False
                yield self._normalise(batch, mapping, filtered)

    def _resolve_columns(self, path: Path, schema: pa.Schema) -> dict[str, Any]:
        names = schema.names
        if list_format(path) == "txt":
            url = "url"
        else:
            url = find_column(names, self.url_col)
            if url is None:
                raise UsageError(
                    f"{path} has no URL column {self.url_col!r}; its columns are {names}. Pass --url-col NAME"
                )
        caption = None
        if self.caption_col and list_format(path) != "txt":
            caption = find_column(names, self.caption_col)
            if caption is None:
                raise UsageError(
                    f"{path} has no caption column {self.caption_col!r}; its columns are {names}. "
                    "Pass --caption-col NAME, or --caption-col '' for a list without captions"
                )
        keep: dict[str, tuple[str, str]] = {}
        explicit = self.args.keep_cols is not None
        for wanted in self.keep_cols():
            actual = find_column(names, wanted)
            if actual is None:
                if explicit:
                    raise UsageError(f"{path} has no column {wanted!r} (from --keep-cols); its columns are {names}")
                continue
            keep[wanted] = (actual, _mds_encoding(schema.field(actual).type))
        filters = {col: find_column(names, col) for _, col, _, _ in self._filter_columns()}
        return {"url": url, "caption": caption, "keep": keep, "filters": filters}

    def _normalise(self, batch: pa.RecordBatch, mapping: dict[str, Any], filtered: Counter[str]) -> pa.RecordBatch:
        mask = self._filter_mask(batch, mapping["filters"], filtered)
        if mask is not None:
            batch = batch.filter(mask)
        arrays = {"url": as_text(batch.column(mapping["url"]))}
        # A missing caption is "" (rejected as no_caption); a list without a caption column at
        # all (txt, --caption-col '') stores null, which is allowed and stored as "".
        arrays["caption"] = (
            pc.fill_null(as_text(batch.column(mapping["caption"])), "")
            if mapping["caption"] else pa.nulls(batch.num_rows, pa.string())
        )
        for name, (actual, mds) in mapping["keep"].items():
            col = batch.column(actual)
            if pa.types.is_binary(col.type):
                col = as_text(col)
            arrays[f"x_{name}"] = col if mds != "json" else pa.array(
                [orjson.dumps(v).decode() for v in col.to_pylist()], pa.string()
            )
        return pa.RecordBatch.from_pydict(arrays)

    # -- filters (none for plain lists; the LAION preset adds its own) --------------------------
    def filters(self) -> dict[str, float | None]:
        return {}

    def _filter_columns(self) -> list[tuple[str, str, str, float]]:
        """The active filters as (reason, column, 'max'|'min', threshold)."""
        return []

    def _filter_mask(self, batch: pa.RecordBatch, found: dict[str, str | None], filtered: Counter[str]) -> pa.Array | None:
        keep = None
        for reason, col, op, threshold in self._filter_columns():
            actual = found.get(col)
            if actual is None:
                continue
            column = batch.column(actual)
            if pa.types.is_binary(column.type):
                column = pc.if_else(pc.equal(as_text(column), ""), None, as_text(column))
            values = pc.cast(column, pa.float64(), safe=False)
            bad = pc.greater(values, threshold) if op == "max" else pc.less(values, threshold)
            bad = pc.fill_null(bad, False)
            if keep is not None:
                bad = pc.and_(bad, keep)  # count each row under its first failing filter only
            filtered[reason] += pc.sum(bad).as_py() or 0
            keep = pc.invert(bad) if keep is None else pc.and_(keep, pc.invert(bad))
        return keep

    # -- items ---------------------------------------------------------------------------------
    async def items(self, unit: Unit) -> AsyncIterator[Item]:
        table = pq.read_table(self.plan_dir / f"{unit.id}.parquet")
        encodings = (self._load_plan() or {}).get("columns", {})
        kept = [(c, encodings[c[2:]]) for c in table.column_names if c.startswith("x_")]
        width = max(4, len(str(self.args.unit_size - 1)))
        seen: set[str] = set()
        for row, rec in enumerate(table.to_pylist()):
            url, caption = rec["url"], rec["caption"]
            key = f"{unit.id}{row:0{width}d}"
            extra = {"url": url or "", **{c[2:]: _mds_value(rec[c], enc) for c, enc in kept}}
            reject = None
            if not url or not url.strip():
                reject = "invalid_url"
            elif url in seen:
                reject = "duplicate_url"
            elif caption is not None and not caption.strip():
                reject = "no_caption"
            seen.add(url or "")
            yield Item(key, caption or "", url=(url or "").strip(), extra=extra, reject=reject)


class LaionSource(UrlsSource):
    name = "laion"
    help = "LAION parquet lists (URL, TEXT, WIDTH, HEIGHT, punsafe, pwatermark, aesthetic), with metadata filters"
    default_url_col = "URL"
    default_caption_col = "TEXT"
    default_keep_cols = ("similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE", "aesthetic")

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--max-punsafe", type=float, default=None, help="laion: drop rows with punsafe above this (default: keep all)")
        group.add_argument("--max-pwatermark", type=float, default=None, help="laion: drop rows with pwatermark above this (default: keep all)")
        group.add_argument("--min-aesthetic", type=float, default=None, help="laion: drop rows with an aesthetic score below this (default: keep all)")

    def filters(self) -> dict[str, float | None]:
        return {
            "max_punsafe": self.args.max_punsafe,
            "max_pwatermark": self.args.max_pwatermark,
            "min_aesthetic": self.args.min_aesthetic,
            "min_size": self.args.min_size,
        }

    def _filter_columns(self) -> list[tuple[str, str, str, float]]:
        a = self.args
        active: list[tuple[str, str, str, float]] = []
        if a.max_punsafe is not None:
            active.append(("punsafe", "punsafe", "max", a.max_punsafe))
        if a.max_pwatermark is not None:
            active.append(("pwatermark", "pwatermark", "max", a.max_pwatermark))
        if a.min_aesthetic is not None:
            active.append(("low_aesthetic", "AESTHETIC_SCORE", "min", a.min_aesthetic))
        # The listed size predicts the real one: rows listed too small are never downloaded.
        active.append(("listed_too_small", "WIDTH", "min", a.min_size))
        active.append(("listed_too_small", "HEIGHT", "min", a.min_size))
        return active

    def _resolve_columns(self, path: Path, schema: pa.Schema) -> dict[str, Any]:
        mapping = super()._resolve_columns(path, schema)
        if mapping["filters"].get("AESTHETIC_SCORE") is None:  # laion2B-aesthetic names it "aesthetic"
            mapping["filters"]["AESTHETIC_SCORE"] = find_column(schema.names, "aesthetic")
        if self.args.min_aesthetic is not None and mapping["filters"]["AESTHETIC_SCORE"] is None:
            raise UsageError(f"--min-aesthetic given but {path} has no AESTHETIC_SCORE/aesthetic column; its columns are {schema.names}")
        return mapping


def _mds_encoding(arrow_type: pa.DataType) -> str:
    """MDS encoding of a kept column: floats as float64 (null → NaN), strings as str, else json."""
    if pa.types.is_floating(arrow_type):
        return "float64"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_binary(arrow_type):
        return "str"  # csv/tsv columns arrive as bytes and are decoded
    return "json"


def _mds_value(value: Any, encoding: str) -> Any:
    """A kept column's value as MDS stores it (json columns were saved as JSON text)."""
    if encoding == "json":
        return orjson.loads(value)
    if value is None:
        return math.nan if encoding == "float64" else ""
    return value


def _write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
