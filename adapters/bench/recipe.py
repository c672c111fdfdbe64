"""A recipe three ways, each in its own fresh Python process: the plain TRL a user would write, our path with the
forgetting guard off, and our path as the recipe says.

Same model, quantization, LoRA, data, batch, learning rate, seed and steps in all three:

- ``plain TRL``: the base loaded with the recipe's ``BitsAndBytesConfig``, a prompt/completion dataset of the
  recipe's training rows, ``SFTTrainer(peft_config=LoraConfig(...))`` and ``SFTConfig`` with TRL's defaults (gradient
  checkpointing on, every position through the LM head, LoRA cast to bfloat16 on a quantized base). Only the
  precision follows the recipe: TRL's ``bf16`` default would compute something else, and the loss gate would rightly
  fail.
- ``recipe``: our training path (adapters/training: data stage, base loading, LoRA, ``build_trainer`` and its
  switches) with ``base_kl_weight: 0``.
- ``recipe+guard``: the same, with the recipe's forgetting guard.

Validation and checkpoints are off in all three: only training steps are timed. Reported per row: real tokens/s
(padding not counted), mean step time, peak memory, the task loss on the same first batches (without the guard's KL
term) and the speedup against plain TRL, with ``throughput.gate`` on those losses.

Each path runs in a fresh process (``python -m adapters.bench.recipe SPEC RESULT``), as ``bench --data`` does: in one
process a later path starts on the heap an earlier one left (glibc keeps freed pages, the allocator's arenas grow),
so its peak RSS is not its own. On CPU ``peak_mem_gib`` is the child's whole-process peak RSS (``ru_maxrss``: tokenizer,
data, model load and training, everything the user's process would hold); ``train_peak_gib`` is the sampled peak
of the model load + training block alone.

    adapters bench --recipe gemma3-270m-demo               # CPU: the embedded Gemma 3 270M, int8 base
    adapters bench --recipe my-recipe.yaml --steps 10      # GPU: any recipe
    adapters bench --recipe gemma3-270m-demo --base_kl_every 2   # recipe keys as overrides (all three rows)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapters.bench.throughput import BenchError, _clock, gate, peak_memory, write_result

PLAIN, OFF, GUARD = "plain TRL", "recipe", "recipe+guard"
# A DPO loss at the first step is log 2 whatever the tokens (policy = reference): the gate also compares the
# policy's mean summed log-probs of chosen and rejected, which depend on every token, the template and the adapter.
PREFERENCE_GATE = ("logps/chosen", "logps/rejected")


@dataclass(frozen=True)
class RecipeBenchOptions:
    recipe: str
    steps: int | None = None  # None: the recipe's max_steps
    warmup: int = 1  # untimed first steps (allocator, first-call costs)
    gate_batches: int = 2
    out: str | Path = "outputs/bench"
    overrides: dict[str, Any] = field(default_factory=dict)  # recipe keys, for all three rows


class _Recorder:
    """Wraps a trainer's ``compute_loss``: real tokens per training micro-batch and the first task losses."""

    def __init__(self, trainer, keep: int):
        self.trainer, self.inner, self.keep = trainer, trainer.compute_loss, keep
        self.losses: list[float] = []
        self.tokens: list[tuple[int, int]] = []  # (step it belongs to, real tokens)
        self.logps: dict[str, list[float]] = {}  # preference trainers: PREFERENCE_GATE values of the first batches
        trainer.compute_loss = self

    def __call__(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return self.inner(model, inputs, return_outputs, num_items_in_batch)
        mask = inputs.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())  # padding-free: no pads
        self.tokens.append((self.trainer.state.global_step + 1, real))
        self.trainer.last_task_loss = None
        out = self.inner(model, inputs, return_outputs, num_items_in_batch)
        if len(self.losses) < self.keep:
            task = getattr(self.trainer, "last_task_loss", None)  # the guard's mixin: the loss before its KL term
            self.losses.append(task if task is not None else float((out[0] if return_outputs else out).detach()))
            metrics = getattr(self.trainer, "_metrics", {}).get("train", {})
            for key in PREFERENCE_GATE:  # DPO: the policy's summed log-probs of the batch, as TRL just logged them
                if metrics.get(key):
                    self.logps.setdefault(key, []).append(float(metrics[key][-1]))
        return out


