"""``adapters plan RECIPE``: preflight, a per-GPU memory estimate, the largest micro-batch that fits, and
``--smoke``: the recipe run for a few steps on a tiny random twin of its model, then merged and reloaded.

The model's size comes from its config alone: the model is built on the meta device with accelerate's
``init_empty_weights`` and PEFT attaches the recipe's LoRA to it there, so parameter counts are exact and nothing
is downloaded or allocated.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from adapters.config.recipe import Recipe
from adapters.model.shapes import known_config
from adapters.planning.preflight import Launch, check, launch_from_config

GIB = 2**30
# Published configs of the shipped recipes' models, for when the hub cannot be reached (sizes from their config.json).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": known_config("llama-3.2-1b", dtype="bfloat16", bos_token_id=128000, eos_token_id=128009),
    "qwen2.5-1.5b": known_config("qwen2.5-1.5b", dtype="bfloat16", bos_token_id=151643, eos_token_id=151645),
    "gemma-3-270m": dict(
        model_type="gemma3_text",
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=262144,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        dtype="bfloat16",
        sliding_window=512,
    ),
}
# Family defaults (by model type in the id) when the exact size is not in KNOWN_CONFIGS.
FAMILY_OF = {"llama": "llama-3.2-1b", "qwen": "qwen2.5-1.5b", "gemma": "gemma-3-270m"}


# ---------------------------------------------------------------------------------------------------- model config
def model_config(recipe: Recipe) -> tuple[Any, str]:
    """The config of the recipe's model, and where it came from. Reads only config.json; no weights."""
    from transformers import AutoConfig

    from adapters.model.loading import resolve_model

    source = recipe.model_name_or_path
    if source.startswith("embedded:") or Path(source).expanduser().exists():
        ref = resolve_model(source)  # embedded: the cached conversion's config
        return AutoConfig.from_pretrained(ref.path, trust_remote_code=recipe.trust_remote_code), ref.path
    try:
        cfg = AutoConfig.from_pretrained(source, revision=recipe.revision, trust_remote_code=recipe.trust_remote_code)
        return cfg, f"{source} (hub or local hub cache)"
    except Exception as e:  # offline, gated, or unknown id
        key = next((k for k in KNOWN_CONFIGS if k in source.lower()), None)
        key = key or next((v for f, v in FAMILY_OF.items() if f in source.lower()), None)
        if key is None:
            raise FileNotFoundError(
                f"model {source!r}: config not reachable ({type(e).__name__}) and no built-in "
                f"config for this family ({', '.join(KNOWN_CONFIGS)})"
            ) from None
        values = dict(KNOWN_CONFIGS[key])
        cfg = AutoConfig.for_model(values.pop("model_type"), **values)
        return cfg, f"built-in {key} config (hub not reachable for {source!r})"


# ---------------------------------------------------------------------------------------------------- counting
@dataclass
class Counts:
    quantizable: int  # nn.Linear weights inside the decoder (bitsandbytes quantizes these)
    other: int  # embeddings, norms, lm_head (kept unquantized)
    lora: int  # trainable LoRA parameters
    lora_modules: int
    hidden: int
    intermediate: int
    layers: int
    q_dim: int
    kv_dim: int
    vocab: int
    lora_inputs: list[int] = field(default_factory=list)  # input width of each LoRA-wrapped module, one layer


def count_parameters(config: Any, recipe: Recipe) -> Counts:
    """Build the model and its LoRA on the meta device and count, exactly as transformers and PEFT would."""
    import torch
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from adapters.model.lora import lora_config

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    if getattr(getattr(config, "text_config", None) or config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight  # from_config leaves them apart
    out_emb = model.get_output_embeddings()
    seen, quantizable, other = set(), 0, 0
    for _name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, torch.nn.Linear) and module is not out_emb and p.dim() == 2:
                quantizable += p.numel()
            else:
                other += p.numel()
    with init_empty_weights():
        peft_model = get_peft_model(model, lora_config(recipe))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    from peft.tuners.lora import LoraLayer

    wrapped = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]
    text = getattr(config, "text_config", None) or config
    h = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    layers = text.num_hidden_layers
    first = [m.in_features for n, m in wrapped if ".layers.0." in n]
    return Counts(
        quantizable,
        other,
        int(trainable),
        len(wrapped),
        h,
        text.intermediate_size,
        layers,
        heads * head_dim,
        kv * head_dim,
        text.vocab_size,
        first,
    )


# ---------------------------------------------------------------------------------------------------- estimate
def _bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)


def _optimizer_bytes(optim: str) -> float:
    if "8bit" in optim:
        return 2.0  # two 8-bit Adam moments
    if optim.startswith("sgd"):
        return 0.0
    if "adafactor" in optim:
        return 0.5  # factored second moment, roughly
    return 8.0  # two fp32 Adam moments


