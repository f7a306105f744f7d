"""Reading rows from jsonl, parquet or a ``datasets.Dataset``, with errors that name the place.

Every row carries ``where`` ("path:line" for jsonl, "path:row N" otherwise) so a validation
error can say exactly which line and which field is wrong. Nothing is skipped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Row:
    where: str
    data: dict[str, Any]


def read_rows(source) -> list[Row]:
    """Rows from a ``.jsonl``/``.json`` path, a ``.parquet`` path, a ``datasets.Dataset`` or a list of dicts."""
    if isinstance(source, (str, Path)):
        if not str(source).strip():
            raise DataError("no data file given (the data path is empty)")
        path = Path(source)
        if path.is_dir():
            raise DataError(f"{path}: is a directory, not a data file (give a .jsonl or .parquet file)")
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        rows = _read_parquet(path) if path.suffix == ".parquet" else _read_jsonl(path)
        if not rows:
            raise DataError(f"{path}: the file holds no rows")
        return rows
    if isinstance(source, list):
        rows = [Row(f"<list>:row {i}", _as_dict(r, f"<list>:row {i}")) for i, r in enumerate(source)]
    else:  # a datasets.Dataset, or anything iterable of dicts
        name = getattr(source, "info", None) and getattr(source.info, "dataset_name", None) or "<dataset>"
        rows = [Row(f"{name}:row {i}", _as_dict(r, f"{name}:row {i}")) for i, r in enumerate(source)]
    if not rows:
        raise DataError("the dataset holds no rows")
    return rows


def _as_dict(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(obj).__name__}")
    return obj


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            rows.append(Row(where, _as_dict(obj, where)))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import datasets

    ds = datasets.Dataset.from_parquet(str(path))
    return [Row(f"{path}:row {i}", dict(r)) for i, r in enumerate(ds)]


def _require(row: Row, field: str):
    if field not in row.data:
        have = ", ".join(sorted(row.data)) or "none"
        raise DataError(f"{row.where}: missing field '{field}' (fields present: {have})")
    return row.data[field]


def get_str(row: Row, field: str, allow_empty: bool = False) -> str:
    """``row.data[field]`` as a string, or a DataError naming the place and the field."""
    value = _require(row, field)
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field '{field}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{row.where}: field '{field}' is empty")
    return value


def get_str_list(row: Row, field: str, min_len: int = 2) -> list[str]:
    """A list of distinct non-empty strings (for rankings), with the same kind of errors."""
    value = _require(row, field)
    if not isinstance(value, list):
        raise DataError(f"{row.where}: field '{field}' must be a list of strings, got {type(value).__name__}")
    if len(value) < min_len:
        raise DataError(f"{row.where}: field '{field}' needs at least {min_len} entries, got {len(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise DataError(f"{row.where}: field '{field}[{i}]' must be a string, got {type(item).__name__}")
        if not item.strip():
            raise DataError(f"{row.where}: field '{field}[{i}]' is empty")
    if len(set(value)) != len(value):
        dup = next(v for v in value if value.count(v) > 1)
        raise DataError(f"{row.where}: field '{field}' lists {dup!r} more than once")
    return value


def reads(*fields: str):
    """Declare the row fields a reward function reads (``@reads("answer")``): every prompt row is
    checked for them before any model loads, instead of the reward failing mid-run."""

    def mark(fn):
        fn.row_fields = tuple(fields)
        return fn

    return mark


def missing_fields(row: Row, fields) -> list[str]:
    """The names among ``fields`` that ``row`` lacks (absent or null)."""
    return [f for f in fields if row.data.get(f) is None]


def check_fields(rows: list[Row], required=(), reserved=(), why: str = "") -> None:
    """Every row has each ``required`` field (not null) and no field named as one of ``reserved``;
    otherwise a DataError naming the first bad row's place and the field."""
    for row in rows:
        clash = sorted(set(row.data) & set(reserved))
        if clash:
            raise DataError(f"{row.where}: field '{clash[0]}' has the name of an argument every reward takes "
                            f"({', '.join(reserved)}); rename or drop it")
        missing = missing_fields(row, required)
        if missing:
            have = ", ".join(sorted(row.data)) or "none"
            raise DataError(f"{row.where}: missing field '{missing[0]}'{why} (fields present: {have})")