def _row(path: str, rec: _Recorder, clock, warmup: int, mem: dict[str, Any], t0: float) -> dict[str, Any]:
    trained = [p for p in rec.trainer.model.parameters() if p.requires_grad]
    last = max(clock.marks)
    tokens = sum(n for step, n in rec.tokens if step > warmup)
    dt, dt_cpu = clock.marks[last] - clock.marks[warmup], clock.cpu[last] - clock.cpu[warmup]
    return {
        "path": path,
        "steps_timed": last - warmup,
        "real_tokens": tokens,
        "seconds": round(dt, 3),
        "step_s": round(dt / max(last - warmup, 1), 4),
        "tokens_per_s": round(tokens / dt, 1),
        "tokens_per_cpu_s": round(tokens / dt_cpu, 1),
        "peak_mem_gib": round(mem["peak_gib"], 4),
        "peak_mem_kind": mem["kind"],
        **({"rss_rise_gib": round(mem["rise_gib"], 4)} if "rise_gib" in mem else {}),
        "time_to_first_step_s": round(clock.marks[1] - t0, 2),
        "wall_s": round(clock.marks[last] - t0, 2),  # model load, trainer (a reference precompute) and every step
        "losses": rec.losses,
        **({"gate_values": {k: v for k, v in rec.logps.items()}} if rec.logps else {}),
        # TRL casts LoRA to bfloat16 on a quantized base (QLoRA's recipe); ours keeps the recipe's adapter_dtype
        "adapter_dtype": str(trained[0].dtype).removeprefix("torch.") if trained else None,
    }


def _recipe(opts: RecipeBenchOptions, tmp: Path, **changes: Any):
    from adapters.config import load_recipe

    fixed = {"eval_strategy": "no", "eval_after_train": False, "report_to": "none", "output_root": str(tmp)}
    recipe, _ = load_recipe(opts.recipe, {**opts.overrides, **fixed, **changes})
    steps = opts.steps or recipe.max_steps
    if not steps or steps <= opts.warmup:
        raise BenchError(f"--steps ({steps}) must exceed the {opts.warmup} untimed warmup step(s)")
    return load_recipe(
        opts.recipe, {**opts.overrides, **fixed, **changes, "max_steps": steps, "save_steps": steps + 1}
    )[0]


