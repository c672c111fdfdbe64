"""Per-process behaviour under ``accelerate launch``: the process state, the world, and gathered adapter saves.

- ``process_state()`` is the one ``PartialState`` of the run. Where there is no CUDA it is built with ``cpu=True``,
  so that ``accelerate launch --multi_gpu --num_processes 2`` on a CPU machine forms a gloo world of 2 (a plain
  ``PartialState()`` there silently reports one process, and every rank would write the run directory).
- ``gathered_adapter_state(trainer)`` returns the full model state dict where parameters are sharded (FSDP, DeepSpeed
  ZeRO-3). It is a collective: every rank must call it; only the main process then writes.
- ``live_adapter_tensors(trainer)`` is what a complete adapter file holds: the trainable tensors of the model in
  memory (gathered full tensors under FSDP / ZeRO-3) under the names PEFT saves them with. Also a collective.
- ``lora_module_count(model)`` is the number of modules that carry a LoRA adapter, which the saved file must match.
- ``world_record(state)``: the world the manifest records (machines, and each rank's host). A collective.
- ``is_peer_lost(exc)``: whether an exception is a collective that failed because another process is gone.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch

from adapters.utils.errors import AdaptersError


class PeerLostError(AdaptersError, RuntimeError):
    """Another process of the run stopped (killed, out of memory, its node lost); this one cannot go on alone."""


def process_state(timeout_s: float | None = None):
    """The run's ``PartialState``: gloo on CPU (``cpu=True`` when no CUDA), NCCL on GPUs.

    ``timeout_s``: how long a collective waits for a missing process (the recipe's ``ddp_timeout``). It must be
    given here: the first ``PartialState`` creates the process group, and the Trainer's later one reuses it.
    """
    from accelerate import PartialState

    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    return PartialState(cpu=not torch.cuda.is_available(), **kwargs)


def world_record(state) -> dict[str, Any]:
    """``world_size``, ``num_machines`` and one entry per rank (host, node rank, local rank), gathered from every
    process. Machines are counted by the launcher's node rank (GROUP_RANK), so two launches on one host count 2."""
    me = {
        "rank": state.process_index,
        "local_rank": state.local_process_index,
        "node_rank": int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")) or 0),
        "host": socket.gethostname(),
    }
    ranks = [me]
    if state.num_processes > 1:
        import torch.distributed as dist

        ranks = [None] * state.num_processes
        dist.all_gather_object(ranks, me)
    return {
        "world_size": state.num_processes,
        "num_machines": len({r["node_rank"] for r in ranks}),
        "ranks": sorted(ranks, key=lambda r: r["rank"]),
    }


# What gloo / NCCL / the c10d store say when the other end of a collective is gone or never answers.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe")


def is_peer_lost(exc: BaseException) -> bool:
    """A failed collective (torch's DistError, or gloo's RuntimeError naming a closed connection or a timeout)."""
    import torch.distributed as dist

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, getattr(dist, "DistError", ())) or (
            isinstance(e, RuntimeError) and any(s in str(e) for s in _PEER_LOST)
        ):
            return True
        e = e.__cause__ or e.__context__
    return False


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
