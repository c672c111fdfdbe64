"""Preflight: refuse known-bad combinations of recipe, model and launcher before anything is loaded.

Each check names the fix. They run in ``adapters plan`` and at the start of ``adapters train`` (on every rank, from
the environment ``accelerate launch`` sets), so a bad launch fails in seconds, not hours into a run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.config import Recipe
from adapters.utils.errors import AdaptersError, PathNotFoundError

CONFIG_DIR = Path(__file__).parents[1] / "accelerate_configs"
# Model families trained in bfloat16 whose activations overflow float16 (NaN losses under fp16 autocast).
BF16_ONLY_TYPES = {"gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text"}


class PreflightError(AdaptersError, ValueError):
    """A known-bad combination; the message lists each problem and its fix."""


@dataclass
class Launch:
    """How the training processes are (or will be) launched."""

    num_processes: int = 1
    distributed_type: str = "NO"  # NO | MULTI_GPU | MULTI_CPU | FSDP | DEEPSPEED
    fsdp_version: int | None = None
    zero_stage: int | None = None
    zero3_save_16bit: bool | None = None
    fsdp_state_dict_type: str | None = None
    source: str = "single process"
    num_machines: int = 1  # num_processes is the total over all machines, as in accelerate's configs

    @property
    def fsdp(self) -> bool:
        return self.distributed_type == "FSDP"

    @property
    def zero3(self) -> bool:
        return self.distributed_type == "DEEPSPEED" and self.zero_stage == 3


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path, or the name of a shipped config (``ddp``, ``fsdp2-qlora``, ``zero3`` …)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / f"{p.stem if p.suffix == '.yaml' else p.name}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")))
    raise PathNotFoundError(f"accelerate config {str(name_or_path)!r}: no such file, nor a shipped config ({names})")


def launch_from_config(path: str | Path, num_processes: int | None = None) -> Launch:
    """Read an accelerate config file with accelerate's own config classes."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = resolve_config_path(path)
    try:
        cfg = load_config_from_file(str(path))
    except Exception as e:  # accelerate raises TypeError/ValueError on unknown or bad keys
        raise PreflightError(f"{path}: not a valid accelerate config: {e}") from None
    dist = str(getattr(cfg.distributed_type, "value", cfg.distributed_type))
    fsdp = getattr(cfg, "fsdp_config", None) or {}
    ds = getattr(cfg, "deepspeed_config", None) or {}
    return Launch(
        num_processes=int(num_processes or cfg.num_processes or 1),
        distributed_type=dist,
        fsdp_version=int(fsdp.get("fsdp_version", 1)) if dist == "FSDP" else None,
        zero_stage=int(ds.get("zero_stage", 0)) if dist == "DEEPSPEED" else None,
        zero3_save_16bit=bool(ds.get("zero3_save_16bit_model", False)) if dist == "DEEPSPEED" else None,
        fsdp_state_dict_type=fsdp.get("fsdp_state_dict_type") if dist == "FSDP" else None,
        source=str(path),
        num_machines=int(cfg.num_machines or 1),
    )


def launch_from_env(env: dict[str, str] | None = None) -> Launch:
    """The launch as ``accelerate launch`` describes it to each process through environment variables."""
    env = dict(os.environ if env is None else env)
    world = int(env.get("WORLD_SIZE", "1") or 1)
    truthy = ("1", "true", "yes")
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in truthy:
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        save16 = env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL")
        return Launch(
            world,
            "DEEPSPEED",
            zero_stage=int(stage) if stage else None,
            zero3_save_16bit=None if save16 is None else save16.lower() in truthy,
            source="accelerate launch (environment)",
        )
    if env.get("ACCELERATE_USE_FSDP", "").lower() in truthy:
        return Launch(
            world,
            "FSDP",
            fsdp_version=int(env.get("FSDP_VERSION", "1")),
            fsdp_state_dict_type=env.get("FSDP_STATE_DICT_TYPE"),
            source="accelerate launch (environment)",
        )
    return Launch(
        world,
        "MULTI_GPU" if world > 1 else "NO",
        source="accelerate launch (environment)" if world > 1 else "single process",
    )


# ---------------------------------------------------------------------------------------------------- checks
def _dtype_name(value: Any) -> str | None:
    if value is None:
        return None
    return str(value).replace("torch.", "")


