"""Training: recipe -> quantized base -> LoRA -> TRL SFTTrainer -> outputs/<run_name>/.

Runs unchanged under ``accelerate launch``: one whole model per process (never device_map="auto" with several
processes), and only the main process writes the run directory.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from adapters.config.recipe import Recipe
from adapters.data.encode import to_dataset
from adapters.model.loading import ModelRef, load_model, load_tokenizer, model_memory_mb, probe_loss, resolve_model
from adapters.model.lora import attach_lora, parameter_counts
from adapters.training import callbacks as trainctl
from adapters.training import checkpoints as ckpt
from adapters.utils.provenance import git_state, hardware, versions, write_json


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; nothing from that point was saved."""


def log(msg: str) -> None:
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------- run dir
def new_run_name(recipe_path: Path) -> str:
    return f"{recipe_path.stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_dir_for(recipe: Recipe, recipe_path: Path, resume: bool) -> Path:
    root = Path(recipe.output_root)
    if recipe.run_name:
        return root / recipe.run_name
    if resume:  # the newest run of this recipe
        runs = sorted((p for p in root.glob(f"{recipe_path.stem}-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise FileNotFoundError(f"--resume: no earlier run of {recipe_path.stem} under {root}/; pass --run_name")
        return runs[-1]
    return root / new_run_name(recipe_path)


# ---------------------------------------------------------------------------------------------------- helpers
def set_seed(seed: int) -> None:
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)


def _probe_batch(encoded, n: int = 4) -> dict[str, torch.Tensor]:
    """A fixed batch of the first ``n`` training rows, right-padded, loss on the answers."""
    rows = encoded[:n]
    width = max(len(e.input_ids) for e in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, e in enumerate(rows):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


GENERAL_PROBE = [
    "The history of the city goes back more than two thousand years, to a small settlement on the river.",
    "To make the sauce, melt the butter in a pan, add the flour and stir until the mixture turns golden.",
]


def _general_batch(tok) -> dict[str, torch.Tensor]:
    """General English text, loss on every token: what quantization does to the model beyond the task."""
    enc = tok(GENERAL_PROBE, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def _probe(model, batches: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    out = {f"{name}_loss": round(probe_loss(model, b), 4) for name, b in batches.items()}
    out["memory_mb"] = round(model_memory_mb(model), 1)
    return out


def quantization_report(ref: ModelRef, recipe: Recipe, batches: dict[str, dict[str, torch.Tensor]]):
    """Load the base (quantized if the recipe says so) and measure the quantization damage.

    With quantization on, the full-precision model is loaded first and both are scored on the same probe batches:
    ``task`` (the first training rows, loss on the answers) and ``general`` (plain English, every token).
    """
    report: dict[str, Any] = {"method": "none"}
    if recipe.quantized:
        report["method"] = (
            "int8"
            if recipe.load_in_8bit
            else (f"4bit-{recipe.bnb_4bit_quant_type}" + ("+double_quant" if recipe.bnb_4bit_use_double_quant else ""))
        )
        if recipe.quant_probe:
            full = load_model(ref, recipe, quantize=False)
            report["full_precision"] = _probe(full, batches)
            _free(full)
    model = load_model(ref, recipe, quantize=True)
    report["quantized" if recipe.quantized else "full_precision"] = _probe(model, batches)
    if "full_precision" in report and "quantized" in report:
        for name in batches:
            a, b = report["full_precision"][f"{name}_loss"], report["quantized"][f"{name}_loss"]
            report[f"{name}_loss_change"] = round(b - a, 4)
            report[f"{name}_loss_change_pct"] = round(100 * (b - a) / a, 2) if a else None
    return model, report


def print_quant_report(r: dict[str, Any]) -> None:
    names = [k[: -len("_loss")] for k in (r.get("full_precision") or r.get("quantized") or {}) if k.endswith("_loss")]
    log(f"[quant] method: {r['method']}")
    log(f"[quant] {'':16s}" + "".join(f"{n + ' loss':>14s}" for n in names) + f"{'memory MB':>12s}")
    for key in ("full_precision", "quantized"):
        if key in r:
            log(
                f"[quant] {key:16s}"
                + "".join(f"{r[key][n + '_loss']:14.4f}" for n in names)
                + f"{r[key]['memory_mb']:12.1f}"
            )
    for n in names:
        if f"{n}_loss_change" in r:
            log(
                f"[quant] quantization changed the {n} probe loss by {r[f'{n}_loss_change']:+.4f} "
                f"({r[f'{n}_loss_change_pct']:+.1f}%)"
            )


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


def save_adapter(model, tok, out: Path, base_path: str, state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the final adapter atomically: staging folder, validate, rename.

    ``state_dict``: the gathered full tensors under FSDP / ZeRO-3 (see ``distributed.gathered_adapter_state``).
    """
    staging = out.with_name(f".{out.name}.staging")
    if staging.exists():
        shutil.rmtree(staging)
    model.peft_config["default"].base_model_name_or_path = base_path
    model.save_pretrained(str(staging), **({"state_dict": state_dict} if state_dict is not None else {}))
    tok.save_pretrained(str(staging))
    from adapters.training.distributed import lora_module_count

    info = ckpt.validate_adapter_dir(staging, expected_modules=lora_module_count(model) or None)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return info


def template_hash(tok) -> str:
    return hashlib.sha256((tok.chat_template or "").encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------- train
def train(recipe: Recipe, recipe_path: Path, resume: bool = False) -> Path:
    from adapters.training.distributed import process_state

    state = process_state()  # gloo world on CPU, NCCL on GPUs; a bare PartialState() on CPU reports 1 process
    t0 = time.time()
    set_seed(recipe.seed)
    run = run_dir_for(recipe, recipe_path, resume)
    if run.exists() and not resume and any(run.iterdir()):
        raise FileExistsError(f"{run} already exists; pass --resume to continue it or choose another --run_name")
    state.wait_for_everyone()  # every rank has checked before the main process creates the folder
    resume_from = None
    if resume:
        resume_from = ckpt.last_good_checkpoint(run / "checkpoints", log=log)
        log(f"[resume] {'from ' + str(resume_from) if resume_from else 'no complete checkpoint; starting fresh'}")
    if state.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
    log(f"[run] {run}")

    ref = resolve_model(recipe.model_name_or_path)
    from adapters.planning.preflight import before_train

    before_train(recipe, ref.path)  # known-bad recipe / launcher / model combinations fail here, naming the fix
    tok = load_tokenizer(ref, recipe)

    # ------------------------------------------------------------ data
    from adapters.data.pipeline import packing_guard, prepare_data

    packed = packing_guard(recipe, say=log)  # packing only where the attention keeps samples apart
    train_enc, eval_enc, test_rows, data_report = prepare_data(recipe, tok, run, say=log, write=state.is_main_process)

    manifest: dict[str, Any] = {
        "status": "running",
        "run_name": run.name,
        "recipe_file": str(recipe_path),
        "config": recipe.to_dict(),
        "base_model": ref.to_dict(),
        "versions": versions(),
        "git": git_state(),
        "hardware": hardware(),
        "seed": recipe.seed,
        "world_size": state.num_processes,
        "effective_batch_size": recipe.per_device_train_batch_size
        * recipe.gradient_accumulation_steps
        * state.num_processes,
        "data": data_report,
        "chat_template_sha256": template_hash(tok),
        "started": datetime.now().isoformat(timespec="seconds"),
    }
    if state.is_main_process:
        write_json(run / "manifest.json", manifest)

    # ------------------------------------------------------------ model, quantization damage, base score
    model, qreport = quantization_report(ref, recipe, {"task": _probe_batch(train_enc), "general": _general_batch(tok)})
    print_quant_report(qreport)
    manifest["quantization"] = qreport
    from adapters.publish.rundir import base_fingerprint

    manifest["base_fingerprint"] = base_fingerprint(model)
    manifest["base_config"] = {
        k: getattr(model.config, k, None)
        for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings")
    }

    # ------------------------------------------------------------ LoRA + training
    model = attach_lora(model, recipe)
    manifest["parameters"] = parameter_counts(model)
    p = manifest["parameters"]
    log(f"[lora] trainable parameters: {p['trainable']:,} of {p['total']:,} ({p['trainable_pct']:.3f}%)")
    trainer, guard = build_trainer(
        model,
        tok,
        recipe,
        run,
        to_dataset(train_enc, pack_length=recipe.max_length if packed else None),
        to_dataset(eval_enc) if eval_enc else None,
    )
    manifest["fast_path"] = trainer.fast_path
    t_train = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.time() - t_train
    if guard.bad:
        manifest["status"] = "diverged"
        manifest["diverged"] = guard.bad
        if state.is_main_process:
            write_json(run / "manifest.json", manifest)
        raise TrainingDiverged(
            f"non-finite value at step {guard.bad['step']}: {guard.bad}; the last good "
            f"checkpoint is {ckpt.last_good_checkpoint(run / 'checkpoints', log=log)}"
        )

    # ------------------------------------------------------------ save, score, record
    from adapters.training.distributed import gathered_adapter_state

    full_state = gathered_adapter_state(trainer)  # collective under FSDP / ZeRO-3 (every rank), else None
    if state.is_main_process:
        manifest["adapter"] = save_adapter(trainer.model, tok, run / "adapter", ref.path, state_dict=full_state)
        log(f"[save] adapter -> {run / 'adapter'}")
        from adapters.evaluation.plots import loss_curve

        loss_curve(trainer.state.log_history, run / "loss_curve.png", title=run.name)
        tokens_seen = sum(len(e.input_ids) for e in train_enc) * (
            result.global_step * manifest["effective_batch_size"] / max(len(train_enc), 1)
        )
        manifest.update(
            {
                "status": "complete",
                "train": {
                    "global_step": result.global_step,
                    "train_loss": round(result.training_loss, 4),
                    "seconds": round(train_seconds, 1),
                    "approx_tokens_per_s": round(tokens_seen / train_seconds, 1),
                    "resumed_from": str(resume_from) if resume_from else None,
                },
                "log_history": trainer.state.log_history,
                "wall_seconds": round(time.time() - t0, 1),
                "finished": datetime.now().isoformat(timespec="seconds"),
            }
        )
        write_json(run / "manifest.json", manifest)
        if recipe.eval_after_train:  # base (adapter disabled) vs tuned, forgetting probe, flags, report.md
            from adapters.evaluation.report import evaluate_model

            evaluate_model(trainer.model, tok, recipe, run, trainer.state.log_history, base=recipe.eval_base, log=log)
            manifest["wall_seconds_with_eval"] = round(time.time() - t0, 1)
            write_json(run / "manifest.json", manifest)
        log(f"[done] {run} in {time.time() - t0:.0f}s")
    state.wait_for_everyone()
    sys.stdout.flush()
    return run
