"""Verified merge: the run's adapter folded into a full-precision reload of its base, checked against the adapter.

``adapters merge outputs/<run>`` does, in this order, holding at most one model in memory at a time:

1. reload the base in full precision (the recipe's dtype, or ``--dtype``); a base stored quantized is refused,
   because folding a LoRA delta into 4/8-bit weights rounds most of it away (peft#2321, peft#2586);
2. put the adapter on it and record probe logits and greedy answers: reference (b), the adapter on the
   full-precision base;
3. ``merge_and_unload(safe_merge=True)`` in place (NaNs are caught by PEFT), compare with (b);
4. save to ``merged/`` through a staging folder (small safetensors shards, config, generation config, tokenizer,
   chat template), reload it with plain ``AutoModelForCausalLM.from_pretrained`` and compare again; score the
   reloaded model on the held-out split;
5. when the recipe trained on a quantized base, reload that form with the adapter (reference (a)) and compare;
6. write ``merge_report.json``; promote the staging folder to ``merged/`` only if the merged model agrees with (b)
   within ``--max-kl`` (or ``--force``).

Probe logits are taken at the positions that produce the reference answer (teacher forcing), so the comparison
covers the tokens the task is about, and the stored logits stay small even for a 262k vocabulary.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters.data.encode import encode_messages, prompts_and_answers
from adapters.data.preference import task_rows
from adapters.data.rows import IGNORE_INDEX
from adapters.evaluation.generation import answer_budget, exact_match, generate_answers
from adapters.model.loading import load_model
from adapters.model.quantization import model_memory_mb
from adapters.publish.rundir import Run, RunError, check_base, load_run_tokenizer, output_bytes
from adapters.utils.atomic import check_room, clear, discard, promote, staging_path, write_json
from adapters.utils.dtypes import torch_dtype
from adapters.utils.errors import AdaptersError, PathExistsError
from adapters.utils.memory import PeakRSS, free

DEFAULT_MAX_KL = 0.01
"""Mean KL (nats per answer token) allowed between merged model and adapter model. An fp32 merge agrees to ~1e-9;
a bf16 merge rounds W + BA once and typically stays below 1e-3; a broken merge (e.g. tied embeddings corrupted)
is far above 0.01."""
DEFAULT_SHARD = "200MB"
"""Safetensors shard size of merged/: each shard is serialized through one buffer, so small shards keep the
saving step's extra memory small."""
METHODS = ("linear", "cat", "ties", "dare_ties", "dare_linear", "magnitude_prune")


class MergeError(AdaptersError, RuntimeError):
    """The merge cannot be done correctly; the message says why and names the file."""


# ---------------------------------------------------------------------------------------------------- refusals
def stored_quantization(model_path: str | Path) -> str | None:
    """The quantization method a checkpoint is stored with (its config.json), or None for full precision."""
    cfg = Path(model_path) / "config.json"
    if not cfg.is_file():
        return None
    qc = json.loads(cfg.read_text()).get("quantization_config")
    if not qc:
        return None
    bits = "4-bit" if qc.get("load_in_4bit") else "8-bit" if qc.get("load_in_8bit") else f"{qc.get('bits', '?')}-bit"
    return f"{qc.get('quant_method', 'unknown')} {bits}"


def ensure_full_precision(model, where: str) -> None:
    """Refuse to merge into quantized weights: the LoRA update is smaller than a 4-bit step and rounds away."""
    quantized = (
        getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or getattr(model, "hf_quantizer", None) is not None
        or any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())
    )
    if quantized:
        raise MergeError(
            f"{where}: the base is loaded quantized; merging a LoRA adapter into 4/8-bit weights "
            "rounds most of the update away (peft#2321). Reload the base in full precision "
            "(bfloat16 or float32) and merge into that; `adapters merge` does this for you"
        )


