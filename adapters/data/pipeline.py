"""The data stage of a run: validate -> read/mix -> clean -> split -> augment -> encode -> audit -> report.

``prepare_data(recipe, tok, run_dir)`` is what ``adapters.training.run.train`` calls before loading the model, so every data
problem stops the run before anything expensive starts. Everything done is recorded for the manifest.
"""

from __future__ import annotations

import atexit
import json
import random
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapters.config import Recipe
from adapters.data import cache
from adapters.data.arrow import EncodedSet, default_num_proc, encode_dataset, figures, rows_dataset, tokens_by_source
from adapters.data.audit import AuditError, format_audit, violations
from adapters.data.clean import mix_general, weighted
from adapters.data.rows import DataError, Row
from adapters.data.table import BATCH, RowWriter, Table, clean_ids, overlap_ids, split_ids, template_ids, with_template
from adapters.data.validate import CheckResult, check, scan
from adapters.training.speed import ISOLATING_ATTENTION, isolates_samples
from adapters.utils.atomic import staged_dir, write_json
from adapters.utils.hashing import chat_template_sha256


def packing_guard(recipe: Recipe, say=print) -> bool:
    """Decide whether batches are packed; the recipe is left as it is and the trainer builder gets the decision.
    Refuses nothing silently: a non-isolating attention turns packing off with a warning. (``padding_free`` is the
    fast path's own key, training/speed.py: TRL's per-batch flattening, not packing.) Returns True when the
    training set must be packed (TRL's BFD packing; our rows already fit max_length)."""
    if not recipe.packing:
        return False
    attn = recipe.attn_implementation
    if not isolates_samples(attn):
        msg = (
            f"packing/padding_free disabled: attn_implementation={attn!r} does not keep packed samples apart "
            f"(use one of {sorted(ISOLATING_ATTENTION)}; flex_attention only on CUDA); tokens of one sample would "
            "attend to another"
        )
        warnings.warn(msg, stacklevel=2)
        say(f"[data] warning: {msg}")
        return False
    if recipe.packing_strategy == "wrapped":
        raise DataError(
            "packing_strategy: 'wrapped' cuts samples in the middle, so answers lose their prompt; use 'bfd'"
        )
    return True


def _read(path: str, recipe: Recipe, read: dict[str, list[Row]] | None = None) -> list[Row]:
    """A source's valid rows: those validation kept (``read``), else a scan of it."""
    if read is not None and str(path) in read:
        return read[str(path)]
    return scan(path, recipe.data_format, recipe.data_columns, split=recipe.data_split, subset=recipe.data_subset).rows


def validate_sources(
    recipe: Recipe,
    paths: list[str],
    run_dir: Path | None,
    say=print,
    write: bool = True,
    read: dict | None = None,
    writers: dict | None = None,
) -> dict[str, Any]:
    """The same validation as ``adapters data check``, before every train. Errors stop the run unless
    ``skip_invalid``; then the bad rows go to the quarantine file and their count is reported. ``read``: a dict
    that gets each source's valid rows, so the stage reads its data once; ``writers``: path -> RowWriter, for the
    sources whose rows go to Arrow instead (the training sources)."""
    qpath = recipe.quarantine_file or (str(run_dir / "quarantine.jsonl") if run_dir else None)
    quarantine = qpath if recipe.skip_invalid and write else None
    res = check(
        paths,
        recipe.data_format,
        recipe.data_columns,
        quarantine,
        read is not None,
        recipe.data_split,
        recipe.data_subset,
        sinks=writers,
    )
    if read is not None:
        read.update(res.rows_by_source)
    _no_rows(res)
    if res.problems and not recipe.skip_invalid:
        shown = "\n  ".join(str(p) for p in res.problems[:20])
        more = f"\n  … and {len(res.problems) - 20} more" if len(res.problems) > 20 else ""
        raise DataError(
            f"{len(res.problems)} problem(s) in {res.bad_rows} row(s) of the data:\n  {shown}{more}\n"
            "fix them, or set skip_invalid: true to quarantine these rows"
        )
    _no_valid_rows(res)
    if res.bad_rows:
        say(f"[data] {res.bad_rows} invalid row(s) skipped -> {res.quarantine} (first: {res.problems[0]})")
    return {
        "rows": res.rows,
        "valid": res.valid,
        "invalid": res.bad_rows,
        "quarantine": str(res.quarantine) if res.quarantine else None,
    }


def _no_rows(res: CheckResult) -> None:
    """A source with no rows stops the run with its name (``FILE: no rows``), skip_invalid or not: the audit would
    only say that no row has a trained token."""
    empty = [p for p in res.problems if p.line is None]
    if empty:
        more = f" (and {len(empty) - 1} more source(s) with no rows)" if len(empty) > 1 else ""
        raise DataError(f"{empty[0]}{more}")


