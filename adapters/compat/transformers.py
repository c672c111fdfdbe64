"""transformers Trainer internals this package overrides. Checked against transformers 5.24.0 (tests/test_compat.py).

- ``Trainer._save_checkpoint(model, trial)``: writes ``checkpoint-<global_step>`` under
  ``self._get_output_dir(trial=trial)``, then points ``state.best_model_checkpoint`` at the best step's folder and
  rotates old checkpoints, both in that same folder.
- ``Trainer._get_output_dir(trial)``: the folder checkpoints are written into.
- ``transformers.trainer_utils.rotate_checkpoints`` and ``PREFIX_CHECKPOINT_DIR`` (public, used as Trainer does).

``StagedCheckpoints`` redirects the first hook into a staging folder for the length of the second, then lets the
subclass check and promote the staged checkpoint, and redoes the best-checkpoint and rotation steps in the real folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from adapters.utils.atomic import clear, promote

STAGING = ".staging"


class StagedCheckpoints:
    """Trainer mixin: each checkpoint is written into ``<output_dir>/.staging/checkpoint-N`` and only becomes
    ``<output_dir>/checkpoint-N`` through ``_commit_checkpoint`` (on the main process, after every rank wrote)."""

    _staging_active = False

    def _get_output_dir(self, trial):  # noqa: D401 - Trainer hook
        real = super()._get_output_dir(trial)
        return os.path.join(real, STAGING) if self._staging_active else real

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        real_root = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged = real_root / STAGING / name
        if self.args.should_save:
            clear(staged)  # a partial save of this step left by a killed run
        self._staging_active = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_active = False
        # Every rank writes its own RNG state (and, under DeepSpeed, its shards) into the staged folder: wait for all
        # of them before the main process validates and renames it, or a late rank writes into a folder gone.
        _barrier(self.args.world_size)
        if self.args.should_save:
            self._commit_checkpoint(staged, real_root / name)
            self._best_and_rotate(real_root)
        _barrier(self.args.world_size)

    def _commit_checkpoint(self, staged: Path, final: Path) -> None:
        """Turn the staged checkpoint into the real one; subclasses validate and mark it first."""
        promote(staged, final)

    def _best_and_rotate(self, real_root: Path) -> None:
        """What Trainer did inside the staging folder, redone where the checkpoints really are."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        if self.state.best_global_step:
            best = real_root / f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
            if best.exists():
                self.state.best_model_checkpoint = str(best)
        rotate_checkpoints(
            output_dir=str(real_root),
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=False,
        )


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
