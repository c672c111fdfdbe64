"""The trainer: TRL's ``SFTTrainer`` with our mixins (atomic checkpoints, forgetting guard), switches and callbacks."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from adapters.config.recipe import Recipe
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


def _ckpt_flag(config_cls) -> str:
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def build_trainer(model, tok, recipe: Recipe, run: Path, train_ds, eval_ds):
    from trl import SFTConfig, SFTTrainer

    from adapters.training.forgetting_guard import BaseKLMixin

    class Trainer(ckpt.AtomicCheckpointMixin, BaseKLMixin, SFTTrainer):
        base_kl_weight = recipe.base_kl_weight
        base_kl_positions = recipe.base_kl_positions

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run / "tensorboard")  # per run, not per process
    use_cpu = not torch.cuda.is_available()
    has_eval = eval_ds is not None and recipe.eval_strategy != "no"
    from adapters.training.speed import for_recipe

    fast = for_recipe(recipe, train_ds)  # padding_free / liger / compile switches, each auto or set by the recipe
    args = SFTConfig(
        output_dir=str(run / "checkpoints"),
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_steps,
        num_train_epochs=recipe.num_train_epochs,
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        per_device_eval_batch_size=recipe.per_device_eval_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm,
        optim=recipe.optim,
        neftune_noise_alpha=recipe.neftune_noise_alpha,
        logging_steps=recipe.logging_steps,
        eval_strategy=recipe.eval_strategy if has_eval else "no",
        eval_steps=recipe.eval_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        bf16=recipe.bf16,
        fp16=recipe.fp16,
        seed=recipe.seed,
        data_seed=recipe.seed,
        report_to=recipe.report_to,
        max_length=recipe.max_length if not fast.padding_free else None,
        use_cpu=use_cpu,
        dataloader_pin_memory=not use_cpu,
        dataset_kwargs={"skip_prepare_dataset": True},  # we tokenized and masked by position ourselves
        # Checkpointing was already set up on the base by attach_lora (with the k-bit preparation); the Trainer
        # must not wrap it again. transformers 5.2x renamed the flag.
        **{_ckpt_flag(SFTConfig): False},
        **trainctl.config_fields(recipe, has_eval),  # recipe pass-through + early stopping
        **fast.sft_kwargs(),
    )
    if "disable_tqdm" not in recipe.sft_extra:
        args.disable_tqdm = False  # transformers hides the bar when its logger is quiet; we quiet it, we want the bar
    guard = make_callbacks()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds if has_eval else None,
        processing_class=tok,
        callbacks=[guard],
    )
    trainer.fast_path = fast.report()
    if fast.trained_positions_only:
        from adapters.training.speed import enable_trained_positions_only

        enable_trained_positions_only()
    trainctl.install(trainer, recipe)  # eval perplexity, early stopping, sweep pruning
    return trainer, guard
