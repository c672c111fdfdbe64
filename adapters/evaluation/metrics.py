"""Task metrics and run-health flags, computed from plain lists (no model needed, so they are unit-tested by hand).

- exact match (from adapters.evaluation.generation), label metrics (accuracy, per-class precision/recall/F1, macro-F1, confusion
  matrix), ROUGE-L F1 (word-level longest common subsequence; no ROUGE library is installed here);
- flags: negative transfer (tuned below base on the task metric), overfitting (validation loss rose over the last K
  evaluations while training loss fell), forgetting (probe perplexity rose above a threshold).
"""

from __future__ import annotations

import math
from typing import Any

from adapters.evaluation.generation import exact_match, normalise_answer

OTHER = "<other>"  # a prediction outside the declared label set


# ---------------------------------------------------------------------------------------------------- labels
def label_metrics(predictions: list[str], references: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1, macro-F1 (mean over the declared labels) and the confusion matrix.

    ``confusion[i][j]`` counts rows whose true label is ``classes[i]`` and predicted label ``classes[j]``;
    ``classes`` is the declared labels plus ``<other>`` for answers outside the set. A class never predicted has
    precision 0, a class never present has recall 0 (no division by zero). Labels match case-insensitively after
    whitespace normalisation.
    """
    norm = {normalise_answer(lab).casefold(): lab for lab in labels}
    classes = list(labels) + [OTHER]
    index = {c: i for i, c in enumerate(classes)}

    def to_class(text: str) -> str:
        return norm.get(normalise_answer(text).casefold(), OTHER)

    confusion = [[0] * len(classes) for _ in classes]
    for p, r in zip(predictions, references):
        confusion[index[to_class(r)]][index[to_class(p)]] += 1
    n = sum(map(sum, confusion))
    correct = sum(confusion[i][i] for i in range(len(labels)))
    per_class: dict[str, dict[str, float]] = {}
    for i, lab in enumerate(labels):
        tp = confusion[i][i]
        predicted = sum(row[i] for row in confusion)
        actual = sum(confusion[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[lab] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": actual,
        }
    macro = sum(c["f1"] for c in per_class.values()) / len(labels) if labels else 0.0
    return {
        "accuracy": round(correct / n, 4) if n else 0.0,
        "macro_f1": round(macro, 4),
        "per_class": per_class,
        "classes": classes,
        "confusion": confusion,
    }


# ---------------------------------------------------------------------------------------------------- ROUGE-L
def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace words: LCS / len gives precision and recall."""
    p, r = prediction.lower().split(), reference.lower().split()
    if not p or not r:
        return float(p == r)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def mean_rouge_l(predictions: list[str], references: list[str]) -> float:
    if not references:
        return 0.0
    return sum(rouge_l(p, r) for p, r in zip(predictions, references)) / len(references)


# ---------------------------------------------------------------------------------------------------- scores
MAX_AUTO_CLASSES = 20


def answer_classes(references: list[str], max_classes: int = MAX_AUTO_CLASSES) -> list[str] | None:
    """The held-out answers as a label set, when they take between 2 and ``max_classes`` distinct values (compared
    as label_metrics compares them: whitespace-normalised, case-insensitive); sorted, each written as it first
    appears. None otherwise (free-text answers: exact match and, if asked, ROUGE-L only)."""
    seen: dict[str, str] = {}
    for r in references:
        seen.setdefault(normalise_answer(r).casefold(), normalise_answer(r))
        if len(seen) > max_classes:
            return None
    return sorted(seen.values(), key=str.casefold) if len(seen) >= 2 else None


def task_scores(
    predictions: list[str], references: list[str], labels: list[str] | None = None, with_rouge: bool = False
) -> dict[str, Any]:
    out: dict[str, Any] = {"exact_match": round(exact_match(predictions, references), 4), "n": len(references)}
    if labels:
        out.update(label_metrics(predictions, references, labels))
    if with_rouge:
        out["rouge_l"] = round(mean_rouge_l(predictions, references), 4)
    return out


def collapse(
    predictions: list[str], references: list[str], min_share: float = 0.8, max_reference_share: float = 0.5
) -> dict[str, Any] | None:
    """The ``collapse`` flag: one answer is predicted for at least ``min_share`` of the held-out rows while it is
    under ``max_reference_share`` of the references - the model answers the same thing whatever it is asked.
    Answers compare whitespace-normalised and case-insensitively."""
    if not predictions or not references:
        return None
    norm = [normalise_answer(p).casefold() for p in predictions]
    top = max(set(norm), key=lambda a: (norm.count(a), a))
    share = norm.count(top) / len(norm)
    ref_share = sum(normalise_answer(r).casefold() == top for r in references) / len(references)
    if share < min_share or ref_share >= max_reference_share:
        return None
    shown = next(normalise_answer(p) for p in predictions if normalise_answer(p).casefold() == top)
    return {
        "name": "collapse",
        "answer": shown,
        "predicted_share": round(share, 4),
        "reference_share": round(ref_share, 4),
        "message": f"collapse: the tuned model answers {shown!r} for {share:.0%} of the {len(norm)} held-out rows, "
        f"while {ref_share:.0%} of the references are {shown!r}; it learnt the answers' format or prior, not the "
        "task (more steps, a higher learning_rate, template: raw on a base model, or a lighter forgetting guard)",
    }


def primary_metric(labels: list[str] | None) -> str:
    """The task metric that negative transfer is judged on."""
    return "macro_f1" if labels else "exact_match"


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


# ---------------------------------------------------------------------------------------------------- flags
def negative_transfer(base: dict[str, Any] | None, tuned: dict[str, Any] | None, metric: str) -> dict[str, Any] | None:
    if not base or not tuned or metric not in base or metric not in tuned:
        return None
    if tuned[metric] < base[metric]:
        return {
            "name": "negative_transfer",
            "metric": metric,
            "base": base[metric],
            "tuned": tuned[metric],
            "message": f"negative transfer: the tuned model scores below the base on {metric} "
            f"({tuned[metric]:.4f} < {base[metric]:.4f})",
        }
    return None


def loss_curves(log_history: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, validation) loss points (step, loss) from a Trainer log history."""
    train = [(h["step"], float(h["loss"])) for h in log_history if "loss" in h and "step" in h]
    val = [(h["step"], float(h["eval_loss"])) for h in log_history if "eval_loss" in h and "step" in h]
    return train, val


def overfitting(log_history: list[dict[str, Any]], window: int = 3) -> dict[str, Any] | None:
    """Flag when each of the last ``window`` validation losses is higher than the one before it (so the last K
    evaluations all rose) while the training loss fell over the same steps."""
    train, val = loss_curves(log_history)
    if window < 1 or len(val) < window + 1:
        return None
    last = val[-(window + 1) :]
    if not all(b[1] > a[1] for a, b in zip(last, last[1:])):
        return None
    start, end = last[0][0], last[-1][0]
    span = [loss for step, loss in train if start <= step <= end]
    if len(span) < 2 or not span[-1] < span[0]:
        return None
    return {
        "name": "overfitting",
        "window": window,
        "steps": [start, end],
        "eval_loss": [round(v, 4) for _, v in last],
        "train_loss": [round(span[0], 4), round(span[-1], 4)],
        "message": f"overfitting: validation loss rose over the last {window} evaluations "
        f"({last[0][1]:.4f} -> {last[-1][1]:.4f}, steps {start}-{end}) while training loss fell "
        f"({span[0]:.4f} -> {span[-1]:.4f})",
    }


def forgetting_flag(
    forgetting: dict[str, Any] | None, threshold: float, advice: str | None = None
) -> dict[str, Any] | None:
    """The ``forgetting`` flag when the probe's perplexity rose by more than ``threshold``. ``advice`` is what to
    change (``forgetting_advice(recipe)``: the knobs the run's trainer has); without it, the SFT advice."""
    if not forgetting or forgetting.get("rise") is None or forgetting["rise"] <= threshold:
        return None
    advice = advice or (
        "raise base_kl_weight (KL to the base on unlabelled positions), or lower learning_rate or max_steps"
    )
    return {
        "name": "forgetting",
        "rise": forgetting["rise"],
        "threshold": threshold,
        "advice": advice,
        "message": f"forgetting: perplexity on the general-text probe rose by {forgetting['rise']:.1%} "
        f"(threshold {threshold:.0%}): {forgetting['ppl_base']:.3f} -> {forgetting['ppl_tuned']:.3f}; {advice}",
    }


def guard_accepted(recipe) -> bool:
    """Whether this recipe's trainer takes ``base_kl_weight`` (the forgetting guard): asked of the recipe's own
    validation, so a trainer that gains the guard is advised to use it without a change here."""
    import dataclasses

    from adapters.config.schema import RecipeError

    if getattr(recipe, "base_kl_weight", 0) > 0 or getattr(recipe, "trainer", "sft") == "sft":
        return True
    try:
        dataclasses.replace(recipe, base_kl_weight=1.0)
    except RecipeError:
        return False
    return True


def forgetting_advice(recipe) -> str:
    """What to change against forgetting, from the run's config: the knobs its trainer has, with their values.

    SFT: base_kl_weight, then learning_rate / max_steps. DPO and KTO: beta (their KL pull towards the reference,
    which is the base or base + the starting adapter). ORPO has no reference: its beta weighs the odds-ratio term
    and holds nothing near the base, so it is not named. base_kl_weight (for a preference trainer: KL to the bare
    base on general text) is named only where the recipe would accept it (not with base_kl_source: rows there)."""
    trainer = getattr(recipe, "trainer", "sft") or "sft"
    steps = recipe.max_steps
    length = (
        f"max_steps (now {steps})"
        if isinstance(steps, int) and steps > 0
        else f"num_train_epochs (now {recipe.num_train_epochs:g})"
    )
    lower = f"lower learning_rate (now {recipe.learning_rate:g}) or {length}"
    knobs = []
    if guard_accepted(recipe):
        where = "unlabelled positions" if trainer == "sft" else "general text"  # a pair has no unlabelled answer
        knobs.append(f"raise base_kl_weight (now {recipe.base_kl_weight:g}; KL to the base on {where})")
    if trainer in ("dpo", "kto"):
        knobs.append(f"raise beta (now {recipe.beta:g}; {trainer.upper()}'s pull towards its reference)")
    if trainer == "orpo":
        return (
            ", or ".join(knobs + [lower])
            + " (ORPO has no reference: its beta weighs the odds-ratio term and holds nothing near the base)"
        )
    return ", or ".join(knobs + [lower])
