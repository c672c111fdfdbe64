"""`adapters generate RUN_DIR`: try a run's model with the chat template it was trained with.

``--prompt TEXT`` answers once; without it, every stdin line is a prompt (interactive mode; an empty line or EOF
ends it). The model is the tuned one (base + adapter) by default, ``--merged`` loads RUN_DIR/merged, ``--base``
the base alone. Greedy decoding, stopped at EOS or the end-of-turn token.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from adapters.publish.rundir import RunError, load_run_tokenizer, load_tuned


def load_for_generation(run_dir: str | Path, which: str = "tuned"):
    """(model, tokenizer, run) for which in {"tuned", "merged", "base"}."""
    from adapters.model.loading import load_model
    from adapters.publish.hub import resolve_adapter

    run = resolve_adapter(run_dir)  # a run directory, an adapter folder or a hub id
    if which == "tuned":
        model, tok = load_tuned(run, quantize=True)
        return model, tok, run
    tok = load_run_tokenizer(run)
    if which == "merged":
        merged = run.path / "merged"
        if not (merged / "config.json").is_file():
            raise RunError(f"{merged}: no merged model (config.json missing); run `adapters merge {run.path}` first")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(merged), dtype="auto")
    elif which == "base":
        model = load_model(run.ref, run.recipe, quantize=True)
    else:
        raise ValueError(f"which: expected tuned, merged or base, got {which!r}")
    return model.eval(), tok, run


def answer(model, tok, prompt: str, max_new_tokens: int, system: str | None = None) -> str:
    from adapters.evaluation.generation import generate_answers

    conv = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return generate_answers(model, tok, [conv], max_new_tokens, batch_size=1, desc="generate")[0]


def run_generate(
    run_dir: str | Path,
    prompt: str | None = None,
    which: str = "tuned",
    max_new_tokens: int = 128,
    system: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> list[str]:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if prompt is not None and not prompt.strip():  # as an empty prompt in the data: refused, not answered
        raise RunError("--prompt: empty; give the text to answer (or leave --prompt out to read prompts from stdin)")
    model, tok, _ = load_for_generation(run_dir, which)
    outputs: list[str] = []
    if prompt is not None:
        outputs.append(answer(model, tok, prompt, max_new_tokens, system))
        print(outputs[-1], file=stdout, flush=True)
        return outputs
    interactive = stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or not line.strip():
            break
        outputs.append(answer(model, tok, line.rstrip("\n"), max_new_tokens, system))
        print(outputs[-1], file=stdout, flush=True)
    return outputs
