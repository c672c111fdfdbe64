"""Preference data: pairs for DPO / ORPO and labelled answers for KTO, validated with ``file:line: field`` and audited.

Formats (one JSON object per row, read by data/readers.py like every other source):

- ``prompt`` / ``chosen`` / ``rejected``: strings, or message lists (``prompt`` the conversation so far, each
  answer the assistant turn(s));
- ``chosen`` / ``rejected`` as whole conversations with the prompt inside (implicit prompt): every turn but the
  last assistant answer must be the same in both;
- KTO's ``prompt`` / ``completion`` / ``label`` (``label`` a JSON boolean). A paired set given to KTO is unpaired:
  each pair gives one desirable (chosen) and one undesirable (rejected) row.

A row's problems are found without a tokenizer (``adapters data check``); the tokenizer's checks (a prompt that alone
fills ``max_length``) and the audit (rows kept, tokens, truncation, duplicates, held-out overlap, length bias) run
before the model loads (:func:`prepare_preference`). Rows go to TRL in its conversational format, so TRL's own chat
template handling and tokenization apply.

The encoded-data cache (data/cache.py, as for SFT): TRL's own tokenization of the kept rows is stored with the data
report in ``<output_root>/.cache/encoded/<key>/`` once a trainer has made it, sealed with sizes and digests
(``integrity.json``), and a later run with the same key reads both from there: no reading, validation, audit or
tokenization. DPO and KTO: the output of their ``_prepare_dataset`` (prompt / chosen / rejected ids; prompt /
completion ids and the KL completions), which our trainer class skips for a split that already holds it. ORPO
(``trl.experimental.orpo``) has no such step: its constructor maps ``maybe_extract_prompt``,
``maybe_apply_chat_template`` and ``self.tokenize_row`` over the rows every time; the entry holds the rows with the
columns ``tokenize_row`` returned, and our ``tokenize_row`` hands those back (the two template maps still run). The
key: the data files' hashes, the tokenizer and chat template, the trl version, the trainer, and every key that
changes the rows or TRL's tokenization (PREFERENCE_KEYS, TRL_TOKENIZE_KEYS).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.data.formats import ROLE_ALIASES, ROLES, blank
from adapters.data.readers import iter_records, json_type
from adapters.data.rows import DataError, Problem, Record

PAIR_FIELDS = ("prompt", "chosen", "rejected")
KTO_FIELDS = ("prompt", "completion", "label")
PREFERENCE_ENCODING_VERSION = 1  # bump when what an entry holds changes: old entries are then never read
# the recipe keys that change the rows given to TRL or the data report stored with them
PREFERENCE_KEYS = (
    "trainer",
    "train_file",
    "eval_file",
    "test_file",
    "data_columns",
    "data_split",
    "data_subset",
    "skip_invalid",
    "dedup",
    "max_length",
    "length_bias_threshold",
)
# the trainer config keys TRL's _prepare_dataset reads (DPO: the keep_start filter; KTO: the filter, and the KL
# completions rotated within a batch when the loss estimates KL)
TRL_TOKENIZE_KEYS = {
    "dpo": ("max_length", "truncation_mode"),
    "kto": ("max_length", "per_device_train_batch_size", "loss_type"),
    "orpo": ("max_length", "max_completion_length", "padding_value"),
}
# the columns TRL's _prepare_dataset adds: a dataset that has them is TRL's output (from the cache), not tokenized again
TOKENIZED_COLUMNS = {
    "dpo": ("prompt_ids", "chosen_ids", "rejected_ids"),
    "kto": ("prompt_ids", "completion_ids"),
    "orpo": tuple(
        f"{side}{k}"
        for side in ("chosen_", "rejected_", "prompt_")
        for k in ("input_ids", "attention_mask", "labels")
        if not (side == "prompt_" and k == "labels")
    ),
}
LENGTH_BIAS_FIX = (
    "balance the pairs' lengths, or use a length-normalised loss (loss_type: [sigmoid_norm]) or LD-DPO (ld_alpha < 1)"
)


@dataclass
class PreferenceRow:
    """One pair (``chosen``/``rejected``) or one KTO row (``completion``/``label``); every part a message list."""

    file: str
    line: int
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]] | None = None
    rejected: list[dict[str, str]] | None = None
    completion: list[dict[str, str]] | None = None
    label: bool | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def paired(self) -> bool:
        return self.chosen is not None

    def prompt_text(self) -> str:
        return "\n".join(m["content"] for m in self.prompt)

    def answer_text(self, which: str) -> str:
        return "\n".join(m["content"] for m in getattr(self, which) or [])

    def trl(self) -> dict[str, Any]:
        """The row in TRL's conversational format."""
        if self.paired:
            return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        return {"prompt": self.prompt, "completion": self.completion, "label": self.label}

    def unpaired(self) -> list[PreferenceRow]:
        """KTO's rows from a pair: chosen desirable, rejected undesirable."""
        if not self.paired:
            return [self]
        return [
            PreferenceRow(self.file, self.line, self.prompt, completion=self.chosen, label=True),
            PreferenceRow(self.file, self.line, self.prompt, completion=self.rejected, label=False),
        ]


