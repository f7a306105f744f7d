"""Reading rows from jsonl, a JSON array, csv, parquet, a saved dataset folder or a
``datasets.Dataset``, with errors that name the place.

Every row carries ``where`` ("path:line" for jsonl and csv, "path:row N" otherwise, N from 1) so a
validation error can say exactly which line and which field is wrong. Nothing is skipped
silently. A table (parquet, csv, a dataset) gives every row every column: a null there is a
field the row does not have, as if a jsonl line left it out.
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


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark Windows editors and Excel write first


def read_rows(source) -> list[Row]:
    """Rows from a ``.jsonl``/``.json`` path, a ``.parquet`` path, a pattern of such paths (a Hub
    snapshot's ``data/train-*.parquet``: every file, in name order), a folder written by
    ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``FOLDER:split`` picks a split, as
    ``FILE.json:split`` picks one of a JSON object's lists of rows), a
    ``datasets.Dataset``, a ``DatasetDict`` of one split, or a list of dicts. ShareGPT's chat form
    is read as ChatML's, and a message's content given as parts as its text (``as_chatml``)."""
    return [Row(r.where, as_chatml(r.data, r.where)) for r in _read_rows(source)]


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # the rest (system, tool, ...) are ChatML's names already
CHAT_FIELDS = ("prompt", "completion", "chosen", "rejected", "messages", "conversations")


def as_chatml(data: dict, where: str) -> dict:
    """A row's chat messages in ChatML's form with string content. A row in ShareGPT's form is
    read as TRL's ``maybe_convert_to_chatml`` reads it: ``conversations`` is ``messages``, and a
    message's ``from`` and ``value`` are its ``role`` and ``content``; and ShareGPT's ``human``
    and ``gpt`` are the ``user`` and the ``assistant`` (which TRL leaves to the chat template).
    Content given as a list of parts (OpenAI's form, TRL's vision datasets') is its text parts
    joined (``_text_content``). Any other row is returned as it is."""
    if not any(messages_like(data.get(k)) for k in CHAT_FIELDS):
        return data
    out = dict(data)
    for key in CHAT_FIELDS:
        if messages_like(out.get(key)):
            out[key] = [_text_content(_chatml_message(m), f"{where}: field '{key}[{i}]'")
                        for i, m in enumerate(out[key])]
    if messages_like(out.get("conversations")) and "messages" not in out:
        out["messages"] = out.pop("conversations")
    return out


def messages_like(value) -> bool:
    """A list of chat messages in ChatML's form (``role``) or ShareGPT's (``from``)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and ("role" in m or "from" in m)
                                                           for m in value)


def _chatml_message(message: dict) -> dict:
    """A ShareGPT message as ChatML's; one that has a ``role`` already is left as it is (a ``from``
    beside it is the row's own field)."""
    if "role" in message or "from" not in message:
        return message
    out = {k: v for k, v in message.items() if k not in ("from", "value")}
    out["role"] = SHAREGPT_ROLES.get(message["from"], message["from"])
    if "value" in message and "content" not in message:
        out["content"] = message["value"]
    return out


def _text_content(message: dict, place: str) -> dict:
    """A message whose ``content`` is a list of parts (``[{"type": "text", "text": ...}, ...]``)
    with its text parts joined into one string, as the chat templates that take parts render
    them (one after another); a part of another kind (an image, audio) is refused: rlhfkit trains
    text models, and the text without it would not be what the row says."""
    parts = message.get("content")
    if not isinstance(parts, list):
        return message
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"a part of type {kind!r}" if kind else f"not a part ({{'type': 'text', 'text': ...}}): {part!r:.60}"
            raise DataError(f"{place}.content[{j}] is {what}; rlhfkit trains text models and reads a message's "
                            "content parts of type 'text' only")
        texts.append(part["text"])
    return {**message, "content": "".join(texts)}


def _read_rows(source) -> list[Row]:
    if isinstance(source, (str, Path)):
        if not str(source).strip():
            raise DataError("no data file given (the data path is empty)")
        path = Path(source)
        if not path.exists() and any(c in str(source) for c in "*?["):  # a pattern: its files in name order
            import glob

            files = sorted(f for f in glob.glob(str(source), recursive=True) if Path(f).is_file())
            if not files:
                raise DataError(f"{source}: no file matches")
            return [row for f in files for row in _read_rows(f)]
        folder, _, split = str(source).rpartition(":") if ":" in str(source) else (str(source), "", "")
        if path.is_dir() or (split and Path(folder).is_dir()):
            saved = Path(folder if split else path)
            if not any((saved / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
                shards = sorted(p.relative_to(saved) for p in saved.glob("**/*.parquet"))
                hint = f"; for its parquet files give a pattern, such as {saved / shards[0].parent / '*.parquet'}" \
                    if shards else ""
                raise DataError(f"{saved}: is a directory, not a data file (give a .jsonl or .parquet file, "
                                f"or a folder written by save_to_disk){hint}")
            return _read_saved(saved, split or None)
        if split and Path(folder).is_file() and Path(folder).suffix.lower() == ".json":  # FILE.json:split
            return _nonempty(Path(folder), _read_json(Path(folder), split))
        if not path.is_file():
            if _looks_like_hub_name(str(source)):
                raise DataError(f"{source}: a Hub dataset name needs the network; pass a local file or a saved "
                                "dataset folder (datasets.load_dataset(...).save_to_disk(FOLDER) where there is one)")
            raise DataError(f"{path}: file not found")
        readers = {".parquet": _read_parquet, ".csv": _read_csv, ".json": _read_json, ".jsonl": _read_jsonl}
        reader = readers.get(path.suffix.lower())
        if reader is None:
            reader = _unknown_kind(path)
        return _nonempty(path, reader(path))
    if _is_dataset_dict(source):
        return _one_split(source, None, "<DatasetDict>")
    if isinstance(source, dict) or type(source).__name__ == "DataFrame":  # columns: a table, as datasets reads one
        import datasets

        try:
            if isinstance(source, dict):
                table = datasets.Dataset.from_dict(source)
            elif type(source).__module__.startswith("polars"):
                table = datasets.Dataset.from_polars(source)
            else:
                table = datasets.Dataset.from_pandas(source, preserve_index=False)
        except Exception as e:  # columns of unequal length, values arrow cannot hold
            raise DataError(f"<{type(source).__name__}>: not a table of columns ({type(e).__name__}: {e})") from None
        return _from_dataset(table, f"<{type(source).__name__}>")
    if isinstance(source, list):
        rows = [Row(f"<list>:row {i}", _as_dict(r, f"<list>:row {i}")) for i, r in enumerate(source, start=1)]
    else:  # a datasets.Dataset (a table: its nulls are absent fields), or anything iterable of dicts
        name = getattr(source, "info", None) and getattr(source.info, "dataset_name", None) or "<dataset>"
        rows = [Row(f"{name}:row {i}", _present(_as_dict(r, f"{name}:row {i}")))
                for i, r in enumerate(source, start=1)]
    if not rows:
        raise DataError("the dataset holds no rows")
    return rows


def _nonempty(path: Path, rows: list[Row]) -> list[Row]:
    if not rows:
        raise DataError(f"{path}: the file holds no rows")
    return rows


def source_name(source) -> str:
    """A data source as a message names it: its path, or the kind of object it is."""
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<list of {len(source)} rows>" if isinstance(source, list) else f"<{type(source).__name__}>"


def _looks_like_hub_name(text: str) -> bool:
    parts = text.split("/")
    return (len(parts) == 2 and all(parts) and not text.startswith((".", "~"))
            and not text.endswith(DATA_SUFFIXES) and not Path(parts[0]).exists())


def _is_dataset_dict(obj) -> bool:
    return type(obj).__name__ in ("DatasetDict", "IterableDatasetDict") and hasattr(obj, "keys")


def _one_split(dataset_dict, split: str | None, where: str) -> list[Row]:
    splits = sorted(dataset_dict.keys())
    if split is None and len(splits) != 1:
        raise DataError(f"{where}: a DatasetDict with splits {', '.join(splits)}; name one "
                        f"({where}:{splits[0]}, or dataset['{splits[0]}'] in Python)")
    split = split if split is not None else splits[0]
    if split not in splits:
        raise DataError(f"{where}: no split {split!r}; the splits are {', '.join(splits)}")
    return _from_dataset(dataset_dict[split], f"{where}:{split}")


def _read_saved(folder: Path, split: str | None) -> list[Row]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{folder}: not a dataset folder written by save_to_disk ({e})") from None
    if _is_dataset_dict(loaded):
        return _one_split(loaded, split, str(folder))
    if split:
        raise DataError(f"{folder}: a single Dataset has no split {split!r}; pass the folder alone")
    return _from_dataset(loaded, str(folder))


def _from_dataset(ds, name: str) -> list[Row]:
    rows = [Row(f"{name}:row {i}", _present(_as_dict(r, f"{name}:row {i}"))) for i, r in enumerate(ds, start=1)]
    if not rows:
        raise DataError(f"{name}: the dataset holds no rows")
    return rows


def _present(fields: dict) -> dict:
    """A table row's fields without its nulls (columns other rows fill), at every depth: a table
    gives each message, tool call and tool schema every key that any row's has (Arrow merges
    them into one type), as null where that one has none, and a chat template would render them."""
    return {k: _without_nulls(v) for k, v in fields.items() if v is not None}


def _without_nulls(value):
    if isinstance(value, dict):
        return _present(value)
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _as_dict(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(obj).__name__}")
    return obj


def _unknown_kind(path: Path):
    """The reader of a file whose suffix is none of DATA_SUFFIXES: JSON lines where it starts like
    them, else a DataError that says what the file seems to be."""
    with path.open("rb") as f:
        head = f.read(4096)
    if head.startswith(b"\x1f\x8b") or head.startswith(b"PK\x03\x04") or head.startswith(b"(\xb5/\xfd"):
        raise DataError(f"{path}: a compressed file; decompress it first (rlhfkit reads "
                        f"{', '.join(DATA_SUFFIXES)} files and save_to_disk folders)")
    if head.removeprefix(BOM).lstrip().startswith(b"{"):
        return _read_jsonl
    raise DataError(f"{path}: not a data file rlhfkit reads (the suffix is {path.suffix or 'none'}; give a "
                    f"{', '.join(DATA_SUFFIXES)} file or a save_to_disk folder)")


def _text(path: Path) -> str:
    """The whole file as text (a UTF-8 byte-order mark dropped), or a DataError naming the line
    and column of the first byte that is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column})") from None


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if lineno == 1:
                raw = raw.removeprefix(BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = _loads(line.rstrip("\r\n"), where)  # a column past the line's end, not "column 1" of the next
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            rows.append(Row(where, _as_dict(obj, where)))
    return rows


def _loads(text: str, where: str):
    """``json.loads``, refusing an object that gives a key twice (JSON would keep the last value
    silently; datasets' Arrow reader refuses such a row too)."""
    def unique(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise DataError(f"{where}: field '{key}' is given twice in one object (JSON would keep the last "
                                "value); give it once")
            seen.add(key)
        return dict(pairs)

    return json.loads(text, object_pairs_hook=unique)


def _read_json(path: Path, split: str | None = None) -> list[Row]:
    """A ``.json`` file: one JSON array of row objects (as ``datasets.load_dataset("json")`` reads
    it, pretty-printed or not), one object holding its rows (``_object_rows``), one row object over
    several lines, or JSON lines. ``split`` names the list of rows to read (``FILE.json:train``)."""
    with path.open("rb") as f:
        head = f.read(4096).removeprefix(BOM).lstrip()
    if head.startswith(b"{"):  # JSON lines, or one object over several lines: a row, or its rows
        if _json_lines(path) and split is None:
            return _read_jsonl(path)
        try:
            whole = _loads(_text(path), str(path))
        except json.JSONDecodeError:
            if split is not None:
                raise DataError(f"{path}: JSON lines hold no splits; pass the file alone") from None
            return _read_jsonl(path)  # its error names the line
        return _object_rows(path, _as_dict(whole, f"{path}:row 1"), split)
    if split is not None:
        raise DataError(f"{path}: not one object of lists of rows, so there is no split {split!r} in it; "
                        "pass the file alone")
    if not head.startswith(b"["):
        return _read_jsonl(path)
    try:
        items = _loads(_text(path), str(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    return [Row(f"{path}:row {i}", _as_dict(item, f"{path}:row {i}")) for i, item in enumerate(items, start=1)]


def _object_rows(path: Path, whole: dict, split: str | None) -> list[Row]:
    """The rows of a ``.json`` file that is one object, told apart by what its values are:

    - lists of row objects: ``{"data": [...]}`` (what datasets reads with ``field="data"``), or
      splits, ``{"train": [...], "test": [...]}``, of which ``split`` names one;
    - columns, as datasets reads them: ``{"prompt": [...], "completion": [...]}``, or pandas'
      ``DataFrame.to_json()`` layout ``{"prompt": {"0": ..., "1": ...}, ...}``;
    - else one row, its fields the object's (``{"messages": [...]}`` is one chat row)."""
    lists = [k for k, v in whole.items() if isinstance(v, list) and v and all(isinstance(i, dict) for i in v)
             and not messages_like(v)]
    if lists and len(lists) == len(whole):
        if split is None and len(lists) > 1:
            raise DataError(f"{path}: holds lists of rows under {', '.join(repr(k) for k in lists)}; name the one "
                            f"to read ({path}:{lists[0]}, as datasets' field='{lists[0]}')")
        key = split if split is not None else lists[0]
        if key not in whole:
            raise DataError(f"{path}: no split {key!r}; the lists of rows are under {', '.join(map(repr, lists))}")
        return [Row(f"{path}:{key}[{i}]", item) for i, item in enumerate(whole[key])]
    if split is not None:
        raise DataError(f"{path}: not an object of lists of rows, so there is no split {split!r} in it; "
                        "pass the file alone")
    columns = _columns(whole)
    if columns is None:
        return [Row(f"{path}:row 1", whole)]
    n = len(next(iter(columns.values())))
    return [Row(f"{path}:row {i + 1}", _present({k: v[i] for k, v in columns.items()})) for i in range(n)]


def _columns(whole: dict) -> dict | None:
    """``whole``'s columns where it is a table written column by column (every value a list of one
    length, none of them chat messages; or pandas' layout, every value an object keyed by the same
    row numbers "0", "1", ...), else None."""
    values = list(whole.values())
    if not values:
        return None
    if all(isinstance(v, dict) and v for v in values):
        keys = set(values[0])
        if all(k.isdigit() for k in keys) and all(set(v) == keys for v in values):
            order = sorted(keys, key=int)
            return {name: [column[k] for k in order] for name, column in whole.items()}
        return None
    if all(isinstance(v, list) and v and not messages_like(v) for v in values) and len({len(v) for v in values}) == 1:
        return whole
    return None


def _json_lines(path: Path) -> bool:
    """Whether a file's first line is a whole JSON value and more lines follow: JSON lines, read
    line by line rather than parsed whole first."""
    with path.open("rb") as f:
        first = f.readline().removeprefix(BOM)
        more = any(line.strip() for line in f)
    try:
        json.loads(first)
    except ValueError:  # JSONDecodeError, and bytes that are not UTF-8
        return False
    return more


def _read_csv(path: Path) -> list[Row]:
    """A ``.csv`` file with a header line; every field a string (chat messages need jsonl or parquet)."""
    import csv
    import io

    try:
        reader = csv.DictReader(io.StringIO(_text(path), newline=""))
        twice = sorted({name for name in reader.fieldnames or () if reader.fieldnames.count(name) > 1})
        if twice:
            raise DataError(f"{path}:1: the header names column '{twice[0]}' twice (a row would keep only the "
                            "last of its values); name each column once")
        rows = []
        for fields in reader:
            where = f"{path}:{reader.line_num}"
            if None in fields:
                raise DataError(f"{where}: more values than the header's {len(reader.fieldnames)} columns")
            for name, value in fields.items():
                if _chat_as_text(value):
                    raise DataError(f"{where}: field '{name}' is chat messages written as text (JSON, or a Python "
                                    "list as pandas' to_csv writes it), and a CSV cell is read as text (it would be "
                                    "trained on as such): give chat rows as jsonl, json or parquet")
            rows.append(Row(where, {k: v for k, v in fields.items() if v not in (None, "")}))  # empty: absent
        return rows
    except csv.Error as e:
        raise DataError(f"{path}: not valid CSV ({e})") from None


def is_chat(value) -> bool:
    """A list of ``{"role", "content"}`` messages (the conversational form of a field)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _chat_as_text(value) -> bool:
    """Whether a CSV cell holds a list of chat messages as text: JSON (``[{"role": ..., ...}]``) or
    Python's repr of one (``[{'role': ...}]``, what pandas' ``to_csv`` writes for such a column)."""
    import ast

    if not isinstance(value, str) or not value.lstrip().startswith("["):
        return False
    if '"role"' in value:
        try:
            return is_chat(json.loads(value))
        except ValueError:
            pass
    if "'role'" in value or '"role"' in value:
        try:
            return is_chat(ast.literal_eval(value.strip()))
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return False
    return False


def _read_parquet(path: Path) -> list[Row]:
    """A ``.parquet`` file through pyarrow (datasets' own reader): read in place, with no Arrow copy
    in the datasets cache and no progress bar."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(str(path))
    except Exception as e:  # pyarrow's ArrowInvalid (a truncated or corrupt file) and its kin
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {first})") from None
    return [Row(f"{path}:row {i}", _present(r)) for i, r in enumerate(table.to_pylist(), start=1)]


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


def reads(*fields: str, check=None):
    """Declare the row fields a reward function reads (``@reads("answer")``): every prompt row is
    checked for them before any model loads, instead of the reward failing mid-run; ``check``
    (``check(row)``, raising a DataError) checks their values too."""

    def mark(fn):
        fn.row_fields = tuple(fields)
        if check is not None:
            fn.row_check = check
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
        if missing and missing[0] in row.data:
            raise DataError(f"{row.where}: field '{missing[0]}'{why} is null")
        if missing:
            have = ", ".join(sorted(row.data)) or "none"
            raise DataError(f"{row.where}: missing field '{missing[0]}'{why} (fields present: {have})")
