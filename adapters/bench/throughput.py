"""Side-by-side speed and memory benchmark: the plain TRL + PEFT (+ bitsandbytes) baseline, then our path.

Both runs use the same random-initialised model (a real architecture config, no download), the same pre-tokenised
random data, the same LoRA config (r=16, alpha=32, all-linear) and the same effective batch. The baseline is
``SFTTrainer`` with its defaults (gradient checkpointing on, padded per batch), NF4 double-quant where CUDA is present
(as in the measured GPU baseline in docs/bench.md). Our path is the same trainer with the switches of
``adapters.training.speed`` turned on.

Reported per run: real tokens/s (padding not counted), peak memory (``torch.cuda.max_memory_allocated`` on GPU,
peak RSS sampled during the run on CPU), model FLOPs utilisation against 989 TFLOP/s and against a measured matmul
peak, time to the first step, and the loss on the same first batches. The gate: our loss within 1e-3 relative of the
baseline's on each of those batches, else the comparison is INVALID.

    adapters bench                                   # CPU: tiny shape, fixed + ragged, a few steps
    adapters bench --model llama-3.2-1b --steps 25   # GPU: the anchor shape
    adapters bench --padding_free false              # any switch of adapters.training.speed can be forced
"""

from __future__ import annotations

import gc
import math
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from adapters.model.shapes import ARCHS  # real architecture shapes, random init: only the shapes matter
from adapters.training import speed as fast
from adapters.utils.errors import AdaptersError
from adapters.utils.memory import PeakRSS

PEAK_TFLOPS = 989.0  # H100/H200 dense bf16
GATE_RTOL = 1e-3


class BenchError(AdaptersError, ValueError):
    """A bench argument is invalid; the message names it."""


def model_config(name: str):
    from transformers import LlamaConfig, Qwen2Config

    if name not in ARCHS:
        raise BenchError(f"--model: unknown shape {name!r}; choose one of {', '.join(ARCHS)}")
    kind, kw = ARCHS[name]
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    return cls(**kw, pad_token_id=0, eos_token_id=1, bos_token_id=None)


