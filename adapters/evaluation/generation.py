"""Scoring: greedy generation with the run's chat template, stopped at EOS / end of turn, and exact match."""

from __future__ import annotations

import math

import torch

from adapters.data.encode import render
from adapters.model.loading import stop_token_ids


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return 0.0
    return sum(normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, references)) / len(references)


def answer_budget(tok, references: list[str], margin: int = 8) -> int:
    """Enough new tokens for the longest reference answer plus its end-of-turn token and a margin."""
    longest = max((len(tok(r, add_special_tokens=False)["input_ids"]) for r in references), default=16)
    return longest + margin


@torch.no_grad()
def generate_answers(
    model,
    tok,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int = 16,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers for each conversation; decoding stops at EOS or the template's end-of-turn token."""
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    tok.padding_side = "left"
    stops = stop_token_ids(tok)
    texts = [render(tok, c, add_generation_prompt=True) for c in conversations]
    out: list[str] = []
    for i in tqdm(range(0, len(texts), batch_size), desc=desc, total=math.ceil(len(texts) / batch_size)):
        enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        for row in gen[:, enc["input_ids"].shape[1] :]:
            ids = row.tolist()
            cut = next((j for j, t in enumerate(ids) if t in stops), len(ids))
            out.append(tok.decode(ids[:cut], skip_special_tokens=True))
    return out
