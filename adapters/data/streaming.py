"""``streaming: true``: train_file read, validated and encoded as training asks for rows, for sets that do not fit
on disk. The trainer gets a ``datasets.IterableDataset``; nothing of the training set is written (no Arrow copy, no
encoded cache).

Rows come from ``load_dataset(..., streaming=True)`` for hub ids, dataset folders (with ``data_split``), CSV and
Parquet; JSON Lines / JSON go through our own line reader (readers.iter_records), which reads line by line too and,
unlike the json builder, locates a bad line and sees a key given twice. Each row is normalised and validated on the
fly (``file:line: field: message``; with ``skip_invalid`` set aside, counted and appended to the quarantine file),
then encoded by the same ``_Encoder`` as the Arrow path through ``IterableDataset.map(batched=True)``.

What needs every row is refused (``REFUSED``). The audit covers the first ``streaming_audit_rows`` rows, encoded
before the model loads; later rows are validated and their drops counted as they stream, but not audited.
"""

from __future__ import annotations

import atexit
import itertools
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from adapters.config import Recipe
from adapters.data.arrow import EncodedSet, _Encoder, encode_dataset, figures, rows_dataset
from adapters.data.formats import normalise
from adapters.data.readers import dataset_records, is_dataset_source, iter_records, load_csv, source_files
from adapters.data.rows import DataError, Encoded, Problem, Record
from adapters.data.validate import write_quarantine
from adapters.utils.hashing import chat_template_sha256, fingerprint

# Keys whose work needs every row before the first step; each is refused with streaming, naming why.
REFUSED = {
    "val_split": "a seeded split draws from every row; give eval_file instead",
    "data_mix": "weights repeat or subsample whole sources",
    "augment_prompt_templates": "variants are drawn over the whole set",
    "general_data_file": "the general share is drawn against the whole set's size",
}
# Rows per encoding batch: the first step waits for one whole batch; 1,000 keeps that wait under a second with a
# Rust tokenizer while still batching the tokenizer calls (arrow.ENCODE_BATCH is tuned for throughput instead).
STREAM_BATCH = 1000
NOT_AUDITED = (
    "streaming: only the first {n} training row(s) were encoded and audited before training; later rows are "
    "validated as they stream (an invalid one stops the run, or is quarantined with skip_invalid) and dropped rows "
    "are counted in the manifest (data.stream), but their lengths, trained share and EOS are not audited"
)
NO_CLEANING = (
    "not applied in streaming mode: dedup and the overlap check need every row's hash, and the answer/prompt length "
    "filters (min_answer_chars, max_answer_chars, max_prompt_chars) are part of that whole-set pass"
)


def check_streaming(recipe: Recipe, training: bool = True) -> None:
    """One-line refusals naming the key; ``training``: also require max_steps (not needed by ``data audit``)."""
    for key, why in REFUSED.items():
        if getattr(recipe, key):
            raise DataError(f"{key}: not available with streaming: true ({why}); unset it or set streaming: false")
    if training and (recipe.max_steps is None or recipe.max_steps <= 0):
        raise DataError(
            "max_steps: must be set (> 0) with streaming: true: a stream has no length, so neither an epoch nor the "
            "learning-rate schedule can be computed from the data"
        )


def _records(path: str, split: str | None, subset: str | None) -> Iterator[Record]:
    """The training source's raw rows, read as they are asked for."""
    import datasets

    if is_dataset_source(path, split):
        try:
            ds = datasets.load_dataset(path, subset, split=split or "train", streaming=True)
        except Exception as e:  # noqa: BLE001 - offline, unknown id or split: one line naming the source
            raise DataError(f"{path}: cannot stream this dataset (split {split or 'train'!r}): {e}") from None
        yield from dataset_records(ds, f"{path}[{split or 'train'}]")
        return
    for f in source_files(path):
        if f.is_file() and f.stat().st_size == 0:
            continue
        if f.is_dir():  # a save_to_disk folder: already Arrow on disk, read in order
            ds = datasets.load_from_disk(str(f))
            ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
            yield from dataset_records(ds.to_iterable_dataset(), str(f))
        elif f.suffix == ".csv":
            yield from load_csv(f, streaming=True)
        elif f.suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(f), split="train", streaming=True)
            yield from dataset_records(ds, str(f))
        else:
            yield from iter_records(f)


