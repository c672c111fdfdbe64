"""Reading training data from any source, validating every row, and reporting every problem with its location.

Sources: ``.jsonl``, ``.json`` (an array, or JSON Lines under a .json name), ``.csv``, ``.parquet``, a directory of
them, or a folder written by ``datasets.Dataset.save_to_disk``. Text files are read as raw bytes first, so invalid
UTF-8 and invalid JSON are reported with ``file:line[:col]`` (and the byte offset) before ``datasets`` sees them.
CSV and Parquet rows are then loaded with ``datasets``; their location is ``file:N`` with N the 1-based line of the
row in the CSV (header = line 1) or the 1-based row number in the Parquet/Arrow table. CSV cells are read as text,
as written (``4``, ``NA`` and an empty cell stay ``"4"``, ``"NA"`` and ``""``): CSV has no types, so a number there is
an answer, not a type error. A UTF-8 BOM at the start of a file (Windows editors write one) is skipped; byte offsets
still count it. A key given twice in one JSON object, or a CSV column named twice, is a problem: json and pandas
would silently keep one of the values.

Formats (per row, or forced with the recipe key ``data_format``):
- ``chat``: ``messages`` (or ``conversations``) = [{role, content}, ...]; the ShareGPT aliases ``from``/``value`` and
  ``human``/``gpt`` are normalised to OpenAI roles, with a logged warning;
- ``prompt_completion``: ``prompt`` + ``completion`` (strings, or lists of turns as TRL writes them);
- ``alpaca``: ``instruction`` + optional ``input`` + ``output``;
- ``text``: plain ``text``, trained on every token. Never auto-detected: training on the whole text is only right
  when you mean it, so it must be asked for with ``data_format: text``.
``data_columns`` renames columns first, e.g. ``{prompt: question, completion: answer}``.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adapters.data.rows import DataError, Problem, Record

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


# ---------------------------------------------------------------------------------------------------- JSON
def json_type(v: Any) -> str:
    """The JSON name of a value's type: messages speak the file's language, not Python's (null, not NoneType)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (list, tuple)):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__  # Parquet/Arrow types JSON has no name for (dates, bytes)


class _Twice(dict):
    """A JSON object in which some key was given twice."""

    twice: list[str]


def duplicate_keys(value: Any, path: str = "") -> list[tuple[str, str]]:
    """(path, key) of every key given twice in one object of a decoded value, e.g. ("messages[1]", "content")."""
    out = [(path, k) for k in getattr(value, "twice", ())]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if isinstance(v, (dict, list)):
            out += duplicate_keys(v, f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}" if path else k)
    return out


class StrictJSON:
    """json's decoder, plus every key given twice in one object: json itself keeps the last value without a word,
    so a row with two "completion"s trains on whichever came last."""

    def __init__(self) -> None:
        self._twice = False
        self._decoder = json.JSONDecoder(object_pairs_hook=self._object)

    def _object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj
        self._twice = True
        seen: set[str] = set()
        obj = _Twice(obj)
        obj.twice = list(dict.fromkeys(k for k, _ in pairs if k in seen or seen.add(k)))
        return obj

    def loads(self, text: str) -> tuple[Any, list[tuple[str, str]]]:
        """(value, duplicate keys as (path, key)); raises json.JSONDecodeError like json.loads."""
        self._twice = False
        value = self._decoder.decode(text)
        return value, duplicate_keys(value) if self._twice else []

    def raw_decode(self, text: str, pos: int) -> tuple[Any, int, list[tuple[str, str]]]:
        """(value, end, duplicate keys as (path, key)) of the value starting at ``pos``."""
        self._twice = False
        value, end = self._decoder.raw_decode(text, pos)
        return value, end, duplicate_keys(value) if self._twice else []


def _object_record(path: Path, line: int, value: Any, twice: list[tuple[str, str]], raw: str) -> Record:
    """A decoded value as a row: an object without repeated keys, else the problems (one per repeated key)."""
    if not isinstance(value, dict):
        msg = f"expected a JSON object, got {json_type(value)}"
        return Record(str(path), line, None, raw, [Problem(str(path), line, None, msg)])
    if twice:
        probs = [Problem(str(path), line, where or None, f'duplicate key "{k}"') for where, k in twice]
        return Record(str(path), line, None, raw, probs)
    return Record(str(path), line, value, raw)


