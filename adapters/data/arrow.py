"""The encoding at scale: rows in an Arrow dataset (memory-mapped), encoded with ``Dataset.map(batched=True,
num_proc=N)``; the audit's and the report's figures come from its columns, never from Python lists of rows.

The encoding is the one of ``encode.encode_messages`` / ``encode_text`` (labels by token position, the assistant
turns only), with the template filled in (data/fill.py) and every string of a batch tokenized in one call.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adapters.data.encode import assistant_labels, encode_text, joins_cleanly, piece_labels, pieces, turn_cuts
from adapters.data.fill import TemplateFill
from adapters.data.rows import IGNORE_INDEX, Encoded, Row

# From this many rows on, the encoding runs in one process per core: starting the workers (forked, the tokenizer
# inherited, not pickled) costs about a second; below it, one process (whose Rust tokenizer still uses every core).
PARALLEL_MIN_ROWS = 50_000
# Rows per map batch: the Rust tokenizer spreads one batch call over the cores, and on 2 cores (Gemma tokenizer,
# ~130-character strings) 10,000 strings a call ran at 39k strings/s against 21k at 1,000 a call.
ENCODE_BATCH = 10_000


def default_num_proc(rows: int, asked: int | None) -> int:
    """SFTConfig's ``dataset_num_proc`` when set; else every core this process may use (its share under a
    launcher: ``parallel.cores``), from PARALLEL_MIN_ROWS rows on. With a Rust tokenizer one process already
    tokenizes on every core, but the rest of the encoding (template, labels, figures, Arrow) is Python on one:
    on 200k rows (2 cores, Gemma tokenizer, two runs each) 2 processes took 10.2 and 9.8 s, 1 took 12.0 and 13.1 s,
    and the parent's memory stayed flat (the workers read the rows)."""
    if asked:
        return max(1, int(asked))
    from adapters.data.parallel import cores

    return cores() if rows >= PARALLEL_MIN_ROWS else 1


