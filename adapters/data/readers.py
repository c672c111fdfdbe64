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

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("adapters.data")

FORMATS = ("chat", "prompt_completion", "alpaca", "text")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
ROLES = {"system", "user", "assistant"}


@dataclass
class Problem:
    file: str
    line: int
    field: str | None
    message: str
    col: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" + (f":{self.col}" if self.col else "")
        return f"{where}: {self.field + ': ' if self.field else ''}{self.message}"


@dataclass
class Record:
    """One raw row: its location, the parsed object (None when unparsable) and its raw text for quarantine."""

    file: str
    line: int
    obj: dict[str, Any] | None
    raw: str
    problems: list[Problem] = field(default_factory=list)


@dataclass
class Scan:
    rows: list = field(default_factory=list)  # list[data.Row]
    problems: list[Problem] = field(default_factory=list)
    bad: list[Record] = field(default_factory=list)
    aliased: int = 0
    records: int = 0


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
            from adapters.data.encode import DataError

            raise DataError(f"{p}: no {'/'.join(SUFFIXES)} files in this directory")
        return files
    from adapters.data.encode import DataError

    raise DataError(f"{p}: no such file or directory")


def fingerprint(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and bytes, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


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
def detect_format(obj: dict[str, Any]) -> str | None:
    if "messages" in obj or "conversations" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    return None


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip())


def _turns(value: Any, key: str, shown: str, problems: list[tuple[str, str]]) -> tuple[list[dict[str, str]], bool]:
    """Validate a list of turns; return the normalised turns and whether aliases were used."""
    if isinstance(value, str):  # CSV / Parquet store nested lists as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            problems.append((shown, f"not a JSON list of turns: {e.msg}"))
            return [], False
    if not isinstance(value, list) or not value:
        problems.append((shown, "expected a non-empty list of turns"))
        return [], False
    out, aliased = [], False
    for i, t in enumerate(value):
        if not isinstance(t, dict):
            problems.append((f"{shown}[{i}]", "expected an object with role and content"))
            continue
        if "role" not in t and "from" in t or "content" not in t and "value" in t:
            aliased = True
        role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value"))
        if role is None:
            problems.append((f"{shown}[{i}].role", "missing"))
            continue
        role = str(role)
        if role in ROLE_ALIASES:
            role, aliased = ROLE_ALIASES[role], True
        if role not in ROLES:
            problems.append((f"{shown}[{i}].role", f"unknown role {role!r} (expected one of {sorted(ROLES)})"))
            continue
        if not isinstance(content, str) or not content.strip():
            problems.append((f"{shown}[{i}].content", "missing or empty"))
            continue
        out.append({"role": role, "content": content})
    return out, aliased


def _check_order(turns: list[dict[str, str]], shown: str, problems: list[tuple[str, str]]) -> None:
    body = [t for t in turns if t["role"] != "system"]
    for i, t in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if t["role"] != expected:
            problems.append((shown, f"turns must alternate user/assistant; turn {i + 1} is {t['role']!r}"))
            return
    if not body or body[-1]["role"] != "assistant":
        problems.append((shown, "no assistant turn to learn from (the last turn must be the assistant's)"))