def is_preference_record(obj: dict[str, Any]) -> bool:
    """A row of a preference source (a pair, or a KTO row with a label)."""
    return "chosen" in obj or "rejected" in obj or "label" in obj


# ---------------------------------------------------------------------------------------------------- one row
def _messages(value: Any, key: str, role: str, problems: list[tuple[str, str]]) -> list[dict[str, str]] | None:
    """A string (one ``role`` turn) or a list of {role, content} turns; problems are listed under ``key``."""
    if isinstance(value, str):
        why = blank(value)
        if why:
            problems.append((key, f"{why} (an empty {'answer' if role == 'assistant' else 'prompt'})"))
            return None
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        problems.append((key, f"expected a string or a list of messages, got {json_type(value)}"))
        return None
    if not value:
        problems.append((key, "an empty list of messages"))
        return None
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            problems.append((f"{key}[{i}]", f"expected a message object, got {json_type(m)}"))
            return None
        r, c = m.get("role", m.get("from")), m.get("content", m.get("value"))
        r = ROLE_ALIASES.get(r, r)
        if r not in ROLES:
            problems.append((f"{key}[{i}].role", f"expected system, user or assistant, got {r!r}"))
            return None
        if not isinstance(c, str) or blank(c):
            what = "an empty answer" if r == "assistant" else "empty content"
            problems.append((f"{key}[{i}].content", f"missing or empty ({what})"))
            return None
        out.append({"role": r, "content": c})
    return out


def _same(a: list[dict[str, str]], b: list[dict[str, str]]) -> bool:
    norm = [(m["role"], " ".join(m["content"].split())) for m in a]
    return norm == [(m["role"], " ".join(m["content"].split())) for m in b]


def _split_implicit(
    chosen: list[dict[str, str]], rejected: list[dict[str, str]], problems: list[tuple[str, str]]
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]] | None:
    """Whole conversations without a ``prompt``: the prompt is every turn before the last assistant turn, and must
    be the same in both."""
    for key, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            problems.append((key, "the conversation does not end with an assistant answer"))
            return None
        if len(conv) < 2:
            problems.append((key, "no prompt: give a 'prompt' field, or the user turn(s) before the answer"))
            return None
    if not _same(chosen[:-1], rejected[:-1]):
        turn = next((i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if not _same([a], [b])), None)
        at = f" (turn {turn})" if turn is not None else f" ({len(chosen) - 1} vs {len(rejected) - 1} turns)"
        problems.append(("rejected", f"its prompt differs from chosen's{at}: a pair answers one prompt"))
        return None
    return chosen[:-1], chosen[-1:], rejected[-1:]