def problems(recipe: Recipe, launch: Launch, model_config: Any = None) -> list[str]:
    """Every known-bad combination in (recipe, launch, model config), each message naming its fix."""
    out: list[str] = []
    compute = recipe.bnb_4bit_compute_dtype or (recipe.dtype if recipe.dtype != "auto" else "bfloat16")

    if launch.zero3 and recipe.load_in_4bit:
        out.append(
            "DeepSpeed ZeRO-3 with load_in_4bit: ZeRO-3 cannot partition packed 4-bit weights here. Fix: "
            "use the fsdp2-qlora accelerate config (with bnb_4bit_quant_storage equal to the compute dtype), "
            "or zero2, or set load_in_4bit: false for ZeRO-3."
        )
    if launch.zero3 and launch.zero3_save_16bit is False:
        out.append(
            "DeepSpeed ZeRO-3 without zero3_save_16bit_model: the saved adapter would hold empty shards. "
            "Fix: set zero3_save_16bit_model: true in the deepspeed_config of the accelerate config."
        )
    if launch.fsdp and recipe.load_in_4bit and _dtype_name(recipe.bnb_4bit_quant_storage) != _dtype_name(compute):
        out.append(
            f"FSDP with a 4-bit base needs bnb_4bit_quant_storage equal to the compute dtype ({compute}); "
            f"it is {recipe.bnb_4bit_quant_storage!r}, so FSDP cannot shard the packed weights together with "
            f"the {compute} ones. Fix: --bnb_4bit_quant_storage {compute}."
        )
    if launch.fsdp and recipe.load_in_8bit:
        out.append(
            "FSDP with load_in_8bit: bitsandbytes int8 weights cannot be sharded by FSDP. Fix: use "
            "load_in_4bit with bnb_4bit_quant_storage equal to the compute dtype, or the ddp config."
        )
    if launch.fsdp and launch.fsdp_state_dict_type and launch.fsdp_state_dict_type != "FULL_STATE_DICT":
        out.append(
            f"FSDP with fsdp_state_dict_type {launch.fsdp_state_dict_type}: checkpoints would hold per-rank "
            "shards, not a loadable adapter. Fix: fsdp_state_dict_type: FULL_STATE_DICT."
        )
    if launch.fsdp and recipe.base_kl_weight > 0:
        out.append(
            f"FSDP with the forgetting guard (base_kl_weight {recipe.base_kl_weight:g}): the guard's extra forward "
            "of the base frees the LM head weight that TRL's fused head keeps for its backward (seen on an H200, "
            "docs/gpu.md; the same run without the guard trained). Fix: --base_kl_weight 0 under FSDP (then check "
            "forgetting with adapters eval), or the ddp config, which runs the guard."
        )
    device_map = recipe.device_map or (recipe.model_init_kwargs or {}).get("device_map")
    if launch.num_processes > 1 and device_map is not None:
        out.append(
            f"device_map={device_map!r} with {launch.num_processes} processes: every process would spread "
            "one model over all GPUs, and the processes fight over them. Fix: remove device_map (each "
            "process then loads one whole model on its own GPU), or run one process."
        )
    if recipe.packing and recipe.packing_strategy == "wrapped":
        out.append(
            "packing with packing_strategy 'wrapped' cuts samples mid-sequence and lets packed samples "
            "attend to each other. Fix: --packing_strategy bfd (per-sample position ids keep attention "
            "inside each sample), or --packing false."
        )
    if (
        recipe.packing
        and recipe.attn_implementation in ("flash_attention_2", "flash_attention_3")
        and not _has_flash_attn()
    ):
        out.append(
            f"packing with attn_implementation {recipe.attn_implementation} but flash-attn is not installed. "
            "Fix: --attn_implementation sdpa (isolates samples by position ids too), or install flash-attn."
        )
    if recipe.fp16 and model_config is not None:
        model_type = getattr(model_config, "model_type", "")
        native = _dtype_name(getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None))
        if native == "bfloat16" or model_type in BF16_ONLY_TYPES:
            why = f"its config dtype is {native}" if native == "bfloat16" else f"{model_type} is trained in bfloat16"
            out.append(
                f"fp16 on a bf16-only model ({why}; float16 activations overflow to inf/NaN). "
                "Fix: --fp16 false --bf16 true (Ampere or newer), or train in float32."
            )
    if recipe.fp16 and recipe.dtype == "bfloat16":
        out.append("fp16 mixed precision with dtype bfloat16 weights. Fix: --bf16 true --fp16 false.")
    return out


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def check(recipe: Recipe, launch: Launch, model_config: Any = None) -> None:
    """Raise PreflightError listing every problem, or return quietly."""
    found = problems(recipe, launch, model_config)
    if found:
        lines = "\n".join(f"  - {p}" for p in found)
        raise PreflightError(
            f"preflight ({launch.source}, {launch.num_processes} process(es)) refused the recipe:\n{lines}"
        )


def before_train(recipe: Recipe, model_path: str | None = None) -> None:
    """The check ``train`` runs first, from the launcher's environment and the local model config if there is one."""
    config = None
    if model_path and (Path(model_path) / "config.json").is_file():
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(model_path, trust_remote_code=recipe.trust_remote_code)
        except Exception:  # an unreadable config fails later, at load, with the loader's own message
            config = None
    launch = launch_from_env()
    check(recipe, launch, config)
    import torch

    if (launch.fsdp or launch.distributed_type == "DEEPSPEED") and not torch.cuda.is_available():
        from accelerate import PartialState

        if PartialState().is_main_process:  # accelerate enables FSDP/DeepSpeed for GPU worlds only
            print(
                f"[preflight] warning: {launch.distributed_type} was requested but there is no CUDA GPU; the "
                "processes run as plain data parallel on CPU (gloo), parameters are not sharded",
                flush=True,
            )
