"""Preference trainers: TRL's DPOTrainer, KTOTrainer and ORPOTrainer on the run's LoRA model, with our mixins.

The reference decides whether DPO / KTO is right (/work docs/preference.md):

- continuing an adapter (``init_adapter``): the model is a PeftModel holding that adapter and TRL gets it with
  ``peft_config=None`` and ``ref_model=None``, so TRL copies it into a frozen adapter named ``ref``; the reference
  is base + the starting adapter, with one base in memory;
- a new adapter: the reference is the base, i.e. the same model with its adapter disabled (TRL's ``ref`` copy of a
  zero-initialised adapter is removed, so TRL disables the adapter instead);
- ORPO has no reference.

The ``ref`` adapter never leaves the process: checkpoints save the trained adapter only (``save_trained_only``) and
the run deletes ``ref`` before the final adapter is written (``drop_reference``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from adapters.config import Recipe
from adapters.training import callbacks as trainctl
from adapters.training import checkpoints as ckpt

REF = "ref"  # TRL's name for the frozen copy of a loaded adapter
TRAINED = "default"


def _classes(trainer: str):
    if trainer == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    if trainer == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer
    if trainer == "orpo":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer
    raise ValueError(f"not a preference trainer: {trainer!r}")


def reference_record(recipe: Recipe, precomputed: bool) -> dict[str, Any]:
    """What the run compares its policy against (the manifest's ``reference``)."""
    if recipe.trainer == "orpo":
        return {"kind": "none", "why": "ORPO's odds-ratio loss needs no reference model"}
    if recipe.init_adapter:
        return {
            "kind": "start_adapter",
            "adapter": recipe.init_adapter,
            "how": "base + the starting adapter: TRL's frozen 'ref' copy of it, one base in memory",
            "precomputed_log_probs": precomputed,
        }
    return {
        "kind": "base",
        "how": "the base: the trained model with its adapter disabled",
        "precomputed_log_probs": precomputed,
    }


def save_trained_only(model) -> None:
    """Every ``save_pretrained`` of this PeftModel (the Trainer's checkpoints) writes the trained adapter alone.
    PEFT saves every adapter by default, which would put TRL's ``ref`` copy in a ``ref/`` folder."""
    if getattr(model, "_saves_trained_only", False) or not hasattr(model, "peft_config"):
        return
    model.save_pretrained = functools.partial(type(model).save_pretrained, model, selected_adapters=[TRAINED])
    model._saves_trained_only = True


def drop_reference(model) -> bool:
    """Delete TRL's frozen ``ref`` adapter (after training, before the adapter is saved, merged or evaluated)."""
    if hasattr(model, "peft_config") and REF in model.peft_config:
        model.delete_adapter(REF)
        model.set_adapter(TRAINED)
        return True
    return False


class EncodedSplitsMixin:
    """TRL's tokenization and the encoded-data cache. DPO, KTO: ``_prepare_dataset`` returns a split that already
    holds TRL's tokenized columns (read from the cache) as it is; any other is tokenized by TRL and kept in
    ``tokenized`` so the run can store it (data/preference.py ``store_tokenized``). ORPO: ``tokenize_row`` hands back
    the columns a row already holds from the cache (what TRL's ``tokenize_row`` returned for it)."""

    tokenized_columns: tuple[str, ...] = ()

    def tokenize_row(self, feature, model=None):
        if self.tokenized_columns and all(k in feature for k in self.tokenized_columns):
            return {k: feature[k] for k in self.tokenized_columns}
        return super().tokenize_row(feature, model)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        names = getattr(dataset, "column_names", None) or []
        if self.tokenized_columns and set(self.tokenized_columns) <= set(names):
            return dataset  # TRL's own output, from the cache
        out = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        self.__dict__.setdefault("tokenized", {})[dataset_name] = out
        return out


def build_preference_trainer(
    model,
    tok,
    recipe: Recipe,
    run: Path,
    train_ds,
    eval_ds,
    *,
    callbacks: Sequence[Any] = (),
    data_report: dict[str, Any] | None = None,
):
    """The recipe's preference trainer over ``model`` (a PeftModel: a new adapter, or the starting one). Returns
    (trainer, the non-finite-loss guard). ``data_report``: the data stage's report; on an encoded-cache miss the
    splits TRL tokenized are stored with it (``report['encoding']``)."""
    from adapters.compat.trl import exact_trainable
    from adapters.data.preference import TOKENIZED_COLUMNS
    from adapters.model.lora import adapter_dtype as dtype_of
    from adapters.training import preference_speed
    from adapters.training.forgetting_guard import PreferenceKLMixin
    from adapters.training.trainer import AdapterDtypeMixin, _ckpt_flag, _log_tensorboard_to, make_callbacks

    config_cls, trainer_cls = _classes(recipe.trainer)

    class Trainer(EncodedSplitsMixin, ckpt.AtomicCheckpointMixin, AdapterDtypeMixin, PreferenceKLMixin, trainer_cls):
        adapter_dtype = dtype_of(recipe)
        tokenized_columns = TOKENIZED_COLUMNS.get(recipe.trainer, ())
        base_kl_weight = recipe.base_kl_weight  # the forgetting guard on general text (0: off)
        base_kl_positions = recipe.base_kl_positions
        base_kl_every = recipe.base_kl_every
        base_kl_source = recipe.base_kl_source

    trainctl.check_report_to(recipe.report_to)
    use_cpu = not torch.cuda.is_available()
    has_eval = eval_ds is not None and recipe.eval_strategy != "no"
    owned = {
        "output_dir": str(run / "checkpoints"),
        "eval_strategy": recipe.eval_strategy if has_eval else "no",
        "save_strategy": "steps",
        "seed": recipe.seed,
        "data_seed": recipe.seed,
        "restore_callback_states_from_checkpoint": True,
        "max_length": recipe.max_length,
        "use_cpu": use_cpu,
        "dataloader_pin_memory": not use_cpu,
        # checkpointing is set up on the base by attach_lora (our own key); the Trainer must not wrap it again
        _ckpt_flag(config_cls): False,
        **trainctl.config_fields(recipe, has_eval),
    }
    encoding = (data_report or {}).get("encoding") or {}
    if encoding.get("num_proc"):  # TRL's dataset map: dataset_num_proc, else SFT's rule (data/arrow.py)
        owned["dataset_num_proc"] = encoding["num_proc"]
    args = config_cls(**{**recipe.library_kwargs("training"), **owned})
    guard = make_callbacks()
    kwargs: dict[str, Any] = {}
    if recipe.trainer != "orpo":
        kwargs["ref_model"] = None  # a PeftModel without peft_config: TRL copies its adapter into 'ref'
    fast_path = preference_speed.plan(recipe)  # completion positions only through the LM head (speed levers)
    # TRL's reference precompute runs in the constructor; TRL rounds LoRA to bfloat16 there on a quantized base
    with preference_speed.constructing(fast_path), exact_trainable(model):
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds if has_eval else None,
            processing_class=tok,
            callbacks=[guard],
            **kwargs,
        )
    if encoding.get("cache") and not encoding.get("cache_hit") and trainer.is_world_process_zero():
        from adapters.data.preference import store_tokenized
        from adapters.training.run import log

        splits = dict(getattr(trainer, "tokenized", {}))
        if recipe.trainer == "orpo":  # the rows with the columns ORPO's tokenize_row gave them (same order)
            splits = {"train": _with_tokens(train_ds, trainer.train_dataset, Trainer.tokenized_columns)}
            if has_eval:
                splits["eval"] = _with_tokens(eval_ds, trainer.eval_dataset, Trainer.tokenized_columns)
        if eval_ds is not None and "eval" not in splits:  # not tokenized (no evaluation): stored as given
            splits["eval"] = eval_ds
        encoding["stored"] = store_tokenized(encoding, splits, data_report, run, recipe, say=log)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if not recipe.init_adapter:
        drop_reference(unwrapped)  # a new adapter: the reference is the base (adapter disabled), no copy needed
    save_trained_only(unwrapped)
    trainer.keep_adapter_dtype()
    if trainer.is_world_process_zero():
        ckpt.save_run_tokenizer(tok, run)
    _log_tensorboard_to(trainer, run / "tensorboard")
    trainer.fast_path = fast_path  # run.py switches trained_positions_only on around trainer.train()
    trainer.reference = reference_record(recipe, bool(getattr(args, "precompute_ref_log_probs", False)))
    trainctl.install(trainer, recipe, callbacks)
    return trainer, guard