def _untie_adapted_embeddings(peft_model) -> bool:
    """If input and output embeddings are tied and the adapter touches either, give lm_head its own weight.

    PEFT merges the delta into the one shared matrix, which would change the other side too, and a saved model
    with tie_word_embeddings=True would drop the merged lm_head on reload. Untying keeps both exact; the saved
    model is larger by one vocab x hidden matrix (recorded in the report).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    base = peft_model.get_base_model()
    cfgs = [base.config] + ([base.config.text_config] if hasattr(base.config, "text_config") else [])
    if not any(getattr(c, "tie_word_embeddings", False) for c in cfgs):
        return False
    out, inp = base.get_output_embeddings(), base.get_input_embeddings()
    if out is None or not any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in (out, inp)):
        return False

    def raw(m):
        return getattr(m, "base_layer", None) or getattr(m, "original_module", None) or m

    o, i = raw(out), raw(inp)
    if o.weight is i.weight or o.weight.data_ptr() == i.weight.data_ptr():
        o.weight = torch.nn.Parameter(i.weight.detach().clone(), requires_grad=False)
    for c in cfgs:
        if hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = False
    return True


# ---------------------------------------------------------------------------------------------------- probes
def probe_set(run: Run, tok, n: int) -> tuple[list[tuple[list[int], list[int]]], list, list[str], str]:
    """The first ``n`` rows of the run's eval split (else its test split): token ids + answer labels, prompts."""
    src = run.recipe.eval_file or run.recipe.test_file
    if not src:
        raise MergeError(
            f"{run.path / 'manifest.json'}: the recipe has neither eval_file nor test_file, so there "
            "are no probe prompts to verify the merge with"
        )
    if not Path(src).is_file():
        raise MergeError(
            f"{run.path / 'manifest.json'}: probe file {src} (recipe eval_file/test_file) not found; "
            "run from the directory the run was trained in"
        )
    rows = task_rows(src, run.recipe)[:n]  # a preference run's pairs: prompt + chosen
    enc = [encode_messages(tok, r.messages, r.where) for r in rows]
    convs, refs = prompts_and_answers(rows)
    return enc, convs, refs, src


