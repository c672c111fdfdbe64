"""Preference evaluation on held-out pairs: the base, the starting adapter and the tuned adapter, side by side.

For each model, reference-free (so it compares across models, unlike TRL's reward accuracy, which reads 0.0 at step
0 because policy = reference there):

- ``accuracy``: the share of pairs with log p(chosen | prompt) > log p(rejected | prompt), log-probs summed over the
  answer tokens; ``accuracy_avg`` the same with the log-probs averaged per token (length-normalised);
- ``margin``: the mean of log p(chosen) - log p(rejected) (summed);
- greedy generation on the held-out prompts: ``chosen_exact_match`` (the answer equals ``chosen``),
  ``mean_new_tokens`` and ``budget_stopped_share`` (answers cut by the token budget).

``start`` is the adapter the run continued (``init_adapter``), loaded next to the tuned one for the comparison and
removed again; without one it is the base. Flags: ``negative_transfer`` when the tuned accuracy falls below the
start's, ``length_rise`` when the tuned answers are more than 20% longer than the start's.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from adapters.evaluation.generation import answer_budget, generate_answers, normalise_answer, single_line

START = "start"
LENGTH_RISE = 0.2


def _render_ids(tok, messages, generation: bool) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    return tok(text, add_special_tokens=False)["input_ids"]


def _sequences(tok, rows) -> list[tuple[list[int], int]]:
    """(ids of prompt + answer, where the answer starts) for each pair's chosen then rejected answer."""
    out = []
    for r in rows:
        p = _render_ids(tok, r.prompt, True)
        for which in ("chosen", "rejected"):
            full = _render_ids(tok, r.prompt + getattr(r, which), False)
            out.append((full, len(p)))
    return out


@torch.no_grad()
def answer_logps(model, seqs: list[tuple[list[int], int]], batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed log-prob of the answer tokens, their count) per sequence. Only the answer positions go through the
    LM head (``logits_to_keep``: the batch's answer positions; Gemma's 262k vocabulary makes the head most of a
    small model's forward) and the log-softmax, one batch at a time."""
    model.eval()
    device = next(model.parameters()).device
    # Batches of sequences whose answers start together (a pair's two answers share their prompt): the union of the
    # batch's answer positions, which all its rows go through the head at, is then little more than each row's own.
    order = sorted(range(len(seqs)), key=lambda k: (seqs[k][1], len(seqs[k][0])))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)  # in the callers' order
    for i in range(0, len(order), batch_size):
        batch = [seqs[k] for k in order[i : i + batch_size]]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for j, (s, _) in enumerate(batch):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        spans = [torch.arange(max(start, 1) - 1, len(s) - 1) for s, start in batch]  # position t predicts t+1
        keep = torch.unique(torch.cat(spans)) if spans else torch.zeros(0, dtype=torch.long)
        kw = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        try:
            logits = model(**kw, logits_to_keep=keep.to(device)).logits
        except TypeError:  # a model class without logits_to_keep: every position
            logits, keep = model(**kw).logits, torch.arange(width)
        for j, pos in enumerate(spans):
            target = ids[j, pos + 1].to(logits.device)
            rows = torch.searchsorted(keep, pos).to(logits.device)
            lp = torch.log_softmax(logits[j, rows].float(), dim=-1).gather(-1, target[:, None]).sum()
            out[order[i + j]] = (float(lp), len(pos))
    return out


def pair_scores(logps: list[tuple[float, int]]) -> dict[str, float]:
    chosen, rejected = logps[0::2], logps[1::2]
    n = len(chosen)
    if not n:
        return {"accuracy": 0.0, "accuracy_avg": 0.0, "margin": 0.0}
    wins = sum(c[0] > r[0] for c, r in zip(chosen, rejected))
    wins_avg = sum(c[0] / max(c[1], 1) > r[0] / max(r[1], 1) for c, r in zip(chosen, rejected))
    margin = sum(c[0] - r[0] for c, r in zip(chosen, rejected)) / n
    return {"accuracy": round(wins / n, 4), "accuracy_avg": round(wins_avg / n, 4), "margin": round(margin, 4)}


def held_out_pair_scores(model, tok, recipe, path, limit: int | None = None) -> dict[str, Any]:
    """``n``, ``accuracy``, ``accuracy_avg`` and ``margin`` of ``model`` on the pairs of ``path``: the scores of
    eval.json's ``preference.tuned`` without the generation (the objective of a preference sweep)."""
    from adapters.data.preference import read_preference
    from adapters.data.rows import DataError

    rows = [r for r in read_preference(path, recipe) if r.paired]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DataError(f"{path}: no chosen/rejected pairs: preference accuracy is scored on pairs")
    return {"n": len(rows), **pair_scores(answer_logps(model, _sequences(tok, rows)))}


def _score(model, tok, rows, seqs, budget: int, batch_size: int, desc: str) -> dict[str, Any]:
    scores = pair_scores(answer_logps(model, seqs))
    chosen = [r.answer_text("chosen") for r in rows]
    stats: list[dict[str, Any]] = []
    preds = generate_answers(
        model, tok, [r.prompt for r in rows], budget, batch_size, desc, single_line(chosen), stats=stats
    )
    n = max(len(rows), 1)
    scores.update(
        {
            "chosen_exact_match": round(
                sum(normalise_answer(p) == normalise_answer(c) for p, c in zip(preds, chosen)) / n, 4
            ),
            "rejected_exact_match": round(
                sum(normalise_answer(p) == normalise_answer(r.answer_text("rejected")) for p, r in zip(preds, rows))
                / n,
                4,
            ),
            "mean_new_tokens": round(sum(s["new_tokens"] for s in stats) / n, 2),
            "budget_stopped_share": round(sum(bool(s["budget_stopped"]) for s in stats) / n, 4),
            "samples": [{"expected": c, "got": p} for c, p in list(zip(chosen, preds))[:5]],
        }
    )
    return scores