class RowStream:
    """The training rows as a generator for ``IterableDataset.from_generator``, and what it counted.

    The Trainer reads the stream again for every epoch, and the audit reads its head first: a row is counted and
    quarantined once, by its position in the stream (``seen``), however many passes read it."""

    def __init__(self, recipe: Recipe, quarantine: Path | None, append: bool) -> None:
        self.recipe, self.quarantine, self._mode = recipe, quarantine, "a" if append else "w"
        self.seen = self.invalid = self.passes = self.kept = 0
        self.dropped: Counter[str] = Counter()
        self._dropped_upto = 0

    def rows(self, counting: bool = True) -> Iterator[dict[str, Any]]:
        r = self.recipe
        self.passes += counting
        for i, rec in enumerate(_records(r.train_file, r.data_split, r.data_subset)):
            messages = text = None
            if rec.obj is not None:
                messages, text, probs, _ = normalise(rec.obj, r.data_format, r.data_columns)
                rec.problems += [Problem(rec.file, rec.line, f, m) for f, m in probs]
            new = i >= self.seen
            self.seen = max(self.seen, i + 1)
            if rec.problems:
                self._bad(rec, new)
                continue
            yield {"messages": messages or [], "text": text, "where": f"{rec.file}:{rec.line}", "index": i}

    def _bad(self, rec: Record, new: bool) -> None:
        if not self.recipe.skip_invalid:
            more = f" (and {len(rec.problems) - 1} more in this row)" if len(rec.problems) > 1 else ""
            raise DataError(f"{rec.problems[0]}{more}; fix it, or set skip_invalid: true to quarantine such rows")
        if not new:
            return
        self.invalid += 1
        if self.quarantine is not None:  # one line per bad row, appended and flushed as the stream goes
            write_quarantine([rec], self.quarantine, append=self._mode == "a")
            self._mode = "a"

    def keep(self, batch: dict[str, list]) -> list[bool]:
        """The ``filter`` after encoding: kept rows pass; dropped ones are counted by reason (once each)."""
        out = []
        for i, why in zip(batch["index"], batch["drop"]):
            out.append(why is None)
            if i >= self._dropped_upto:
                self._dropped_upto = i + 1
                if why is None:
                    self.kept += 1
                else:
                    self.dropped[why.split(";")[0]] += 1
        return out

    def counts(self) -> dict[str, Any]:
        """What the stream read, counted in this process (with dataloader_num_workers > 0 the workers read it);
        ``passes``: times the stream was opened (every epoch, and SFTTrainer peeks at its first row once)."""
        return {
            "rows_read": self.seen,
            "invalid": self.invalid,
            "kept": self.kept,
            "dropped": dict(self.dropped),
            "passes": self.passes,
            "quarantine": str(self.quarantine) if self.invalid and self.quarantine else None,
        }


def _row_features():
    import datasets

    turn = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    return datasets.Features(
        {
            "messages": datasets.List(turn),
            "text": datasets.Value("string"),
            "where": datasets.Value("string"),
            "index": datasets.Value("int64"),
        }
    )


def _encoded_features():
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    cols = {"where": datasets.Value("string"), "index": datasets.Value("int64"), "input_ids": ids, "labels": ids}
    cols.update(length=datasets.Value("int32"), trained=datasets.Value("int32"), eos=datasets.Value("bool"))
    cols.update(first=datasets.Value("bool"), drop=datasets.Value("string"))
    return datasets.Features(cols)


def stream_dataset(stream: RowStream, tok, max_length: int, stop_ids: list[int]):
    """The IterableDataset the trainer gets: rows validated, encoded, dropped ones filtered out; input_ids/labels."""
    import copy

    import datasets

    ds = datasets.IterableDataset.from_generator(stream.rows, features=_row_features())
    ds = ds.map(  # its own tokenizer: rows are encoded after the trainer has set up (and may change) the run's one
        _Encoder(copy.deepcopy(tok), max_length, stop_ids),
        batched=True,
        batch_size=STREAM_BATCH,
        remove_columns=["messages", "text"],
        features=_encoded_features(),
    )
    ds = ds.filter(stream.keep, batched=True, batch_size=STREAM_BATCH)
    return ds.select_columns(["input_ids", "labels"])


class StreamSet:
    """prepare_stream's training set: ``dataset`` for the trainer, ``head`` (the audited rows that were kept, as
    ``Encoded``) for what needs real rows before training (the quantization probe, the length profile)."""

    def __init__(self, dataset, head: list[Encoded], stream: RowStream) -> None:
        self.dataset, self.head, self.stream = dataset, head, stream

    def __getitem__(self, i):
        return self.head[i]

    def mean_tokens(self) -> float:
        return sum(len(e.input_ids) for e in self.head) / max(len(self.head), 1)

    def trainer_dataset(self, pack_length: int | None = None):
        """With ``pack_length``, packed by TRL (BFD) within each map batch of the stream."""
        if not pack_length:
            return self.dataset
        from trl import pack_dataset

        return pack_dataset(self.dataset, pack_length, strategy="bfd")


def audit_head(stream: RowStream, tok, max_length: int, stop_ids: list[int], n: int):
    """The first ``n`` valid rows encoded once: (audit figures as arrow.figures gives them, the kept rows)."""
    import datasets

    gen = stream.rows(counting=False)
    rows = list(itertools.islice(gen, n))
    gen.close()
    if not rows:
        raise DataError(
            f"{stream.recipe.train_file}: no rows" + (" (every row read was invalid)" * bool(stream.invalid))
        )
    batch = {k: [r[k] for r in rows] for k in ("messages", "text", "where")}
    enc = _Encoder(tok, max_length, stop_ids)(batch)
    ds = datasets.Dataset.from_dict({**enc, "where": batch["where"]})
    fig = figures(ds, max_length, stop_ids)
    head = [Encoded(enc["input_ids"][i], enc["labels"][i], batch["where"][i]) for i in np.flatnonzero(fig["kept"])]
    return fig, head


