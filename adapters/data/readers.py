"""Reading training data from any source, validating every row, and reporting every problem with its location.

Sources: ``.jsonl``, ``.json`` (an array, or JSON Lines under a .json name), ``.csv``, ``.parquet``, a directory of
them, or a folder written by ``datasets.Dataset.save_to_disk``. Text files are read as raw bytes first, so invalid
UTF-8 and invalid JSON are reported with ``file:line[:col]`` (and the byte offset) before ``datasets`` sees them.
CSV and Parquet rows are then loaded with ``datasets``; their location is ``file:N`` with N the 1-based line of the
row in the CSV (header = line 1) or the 1-based row number in the Parquet/Arrow table.

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

import json
from collections.abc import Iterator
from pathlib import Path

from adapters.data.rows import DataError, Problem, Record

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


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


def _iter_jsonl(path: Path) -> Iterator[Record]:
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            text, bad = _decode(raw, str(path), lineno, offset)
            offset += len(raw)
            if bad:
                yield Record(str(path), lineno, None, raw.decode("utf-8", "backslashreplace").rstrip("\n"), [bad])
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                yield Record(
                    str(path),
                    lineno,
                    None,
                    text.rstrip("\n"),
                    [Problem(str(path), lineno, None, f"invalid JSON: {e.msg}", e.colno)],
                )
                continue
            if not isinstance(obj, dict):
                yield Record(
                    str(path),
                    lineno,
                    None,
                    text.rstrip("\n"),
                    [Problem(str(path), lineno, None, f"expected a JSON object, got {type(obj).__name__}")],
                )
                continue
            yield Record(str(path), lineno, obj, text.rstrip("\n"))


def _utf8_problems(path: Path) -> list[Problem]:
    out, offset = [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            bad = _decode(raw, str(path), lineno, offset)[1]
            offset += len(raw)
            if bad:
                out.append(bad)
    return out


def _iter_json(path: Path) -> Iterator[Record]:
    """A JSON array of objects (each located by the line where it starts), or JSON Lines under a .json name."""
    problems = _utf8_problems(path)
    if problems:
        for p in problems:
            yield Record(p.file, p.line, None, "", [p])
        return
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        yield from _iter_jsonl(path)
        return
    dec = json.JSONDecoder()
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
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            yield problem(e.pos, e.msg)
            return
        raw = text[i:end]
        if isinstance(obj, dict):
            yield Record(str(path), line, obj, raw)
        else:
            yield Record(
                str(path),
                line,
                None,
                raw,
                [Problem(str(path), line, None, f"expected a JSON object, got {type(obj).__name__}")],
            )
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
        elif i < len(text) and text[i] == "]":
            return
        else:
            yield problem(i, "expected ',' or ']' after an array element")
            return
    yield problem(len(text), "unterminated array")


def _iter_datasets(path: Path) -> Iterator[Record]:
    """CSV, Parquet and save_to_disk folders, loaded with the datasets library."""
    import datasets

    if path.suffix == ".csv":
        problems = _utf8_problems(path)
        if problems:
            for p in problems:
                yield Record(p.file, p.line, None, "", [p])
            return
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        else:
            kind = "csv" if path.suffix == ".csv" else "parquet"
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - any reader failure becomes a located data error
        yield Record(str(path), 0, None, "", [Problem(str(path), 0, None, f"cannot read: {e}")])
        return
    first = 2 if path.suffix == ".csv" else 1  # CSV: line 1 is the header
    for i, obj in enumerate(ds):
        yield Record(str(path), i + first, dict(obj), json.dumps(obj, ensure_ascii=False, default=str))


def iter_records(path: str | Path) -> Iterator[Record]:
    for f in source_files(path):
        if f.is_dir() or f.suffix in (".csv", ".parquet"):
            yield from _iter_datasets(f)
        elif f.suffix == ".json":
            yield from _iter_json(f)
        else:
            yield from _iter_jsonl(f)


# ---------------------------------------------------------------------------------------------------- formats


# ---------------------------------------------------------------------------------------------------- scanning