def normalise_preference(obj: dict[str, Any], columns: dict[str, str] | None = None):
    """(PreferenceRow fields or None, [(field, message)]) for one raw object."""
    if columns:
        obj = {**obj, **{ours: obj[theirs] for ours, theirs in columns.items() if theirs in obj}}
    problems: list[tuple[str, str]] = []
    if "label" in obj or ("completion" in obj and "chosen" not in obj):
        return _kto_row(obj, problems), problems
    missing = [k for k in ("chosen", "rejected") if k not in obj or obj[k] is None]
    for k in missing:
        problems.append((k, "missing (a preference pair needs chosen and rejected)"))
    if missing:
        return None, problems
    if "prompt" in obj and obj["prompt"] is not None:
        prompt = _messages(obj["prompt"], "prompt", "user", problems)
        chosen = _messages(obj["chosen"], "chosen", "assistant", problems)
        rejected = _messages(obj["rejected"], "rejected", "assistant", problems)
        if problems or prompt is None or chosen is None or rejected is None:
            return None, problems
    else:
        chosen = _messages(obj["chosen"], "chosen", "assistant", problems)
        rejected = _messages(obj["rejected"], "rejected", "assistant", problems)
        if problems or chosen is None or rejected is None:
            return None, problems
        if isinstance(obj["chosen"], str) or isinstance(obj["rejected"], str):
            problems.append(("prompt", "missing (string answers need a prompt field)"))
            return None, problems
        split = _split_implicit(chosen, rejected, problems)
        if split is None:
            return None, problems
        prompt, chosen, rejected = split
    if _same(chosen, rejected):
        problems.append(("rejected", "identical to chosen: the pair teaches nothing"))
        return None, problems
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, problems


def _kto_row(obj: dict[str, Any], problems: list[tuple[str, str]]):
    for k in KTO_FIELDS:
        if k not in obj or obj[k] is None:
            problems.append((k, "missing (a KTO row needs prompt, completion and label)"))
    if problems:
        return None
    label = obj["label"]
    if not isinstance(label, bool):
        problems.append(("label", f"expected true or false (a JSON boolean), got {label!r} ({json_type(label)})"))
    prompt = _messages(obj["prompt"], "prompt", "user", problems)
    completion = _messages(obj["completion"], "completion", "assistant", problems)
    if problems:
        return None
    return {"prompt": prompt, "completion": completion, "label": label}


# ---------------------------------------------------------------------------------------------------- sources
@dataclass
class PreferenceScan:
    rows: list[PreferenceRow] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    bad: list[Record] = field(default_factory=list)
    records: int = 0


def scan_preference(
    path: str | Path, columns: dict[str, str] | None = None, split: str | None = None, subset: str | None = None
) -> PreferenceScan:
    """Every row of a preference source, with every problem located ``file:line: field: message``."""
    out = PreferenceScan()
    for rec in iter_records(path, split, subset):
        out.records += 1
        if rec.obj is not None:
            fields, probs = normalise_preference(rec.obj, columns)
            rec.problems += [Problem(rec.file, rec.line, f, m) for f, m in probs]
        if rec.problems:
            out.problems += rec.problems
            out.bad.append(rec)
            continue
        out.rows.append(PreferenceRow(rec.file, rec.line, **fields))
    if not out.records:
        out.problems.append(Problem(str(path), None, None, "no rows"))
    return out


def sniff_preference(path: str | Path) -> bool:
    """The first parsable row of a source is a preference row (for ``adapters data check``)."""
    try:
        for rec in iter_records(path):
            if rec.obj is not None:
                return is_preference_record(rec.obj)
    except (OSError, DataError):
        return False
    return False


def read_preference(path: str | Path, recipe, quarantine: list[Record] | None = None) -> list[PreferenceRow]:
    """The rows of one source; the first problem raises (with how many more) unless ``skip_invalid``, which keeps
    the bad records in ``quarantine``."""
    s = scan_preference(path, recipe.data_columns, recipe.data_split, recipe.data_subset)
    whole = [p for p in s.problems if p.line is None]
    if whole or (s.problems and not recipe.skip_invalid):
        more = (
            f" (and {len(s.problems) - 1} more problem(s); run `adapters data check {path}`)"
            if len(s.problems) > 1
            else ""
        )
        raise DataError(f"{(whole or s.problems)[0]}{more}")
    if quarantine is not None:
        quarantine += s.bad
    return s.rows