@contextmanager
def _start_adapter(model, init_adapter: str | None):
    """The starting adapter active for the block (loaded next to the tuned one, removed after)."""
    from adapters.publish.hub import resolve_adapter

    src = resolve_adapter(init_adapter)
    tuned = model.active_adapter
    model.load_adapter(str(src.adapter_dir), adapter_name=START, is_trainable=False)
    model.set_adapter(START)
    try:
        yield
    finally:
        model.set_adapter(tuned)
        model.delete_adapter(START)


def evaluate_preference(model, tok, recipe, base: bool = True, limit: int | None = None, log=print) -> dict[str, Any]:
    """The ``preference`` section of eval.json (see the module doc) and its flags."""
    from adapters.data.preference import read_preference

    rows = [r for r in read_preference(recipe.test_file, recipe) if r.paired] if recipe.test_file else []
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        return {"n": 0, "flags": []}
    seqs = _sequences(tok, rows)
    budget = recipe.eval_max_new_tokens or answer_budget(tok, [r.answer_text("chosen") for r in rows])
    out: dict[str, Any] = {"n": len(rows), "max_new_tokens": budget, "start_adapter": recipe.init_adapter}
    has_adapter = hasattr(model, "disable_adapter")
    sides = (["base"] if base and has_adapter else []) + (["start"] if recipe.init_adapter and has_adapter else [])
    for side in [*sides, "tuned"]:
        if side == "base":
            ctx = model.disable_adapter()
        elif side == "start":
            ctx = _start_adapter(model, recipe.init_adapter)
        else:
            ctx = nullcontext()
        with ctx:
            out[side] = _score(model, tok, rows, seqs, budget, recipe.eval_generation_batch_size, f"{side} model")
        s = out[side]
        log(
            f"[eval] preference, {side} model on {len(rows)} held-out pairs: accuracy {s['accuracy']:.3f} "
            f"(length-averaged {s['accuracy_avg']:.3f}), margin {s['margin']:.3f}, chosen exact match "
            f"{s['chosen_exact_match']:.3f}, {s['mean_new_tokens']:.1f} new tokens, budget-stopped "
            f"{s['budget_stopped_share']:.3f}"
        )
    if "start" not in out and "base" in out:
        out["start"] = out["base"]  # no init_adapter: the run started from the base
    out["flags"] = preference_flags(out)
    return out


def preference_flags(p: dict[str, Any]) -> list[dict[str, Any]]:
    start, tuned = p.get("start"), p.get("tuned")
    flags = []
    if not start or not tuned:
        return flags
    if tuned["accuracy"] < start["accuracy"]:
        flags.append(
            {
                "name": "negative_transfer",
                "metric": "preference_accuracy",
                "base": start["accuracy"],
                "tuned": tuned["accuracy"],
                "message": f"negative transfer: held-out preference accuracy fell from {start['accuracy']:.3f} "
                f"(start) to {tuned['accuracy']:.3f} (tuned)",
            }
        )
    if start["mean_new_tokens"] and tuned["mean_new_tokens"] > (1 + LENGTH_RISE) * start["mean_new_tokens"]:
        rise = tuned["mean_new_tokens"] / start["mean_new_tokens"] - 1
        flags.append(
            {
                "name": "length_rise",
                "rise": round(rise, 4),
                "message": f"length rise: greedy answers are {rise:.0%} longer after training "
                f"({start['mean_new_tokens']:.1f} -> {tuned['mean_new_tokens']:.1f} tokens; "
                f"{tuned['budget_stopped_share']:.0%} cut by the budget): DPO may have learned length; check the "
                "data audit's length bias",
            }
        )
    return flags


def report_lines(p: dict[str, Any]) -> list[str]:
    """report.md's preference section."""
    sides = [s for s in ("base", "start", "tuned") if s in p]
    if not sides:
        return []
    keys = (
        "accuracy",
        "accuracy_avg",
        "margin",
        "chosen_exact_match",
        "rejected_exact_match",
        "mean_new_tokens",
        "budget_stopped_share",
    )
    lines = [
        f"## Preference (held-out pairs, n={p['n']}; start = {p.get('start_adapter') or 'the base'})",
        "",
        "accuracy: share of pairs with log p(chosen) > log p(rejected) (summed; accuracy_avg length-averaged); "
        "margin: mean summed log-prob difference; exact match of greedy answers to chosen / rejected.",
        "",
        "| metric | " + " | ".join(sides) + " |",
        "|---|" + "---|" * len(sides),
    ]
    for k in keys:
        vals = [p[s].get(k) for s in sides]
        lines.append(
            f"| {k} | "
            + " | ".join("–" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v) for v in vals)
            + " |"
        )
    lines.append("")
    return lines


def plot_preference(p: dict[str, Any], path) -> Any:
    from adapters.evaluation.plots import _plt

    sides = [s for s in ("base", "start", "tuned") if s in p]
    if not sides:
        return None
    keys = ["accuracy", "accuracy_avg", "chosen_exact_match"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.5), dpi=110)
    width = 0.8 / len(sides)
    for i, side in enumerate(sides):
        xs = [j + (i - (len(sides) - 1) / 2) * width for j in range(len(keys))]
        bars = ax.bar(xs, [p[side][k] for k in keys], width, label=side)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylim(0, 1.15)
    ax.set_title(f"held-out preference (n={p['n']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
