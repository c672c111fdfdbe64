"""transformers Trainer internals this package overrides. Checked against transformers 5.24.0 (tests/test_compat.py).

- ``Trainer._save_checkpoint(model, trial)``: writes ``checkpoint-<global_step>`` under
  ``self._get_output_dir(trial=trial)``, points ``state.best_model_checkpoint`` at the best step's folder there,
  writes ``trainer_state.json`` with it, and rotates old checkpoints, all in that same folder.
- ``Trainer._get_output_dir(trial)``: the folder checkpoints are written into.
- ``Trainer._save(output_dir, state_dict)``: writes the model and, into the same folder, ``processing_class`` (or
  the tokenizer of ``data_collator`` without one); it reads neither for anything else.
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
    ``<output_dir>/checkpoint-N`` through ``_commit_checkpoint`` (on the main process, after every rank wrote).

    ``checkpoint_tokenizer = False`` leaves the tokenizer (``processing_class``) out of checkpoints: resuming does
    not read it, and the run keeps one copy elsewhere.
    """

    _staging_active = False
    checkpoint_tokenizer = True

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
        self._gather_for_commit()
        # Every rank writes its own RNG state (and, under DeepSpeed, its shards) into the staged folder: wait for all
        # of them before the main process validates and renames it, or a late rank writes into a folder gone.
        _barrier(self.args.world_size)
        if self.args.should_save:
            self._unstage_best(real_root, staged)
            self._commit_checkpoint(staged, real_root / name)
            self._best_and_rotate(real_root)
        _barrier(self.args.world_size)

    def _save(self, output_dir=None, state_dict=None):
        if not self._staging_active or self.checkpoint_tokenizer:
            return super()._save(output_dir, state_dict)
        # Trainer._save writes processing_class when set, else data_collator.tokenizer when the collator has one
        keep = self.processing_class, self.data_collator
        self.processing_class = self.data_collator = None
        try:
            return super()._save(output_dir, state_dict)
        finally:
            self.processing_class, self.data_collator = keep

    def _gather_for_commit(self) -> None:
        """Called on every process once the checkpoint's files are written: collectives a check needs go here."""

    def _commit_checkpoint(self, staged: Path, final: Path) -> None:
        """Turn the staged checkpoint into the real one; subclasses validate and mark it first."""
        promote(staged, final)

    def _unstage_best(self, real_root: Path, staged: Path) -> None:
        """Trainer pointed best_model_checkpoint into the staging folder when this step is the best, and wrote that
        into the checkpoint's trainer_state.json: point both at where the folder will be."""
        from transformers.trainer_callback import TrainerState

        best = self.state.best_model_checkpoint
        if best and Path(best).parent == real_root / STAGING:
            self.state.best_model_checkpoint = str(real_root / Path(best).name)
        state_file = staged / "trainer_state.json"
        if state_file.is_file():
            saved = TrainerState.load_from_json(str(state_file))
            if saved.best_model_checkpoint != self.state.best_model_checkpoint:
                saved.best_model_checkpoint = self.state.best_model_checkpoint
                saved.save_to_json(str(state_file))

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
