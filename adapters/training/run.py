"""Training: recipe -> quantized base -> LoRA -> TRL SFTTrainer -> outputs/<run_name>/.

Runs unchanged under ``accelerate launch``: one whole model per process (never device_map="auto" with several
processes), and only the main process writes the run directory.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from adapters.config import Recipe
from adapters.data.encode import to_dataset
from adapters.model.loading import load_tokenizer
from adapters.model.lora import attach_lora, parameter_counts
from adapters.model.quantization import _general_batch, _probe_batch, print_quant_report, quantization_report
from adapters.model.sources import resolve_model
from adapters.training import checkpoints as ckpt
from adapters.training.trainer import build_trainer
from adapters.utils.atomic import staged_dir
from adapters.utils.errors import AdaptersError, PathExistsError, PathNotFoundError
from adapters.utils.hashing import chat_template_sha256
from adapters.utils.provenance import git_state, hardware, versions, write_json


class TrainingDiverged(AdaptersError, RuntimeError):
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
            raise PathNotFoundError(f"--resume: no earlier run of {recipe_path.stem} under {root}/; pass --run_name")
        return runs[-1]
    return root / new_run_name(recipe_path)


# ---------------------------------------------------------------------------------------------------- helpers
def set_seed(seed: int) -> None:
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)


def save_adapter(model, tok, out: Path, base_path: str, state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the final adapter atomically: staging folder, check it holds exactly the model's adapter, rename.

    ``state_dict``: the gathered full tensors under FSDP / ZeRO-3 (see ``distributed.gathered_adapter_state``).
    Returns the check's summary (tensor count, dtype), which the manifest records.
    """
    from adapters.training.distributed import adapter_tensors

    model.peft_config["default"].base_model_name_or_path = base_path
    with staged_dir(out) as staging:
        model.save_pretrained(str(staging), **({"state_dict": state_dict} if state_dict is not None else {}))
        tok.save_pretrained(str(staging))
        info = ckpt.validate_adapter_dir(staging, reference=adapter_tensors(model, state_dict))
    return info


# ---------------------------------------------------------------------------------------------------- train
def train(recipe: Recipe, recipe_path: Path, resume: bool = False, callbacks: Sequence[Any] = ()) -> Path:
    """Train one run; ``callbacks`` are extra TrainerCallbacks for this run only (the sweep's pruner).

    setup (run dir, data, base) -> fit (LoRA, trainer, train) -> finish (adapter, manifest, evaluation).
    """
    from adapters.data.pipeline import packing_guard, prepare_data
    from adapters.planning.preflight import before_train
    from adapters.training.distributed import process_state

    state = process_state()  # gloo world on CPU, NCCL on GPUs; a bare PartialState() on CPU reports 1 process
    t0 = time.time()
    set_seed(recipe.seed)
    run, resume_from = _claim_run_dir(recipe, recipe_path, resume, state)
    ref = resolve_model(recipe.model_name_or_path)
    before_train(recipe, ref.path)  # known-bad recipe / launcher / model combinations fail here, naming the fix
    tok = load_tokenizer(ref, recipe)
    packed = packing_guard(recipe, say=log)  # packing only where the attention keeps samples apart
    train_enc, eval_enc, _, data_report = prepare_data(
        recipe, tok, run, say=log, write=state.is_main_process, packed=packed
    )
    manifest = _new_manifest(recipe, recipe_path, run, ref, tok, data_report, state.num_processes)
    if state.is_main_process:
        write_json(run / "manifest.json", manifest)
    model = _load_base(ref, recipe, tok, train_enc, manifest)
    trainer, result, seconds = _fit(
        model, tok, recipe, run, train_enc, eval_enc, packed, callbacks, resume_from, manifest
    )
    _finish(trainer, tok, recipe, run, ref, train_enc, result, seconds, resume_from, manifest, t0, state)
    state.wait_for_everyone()
    sys.stdout.flush()
    return run


def _claim_run_dir(recipe: Recipe, recipe_path: Path, resume: bool, state) -> tuple[Path, Path | None]:
    """The run directory (new, or the one to resume) and the checkpoint to resume from."""
    run = run_dir_for(recipe, recipe_path, resume)
    if run.exists() and not resume and any(run.iterdir()):
        raise PathExistsError(f"{run} already exists; pass --resume to continue it or choose another --run_name")
    state.wait_for_everyone()  # every rank has checked before the main process creates the folder
    resume_from = None
    if resume:
        resume_from = ckpt.last_good_checkpoint(run / "checkpoints", log=log)
        log(f"[resume] {'from ' + str(resume_from) if resume_from else 'no complete checkpoint; starting fresh'}")
    if state.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
    log(f"[run] {run}")
    return run, resume_from