def prepare_stream(
    recipe: Recipe, tok, run_dir: Path | None, say=print, write: bool = True, packed: bool = False, training=True
) -> tuple[StreamSet, EncodedSet | None, list, dict[str, Any]]:
    """prepare_data's counterpart for ``streaming: true``: (train StreamSet, eval or None, test rows, report).
    eval_file and test_file are read whole, as without streaming; the train head's audit is checked here, before
    the model loads, and written to run_dir/data_audit.json."""
    from adapters.data.pipeline import validate_sources
    from adapters.model.loading import stop_token_ids

    check_streaming(recipe, training)
    stop = stop_token_ids(tok)
    held = [p for p in (recipe.eval_file, recipe.test_file) if p]
    read: dict[str, list] = {}
    validation = validate_sources(recipe, held, run_dir, say, write, read) if held else {"invalid": 0}
    qpath = recipe.quarantine_file or (str(Path(run_dir) / "quarantine.jsonl") if run_dir else None)
    quarantine = Path(qpath) if recipe.skip_invalid and write and qpath else None
    stream = RowStream(recipe, quarantine, append=bool(validation["invalid"]))
    fig, head = audit_head(stream, tok, recipe.max_length, stop, recipe.streaming_audit_rows)
    audits: dict[str, Any] = {"train": fig["audit"], "streaming": True, "audited_rows": fig["audit"]["rows"]}
    audits["not_audited"] = NOT_AUDITED.format(n=fig["audit"]["rows"])
    report = _report(recipe, tok, validation, fig, packed)
    ev = None
    if recipe.eval_file:
        ev, ev_fig = _encode_held(read[str(recipe.eval_file)], tok, recipe.max_length, stop)
        audits["eval"] = ev_fig["audit"]
        report["eval"] = {"file": recipe.eval_file, "sha256": _sha(recipe.eval_file), **ev_fig["summary"]}
    _check(recipe, audits, run_dir, report, say, write)
    if not head:
        raise DataError(f"{recipe.train_file}: no usable training rows in the first {fig['audit']['rows']}")
    say(f"[data] {recipe.train_file}: {audits['not_audited']}")
    test = read.get(str(recipe.test_file), []) if recipe.test_file else []
    if recipe.test_file:
        report["test"] = {"file": recipe.test_file, "sha256": _sha(recipe.test_file), "rows": len(test)}
    return StreamSet(stream_dataset(stream, tok, recipe.max_length, stop), head, stream), ev, test, report


def _sha(path: str) -> str | None:
    """A local source's sha256 (what a resume compares); a streamed hub set is not read whole to hash it."""
    return fingerprint(path) if Path(path).exists() else None


def _report(recipe: Recipe, tok, validation: dict, fig: dict, packed: bool) -> dict[str, Any]:
    sha = _sha(recipe.train_file)
    return {
        "streaming": True,
        "validation": {**validation, "train": "on the fly as rows stream; counts in data.stream after training"},
        "sources": [{"file": recipe.train_file, "sha256": sha, "weight": 1.0, "rows": None}],
        "split": {"by": "file", "eval_file": recipe.eval_file, "test_file": recipe.test_file},
        "cleaning": NO_CLEANING,
        "augmentation": None,
        "train": {"file": recipe.train_file, "sha256": sha, "audited_rows": fig["audit"]["rows"], **fig["summary"]},
        "encoding": {"cache": None, "cache_hit": False, "streaming": "encoded on the fly; no encoded cache is built"},
        "chat_template": {
            "source": recipe.chat_template or "tokenizer (or the family built-in if it has none)",
            "sha256": chat_template_sha256(tok),
        },
        "packing": {"enabled": packed, "attn_implementation": recipe.attn_implementation},
    }


def _encode_held(rows: list, tok, max_length: int, stop: list[int]):
    """eval rows through the Arrow path (they are read whole, as without streaming), in a folder gone at exit."""
    folder = Path(tempfile.mkdtemp(prefix="adapters-stream-eval-"))
    atexit.register(shutil.rmtree, folder, True)
    ds = rows_dataset([rows], folder / "rows")
    enc = encode_dataset(ds, tok, max_length, stop, 1, folder / "eval.arrow", "encode eval")
    fig = figures(enc, max_length, stop)
    return EncodedSet(enc.select(np.flatnonzero(fig["kept"]))), fig


def _check(recipe: Recipe, audits: dict[str, Any], run_dir: Path | None, report: dict, say, write: bool) -> None:
    """The audit thresholds on the head (and eval), as on the whole set without streaming."""
    from adapters.data.pipeline import _check_audit

    _check_audit(recipe, audits, run_dir, report, say, write)
    say("[audit] no problems")
