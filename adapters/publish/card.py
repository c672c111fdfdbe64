"""The model card of a pushed run, built with huggingface_hub ``ModelCard`` / ``ModelCardData``.

The card is deterministic (no timestamps), so pushing the same run twice produces the same README.md and the
second push is a no-op commit. It carries the run's evidence: hyperparameters, base vs tuned scores, the
forgetting probe and merge report where they exist, and a manifest summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapters.config import library_changes

# Recipe keys shown in the card's hyperparameter table, in this order (those absent from the recipe are skipped).
HYPERPARAMETERS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "use_rslora",
    "use_dora",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "optim",
    "weight_decay",
    "max_grad_norm",
    "load_in_4bit",
    "load_in_8bit",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "dtype",
    "seed",
)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return str(v)


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _flat(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """A nested report as (dotted key, scalar) rows; long lists are summarised by their length."""
    if isinstance(d, dict):
        rows: list[tuple[str, Any]] = []
        for k, v in d.items():
            rows += _flat(v, f"{prefix}{k}.")
        return rows
    if isinstance(d, list) and (len(d) > 8 or any(isinstance(x, (dict, list)) for x in d)):
        return [(prefix.rstrip("."), f"[{len(d)} entries]")]
    return [(prefix.rstrip("."), d)]


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def eval_section(ev: dict[str, Any] | None, merge: dict[str, Any] | None) -> str:
    parts = ["## Evaluation"]
    if not ev or not any(k in ev for k in ("base", "tuned")):
        parts.append("No held-out evaluation was recorded for this run (`eval.json` is absent).")
    else:
        rows = [(k, ev[k].get("exact_match"), ev[k].get("n")) for k in ("base", "tuned") if k in ev]
        who = (
            "the base model and the tuned adapter"
            if "base" in ev and "tuned" in ev
            else ("the tuned adapter (the base was not scored)" if "tuned" in ev else "the base model")
        )
        parts.append(
            f"Held-out exact match of {who} on the same prompts "
            f"(greedy, at most {ev.get('max_new_tokens', '?')} new tokens):\n"
        )
        parts.append(_table(rows, ("model", "exact match", "n")))
        if "base" in ev and "tuned" in ev:
            d = ev["tuned"]["exact_match"] - ev["base"]["exact_match"]
            parts.append(f"\nTraining changed exact match by {d:+.3f}.")
    parts.append("\n### Forgetting probe")
    if ev and ev.get("forgetting"):
        parts.append("What training did to the model's general behaviour (from `eval.json`, `forgetting`):\n")
        parts.append(_table(_flat(ev["forgetting"]), ("measure", "value")))
    else:
        parts.append("Not measured for this run.")
    parts.append("\n### Merge report")
    if merge:
        parts.append("Merging the adapter into a full-precision base (from `merge_report.json`):\n")
        parts.append(_table(_flat(merge), ("measure", "value")))
    else:
        parts.append("This run has not been merged (`merge_report.json` is absent).")
    return "\n".join(parts)


def preference_section(m: dict[str, Any], ev: dict[str, Any] | None) -> str:
    """A preference run: the trainer, beta, loss type, reference and held-out preference accuracy before/after."""
    cfg = m.get("config", {})
    ref = m.get("reference") or {}
    rows: list[tuple[str, Any]] = [
        ("trainer", cfg.get("trainer")),
        ("beta", cfg.get("beta", 0.1)),
        ("loss type", cfg.get("loss_type") or ("kto" if cfg.get("trainer") == "kto" else "sigmoid")),
        ("reference", f"{ref.get('kind')}" + (f" ({ref['adapter']})" if ref.get("adapter") else "")),
        ("starting adapter", cfg.get("init_adapter") or "none (a new adapter on the base)"),
    ]
    p = (ev or {}).get("preference") or {}
    parts = ["## Preference training\n", _table(rows, ("field", "value"))]
    sides = [s for s in ("base", "start", "tuned") if s in p]
    if sides:
        keys = ("accuracy", "accuracy_avg", "margin", "chosen_exact_match", "mean_new_tokens")
        parts.append(
            f"\nHeld-out preference ({p.get('n')} pairs; accuracy = share with log p(chosen) > log p(rejected)):\n"
        )
        parts.append(_table([(k, *(p[s].get(k) for s in sides)) for k in keys], ("measure", *sides)))
    return "\n".join(parts)


def manifest_section(m: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = []
    base = m.get("base_model", {})
    rows.append(("base model", base.get("canonical_name")))
    if base.get("sha256"):
        rows.append(("base file sha256", base["sha256"]))
    rows.append(("base fingerprint", m.get("base_fingerprint")))
    rows.append(("template", (m.get("config") or {}).get("template")))
    rows.append(("chat template sha256", m.get("chat_template_sha256")))
    t = m.get("train", {})
    for k in ("global_step", "train_loss", "seconds", "approx_tokens_per_s"):
        if k in t:
            rows.append((f"train {k}", t[k]))
    p = m.get("parameters", {})
    if p:
        rows.append(
            ("trainable parameters", f"{p.get('trainable'):,} of {p.get('total'):,} ({p.get('trainable_pct', 0):.3f}%)")
        )
    q = m.get("quantization", {})
    if q:
        rows.append(("quantization", q.get("method")))
        for k in ("full_precision", "quantized"):
            if k in q:
                rows.append((f"probe loss ({k})", q[k].get("probe_loss")))
    rows.append(("effective batch size", m.get("effective_batch_size")))
    rows.append(("world size", m.get("world_size")))
    for k, v in (m.get("versions") or {}).items():
        if v:
            rows.append((k, v))
    hw = m.get("hardware", {})
    gpus = ", ".join(g["name"] for g in hw.get("gpus", []))
    rows.append(("hardware", gpus or f"CPU ({hw.get('cpu_count')} cores)"))
    g = m.get("git", {})
    if g.get("commit"):
        rows.append(("toolkit commit", g["commit"][:12] + (" (dirty)" if g.get("dirty") else "")))
    return "## Manifest summary\n\nThe full record is in `training_manifest.json` in this repository.\n\n" + _table(
        [r for r in rows if r[1] is not None], ("field", "value")
    )


def data_section(m: dict[str, Any], datasets: list[str]) -> str:
    rows = []
    for split in ("train", "eval", "test"):
        d = (m.get("data") or {}).get(split)
        if not isinstance(d, dict):
            continue
        rows.append(
            (
                split,
                Path(d["file"]).name if isinstance(d.get("file"), str) else "(split from train)",
                d.get("kept", d.get("rows")),
                d.get("tokens", ""),
                (d.get("sha256") or "")[:16],
            )
        )
    body = "## Training data\n\n"
    if datasets:
        body += "Data sets: " + ", ".join(f"`{d}`" for d in datasets) + ".\n\n"
    return body + _table(rows, ("split", "file", "rows", "tokens", "sha256 (first 16)"))


def usage_section(repo_id: str, base: str, merged: bool, raw: bool = False, turns: bool = False) -> str:
    if raw:  # template: raw - no chat template: the prompt is plain text, as in training
        return _raw_usage(repo_id, base, merged, turns)
    peft = f"""```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}", dtype="auto")
model = PeftModel.from_pretrained(base, "{repo_id}")
tok = AutoTokenizer.from_pretrained("{repo_id}")  # the tokenizer and chat template it was trained with
msgs = [{{"role": "user", "content": "..."}}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True).input_ids
print(tok.decode(model.generate(ids, max_new_tokens=64)[0][ids.shape[1]:], skip_special_tokens=True))
```"""
    if merged:
        return f"""## Usage