def run_plain(opts: RecipeBenchOptions, tmp: Path) -> dict[str, Any]:
    """TRL as its README shows it: a quantized base, a prompt/completion dataset, ``peft_config``, its defaults."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig, SFTTrainer

    from adapters.data.encode import prompts_and_answers
    from adapters.data.validate import read_rows
    from adapters.model.loading import device_map_for_process, load_tokenizer
    from adapters.model.lora import lora_config
    from adapters.model.quantization import quantization_config
    from adapters.model.sources import resolve_model
    from adapters.utils.dtypes import torch_dtype

    recipe = _recipe(opts, tmp)
    ref = resolve_model(recipe.model_name_or_path)
    tok = load_tokenizer(ref, recipe)
    prompts, answers = prompts_and_answers(read_rows(recipe.train_file, recipe.data_format, recipe.data_columns))
    ds = Dataset.from_dict({"prompt": prompts, "completion": [[{"role": "assistant", "content": a}] for a in answers]})
    cpu = not torch.cuda.is_available()
    with peak_memory() as mem:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            ref.path,
            dtype=torch_dtype(recipe.dtype),
            quantization_config=quantization_config(recipe),
            device_map=device_map_for_process(),
        )
        args = SFTConfig(
            output_dir=str(tmp / "plain"),
            per_device_train_batch_size=recipe.per_device_train_batch_size,
            gradient_accumulation_steps=recipe.gradient_accumulation_steps,
            max_steps=recipe.max_steps,
            **{k: getattr(recipe, k) for k in ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay")},
            max_length=recipe.max_length,
            seed=recipe.seed,
            bf16=bool(recipe.bf16),  # the recipe's precision (see the module docstring)
            use_cpu=cpu,
            save_strategy="no",
            report_to=[],
        )
        set_seed(recipe.seed)  # the same LoRA initialisation as our path
        clock = _clock()
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora_config(recipe)
        )
        trainer.add_callback(clock)
        rec = _Recorder(trainer, opts.gate_batches)
        trainer.train()
    row = _row(PLAIN, rec, clock, opts.warmup, mem, t0)
    row["gradient_checkpointing"] = bool(args.gradient_checkpointing)
    return row


def run_ours(opts: RecipeBenchOptions, tmp: Path, path: str, **changes: Any) -> dict[str, Any]:
    """Our training path as ``adapters train`` runs it (adapters/training/run.py's setup and fit), without the run
    folder's manifest, adapter save and evaluation."""
    from transformers import set_seed

    from adapters.compat.trl import trained_positions_only
    from adapters.data.encode import to_dataset
    from adapters.data.pipeline import packing_guard, prepare_data
    from adapters.model.loading import load_model, load_tokenizer
    from adapters.model.lora import attach_lora
    from adapters.model.sources import resolve_model
    from adapters.training.forgetting_guard import resolve_source, trained_share_of
    from adapters.training.trainer import build_trainer

    recipe = _recipe(opts, tmp, **changes)
    ref = resolve_model(recipe.model_name_or_path)
    tok = load_tokenizer(ref, recipe)
    quiet = lambda *_a, **_k: None  # noqa: E731 - the data stage's report lines are not the bench's
    packed = packing_guard(recipe, say=quiet)
    train_enc, _, _, report = prepare_data(recipe, tok, None, say=quiet, write=False, packed=packed)
    recipe.base_kl_source, _ = resolve_source(recipe.base_kl_source, trained_share_of(report))  # as a run does
    with peak_memory() as mem:
        t0 = time.perf_counter()
        model = load_model(ref, recipe)
        set_seed(recipe.seed)
        model = attach_lora(model, recipe)
        clock = _clock()
        ds = to_dataset(train_enc, pack_length=recipe.max_length if packed else None)
        trainer, _ = build_trainer(model, tok, recipe, tmp / path.replace("+", "-"), ds, None, packed=packed)
        trainer.add_callback(clock)
        rec = _Recorder(trainer, opts.gate_batches)
        with trained_positions_only(bool(trainer.fast_path.get("trained_positions_only", {}).get("value"))):
            trainer.train()
    row = _row(path, rec, clock, opts.warmup, mem, t0)
    row["gradient_checkpointing"] = recipe.gradient_checkpointing
    row["switches"] = {k: v["value"] for k, v in trainer.fast_path.items()}
    row["guard"] = {k: getattr(recipe, k) for k in ("base_kl_weight", "base_kl_positions", "base_kl_every")}
    return row


def _pref_rows(recipe):
    """The recipe's preference training rows as TRL takes them (prompt/chosen/rejected), validated by our data stage
    (the same rows on both paths; the demo's file has no row the stage drops)."""
    from adapters.data.preference import prepare_preference

    train, _, _ = prepare_preference(recipe, _tok(recipe), None, say=lambda *_a, **_k: None, write=False)
    return train


def _tok(recipe):
    from adapters.model.loading import load_tokenizer
    from adapters.model.sources import resolve_model

    return load_tokenizer(resolve_model(recipe.model_name_or_path), recipe)


def run_plain_dpo(opts: RecipeBenchOptions, tmp: Path) -> dict[str, Any]:
    """TRL's DPOTrainer as a user writes it to continue an SFT adapter: the quantized base, the adapter loaded as a
    trainable ``PeftModel``, ``ref_model=None`` (TRL copies the adapter into a frozen ``ref``), ``DPOConfig`` with
    TRL's defaults (gradient checkpointing on, the reference in every step, every position through the LM head, LoRA
    cast to bfloat16 on a quantized base). Same rows, batch, steps, learning rate, beta, loss and precision."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, set_seed
    from trl import DPOConfig, DPOTrainer

    from adapters.model.loading import device_map_for_process
    from adapters.model.quantization import quantization_config
    from adapters.model.sources import resolve_model
    from adapters.publish.hub import resolve_adapter
    from adapters.utils.dtypes import torch_dtype

    recipe = _recipe(opts, tmp)
    if not recipe.init_adapter:
        raise BenchError(f"bench --recipe {opts.recipe}: the DPO bench continues an SFT adapter; give --init_adapter")
    ref = resolve_model(recipe.model_name_or_path)
    tok = _tok(recipe)
    ds = _pref_rows(recipe)
    adapter_dir = resolve_adapter(recipe.init_adapter).adapter_dir
    cpu = not torch.cuda.is_available()
    with peak_memory() as mem:
        t0 = time.perf_counter()
        base = AutoModelForCausalLM.from_pretrained(
            ref.path,
            dtype=torch_dtype(recipe.dtype),
            quantization_config=quantization_config(recipe),
            device_map=device_map_for_process(),
        )
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
        args = DPOConfig(
            output_dir=str(tmp / "plain"),
            per_device_train_batch_size=recipe.per_device_train_batch_size,
            gradient_accumulation_steps=recipe.gradient_accumulation_steps,
            max_steps=recipe.max_steps,
            **{
                k: getattr(recipe, k)
                for k in ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "beta", "loss_type")
            },
            max_length=recipe.max_length,
            seed=recipe.seed,
            bf16=bool(recipe.bf16),
            use_cpu=cpu,
            save_strategy="no",
            report_to=[],
        )
        set_seed(recipe.seed)
        clock = _clock()
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=ds, processing_class=tok)
        trainer.add_callback(clock)
        rec = _Recorder(trainer, opts.gate_batches)
        trainer.train()
    row = _row(PLAIN, rec, clock, opts.warmup, mem, t0)
    row["gradient_checkpointing"] = bool(args.gradient_checkpointing)
    row["precompute_ref_log_probs"] = bool(args.precompute_ref_log_probs)
    return row


def run_ours_dpo(opts: RecipeBenchOptions, tmp: Path, path: str, **changes: Any) -> dict[str, Any]:
    """Our preference path as ``adapters train`` runs it (run.py: data stage, base, the starting adapter,
    ``build_preference_trainer`` with its levers, ``trained_positions_only`` around ``train()``)."""
    from transformers import set_seed

    from adapters.compat.trl import trained_positions_only
    from adapters.model.loading import load_model
    from adapters.model.lora import attach_lora
    from adapters.model.sources import resolve_model
    from adapters.training.preference import build_preference_trainer

    recipe = _recipe(opts, tmp, **changes)
    ref = resolve_model(recipe.model_name_or_path)
    tok = _tok(recipe)
    ds = _pref_rows(recipe)
    with peak_memory() as mem:
        t0 = time.perf_counter()
        model = load_model(ref, recipe)
        set_seed(recipe.seed)
        model = attach_lora(model, recipe)
        clock = _clock()
        trainer, _ = build_preference_trainer(model, tok, recipe, tmp / path.replace("+", "-"), ds, None)
        trainer.add_callback(clock)
        rec = _Recorder(trainer, opts.gate_batches)
        with trained_positions_only(bool(trainer.fast_path.get("trained_positions_only", {}).get("value"))):
            trainer.train()
    row = _row(path, rec, clock, opts.warmup, mem, t0)
    row["gradient_checkpointing"] = recipe.gradient_checkpointing
    row["switches"] = {k: v["value"] for k, v in trainer.fast_path.items()}
    row["reference"] = trainer.reference
    return row


PATHS = {
    PLAIN: lambda opts, tmp: run_plain(opts, tmp),
    OFF: lambda opts, tmp: run_ours(opts, tmp, OFF, base_kl_weight=0.0),
    GUARD: lambda opts, tmp: run_ours(opts, tmp, GUARD),
}
PREFERENCE_PATHS = {
    PLAIN: run_plain_dpo,
    OFF: lambda opts, tmp: run_ours_dpo(opts, tmp, OFF),
}


def _spec(opts: RecipeBenchOptions, path: str, tmp: Path, trainer: str = "sft") -> dict[str, Any]:
    return {
        "path": path,
        "trainer": trainer,
        "tmp": str(tmp),
        "opts": {
            "recipe": str(opts.recipe),
            "steps": opts.steps,
            "warmup": opts.warmup,
            "gate_batches": opts.gate_batches,
            "out": str(opts.out),
            "overrides": opts.overrides,
        },
    }


def run_in_process(opts: RecipeBenchOptions, path: str, tmp: Path, trainer: str = "sft") -> dict[str, Any]:
    """One path in a fresh Python process (``child``); its row, with that process's own peak RSS."""
    name = path.replace(" ", "_").replace("+", "-")
    spec_file, result_file = tmp / f"{name}.spec.json", tmp / "result.json"
    spec_file.write_text(json.dumps(_spec(opts, path, tmp, trainer), default=str), encoding="utf-8")
    result_file.unlink(missing_ok=True)
    log_file = Path(opts.out) / f"{name}.log"  # the process's own output (TRL's progress, warnings): kept
    cmd = [sys.executable, "-m", "adapters.bench.recipe", str(spec_file), str(result_file)]
    with open(log_file, "w", encoding="utf-8") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = json.loads(result_file.read_text(encoding="utf-8")) if result_file.is_file() else None
    if out is not None and "error" in out:  # a user's mistake the child met (a recipe key, a file): one line
        raise BenchError(out["error"])
    if rc.returncode != 0 or out is None:
        tail = log_file.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise RuntimeError(f"bench --recipe: the {path!r} process failed (exit {rc.returncode}; {log_file}):\n{tail}")
    return out["row"]


def child(spec_file: str | Path, result_file: str | Path) -> None:
    """The body of one path's process: run it, add the process's peak RSS, write ``{"row": …}`` (or ``{"error"}``
    for an AdaptersError) to ``result_file``."""
    from adapters.utils.atomic import write_json
    from adapters.utils.errors import AdaptersError

    spec = json.loads(Path(spec_file).read_text(encoding="utf-8"))
    opts = RecipeBenchOptions(**spec["opts"])
    try:
        runners = PREFERENCE_PATHS if spec.get("trainer", "sft") != "sft" else PATHS
        row = runners[spec["path"]](opts, Path(spec["tmp"]))
    except AdaptersError as e:
        write_json(Path(result_file), {"error": str(e)})
        return
    if not torch.cuda.is_available():  # the whole process: everything this path needed, from its first import
        row["train_peak_gib"], row["train_peak_kind"] = row["peak_mem_gib"], row["peak_mem_kind"]
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        row["peak_mem_gib"] = round(max(ru, row["train_peak_gib"]), 4)  # the sampled peak is a lower bound of it
        row["peak_mem_kind"] = "process_peak_rss"
    row["pid"] = os.getpid()
    write_json(Path(result_file), {"row": row})


def _gated(row: dict[str, Any]) -> list[float]:
    """The values the loss gate compares: the first losses, then (preference trainers) the first log-probs."""
    values = row.get("gate_values") or {}
    return [*row["losses"], *(x for k in PREFERENCE_GATE for x in values.get(k, []))]


def _comparison(scenario: str, plain: dict[str, Any], ours: dict[str, Any], off: dict[str, Any]) -> dict[str, Any]:
    out = {
        "scenario": scenario,
        "speedup": round(ours["tokens_per_s"] / plain["tokens_per_s"], 3),
        "speedup_cpu_time": round(ours["tokens_per_cpu_s"] / plain["tokens_per_cpu_s"], 3),
        # the whole run, load to last step: counts what a step no longer does (our DPO's reference precompute)
        "speedup_wall": round(plain["wall_s"] / ours["wall_s"], 3),
        "memory_ratio": round(ours["peak_mem_gib"] / plain["peak_mem_gib"], 3),
        **(
            {"train_memory_ratio": round(ours["train_peak_gib"] / plain["train_peak_gib"], 3)}
            if "train_peak_gib" in ours and "train_peak_gib" in plain
            else {}
        ),
        "gate": gate(_gated(plain), _gated(ours)),
    }
    if ours is not off:  # what the guard adds to a step of the same path
        out["guard_extra_step_time"] = round(ours["step_s"] / off["step_s"] - 1, 3)
    return out


def bench_recipe(opts: RecipeBenchOptions, log=print) -> dict[str, Any]:
    """Plain TRL, our path with the guard off, our path as the recipe says; bench.json and bench.md under opts.out."""
    from adapters.utils.provenance import hardware, versions

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="adapters-bench-") as tmp:
        recipe = _recipe(opts, Path(tmp))
        log(
            f"[bench] {opts.recipe}: {recipe.model_name_or_path}, {recipe.max_steps} steps of batch "
            f"{recipe.per_device_train_batch_size}x{recipe.gradient_accumulation_steps}, "
            f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else f'CPU, {torch.get_num_threads()} threads'}"
        )
        rows = []
        if recipe.trainer not in ("sft", "dpo"):
            raise BenchError(f"bench --recipe: trainer {recipe.trainer!r} has no bench (sft and dpo have)")
        for path in (PLAIN, OFF, GUARD):
            if path == GUARD and (recipe.trainer != "sft" or not recipe.base_kl_weight):
                log(f"[bench] {path}: skipped, the recipe trains without the forgetting guard")
                continue
            rows.append(run_in_process(opts, path, Path(tmp), recipe.trainer))
            log(f"[bench]   {path:13s} {rows[-1]['tokens_per_s']:8,.1f} tok/s, {rows[-1]['step_s']:.2f} s/step")
    plain, off = rows[0], rows[1]
    result: dict[str, Any] = {
        "recipe": opts.recipe,
        "trainer": recipe.trainer,
        "model": recipe.model_name_or_path,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "steps": recipe.max_steps,
        "warmup": opts.warmup,
        "isolation": "process",  # each row from its own fresh Python process
        "batch": recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps,
        "overrides": dict(opts.overrides),
        "versions": versions(),
        "hardware": hardware(),
        "rows": rows,
        "comparisons": [_comparison(r["path"], plain, r, off) for r in rows[1:]],
    }
    return write_result(out, result, table(result), log)


