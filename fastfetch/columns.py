"""Kept list columns (``--keep-cols``): one MDS encoding per column over a whole list.

Real lists disagree with themselves: ``similarity`` is float32 in one parquet file and float64
in the next, a LAION folder has a file without ``similarity``, a jsonl gives ``0.5`` in its
first rows and ``2`` later, and a column may be a decimal. Each column gets a *kind* per record
batch (``kind_of``); kinds widen to a common one as batches arrive (``widen``: int and float →
float, numbers and text → text, anything with nested values → json), and a missing column is
null. The list's kinds are settled before planning cuts units (from the files' schemas, or a
first reading of a jsonl's rows); each unit's rows are stored in their own kinds, recorded in
the unit file, and turned into the list's kind when its items are read (``to_final``). What has no faithful MDS form (durations, intervals,
extension types) is refused, naming the column and the file.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import orjson

from fastfetch.arrow import pa, pc
from fastfetch.errors import UsageError
from fastfetch.lists import as_text

NULL, BOOL, INT, FLOAT, STR, JSON = "null", "bool", "int", "float", "str", "json"
#: the MDS encoding each kind is stored as (integers and booleans keep their JSON form, so a
#: null stays a null; a float's null is NaN, a string's is "")
ENCODING = {NULL: "json", BOOL: "json", INT: "json", FLOAT: "float64", STR: "str", JSON: "json"}
KINDS_KEY = b"fastfetch.kinds"  # a unit file's schema metadata: its columns' kinds (JSON)


def kind_of(arrow_type: pa.DataType) -> str | None:
    """The kind of an Arrow type, or None when it has no faithful MDS form."""
    t = pa.types
    if t.is_dictionary(arrow_type):
        return kind_of(arrow_type.value_type)
    if t.is_null(arrow_type):
        return NULL
    if t.is_boolean(arrow_type):
        return BOOL
    if t.is_integer(arrow_type):
        return JSON if arrow_type == pa.uint64() else INT  # above int64: still exact in JSON
    if t.is_floating(arrow_type) or t.is_decimal(arrow_type):
        return FLOAT
    if (
        t.is_string(arrow_type)
        or t.is_large_string(arrow_type)
        or t.is_binary(arrow_type)
        or t.is_large_binary(arrow_type)
        or t.is_fixed_size_binary(arrow_type)
        or getattr(t, "is_string_view", lambda _: False)(arrow_type)
        or getattr(t, "is_binary_view", lambda _: False)(arrow_type)
    ):
        return STR  # csv/tsv columns arrive as bytes and are decoded
    if t.is_temporal(arrow_type) and not (t.is_duration(arrow_type) or t.is_interval(arrow_type)):
        return STR  # dates and times as ISO 8601 text
    if t.is_nested(arrow_type):
        return JSON
    return None


def widen(a: str, b: str) -> str:
    """The kind that holds values of kinds ``a`` and ``b``."""
    if a == b or b == NULL:
        return a
    if a == NULL:
        return b
    pair = {a, b}
    if pair == {INT, FLOAT}:
        return FLOAT
    if JSON in pair or BOOL in pair and pair & {INT, FLOAT}:
        return JSON
    return STR  # text with numbers or booleans: the numbers as their JSON text


def stored(array: pa.Array, kind: str, column: str, where: str) -> pa.Array:
    """``array`` in the Arrow type a unit file keeps values of ``kind`` in."""
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if kind == NULL:
        return pa.nulls(len(array))
    if kind == FLOAT:
        return pc.cast(array, pa.float64(), safe=False)
    if kind == INT:
        return pc.cast(array, pa.int64())
    if kind == BOOL:
        return array
    if kind == STR and not pa.types.is_temporal(array.type):
        return as_text(array)  # always pa.string()
    return pa.array([None if v is None else _text(v, kind, column, where) for v in array.to_pylist()], pa.string())


def stored_type(kind: str) -> pa.DataType:
    return {NULL: pa.null(), BOOL: pa.bool_(), INT: pa.int64(), FLOAT: pa.float64()}.get(kind, pa.string())


def convert(values: list[Any], have: str, want: str, column: str, where: str) -> pa.Array:
    """Stored values of kind ``have`` as stored values of the wider kind ``want``."""
    if want in (NULL, BOOL, INT, FLOAT):  # only nulls, or integers becoming floats, arrive here
        return pa.array([None if v is None else float(v) if want == FLOAT else v for v in values], stored_type(want))
    python = [_python(v, have) for v in values]
    return pa.array([None if v is None else _text(v, want, column, where) for v in python], pa.string())


def to_final(value: Any, have: str, want: str) -> Any:
    """A stored value (of a unit's kind ``have``) as the MDS value of the list's kind ``want``."""
    value = _python(value, have)
    if want == FLOAT:
        return math.nan if value is None else float(value)
    if want == STR:
        if value is None:
            return ""
        return value if isinstance(value, str) else orjson.dumps(value).decode()
    return value


def _python(value: Any, kind: str) -> Any:
    return orjson.loads(value) if kind == JSON and value is not None else value


def _text(value: Any, kind: str, column: str, where: str) -> str:
    """A Python value as stored text: ISO dates for text columns, JSON text for json ones."""
    if kind == STR:
        if isinstance(value, str):
            return value
        if hasattr(value, "isoformat"):
            return value.isoformat()
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
    try:
        return orjson.dumps(value, default=_json_default).decode()
    except TypeError as exc:
        raise UsageError(
            f"column {column!r} of {where} holds a value fastfetch cannot store ({type(value).__name__}: "
            f"{str(value)[:60]}); drop it from --keep-cols"
        ) from exc


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    raise TypeError(type(value).__name__)