# ---------------------------------------------------------------------------------------------------- data
def make_lengths(n: int, scenario: str, max_len: int, median: int, seed: int = 1) -> list[int]:
    """Fixed: every sample ``max_len`` tokens. Ragged: lognormal (sigma 0.9) around ``median``, capped at ``max_len``."""
    if scenario == "fixed":
        return [max_len] * n
    if scenario != "ragged":
        raise BenchError(f"--scenarios: unknown scenario {scenario!r}; choose fixed or ragged")
    g = torch.Generator().manual_seed(seed)
    lo = max(8, median // 20)
    return torch.exp(torch.randn(n, generator=g) * 0.9 + math.log(median)).clamp(lo, max_len).long().tolist()


def make_dataset(lengths: list[int], vocab: int, seed: int = 2):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    return Dataset.from_dict({"input_ids": ids})


def tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


# ---------------------------------------------------------------------------------------------------- FLOPs
def flops_per_sample(cfg, n_lora: int, length: int) -> float:
    """Model FLOPs of one LoRA training pass over a sample (the count behind the MFU figures of docs/bench.md).

    Frozen matmul weights cost 4N per token (forward + input gradients, no weight gradients); LoRA weights 6N;
    causal attention 6 * layers * (heads * head_dim) * length per token. Checkpoint recompute is not model FLOPs.
    """
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size
    n_frozen = layers * per_layer + h * cfg.vocab_size  # + lm_head (tied or not, it is a matmul)
    return (4 * n_frozen + 6 * n_lora) * length + 6 * layers * q * length * length


def matmul_peak_tflops(cuda: bool) -> float:
    """Measured dense matmul peak: bf16 8192^3 on GPU, fp32 1024^3 on CPU."""
    n, dtype, reps = (8192, torch.bfloat16, 20) if cuda else (1024, torch.float32, 5)
    dev = "cuda" if cuda else "cpu"
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(2):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


# ---------------------------------------------------------------------------------------------------- one run
@dataclass
class Setup:
    model: str
    scenario: str
    steps: int
    warmup: int
    batch: int
    grad_accum: int
    max_len: int
    median: int
    quant: str  # nf4 or none
    gate_batches: int
    seed: int = 42


def _trainer_class():
    from trl import SFTTrainer

    class BenchTrainer(SFTTrainer):
        """Records, per micro-batch, the loss (first few), the sample lengths and the step it belongs to."""

        def __init__(self, *a, keep_losses: int = 2, **kw):
            super().__init__(*a, **kw)
            self.keep_losses, self.losses, self.lengths = keep_losses, [], []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "attention_mask" in inputs:
                lens = inputs["attention_mask"].sum(1).tolist()
            else:  # padding-free: one row, sample boundaries in cu_seq_lens_q
                lens = inputs["cu_seq_lens_q"].diff().tolist()
            self.lengths.append((self.state.global_step + 1, lens))
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if len(self.losses) < self.keep_losses:
                loss = out[0] if return_outputs else out
                self.losses.append(float(loss.detach()))
            return out

    return BenchTrainer


def _clock():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks: dict[int, float] = {}
            self.cpu: dict[int, float] = {}  # process CPU seconds: robust to other processes on a shared CPU

        def on_train_begin(self, args, state, control, **kw):
            self.marks[0], self.cpu[0] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks[state.global_step], self.cpu[state.global_step] = time.perf_counter(), time.process_time()

    return Clock()


def _load_model(setup: Setup, model_dir: Path, attn: str, cuda: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if cuda else torch.float32
    kw: dict[str, Any] = dict(dtype=dtype, attn_implementation=attn)
    if setup.quant == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if cuda:
        kw["device_map"] = {"": 0}
    return AutoModelForCausalLM.from_pretrained(str(model_dir), **kw)


def _sft_config(setup: Setup, out_dir: Path, cuda: bool, gckpt: bool, sw: dict[str, Any]):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=setup.batch,
        gradient_accumulation_steps=setup.grad_accum,
        max_steps=setup.steps,
        learning_rate=2e-4,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=setup.seed,
        data_seed=setup.seed,
        bf16=cuda,
        use_cpu=not cuda,
        dataloader_pin_memory=cuda,
        # the baseline keeps TRL's default max_length (data is already cut to max_len); padding-free needs None
        max_length=None if sw.get("padding_free") else setup.max_len,
        dataset_kwargs={"skip_prepare_dataset": True},  # pre-tokenised; both paths see the same ids
        gradient_checkpointing=gckpt,
        **sw,
    )


@dataclass
class _Trained:
    """What one timed run leaves for its row: the trainer (losses, lengths), the clock and the switches used."""

    trainer: Any
    clock: Any
    gradient_checkpointing: bool
    sft_switches: dict[str, Any]


def _train(
    setup: Setup, model_dir: Path, ds, switches: fast.Plan | None, attn: str, out_dir: Path, cuda: bool
) -> _Trained:
    from peft import LoraConfig
    from transformers import set_seed

    model = _load_model(setup, model_dir, attn, cuda)
    sw = switches.sft_kwargs() if switches is not None else {}
    compact = bool(switches.values.get("trained_positions_only")) if switches is not None else False
    gckpt = switches.values.get("gradient_checkpointing", True) if switches is not None else True
    args = _sft_config(setup, out_dir, cuda, gckpt, sw)
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    set_seed(setup.seed)  # same LoRA init in both runs
    clock = _clock()
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tokenizer(),
        peft_config=peft_cfg,
        callbacks=[clock],
        keep_losses=setup.gate_batches,
    )
    from adapters.compat.trl import trained_positions_only

    with trained_positions_only(compact and fast.compact_hook_available()):  # the baseline keeps TRL's own choice
        trainer.train()
    return _Trained(trainer, clock, gckpt, sw)


