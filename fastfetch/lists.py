"""Read URL lists (txt, csv, tsv, jsonl, json, parquet; optionally gzipped) as Arrow batches.

Lists can hold billions of rows, so every format is read as a stream of record batches and
never as a whole (except a plain ``.json`` array, which has no streaming form). Column lookup is
case-insensitive because the same dataset is published as ``URL``/``url``/``Url``.
"""

from __future__ import annotations

import codecs
import gzip
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from fastfetch.arrow import pa, pacsv, pc, pq
from fastfetch.errors import UsageError

FORMATS = ("parquet", "csv", "tsv", "jsonl", "json", "txt")
BATCH_ROWS = 65_536


def list_format(path: Path) -> str | None:
    """The format of a list file from its name (``x.csv.gz`` → ``csv``), or None."""
    suffixes = [s.lower().lstrip(".") for s in path.suffixes]
    if suffixes and suffixes[-1] == "gz":
        suffixes.pop()
    if not suffixes:
        return None
    ext = {"ndjson": "jsonl", "tab": "tsv"}.get(suffixes[-1], suffixes[-1])
    return ext if ext in FORMATS else None


def expand_paths(paths: list[Path], skip: tuple[Path, ...] = ()) -> list[Path]:
    """Files and folders → the sorted list files (a folder contributes its list files,
    recursively, but none at or below a ``skip`` path: a run's own output inside a folder of
    lists holds plan, index and stats files that are not URL lists)."""
    files: list[Path] = []
    skipped = tuple(p.resolve() for p in skip)
    for path in paths:
        if not path.exists():
            raise UsageError(f"URL list {path} does not exist; pass an existing file or folder to --urls")
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and list_format(p) and not any(p.resolve().is_relative_to(s) for s in skipped)
            )
            if not found:
                raise UsageError(f"folder {path} holds no URL list (looked for {', '.join(FORMATS)}, optionally .gz)")
            files.extend(found)
        elif list_format(path) is None:
            raise UsageError(
                f"cannot tell the format of {path}: name it with one of the endings "
                f"{', '.join('.' + f for f in FORMATS)} (optionally + .gz)"
            )
        else:
            files.append(path)
    return files


