"""``adapters plan RECIPE``: preflight, a per-GPU memory estimate, the largest micro-batch that fits, and
``--smoke``: the recipe run for a few steps on a tiny random twin of its model, then merged and reloaded.

The model's size comes from its config alone: the model is built on the meta device with accelerate's
``init_empty_weights`` and PEFT attaches the recipe's LoRA to it there, so parameter counts are exact and nothing
is downloaded or allocated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.config import Recipe
from adapters.model.shapes import known_config
from adapters.planning.preflight import Launch, check, launch_from_config
from adapters.utils.dtypes import dtype_bytes
from adapters.utils.errors import PathNotFoundError

GIB = 2**30
# Published configs of the shipped recipes' models, for when the hub cannot be reached (sizes from their config.json).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": known_config("llama-3.2-1b", dtype="bfloat16", bos_token_id=128000, eos_token_id=128009),
    "qwen2.5-1.5b": known_config("qwen2.5-1.5b", dtype="bfloat16", bos_token_id=151643, eos_token_id=151645),
    "gemma-3-270m": known_config("gemma-3-270m", dtype="bfloat16"),
    "llama-3.1-8b": known_config("llama-3.1-8b", dtype="bfloat16", bos_token_id=128000, eos_token_id=128001),
    # meta-llama/Llama-3.1-70B config.json: the 8B block, wider and deeper (Llama 3.3 70B has the same shape)
    "llama-3.1-70b": known_config(
        "llama-3.1-8b",
        dtype="bfloat16",
        bos_token_id=128000,
        eos_token_id=128001,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
    ),  # fmt: skip
}
# Family defaults (by model type in the id) when the id names no size, or one of these sizes.
FAMILY_OF = {"llama": "llama-3.2-1b", "qwen": "qwen2.5-1.5b", "gemma": "gemma-3-270m"}
_SIZE = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?[bm])(?![a-z0-9])")  # "70b" in "llama-3.1-70b-instruct"


# ---------------------------------------------------------------------------------------------------- model config
def model_config(recipe: Recipe) -> tuple[Any, str]:
    """The config of the recipe's model, and where it came from. Reads only config.json; no weights."""
    from transformers import AutoConfig

    from adapters.model.sources import resolve_model

    source = recipe.model_name_or_path
    if source.startswith("embedded:") or Path(source).expanduser().exists():
        ref = resolve_model(source)  # embedded: the cached conversion's config
        return AutoConfig.from_pretrained(ref.path, trust_remote_code=recipe.trust_remote_code), ref.path
    try:
        cfg = AutoConfig.from_pretrained(source, revision=recipe.revision, trust_remote_code=recipe.trust_remote_code)
        return cfg, f"{source} (hub or local hub cache)"
    except Exception as e:  # offline, gated, or unknown id
        key, note = builtin_config_for(source, type(e).__name__)
        values = dict(KNOWN_CONFIGS[key])
        cfg = AutoConfig.for_model(values.pop("model_type"), **values)
        return cfg, f"built-in {key} config ({note})"