def _row(setup: Setup, path: str, run: _Trained, attn: str, t0: float, peak: float, peak_kind: str) -> dict[str, Any]:
    """Throughput over the timed steps (after warmup), counting real tokens and, separately, computed ones."""
    trainer, clock = run.trainer, run.clock
    cfg = model_config(setup.model)
    n_lora = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    timed = [(s, lens) for s, lens in trainer.lengths if s > setup.warmup]
    tokens = sum(sum(lens) for _, lens in timed)
    flops = sum(flops_per_sample(cfg, n_lora, n) for _, lens in timed for n in lens)
    # padding-free computes only real tokens; otherwise every sample is padded to its batch's longest
    padded = tokens if run.sft_switches.get("padding_free") else sum(len(lens) * max(lens) for _, lens in timed)
    last = max(clock.marks)
    dt = clock.marks[last] - clock.marks[setup.warmup]
    dt_cpu = clock.cpu[last] - clock.cpu[setup.warmup]
    return {
        "path": path,
        "scenario": setup.scenario,
        "steps_timed": last - setup.warmup,
        "real_tokens": tokens,
        "computed_tokens": padded,
        "seconds": round(dt, 4),
        "tokens_per_s": round(tokens / dt, 1),
        "tokens_per_cpu_s": round(tokens / dt_cpu, 1),
        "model_tflops": round(flops / dt / 1e12, 6),
        "peak_mem_gib": round(peak, 4),
        "peak_mem_kind": peak_kind,
        "time_to_first_step_s": round(clock.marks[1] - t0, 3),
        "losses": trainer.losses,
        "attn_implementation": attn,
        "gradient_checkpointing": run.gradient_checkpointing,
        "quantization": setup.quant,
        "trainable_params": n_lora,
    }


@contextmanager
def peak_memory():
    """The block's peak memory, filled in on exit: ``peak_gib`` and ``kind`` (CUDA max allocated, or the process's
    peak RSS on CPU, with ``rise_gib`` over its level at the start, leftovers of an earlier run collected first)."""
    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {}
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        yield out
        out.update(peak_gib=torch.cuda.max_memory_allocated() / 2**30, kind="cuda_max_allocated")
        return
    with PeakRSS(free_first=True) as mem:
        yield out
    out.update(peak_gib=mem.peak / 2**30, kind="peak_rss", rise_gib=(mem.peak - mem.start) / 2**30)


def run_one(
    setup: Setup, path: str, model_dir: Path, ds, switches: fast.Plan | None, attn: str, out_dir: Path
) -> dict[str, Any]:
    """Train setup.steps steps; switches None is the plain baseline."""
    cuda = torch.cuda.is_available()
    with peak_memory() as mem:
        t0 = time.perf_counter()
        run = _train(setup, model_dir, ds, switches, attn, out_dir, cuda)
    row = _row(setup, path, run, attn, t0, mem["peak_gib"], mem["kind"])
    if "rise_gib" in mem:
        row["rss_rise_gib"] = round(mem["rise_gib"], 4)
    if switches is not None:
        row["switches"] = switches.report()
    del run
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------------- gate
def gate(baseline: list[float], ours: list[float], rtol: float = GATE_RTOL) -> dict[str, Any]:
    """Our loss within ``rtol`` relative of the baseline's on each of the same first batches, else INVALID."""
    n = min(len(baseline), len(ours))
    if n == 0 or len(baseline) != len(ours):
        return {
            "verdict": "INVALID",
            "why": f"loss counts differ or are empty ({len(baseline)} vs {len(ours)})",
            "rtol": rtol,
            "max_rel_diff": None,
            "batches": n,
        }
    diffs = [abs(o - b) / max(abs(b), 1e-12) for b, o in zip(baseline, ours)]
    finite = all(math.isfinite(x) for x in baseline + ours)
    worst = max(diffs) if finite else float("inf")
    ok = finite and worst <= rtol
    return {
        "verdict": "PASS" if ok else "INVALID",
        "rtol": rtol,
        "max_rel_diff": worst if finite else None,
        "batches": n,
        "why": ""
        if ok
        else ("non-finite loss" if not finite else f"loss differs by {worst:.2e} relative (> {rtol:g})"),
    }


# ---------------------------------------------------------------------------------------------------- driver
def _option(default: Any, help: str | None, **cli: Any) -> Any:
    """A bench option's default and help, declared once; cli: extra argparse settings (choices, a parsing type)."""
    return field(default=default, metadata={"help": help, **cli})


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(s for s in text.split(",") if s)