def read_batches(path: Path, columns: list[str] | None = None, skipped: Counter[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream a list file as record batches of strings/numbers.

    ``columns`` restricts what is read (parquet reads only those column chunks). For ``txt``
    the only column is ``url``. Lines that are not valid JSON in a jsonl list are counted in
    ``skipped`` under ``malformed_row`` instead of failing the whole list.
    """
    skipped = skipped if skipped is not None else Counter()
    fmt = list_format(path)
    try:
        if fmt == "parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns)
        elif fmt in ("csv", "tsv"):
            yield from _csv_batches(path, fmt)
        elif fmt == "jsonl":
            yield from _jsonl_batches(path, skipped)
        elif fmt == "json":
            yield from _json_batches(path)
        elif fmt == "txt":
            yield from _txt_batches(path)
        else:
            raise UsageError(f"unsupported list format for {path}")
    except (pa.ArrowInvalid, OSError, orjson.JSONDecodeError, UnicodeDecodeError, EOFError) as exc:
        raise UsageError(f"cannot read URL list {path}: {exc}") from exc


def _open_text(path: Path) -> pa.NativeFile:
    return pa.input_stream(str(path), compression="gzip" if path.suffix.lower() == ".gz" else None)


def list_schema(path: Path) -> pa.Schema | None:
    """The schema of every batch ``read_batches`` gives for a list file, read without its rows
    (parquet: the footer; csv/tsv: the header; txt: one url column), or None for jsonl and
    json, whose keys and types are known only from the rows."""
    fmt = list_format(path)
    try:
        if fmt == "parquet":
            return pq.read_schema(path)
        if fmt in ("csv", "tsv"):
            return pa.schema([(name, pa.binary()) for name in _csv_header(path, _csv_parse(fmt))])
        if fmt == "txt":
            return pa.schema([("url", pa.string())])
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError, EOFError) as exc:
        raise UsageError(f"cannot read URL list {path}: {exc}") from exc
    if fmt in ("jsonl", "json"):
        return None
    raise UsageError(f"unsupported list format for {path}")


def _csv_parse(fmt: str) -> pacsv.ParseOptions:
    return pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True, invalid_row_handler=_skip_row)


def _csv_header(path: Path, parse: pacsv.ParseOptions) -> list[str]:
    return list(pacsv.open_csv(_open_text(path), parse_options=parse).schema.names)


def _csv_batches(path: Path, fmt: str) -> Iterator[pa.RecordBatch]:
    """Every column as bytes, turned into text by ``as_text``: a caption column of digits must
    not become an integer, a column empty for the first million rows must not fail later, and
    scraped alt text that is not valid UTF-8 must not fail the list."""
    parse = _csv_parse(fmt)
    yield from pacsv.open_csv(
        _open_text(path),
        read_options=pacsv.ReadOptions(block_size=8 << 20),
        parse_options=parse,
        convert_options=pacsv.ConvertOptions(column_types={n: pa.binary() for n in _csv_header(path, parse)}),
    )


def _skip_row(row: Any) -> str:
    return "skip"  # a row with the wrong number of fields: no URL in it can be trusted


def as_text(array: pa.Array) -> pa.Array:
    """Any column as ``pa.string()`` (one type whatever the file used: batches of different
    files end up in one table); invalid UTF-8 is decoded with replacement characters."""
    if pa.types.is_string(array.type):
        return array
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    try:
        return pc.cast(array, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        if not (pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type)):
            return pa.array([None if v is None else str(v) for v in array.to_pylist()], pa.string())
        return pa.array([None if v is None else v.decode("utf-8", "replace") for v in array.to_pylist()], pa.string())


def _jsonl_batches(path: Path, skipped: Counter[str]) -> Iterator[pa.RecordBatch]:
    rows: list[dict] = []
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rb") as f:
        for number, line in enumerate(f):
            if number == 0:
                line = line.removeprefix(codecs.BOM_UTF8)
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                skipped["malformed_row"] += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                skipped["malformed_row"] += 1
            if len(rows) >= BATCH_ROWS:
                yield _batch_from_rows(rows)
                rows = []
    if rows:
        yield _batch_from_rows(rows)


def _batch_from_rows(rows: list[dict]) -> pa.RecordBatch:
    """Rows → batch with every key any row has (null where a row lacks it; Arrow's own
    ``from_pylist`` keeps only the first row's keys). Nested values are JSON text; a column
    whose values mix types (``1`` and ``"1"``) becomes text, its other values as JSON text."""
    names = list(dict.fromkeys(key for row in rows for key in row))
    arrays: dict[str, pa.Array] = {}
    for name in names:
        values = [row.get(name) for row in rows]
        values = [v if v is None or isinstance(v, (str, int, float, bool)) else orjson.dumps(v).decode() for v in values]
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            arrays[name] = pa.array(
                [v if v is None or isinstance(v, str) else orjson.dumps(v).decode() for v in values], pa.string()
            )
    return pa.RecordBatch.from_pydict(arrays)


def _json_batches(path: Path) -> Iterator[pa.RecordBatch]:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rb") as f:
        doc = orjson.loads(f.read().removeprefix(codecs.BOM_UTF8))
    if isinstance(doc, dict):
        columns = list(doc.values())
        if columns and all(isinstance(c, list) for c in columns):  # {"url": [...], "caption": [...]}
            if len({len(c) for c in columns}) != 1:
                lengths = ", ".join(f"{k}: {len(v)}" for k, v in doc.items())
                raise UsageError(f"{path}: its columns have different lengths ({lengths}); every column needs one value a row")
            doc = [dict(zip(doc, values)) for values in zip(*columns)]
        else:
            doc = [doc]  # one object: one row
    if not isinstance(doc, list):
        raise UsageError(f"{path}: expected a JSON array of objects or URLs, or an object of equal-length columns")
    rows = [r if isinstance(r, dict) else {"url": r} for r in doc]
    for start in range(0, len(rows), BATCH_ROWS):
        yield _batch_from_rows(rows[start : start + BATCH_ROWS])


def _txt_batches(path: Path) -> Iterator[pa.RecordBatch]:
    urls: list[str] = []
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                urls.append(line)
            if len(urls) >= BATCH_ROWS:
                yield pa.RecordBatch.from_pydict({"url": urls})
                urls = []
    if urls:
        yield pa.RecordBatch.from_pydict({"url": urls})


def find_column(names: list[str], wanted: str) -> str | None:
    """The actual name of column ``wanted`` (exact match first, then case-insensitive)."""
    if wanted in names:
        return wanted
    lowered = {n.lower(): n for n in names}
    return lowered.get(wanted.lower())