def builtin_config_for(source: str, why: str) -> tuple[str, str]:
    """The KNOWN_CONFIGS key to plan ``source`` with when its config cannot be read, and a note saying so.

    An exact name wins; else the family's entry of the size the id names (Llama-3.3-70B: llama-3.1-70b's shape,
    "assumed"); else, for an id naming no size, the family default ("assumed"). An id naming a size the table lacks
    is refused: planning a 70B model with a 1B shape would print a plan off by 70x.
    """
    name = source.lower()
    exact = next((k for k in KNOWN_CONFIGS if k in name), None)
    if exact:
        return exact, f"hub not reachable for {source!r}"
    family = next((f for f in FAMILY_OF if f in name), None)
    size = _SIZE.search(name.rsplit("/", 1)[-1])
    known = ", ".join(KNOWN_CONFIGS)
    if family is None:
        raise PathNotFoundError(
            f"model {source!r}: config not reachable ({why}) and no built-in config for this family ({known})"
        )
    same = [k for k in KNOWN_CONFIGS if family in k and size and _SIZE.search(k).group(1) == size.group(1)]
    if size and not same:
        raise PathNotFoundError(
            f"model {source!r}: config not reachable ({why}) and no built-in {family} config of size "
            f"{size.group(1).upper()} ({known}); give a local folder with its config.json as --model_name_or_path"
        )
    key = same[0] if same else FAMILY_OF[family]
    what = f"same family and size {size.group(1).upper()}" if size else "the id names no size: family default"
    return key, f"ASSUMED for {source!r}: {what}; hub not reachable"


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
    wb = dtype_bytes(recipe.dtype)
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
    details: dict[str, Any] = {}
    if getattr(recipe, "preference", False):
        # a DPO / ORPO sample is two sequences (chosen and rejected) through the policy with gradients; KTO's is its
        # answer plus the mismatched KL answer. The reference (DPO / KTO) adds one no-grad forward of both: one
        # layer's activations live at a time and the full-vocabulary logits, unless its log-probs were precomputed.
        seqs = 2
        full, ckpt, acts, logits, unchunked = (x * seqs for x in (full, ckpt, acts, logits, unchunked))
        precomputed = recipe.trainer == "orpo" or bool(getattr(recipe, "precompute_ref_log_probs", False))
        ref = 0 if precomputed else seqs * (tokens * per_layer * act_b + tokens * counts.vocab * 4)
        logits += ref
        details.update({"sequences_per_sample": seqs, "reference_pass_per_sample": ref})
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
        {
            "quantized_weights": quant,
            "other_weights": other_b,
            "sharded_over": launch.num_processes if sharded else 1,
            **details,
        },
    )


def format_plan(recipe: Recipe, counts: Counts, est: Estimate, gpu_gib: float, source: str, launch: Launch) -> str:
    g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    b = recipe.per_device_train_batch_size
    lines = [
        f"model config: {source}",
        f"launch: {launch.source}, {launch.num_processes} process(es) on {launch.num_machines} machine(s), "
        f"{launch.distributed_type}",
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
        *(
            [
                f"  {recipe.trainer}: {est.details['sequences_per_sample']} sequences per sample (activations and logits "
                "above include both); reference forward "
                + (
                    f"{g(b * est.details['reference_pass_per_sample']).strip()} (in logits)"
                    if est.details["reference_pass_per_sample"]
                    else "none (precomputed or no reference)"
                )
            ]
            if "sequences_per_sample" in est.details
            else []
        ),
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
    nodes: int = 1,
    recipe_name: str = "RECIPE",
) -> str:
    """Preflight + estimate; returns the report text, raises PreflightError on a bad combination.

    ``nodes`` machines of ``gpus`` GPUs each: nodes x gpus processes (``nproc`` overrides), and the launch lines.
    """
    if accelerate_config:
        launch = launch_from_config(accelerate_config, num_processes=nproc or (nodes * gpus if nodes > 1 else None))
    else:
        n = nproc or nodes * gpus
        launch = Launch(n, "MULTI_GPU" if n > 1 else "NO", source="plain DDP" if n > 1 else "single process")
    if nodes > 1:
        launch.num_machines = nodes
    config, source = model_config(recipe)
    check(recipe, launch, config)
    counts = count_parameters(config, recipe)
    est = estimate(recipe, counts, launch)
    text = "preflight: ok\n" + format_plan(recipe, counts, est, gpu_mem_gib, source, launch)
    return text + (launch_lines(launch, accelerate_config, recipe_name) if launch.num_machines > 1 else "")


def launch_lines(launch: Launch, accelerate_config: str | None, recipe_name: str) -> str:
    """How to start this plan on several machines: one launcher per machine (docs/scale-out.md)."""
    config = Path(launch.source).stem if accelerate_config else "multi-node"
    per = launch.num_processes // launch.num_machines
    return (
        f"\nlaunch: one launcher per machine, {per} process(es) each; on machine r = 0..{launch.num_machines - 1}:\n"
        f"  accelerate launch --config_file adapters/accelerate_configs/{config}.yaml --num_machines "
        f"{launch.num_machines} --num_processes {launch.num_processes} --machine_rank r --main_process_ip "
        f"<machine 0> --main_process_port 29500 -m adapters train {recipe_name} ...\n"
        f"  or on SLURM: ACCELERATE_CONFIG={config} GPUS_PER_NODE={per} sbatch --nodes {launch.num_machines} "
        f"--gpus-per-node {per} scripts/slurm/train.sbatch {recipe_name} ..."
    )


# ---------------------------------------------------------------------------------------------------- smoke run