@torch.no_grad()
def probe_logits(model, probes) -> torch.Tensor:
    """Logits (fp32, CPU) at every position that predicts an answer token, all probes concatenated."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for ids, labels in probes:
        pos = [i - 1 for i, lab in enumerate(labels) if lab != IGNORE_INDEX and i > 0]
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0]
        out.append(logits[pos].float().cpu())
    return torch.cat(out)


def compare(ref: torch.Tensor, got: torch.Tensor, ref_answers=None, got_answers=None) -> dict[str, Any]:
    """Max/mean |logit difference|, mean and max KL(ref || got) per position, top-1 agreement, greedy answers."""
    diff = (ref - got).abs()
    lr, lg = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (lr.exp() * (lr - lg)).sum(-1).clamp_min(0)
    res = {
        "positions": int(ref.shape[0]),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
    }
    if ref_answers is not None and got_answers is not None:
        same = [a == b for a, b in zip(ref_answers, got_answers)]
        res["greedy_match"] = sum(same) / len(same) if same else 1.0
        res["greedy_all_match"] = all(same)
    return res


def _budget(run: Run, tok, refs: list[str]) -> int:
    ev = run.path / "eval.json"
    if ev.is_file():
        got = json.loads(ev.read_text()).get("max_new_tokens")
        if got:
            return int(got)
    return run.recipe.eval_max_new_tokens or answer_budget(tok, refs)


# ---------------------------------------------------------------------------------------------------- save
def save_merged(model, tok, out: Path, max_shard_size: str = DEFAULT_SHARD) -> None:
    """The merged model (small shards), tokenizer and chat template into ``out``, which is replaced if there."""
    clear(out)
    model.save_pretrained(str(out), max_shard_size=max_shard_size, safe_serialization=True)
    tok.save_pretrained(str(out))
    if tok.chat_template and not any(out.glob("chat_template.*")):
        (out / "chat_template.jinja").write_text(tok.chat_template)


def merge_into(peft_model) -> tuple[Any, bool]:
    """``merge_and_unload(safe_merge=True)`` on a full-precision base; returns (plain model, untied?)."""
    ensure_full_precision(peft_model.get_base_model(), "merge")
    untied = _untie_adapted_embeddings(peft_model)
    try:
        merged = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as e:  # PEFT's safe_merge raises ValueError on NaN/inf in the merged weights
        raise MergeError(f"merge_and_unload(safe_merge=True) failed: {e}") from None
    return merged, untied


# ---------------------------------------------------------------------------------------------------- merge
def _dtype_recipe(run: Run, dtype: str | None):
    import dataclasses

    want = dtype or (run.recipe.dtype if run.recipe.dtype not in ("auto", "float16") else "float32")
    if want not in ("float32", "bfloat16"):
        raise MergeError(f"--dtype {want!r}: merge into float32 or bfloat16")
    return dataclasses.replace(run.recipe, dtype=want), want


@dataclass
class _Probe:
    """What every phase of a merge is checked on: the probe prompts and the generation settings."""

    run: Run
    tok: Any
    probes: list
    convs: list
    refs: list[str]
    budget: int
    batch: int
    ref_b: Any = None  # probe logits of the adapter on the full-precision base, set by _merge_and_save
    heldout_fp: list[str] | None = None  # its held-out answers, for the like-for-like exact match

    def answers(self, model, desc: str) -> list[str]:
        return generate_answers(model, self.tok, self.convs, self.budget, self.batch, desc)


class _Phases:
    """Seconds per phase, and the running peaks (RSS, anonymous) at the end of each: which phase set them."""

    def __init__(self, mem: PeakRSS):
        self.mem, self.seconds, self.peaks, self.t = mem, {}, {}, time.time()

    def tick(self, name: str) -> None:
        self.seconds[name] = round(time.time() - self.t, 2)
        self.peaks[name] = [round(self.mem.peak_mb, 1), round(self.mem.peak_anon_mb, 1)]
        self.t = time.time()


def merge_run(
    run_dir: str | Path,
    max_kl: float = DEFAULT_MAX_KL,
    force: bool = False,
    dtype: str | None = None,
    n_probes: int = 8,
    max_shard_size: str = DEFAULT_SHARD,
    log=print,
) -> dict[str, Any]:
    """Merge, save and verify; returns the report (also written to ``RUN_DIR/merge_report.json``)."""
    from adapters.publish.hub import resolve_adapter

    t0 = time.time()
    run = resolve_adapter(run_dir)  # a run directory, an adapter folder or a hub id
    _refuse_stored_quantized(run)
    recipe, dtype = _dtype_recipe(run, dtype)
    final = run.path / "merged"
    if final.exists() and any(final.iterdir()) and not force:
        raise PathExistsError(
            f"{final}: holds an earlier merge (see {run.path / 'merge_report.json'}); it is kept. Pass --force to "
            "merge again and replace it"
        )
    check_room(final, output_bytes(run, dtype), hint="free some space, or copy the run elsewhere and merge there")
    tok = load_run_tokenizer(run)
    probes, convs, refs, probe_file = probe_set(run, tok, n_probes)
    pr = _Probe(run, tok, probes, convs, refs, _budget(run, tok, refs), run.recipe.eval_generation_batch_size)
    staging = staging_path(run.path / "merged")  # promoted to merged/ only when the check passes
    report: dict[str, Any] = {
        "run": str(run.path),
        "base": run.ref.canonical_name,
        "base_path": run.ref.path,
        "dtype": dtype,
        "probe_file": probe_file,
        "probes": len(probes),
        "max_kl": max_kl,
        "max_shard_size": max_shard_size,
    }
    try:  # Ctrl-C, SIGTERM or a failure: the staging folder goes, merged/ and merge_report.json stay as they were
        with PeakRSS() as mem:
            ph = _Phases(mem)
            got, ans_b, ans_m, untied, model_mb = _merge_and_save(pr, recipe, staging, max_shard_size, report, ph)
            _reload_and_score(pr, staging, dtype, got, report, ph)
            _against_as_trained(pr, got, ans_m, report, ph)
        report["untied_embeddings"] = untied
        report["memory"] = {**mem.summary(model_mb), "peak_after_phase_mb": ph.peaks}
        report["seconds"] = {**ph.seconds, "total": round(time.time() - t0, 2)}
        report["probe_samples"] = [
            {"expected": r, "adapter": a, "merged": m} for r, a, m in list(zip(refs, ans_b, ans_m))[:3]
        ]
        return _verdict(run, report, staging, max_kl, force, log)
    except BaseException:
        discard(staging)
        raise


def _refuse_stored_quantized(run: Run) -> None:
    q = stored_quantization(run.ref.path)
    if q:
        raise MergeError(
            f"{run.ref.path}/config.json: the base is stored quantized ({q}); merging into quantized "
            "weights rounds most of the LoRA update away (peft#2321, peft#2586). Train on, or point "
            "the run at, the full-precision checkpoint of this model and merge into that"
        )


def _merge_and_save(pr: _Probe, recipe, staging: Path, max_shard_size: str, report: dict[str, Any], ph: _Phases):
    """Reference (b): the adapter on a full-precision reload of the base; then merge in place, compare, save."""
    from peft import PeftModel

    run = pr.run
    base = load_model(run.ref, recipe, quantize=False)
    ensure_full_precision(base, str(run.ref.path))
    check_base(run, base)
    model = PeftModel.from_pretrained(base, str(run.adapter_dir), is_trainable=False).eval()
    ph.tick("load")
    ref_b = probe_logits(model, pr.probes)
    ans_b = pr.answers(model, "adapter (full precision)")
    pr.heldout_fp = _heldout_predictions(run, model, pr.tok, pr.budget, pr.batch, "adapter, full precision (held-out)")
    ph.tick("reference_full_precision")
    merged, untied = merge_into(model)
    del model, base
    model_mb = model_memory_mb(merged)
    ph.tick("merge")
    got = probe_logits(merged, pr.probes)
    ans_m = pr.answers(merged, "merged")
    report["vs_adapter_full_precision"] = compare(ref_b, got, ans_b, ans_m)
    pr.ref_b = ref_b
    save_merged(merged, pr.tok, staging, max_shard_size)
    free(merged)
    ph.tick("save")
    return got, ans_b, ans_m, untied, model_mb


def _reload_and_score(pr: _Probe, staging: Path, dtype: str, got, report: dict[str, Any], ph: _Phases) -> None:
    """What users will load: the saved folder, through plain transformers; scored on the held-out split too."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(
        str(staging), dtype=torch_dtype(dtype), device_map={"": "cuda:0" if torch.cuda.is_available() else "cpu"}
    )
    got_r = probe_logits(reloaded, pr.probes)
    report["reloaded_vs_merged"] = compare(got, got_r)
    report["reloaded_vs_adapter_full_precision"] = compare(pr.ref_b, got_r)
    report["heldout"] = _heldout(pr.run, reloaded, pr.tok, pr.budget, pr.batch, pr.heldout_fp)
    free(reloaded)
    ph.tick("reload_and_score")


