"""Per-process behaviour under ``accelerate launch``: the process state, the world, and gathered adapter saves.

- ``process_state()`` is the one ``PartialState`` of the run. Where there is no CUDA it is built with ``cpu=True``,
  so that ``accelerate launch --multi_gpu --num_processes 2`` on a CPU machine forms a gloo world of 2 (a plain
  ``PartialState()`` there silently reports one process, and every rank would write the run directory).
- ``gathered_adapter_state(trainer)`` returns the full model state dict where parameters are sharded (FSDP, DeepSpeed
  ZeRO-3). It is a collective: every rank must call it; only the main process then writes.
- ``live_adapter_tensors(trainer)`` is what a complete adapter file holds: the trainable tensors of the model in
  memory (gathered full tensors under FSDP / ZeRO-3) under the names PEFT saves them with. Also a collective.
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


def adapter_tensors(model, state_dict: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The tensors ``model.save_pretrained`` writes (PEFT's own selection and names), copied to the CPU.

    ``state_dict``: the gathered full state under FSDP / ZeRO-3, else the model's own tensors are used.
    """
    from peft.utils import get_peft_model_state_dict

    selected = get_peft_model_state_dict(model, state_dict=state_dict)
    return {k: v.detach().to("cpu", copy=True) for k, v in selected.items()}


def live_adapter_tensors(trainer) -> dict[str, torch.Tensor] | None:
    """What the checkpoint being written must hold, on the process that writes it (None elsewhere).

    Call on EVERY process: under FSDP / ZeRO-3 the full tensors are gathered, a collective.
    """
    full = gathered_adapter_state(trainer)
    if not trainer.args.should_save:
        return None
    return adapter_tensors(trainer.accelerator.unwrap_model(trainer.model), full)


def lora_module_count(model, adapter_name: str = "default") -> int:
    """How many modules carry a LoRA adapter; a complete adapter file has one lora_A and one lora_B for each."""
    from peft.tuners.lora import LoraLayer

    return sum(1 for m in model.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A)
