"""Checkpoints that are never taken for complete unless they are.

Each checkpoint is written into ``checkpoints/.staging/checkpoint-N``, validated (the adapter loads, every tensor
is finite, lora_B is not all zero), fsynced, marked with ``COMPLETE.json`` and only then renamed into
``checkpoints/checkpoint-N``. A process killed mid-save leaves only the staging folder, which resume ignores.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from adapters.compat.transformers import StagedCheckpoints
from adapters.utils.atomic import promote
from adapters.utils.errors import AdaptersError

MARKER = "COMPLETE.json"
ADAPTER_FILE = "adapter_model.safetensors"


class CheckpointError(AdaptersError, RuntimeError):
    pass


def validate_adapter_dir(
    path: str | Path, require_nonzero_b: bool = True, expected_modules: int | None = None
) -> dict[str, Any]:
    """Load the adapter's safetensors and check it; raise CheckpointError naming the path and the fault.

    ``expected_modules``: the number of LoRA-wrapped modules of the live model; the file must hold a lora_A and a
    lora_B for each (a distributed save that gathered nothing, or only one shard, fails here).
    """
    from safetensors.torch import load_file

    path = Path(path)
    f = path / ADAPTER_FILE
    if not f.is_file() or f.stat().st_size == 0:
        raise CheckpointError(f"{f}: missing or empty adapter file")
    try:
        tensors = load_file(str(f))
    except Exception as e:
        raise CheckpointError(f"{f}: unreadable safetensors ({e})") from None
    if not tensors:
        raise CheckpointError(f"{f}: holds no tensors")
    for name, t in tensors.items():
        if t.numel() == 0:
            raise CheckpointError(f"{f}: tensor {name} is empty")
        if not torch.isfinite(t.float()).all():
            raise CheckpointError(f"{f}: tensor {name} has NaN or inf values")
    b = [t for n, t in tensors.items() if "lora_B" in n]
    if expected_modules is not None:
        a_count = sum(1 for n in tensors if "lora_A" in n)
        if a_count != expected_modules or len(b) != expected_modules:
            raise CheckpointError(
                f"{f}: holds {a_count} lora_A and {len(b)} lora_B tensors, expected "
                f"{expected_modules} of each (one per targeted module)"
            )
    if require_nonzero_b and b and all(float(t.abs().max()) == 0.0 for t in b):
        raise CheckpointError(f"{f}: every lora_B is zero, so the adapter is the identity (a broken save?)")
    return {"tensors": len(tensors), "lora_B": len(b)}


def _step(p: Path) -> int:
    m = re.fullmatch(r"checkpoint-(\d+)", p.name)
    return int(m.group(1)) if m else -1


def complete_checkpoints(ckpt_root: str | Path) -> list[Path]:
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step(p) >= 0 and (p / MARKER).is_file()]
    return sorted(found, key=_step)


def last_good_checkpoint(ckpt_root: str | Path, log=print) -> Path | None:
    """The newest checkpoint that is marked complete and still validates; older ones are the fallback."""
    for p in reversed(complete_checkpoints(ckpt_root)):
        try:
            validate_adapter_dir(p)
            return p
        except CheckpointError as e:
            log(f"[resume] skipping {p}: {e}")
    return None


class AtomicCheckpointMixin(StagedCheckpoints):
    """Mixed into a transformers Trainer: checkpoints are staged, validated, marked, then renamed."""

    def _commit_checkpoint(self, staged: Path, final: Path) -> None:
        from adapters.training.distributed import lora_module_count

        info = validate_adapter_dir(staged, expected_modules=lora_module_count(self.model) or None)
        (staged / MARKER).write_text(json.dumps({"step": self.state.global_step, **info}) + "\n")
        promote(staged, final)