def normalise(
    obj: dict[str, Any], data_format: str | None = None, columns: dict[str, str] | None = None
) -> tuple[list[dict[str, str]] | None, str | None, list[tuple[str, str]], bool]:
    """(messages, text, problems as (field, message), aliased). Every problem of the row is listed."""
    columns = dict(columns or {})
    shown = {canon: src for canon, src in columns.items()}
    obj = dict(obj)
    for canon, src in columns.items():
        if src in obj:
            obj[canon] = obj.pop(src)
    name = lambda k: shown.get(k, k)  # noqa: E731 - report the user's column name
    fmt = data_format or detect_format(obj)
    problems: list[tuple[str, str]] = []
    if fmt is None:
        problems.append(
            (
                "messages",
                "missing (expected 'messages', 'prompt'/'completion' or 'instruction'/'output';"
                " for plain text set data_format: text)",
            )
        )
        return None, None, problems, False
    if fmt == "text":
        if not isinstance(obj.get("text"), str) or not obj["text"].strip():
            problems.append((name("text"), "missing or empty"))
            return None, None, problems, False
        return None, obj["text"], problems, False
    if fmt == "chat":
        key = "messages" if "messages" in obj or "conversations" not in obj else "conversations"
        if key not in obj:
            problems.append((name("messages"), "missing"))
            return None, None, problems, False
        turns, aliased = _turns(obj[key], key, name(key), problems)
        if not problems:
            _check_order(turns, name(key), problems)
        return (None if problems else turns), None, problems, aliased
    if fmt == "prompt_completion":
        p, c = obj.get("prompt"), obj.get("completion")
        if isinstance(p, list) or isinstance(c, list):  # TRL's conversational prompt/completion
            pt, a1 = _turns(p, "prompt", name("prompt"), problems)
            ct, a2 = _turns(c, "completion", name("completion"), problems)
            if not problems:
                _check_order(pt + ct, name("completion"), problems)
            return (None if problems else pt + ct), None, problems, a1 or a2
        for k, v in (("prompt", p), ("completion", c)):
            if not isinstance(v, str) or _empty(v):
                problems.append((name(k), "missing or empty"))
        if problems:
            return None, None, problems, False
        return [{"role": "user", "content": p}, {"role": "assistant", "content": c}], None, problems, False
    if fmt == "alpaca":
        ins, inp, out = obj.get("instruction"), obj.get("input"), obj.get("output")
        for k, v in (("instruction", ins), ("output", out)):
            if not isinstance(v, str) or _empty(v):
                problems.append((name(k), "missing or empty"))
        if inp is not None and not _empty(inp) and not isinstance(inp, str):
            problems.append((name("input"), f"expected a string, got {type(inp).__name__}"))
        if problems:
            return None, None, problems, False
        prompt = ins if _empty(inp) else f"{ins}\n\n{inp}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": out}], None, problems, False
    problems.append(("data_format", f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})"))
    return None, None, problems, False


# ---------------------------------------------------------------------------------------------------- scanning
def scan(path: str | Path, data_format: str | None = None, columns: dict[str, str] | None = None) -> Scan:
    """Read every row of a source; collect rows, every problem, and the bad records (for quarantine)."""
    from adapters.data.encode import Row

    if data_format is not None and data_format not in FORMATS:
        from adapters.data.encode import DataError

        raise DataError(f"data_format: unknown format {data_format!r} (expected one of {', '.join(FORMATS)})")
    out = Scan()
    first_alias: dict[str, int] = {}
    for rec in iter_records(path):
        out.records += 1
        if rec.obj is not None:
            messages, text, probs, aliased = normalise(rec.obj, data_format, columns)
            rec.problems += [Problem(rec.file, rec.line, f, m) for f, m in probs]
            if aliased and not probs:
                out.aliased += 1
                first_alias.setdefault(rec.file, rec.line)
        if rec.problems:
            out.problems += rec.problems
            out.bad.append(rec)
            continue
        out.rows.append(Row(rec.file, rec.line, messages or [], text))
    for f, line in first_alias.items():
        log.warning(
            "%s:%d: role/field aliases (human/gpt/model, from/value) normalised to OpenAI roles "
            "(user/assistant, role/content); %d row(s) in this source",
            f,
            line,
            out.aliased,
        )
    return out


def write_quarantine(bad: list[Record], path: str | Path) -> Path:
    """Write the bad rows, each with its location and problems, to a JSONL quarantine file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in bad:
            f.write(
                json.dumps(
                    {"where": f"{rec.file}:{rec.line}", "problems": [str(p) for p in rec.problems], "raw": rec.raw},
                    ensure_ascii=False,
                )
                + "\n"
            )
        f.flush()
    return path


@dataclass
class CheckResult:
    files: int
    rows: int
    valid: int
    problems: list[Problem]
    bad_rows: int
    quarantine: Path | None = None


def check(
    paths: list[str | Path],
    data_format: str | None = None,
    columns: dict[str, str] | None = None,
    quarantine: str | Path | None = None,
) -> CheckResult:
    """Validate sources; every problem is listed. With ``quarantine``, bad rows are written there."""
    problems: list[Problem] = []
    bad: list[Record] = []
    rows = valid = 0
    for p in paths:
        s = scan(p, data_format, columns)
        problems += s.problems
        bad += s.bad
        rows += s.records
        valid += len(s.rows)
    q = write_quarantine(bad, quarantine) if quarantine and bad else None
    return CheckResult(len(paths), rows, valid, problems, len(bad), q)