def for_trainer(rows: list[PreferenceRow], trainer: str, source: str) -> list[PreferenceRow]:
    """DPO / ORPO need pairs; KTO takes labelled rows and unpairs pairs."""
    if trainer == "kto":
        return [r for row in rows for r in row.unpaired()]
    lone = next((r for r in rows if not r.paired), None)
    if lone is not None:
        raise DataError(
            f"{lone.where}: chosen: missing: trainer {trainer} trains on chosen/rejected pairs; a prompt/completion/"
            f"label row is for trainer kto ({source})"
        )
    return rows


# ---------------------------------------------------------------------------------------------------- tokens, audit
def _render(tok, messages: list[dict[str, str]], generation: bool) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    return tok(text, add_special_tokens=False)["input_ids"]


def token_lengths(tok, row: PreferenceRow) -> dict[str, int]:
    """Prompt tokens (with the generation prompt) and each answer's tokens as TRL counts them: the whole
    conversation rendered minus the prompt."""
    p = len(_render(tok, row.prompt, True))
    out = {"prompt": p}
    for which in ("chosen", "rejected", "completion"):
        msgs = getattr(row, which)
        if msgs is not None:
            out[which] = max(len(_render(tok, row.prompt + msgs, False)) - p, 0)
    return out


def _mean(xs: list[int]) -> float:
    return round(sum(xs) / len(xs), 2) if xs else 0.0


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def audit_preference(
    tok, rows: list[PreferenceRow], max_length: int, held_out: list[PreferenceRow], length_bias: float
) -> tuple[dict[str, Any], list[Problem], list[PreferenceRow]]:
    """(audit, problems of rows whose prompt alone fills max_length, rows kept). Truncated answers are counted,
    not dropped: TRL cuts the sequence at max_length (keep_start)."""
    kept, problems = [], []
    lengths: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": [], "completion": []}
    truncated = {"chosen": 0, "rejected": 0, "completion": 0}
    for row in rows:
        n = token_lengths(tok, row)
        if n["prompt"] >= max_length:
            problems.append(
                Problem(
                    row.file,
                    row.line,
                    "prompt",
                    f"the prompt alone is {n['prompt']} tokens and fills max_length {max_length}: no answer token "
                    "would be trained (raise max_length or shorten the prompt)",
                )
            )
            continue
        kept.append(row)
        for k, v in n.items():
            lengths[k].append(v)
            if k != "prompt" and n["prompt"] + v > max_length:
                truncated[k] += 1
    held = {_norm(r.prompt_text()) for r in held_out}
    overlap = sum(_norm(r.prompt_text()) in held for r in kept)
    mean_c, mean_r = _mean(lengths["chosen"]), _mean(lengths["rejected"])
    audit: dict[str, Any] = {
        "rows": len(rows),
        "kept": len(kept),
        "prompt_fills_max_length": len(problems),
        "tokens": sum(sum(v) for v in lengths.values()),
        "mean_prompt_tokens": _mean(lengths["prompt"]),
        "truncated": {k: v for k, v in truncated.items() if lengths[k]},
        "prompt_overlap_held_out": overlap,
    }
    flags = []
    if lengths["chosen"]:
        ratio = round(mean_c / mean_r, 4) if mean_r else None
        audit["length"] = {"mean_chosen_tokens": mean_c, "mean_rejected_tokens": mean_r, "ratio": ratio}
        if ratio is not None and abs(ratio - 1.0) > length_bias:
            flags.append(
                {
                    "name": "length_bias",
                    "ratio": ratio,
                    "threshold": length_bias,
                    "message": f"length bias: chosen answers average {mean_c:.1f} tokens, rejected {mean_r:.1f} "
                    f"({ratio:.2f}x, over the {length_bias:.0%} threshold): DPO learns to prefer "
                    f"{'longer' if ratio > 1 else 'shorter'} answers; {LENGTH_BIAS_FIX}",
                }
            )
    else:
        audit["length"] = {"mean_completion_tokens": _mean(lengths["completion"])}
        labels = [r.label for r in kept]
        audit["labels"] = {"desirable": sum(labels), "undesirable": len(labels) - sum(labels)}
    if overlap:
        flags.append(
            {
                "name": "held_out_overlap",
                "rows": overlap,
                "message": f"{overlap} training prompt(s) also appear in the held-out split: its preference accuracy "
                "then measures memory, not generalisation; split by prompt (or by record)",
            }
        )
    audit["flags"] = flags
    return audit, problems, kept


