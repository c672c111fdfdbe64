"""Evaluate a run: base vs tuned on the held-out split, forgetting probe, flags -> eval.json, report.md, plots."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from adapters.data.encode import prompts_and_answers
from adapters.data.validate import read_rows
from adapters.evaluation import metrics as M
from adapters.evaluation.forgetting import probe
from adapters.evaluation.generation import answer_budget, generate_answers, single_line
from adapters.evaluation.plots import plot_confusion, plot_curves, plot_task_metrics
from adapters.evaluation.report import write_report
from adapters.utils.atomic import write_json


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
    if getattr(recipe, "preference", False):  # held-out pairs: base / start / tuned (evaluation/preference.py)
        from adapters.evaluation.preference import evaluate_preference

        evaluation["preference"] = evaluate_preference(model, tok, recipe, base=base, limit=limit, log=log)
        rows = []
    else:
        rows = read_rows(recipe.test_file, recipe.data_format, recipe.data_columns) if recipe.test_file else []
    if limit is not None:
        rows = rows[:limit]
    conversations, references = prompts_and_answers(rows)
    labels = recipe.labels or M.answer_classes(references)  # few distinct answers: a classification report too
    if labels:
        evaluation["labels"] = {"classes": list(labels), "from": "labels key" if recipe.labels else "held-out answers"}
    preds: dict[str, list[str]] = {}
    if references:
        budget = recipe.eval_max_new_tokens or answer_budget(tok, references)
        evaluation["max_new_tokens"] = budget
        one_line = single_line(references)  # then only the first line is scored: generation stops at a newline
        evaluation["scored_first_line"] = one_line
        for side in (["base"] if base else []) + ["tuned"]:
            ctx = model.disable_adapter() if side == "base" else nullcontext()
            with ctx:
                preds[side] = generate_answers(
                    model, tok, conversations, budget, recipe.eval_generation_batch_size, f"{side} model", one_line
                )
            scores = M.task_scores(preds[side], references, labels, recipe.rouge_l)
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
    manifest = _manifest(run_dir)  # the base's file hash (probe cache) and the data audit's warnings
    evaluation["forgetting"] = probe(model, tok, recipe, base=has_adapter, log=log, manifest=manifest)
    evaluation["forgetting"]["base_kl_weight"] = recipe.base_kl_weight  # the guard it was trained with

    flags = [
        M.negative_transfer(evaluation.get("base"), evaluation.get("tuned"), M.primary_metric(recipe.labels)),
        M.overfitting(log_history or [], recipe.overfit_window),
        M.forgetting_flag(evaluation["forgetting"], recipe.forgetting_threshold, M.forgetting_advice(recipe)),
        M.collapse(preds["tuned"], references) if "tuned" in preds else None,
        *_audit_warnings(manifest),
    ]
    flags += evaluation.get("preference", {}).pop("flags", [])
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
    if evaluation.get("preference", {}).get("n"):
        from adapters.evaluation.preference import plot_preference

        if plot_preference(evaluation["preference"], run_dir / "preference.png"):
            plots["preference (held-out pairs)"] = "preference.png"
    evaluation["plots"] = plots
    write_json(run_dir / "eval.json", evaluation)
    report = write_report(evaluation, run_dir, run_dir.name)
    log(f"[eval] wrote {run_dir / 'eval.json'} and {report}")
    return evaluation


def _manifest(run_dir: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads((run_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _audit_warnings(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The data audit's warnings recorded in the run's manifest (``few_trained_tokens``), as flags."""
    return list(((manifest.get("data") or {}).get("audit") or {}).get("warnings") or [])


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

    from adapters.publish.hub import resolve_adapter
    from adapters.publish.rundir import load_tuned

    run = resolve_adapter(run_dir)  # a run directory, an adapter folder or a hub id
    recipe = run.recipe if probe_file is None else dataclasses.replace(run.recipe, forgetting_probe=probe_file)
    if probe_file is not None:
        from adapters.evaluation.forgetting import probe_passages

        probe_passages(probe_file)  # a missing or empty file fails here, before the model is loaded
    if not probe_only:  # eval.json and report.md go into the run: a read-only run is refused before the work
        from adapters.utils.atomic import check_room

        check_room(run.path / "eval.json", hint="copy the run to a writable place and evaluate it there")
    model, tok = load_tuned(run, quantize=True)
    if probe_only:
        fg = probe(model, tok, recipe, log=log, manifest=run.manifest)
        flag = M.forgetting_flag(fg, recipe.forgetting_threshold, M.forgetting_advice(recipe))
        if flag:
            log(f"[warn] {flag['message']}")
        return {"forgetting": fg, "flags": [flag] if flag else []}
    return evaluate_model(
        model, tok, recipe, run.path, run.manifest.get("log_history") or [], base=base, limit=limit, log=log
    )
