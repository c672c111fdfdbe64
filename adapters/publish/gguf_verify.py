"""Checking an exported GGUF with llama.cpp itself: its greedy answers against the adapter's (transformers).

The probe prompts are the first rows of the eval split (as ``merge`` uses). llama.cpp answers through
``create_chat_completion``, i.e. with the chat template stored in the GGUF, so a missing or wrong template shows up
as disagreement. Tokenization agreement compares llama.cpp's tokens of the rendered prompt with the tokenizer's.
Without ``llama_cpp`` the result is ``unverified``, never a pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

INSTALL_HINT = (
    'CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" pip install --no-cache-dir --no-binary llama-cpp-python -e ".[gguf-check]"  (builds llama-cpp-python '
    "from its sdist, minutes; a native build crashed on AMX CPUs with quantized GGUFs)"
)
DEFAULT_MIN_AGREEMENT = 0.95
"""Share of probe answers where llama.cpp must equal transformers: 19 of 20. Exact greedy equality is expected
(measured 20/20 for f16 and Q8_0); one near-tie token may flip under llama.cpp's different kernels."""


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def llama_answers(
    model_path: Path,
    lora_path: Path | None,
    convs: list,
    max_new_tokens: int,
    n_ctx: int = 2048,
    prompts: list[str] | None = None,
) -> tuple[list[str], Any]:
    """Greedy answers of llama.cpp with the GGUF's own chat template, or (``prompts``: a run trained raw) to the
    plain prompt texts, BOS added by llama.cpp; returns (answers, the Llama object)."""
    import os

    from llama_cpp import Llama

    llm = Llama(
        model_path=str(model_path),
        lora_path=str(lora_path) if lora_path else None,
        n_ctx=n_ctx,
        n_threads=max(1, (os.cpu_count() or 2)),
        seed=0,
        verbose=False,
    )
    out = []
    for text in prompts or []:
        r = llm.create_completion(prompt=text, temperature=0.0, top_k=1, max_tokens=max_new_tokens, seed=0)
        out.append(r["choices"][0]["text"] or "")
    for conv in [] if prompts is not None else convs:
        r = llm.create_chat_completion(messages=conv, temperature=0.0, top_k=1, max_tokens=max_new_tokens, seed=0)
        out.append(r["choices"][0]["message"]["content"] or "")
    return out, llm


def tokenization_agreement(llm, tok, texts: list[str]) -> float:
    """Share of texts that llama.cpp and the transformers tokenizer split into the same ids."""
    same = 0
    for t in texts:
        ours = tok(t, add_special_tokens=False)["input_ids"]
        theirs = llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
        same += list(ours) == list(theirs)
    return same / len(texts) if texts else 1.0


def compare_answers(hf: list[str], cpp: list[str], refs: list[str]) -> dict[str, Any]:
    from adapters.evaluation.generation import exact_match, normalise_answer

    same = [normalise_answer(a) == normalise_answer(b) for a, b in zip(hf, cpp)]
    return {
        "n": len(hf),
        "agreement": sum(same) / len(same) if same else 1.0,
        "agree_count": sum(same),
        "exact_match_llama_cpp": round(exact_match(cpp, refs), 4),
        "exact_match_transformers": round(exact_match(hf, refs), 4),
        "samples": [{"expected": r, "transformers": a, "llama_cpp": b} for r, a, b in list(zip(refs, hf, cpp))[:3]],
        "disagreements": [
            {"row": i, "transformers": a, "llama_cpp": b} for i, (a, b, s) in enumerate(zip(hf, cpp, same)) if not s
        ][:5],
    }


def verify(
    model_path: Path,
    lora_path: Path | None,
    tok,
    convs: list,
    refs: list[str],
    hf_answers: list[str],
    max_new_tokens: int,
) -> dict[str, Any]:
    """The ``verification`` block of export_report.json."""
    from adapters.data.encode import render

    if not llama_cpp_available():
        return {"verified": "unverified", "reason": "llama_cpp is not importable", "install": INSTALL_HINT}
    from adapters.model.loading import template_of

    texts = [render(tok, c, add_generation_prompt=True) for c in convs]
    raw = template_of(tok) == "raw"
    bos = tok.bos_token or ""
    prompts = [t[len(bos) :] if bos and t.startswith(bos) else t for t in texts] if raw else None
    cpp, llm = llama_answers(model_path, lora_path, convs, max_new_tokens, prompts=prompts)
    res = compare_answers(hf_answers, cpp, refs)
    res["tokenization_agreement"] = tokenization_agreement(llm, tok, texts + refs)
    res["gguf_chat_template_is_runs"] = llm.metadata.get("tokenizer.chat_template") == (
        None if raw else tok.chat_template
    )
    import llama_cpp

    res["llama_cpp_python"] = llama_cpp.__version__
    del llm
    return res
