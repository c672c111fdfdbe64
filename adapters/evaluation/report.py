"""`adapters eval RUN_DIR`: base vs tuned on the held-out split, forgetting probe, flags, eval.json + report.md.

It also runs at the end of `train` (recipe key ``eval_after_train``). The base model is the tuned PeftModel with its
adapter disabled, so one model in memory answers both sides.

eval.json::

    {"base": {"exact_match", "n", "samples", ...}, "tuned": {...}, "max_new_tokens",
     "forgetting": {"probe", "ppl_base", "ppl_tuned", "rise", ...}, "flags": [{"name", "message", ...}], "plots"}
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from adapters.data.encode import prompts_and_answers, read_rows
from adapters.evaluation import metrics as M
from adapters.evaluation.forgetting import probe
from adapters.evaluation.generation import answer_budget, generate_answers
from adapters.utils.provenance import write_json


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------------- plots
def plot_task_metrics(evaluation: dict[str, Any], path: Path) -> Path | None:
    keys = [k for k in ("exact_match", "accuracy", "macro_f1", "rouge_l") if k in evaluation.get("tuned", {})]
    if not keys:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    width = 0.38
    for i, side in enumerate(s for s in ("base", "tuned") if s in evaluation):
        vals = [evaluation[side].get(k, 0.0) for k in keys]
        xs = [j + (i - 0.5) * width for j in range(len(keys))]
        bars = ax.bar(xs, vals, width, label=side)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylim(0, 1.1)
    ax.set_title(f"held-out task metrics (n={evaluation['tuned']['n']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(scores: dict[str, Any], path: Path, title: str) -> Path:
    plt = _plt()
    classes, cm = scores["classes"], scores["confusion"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(classes), 1.0 + 0.6 * len(classes)), dpi=110)
    ax.imshow(cm, cmap="Blues")
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(log_history: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Training and validation loss in one figure (the overfitting check reads the same two curves)."""
    train, val = M.loss_curves(log_history)
    if not train and not val:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", marker=".")
    if val:
        ax.plot(*zip(*val), label="validation loss", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------- report.md
def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:200]


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("–" if v is None else str(v))