def _against_as_trained(pr: _Probe, got, ans_m: list[str], report: dict[str, Any], ph: _Phases) -> None:
    """Reference (a): the adapter on the base as it was trained (quantized when the recipe was)."""
    from peft import PeftModel

    run = pr.run
    if not run.recipe.quantized:
        report["vs_adapter_as_trained"] = {
            "form": "same as full precision (the recipe did not quantize)",
            **report["vs_adapter_full_precision"],
        }
        return
    base_q = load_model(run.ref, run.recipe, quantize=True)
    model_q = PeftModel.from_pretrained(base_q, str(run.adapter_dir), is_trainable=False).eval()
    ref_a = probe_logits(model_q, pr.probes)
    ans_a = pr.answers(model_q, "adapter (as trained, quantized)")
    free(model_q, base_q)
    report["vs_adapter_as_trained"] = {"form": _qform(run), **compare(ref_a, got, ans_a, ans_m)}
    ph.tick("reference_as_trained")


def _verdict(run: Run, report: dict[str, Any], staging: Path, max_kl: float, force: bool, log) -> dict[str, Any]:
    """Promote staging to merged/ only when the merged model agrees with the adapter (or --force)."""
    kl_b = report["vs_adapter_full_precision"]["mean_kl"]
    kl_r = report["reloaded_vs_merged"]["mean_kl"]
    ok = kl_b <= max_kl and kl_r <= max_kl
    report["verdict"] = "pass" if ok else ("forced" if force else "fail")
    if ok or force:
        final = run.path / "merged"
        promote(staging, final)
        report["merged_dir"] = str(final)
    else:
        discard(staging)
        report["merged_dir"] = None
    write_json(run.path / "merge_report.json", report)
    print_report(report, log)
    if not ok and not force:
        log(
            f"[merge] FAILED: mean KL {max(kl_b, kl_r):.3g} > --max-kl {max_kl:g}; merged/ was not written "
            "(use --force to write it anyway)"
        )
    return report


def _qform(run: Run) -> str:
    r = run.recipe
    return "int8" if r.load_in_8bit else f"4bit-{r.bnb_4bit_quant_type}"


