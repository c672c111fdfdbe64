"""Validation of a large JSON Lines file by every core: the file is cut at line boundaries into one part per core,
and each part is read by its own process, forked from this one, exactly as a one-process read would read it.

The parts' results come back in file order (problems, bad rows for the quarantine, counts), so every message, its
``file:line`` and the quarantine are those of a one-process read. This process reads the first part itself; each
other part's valid rows go to an Arrow part file that the caller's ``RowWriter`` adopts in order. A part whose
process dies or fails stops the read with its byte range named: no part is ever taken as read.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

from adapters.data.readers import iter_jsonl
from adapters.data.rows import DataError, Scan

# Below this size a file is read by one process: forking and merging cost more than the second core gives back.
PARALLEL_MIN_BYTES = 32 << 20
_COUNT_BLOCK = 16 << 20
_TICK = 5_000  # rows between two updates of the shared progress counter


def cores() -> int:
    """The cores this process may use, shared with the other ranks on this machine: under a launcher each of the
    LOCAL_WORLD_SIZE processes runs the data stage at once, so one rank's share is cores / that many."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, n // max(1, int(ranks) if ranks.isdigit() else 1))


def split_lines(path: str | Path, parts: int | None = None) -> list[tuple[int, int, int]]:
    """(start byte, end byte, number of the first line) of each part of a JSON Lines file, cut after a newline; an
    empty list where one process reads it (not a .jsonl file, under PARALLEL_MIN_BYTES, one core, no fork)."""
    p = Path(path)
    k = parts or cores()
    if k < 2 or p.suffix != ".jsonl" or not p.is_file() or "fork" not in multiprocessing.get_all_start_methods():
        return []
    size = p.stat().st_size
    if size < PARALLEL_MIN_BYTES and parts is None:
        return []
    cuts = [0]
    with open(p, "rb") as f:
        for i in range(1, k):
            f.seek(max(cuts[-1], size * i // k))
            f.readline()  # to the end of the line the cut fell in
            cuts.append(max(cuts[-1], f.tell()))
    cuts.append(size)
    lines = _lines_before(p, cuts)
    return [(a, b, n) for a, b, n in zip(cuts, cuts[1:], lines) if b > a]


def _lines_before(path: Path, cuts: list[int]) -> list[int]:
    """The number of the line starting at each cut (1 + newlines before it), counted in large blocks."""
    out, count, at = [], 0, 0
    with open(path, "rb") as f:
        for cut in cuts[:-1]:
            while at < cut:
                block = f.read(min(_COUNT_BLOCK, cut - at))
                count += block.count(b"\n")
                at += len(block)
            out.append(count + 1)
    return out


def scan_parts(path, parts, data_format, columns, sink, progress: str | None) -> tuple[Scan, dict[str, int], set]:
    """``validate.scan`` of one JSON Lines file over ``parts`` (``split_lines``), one process per part."""
    ctx = multiprocessing.get_context("fork")
    done = ctx.Value("q", 0)
    workers = []
    for k, part in enumerate(parts[1:], start=1):
        here, there = ctx.Pipe(duplex=False)
        out = _part_file(sink, k)
        proc = ctx.Process(target=_child, args=(there, path, part, data_format, columns, out, done), daemon=True)
        proc.start()
        there.close()
        workers.append((proc, here, part, out))
    try:
        with _bar(progress) as bar:
            first = _read_part(path, parts[0], data_format, columns, sink, done, bar)
            results = [first] + [_collect(p, conn, part, path, bar, done) for p, conn, part, _ in workers]
    finally:
        for proc, conn, _, _ in workers:
            conn.close()
            if proc.is_alive():
                proc.kill()
            proc.join()
    if sink is not None:
        for (_, _, _, out), res in zip(workers, results[1:]):
            sink.adopt(out, res["scan"].valid)
    return _merge(results)


def _part_file(sink, k: int) -> Path | None:
    return None if sink is None else sink.path.with_name(f"{sink.path.stem}.part{k}{sink.path.suffix}")


def _read_part(path, part, data_format, columns, sink, done, bar) -> dict[str, Any]:
    """One part read here; ``sink``: a RowWriter (or None: rows are only counted)."""
    from adapters.data.validate import _scan_records

    out, first_alias, seen = Scan(), {}, set()
    records = _ticking(iter_jsonl(Path(path), *part), done, bar)
    _scan_records(records, data_format, columns, False, sink, out, first_alias, seen)
    return {"scan": out, "first_alias": first_alias, "seen": seen}


def _ticking(records, done, bar):
    """``records``, adding to the shared row counter every _TICK rows (and moving the bar, in this process)."""
    n = 0
    for rec in records:
        yield rec
        n += 1
        if n == _TICK:
            with done.get_lock():
                done.value += n
            n = 0
            if bar is not None:
                bar.update(done.value - bar.n)
    with done.get_lock():
        done.value += n


def _child(conn, path, part, data_format, columns, out: Path | None, done) -> None:
    """A forked process: its part read, its valid rows written to ``out``, its results sent back."""
    try:
        sink = None
        if out is not None:
            from adapters.data.table import RowWriter

            sink = RowWriter(out)
        res = _read_part(path, part, data_format, columns, sink, done, None)
        if sink is not None:
            sink.finish()
        conn.send(("ok", res))
    except BaseException as e:  # noqa: BLE001 - the parent re-raises it, naming the part
        conn.send(("error", e))
    finally:
        conn.close()


def _collect(proc, conn, part, path, bar, done) -> dict[str, Any]:
    """A part's results; its process's death or error stops the read."""
    while not conn.poll(0.5):
        if bar is not None:
            bar.update(done.value - bar.n)
    try:
        status, res = conn.recv()
    except EOFError:  # the pipe closed with nothing in it: the process died (killed, out of memory)
        proc.join(5)
        raise DataError(
            f"{path}: the process reading bytes {part[0]}-{part[1]} (from line {part[2]}) died "
            f"(exit code {proc.exitcode}); nothing of this read is used"
        ) from None
    if status == "error":
        raise res
    return res


def _merge(results: list[dict[str, Any]]) -> tuple[Scan, dict[str, int], set]:
    out, first_alias, seen = Scan(), {}, set()
    for res in results:
        s = res["scan"]
        out.problems += s.problems
        out.bad += s.bad
        out.aliased += s.aliased
        out.records += s.records
        out.valid += s.valid
        for f, line in res["first_alias"].items():
            first_alias.setdefault(f, line)
        seen |= res["seen"]
    return out, first_alias, seen


class _bar:
    """A rows/s bar on stderr, moved to the shared row counter (shown once the read takes over 2 s), or nothing."""

    def __init__(self, name: str | None) -> None:
        self.name, self.tqdm = name, None

    def __enter__(self):
        if self.name is None:
            return None
        from tqdm.auto import tqdm

        self.tqdm = tqdm(desc=self.name, unit=" rows", delay=2, mininterval=1, leave=False)
        return self.tqdm

    def __exit__(self, *exc) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