@dataclass(frozen=True)
class BenchOptions:
    """The options of adapters bench. The CLI builds one flag per field (ragged_batch -> --ragged-batch) with this
    default and help; None means the device's default (see defaults())."""

    model: str | None = _option(
        None,
        "architecture shape: tiny-llama (CPU default), llama-3.2-1b (GPU default), llama-3.1-8b, qwen2.5-1.5b, "
        "tiny-qwen2",
    )
    scenarios: tuple[str, ...] = _option(("fixed", "ragged"), "comma list of fixed, ragged", type=_comma_list)
    steps: int | None = _option(None, "optimizer steps per run (CPU 5, GPU 25)")
    warmup: int | None = _option(None, "untimed first steps (CPU 1, GPU 5)")
    batch: int | None = _option(None, "per-device batch, fixed scenario (4)")
    ragged_batch: int | None = _option(None, "per-device batch, ragged scenario (8)")
    grad_accum: int = _option(1, None)
    max_len: int | None = _option(None, "fixed length and ragged cap (CPU 256, GPU 2048)")
    median: int | None = _option(None, "ragged median length (CPU 80, GPU 600)")
    quant: str | None = _option(None, "base quantization of both runs (GPU nf4, CPU none)", choices=["nf4", "none"])
    gate_batches: int = _option(2, "first micro-batches whose losses must agree")
    out: str | Path = _option("outputs/bench", "where bench.json and bench.md go")
    threads: int = _option(1, "torch CPU threads during a CPU bench (1: steadiest on a shared machine)")
    recipe: str | None = _option(
        None,
        "instead of a shape: this recipe's model, data, LoRA, batch and steps, plain TRL vs our path (guard off, as "
        "the recipe says; adapters/bench/recipe.py); --steps, --warmup, --gate-batches and --out apply, other "
        "--key value pairs override the recipe",
    )

    def resolved(self, cuda: bool) -> BenchOptions:
        """These options with every unset one (None or 0; warmup: None only) taken from defaults(cuda)."""
        d = defaults(cuda)
        filled = {k: getattr(self, k) or v for k, v in d.items() if k != "warmup"}
        return replace(self, **filled, warmup=d["warmup"] if self.warmup is None else self.warmup)


def defaults(cuda: bool) -> dict[str, Any]:
    """GPU: the anchor setup (seq 2048; ragged median 600, batch 8). CPU: the same shape of problem, scaled down."""
    if cuda:
        return dict(
            model="llama-3.2-1b", steps=25, warmup=5, batch=4, ragged_batch=8, max_len=2048, median=600, quant="nf4"
        )
    return dict(model="tiny-llama", steps=5, warmup=1, batch=4, ragged_batch=8, max_len=256, median=80, quant="none")


def plan_ours(setup: Setup, overrides: dict[str, Any], cuda: bool, lengths: list[int]) -> tuple[fast.Plan, str]:
    """The switches of our path, plus the attention it runs with."""
    cfg = model_config(setup.model)
    bytes_per_el = 2 if cuda else 4
    act = fast.activation_estimate_gib(cfg, setup.batch * setup.max_len, bytes_per_el)
    settings = {
        k: overrides.get(k, fast.AUTO) for k in (*fast.SWITCHES, *fast.EXTRA_SWITCHES, "gradient_checkpointing")
    }
    attn = overrides.get("attn_implementation") or "sdpa"
    p = fast.plan(
        settings,
        attn_implementation=attn,
        per_device_batch=setup.batch,
        cuda=cuda,
        activation_gib=act,
        budget_gib=fast.memory_budget_gib(),
        padding=fast.padding_share(lengths, setup.batch),
    )
    if "attn_implementation" not in overrides and cuda and p.padding_free and not p.use_liger_kernel:
        # the measured GPU baseline in docs/bench.md: without Liger, padding-free with flex_attention was the fastest
        # ragged option on the H200
        attn = "flex_attention"
        p.set("attn_implementation", attn, "padding-free without Liger: flex_attention measured fastest", "auto")
    else:
        p.set(
            "attn_implementation",
            attn,
            "set by the command line" if "attn_implementation" in overrides else "SDPA (with Liger, or off CUDA)",
            "recipe" if "attn_implementation" in overrides else "auto",
        )
    return p, attn