# ---------------------------------------------------------------------------------------------------- sources
def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").is_file()
        or (path / "state.json").is_file()
        or (path / "dataset_dict.json").is_file()
    )


def source_files(path: str | Path) -> list[Path]:
    """The data files behind a source: itself, the supported files of a directory, or a saved dataset folder."""
    p = Path(path)
    if p.is_file():
        return [p]
    if is_saved_dataset(p):
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
        if not files:
            raise DataError(f"{p}: no {'/'.join(SUFFIXES)} files in this directory")
        return files

    raise DataError(f"{p}: no such file or directory")


def _decode(raw: bytes, file: str, lineno: int, offset: int) -> tuple[str | None, Problem | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, Problem(
            file,
            lineno,
            None,
            f"invalid UTF-8 at byte offset {offset + e.start} (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
        )


def _raw_lines(path: Path, start: int = 0, end: int | None = None, line: int = 1) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset in the file, bytes) of each line; with ``start``/``end`` only the lines that start
    in that byte range, ``line`` being the number of the first. A leading UTF-8 BOM is dropped from line 1, so
    columns are the ones an editor shows, and still counted in the offsets."""
    offset = start
    with open(path, "rb") as f:
        f.seek(start)
        for lineno, raw in enumerate(f, start=line):
            if end is not None and offset >= end:
                return
            begin, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, begin = raw[len(codecs.BOM_UTF8) :], begin + len(codecs.BOM_UTF8)
            yield lineno, begin, raw


def iter_jsonl(path: Path, start: int = 0, end: int | None = None, line: int = 1) -> Iterator[Record]:
    """The rows of a JSON Lines file, or of the lines starting in bytes [start, end), the first being ``line``."""
    strict = StrictJSON()
    for lineno, offset, raw in _raw_lines(path, start, end, line):
        text, bad = _decode(raw, str(path), lineno, offset)
        if bad:
            yield Record(str(path), lineno, None, raw.decode("utf-8", "backslashreplace").rstrip("\n"), [bad])
            continue
        if not text.strip():
            continue
        try:
            obj, twice = strict.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            yield Record(
                str(path),
                lineno,
                None,
                text.rstrip("\n"),
                [Problem(str(path), lineno, None, f"invalid JSON: {e.msg}", e.colno)],
            )
            continue
        yield _object_record(path, lineno, obj, twice, text.rstrip("\n"))


def _utf8_problems(path: Path) -> list[Problem]:
    return [bad for lineno, offset, raw in _raw_lines(path) if (bad := _decode(raw, str(path), lineno, offset)[1])]


def _iter_json(path: Path) -> Iterator[Record]:
    """A JSON array of objects (each located by the line where it starts), or JSON Lines under a .json name."""
    problems = _utf8_problems(path)
    if problems:
        for p in problems:
            yield Record(p.file, p.line, None, "", [p])
        return
    text = path.read_text(encoding="utf-8-sig")
    if not text.lstrip().startswith("["):
        yield from iter_jsonl(path)
        return
    strict = StrictJSON()
    i = text.index("[") + 1

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def problem(pos: int, msg: str) -> Record:
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        return Record(str(path), line, None, "", [Problem(str(path), line, None, f"invalid JSON: {msg}", col)])

    i = skip(i)
    if i < len(text) and text[i] == "]":
        return
    while i < len(text):
        line = text.count("\n", 0, i) + 1
        try:
            obj, end, twice = strict.raw_decode(text, i)
        except json.JSONDecodeError as e:
            yield problem(e.pos, e.msg)
            return
        yield _object_record(path, line, obj, twice, text[i:end])
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
        elif i < len(text) and text[i] == "]":
            return
        else:
            yield problem(i, "expected ',' or ']' after an array element")
            return
    yield problem(len(text), "unterminated array")


def _csv_header(path: Path) -> tuple[list[str] | None, bool]:
    """(header, whether a data row follows). datasets refuses a header-only CSV with an unrelated message."""
    header = None
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = (r for r in csv.reader(f) if r)
        try:
            header = next(rows, None)
            return header, header is not None and next(rows, None) is not None
        except csv.Error:  # e.g. a cell over csv's field size limit: datasets (pandas) reads it
            return header, True


def load_csv(path: Path, streaming: bool = False) -> Iterator[Record]:
    """A CSV file's rows, every cell as the text it is (CSV has no types: "4" is an answer, "NA" too); with
    ``streaming``, read as they are asked for (and without the whole-file UTF-8 pass first)."""
    import datasets

    problems = [] if streaming else _utf8_problems(path)
    if problems:
        for p in problems:
            yield Record(p.file, p.line, None, "", [p])
        return
    header, has_rows = _csv_header(path)
    twice = [k for k in dict.fromkeys(header or ()) if header.count(k) > 1]
    if twice:  # pandas would rename the second one "name.1" and train on the first
        probs = [Problem(str(path), 1, None, f'duplicate column "{k}"') for k in twice]
        yield Record(str(path), 1, None, ",".join(header), probs)
        return
    if not has_rows:
        return
    text = {i: str for i in range(len(header))}
    ds = datasets.load_dataset(
        "csv",
        data_files=str(path),
        split="train",
        encoding="utf-8-sig",
        converters=text,
        na_filter=False,
        streaming=streaming,
    )
    yield from dataset_records(ds, str(path), first=2)  # line 1 is the header


def _iter_datasets(path: Path) -> Iterator[Record]:
    """CSV, Parquet and save_to_disk folders, loaded with the datasets library."""
    import datasets

    try:
        if path.suffix == ".csv":
            yield from load_csv(path)
            return
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        else:
            import pyarrow.parquet as pq

            if pq.ParquetFile(path).metadata.num_rows == 0:  # datasets refuses it with an unrelated message
                return
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - any reader failure becomes a located data error
        yield Record(str(path), 0, None, "", [Problem(str(path), 0, None, f"cannot read: {e}")])
        return
    yield from dataset_records(ds, str(path))


def is_dataset_source(path: str | Path, split: str | None = None) -> bool:
    """Read through ``datasets.load_dataset``: a name that is no local path (a hub dataset id), or a local folder
    once a split is asked for (``data_split``: the folder then loads as datasets lays it out, splits by file name)."""
    p = Path(path)
    return (split is not None and p.is_dir()) or (not p.exists() and p.suffix not in SUFFIXES)


def load_hub(name: str, split: str | None, subset: str | None):
    """``datasets.load_dataset(name, subset, split=split or "train")``; any failure is a located data error."""
    import datasets

    try:
        return datasets.load_dataset(name, subset, split=split or "train")
    except Exception as e:  # noqa: BLE001 - offline, unknown id, unknown split: one line naming the source
        what = f"split {split or 'train'!r}" + (f", subset {subset!r}" if subset else "")
        raise DataError(f"{name}: cannot load this dataset ({what}): {type(e).__name__}: {e}") from None


def dataset_records(ds, where: str, first: int = 1) -> Iterator[Record]:
    """Rows of a loaded (or streamed) dataset, located as ``WHERE:N``, N counted from ``first`` (a hub set's
    ``NAME[split]:N`` is 1-based; a CSV's first row is line 2)."""
    for i, obj in enumerate(ds):
        yield Record(where, i + first, dict(obj), json.dumps(obj, ensure_ascii=False, default=str))


def iter_records(path: str | Path, split: str | None = None, subset: str | None = None) -> Iterator[Record]:
    """Every row of a source. A file with no rows yields nothing (a 0-byte one is not even parsed): the caller says
    ``FILE: no rows``. A dataset source (``is_dataset_source``) is loaded with ``load_dataset``."""
    if is_dataset_source(path, split):
        yield from dataset_records(load_hub(str(path), split, subset), f"{path}[{split or 'train'}]")
        return
    for f in source_files(path):
        if f.is_file() and f.stat().st_size == 0:
            continue
        if f.is_dir() or f.suffix in (".csv", ".parquet"):
            yield from _iter_datasets(f)
        elif f.suffix == ".json":
            yield from _iter_json(f)
        else:
            yield from iter_jsonl(f)


# ---------------------------------------------------------------------------------------------------- formats


# ---------------------------------------------------------------------------------------------------- scanning