def dedup_pairs(rows: list[PreferenceRow]) -> tuple[list[PreferenceRow], int]:
    """Exact duplicate rows (same prompt and answers, whitespace and case aside) removed; the first is kept."""
    seen, out = set(), []
    for r in rows:
        key = json.dumps(
            [
                _norm(r.prompt_text()),
                r.trl().get("chosen") and _norm(r.answer_text("chosen")),
                r.trl().get("rejected") and _norm(r.answer_text("rejected")),
                r.completion and _norm(r.answer_text("completion")),
                r.label,
            ]
        )
        if key in seen:
            continue
        seen.add(key)
        out.append(r)
    return out, len(rows) - len(out)


def to_trl_dataset(rows: list[PreferenceRow]):
    from datasets import Dataset

    return Dataset.from_list([r.trl() for r in rows])


# ---------------------------------------------------------------------------------------------------- the cache
def preference_cache_key(recipe, tok) -> dict[str, Any]:
    """Everything the key of a preference entry is made of, and the key (``key``)."""
    import hashlib

    import trl

    from adapters.data import cache
    from adapters.utils.hashing import chat_template_sha256

    files = [p for p in (recipe.train_file, recipe.eval_file, recipe.test_file) if p]
    keys = PREFERENCE_KEYS + TRL_TOKENIZE_KEYS.get(recipe.trainer, ())
    parts = {
        "version": PREFERENCE_ENCODING_VERSION,
        "format": "preference",
        "trl": trl.__version__,
        "files": {p: cache.file_hash(p, recipe) for p in sorted(set(files))},
        "tokenizer": cache.tokenizer_sha256(tok),
        "chat_template": chat_template_sha256(tok),
        "keys": {k: getattr(recipe, k, None) for k in keys},
    }
    parts["key"] = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return parts


def cache_plan(recipe, tok, say=print, write: bool = True) -> dict[str, Any]:
    """The ``encoding`` record of a preference run: the entry's folder and key, and whether it is used (a hit:
    complete and verified). The main process decides and the others follow (broadcast), so that all of them either
    run TRL's tokenization (with its barriers) or none does."""
    from accelerate import PartialState

    from adapters.data import cache

    key = preference_cache_key(recipe, tok)["key"]
    folder = cache.cache_dir(recipe, key)
    state = PartialState()
    hit = False
    if state.is_main_process:
        hit = cache.complete(folder)
        if hit and (damage := cache.verify(folder)):  # checked before use: sizes and digests recorded when written
            hit = False
            where = f"moved aside to {cache.set_aside(folder)}" if write else "not used"
            say(f"[data] warning: encoded cache entry damaged: {damage}; {where}; rebuilding it")
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        hit = broadcast_object_list([hit])[0]
    return {"cache": str(folder), "cache_hit": hit, "key": key}


def store_tokenized(
    encoding: dict[str, Any], splits: dict[str, Any], report: dict[str, Any], run_dir: Path, recipe, say=print
) -> bool:
    """After TRL tokenized a run's splits (a miss): the entry ``encoding['cache']`` = each split as TRL returned it,
    the data report and the run's quarantine, sealed, published whole (staged, renamed). False when nothing to
    store."""
    from adapters.data import cache
    from adapters.utils.atomic import staged_dir, write_json

    if not encoding.get("cache") or encoding.get("cache_hit") or "train" not in splits:
        return False
    folder = Path(encoding["cache"])
    with staged_dir(folder, unique=True) as tmp:
        for name, ds in splits.items():
            ds.save_to_disk(str(tmp / name))
        q = Path(recipe.quarantine_file or Path(run_dir) / "quarantine.jsonl")
        if _set_aside(report) and q.is_file():  # the rows this start set aside (skip_invalid)
            import shutil

            shutil.copyfile(q, tmp / "quarantine.jsonl")
        write_json(tmp / "report.json", {k: v for k, v in report.items() if k != "encoding"})  # last: complete
        cache.seal(tmp)
    say(f"[data] encoded cache: {' and '.join(splits)} as TRL prepared them, stored in {folder}")
    return True