@contextmanager
def _torch_threads(n: int | None):
    """Run with ``n`` torch CPU threads (None: leave as is), restoring the previous count after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _checked(options: BenchOptions, overrides: dict[str, Any] | None, cuda: bool) -> tuple[BenchOptions, Any, dict]:
    """The options with the device defaults filled in, the model's config and the switch overrides; else BenchError."""
    opts = options.resolved(cuda)
    cfg = model_config(opts.model)
    if opts.steps <= opts.warmup:
        raise BenchError(f"--steps ({opts.steps}) must exceed --warmup ({opts.warmup})")
    if opts.quant not in ("nf4", "none"):
        raise BenchError(f"--quant: expected nf4 or none, got {opts.quant!r}")
    overrides = dict(overrides or {})
    known = (*fast.SWITCHES, *fast.EXTRA_SWITCHES, "gradient_checkpointing", "attn_implementation")
    unknown = set(overrides) - set(known)
    if unknown:
        raise BenchError(f"unknown switch {sorted(unknown)[0]!r}; known: {', '.join(known)}")
    return opts, cfg, overrides


def _save_random_model(cfg, cuda: bool, tmp: Path) -> Path:
    """The random-initialised model both runs load, so neither pays for the other's initialisation."""
    from transformers import AutoModelForCausalLM

    model_dir = tmp / "model"
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if cuda else torch.float32)
    m.save_pretrained(model_dir)
    del m
    return model_dir