def table(result: dict[str, Any]) -> str:
    mem = "peak alloc GiB" if result["device"] == "cuda" else "process peak RSS GiB"
    lines = [
        f"Recipe {result['recipe']} ({result['model']}) on {result['device']}: {result['steps']} steps of batch "
        f"{result['batch']}, the first {result['warmup']} untimed; each path in its own fresh process.",
        "",
        f"| path | real tokens/s | s/step | vs plain TRL | vs plain (CPU time) | load to last step s "
        f"| vs plain (load to last step) | {mem} "
        f"| memory vs plain | load+train peak RSS GiB | loss (first batches) | gate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    comps = {c["scenario"]: c for c in result["comparisons"]}
    for r in result["rows"]:
        c = comps.get(r["path"])
        g = c["gate"] if c else None
        verdict = (
            "" if g is None else g["verdict"] + (f" ({g['max_rel_diff']:.1e})" if g["max_rel_diff"] is not None else "")
        )
        lines.append(
            f"| {r['path']} | {r['tokens_per_s']:,.1f} | {r['step_s']:.2f} | {c['speedup'] if c else 1.0:.2f}x "
            f"| {c['speedup_cpu_time'] if c else 1.0:.2f}x | {r.get('wall_s', 0):.1f} "
            f"| {c.get('speedup_wall', 1.0) if c else 1.0:.2f}x | {r['peak_mem_gib']:.2f} "
            f"| {c['memory_ratio'] if c else 1.0:.2f}x | {r.get('train_peak_gib', r['peak_mem_gib']):.2f} "
            f"| {', '.join(f'{x:.4f}' for x in r['losses'])} | {verdict} |"
        )
    gated = [r for r in result["rows"] if r.get("gate_values")]
    if gated:
        lines += ["", "The gate also compares the policy's mean summed log-probs on the first batches:"]
        lines += [
            f"- {r['path']}: "
            + "; ".join(f"{k} {', '.join(f'{x:.4f}' for x in v)}" for k, v in r["gate_values"].items())
            for r in gated
        ]
    guard = comps.get(GUARD)
    if guard:
        g = next(r["guard"] for r in result["rows"] if r["path"] == GUARD)
        lines += [
            "",
            f"Forgetting guard ({', '.join(f'{k} {v}' for k, v in g.items())}): "
            f"{guard['guard_extra_step_time']:+.0%} step time over the guard-off path.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":  # one path of adapters bench --recipe: SPEC_FILE RESULT_FILE (see run_in_process)
    child(sys.argv[1], sys.argv[2])