def _set_aside(report: dict[str, Any]) -> int:
    """How many rows the stage set aside (skip_invalid): invalid rows and prompts that fill max_length."""
    audits = [report.get(k) or {} for k in ("train", "eval")]
    return int(report.get("invalid_rows") or 0) + sum(int(a.get("prompt_fills_max_length") or 0) for a in audits)


def _from_cache(recipe, encoding: dict[str, Any], run_dir: Path | None, say, write: bool):
    """A hit: the data report and TRL's tokenized splits from the entry; nothing is read, audited or tokenized."""
    from datasets import load_from_disk

    folder = Path(encoding["cache"])
    say(f"[data] encoded cache hit: {folder}")
    report = json.loads((folder / "report.json").read_text())
    for line in format_preference_audit(report["train"], "train"):
        say(line)
    for f in report["train"].get("flags") or []:
        say(f"[warn] {f['message']}")
    if run_dir is not None and write:
        from adapters.utils.atomic import write_json

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(run_dir) / "data_audit.json", report)
        if _set_aside(report) and (folder / "quarantine.jsonl").is_file():
            import shutil

            q = Path(recipe.quarantine_file or Path(run_dir) / "quarantine.jsonl")
            shutil.copyfile(folder / "quarantine.jsonl", q)
            say(f"[data] {_set_aside(report)} invalid row(s) set aside ({q})")
    report["encoding"] = encoding
    train = _on_disk(load_from_disk(str(folder / "train")), run_dir, "train", write)
    evals = (
        _on_disk(load_from_disk(str(folder / "eval")), run_dir, "eval", write) if (folder / "eval").is_dir() else None
    )
    return train, evals, report


# ---------------------------------------------------------------------------------------------------- the stage
def prepare_preference(recipe, tok, run_dir: Path | None, say=print, write: bool = True):
    """Read, validate, dedup, audit the recipe's preference splits. Returns (train Dataset, eval Dataset or None,
    the data report). Stops with a DataError (``file:line: field: message``) on the first bad row unless
    skip_invalid; rows whose prompt fills max_length are such problems too. With a hit in the encoded-data cache
    the report and TRL's tokenized splits come from there (``report['encoding']``)."""
    from adapters.data.arrow import default_num_proc
    from adapters.data.validate import write_quarantine
    from adapters.utils.hashing import file_sha256

    encoding = cache_plan(recipe, tok, say, write)
    if encoding["cache_hit"]:
        train_ds, eval_ds, report = _from_cache(recipe, encoding, run_dir, say, write)
        encoding["num_proc"] = default_num_proc(len(train_ds) + len(eval_ds or []), recipe.dataset_num_proc)
        return train_ds, eval_ds, report
    bad: list[Record] = []
    train = read_preference(recipe.train_file, recipe, bad)
    evals = read_preference(recipe.eval_file, recipe, bad) if recipe.eval_file else []
    test = read_preference(recipe.test_file, recipe, bad) if recipe.test_file else []
    train = for_trainer(train, recipe.trainer, recipe.train_file)
    evals = for_trainer(evals, recipe.trainer, recipe.eval_file or "")
    report: dict[str, Any] = {"format": "preference", "trainer": recipe.trainer}
    duplicates = 0
    if recipe.dedup:
        train, duplicates = dedup_pairs(train)
    train_audit, problems, train = audit_preference(
        tok, train, recipe.max_length, test + evals, recipe.length_bias_threshold
    )
    train_audit["duplicates_removed"] = duplicates
    eval_audit, eval_problems, evals = audit_preference(tok, evals, recipe.max_length, [], recipe.length_bias_threshold)
    problems += eval_problems
    if problems and not recipe.skip_invalid:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}")
    sources = []
    for split, path in (("train", recipe.train_file), ("eval", recipe.eval_file), ("test", recipe.test_file)):
        if path and Path(path).is_file():
            sources.append({"split": split, "file": path, "sha256": file_sha256(path)})
    report.update({"sources": sources, "train": train_audit, "eval": eval_audit, "invalid_rows": len(bad)})
    report["test"] = {"file": recipe.test_file, "rows": len(test)}
    for line in format_preference_audit(train_audit, "train"):
        say(line)
    for f in train_audit["flags"]:
        say(f"[warn] {f['message']}")
    if run_dir is not None and write:
        from adapters.utils.atomic import write_json

        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "data_audit.json", report)
        if bad or problems:
            q = Path(recipe.quarantine_file or run_dir / "quarantine.jsonl")
            write_quarantine(bad, q)
            say(f"[data] {len(bad) + len(problems)} invalid row(s) set aside ({q})")
    if not train:
        raise DataError(f"{recipe.train_file}: no valid preference rows left to train on")
    # TRL's dataset map runs with this many processes (SFT's rule: dataset_num_proc, else the cores from
    # PARALLEL_MIN_ROWS rows on)
    encoding["num_proc"] = default_num_proc(len(train) + len(evals), recipe.dataset_num_proc)
    report["encoding"] = encoding
    return (
        _on_disk(to_trl_dataset(train), run_dir, "train", write),
        (_on_disk(to_trl_dataset(evals), run_dir, "eval", write) if evals else None),
        report,
    )