def _heldout_predictions(run: Run, model, tok, budget: int, bs: int, desc: str) -> list[str] | None:
    if not run.recipe.test_file or not Path(run.recipe.test_file).is_file():
        return None
    convs, _ = prompts_and_answers(task_rows(run.recipe.test_file, run.recipe))
    return generate_answers(model, tok, convs, budget, bs, desc)


def _heldout(run: Run, model, tok, budget: int, bs: int, adapter_fp_preds: list[str] | None = None) -> dict[str, Any]:
    """Exact match of the merged model on the test split, next to the adapter's: on the full-precision base (the
    like-for-like comparison, same rows) and as trained (from eval.json, quantized base when the recipe was)."""
    res: dict[str, Any] = {"file": run.recipe.test_file}
    ev = run.path / "eval.json"
    if ev.is_file():
        ev = json.loads(ev.read_text())
        tuned = ev.get("tuned") or (ev.get("preference") or {}).get("tuned") or {}
        res["adapter_exact_match"] = tuned.get("exact_match", tuned.get("chosen_exact_match"))
    if not run.recipe.test_file or not Path(run.recipe.test_file).is_file():
        res["merged_exact_match"] = None
        res["note"] = "test split not found; not scored"
        return res
    convs, refs = prompts_and_answers(task_rows(run.recipe.test_file, run.recipe))
    preds = generate_answers(model, tok, convs, budget, bs, "merged (held-out)")
    res["merged_exact_match"] = round(exact_match(preds, refs), 4)
    if adapter_fp_preds is not None:
        res["adapter_full_precision_exact_match"] = round(exact_match(adapter_fp_preds, refs), 4)
        res["answers_identical_to_adapter_full_precision"] = sum(a == b for a, b in zip(preds, adapter_fp_preds))
    res["n"] = len(refs)
    return res


def print_report(r: dict[str, Any], log=print) -> None:
    log("")
    log(f"  merge check ({r['probes']} probe prompts from {r['probe_file']}, {r['dtype']})")
    head = f"  {'merged vs':34s}{'max|dlogit|':>12s}{'mean|dlogit|':>13s}{'mean KL':>11s}{'top-1':>7s}{'greedy':>8s}"
    log(head)
    rows = [
        ("adapter, full-precision base", r.get("vs_adapter_full_precision")),
        ("adapter, base as trained", r.get("vs_adapter_as_trained")),
        ("merged/ reloaded (plain HF)", r.get("reloaded_vs_merged")),
    ]
    for name, c in rows:
        if not c:
            continue
        g = f"{c['greedy_match']:.0%}" if "greedy_match" in c else "-"
        log(
            f"  {name:34s}{c['max_abs_logit_diff']:12.2e}{c['mean_abs_logit_diff']:13.2e}{c['mean_kl']:11.2e}"
            f"{c['top1_agreement']:7.0%}{g:>8s}"
        )
    h = r.get("heldout") or {}
    if h.get("merged_exact_match") is not None:
        a = h.get("adapter_exact_match")
        fp = h.get("adapter_full_precision_exact_match")
        log(
            f"  held-out exact match ({h.get('n')} rows): merged {h['merged_exact_match']:.3f}"
            + (
                f", adapter on full-precision base {fp:.3f} ({h['answers_identical_to_adapter_full_precision']}/"
                f"{h.get('n')} answers identical)"
                if fp is not None
                else ""
            )
            + ", adapter as trained "
            + (f"{a:.3f}" if a is not None else "n/a (no eval.json)")
        )
    m = r.get("memory") or {}
    if m:
        log(
            f"  memory: model {m['model_mb']:.0f} MB; peak rise {m['peak_anon_rise_mb']:.0f} MB anonymous "
            f"({m['peak_anon_rise_over_model']:.2f}x), {m['peak_rise_mb']:.0f} MB RSS incl. mapped checkpoint pages "
            f"({m['peak_rise_over_model']:.2f}x); peak RSS {m['peak_rss_mb']:.0f} MB; {r['seconds']['total']:.1f} s"
        )
    log(f"  verdict: {r['verdict']}" + (f" -> {r['merged_dir']}" if r.get("merged_dir") else ""))


__all__ = [
    "MergeError",
    "RunError",
    "merge_run",
    "merge_into",
    "ensure_full_precision",
    "compare",
    "probe_logits",
    "METHODS",
]
