"""The training rows of a run as Arrow files on disk, and the stage's steps on row numbers, not on Python rows.

Validation writes each training source's valid rows to an Arrow file (``RowWriter``); cleaning, the split, the
overlap removal, weighting, prompt-template augmentation and the general-data mix then work on arrays of row
numbers (plus a template number per row), reading rows in batches where a step needs their text. Memory grows
with 16-byte dedup digests and 8-byte row numbers, not with the rows. Every step gives what clean.py's list
functions give on the same rows, in the same order and with the same seeded draws: ``random.sample`` and
``random.shuffle`` only use the length of what they draw from, so drawing row numbers draws the same rows.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from adapters.data.clean import answer, digest, exact_key, near_key, prompt
from adapters.data.rows import DataError, Row

BATCH = 20_000


def _schema():
    import pyarrow as pa

    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    fields = [("messages", pa.list_(turn)), ("text", pa.string()), ("where", pa.string())]
    # what cleaning and augmentation need of a row, computed as it is written, so no step reads the rows again
    digest16 = pa.binary(16)
    fields += [("exact", digest16), ("near", digest16), ("answer_chars", pa.int32()), ("prompt_chars", pa.int32())]
    fields += [("no_alnum", pa.bool_()), ("single", pa.bool_())]
    return pa.schema(fields)


_ALNUM = re.compile(r"[^\W_]")  # str.isalnum's characters: re's \w is isalnum() plus "_"


def figures_of(r: Row) -> tuple[bytes, bytes, int, int, bool, bool]:
    """Every figure the stage's steps need of one row: the dedup digests (exact, near), the answer's and the
    prompt's length in characters, whether the answer has no letter or digit, whether it is single-turn chat."""
    a = answer(r)
    single = r.text is None and sum(m["role"] != "system" for m in r.messages) == 2
    return digest(exact_key(r)), digest(near_key(r)), len(a), len(prompt(r)), _ALNUM.search(a) is None, single


class RowWriter:
    """Rows appended one by one, with their figures (``figures_of``), written to an Arrow stream file in batches of
    ``BATCH``."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.rows = path, 0
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, _schema())
        self._buf: list[Row] = []
        self._parts: list[Path] = []

    def add(self, row: Row) -> None:
        self._buf.append(row)
        if len(self._buf) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._buf:
            b, schema = self._buf, _schema()
            cols = [[r.messages for r in b], [r.text for r in b], [r.where for r in b]]
            cols += [list(c) for c in zip(*map(figures_of, b))]
            self._writer.write_batch(pa.record_batch([pa.array(c, f.type) for c, f in zip(cols, schema)], schema))
            self.rows += len(b)
            self._buf = []

    def adopt(self, part: Path, rows: int) -> None:
        """Rows another writer wrote to ``part`` (a finished file with this schema) come after this one's."""
        self._parts.append(part)
        self.rows += rows

    def finish(self) -> None:
        """The file complete on disk."""
        self._flush()
        self._writer.close()
        self._sink.close()

    def close(self):
        """The written rows (this file's, then the adopted parts') as one memory-mapped dataset."""
        import datasets

        self.finish()
        sets = [datasets.Dataset.from_file(str(p)) for p in (self.path, *self._parts)]
        return datasets.concatenate_datasets(sets) if len(sets) > 1 else sets[0]


def as_rows(batch: dict[str, list]) -> list[Row]:
    """Rows of a column batch; ``Row.file``/``line`` come back from ``where`` (file:line)."""
    out = []
    for m, t, w in zip(batch["messages"], batch["text"], batch["where"]):
        file, _, line = w.rpartition(":")
        out.append(Row(file, int(line), m or [], t))
    return out


class Table:
    """The training sources, one after another: row number g is row g - offset[s] of source s."""

    def __init__(self, sets: list, names: list[str]) -> None:
        import datasets

        self.names = names
        self.sizes = [len(d) for d in sets]
        self.offsets = np.cumsum([0, *self.sizes])
        self.all = datasets.concatenate_datasets(sets) if len(sets) > 1 else sets[0]

    def column(self, name: str, ids: np.ndarray) -> np.ndarray:
        """A figure column (table._schema) at ``ids``, as numpy; digests as 16-byte strings (dtype S16)."""
        import pyarrow as pa

        col = self.all.data.column(name)
        if pa.types.is_fixed_size_binary(col.type):
            values = np.concatenate([np.empty(0, "S16")] + [_fixed16(c) for c in col.chunks if len(c)])
        else:
            values = col.to_numpy(zero_copy_only=False)
        return values[ids]

    def source(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, ids, side="right") - 1

    def rows(self, ids: np.ndarray) -> Iterator[list[Row]]:
        """The rows of ``ids``, in order, a batch at a time."""
        for a in range(0, len(ids), BATCH):
            yield as_rows(self.all[ids[a : a + BATCH].tolist()])

    def values(self, ids: np.ndarray, fn, desc: str | None = None) -> Iterator[Any]:
        """``fn`` of each row of ``ids``; with ``desc``, a rows/s bar on stderr once the pass takes over 2 s."""
        from tqdm.auto import tqdm

        with tqdm(total=len(ids), desc=desc, unit=" rows", delay=2, leave=False, disable=desc is None) as bar:
            for batch in self.rows(ids):
                yield from map(fn, batch)
                bar.update(len(batch))


