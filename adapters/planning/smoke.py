"""Smoke test on a tiny random twin of the recipe's model: a few CPU steps, merge, reload, compare logits."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from adapters.config import Recipe
from adapters.planning.memory import model_config


def twin_config(config: Any) -> Any:
    """The same architecture with the sizes shrunk: 2 layers, hidden 64, 4 heads of 16, 2 KV heads."""
    import copy

    cfg = copy.deepcopy(config)
    text = getattr(cfg, "text_config", None) or cfg
    shrink = dict(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2 if (getattr(text, "num_key_value_heads", 4) or 4) < 4 else 4,
        head_dim=16,
        max_position_embeddings=min(getattr(text, "max_position_embeddings", 2048) or 2048, 2048),
    )
    for k, v in shrink.items():
        if k == "head_dim" and not hasattr(text, "head_dim"):
            continue
        setattr(text, k, v)
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types[: text.num_hidden_layers])
        if "full_attention" not in text.layer_types:
            text.layer_types[-1] = "full_attention"
    if getattr(text, "sliding_window", None):
        text.sliding_window = min(text.sliding_window, 64)
    if hasattr(text, "query_pre_attn_scalar"):
        text.query_pre_attn_scalar = 16
    return cfg


SMOKE_SPECIALS = {"gemma": ["<start_of_turn>", "<end_of_turn>"], "chatml": ["<|im_start|>", "<|im_end|>"]}


def _fallback_tokenizer(texts: list[str], template: str):
    """A small byte-level BPE trained on the recipe's data, with the chat template's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from adapters.model.loading import builtin_template

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", *SMOKE_SPECIALS[template]]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SMOKE_SPECIALS[template],
    )
    tok.chat_template = builtin_template(template)
    return tok


def build_twin(recipe: Recipe, out: Path, shrink: bool = True) -> tuple[Path, str]:
    """Write a tiny random twin of the recipe's model (config + weights + tokenizer) into ``out``.

    ``shrink=False``: the model's real shape (vocabulary included), random weights: for timing a path where the
    weights cannot travel (scripts/gpu_check.sh)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.data.validate import read_rows

    config, source = model_config(recipe)
    tok, note = None, source
    local = Path(source)
    if local.is_dir():
        tok = AutoTokenizer.from_pretrained(str(local), trust_remote_code=recipe.trust_remote_code)
    else:
        texts = [m["content"] for r in read_rows(recipe.train_file)[:200] for m in r.messages]
        family = "gemma" if str(getattr(config, "model_type", "")).startswith("gemma") else "chatml"
        tok = _fallback_tokenizer(texts, recipe.chat_template or family)
        note += f"; tokenizer: a {len(tok)}-token BPE trained on the recipe's data with the {family} specials"
    cfg = twin_config(config) if shrink else config
    text = getattr(cfg, "text_config", None) or cfg
    if shrink or text.vocab_size < len(tok):
        text.vocab_size = max(len(tok), 8)
    for k in ("pad_token_id", "eos_token_id", "bos_token_id"):
        tid = getattr(tok, k)
        if tid is not None:
            setattr(text, k, tid)
    cfg.dtype = "float32"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, note


def smoke(recipe: Recipe, recipe_path: Path, steps: int = 3, keep: Path | None = None) -> dict[str, Any]:
    """Run the recipe on a tiny twin for ``steps`` steps on CPU, then merge into a full-precision reload and reload.

    The recipe's own keys stay (quantization, LoRA targets, template, data, optimizer …) except what a CPU run of a
    few seconds must change; every change is listed in the result under ``adjusted``.
    """
    from adapters.training.run import train

    t0 = time.time()
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="adapters-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        twin, note = build_twin(recipe, work / "twin")
        adjusted = _cpu_adjustments(recipe, twin, work, steps)
        run_recipe = replace(recipe, **adjusted)
        run_recipe = replace(
            run_recipe,
            test_file=_head(recipe.test_file, work / "test.jsonl", 4),
            eval_file=_head(recipe.eval_file, work / "val.jsonl", 4),
            train_file=_head(recipe.train_file, work / "train.jsonl", steps * run_recipe.per_device_train_batch_size),
        )
        run = train(run_recipe, recipe_path)  # load_model keeps bitsandbytes' CPU layout trainable
        manifest = json.loads((run / "manifest.json").read_text())
        diff = _merge_reload_diff(twin, run, work)
        return {
            "ok": True,
            "seconds": round(time.time() - t0, 1),
            "twin": note,
            "steps": manifest["train"]["global_step"],
            "train_loss": manifest["train"]["train_loss"],
            "merge_max_abs_diff": diff,
            "adjusted": {
                k: v for k, v in adjusted.items() if k not in ("model_name_or_path", "output_root", "run_name")
            },
            "quantization": manifest.get("quantization", {}).get("method"),
        }
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _cpu_adjustments(recipe: Recipe, twin: Path, work: Path, steps: int) -> dict[str, Any]:
    """What a CPU run of a few seconds must change in the recipe; everything else stays as the recipe says."""
    import torch

    adjusted = {
        "model_name_or_path": str(twin),
        "output_root": str(work / "outputs"),
        "run_name": "smoke",
        "max_steps": steps,
        "per_device_train_batch_size": min(recipe.per_device_train_batch_size, 2),
        "per_device_eval_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "save_steps": steps,
        "eval_steps": steps,
        "logging_steps": 1,
        "report_to": "none",
        "eval_base": False,
        "eval_max_new_tokens": 4,
        "quant_probe": False,
        "device_map": None,
    }
    if not torch.cuda.is_available():
        if recipe.bf16 or recipe.fp16:
            adjusted.update(bf16=False, fp16=False)  # mixed precision needs a GPU here
        if recipe.dtype in ("bfloat16", "float16"):
            adjusted["dtype"] = "float32"
        if recipe.bnb_4bit_compute_dtype in ("bfloat16", "float16"):
            adjusted["bnb_4bit_compute_dtype"] = "float32"
        if recipe.bnb_4bit_quant_storage:
            adjusted["bnb_4bit_quant_storage"] = "float32"
        if "paged" in recipe.optim or "8bit" in recipe.optim:
            adjusted["optim"] = "adamw_torch"  # paged/8-bit optimizers are CUDA kernels
    return adjusted


def _merge_reload_diff(twin: Path, run: Path, work: Path) -> float:
    """Merge on a full-precision reload (never into a quantized base), save, reload: max |logit| difference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(twin), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(run / "adapter"))
    tuned.eval()
    ids = torch.arange(3, 3 + 12).remainder(base.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        want = tuned(input_ids=ids).logits
    merged = tuned.merge_and_unload()
    merged.save_pretrained(work / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(str(work / "merged"), dtype=torch.float32)
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    diff = float((want - got).abs().max())
    if not math.isfinite(diff) or diff > 1e-3:
        raise RuntimeError(f"smoke: merged and reloaded logits differ from the adapter's by {diff:g}")
    return diff


def _head(path: str | None, out: Path, n: int) -> str | None:
    """The first ``n`` lines of a data file (the smoke run needs a handful of rows, not the whole set)."""
    if not path:
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [ln for _, ln in zip(range(n), f)]
    out.write_text("".join(lines), encoding="utf-8")
    return str(out)