def _no_valid_rows(res: CheckResult) -> None:
    """The same for a source whose every row was set aside by skip_invalid."""
    for src, n in res.invalid_by_source.items():
        if n and not res.valid_by_source.get(src):
            where = f"quarantined to {res.quarantine}" if res.quarantine else "skipped"
            raise DataError(f"{src}: no valid rows ({n} invalid row(s) {where})")


def prepare_data(
    recipe: Recipe, tok, run_dir: Path | None, say=print, write: bool = True, packed: bool | None = None
) -> tuple[EncodedSet, EncodedSet | None, list[Row], dict[str, Any]]:
    """Returns (train_encoded, eval_encoded or None, test_rows, report). Writes run_dir/data_audit.json.
    ``packed``: the packing_guard decision (None: decide here). The encoded splits and the figures come from the
    encoded-data cache (data/cache.py) when a run with the same data, tokenizer and keys built it before; only a
    process that may ``write`` adds to the cache."""
    key = cache.cache_key(recipe, tok)
    folder = cache.cache_dir(recipe, key["key"])
    hit = cache.complete(folder)
    if hit and (damage := cache.verify(folder)):  # checked before use: sizes and digests recorded when written
        hit = False
        where = f"moved aside to {cache.set_aside(folder)}" if write else "not used"
        say(f"[data] warning: encoded cache entry damaged: {damage}; {where}; rebuilding it")
    if not hit and write:
        with staged_dir(folder, unique=True) as tmp:
            _build(recipe, tok, run_dir, say, write, tmp)
            cache.seal(tmp)
    elif not hit:  # a process that must not write (rank > 0): its own folder, outside the outputs, gone at exit
        folder = Path(tempfile.mkdtemp(prefix="adapters-encoded-"))
        atexit.register(shutil.rmtree, folder, True)
        _build(recipe, tok, run_dir, say, write, folder)
    else:
        say(f"[data] encoded cache hit: {folder}")
    report = json.loads((folder / "report.json").read_text())
    audits = json.loads((folder / "audits.json").read_text())
    report["chat_template"] = {
        "source": recipe.chat_template or "tokenizer (or the family built-in if it has none)",
        "sha256": chat_template_sha256(tok),
    }
    report["packing"] = {
        "enabled": packing_guard(recipe, say) if packed is None else packed,
        "attn_implementation": recipe.attn_implementation,
    }
    report["encoding"] = {"cache": str(folder), "cache_hit": hit, "key": key["key"], "num_proc": report["encoding"]}
    qsrc = folder / "quarantine.jsonl"
    if hit and write and report["validation"]["quarantine"] and qsrc.is_file():
        shutil.copyfile(qsrc, report["validation"]["quarantine"])
    train = EncodedSet(_kept(cache.load_split(folder, "train")))
    ev = EncodedSet(_kept(cache.load_split(folder, "eval"))) if cache.shard_files(folder, "eval") else None
    _check_audit(recipe, audits, run_dir, report, say, write)
    if not len(train):
        raise DataError(f"{recipe.train_file}: no usable training rows")
    say("[audit] no problems")
    test = _read(recipe.test_file, recipe) if recipe.test_file else []
    return train, ev, test, report


def _kept(ds):
    """The rows the encoding kept (a dropped row has a reason in ``drop``), as an index over the mapped file."""
    import numpy as np
    import pyarrow.compute as pc

    return ds.select(np.flatnonzero(pc.is_null(ds.data.column("drop")).to_numpy(zero_copy_only=False)))


def _build(recipe: Recipe, tok, run_dir: Path | None, say, write: bool, out: Path) -> None:
    """The whole stage, its encoded splits, report and audit written into the cache folder ``out``."""
    rng = random.Random(recipe.seed)
    mix = dict(recipe.data_mix or {})
    mix.setdefault(recipe.train_file, 1.0)
    held = [p for p in (recipe.eval_file, recipe.test_file) if p]
    general = [recipe.general_data_file] if recipe.general_data_file else []
    work = out / "work"
    writers = {str(p): RowWriter(work / f"source{i}.arrow") for i, p in enumerate(mix)}
    read: dict[str, list[Row]] = {}
    paths = list(mix) + held + general
    report: dict[str, Any] = {"validation": validate_sources(recipe, paths, run_dir, say, write, read, writers)}
    q = report["validation"]["quarantine"]
    if q and Path(q).is_file():
        shutil.copyfile(q, out / "quarantine.jsonl")
    data = _Rows.read(recipe, mix, read, writers)
    _clean_split_weigh(recipe, data, rng, report, say)
    _augment(recipe, data, rng, report, say, read)
    _encode_and_audit(recipe, tok, data, report, out)
    shutil.rmtree(work, ignore_errors=True)


