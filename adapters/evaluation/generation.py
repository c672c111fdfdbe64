"""Scoring: greedy generation with the run's chat template, stopped at EOS / end of turn (and, for single-line
answers, at the first newline after the answer's text), batched by prompt length, and exact match."""

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


def single_line(references: list[str]) -> bool:
    """Every reference answer is one line: a prediction is then scored on its first line only, so generation may
    stop at the first newline."""
    return bool(references) and all("\n" not in r.strip() for r in references)


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0]


def answer_budget(tok, references: list[str], margin: int = 8) -> int:
    """Enough new tokens for the longest reference answer plus its end-of-turn token and a margin."""
    longest = max((len(tok(r, add_special_tokens=False)["input_ids"]) for r in references), default=16)
    return longest + margin


def _newline_stop(tok, cache: dict[int, tuple[bool, bool, bool]] | None = None):
    """A stopping criterion for one batch: a row is done at the first newline after the answer's first visible text,
    the line ``first_line`` scores. A newline before any text (an answer that starts on a new line, as raw-turns
    rows of a prompt without a closing colon are trained) does not stop it.

    transformers' ``stop_strings`` builds a table over the whole vocabulary first (seconds for Gemma's 262k tokens,
    per ``generate`` call); decoding only the tokens generated, once each (``cache``, shared across batches), costs
    nothing. A newline is one byte, so no token that holds part of another character can hold it.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    seen = {} if cache is None else cache

    class NewlineStop(StoppingCriteria):
        def __init__(self):
            self.started: list[bool] | None = None  # per row: visible text generated yet

        def __call__(self, input_ids, scores, **kwargs):
            last = input_ids[:, -1].tolist()
            if self.started is None:
                self.started = [False] * len(last)
            done = []
            for row, t in enumerate(last):
                if t not in seen:
                    text = tok.decode([t])
                    seen[t] = ("\n" in text, bool(text.strip()), "\n" in text.lstrip())
                newline, visible, newline_after_text = seen[t]
                done.append(newline_after_text or (newline and self.started[row]))
                self.started[row] = self.started[row] or visible
            return torch.tensor(done, device=input_ids.device)

    return StoppingCriteriaList([NewlineStop()])


def by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length (longest first), so a batch pads little and its rows finish together."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def generate_answers(
    model,
    tok,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int = 16,
    desc: str = "generate",
    one_line: bool = False,
    stats: list[dict[str, int | bool]] | None = None,
) -> list[str]:
    """Greedy answers for each conversation, in their order; decoding stops at EOS or the template's end-of-turn
    token and, with ``one_line``, at the first newline after the answer's first text (the answer is then its first line:
    see ``single_line``)."""
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    tok.padding_side = "left"
    stops = stop_token_ids(tok)
    texts = [render(tok, c, add_generation_prompt=True) for c in conversations]
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    decoded: dict[int, tuple[bool, bool, bool]] = {}  # the newline stop's decoded tokens, for every batch
    out: list[str] = [""] * len(texts)
    counts: list[dict[str, int | bool]] = [{} for _ in texts]
    for batch in tqdm(by_length(lengths, batch_size), desc=desc, total=math.ceil(len(texts) / batch_size)):
        enc = tok([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        newline = {"stopping_criteria": _newline_stop(tok, decoded)} if one_line else {}
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
            **newline,
        )
        for i, row in zip(batch, gen[:, enc["input_ids"].shape[1] :]):
            ids = row.tolist()
            cut = next((j for j, t in enumerate(ids) if t in stops), len(ids))
            text = tok.decode(ids[:cut], skip_special_tokens=True)
            out[i] = first_line(text) if one_line else text
            pads = sum(1 for t in reversed(ids) if t == tok.pad_token_id and t not in stops)  # rows done early
            counts[i] = {"new_tokens": cut, "budget_stopped": cut == len(ids) and len(ids) - pads >= max_new_tokens}
    if stats is not None:  # per row: tokens generated before the stop, and whether the budget cut it
        stats[:] = counts
    return out