def _new_manifest(recipe: Recipe, recipe_path: Path, run: Path, ref, tok, data_report, world_size: int) -> dict:
    return {
        "status": "running",
        "run_name": run.name,
        "recipe_file": str(recipe_path),
        "config": recipe.to_dict(),
        "base_model": ref.to_dict(),
        "versions": versions(),
        "git": git_state(),
        "hardware": hardware(),
        "seed": recipe.seed,
        "world_size": world_size,
        "effective_batch_size": recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps * world_size,
        "data": data_report,
        "chat_template_sha256": chat_template_sha256(tok),
        "started": datetime.now().isoformat(timespec="seconds"),
    }


def _load_base(ref, recipe: Recipe, tok, train_enc, manifest: dict[str, Any]):
    """The base as the recipe trains it (quantized or not), with what quantization did to it and its fingerprint."""
    from adapters.publish.rundir import base_fingerprint

    model, qreport = quantization_report(ref, recipe, {"task": _probe_batch(train_enc), "general": _general_batch(tok)})
    print_quant_report(qreport, log=log)
    manifest["quantization"] = qreport
    manifest["base_fingerprint"] = base_fingerprint(model)
    manifest["base_config"] = {
        k: getattr(model.config, k, None)
        for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings")
    }
    return model


def _fit(model, tok, recipe: Recipe, run: Path, train_enc, eval_enc, packed, callbacks, resume_from, manifest):
    """LoRA on the base, the trainer, and the training loop; stops with TrainingDiverged at a non-finite value."""
    from adapters.compat.trl import trained_positions_only

    model = attach_lora(model, recipe)
    manifest["parameters"] = p = parameter_counts(model)
    log(f"[lora] trainable parameters: {p['trainable']:,} of {p['total']:,} ({p['trainable_pct']:.3f}%)")
    trainer, guard = build_trainer(
        model,
        tok,
        recipe,
        run,
        to_dataset(train_enc, pack_length=recipe.max_length if packed else None),
        to_dataset(eval_enc) if eval_enc else None,
        packed=packed,
        callbacks=callbacks,
    )
    manifest["fast_path"] = trainer.fast_path
    t_train = time.time()
    with trained_positions_only(bool(trainer.fast_path.get("trained_positions_only", {}).get("value"))):
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.time() - t_train
    if guard.bad:
        manifest["status"] = "diverged"
        manifest["diverged"] = guard.bad
        if trainer.is_world_process_zero():
            write_json(run / "manifest.json", manifest)
        raise TrainingDiverged(
            f"non-finite value at step {guard.bad['step']}: {guard.bad}; the last good "
            f"checkpoint is {ckpt.last_good_checkpoint(run / 'checkpoints', log=log)}"
        )
    return trainer, result, seconds


def _finish(trainer, tok, recipe: Recipe, run: Path, ref, train_enc, result, seconds, resume_from, manifest, t0, state):
    """Save the adapter (gathered under FSDP / ZeRO-3), complete the manifest, evaluate; only rank 0 writes."""
    from adapters.training.distributed import gathered_adapter_state

    full_state = gathered_adapter_state(trainer)  # collective under FSDP / ZeRO-3 (every rank), else None
    if not state.is_main_process:
        return
    manifest["adapter"] = save_adapter(trainer.model, tok, run / "adapter", ref.path, state_dict=full_state)
    log(f"[save] adapter -> {run / 'adapter'}")
    from adapters.evaluation.plots import plot_curves

    plot_curves(trainer.state.log_history, run / "loss_curve.png", title=run.name)
    tokens_seen = sum(len(e.input_ids) for e in train_enc) * (
        result.global_step * manifest["effective_batch_size"] / max(len(train_enc), 1)
    )
    manifest.update(
        {
            "status": "complete",
            "train": {
                "global_step": result.global_step,
                "train_loss": round(result.training_loss, 4),
                "seconds": round(seconds, 1),
                "approx_tokens_per_s": round(tokens_seen / seconds, 1),
                "resumed_from": str(resume_from) if resume_from else None,
            },
            "log_history": trainer.state.log_history,
            "wall_seconds": round(time.time() - t0, 1),
            "finished": datetime.now().isoformat(timespec="seconds"),
        }
    )
    write_json(run / "manifest.json", manifest)
    if recipe.eval_after_train:  # base (adapter disabled) vs tuned, forgetting probe, flags, report.md
        from adapters.evaluation.evaluate import evaluate_model

        evaluate_model(trainer.model, tok, recipe, run, trainer.state.log_history, base=recipe.eval_base, log=log)
        manifest["wall_seconds_with_eval"] = round(time.time() - t0, 1)
        write_json(run / "manifest.json", manifest)
    log(f"[done] {run} in {time.time() - t0:.0f}s")
