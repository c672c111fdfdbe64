"""Checkpoints that are never taken for complete unless they are.

Each checkpoint is written into ``checkpoints/.staging/checkpoint-N``, validated (the adapter loads, every tensor
is finite, lora_B is not all zero), fsynced, marked with ``COMPLETE.json`` and only then renamed into
``checkpoints/checkpoint-N``. A process killed mid-save leaves only the staging folder, which resume ignores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from adapters.utils.errors import AdaptersError

STAGING = ".staging"
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


def _fsync_dir_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


class AtomicCheckpointMixin:
    """Mixed into a transformers Trainer: checkpoints are staged, validated, marked, then renamed."""

    _staging_active = False

    def _get_output_dir(self, trial):  # noqa: D401 - Trainer hook
        real = super()._get_output_dir(trial)
        return os.path.join(real, STAGING) if self._staging_active else real

    def _save_checkpoint(self, model, trial):
        real_root = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staged = real_root / STAGING / name
        if self.args.should_save and staged.exists():
            shutil.rmtree(staged)
        self._staging_active = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_active = False
        # Every rank writes its own RNG state (and, under DeepSpeed, its shards) into the staged folder: wait for all
        # of them before the main process validates and renames it, or a late rank writes into a folder gone.
        _barrier(self.args.world_size)
        if self.args.should_save:
            from adapters.training.distributed import lora_module_count

            info = validate_adapter_dir(staged, expected_modules=lora_module_count(self.model) or None)
            (staged / MARKER).write_text(json.dumps({"step": self.state.global_step, **info}) + "\n")
            _fsync_dir_tree(staged)
            final = real_root / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(staged, final)
            _fsync_dir_tree(real_root)
            if self.state.best_global_step:
                best = real_root / f"checkpoint-{self.state.best_global_step}"
                if best.exists():
                    self.state.best_model_checkpoint = str(best)
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(
                output_dir=str(real_root),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        _barrier(self.args.world_size)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
