"""The trainer: TRL's ``SFTTrainer`` with our mixins (atomic checkpoints, forgetting guard), switches and callbacks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from adapters.compat.trl import exact_trainable
from adapters.config import Recipe
from adapters.training import callbacks as trainctl
from adapters.training import checkpoints as ckpt


def make_callbacks():
    from transformers import TrainerCallback

    class FiniteGuard(TrainerCallback):
        """Stops at the first non-finite loss or gradient norm, before anything else is saved."""

        bad: dict[str, Any] | None = None

        def on_log(self, args, state, control, logs=None, **kw):
            for k in ("loss", "grad_norm"):
                v = (logs or {}).get(k)
                if v is not None and not math.isfinite(float(v)):
                    self.bad = {"step": state.global_step, k: v}
                    control.should_training_stop = True
                    control.should_save = False

        def on_step_end(self, args, state, control, **kw):
            if self.bad:
                control.should_save = False

    return FiniteGuard()


class AdapterDtypeMixin:
    """Trainer mixin: the trainable tensors stay in ``adapter_dtype`` (model/lora.py ``cast_trainable``).

    Cast before the optimizer is built (after the Trainer's resume load, which PEFT upcasts to float32, and before
    the optimizer's saved state is cast to the parameters' dtype) and again after training (the best-checkpoint
    restore loads through PEFT too), so checkpoints, the adapter and a resumed run agree.
    """

    adapter_dtype: torch.dtype | None = None

    def keep_adapter_dtype(self) -> None:
        from adapters.model.lora import cast_trainable

        if self.adapter_dtype is not None:
            cast_trainable(self.accelerator.unwrap_model(self.model), self.adapter_dtype)

    def create_optimizer(self, *args, **kwargs):
        self.keep_adapter_dtype()
        return super().create_optimizer(*args, **kwargs)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.keep_adapter_dtype()


def _ckpt_flag(config_cls) -> str:
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def sft_config(recipe: Recipe, **owned: Any):
    """The recipe's SFTConfig: our defaults, then every SFTConfig key the recipe gives, by name; ``owned`` are the
    values the pipeline decides (output_dir, the switches, ...) and win."""
    from trl import SFTConfig

    return SFTConfig(**{**recipe.library_kwargs("training"), **owned})


def _streaming_kwargs(recipe: Recipe) -> dict[str, Any]:
    """A streamed train set under several processes: each rank reads the stream and keeps its own batches
    (accelerate's IterableDatasetShard). accelerate's default for an IterableDataset, dispatch_batches, has rank 0
    read every rank's batch and torch.cat them, which fails on batches padded to different lengths."""
    given = recipe.accelerator_config
    if not recipe.streaming or not (given is None or isinstance(given, dict)):  # a config file given: it decides
        return {}
    return {"accelerator_config": {**(given or {}), "dispatch_batches": False}}


def _log_tensorboard_to(trainer, log_dir: Path) -> None:
    """Give the Trainer's TensorBoard logger a writer for this run's folder. Its only other way to learn a folder is
    the process-wide TENSORBOARD_LOGGING_DIR, which a second run in the same process would inherit."""
    from transformers.integrations import TensorBoardCallback

    if trainer.pop_callback(TensorBoardCallback) is None:
        return  # report_to names no tensorboard
    writer = None
    if trainer.is_world_process_zero():
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(log_dir))
    trainer.add_callback(TensorBoardCallback(tb_writer=writer))


def build_trainer(
    model,
    tok,
    recipe: Recipe,
    run: Path,
    train_ds,
    eval_ds,
    *,
    packed: bool = False,
    callbacks: Sequence[Any] = (),
    length_sample=None,
):
    """``packed``: the decision of data.pipeline.packing_guard; ``callbacks``: extra TrainerCallbacks (the sweep's
    pruner); ``length_sample``: the rows whose lengths stand for a streamed ``train_ds`` (which cannot be read twice
    for free). Returns (trainer, the non-finite-loss guard)."""
    from trl import SFTTrainer

    from adapters.model.lora import adapter_dtype as dtype_of
    from adapters.training.forgetting_guard import BaseKLMixin, source_for_rows
    from adapters.training.speed import for_recipe

    class Trainer(ckpt.AtomicCheckpointMixin, AdapterDtypeMixin, BaseKLMixin, SFTTrainer):
        base_kl_weight = recipe.base_kl_weight
        base_kl_positions = recipe.base_kl_positions
        base_kl_every = recipe.base_kl_every
        # the run resolves auto from the data audit; a caller that builds the trainer itself, from these rows
        base_kl_source = source_for_rows(recipe.base_kl_source, train_ds if length_sample is None else length_sample)
        adapter_dtype = dtype_of(recipe)

    trainctl.check_report_to(recipe.report_to)
    use_cpu = not torch.cuda.is_available()
    has_eval = eval_ds is not None and recipe.eval_strategy != "no"
    fast = for_recipe(
        recipe, train_ds if length_sample is None else length_sample, packing=packed
    )  # padding_free / liger / compile, auto or set by the recipe
    from trl import SFTConfig

    args = sft_config(
        recipe,
        output_dir=str(run / "checkpoints"),
        eval_strategy=recipe.eval_strategy if has_eval else "no",
        save_strategy="steps",
        seed=recipe.seed,
        data_seed=recipe.seed,
        # early stopping's patience count lives in its callback: without this a resumed run starts it at 0
        restore_callback_states_from_checkpoint=True,
        max_length=recipe.max_length if not fast.padding_free else None,
        packing=packed,
        use_cpu=use_cpu,
        dataloader_pin_memory=not use_cpu,
        dataset_kwargs={"skip_prepare_dataset": True},  # we tokenized and masked by position ourselves
        # Checkpointing was already set up on the base by attach_lora (with the k-bit preparation); the Trainer
        # must not wrap it again. transformers 5.2x renamed the flag.
        **{_ckpt_flag(SFTConfig): False},
        **trainctl.config_fields(recipe, has_eval),  # early stopping
        **fast.sft_kwargs(),
        **_streaming_kwargs(recipe),
    )
    guard = make_callbacks()
    with exact_trainable(model):  # TRL rounds LoRA to bfloat16 on a quantized base: the values come back
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds if has_eval else None,
            processing_class=tok,
            callbacks=[guard],
        )
    trainer.keep_adapter_dtype()
    if trainer.is_world_process_zero():
        ckpt.save_run_tokenizer(tok, run)  # once per run: checkpoints carry none
    _log_tensorboard_to(trainer, run / "tensorboard")
    trainer.fast_path = fast.report()  # trained_positions_only is switched on around trainer.train() (run.py)
    trainctl.install(trainer, recipe, callbacks)  # eval perplexity, early stopping, the caller's callbacks
    return trainer, guard
