"""Cleaning, splitting, mixing and augmentation of rows, each step with its counts.

All randomness comes from ``random.Random(seed)``, so the same recipe gives the same rows in the same order.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from adapters.data.rows import DataError, Row


def exact_key(row: Row) -> str:
    return json.dumps([row.messages, row.text], ensure_ascii=False)


def near_key(row: Row) -> str:
    """The row after whitespace and case normalisation: rows equal under it are near-exact duplicates."""

    def norm(x: str) -> str:
        return " ".join(x.split()).casefold()  # runs of whitespace -> one space, ends stripped (str.isspace's set)

    parts = [norm(row.text)] if row.text is not None else [f"{t['role']}:{norm(t['content'])}" for t in row.messages]
    return "\x1f".join(parts)


def digest(key: str) -> bytes:
    """16 bytes for a dedup key: the seen-set holds these, not the rows' text (49 bytes a row instead of ~300)."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def answer(row: Row) -> str:
    if row.text is not None:
        return row.text
    return next((t["content"] for t in reversed(row.messages) if t["role"] == "assistant"), "")


def prompt(row: Row) -> str:
    return "\n".join(t["content"] for t in row.messages if t["role"] != "assistant")


def _step(name: str, before: int, removed: list[Row]) -> dict[str, Any]:
    return {
        "step": name,
        "before": before,
        "removed": len(removed),
        "after": before - len(removed),
        "examples": [r.where for r in removed[:10]],
    }


def clean_rows(
    rows: list[Row],
    dedup: bool = True,
    min_answer_chars: int = 1,
    max_answer_chars: int | None = None,
    max_prompt_chars: int | None = None,
) -> tuple[list[Row], list[dict[str, Any]]]:
    """Drop exact duplicates, near-exact duplicates, empty answers, and rows outside the length limits."""
    steps: list[dict[str, Any]] = []

    def keep_first(rows: list[Row], key, name: str) -> list[Row]:
        seen: set[bytes] = set()
        kept, removed = [], []
        for r in rows:
            k = digest(key(r))
            (removed if k in seen else kept).append(r)
            seen.add(k)
        steps.append(_step(name, len(rows), removed))
        return kept

    if dedup:
        rows = keep_first(rows, exact_key, "exact_duplicates")
        rows = keep_first(rows, near_key, "near_duplicates")

    def filt(rows: list[Row], bad, name: str) -> list[Row]:
        removed = [r for r in rows if bad(r)]
        steps.append(_step(name, len(rows), removed))
        return [r for r in rows if not bad(r)]

    # An answer with no letter or digit ("", "...", "-") teaches nothing but to emit punctuation.
    rows = filt(rows, lambda r: not any(c.isalnum() for c in answer(r)), "empty_answers")
    if min_answer_chars > 1 or max_answer_chars or max_prompt_chars:
        rows = filt(
            rows,
            lambda r: (
                len(answer(r)) < min_answer_chars
                or (max_answer_chars is not None and len(answer(r)) > max_answer_chars)
                or (max_prompt_chars is not None and len(prompt(r)) > max_prompt_chars)
            ),
            "length_filter",
        )
    return rows, steps


def split_rows(rows: list[Row], val_split: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministic train/validation split by fraction. Near-duplicates go to the same side."""
    if not 0.0 < val_split < 1.0:
        raise DataError(f"val_split: expected a fraction in (0, 1), got {val_split}")
    keys = sorted({near_key(r) for r in rows})
    random.Random(seed).shuffle(keys)
    n_val = max(1, round(val_split * len(keys)))
    val_keys = set(keys[:n_val])
    return [r for r in rows if near_key(r) not in val_keys], [r for r in rows if near_key(r) in val_keys]


def remove_overlap(train: list[Row], *held_out: list[Row]) -> tuple[list[Row], list[Row]]:
    """Train rows that are near-duplicates of a validation or test row leak the answer: drop them from train."""
    keys = {digest(near_key(r)) for rows in held_out for r in rows}
    inside = [digest(near_key(r)) in keys for r in train]
    return [r for r, x in zip(train, inside) if not x], [r for r, x in zip(train, inside) if x]


def weighted(rows: list[Row], weight: float, rng: random.Random) -> list[Row]:
    """Rows repeated ``int(weight)`` times plus a seeded sample of the fractional part."""
    if weight < 0:
        raise DataError(f"data_mix: weight must be >= 0, got {weight}")
    whole, frac = int(weight), weight - int(weight)
    out = rows * whole
    if frac:
        out += rng.sample(rows, round(frac * len(rows)))
    return out


def apply_templates(rows: list[Row], templates: list[str]) -> list[Row]:
    """Several prompt templates per example: each single-turn row gets one variant per template.

    A template is a string with ``{prompt}``, e.g. ``"Question: {prompt}"``. Multi-turn and plain-text rows are kept
    unchanged (once).
    """
    for t in templates:
        if "{prompt}" not in t:
            raise DataError(f"augment_prompt_templates: template {t!r} has no {{prompt}} placeholder")
    out = []
    for r in rows:
        body = [m for m in r.messages if m["role"] != "system"]
        if r.text is not None or len(body) != 2:
            out.append(r)
            continue
        for t in templates:
            msgs = [dict(m) for m in r.messages]
            i = next(i for i, m in enumerate(msgs) if m["role"] == "user")
            msgs[i]["content"] = t.replace("{prompt}", msgs[i]["content"])
            out.append(Row(r.file, r.line, msgs, None))
    return out


def mix_general(rows: list[Row], general: list[Row], share: float, rng: random.Random) -> tuple[list[Row], int]:
    """Add general rows so that they make up ``share`` of the result (capped by what is available)."""
    if not 0.0 <= share < 1.0:
        raise DataError(f"general_data_share: expected a fraction in [0, 1), got {share}")
    want = round(share / (1 - share) * len(rows))
    picked = rng.sample(general, min(want, len(general)))
    mixed = rows + picked
    rng.shuffle(mixed)
    return mixed, len(picked)
