"""Per-process behaviour under ``accelerate launch``: the process state, the world, and gathered adapter saves.

- ``process_state()`` is the one ``PartialState`` of the run. Where there is no CUDA it is built with ``cpu=True``,
  so that ``accelerate launch --multi_gpu --num_processes 2`` on a CPU machine forms a gloo world of 2 (a plain
  ``PartialState()`` there silently reports one process, and every rank would write the run directory).
- ``gathered_adapter_state(trainer)`` returns the full model state dict where parameters are sharded (FSDP, DeepSpeed
  ZeRO-3). It is a collective: every rank must call it; only the main process then writes.
- ``lora_module_count(model)`` is the number of modules that carry a LoRA adapter, which the saved file must match.
"""

from __future__ import annotations

from typing import Any

import torch


def process_state():
    """The run's ``PartialState``: gloo on CPU (``cpu=True`` when no CUDA), NCCL on GPUs."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def sharding(trainer) -> str | None:
    """'fsdp', 'zero3' or None: whether the trainer's parameters are sharded across processes."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "fsdp"
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = trainer.accelerator.state.deepspeed_plugin
        if int(plugin.zero_stage or 0) == 3:
            return "zero3"
    return None


def gathered_adapter_state(trainer) -> dict[str, Any] | None:
    """The full (unsharded) state dict under FSDP / ZeRO-3, else None (the model's own tensors are complete).

    Call on EVERY process: gathering is a collective and a main-only call would hang the other ranks.
    """
    kind = sharding(trainer)
    if kind is None:
        return None
    model = trainer.model_wrapped if kind == "zero3" else trainer.model
    return trainer.accelerator.get_state_dict(model)


def lora_module_count(model, adapter_name: str = "default") -> int:
    """How many modules carry a LoRA adapter; a complete adapter file has one lora_A and one lora_B for each."""
    from peft.tuners.lora import LoraLayer

    return sum(1 for m in model.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A)
