"""Scoring generation: the newline stop for single-line answers leaves the scores as they were, batches by length,
answers in the caller's order."""

from __future__ import annotations

import torch

from adapters.data.encode import render
from adapters.evaluation.generation import by_length, exact_match, first_line, generate_answers, single_line


def test_single_line_and_first_line():
    assert single_line(["Andersen, Marco (Vigo, 1975)", " trailing newline\n"])
    assert not single_line(["one\ntwo"]) and not single_line([])
    assert first_line("  answer\nmore\n") == "answer" and first_line("answer") == "answer"


def test_by_length_groups_similar_lengths_and_keeps_every_index():
    batches = by_length([5, 40, 7, 38, 6, 41], 2)
    assert batches == [[5, 1], [3, 2], [4, 0]]
    assert sorted(i for b in batches for i in b) == list(range(6))


def _newline_prone(tiny_models, at: int = 2):
    """The tiny Llama, its newline token given the output row of a token it often predicts (the ``at``-th token of an
    answer): greedy answers then hold newlines mid-answer, or (``at=1``) start with one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    nl = tok.convert_tokens_to_ids("Ċ")  # byte-level BPE's "\n"
    assert isinstance(nl, int) and tok.decode([nl]) == "\n"
    convs = [[{"role": "user", "content": f"Catalogue line for record {i}: " + "x " * (i % 5)}] for i in range(8)]
    enc = tok(render(tok, convs[0], add_generation_prompt=True), return_tensors="pt", add_special_tokens=False)
    common = int(model.generate(**enc, max_new_tokens=at, do_sample=False)[0, -1])  # the at-th token of an answer
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[nl] = head[common] * 1.01  # wherever that token wins, the newline wins
    return model, tok, convs


def test_newline_stop_leaves_exact_match_unchanged(tiny_models):
    model, tok, convs = _newline_prone(tiny_models)
    full = generate_answers(model, tok, convs, 12, batch_size=3)
    stopped = generate_answers(model, tok, convs, 12, batch_size=3, one_line=True)
    assert any("\n" in a.strip() for a in full), "no answer holds a newline: the test would prove nothing"
    assert stopped == [first_line(a) for a in full]  # the first line is what a full generation gives
    references = [first_line(a) if i % 2 else "something else" for i, a in enumerate(full)]
    em = exact_match(stopped, references)
    assert em == exact_match([first_line(a) for a in full], references) == 0.5


def test_newline_stop_waits_for_the_answers_text(tiny_models):
    """An answer that starts on a new line (raw-turns rows whose prompt ends without a colon are trained so) is not
    stopped by that newline: the stop comes at the first newline after its text, the line first_line scores."""
    model, tok, convs = _newline_prone(tiny_models, at=1)
    full = generate_answers(model, tok, convs, 12, batch_size=3)
    stopped = generate_answers(model, tok, convs, 12, batch_size=3, one_line=True)
    starts = [a for a in full if a.startswith("\n") and a.strip()]
    assert starts, "no answer starts with a newline before its text: the test would prove nothing"
    assert stopped == [first_line(a) for a in full] and all(stopped[i] for i, a in enumerate(full) if a.strip())


def test_answers_come_back_in_the_callers_order(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    convs = [[{"role": "user", "content": "word " * n}] for n in (1, 9, 3, 7)]
    one_batch = generate_answers(model, tok, convs, 5, batch_size=4)
    assert generate_answers(model, tok, convs[::-1], 5, batch_size=4) == one_batch[::-1]
