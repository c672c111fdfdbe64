"""Validation of whole sources: every row read, every problem located (``file:line[:col]: field: message``), bad rows
quarantined on request. ``adapters data check`` and every ``train`` run go through :func:`check`."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from adapters.data.formats import FORMATS, normalise
from adapters.data.parallel import scan_parts, split_lines
from adapters.data.readers import is_dataset_source, iter_records, source_files
from adapters.data.rows import DataError, Problem, Record, Row, Scan

log = logging.getLogger("adapters.data")


def scan(
    path: str | Path,
    data_format: str | None = None,
    columns: dict[str, str] | None = None,
    keep_rows: bool = True,
    progress: str | None = None,
    split: str | None = None,
    subset: str | None = None,
    sink=None,
) -> Scan:
    """Read every row of a source; collect rows, every problem, and the bad records (for quarantine).

    ``keep_rows=False`` streams: only problems, bad records and counters are kept (``Scan.valid`` counts the
    rows), so validating 10^7 rows needs no more memory than validating 10. ``progress``: a tqdm bar with rows/s
    under that name (shown once the scan takes over 2 s). ``split``/``subset``: of a dataset source (readers.py).
    ``sink``: a ``table.RowWriter`` that gets each valid row instead of keeping it. A large JSON Lines file is read by
    every core (parallel.py), each part's rows written to a part file the sink adopts, in order."""

    if data_format is not None and data_format not in FORMATS:
        raise DataError(f"data_format: unknown format {data_format!r} (expected one of {', '.join(FORMATS)})")
    parts = [] if keep_rows and sink is None else split_lines(path)
    if len(parts) > 1:
        out, first_alias, seen = scan_parts(path, parts, data_format, columns, sink, progress)
    else:
        out, first_alias, seen = Scan(), {}, set()
        bar = _progress(iter_records(path, split, subset), progress)
        _scan_records(bar, data_format, columns, keep_rows, sink, out, first_alias, seen)
    # an empty file is a mistake (a failed export, the wrong path), not a valid source of nothing
    if is_dataset_source(path, split):
        empty = [] if out.records else [path]
    else:
        empty = [f for f in source_files(path) if str(f) not in seen]
    out.problems += [Problem(str(f), None, None, "no rows") for f in empty]
    for f, line in first_alias.items():
        log.warning(
            "%s:%d: role/field aliases (human/gpt/model, from/value) normalised to OpenAI roles "
            "(user/assistant, role/content); %d row(s) in this source",
            f,
            line,
            out.aliased,
        )
    return out


def _scan_records(records, data_format, columns, keep_rows: bool, sink, out: Scan, first_alias: dict, seen: set):
    """The rows of ``records`` into ``out``: problems and bad records kept, valid rows to ``sink`` (or kept)."""
    for rec in records:
        out.records += 1
        seen.add(rec.file)
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
        out.valid += 1
        if sink is not None:
            sink.add(Row(rec.file, rec.line, messages or [], text))
        elif keep_rows:
            out.rows.append(Row(rec.file, rec.line, messages or [], text))


def _progress(records, name: str | None):
    """A rows/s bar on stderr for scans that take more than a few seconds; nothing for quick ones."""
    if name is None:
        return records
    from tqdm.auto import tqdm

    return tqdm(records, desc=name, unit=" rows", delay=2, mininterval=1, leave=False)


def write_quarantine(bad: list[Record], path: str | Path, append: bool = False) -> Path:
    """Write the bad rows, each with its location and problems, to a JSONL quarantine file (``append``: after what
    it holds, as a stream finds them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
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
    valid_by_source: dict[str, int] = field(default_factory=dict)
    invalid_by_source: dict[str, int] = field(default_factory=dict)
    rows_by_source: dict[str, list[Row]] = field(default_factory=dict)
    """The valid rows of each source, only with ``check(keep_rows=True)`` (the run's one read of its data)."""


def check(
    paths: list[str | Path],
    data_format: str | None = None,
    columns: dict[str, str] | None = None,
    quarantine: str | Path | None = None,
    keep_rows: bool = False,
    split: str | None = None,
    subset: str | None = None,
    sinks: dict | None = None,
) -> CheckResult:
    """Validate sources; every problem is listed. With ``quarantine``, bad rows are written there. Streams (keeps
    no row) unless ``keep_rows``; ``sinks``: path -> a ``table.RowWriter`` that gets that source's valid rows (once)."""
    problems: list[Problem] = []
    bad: list[Record] = []
    rows = valid = 0
    valid_by, invalid_by, kept = {}, {}, {}
    sinks = dict(sinks or {})
    for p in paths:
        sink = sinks.pop(str(p), None)
        s = scan(p, data_format, columns, keep_rows, f"check {p}", split, subset, sink)
        if keep_rows and sink is None:
            kept[str(p)] = s.rows
        problems += s.problems
        bad += s.bad
        rows += s.records
        valid += s.valid
        valid_by[str(p)], invalid_by[str(p)] = s.valid, len(s.bad)
    q = write_quarantine(bad, quarantine) if quarantine and bad else None
    return CheckResult(len(paths), rows, valid, problems, len(bad), q, valid_by, invalid_by, kept)


def read_rows(path: str | Path, data_format: str | None = None, columns: dict[str, str] | None = None) -> list[Row]:
    """Every row of a source (file, directory or saved dataset); the first problem raises, with how many more."""

    s = scan(path, data_format, columns)
    if s.problems:
        more = (
            f" (and {len(s.problems) - 1} more problem(s); run `adapters data check {path}`)"
            if len(s.problems) > 1
            else ""
        )
        raise DataError(f"{s.problems[0]}{more}")
    return s.rows
