"""`adapters eval RUN_DIR`: base vs tuned on the held-out split, forgetting probe, flags, eval.json + report.md.

It also runs at the end of `train` (recipe key ``eval_after_train``). The base model is the tuned PeftModel with its
adapter disabled, so one model in memory answers both sides.

eval.json::

    {"base": {"exact_match", "n", "samples", ...}, "tuned": {...}, "max_new_tokens",
     "forgetting": {"probe", "ppl_base", "ppl_tuned", "rise", ...}, "flags": [{"name", "message", ...}], "plots"}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------- plots


# ---------------------------------------------------------------------------------------------------- report.md
def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:200]


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("–" if v is None else str(v))


def _confusion(scores: dict[str, Any], side: str) -> list[str]:
    """The confusion matrix as a table: rows the true label, columns the predicted one."""
    classes, cm = scores.get("classes"), scores.get("confusion")
    if not classes or not cm:
        return []
    out = [f"Confusion matrix ({side}; rows true, columns predicted):", ""]
    out += ["| true \\ predicted | " + " | ".join(_cell(c) for c in classes) + " |", "|---" * (len(classes) + 1) + "|"]
    out += [f"| {_cell(c)} | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(classes, cm)]
    return out + [""]


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
                lines += _confusion(evaluation[s], s)
    if evaluation.get("preference", {}).get("n"):
        from adapters.evaluation.preference import report_lines

        lines += report_lines(evaluation["preference"])
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
        if fg.get("ppl_base_from") == "cache":
            lines += [
                "The base's perplexity was read from the cache of an earlier evaluation of the same base, probe, "
                "libraries and device (`outputs/.cache/forgetting/`).",
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
        "None: no negative transfer, overfitting, forgetting above the threshold, collapse or few trained tokens."
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