@dataclass
class _Rows:
    """The run's data as it moves through the stage. Training rows stay in Arrow (``table``): ``train`` holds their
    row numbers, ``tpl`` the augmentation template of each (-1: none); after the general-data mix, an entry
    ``-(g + 1)`` is row g of ``general``."""

    sources: list[dict[str, Any]]
    table: Table
    train: np.ndarray
    eval: list[Row]
    test: list[Row]
    tpl: np.ndarray | None = None
    general: list[Row] = field(default_factory=list)

    @classmethod
    def read(cls, recipe: Recipe, mix: dict[str, float], read: dict[str, list[Row]], writers: dict) -> _Rows:
        sets = [writers[str(p)].close() for p in mix]
        sources = [
            {"file": p, "sha256": cache.file_hash(p, recipe), "weight": float(mix[p]), "rows": len(d)}
            for p, d in zip(mix, sets)
        ]
        table = Table(sets, list(mix))
        eval_rows = _read(recipe.eval_file, recipe, read) if recipe.eval_file else []
        test_rows = _read(recipe.test_file, recipe, read) if recipe.test_file else []
        return cls(sources, table, np.arange(len(table.all), dtype=np.int64), eval_rows, test_rows)

    def dataset(self, templates: list[str] | None, folder: Path):
        """The final training rows, in order, as an Arrow dataset: a selection of the sources' files as they are, or,
        with prompt templates or general rows, those rows written to ``folder``."""
        if self.tpl is None and not self.general:
            return self.table.all.select_columns(["messages", "text", "where"]).select(self.train)
        return rows_dataset(self.batches(templates), folder)

    def source_index(self) -> np.ndarray:
        """Each final training row's number in ``sources`` (general rows: the last one)."""
        return np.where(self.train >= 0, self.table.source(np.maximum(self.train, 0)), len(self.sources) - 1)

    def batches(self, templates: list[str] | None) -> Iterator[list[Row]]:
        """The final training rows, in order, a batch at a time."""
        for a in range(0, len(self.train), BATCH):
            part = self.train[a : a + BATCH]
            rows = iter(next(self.table.rows(part[part >= 0]), []))
            tpl = self.tpl[a : a + BATCH] if self.tpl is not None else None
            out = []
            for k, i in enumerate(part):
                if i < 0:
                    out.append(self.general[-i - 1])
                    continue
                r = next(rows)
                out.append(with_template(r, templates[tpl[k]]) if tpl is not None and tpl[k] >= 0 else r)
            yield out


def _clean_split_weigh(recipe: Recipe, data: _Rows, rng: random.Random, report: dict[str, Any], say) -> None:
    """Clean and split before weighting, so that duplicates are found across sources and no repeated row can cross
    the split; then each source's rows are weighted (repeated or subsampled)."""
    data.train, steps = clean_ids(data.table, data.train, recipe)
    if recipe.val_split:
        if recipe.eval_file:
            raise DataError(
                f"val_split: set eval_file: null to split the training data, or val_split: 0 to use {recipe.eval_file}"
            )
        data.train, data.eval = split_ids(data.table, data.train, recipe.val_split, recipe.seed)
        report["split"] = {"by": "fraction", "val_split": recipe.val_split, "seed": recipe.seed}
    else:
        report["split"] = {"by": "file", "eval_file": recipe.eval_file, "test_file": recipe.test_file}
    before = len(data.train)
    data.train, leaked, n_leaked = overlap_ids(data.table, data.train, data.eval, data.test)
    steps.append(
        {
            "step": "overlap_with_eval_or_test",
            "before": before,
            "removed": n_leaked,
            "after": len(data.train),
            "examples": leaked,
        }
    )
    report["split"].update(train=len(data.train), eval=len(data.eval), test=len(data.test))
    for s in steps:
        if s["removed"]:
            say(f"[data] clean {s['step']}: removed {s['removed']} of {s['before']} (first: {s['examples'][0]})")
    report["cleaning"] = steps
    of = data.table.source(data.train)
    mixed = []
    for k, src in enumerate(data.sources):
        used = weighted(data.train[of == k].tolist(), src["weight"], rng)  # row numbers: the same seeded draw
        src["rows_used"] = len(used)
        mixed += used
    data.train = np.asarray(mixed, dtype=np.int64)


