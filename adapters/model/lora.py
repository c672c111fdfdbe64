"""LoRA through PEFT: a LoraConfig from the recipe, k-bit preparation, the adapter's dtype, parameter counts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapters.config import Recipe
from adapters.utils.errors import AdaptersError

if TYPE_CHECKING:
    import torch


def lora_config(recipe: Recipe):
    """The recipe's LoraConfig: our defaults, then the LoraConfig keys the recipe gives, by name."""
    from peft import LoraConfig

    return LoraConfig(**recipe.library_kwargs("lora"), task_type="CAUSAL_LM")


def attach_lora(model, recipe: Recipe):
    """Wrap ``model`` in a PeftModel. Quantized bases go through ``prepare_model_for_kbit_training`` first."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if recipe.init_adapter:
        return load_init_adapter(model, recipe)
    return get_peft_model(model, lora_config(recipe))


LORA_KEYS = ("r", "lora_alpha", "use_rslora", "use_dora", "bias", "modules_to_save")


class InitAdapterError(AdaptersError, ValueError):
    """--init_adapter names an adapter that does not fit this recipe or this base."""


def load_init_adapter(model, recipe: Recipe):
    """The adapter named by ``init_adapter``, trainable, on ``model``: checked against the base (fingerprint) and
    against the recipe's LoRA config, so continued training means the recipe it says."""
    from peft import PeftModel

    from adapters.publish.hub import resolve_adapter
    from adapters.publish.rundir import check_base

    src = resolve_adapter(recipe.init_adapter)
    check_base(src, model)  # RunError names the fingerprint when the adapter belongs to another base
    diff = init_adapter_diff(src, recipe)
    peft_model = PeftModel.from_pretrained(model, str(src.adapter_dir), is_trainable=True)
    want = lora_config(recipe)
    if isinstance(want.target_modules, str) and (missed := _linears_without_lora(peft_model)):
        diff.append(f"target_modules: the recipe's {want.target_modules!r} also covers {sorted(missed)}")
    _refuse_diff(recipe, diff)
    return peft_model


def init_adapter_diff(src, recipe: Recipe) -> list[str]:
    """The LoRA keys (and listed target modules) where the adapter ``src`` (a resolved Run) and the recipe differ:
    what can be known without a model, so ``train`` refuses it before the run folder is claimed."""
    from peft import PeftConfig

    have, want = PeftConfig.from_pretrained(str(src.adapter_dir)), lora_config(recipe)
    diff = [f"{k}: adapter {getattr(have, k, None)!r}, recipe {getattr(want, k, None)!r}" for k in LORA_KEYS]
    diff = [d for k, d in zip(LORA_KEYS, diff) if getattr(have, k, None) != getattr(want, k, None)]
    if not isinstance(want.target_modules, str) and set(have.target_modules) != set(want.target_modules):
        diff.append(f"target_modules: adapter {sorted(have.target_modules)}, recipe {sorted(want.target_modules)}")
    return diff


def _refuse_diff(recipe: Recipe, diff: list[str]) -> None:
    if diff:
        raise InitAdapterError(
            f"init_adapter {recipe.init_adapter}: its LoRA config differs from the recipe's ({'; '.join(diff)}); "
            "set the recipe's keys to the adapter's to continue training it"
        )


def check_init_adapter(recipe: Recipe) -> None:
    """Before any model: the adapter resolves (a run, an adapter folder or a hub id; its file whole) and its LoRA
    config is the recipe's. The base fingerprint is checked once the base is loaded (``load_init_adapter``)."""
    from adapters.publish.hub import resolve_adapter

    _refuse_diff(recipe, init_adapter_diff(resolve_adapter(recipe.init_adapter), recipe))


def _linears_without_lora(peft_model) -> set[str]:
    """Linear layer names (last part) of the base that carry no LoRA: what 'all-linear' would have added."""
    import torch
    from peft.tuners.lora import LoraLayer

    wrapped, linear = set(), set()
    for name, m in peft_model.named_modules():
        if isinstance(m, LoraLayer):
            wrapped.add(name.rsplit(".", 1)[-1])
        elif isinstance(m, torch.nn.Linear) and ".lora_" not in name and not name.endswith(("lm_head", "base_layer")):
            linear.add(name.rsplit(".", 1)[-1])
    return linear - wrapped


def adapter_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype the trainable LoRA tensors train and are saved in: ``adapter_dtype``, else the recipe's ``dtype``
    (float32 where that is auto)."""
    import torch

    from adapters.utils.dtypes import torch_dtype

    name = recipe.adapter_dtype if recipe.adapter_dtype != "auto" else recipe.dtype
    return torch_dtype(name) if name != "auto" else torch.float32


def cast_trainable(model, dtype: torch.dtype) -> None:
    """Put every trainable floating-point tensor in ``dtype``, in place.

    The libraries disagree on it: TRL casts LoRA to bfloat16 on a quantized base, PEFT's ``load_adapter`` (the
    Trainer's resume, and its best-checkpoint restore) casts it back to float32. Without one rule a resumed run
    trains and saves in another dtype than an unbroken one. DoRA's magnitude vector stays float32 under a 16-bit
    dtype, as TRL keeps it: its updates are below bfloat16's resolution.
    """
    import torch

    for name, p in model.named_parameters():
        if not (p.requires_grad and p.is_floating_point()):
            continue
        want = torch.float32 if "lora_magnitude_vector" in name and dtype.itemsize < 4 else dtype
        if p.dtype != want:
            p.data = p.data.to(want)


def parameter_counts(model) -> dict[str, Any]:
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable": int(trainable), "total": int(total), "trainable_pct": round(100 * trainable / total, 4)}