def _with_tokens(rows, tokenized, columns):
    """``rows`` (our conversational rows) with ``columns`` of ``tokenized`` (the same rows after TRL's maps)."""
    from datasets import concatenate_datasets

    return concatenate_datasets([rows, tokenized.select_columns(list(columns))], axis=1)


def latest_complete_run(recipe_stem: str, output_root: str | Path = "outputs") -> Path | None:
    """The newest finished run of a recipe under ``output_root`` (its manifest names the recipe file and says
    complete), e.g. the SFT demo run that ``make dpo`` continues."""
    import json

    found = []
    for mf in Path(output_root).glob("*/manifest.json"):
        try:
            m = json.loads(mf.read_text())
        except (OSError, ValueError):
            continue
        if m.get("status") == "complete" and Path(m.get("recipe_file") or "").stem == recipe_stem:
            if (mf.parent / "adapter" / "adapter_model.safetensors").is_file():
                found.append((m.get("finished") or "", mf.parent))
    return max(found)[1] if found else None


def main(argv: list[str] | None = None) -> int:
    """``python -m adapters.training.preference latest RECIPE``: print the newest finished run of RECIPE (or
    nothing), for `make dpo`."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) >= 2 and args[0] == "latest":
        run = latest_complete_run(args[1], args[2] if len(args) > 2 else "outputs")
        print(run or "")
        return 0
    print("usage: python -m adapters.training.preference latest RECIPE [OUTPUT_ROOT]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