This repository holds the merged model (the adapter folded into the full-precision base):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype="auto")
tok = AutoTokenizer.from_pretrained("{repo_id}")
```

With this toolkit: `adapters eval {repo_id}` or `adapters generate {repo_id}`."""
    return f"""## Usage

With PEFT, on the base model it was trained on:

{peft}

To get a plain model without the PEFT dependency, merge it into a full-precision (not 4-bit) base:

```python
merged = model.merge_and_unload()
merged.save_pretrained("merged"); tok.save_pretrained("merged")
model = AutoModelForCausalLM.from_pretrained("merged")
```

With this toolkit, the hub id works wherever a run directory does: `adapters eval {repo_id}`,
`adapters merge {repo_id}`; the base is read from `adapter_config.json` and checked against the recorded
fingerprint in `training_manifest.json`."""


def _raw_usage(repo_id: str, base: str, merged: bool, turns: bool = False) -> str:
    load = (
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype="auto")'
        if merged
        else f'base = AutoModelForCausalLM.from_pretrained("{base}", dtype="auto")\n'
        f'model = PeftModel.from_pretrained(base, "{repo_id}")'
    )
    imports = "" if merged else "from peft import PeftModel\n"
    how, prompt = (
        (
            "prompt and answer as plain text, no chat template. A prompt that ends in a colon is answered after a "
            "space, which the model writes; any other prompt ends with a newline, which the prompt must hold. The "
            "tokenizer's saved template (`raw-turns.jinja`) renders a prompt that way",
            'msgs = [{"role": "user", "content": "..."}]  # rendered as BOS + the prompt (+ a newline where it needs one)\n'
            'ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True).input_ids',
        )
        if turns
        else (
            "prompt and answer joined as they are, no chat template. Give it the prompt exactly as the training rows "
            "wrote it",
            'ids = tok("...", return_tensors="pt").input_ids  # the prompt text; the tokenizer adds BOS',
        )
    )
    return f"""## Usage

This model was trained on plain text (`template: raw`): {how}; it continues with the answer and then EOS.

```python
{imports}from transformers import AutoModelForCausalLM, AutoTokenizer