def rows_dataset(batches: Iterable[list[Row]], folder: Path):
    """Batches of rows as an Arrow dataset written to ``folder`` and memory-mapped."""
    import datasets
    import pyarrow as pa

    schema = pa.schema(
        [
            ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("text", pa.string()),
            ("where", pa.string()),
        ]
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rows.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for rows in batches:
            cols = [[r.messages for r in rows], [r.text for r in rows], [r.where for r in rows]]
            writer.write_batch(pa.record_batch([pa.array(c, type=f.type) for c, f in zip(cols, schema)], schema=schema))
    return datasets.Dataset.from_file(str(path))


def token_ids(tok, texts: list[str]) -> list[list[int]]:
    """``tok(texts, add_special_tokens=False)["input_ids"]``, straight from the Rust tokenizer when there is one
    (the same call transformers makes, without building offsets and Python encodings we do not use)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or getattr(tok, "split_special_tokens", False):
        return tok(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


# Tokenizers of live encoders, by id: a forked ``Dataset.map`` worker finds its tokenizer here (copied with the
# process) instead of unpickling it (the Gemma 3 tokenizer takes 4 s to dill and 1.4 s to load, per shard).
_FORKED: dict[int, Any] = {}


class _Encoder:
    """The ``Dataset.map`` function: one batch of rows -> input_ids, labels and the per-row audit figures."""

    def __init__(self, tok, max_length: int, stop_ids: list[int]) -> None:
        self.tok, self.max_length, self.stop = tok, max_length, set(stop_ids)
        self.fill = TemplateFill(tok)
        self.joins = joins_cleanly(tok)
        _FORKED[id(tok)] = tok  # before map's pool forks its workers

    def __getstate__(self) -> dict[str, Any]:
        import multiprocess

        state = dict(self.__dict__)
        if multiprocess.get_start_method(allow_none=True) in (None, "fork"):
            state["tok"], state["fill"] = ("forked", id(self.tok)), None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        tok = state["tok"]
        if isinstance(tok, tuple):  # the parent's tokenizer, in this forked process's memory
            state["tok"] = _FORKED[tok[1]]
            state["fill"] = TemplateFill(state["tok"])
        self.__dict__.update(state)

    def _strings(self, messages: list[dict[str, str]], where: str) -> tuple[list[str], list[bool] | None]:
        """What to tokenize for one conversation: its pieces at the answers' cuts, and which are trained; or (a
        tokenizer that does not join pieces cleanly) the full rendering, then per answer the renderings up to the
        turn with a generation prompt and up to and with it."""
        if self.joins:
            parts = pieces(*turn_cuts(self.fill.render, messages, where))
            return [text for text, _ in parts], [trained for _, trained in parts]
        out = [self.fill.render(messages)]
        for i, turn in enumerate(messages):
            if turn["role"] == "assistant":
                out += (self.fill.render(messages[:i], True), self.fill.render(messages[: i + 1]))
        return out, None

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        # A batch allocates about a million small objects and frees them by reference counting; the cyclic
        # collector's passes over them cost ~12% of the CPU time (measured on 40k rows, Gemma tokenizer).
        paused = gc.isenabled()
        gc.disable()
        try:
            return self._encode(batch)
        finally:
            if paused:
                gc.enable()

    def _encode(self, batch: dict[str, list]) -> dict[str, list]:
        msgs, texts, wheres = batch["messages"], batch["text"], batch["where"]
        chat = [i for i, t in enumerate(texts) if t is None]
        if chat and not self.fill.check(msgs[chat[0]]):  # the sample check of the fill, once per batch
            self.fill.enabled = False
        strings = [self._strings(msgs[i], wheres[i]) for i in chat]
        unique = {s: None for group, _ in strings for s in group}  # exact mode: the last answer's end is the row
        ids = dict(zip(unique, token_ids(self.tok, list(unique)))) if unique else {}
        out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "length", "trained", "eos", "first", "drop")}
        pos = dict(zip(chat, range(len(chat))))
        for i in range(len(texts)):
            if i in pos:
                group, trained = strings[pos[i]]
                row_ids = [ids[s] for s in group]
                if trained is not None:
                    full, labels = piece_labels(row_ids, trained)
                else:
                    full, labels = _labels(row_ids, msgs[i], wheres[i])
            else:
                full, labels = encode_text(self.tok, texts[i])
            self._row(out, full, labels)
        return out

    def _row(self, out: dict[str, list], ids: list[int], labels: list[int]) -> None:
        trained = len(labels) - labels.count(IGNORE_INDEX)
        drop = None
        if len(ids) > self.max_length:
            drop = f"longer than max_length={self.max_length}; the answer would be cut"
        elif trained == 0:
            drop = "no trained token"
        out["input_ids"].append([] if drop else ids)
        out["labels"].append([] if drop else labels)
        out["length"].append(len(ids))
        out["trained"].append(trained)
        out["eos"].append(drop is None and not self.stop.isdisjoint(_last_span(ids, labels)))
        out["first"].append(drop is None and bool(labels) and labels[0] != IGNORE_INDEX)
        out["drop"].append(drop)


def _last_span(ids: list[int], labels: list[int]) -> list[int]:
    """audit._last_trained_span without building an Encoded: the last contiguous run of trained positions."""
    end = len(labels) - 1
    while end >= 0 and labels[end] == IGNORE_INDEX:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return ids[start : end + 1] if end >= 0 else []


def _labels(ids: list[list[int]], messages: list[dict[str, str]], where: str) -> tuple[list[int], list[int]]:
    """``encode_messages`` on pre-tokenized strings (the full rendering, then start and end per answer)."""
    full = ids[0]
    return full, assistant_labels(full, zip(ids[1::2], ids[2::2]), messages, where)


def _features():
    import datasets

    ids = datasets.List(datasets.Value("int32"))  # int32: half of what the inferred int64 would write
    return datasets.Features(
        {
            "where": datasets.Value("string"),
            "input_ids": ids,
            "labels": ids,
            "length": datasets.Value("int32"),
            "trained": datasets.Value("int32"),
            "eos": datasets.Value("bool"),
            "first": datasets.Value("bool"),
            "drop": datasets.Value("string"),
        }
    )


def encode_dataset(ds, tok, max_length: int, stop_ids: list[int], num_proc: int, cache_file: Path, desc: str):
    """Every row encoded (dropped rows keep their figures and get empty ids), written to ``cache_file`` (one file
    per process: ``cache_file`` with ``_0000N_of_0000M`` before the suffix)."""
    return ds.map(
        _Encoder(tok, max_length, stop_ids),
        batched=True,
        batch_size=ENCODE_BATCH,
        num_proc=num_proc if num_proc > 1 and len(ds) >= 2 * num_proc else None,
        remove_columns=["messages", "text"],
        cache_file_name=str(cache_file),
        new_fingerprint=os.urandom(8).hex(),  # hashing the tokenizer would cost seconds; the key is ours (cache.py)
        features=_features(),
        desc=desc,
    )


def _col(ds, name: str) -> np.ndarray:
    return ds.data.column(name).to_numpy(zero_copy_only=False)


def _median(xs: np.ndarray) -> float | int:
    """statistics.median on a sorted array without a Python list: the middle item, or the mean of the two."""
    n = len(xs)
    return int(xs[n // 2]) if n % 2 else (int(xs[n // 2 - 1]) + int(xs[n // 2])) / 2


def figures(ds, max_length: int, stop_ids: list[int]) -> dict[str, Any]:
    """The audit (audit.audit's keys) and the split summary (EncodeReport.summary's keys) from the columns."""
    lengths, trained = _col(ds, "length"), _col(ds, "trained")
    drop = ds.data.column("drop").to_pylist()
    kept = np.array([d is None for d in drop], dtype=bool)
    wheres = ds.data.column("where")
    dropped = [
        {"where": wheres[i].as_py(), "tokens": int(lengths[i]), "reason": drop[i]} for i in np.flatnonzero(~kept)
    ]
    ls = np.sort(lengths) if len(lengths) else np.zeros(1, dtype=np.int64)
    tokens, trained_tokens, rows = int(lengths[kept].sum()), int(trained[kept].sum()), len(lengths)
    length = {"min": int(ls[0]), "median": _median(ls), "p95": int(ls[min(len(ls) - 1, int(0.95 * len(ls)))])}
    length.update(max=int(ls[-1]), max_length=max_length)
    share = round(trained_tokens / tokens, 4) if tokens else 0.0
    eos_rows = int(_col(ds, "eos").sum())
    audit = {
        "rows": rows,
        "kept": int(kept.sum()),
        "tokens": tokens,
        "trained_tokens": trained_tokens,
        "trained_share": share,
        "dropped": len(dropped),
        "dropped_share": round(len(dropped) / rows, 4) if rows else 0.0,
        "truncated_answer_rows": [d for d in dropped if d["reason"].startswith("longer than")],
        "no_trained_token_rows": [d for d in dropped if d["reason"] == "no trained token"],
        "eos_trained_rows": eos_rows,
        "eos_trained": bool(kept.any()) and eos_rows == int(kept.sum()),
        "stop_token_ids": sorted(set(stop_ids)),
        "rows_trained_from_first_token": int(_col(ds, "first").sum()),
        "length": {**length, "over_max_length": int((lengths > max_length).sum())},
    }
    summary = {"rows": rows, "kept": audit["kept"], "dropped": len(dropped), "dropped_rows": dropped[:50]}
    summary.update(tokens=tokens, trained_tokens=trained_tokens, trained_share=share, length=length)
    return {"audit": audit, "summary": summary, "kept": kept}


def tokens_by_source(ds, kept: np.ndarray, source: np.ndarray, sources: int) -> list[int]:
    """Tokens of the kept rows per source; ``source``: each row's source number."""
    lengths = _col(ds, "length")
    return [int(x) for x in np.bincount(source[kept], weights=lengths[kept], minlength=sources)]


class EncodedSet(Sequence):
    """The kept rows of an encoded dataset, read as ``Encoded`` items (what the rest of a run indexes and counts);
    ``dataset`` is the Arrow dataset of input_ids and labels the trainer gets as it is."""

    def __init__(self, ds) -> None:
        self.dataset = ds.select_columns(["input_ids", "labels", "where"])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        r = self.dataset[int(i)]
        return Encoded(r["input_ids"], r["labels"], r["where"])

    def __iter__(self) -> Iterator[Encoded]:
        for batch in self.dataset.iter(batch_size=1000):
            yield from (Encoded(*t) for t in zip(batch["input_ids"], batch["labels"], batch["where"]))
