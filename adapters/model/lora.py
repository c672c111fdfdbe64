"""LoRA through PEFT: a LoraConfig from the recipe, k-bit preparation, parameter counts."""

from __future__ import annotations

from typing import Any

from adapters.config import Recipe


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
    return get_peft_model(model, lora_config(recipe))


def parameter_counts(model) -> dict[str, Any]:
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable": int(trainable), "total": int(total), "trainable_pct": round(100 * trainable / total, 4)}