{load}
tok = AutoTokenizer.from_pretrained("{repo_id}")
{prompt}
print(tok.decode(model.generate(ids, max_new_tokens=64)[0][ids.shape[1]:], skip_special_tokens=True))
```

With this toolkit: `adapters eval {repo_id}` or `adapters generate {repo_id}` (both use the run's raw prompts)."""


def _trained_from_turns(run_dir: Path) -> bool:
    """Whether the run's saved template is raw-turns.jinja (a raw run trained from rows written as turns)."""
    from adapters.model.loading import raw_turns, saved_template

    return raw_turns(saved_template(Path(run_dir) / "adapter"))


def _how(trainer: str | None) -> str:
    return {
        "dpo": "preference tuning (TRL `DPOTrainer`",
        "orpo": "preference tuning (TRL `ORPOTrainer`",
        "kto": "preference tuning (TRL `KTOTrainer`",
    }.get(trainer or "sft", "supervised fine-tuning (TRL `SFTTrainer`")


def build_card(
    manifest: dict[str, Any], run_dir: Path, repo_id: str, merged: bool = False, datasets: list[str] | None = None
):
    """A ``ModelCard`` for the run; ``run_dir`` supplies eval.json and merge_report.json where present."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    base = manifest["base_model"]
    cfg = manifest.get("config", {})
    ev = _read_json(run_dir / "eval.json")
    merge = _read_json(run_dir / "merge_report.json")
    datasets = list(datasets or [])
    name = repo_id.split("/")[-1]
    results = []
    pref = (ev or {}).get("preference") or {}
    if pref.get("tuned"):
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type="held-out",
                dataset_name=f"held-out preference pairs ({pref.get('n')})",
                metric_type="accuracy",
                metric_name="preference accuracy",
                metric_value=pref["tuned"]["accuracy"],
            )
        )
    if ev and "tuned" in ev:
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type="held-out",
                dataset_name=f"held-out test split ({ev['tuned'].get('n')} rows)",
                metric_type="exact_match",
                metric_name="exact match",
                metric_value=ev["tuned"]["exact_match"],
            )
        )
    data = ModelCardData(
        base_model=base["canonical_name"],
        base_model_relation="finetune" if merged else "adapter",
        library_name="transformers" if merged else "peft",
        pipeline_tag="text-generation",
        license=base.get("license") or None,
        datasets=datasets or None,
        tags=["lora", cfg.get("trainer") or "sft", "trl", "merged" if merged else "peft"],
        model_name=name if results else None,
        eval_results=results or None,
    )
    hp = [(k, cfg[k]) for k in HYPERPARAMETERS if k in cfg and cfg[k] is not None]
    hp.append(("effective batch size", manifest.get("effective_batch_size")))
    hp += [(k, v) for k, v in sorted(library_changes(cfg).items()) if k not in HYPERPARAMETERS]
    what = "the merged model" if merged else "a LoRA adapter"
    body = "\n\n".join(
        [
            f"# {name}",
            f"This is {what} for [`{base['canonical_name']}`](https://huggingface.co/{base['canonical_name']}), "
            f"trained with {_how(cfg.get('trainer'))}, PEFT LoRA) by the `adapters` toolkit "
            f"(run `{manifest.get('run_name')}`, recipe `{Path(str(manifest.get('recipe_file', ''))).name}`).",
            eval_section(ev, merge),
            *([preference_section(manifest, ev)] if cfg.get("trainer") in ("dpo", "orpo", "kto") else []),
            "## Training hyperparameters\n\n" + _table(hp, ("key", "value")),
            data_section(manifest, datasets),
            manifest_section(manifest),
            usage_section(
                repo_id,
                base["canonical_name"],
                merged,
                raw=cfg.get("template") == "raw",
                turns=_trained_from_turns(run_dir),
            ),
        ]
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")