def _compare(
    opts: BenchOptions, scenario: str, ctx: dict[str, Any], overrides: dict[str, Any], log
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Baseline then ours on one scenario's data: their two rows and the comparison (speedups, memory, gate)."""
    cfg, cuda, peak, tmp = ctx["cfg"], ctx["cuda"], ctx["peak"], ctx["tmp"]
    bs = opts.ragged_batch if scenario == "ragged" else opts.batch
    setup = Setup(
        model=opts.model,
        scenario=scenario,
        steps=opts.steps,
        warmup=opts.warmup,
        batch=bs,
        grad_accum=opts.grad_accum,
        max_len=opts.max_len,
        median=opts.median,
        quant=opts.quant,
        gate_batches=opts.gate_batches,
    )
    n = bs * opts.grad_accum * opts.steps
    lengths = make_lengths(n, scenario, setup.max_len, setup.median)
    ds = make_dataset(lengths, cfg.vocab_size)
    switches, attn = plan_ours(setup, overrides, cuda, lengths)
    log(f"[bench] {scenario}: {n} samples, mean length {sum(lengths) / n:.0f}, batch {bs}x{opts.grad_accum}")
    base = run_one(setup, "baseline", ctx["model_dir"], ds, None, "sdpa", tmp)
    log(f"[bench]   baseline {base['tokens_per_s']:,.0f} tok/s")
    ours = run_one(setup, "ours", ctx["model_dir"], ds, switches, attn, tmp)
    log(f"[bench]   ours     {ours['tokens_per_s']:,.0f} tok/s")
    for r in (base, ours):
        r["mfu_vs_989"] = r["model_tflops"] / PEAK_TFLOPS
        r["mfu_vs_measured"] = r["model_tflops"] / peak
        r["batch"], r["grad_accum"], r["mean_length"] = bs, opts.grad_accum, sum(lengths) / n
    comparison = {
        "scenario": scenario,
        "speedup": ours["tokens_per_s"] / base["tokens_per_s"],
        "speedup_cpu_time": ours["tokens_per_cpu_s"] / base["tokens_per_cpu_s"],
        "memory_ratio": ours["peak_mem_gib"] / base["peak_mem_gib"],
        "gate": gate(base["losses"], ours["losses"]),
    }
    return [base, ours], comparison


def bench(options: BenchOptions | None = None, overrides: dict[str, Any] | None = None, log=print) -> dict[str, Any]:
    """Run baseline then ours for each scenario; write bench.json and bench.md under options.out; return the JSON.

    overrides force switches of adapters.training.speed (adapters bench --padding_free false)."""
    cuda = torch.cuda.is_available()
    opts, cfg, overrides = _checked(options or BenchOptions(), overrides, cuda)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    # one thread on CPU: on a shared CPU, more threads than free cores make every timing noise
    with _torch_threads(None if cuda else opts.threads):
        from adapters.utils.provenance import hardware, versions

        peak = matmul_peak_tflops(cuda)
        log(
            f"[bench] {opts.model} on {torch.cuda.get_device_name(0) if cuda else 'CPU'}; measured matmul peak "
            f"{peak:.3f} TFLOP/s ({'bf16' if cuda else 'fp32'})"
        )
        result: dict[str, Any] = {
            "model": opts.model,
            "config": cfg.to_diff_dict(),
            "device": "cuda" if cuda else "cpu",
            "matmul_peak_tflops": peak,
            "reference_peak_tflops": PEAK_TFLOPS,
            "versions": versions(),
            "hardware": hardware(),
            "torch_threads": torch.get_num_threads(),
            "rows": [],
            "comparisons": [],
        }
        with tempfile.TemporaryDirectory(prefix="adapters-bench-") as tmp:
            ctx = dict(cfg=cfg, cuda=cuda, peak=peak, tmp=Path(tmp), model_dir=_save_random_model(cfg, cuda, Path(tmp)))
            for scenario in opts.scenarios:
                rows, comparison = _compare(opts, scenario, ctx, overrides, log)
                result["rows"] += rows
                result["comparisons"].append(comparison)
        return write_result(out, result, table(result), log)


def write_result(out: Path, result: dict[str, Any], text: str, log=print) -> dict[str, Any]:
    """result["table"] = text; bench.json and bench.md under ``out``; the table printed. Returns ``result``."""
    from adapters.utils.atomic import write_json

    result["table"] = text
    write_json(out / "bench.json", result)
    (out / "bench.md").write_text(text + "\n", encoding="utf-8")
    log(text)
    log(f"[bench] wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return result


def passed(result: dict[str, Any]) -> bool:
    """Every comparison's loss gate passed: the speed figures compare the same computation."""
    return all(c["gate"]["verdict"] == "PASS" for c in result["comparisons"])


def table(result: dict[str, Any]) -> str:
    mem = "peak alloc GiB" if result["device"] == "cuda" else "peak RSS GiB"
    lines = [
        f"Model shape {result['model']} on {result['device']}; matmul peak "
        f"{result['matmul_peak_tflops']:.3f} TFLOP/s measured.",
        "",
        f"| scenario | path | real tokens/s | speedup | tokens/CPU-s | speedup (CPU time) | {mem} | MFU vs 989 "
        f"| MFU vs measured | first step s | loss (first batches) | gate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    comps = {c["scenario"]: c for c in result["comparisons"]}
    for r in result["rows"]:
        c = comps[r["scenario"]]
        ours = r["path"] == "ours"
        speed = f"{c['speedup']:.2f}x" if ours else "1.00x"
        speed_cpu = f"{c['speedup_cpu_time']:.2f}x" if ours else "1.00x"
        verdict = (
            (
                c["gate"]["verdict"]
                + (f" ({c['gate']['max_rel_diff']:.1e})" if c["gate"]["max_rel_diff"] is not None else "")
            )
            if ours
            else ""
        )
        losses = ", ".join(f"{x:.5f}" for x in r["losses"])
        lines.append(
            f"| {r['scenario']} | {r['path']} | {r['tokens_per_s']:,.0f} | {speed} | {r['tokens_per_cpu_s']:,.0f} "
            f"| {speed_cpu} | {r['peak_mem_gib']:.3f} "
            f"| {r['mfu_vs_989']:.2e} | {r['mfu_vs_measured']:.1%} | {r['time_to_first_step_s']:.2f} "
            f"| {losses} | {verdict} |"
        )
    lines.append("")
    for r in result["rows"]:
        if r["path"] == "ours":
            on = [f"{k}={v['value']}" for k, v in r["switches"].items()]
            lines.append(f"Our path ({r['scenario']}): " + ", ".join(on) + ".")
    return "\n".join(lines)