@dataclass
class Estimate:
    weights: float
    lora: float
    activations_per_sample: float
    activations_per_sample_no_ckpt: float
    activations_per_sample_ckpt: float
    logits_per_sample: float
    logits_unchunked_per_sample: float
    overhead: float
    tokens: int
    details: dict[str, Any]

    def total(self, batch: int) -> float:
        return self.weights + self.lora + self.overhead + batch * (self.activations_per_sample + self.logits_per_sample)

    def max_batch(self, gpu_bytes: float) -> int:
        per = self.activations_per_sample + self.logits_per_sample
        room = gpu_bytes - (self.weights + self.lora + self.overhead)
        return max(0, int(room // per)) if per > 0 else 0


def estimate(
    recipe: Recipe,
    counts: Counts,
    launch: Launch | None = None,
    tokens: int | None = None,
    overhead_bytes: float = 1.0 * GIB,
) -> Estimate:
    """Per-GPU bytes: weights (quantized per bitsandbytes' layout), LoRA + grads + optimizer, activations, logits.

    Activations per token per decoder layer, saved for backward (frozen base: the LoRA branches still need their
    inputs): two norm inputs and outputs (4h), q and attention output (2 q_dim), k and v (2 kv_dim) plus rotated
    q/k (q_dim + kv_dim), MLP gate, up, act(gate) and the down-projection input (4 intermediate), and with
    lora_dropout one dropped copy of each LoRA input. With gradient checkpointing only each layer's input (h) is
    kept, plus one layer recomputed at a time.
    """
    launch = launch or Launch()
    tokens = tokens or recipe.max_length
    wb = _bytes(recipe.dtype)
    act_b = 2 if (recipe.bf16 or recipe.fp16) else wb
    # weights
    if recipe.load_in_4bit:
        # 4 bits per weight + one absmax per 64-weight block (fp32; with double quant 8-bit + fp32 per 256 blocks)
        per = 0.5 + (1 / 64 + 4 / (64 * 256) if recipe.bnb_4bit_use_double_quant else 4 / 64)
        quant, other_b = counts.quantizable * per, counts.other * 4  # k-bit prep casts the rest to fp32
    elif recipe.load_in_8bit:
        quant, other_b = counts.quantizable * 1.0, counts.other * 4
    else:
        quant, other_b = counts.quantizable * wb, counts.other * wb
    weights = quant + other_b
    sharded = launch.fsdp or launch.zero3
    if sharded and launch.num_processes > 1:
        weights /= launch.num_processes
    lora_state = counts.lora * (4 + 4 + _optimizer_bytes(recipe.optim))  # fp32 params + grads + optimizer
    if sharded or (launch.distributed_type == "DEEPSPEED" and (launch.zero_stage or 0) >= 1):
        lora_state = counts.lora * 8 + counts.lora * _optimizer_bytes(recipe.optim) / max(launch.num_processes, 1)
    h, i, q, kv, n_layers = counts.hidden, counts.intermediate, counts.q_dim, counts.kv_dim, counts.layers
    per_layer = 4 * h + 2 * q + 2 * kv + (q + kv) + 4 * i
    if recipe.lora_dropout > 0:
        per_layer += sum(counts.lora_inputs) * (1 + 1 / act_b)  # dropped copies + their masks (1 byte)
    full = tokens * n_layers * per_layer * act_b
    ckpt = tokens * n_layers * h * act_b + tokens * per_layer * act_b
    acts = ckpt if recipe.gradient_checkpointing else full
    # logits: TRL's fused LM head scores tokens in chunks (4096 tokens x 32768 vocab entries) in fp32
    try:
        from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    except ImportError:  # pragma: no cover - older TRL
        TOKEN_CHUNK_SIZE = 4096
    logits = min(tokens, TOKEN_CHUNK_SIZE) * min(counts.vocab, 32768) * 4 + tokens * 4 * 4
    unchunked = tokens * counts.vocab * 4 * 2  # fp32 logits and their gradient
    return Estimate(
        weights,
        lora_state,
        acts,
        full,
        ckpt,
        logits,
        unchunked,
        overhead_bytes,
        tokens,
        {"quantized_weights": quant, "other_weights": other_b, "sharded_over": launch.num_processes if sharded else 1},
    )


def format_plan(recipe: Recipe, counts: Counts, est: Estimate, gpu_gib: float, source: str, launch: Launch) -> str:
    g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    b = recipe.per_device_train_batch_size
    lines = [
        f"model config: {source}",
        f"launch: {launch.source}, {launch.num_processes} process(es), {launch.distributed_type}",
        f"parameters: {counts.quantizable + counts.other:,} ({counts.quantizable:,} in quantizable linear layers); "
        f"LoRA {counts.lora:,} on {counts.lora_modules} modules",
        f"per-GPU memory estimate (sequence {est.tokens} tokens, micro-batch {b}):",
        f"  weights ({'4-bit' if recipe.load_in_4bit else '8-bit' if recipe.load_in_8bit else recipe.dtype})"
        f"{'':{max(1, 25 - len(recipe.dtype))}s}{g(est.weights)}"
        + (f"  (sharded over {est.details['sharded_over']})" if est.details["sharded_over"] > 1 else ""),
        f"  LoRA params + grads + optimizer state {g(est.lora)}   ({recipe.optim})",
        f"  activations, gradient checkpointing   {g(b * est.activations_per_sample_ckpt)}"
        + ("   <- recipe" if recipe.gradient_checkpointing else ""),
        f"  activations, no checkpointing         {g(b * est.activations_per_sample_no_ckpt)}"
        + ("" if recipe.gradient_checkpointing else "   <- recipe"),
        f"  logits (TRL chunked LM head)          {g(b * est.logits_per_sample)}"
        f"   (unchunked would be {b * est.logits_unchunked_per_sample / GIB:.2f} GiB)",
        f"  CUDA context + allocator slack        {g(est.overhead)}",
        f"  total                                 {g(est.total(b))}   on a {gpu_gib:g} GiB GPU",
        f"largest micro-batch that fits at {est.tokens} tokens: {est.max_batch(gpu_gib * GIB)}"
        + (
            f" (recipe uses {b})"
            if est.max_batch(gpu_gib * GIB) >= b
            else f" -- the recipe's {b} does NOT fit: "
            f"lower per_device_train_batch_size and raise gradient_accumulation_steps"
        ),
    ]
    return "\n".join(lines)


def plan(
    recipe: Recipe,
    gpus: int = 1,
    gpu_mem_gib: float = 24.0,
    nproc: int | None = None,
    accelerate_config: str | None = None,
) -> str:
    """Preflight + estimate; returns the report text, raises PreflightError on a bad combination."""
    if accelerate_config:
        launch = launch_from_config(accelerate_config, num_processes=nproc)
    else:
        n = nproc or gpus
        launch = Launch(n, "MULTI_GPU" if n > 1 else "NO", source="plain DDP" if n > 1 else "single process")
    config, source = model_config(recipe)
    check(recipe, launch, config)
    counts = count_parameters(config, recipe)
    est = estimate(recipe, counts, launch)
    return "preflight: ok\n" + format_plan(recipe, counts, est, gpu_mem_gib, source, launch)


# ---------------------------------------------------------------------------------------------------- smoke run
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


def build_twin(recipe: Recipe, out: Path) -> tuple[Path, str]:
    """Write a tiny random twin of the recipe's model (config + weights + tokenizer) into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.data.encode import read_rows

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
    cfg = twin_config(config)
    text = getattr(cfg, "text_config", None) or cfg
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
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapters.training.run import train

    t0 = time.time()
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="adapters-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        twin, note = build_twin(recipe, work / "twin")
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
        run_recipe = replace(recipe, **adjusted)
        run_recipe = replace(run_recipe, test_file=_head(recipe.test_file, work / "test.jsonl", 4))
        run_recipe = replace(run_recipe, eval_file=_head(recipe.eval_file, work / "val.jsonl", 4))
        run_recipe = replace(
            run_recipe,
            train_file=_head(recipe.train_file, work / "train.jsonl", steps * run_recipe.per_device_train_batch_size),
        )
        with _no_bnb_cpu_inference_layout():
            run = train(run_recipe, recipe_path)
        manifest = json.loads((run / "manifest.json").read_text())
        # merge on a full-precision reload (never into a quantized base), save, reload, compare logits
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


def _no_bnb_cpu_inference_layout():
    """bitsandbytes on AVX512-BF16 CPUs repacks a 4-bit weight into an inference-only layout at its first eval-mode
    forward (the quantization probe); training a layer with a bias afterwards then fails with an in-place error
    (Qwen2's q/k/v). That layout is a CPU inference speed-up only, so the smoke run turns it off."""
    import contextlib
    from unittest import mock

    try:
        import bitsandbytes.nn.modules as bnb_modules
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(bnb_modules, "has_avx512bf16"):
        return contextlib.nullcontext()
    return mock.patch.object(bnb_modules, "has_avx512bf16", lambda: False)


def _head(path: str | None, out: Path, n: int) -> str | None:
    """The first ``n`` lines of a data file (the smoke run needs a handful of rows, not the whole set)."""
    if not path:
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [ln for _, ln in zip(range(n), f)]
    out.write_text("".join(lines), encoding="utf-8")
    return str(out)
