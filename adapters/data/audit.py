"""Loss-mask audit: what the loss will actually see, measured on the encoded rows before training starts.

Catches the fine-tunes that train without an error and still fail: loss on the prompt, answers truncated away,
rows with nothing to learn, and an end-of-turn/EOS token that is never trained (the model never learns to stop).
"""

from __future__ import annotations

import statistics
from typing import Any

from adapters.data.encode import EncodeReport
from adapters.data.rows import IGNORE_INDEX, DataError, Encoded


class AuditError(DataError):
    """The audit exceeded a threshold set in the recipe; the run stops before training."""


def _pct(xs: list[int], q: float) -> int:
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _last_trained_span(e: Encoded) -> list[int]:
    """Token ids of the last contiguous run of trained positions (the final answer and what closes it)."""
    end = max((i for i, lab in enumerate(e.labels) if lab != IGNORE_INDEX), default=-1)
    start = end
    while start > 0 and e.labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return e.input_ids[start : end + 1] if end >= 0 else []


def audit(encoded: list[Encoded], report: EncodeReport, max_length: int, stop_ids: list[int]) -> dict[str, Any]:
    """Numbers of the audit. ``report`` is the EncodeReport of the same rows (it holds the dropped ones)."""
    lengths = sorted(report.lengths) or [0]
    truncated = [d for d in report.dropped if d["reason"].startswith("longer than")]
    untrained = [d for d in report.dropped if d["reason"] == "no trained token"]
    stop = set(stop_ids)
    eos_rows = 0
    prompt_trained = 0
    for e in encoded:
        if any(t in stop for t in _last_trained_span(e)):
            eos_rows += 1
        if e.labels and e.labels[0] != IGNORE_INDEX:
            prompt_trained += 1
    tokens = sum(len(e.input_ids) for e in encoded)
    trained_tokens = sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in encoded)
    rows = report.rows
    return {
        "rows": rows,
        "kept": len(encoded),
        "tokens": tokens,
        "trained_tokens": trained_tokens,
        "trained_share": round(trained_tokens / tokens, 4) if tokens else 0.0,
        "dropped": len(report.dropped),
        "dropped_share": round(len(report.dropped) / rows, 4) if rows else 0.0,
        "truncated_answer_rows": truncated,
        "no_trained_token_rows": untrained,
        "eos_trained_rows": eos_rows,
        "eos_trained": bool(encoded) and eos_rows == len(encoded),
        "stop_token_ids": sorted(stop),
        "rows_trained_from_first_token": prompt_trained,
        "length": {
            "min": lengths[0],
            "median": statistics.median(lengths),
            "p95": _pct(lengths, 0.95),
            "max": lengths[-1],
            "max_length": max_length,
            "over_max_length": sum(1 for x in lengths if x > max_length),
        },
    }


def violations(a: dict[str, Any], max_dropped_share: float, min_trained_share: float, require_eos: bool) -> list[str]:
    out = []
    if a["dropped_share"] > max_dropped_share:
        first = (a["truncated_answer_rows"] + a["no_trained_token_rows"])[0]
        out.append(
            f"{a['dropped']} of {a['rows']} rows dropped ({a['dropped_share']:.1%} > audit_max_dropped_share="
            f"{max_dropped_share}); first: {first['where']}: {first['reason']}"
        )
    if a["kept"] and a["trained_share"] < min_trained_share:
        out.append(
            f"only {a['trained_share']:.1%} of tokens are trained (< audit_min_trained_share={min_trained_share})"
        )
    if require_eos and a["kept"] and not a["eos_trained"]:
        out.append(
            f"only {a['eos_trained_rows']} of {a['kept']} rows train their closing EOS/end-of-turn token "
            f"{a['stop_token_ids']}; the model would not learn to stop (audit_require_eos)"
        )
    if not a["kept"]:
        out.append("no row has a trained token")
    return out


FEW_TRAINED_SHARE = 0.10


def few_trained_tokens(a: dict[str, Any], threshold: float = FEW_TRAINED_SHARE) -> dict[str, Any] | None:
    """The ``few_trained_tokens`` warning (a flag in eval.json): under ``threshold`` of the tokens carry a label,
    e.g. one-word answers after long prompts. Not an error: such a task trains, but on little signal per step."""
    if not a.get("kept") or a["trained_share"] >= threshold:
        return None
    per_row = a["trained_tokens"] / a["kept"]
    return {
        "name": "few_trained_tokens",
        "trained_share": a["trained_share"],
        "trained_tokens_per_row": round(per_row, 2),
        "threshold": threshold,
        "message": f"only {a['trained_share']:.1%} of training tokens are trained ({per_row:.1f} per row, "
        f"< {threshold:.0%}): each step learns from about {per_row:.0f} tokens a row while paying for the whole "
        "row, so a short-answer task needs more steps (or rows) than its row count suggests before its answers "
        "are reliable; and a forgetting guard on the rows' own prompts would outweigh those few tokens "
        "(base_kl_source: auto, the default, therefore holds the model to its base on general text instead)",
    }


def format_audit(name: str, a: dict[str, Any]) -> list[str]:
    ln = a["length"]
    lines = [
        f"[audit] {name}: {a['kept']}/{a['rows']} rows kept, {a['trained_tokens']}/{a['tokens']} tokens trained "
        f"({a['trained_share']:.1%}), EOS trained in {a['eos_trained_rows']}/{a['kept']} rows",
        f"[audit] {name}: tokens min {ln['min']} median {ln['median']} p95 {ln['p95']} max {ln['max']} "
        f"(max_length {ln['max_length']}, {ln['over_max_length']} over)",
    ]
    for d in (a["truncated_answer_rows"] + a["no_trained_token_rows"])[:5]:
        lines.append(f"[audit] {name}: dropped {d['where']}: {d['reason']}")
    return lines