def _on_disk(ds, run_dir: Path | None, split: str, write: bool):
    """The split as a Dataset saved in the run folder (``preference_data/<split>``) and read back, so it has cache
    files in a folder every process shares: TRL's precomputed reference log-probs are written next to them by one
    process and read by all (an in-memory dataset's cache lands in each process's own temporary folder)."""
    from accelerate import PartialState
    from datasets import load_from_disk

    if run_dir is None:
        return ds
    out = Path(run_dir) / "preference_data" / split
    if write:
        import shutil

        shutil.rmtree(out, ignore_errors=True)  # rewritten each start: the rows of this run's files
        ds.save_to_disk(str(out))
    PartialState().wait_for_everyone()
    return load_from_disk(str(out))


def format_preference_audit(a: dict[str, Any], name: str) -> list[str]:
    out = [
        f"[data] {name}: {a['kept']} of {a['rows']} row(s) kept, {a['tokens']} tokens, "
        f"{a.get('duplicates_removed', 0)} duplicate(s) removed, {a['prompt_fills_max_length']} prompt(s) filling "
        f"max_length, truncated {json.dumps(a['truncated'])}, {a['prompt_overlap_held_out']} prompt(s) also held out"
    ]
    length = a.get("length") or {}
    if "ratio" in length:
        out.append(
            f"[data] {name}: mean answer tokens chosen {length['mean_chosen_tokens']} vs rejected "
            f"{length['mean_rejected_tokens']} (ratio {length['ratio']})"
        )
    return out


def check_preference_files(paths: list[str], columns: dict[str, str] | None = None):
    """``adapters data check`` for preference sources: (problems, rows read, valid rows)."""
    problems, rows, valid = [], 0, 0
    for p in paths:
        s = scan_preference(p, columns)
        problems += s.problems
        rows += s.records
        valid += len(s.rows)
    return problems, rows, valid


def probe_rows(tok, dataset, n: int = 4):
    """The first ``n`` rows as Encoded (prompt + chosen answer, loss on the answer): the quantization probe's task
    batch for a preference run."""
    from adapters.data.rows import IGNORE_INDEX, Encoded

    out = []
    for row in dataset.select(range(min(n, len(dataset)))):
        answer = row.get("chosen") or row.get("completion")
        p = _render(tok, row["prompt"], True)
        full = _render(tok, row["prompt"] + answer, False)
        out.append(Encoded(full, [IGNORE_INDEX] * len(p) + full[len(p) :], "probe"))
    return out


def task_rows(path: str | Path, recipe) -> list:
    """The rows of a held-out file as SFT rows (``data.rows.Row``): for a preference recipe each pair's prompt and
    chosen answer (what merge and export verify the model against), else the file's own rows (as merge and export
    have always read them)."""
    from adapters.data.rows import Row
    from adapters.data.validate import read_rows

    if not getattr(recipe, "preference", False):
        return read_rows(path)
    out = []
    for r in read_preference(path, recipe):
        answer = r.chosen if r.paired else r.completion
        if r.paired or r.label:
            out.append(Row(r.file, r.line, r.prompt + answer))
    return out