def write_report(evaluation: dict[str, Any], run_dir: Path, title: str) -> Path:
    lines = [f"# Evaluation: {title}", ""]
    sides = [s for s in ("base", "tuned") if s in evaluation]
    if sides:
        lines += [
            f"## Task metrics (held-out split, n={evaluation[sides[-1]]['n']}, greedy, "
            f"max_new_tokens={evaluation.get('max_new_tokens')})",
            "",
        ]
        keys = [k for k in ("exact_match", "accuracy", "macro_f1", "rouge_l") if k in evaluation[sides[-1]]]
        lines += ["| metric | " + " | ".join(sides) + " |", "|---|" + "---|" * len(sides)]
        lines += [f"| {k} | " + " | ".join(_fmt(evaluation[s].get(k)) for s in sides) + " |" for k in keys]
        lines.append("")
        for s in sides:
            pc = evaluation[s].get("per_class")
            if pc:
                lines += [
                    f"Per class ({s}):",
                    "",
                    "| label | precision | recall | F1 | support |",
                    "|---|---|---|---|---|",
                ]
                lines += [
                    f"| {_cell(k)} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |"
                    for k, v in pc.items()
                ]
                lines.append("")
    fg = evaluation.get("forgetting")
    if fg:
        rise = "–" if fg.get("rise") is None else f"{fg['rise']:+.2%}"
        lines += [
            "## Forgetting probe",
            "",
            f"Perplexity on general text not in the task data ({fg['probe']}, {fg['tokens']} tokens):",
            "",
            "| base | tuned | rise |",
            "|---|---|---|",
            f"| {_fmt(fg.get('ppl_base'))} | {_fmt(fg.get('ppl_tuned'))} | {rise} |",
            "",
        ]
        w = fg.get("base_kl_weight")
        if w is not None:
            lines += [
                f"Trained with `base_kl_weight: {w}`"
                + (
                    " (Learning without Forgetting: KL to the base at unlabelled positions was part of the loss)."
                    if w
                    else " (no forgetting guard in the loss)."
                ),
                "",
            ]
    lines += ["## Flags", ""]
    flags = evaluation.get("flags") or []
    lines += [f"- **{f['name']}**: {f['message']}" for f in flags] or [
        "None: no negative transfer, overfitting or forgetting above the threshold."
    ]
    lines.append("")
    plots = evaluation.get("plots") or {}
    if plots:
        lines += ["## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()] + [""]
    samples = evaluation.get("sample_rows") or []
    if samples:
        lines += ["## Sample outputs", "", "| prompt | expected | base | tuned |", "|---|---|---|---|"]
        lines += [
            f"| {_cell(r['prompt'])} | {_cell(r['expected'])} | {_cell(r.get('base', '–'))} | "
            f"{_cell(r.get('tuned', '–'))} |"
            for r in samples
        ]
        lines.append("")
    out = run_dir / "report.md"
    tmp = out.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(out)
    return out


# ---------------------------------------------------------------------------------------------------- evaluate
def evaluate_model(
    model,
    tok,
    recipe,
    run_dir: str | Path,
    log_history: list[dict[str, Any]] | None = None,
    base: bool = True,
    limit: int | None = None,
    log=print,
) -> dict[str, Any]:
    """Score ``model`` (a PeftModel; its base = adapter disabled) and write eval.json, report.md and the PNGs."""
    run_dir = Path(run_dir)
    limit = limit if limit is not None else recipe.eval_limit
    evaluation: dict[str, Any] = {}
    has_adapter = hasattr(model, "disable_adapter")
    base = base and has_adapter
    rows = read_rows(recipe.test_file, recipe.data_format, recipe.data_columns) if recipe.test_file else []
    if limit is not None:
        rows = rows[:limit]
    conversations, references = prompts_and_answers(rows)
    preds: dict[str, list[str]] = {}
    if references:
        budget = recipe.eval_max_new_tokens or answer_budget(tok, references)
        evaluation["max_new_tokens"] = budget
        for side in (["base"] if base else []) + ["tuned"]:
            ctx = model.disable_adapter() if side == "base" else nullcontext()
            with ctx:
                preds[side] = generate_answers(
                    model, tok, conversations, budget, recipe.eval_generation_batch_size, f"{side} model"
                )
            scores = M.task_scores(preds[side], references, recipe.labels, recipe.rouge_l)
            scores["samples"] = [{"expected": r, "got": p} for p, r in list(zip(preds[side], references))[:5]]
            evaluation[side] = scores
            log(
                f"[eval] {side} model on {len(references)} held-out rows: "
                + ", ".join(
                    f"{k} {scores[k]:.3f}" for k in ("exact_match", "accuracy", "macro_f1", "rouge_l") if k in scores
                )
            )
        evaluation["sample_rows"] = [
            {"prompt": c[-1]["content"] if c else "", "expected": r, **{s: preds[s][i] for s in preds}}
            for i, (c, r) in enumerate(zip(conversations, references))
            if i < recipe.eval_samples
        ]
    evaluation["forgetting"] = probe(model, tok, recipe, base=has_adapter, log=log)
    evaluation["forgetting"]["base_kl_weight"] = recipe.base_kl_weight  # the guard it was trained with

    flags = [
        M.negative_transfer(evaluation.get("base"), evaluation.get("tuned"), M.primary_metric(recipe.labels)),
        M.overfitting(log_history or [], recipe.overfit_window),
        M.forgetting_flag(evaluation["forgetting"], recipe.forgetting_threshold),
    ]
    evaluation["flags"] = [f for f in flags if f]
    for f in evaluation["flags"]:
        log(f"[warn] {f['message']}")

    plots: dict[str, str] = {}
    if plot_task_metrics(evaluation, run_dir / "task_metrics.png"):
        plots["task metrics"] = "task_metrics.png"
    if plot_curves(log_history or [], run_dir / "curves.png", title=f"{run_dir.name}: train vs validation loss"):
        plots["train and validation loss"] = "curves.png"
    for side in ("base", "tuned"):
        if "confusion" in evaluation.get(side, {}):
            plot_confusion(evaluation[side], run_dir / f"confusion_{side}.png", f"confusion matrix ({side})")
            plots[f"confusion matrix ({side})"] = f"confusion_{side}.png"
    evaluation["plots"] = plots
    write_json(run_dir / "eval.json", evaluation)
    report = write_report(evaluation, run_dir, run_dir.name)
    log(f"[eval] wrote {run_dir / 'eval.json'} and {report}")
    return evaluation


def evaluate_run(
    run_dir: str | Path,
    base: bool = True,
    limit: int | None = None,
    log=print,
    probe_file: str | None = None,
    probe_only: bool = False,
) -> dict[str, Any]:
    """Load a finished run (base + adapter, identity-checked) and evaluate it.

    ``probe_file`` replaces the recipe's forgetting probe; ``probe_only`` runs just the probe and writes nothing
    (a second opinion on forgetting without touching the run's eval.json).
    """
    import dataclasses

    from adapters.publish.rundir import load_tuned, open_run

    run = open_run(run_dir)
    recipe = run.recipe if probe_file is None else dataclasses.replace(run.recipe, forgetting_probe=probe_file)
    if probe_file is not None:
        from adapters.evaluation.forgetting import probe_passages

        probe_passages(probe_file)  # a missing or empty file fails here, before the model is loaded
    model, tok = load_tuned(run, quantize=True)
    if probe_only:
        fg = probe(model, tok, recipe, log=log)
        flag = M.forgetting_flag(fg, recipe.forgetting_threshold)
        if flag:
            log(f"[warn] {flag['message']}")
        return {"forgetting": fg, "flags": [flag] if flag else []}
    return evaluate_model(
        model, tok, recipe, run.path, run.manifest.get("log_history") or [], base=base, limit=limit, log=log
    )