def _fixed16(chunk) -> np.ndarray:
    """A FixedSizeBinary(16) chunk without nulls as an S16 array over its buffer (no Python bytes per row)."""
    data = chunk.buffers()[1]
    return np.frombuffer(data, dtype="S16", count=len(chunk), offset=chunk.offset * 16)


def _step(name: str, before: int, removed_where: list[str], removed: int) -> dict[str, Any]:
    return {"step": name, "before": before, "removed": removed, "after": before - removed, "examples": removed_where}


def _first_seen(keys: np.ndarray, among: np.ndarray) -> np.ndarray:
    """Over the rows where ``among`` holds, in order: True for a key seen before (the later copies)."""
    at = np.flatnonzero(among)
    _, first = np.unique(keys[at], return_index=True)  # the first occurrence of each key
    drop = np.zeros(len(keys), dtype=bool)
    drop[at] = True
    drop[at[first]] = False
    return drop


def _drop(t: Table, ids: np.ndarray, alive: np.ndarray, drop: np.ndarray, name: str, steps: list) -> None:
    """One cleaning step on the rows still ``alive``: its record (count, first 10 locations), then ``alive`` -= drop."""
    drop &= alive
    where = [r.where for r in next(t.rows(ids[drop][:10]), [])]
    steps.append(_step(name, int(alive.sum()), where, int(drop.sum())))
    alive &= ~drop


def clean_ids(t: Table, ids: np.ndarray, recipe) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """clean.clean_rows on row numbers: the same steps, counts and examples, from the figures written with the rows."""
    steps: list[dict[str, Any]] = []
    lo, hi, hp = recipe.min_answer_chars, recipe.max_answer_chars, recipe.max_prompt_chars
    alive = np.ones(len(ids), dtype=bool)
    if recipe.dedup:
        _drop(t, ids, alive, _first_seen(t.column("exact", ids), alive), "exact_duplicates", steps)
        _drop(t, ids, alive, _first_seen(t.column("near", ids), alive), "near_duplicates", steps)
    _drop(t, ids, alive, t.column("no_alnum", ids).astype(bool), "empty_answers", steps)
    if lo > 1 or hi or hp:
        n = t.column("answer_chars", ids)
        bad = (n < lo) | ((n > hi) if hi is not None else False)
        bad |= (t.column("prompt_chars", ids) > hp) if hp is not None else False
        _drop(t, ids, alive, np.asarray(bad, dtype=bool), "length_filter", steps)
    return ids[alive], steps


def split_ids(t: Table, ids: np.ndarray, val_split: float, seed: int) -> tuple[np.ndarray, list[Row]]:
    """clean.split_rows: the same seeded choice of near-duplicate groups; the validation rows come back as rows."""
    if not 0.0 < val_split < 1.0:
        raise DataError(f"val_split: expected a fraction in (0, 1), got {val_split}")
    keys = list(t.values(ids, near_key))
    order = sorted(set(keys))
    random.Random(seed).shuffle(order)
    val_keys = set(order[: max(1, round(val_split * len(order)))])
    is_val = np.fromiter((k in val_keys for k in keys), bool, len(keys))
    return ids[~is_val], [r for batch in t.rows(ids[is_val]) for r in batch]


def overlap_ids(t: Table, ids: np.ndarray, *held_out: list[Row]) -> tuple[np.ndarray, list[str], int]:
    """clean.remove_overlap: (kept ids, first 10 removed locations, removed count)."""
    keys = {digest(near_key(r)) for rows in held_out for r in rows}
    leak = np.isin(t.column("near", ids), np.array(sorted(keys), dtype="S16")) if keys else None
    if leak is None or not leak.any():
        return ids, [], 0
    return ids[~leak], [r.where for r in next(t.rows(ids[leak][:10]))], int(leak.sum())


def weighted_ids(ids: np.ndarray, weight: float, rng: random.Random) -> np.ndarray:
    """clean.weighted on row numbers (the same seeded sample)."""
    if weight < 0:
        raise DataError(f"data_mix: weight must be >= 0, got {weight}")
    whole, frac = int(weight), weight - int(weight)
    out = [np.tile(ids, whole)]
    if frac:
        out.append(ids[rng.sample(range(len(ids)), round(frac * len(ids)))])
    return np.concatenate(out) if out else ids[:0]


def template_ids(t: Table, ids: np.ndarray, templates: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """clean.apply_templates as (row number, template number or -1) pairs, in the order it makes rows."""
    for tpl in templates:
        if "{prompt}" not in tpl:
            raise DataError(f"augment_prompt_templates: template {tpl!r} has no {{prompt}} placeholder")
    reps = np.where(t.column("single", ids).astype(bool), len(templates), 1).astype(np.int64)
    out_ids = np.repeat(ids, reps)
    tpl = np.full(len(out_ids), -1, dtype=np.int64)
    starts = np.cumsum(reps) - reps
    for k in range(len(templates)):
        tpl[starts[reps > 1] + k] = k
    return out_ids, tpl


def with_template(r: Row, template: str) -> Row:
    msgs = [dict(m) for m in r.messages]
    i = next(i for i, m in enumerate(msgs) if m["role"] == "user")
    msgs[i]["content"] = template.replace("{prompt}", msgs[i]["content"])
    return Row(r.file, r.line, msgs, None)