def _augment(recipe: Recipe, data: _Rows, rng: random.Random, report: dict[str, Any], say, read: dict) -> None:
    """Opt-in: prompt-template variants, and a share of general data against forgetting."""
    aug: dict[str, Any] = {}
    if recipe.augment_prompt_templates:
        before = len(data.train)
        data.train, data.tpl = template_ids(data.table, data.train, recipe.augment_prompt_templates)
        aug["prompt_templates"] = {
            "templates": recipe.augment_prompt_templates,
            "rows_before": before,
            "rows_after": len(data.train),
        }
    if recipe.general_data_file and recipe.general_data_share:
        data.general = _read(recipe.general_data_file, recipe, read)
        own = list(range(len(data.train)))  # positions; general rows as -(g + 1): mix_general only draws
        mixed, added = mix_general(own, [-(g + 1) for g in range(len(data.general))], recipe.general_data_share, rng)
        mixed = np.asarray(mixed, dtype=np.int64)
        at = np.maximum(mixed, 0)
        tpl = data.tpl[at] if data.tpl is not None else np.full(len(mixed), -1, dtype=np.int64)
        data.train, data.tpl = np.where(mixed >= 0, data.train[at], mixed), np.where(mixed >= 0, tpl, -1)
        aug["general_data"] = {
            "file": recipe.general_data_file,
            "sha256": cache.file_hash(recipe.general_data_file, recipe),
            "share": recipe.general_data_share,
            "rows_added": added,
            "rows_available": len(data.general),
        }
        data.sources.append(
            {
                "file": recipe.general_data_file,
                "sha256": aug["general_data"]["sha256"],
                "weight": None,
                "rows": len(data.general),
                "rows_used": added,
            }
        )
    if aug:
        say(f"[data] augmentation: {aug}")
    report["augmentation"] = aug or None


def _encode_and_audit(recipe: Recipe, tok, data: _Rows, report: dict[str, Any], out: Path) -> None:
    """Encode train and eval rows into ``out`` (Arrow, one file per process), with their audit figures."""
    from adapters.model.loading import stop_token_ids

    stop = stop_token_ids(tok)
    num_proc = default_num_proc(len(data.train) + len(data.eval), recipe.dataset_num_proc)
    audits, summaries = {}, {}
    work = out / "work"
    splits = {"train": lambda: data.dataset(recipe.augment_prompt_templates, work / "train")}
    if data.eval:
        splits["eval"] = lambda: rows_dataset([data.eval], work / "eval")
    for name, dataset in splits.items():
        ds = dataset()
        enc = encode_dataset(ds, tok, recipe.max_length, stop, num_proc, out / f"{name}.arrow", f"encode {name}")
        fig = figures(enc, recipe.max_length, stop)
        audits[name], summaries[name] = fig["audit"], fig["summary"]
        if name == "train":
            by_source = tokens_by_source(enc, fig["kept"], data.source_index(), len(data.sources))
        del ds, enc
    for s, tokens in zip(data.sources, by_source):
        s["tokens"] = tokens
    report["sources"] = data.sources
    # the spine's per-split summary (file, sha256, rows, kept, tokens, trained_share, length)
    train_sha = next(s["sha256"] for s in data.sources if s["file"] == recipe.train_file)
    report["train"] = {"file": recipe.train_file, "sha256": train_sha, **summaries["train"]}
    if data.eval:
        report["eval"] = {
            "file": recipe.eval_file,
            "sha256": cache.file_hash(recipe.eval_file, recipe) if recipe.eval_file else None,
            **summaries["eval"],
        }
    if recipe.test_file:
        report["test"] = {
            "file": recipe.test_file,
            "sha256": cache.file_hash(recipe.test_file, recipe),
            "rows": len(data.test),
        }
    report["encoding"] = num_proc
    write_json(out / "audits.json", audits)
    write_json(out / "report.json", report)  # last: its presence marks the folder complete


def _check_audit(recipe: Recipe, audits: dict[str, Any], run_dir: Path | None, report: dict[str, Any], say, write):
    """The audit thresholds on the audited rows (a streamed run's: its head, ``audits["audited_rows"]``); the audit
    printed, written to data_audit.json and summed up in ``report["audit"]``."""
    problems = violations(
        audits["train"], recipe.audit_max_dropped_share, recipe.audit_min_trained_share, recipe.audit_require_eos
    )
    audits["thresholds"] = {
        "audit_max_dropped_share": recipe.audit_max_dropped_share,
        "audit_min_trained_share": recipe.audit_min_trained_share,
        "audit_require_eos": recipe.audit_require_eos,
    }
    audits["problems"] = problems
    for name in ("train", "eval"):
        if name in audits:
            for line in format_audit(name, audits[name]):
                say(line)
    if write and run_dir is not None:
        write_json(Path(run_dir) / "data_audit.json", audits)
    report["audit"] = {
        k: {kk: v for kk, v in audits[k].items() if not kk.endswith("_rows")} for k in ("train", "eval") if k in audits
    }
    report["audit"]["problems"] = problems
    head = "audited_rows" in audits
    if head:
        report["audit"].update(streaming=True, audited_rows=audits["audited_rows"], not_audited=audits["not_audited"])
    if problems:
        what = " on the streamed head" if head else ""
        raise AuditError(f"data audit failed{what} (see data_audit.json): " + "; ".join(problems))
