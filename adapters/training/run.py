"""Training: recipe -> quantized base -> LoRA -> TRL SFTTrainer -> outputs/<run_name>/.

Runs unchanged under ``accelerate launch``: one whole model per process (never device_map="auto" with several
processes), and only the main process writes the run directory.
"""

from __future__ import annotations

import json
import re
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
from adapters.training import lifecycle
from adapters.training.preclaim import check_before_claim
from adapters.training.trainer import build_trainer
from adapters.utils.atomic import staged_dir, write_json
from adapters.utils.errors import AdaptersError, PathNotFoundError
from adapters.utils.hashing import chat_template_sha256
from adapters.utils.provenance import git_state, hardware, versions


class TrainingDiverged(AdaptersError, RuntimeError):
    """The loss or gradient norm became NaN/inf; nothing from that point was saved."""


def log(msg: str) -> None:
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------- run dir
def new_run_name(recipe_path: Path) -> str:
    """<recipe>-<YYYYmmdd-HHMMSS>, with anything but letters, digits, '.', '_' and '-' in the recipe's name made '-'
    (a run name is one folder name)."""
    return f"{_safe_stem(recipe_path)}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _safe_stem(recipe_path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", recipe_path.stem).strip(".") or "run"


def run_dir_for(recipe: Recipe, recipe_path: Path, resume: bool) -> Path:
    """The run's folder: always one name (checked by the recipe, or generated) under output_root."""
    root = Path(recipe.output_root)
    if recipe.run_name:
        return root / recipe.run_name
    if resume:  # the newest run of this recipe
        stem = _safe_stem(recipe_path)
        runs = sorted((p for p in root.glob(f"{stem}-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise PathNotFoundError(f"--resume: no earlier run of {stem} under {root}/; pass --run_name")
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

    claim (lock, resume check, leftovers) -> setup (data, base) -> fit (LoRA, trainer, train) -> finish (adapter,
    manifest, evaluation). Every ending is recorded in the manifest (see adapters/training/lifecycle.py).
    """
    from adapters.training.distributed import process_state

    state = process_state(recipe.ddp_timeout)  # gloo on CPU, NCCL on GPUs; a bare PartialState() on CPU: 1 process
    t0 = time.time()
    set_seed(recipe.seed)
    check_before_claim(recipe)  # every refusal that needs no model and no data: before any folder exists
    claim = _claim_run_dir(recipe, recipe_path, resume, state)
    run = claim["run"]
    with lifecycle.Lifecycle(run, str(recipe_path), claim["lock"], recipe.save_on_interrupt, log) as life:
        _run(recipe, recipe_path, claim, callbacks, state, life, t0)
    state.wait_for_everyone()
    sys.stdout.flush()
    return run


def _run(recipe: Recipe, recipe_path: Path, claim: dict, callbacks, state, life, t0: float) -> None:
    from adapters.data.pipeline import packing_guard, prepare_data
    from adapters.planning.preflight import before_train
    from adapters.training.distributed import world_record

    run, resume_from = claim["run"], claim["resume_from"]
    ref = resolve_model(recipe.model_name_or_path)
    before_train(recipe, ref.path)  # known-bad recipe / launcher / model combinations fail here, naming the fix
    saved = run / ckpt.TOKENIZER_DIR
    tok = load_tokenizer(ref, recipe, follow=saved if claim["previous"] and saved.is_dir() else None, say=log)
    packed = False if recipe.preference else packing_guard(recipe, say=log)  # only where samples stay apart
    if recipe.preference:  # pairs or KTO rows, validated and audited; TRL tokenizes them (adapters/data/preference.py)
        from adapters.data.preference import prepare_preference

        train_enc, eval_enc, data_report = prepare_preference(recipe, tok, run, say=log, write=state.is_main_process)
    elif recipe.streaming:  # train_file read as the trainer asks for rows (adapters/data/streaming.py)
        from adapters.data.streaming import prepare_stream

        train_enc, eval_enc, _, data_report = prepare_stream(
            recipe, tok, run, say=log, write=state.is_main_process, packed=packed
        )
    else:
        train_enc, eval_enc, _, data_report = prepare_data(
            recipe, tok, run, say=log, write=state.is_main_process, packed=packed
        )
    if recipe.base_kl_weight > 0:  # auto -> rows or general, by the audit's trained share; recorded below
        from adapters.training.forgetting_guard import resolve_source, trained_share_of

        share = None if recipe.preference else trained_share_of(data_report)  # pairs: general text only
        recipe.base_kl_source, why = resolve_source(recipe.base_kl_source, share)
        if why:
            log(f"[guard] {why}")
    previous = claim["previous"]
    if previous:
        lifecycle.data_changes(previous.get("data"), data_report)  # same files, but not the same contents?
        lifecycle.world_change(previous, state.num_processes)
    manifest = _new_manifest(recipe, recipe_path, run, ref, tok, data_report, state.num_processes)
    manifest.update(world_record(state))  # machines and each rank's host (a collective)
    if previous:
        _as_resumed(manifest, previous, claim["changes"], resume_from)
    if state.is_main_process:
        write_json(run / "manifest.json", manifest)
    life.manifest = manifest
    model = _load_base(ref, recipe, tok, train_enc, manifest)
    trainer, result, seconds = _fit(
        model, tok, recipe, run, train_enc, eval_enc, packed, callbacks, resume_from, manifest, life
    )
    _finish(trainer, tok, recipe, run, ref, train_enc, result, seconds, resume_from, manifest, t0, state, life)


def _claim_run_dir(recipe: Recipe, recipe_path: Path, resume: bool, state) -> dict[str, Any]:
    """Claim the run directory before any slow work: only the main process locks it, checks a resume against the
    run's manifest and removes leftover staging folders; the others wait and learn the outcome from it."""
    from accelerate.utils import broadcast_object_list

    claim: dict[str, Any] = {"run": None, "lock": None, "previous": None, "changes": {}, "error": None}
    if state.is_main_process:
        try:
            claim.update(_claim_main(recipe, recipe_path, resume))
        except Exception as e:  # every process must learn of it, or the others wait forever below
            if state.num_processes == 1:
                raise
            claim["error"] = e
    if state.num_processes > 1:
        shared = broadcast_object_list([{k: v for k, v in claim.items() if k != "lock"}])
        if not state.is_main_process:
            claim = {**shared[0], "lock": None}
        if claim["error"] is not None:
            raise claim["error"]
    run = claim["run"]
    resume_from = None
    if resume:
        resume_from = ckpt.last_good_checkpoint(run / "checkpoints", log=log)
        log(f"[resume] {'from ' + str(resume_from) if resume_from else 'no complete checkpoint; starting fresh'}")
    log(f"[run] {run}")
    return {**claim, "resume_from": resume_from}


def _claim_main(recipe: Recipe, recipe_path: Path, resume: bool) -> dict[str, Any]:
    run = run_dir_for(recipe, recipe_path, resume)
    lock = lifecycle.claim(run, resume, log)
    try:
        previous, changes = None, {}
        mf = run / "manifest.json"
        if resume and mf.is_file():
            previous = json.loads(mf.read_text())
            changes = lifecycle.resume_changes(previous.get("config") or {}, recipe)
        lifecycle.clear_staging(run, log)
    except BaseException:
        lock.release()
        raise
    return {"run": run, "lock": lock, "previous": previous, "changes": changes}


def _as_resumed(manifest: dict, previous: dict, changes: dict, resume_from: Path | None) -> None:
    """A resumed run's record: the run's config plus the changes the resume was allowed (nothing it did not use),
    its first start, and one event per resume."""
    manifest["config"] = {**(previous.get("config") or {}), **{k: new for k, (_old, new) in changes.items()}}
    manifest["started"] = previous.get("started", manifest["started"])
    step = int(resume_from.name.rpartition("-")[2]) if resume_from else 0
    manifest["resumes"] = [*previous.get("resumes", []), lifecycle.resume_event(step, changes, previous)]
    if changes:
        log("[resume] changed: " + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items()))


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

    if recipe.preference:
        from adapters.data.preference import probe_rows

        train_enc = probe_rows(tok, train_enc)
    model, qreport = quantization_report(ref, recipe, {"task": _probe_batch(train_enc), "general": _general_batch(tok)})
    print_quant_report(qreport, log=log)
    manifest["quantization"] = qreport
    manifest["base_fingerprint"] = base_fingerprint(model)
    manifest["base_config"] = {
        k: getattr(model.config, k, None)
        for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings")
    }
    return model


def _fit(model, tok, recipe: Recipe, run: Path, train_enc, eval_enc, packed, callbacks, resume_from, manifest, life):
    """LoRA on the base, the trainer, and the training loop; stops with TrainingDiverged at a non-finite value, and
    at a step boundary on SIGINT/SIGTERM (``life``: checkpoint first when save_on_interrupt)."""
    from adapters.compat.trl import trained_positions_only

    model = attach_lora(model, recipe)
    manifest["parameters"] = p = parameter_counts(model)
    log(f"[lora] trainable parameters: {p['trainable']:,} of {p['total']:,} ({p['trainable_pct']:.3f}%)")
    pack_length = recipe.max_length if packed else None
    streamed = hasattr(train_enc, "trainer_dataset")
    if recipe.preference:  # DPO / KTO / ORPO on the same LoRA model; the reference is chosen there
        from adapters.training.preference import build_preference_trainer

        trainer, guard = build_preference_trainer(
            model, tok, recipe, run, train_enc, eval_enc, callbacks=callbacks, data_report=manifest.get("data")
        )
        manifest["reference"] = trainer.reference
        log(
            f"[{recipe.trainer}] reference: {trainer.reference['kind']}: {trainer.reference.get('how', trainer.reference.get('why'))}"
        )
    else:
        trainer, guard = build_trainer(
            model,
            tok,
            recipe,
            run,
            train_enc.trainer_dataset(pack_length) if streamed else to_dataset(train_enc, pack_length=pack_length),
            to_dataset(eval_enc) if eval_enc else None,
            packed=packed,
            callbacks=callbacks,
            length_sample=to_dataset(train_enc.head) if streamed else None,
        )
    manifest["fast_path"] = trainer.fast_path
    from adapters.training.distributed import sharding

    manifest["sharding"] = sharding(trainer)  # 'fsdp', 'zero3' or None: whether parameters were really sharded
    trainer.add_callback(life.callback(guard))
    life.trainer = trainer
    life.writing = lambda: run / "checkpoints" / f"checkpoint-{trainer.state.global_step}"
    t_train = time.time()
    life.training = True
    try:
        with trained_positions_only(bool(trainer.fast_path.get("trained_positions_only", {}).get("value"))):
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        life.training = False
    seconds = time.time() - t_train
    life.check_interrupted()  # stopped by a signal: the checkpoint is saved, the run ends as interrupted
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


def _finish(
    trainer, tok, recipe: Recipe, run: Path, ref, train_enc, result, seconds, resume_from, manifest, t0, state, life
):
    """Save the adapter (gathered under FSDP / ZeRO-3), complete the manifest, evaluate; only rank 0 writes."""
    from adapters.training.distributed import gathered_adapter_state

    if recipe.preference:  # TRL's frozen 'ref' copy is never saved, merged, exported or pushed
        from adapters.training.preference import drop_reference

        drop_reference(trainer.accelerator.unwrap_model(trainer.model))
    full_state = gathered_adapter_state(trainer)  # collective under FSDP / ZeRO-3 (every rank), else None
    if not state.is_main_process:
        return
    life.writing = lambda: run / "adapter"
    manifest["adapter"] = save_adapter(trainer.model, tok, run / "adapter", ref.path, state_dict=full_state)
    log(f"[save] adapter -> {run / 'adapter'}")
    life.writing = lambda: run
    from adapters.evaluation.plots import plot_curves

    plot_curves(trainer.state.log_history, run / "loss_curve.png", title=run.name)
    rows_trained = result.global_step * manifest["effective_batch_size"]
    if recipe.preference:  # prompt + answer tokens of the kept rows, from the audit
        tokens_seen = manifest["data"]["train"]["tokens"] * rows_trained / max(manifest["data"]["train"]["kept"], 1)
    elif hasattr(train_enc, "stream"):  # a stream has no length: the audited head's mean length stands for the rows
        tokens_seen = train_enc.mean_tokens() * rows_trained
        manifest["data"]["stream"] = train_enc.stream.counts()
    else:
        tokens_seen = sum(len(e.input_ids) for e in train_enc) * rows_trained / max(len(train_enc), 1)
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

        ev = evaluate_model(trainer.model, tok, recipe, run, trainer.state.log_history, base=recipe.eval_base, log=log)
        manifest["wall_seconds_with_eval"] = round(time.time() - t0, 1)
        write_json(run / "manifest.json", manifest)
        flags = ev.get("flags") or []
    else:
        flags = ((manifest.get("data") or {}).get("audit") or {}).get("warnings") or []
    log(f"[done] {run} in {time.time() - t0:.0f}s")
    for f in flags:  # the closing lines: what a user must not miss
        log(f"[flag] {f['name']}: {f['message']}")
