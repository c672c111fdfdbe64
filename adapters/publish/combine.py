"""Combining the adapters of several runs into one, through PEFT's ``add_weighted_adapter``.

``adapters merge --adapters outputs/a outputs/b --method ties --weights 1 1 --density 0.5 --out outputs/a+b``
writes ``outputs/a+b/`` laid out like a run (``adapter/``, ``manifest.json``, ``eval.json``), so ``adapters merge``,
``adapters export`` and the other run verbs work on it, plus ``combine_report.json``: how far the combination is
from each source adapter on the probe prompts, and its held-out exact match next to each source's.
Adapters trained on different bases (base fingerprint or architecture) or with different chat templates are an error.
"""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from adapters.data.encode import prompts_and_answers
from adapters.data.validate import read_rows
from adapters.evaluation.generation import exact_match, generate_answers
from adapters.model.loading import load_model
from adapters.publish.merge import (
    METHODS,
    MergeError,
    _budget,
    compare,
    merge_run,
    probe_logits,
    probe_set,
)
from adapters.publish.rundir import check_base, load_run_tokenizer, open_run
from adapters.training.checkpoints import validate_adapter_dir
from adapters.utils.atomic import fresh_staging, promote, write_json
from adapters.utils.memory import free

DENSITY_METHODS = ("ties", "dare_ties", "dare_linear", "magnitude_prune")


def check_same_base(runs) -> None:
    first = runs[0]
    for r in runs[1:]:
        for key in ("base_fingerprint", "base_config", "chat_template_sha256"):
            a, b = first.manifest.get(key), r.manifest.get(key)
            if a != b:
                what = "chat template" if key == "chat_template_sha256" else "base model"
                raise MergeError(
                    f"{r.path / 'manifest.json'}: {key} {b!r} differs from {first.path / 'manifest.json'}"
                    f" ({a!r}); adapters trained on a different {what} cannot be combined"
                )


def default_weights(method: str, n: int) -> list[float]:
    return [1.0 / n] * n if method in ("linear", "cat") else [1.0] * n


def combine_runs(
    run_dirs: list[str],
    method: str = "linear",
    weights: list[float] | None = None,
    density: float | None = None,
    out: str | Path = "",
    merged: bool = False,
    force: bool = False,
    max_kl: float | None = None,
    dtype: str | None = None,
    n_probes: int = 8,
    log=print,
) -> dict[str, Any]:
    t0 = time.time()
    weights, density = _check_args(run_dirs, method, weights, density)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise MergeError(f"{out}: already exists; choose another --out or pass --force")
    runs = [open_run(d) for d in run_dirs]
    check_same_base(runs)
    lead = runs[0]
    tok = load_run_tokenizer(lead)
    recipe = dataclasses.replace(
        lead.recipe, dtype=dtype or ("float32" if lead.recipe.dtype in ("auto", "float16") else lead.recipe.dtype)
    )
    probes, convs, refs, probe_file = probe_set(lead, tok, n_probes)
    budget = _budget(lead, tok, refs)
    base = load_model(lead.ref, recipe, quantize=False)
    for r in runs:
        check_base(r, base)
    model, base_logits, src_logits, got = _combine(base, runs, probes, method, weights, density)
    report: dict[str, Any] = {
        "method": method,
        "weights": weights,
        "density": density,
        "dtype": recipe.dtype,
        "sources": [str(r.path) for r in runs],
        "probe_file": probe_file,
        "probes": len(probes),
        "vs_base": compare(base_logits, got),
        "vs_sources": {str(r.path): compare(s, got) for r, s in zip(runs, src_logits)},
        "heldout": _score_heldout(runs, model, tok, budget, lead.recipe.eval_generation_batch_size),
    }
    _write_combined(model, base, tok, runs, weights, method, density, out, report, budget, t0)
    print_combine(report, log)
    if merged:
        from adapters.publish.merge import DEFAULT_MAX_KL

        mr = merge_run(
            out,
            max_kl=DEFAULT_MAX_KL if max_kl is None else max_kl,
            force=force,
            dtype=recipe.dtype,
            n_probes=n_probes,
            log=log,
        )
        report["merge_verdict"] = mr["verdict"]
        report["verdict"] = mr["verdict"]
        write_json(out / "combine_report.json", report)
    return report


def _check_args(run_dirs: list[str], method: str, weights, density) -> tuple[list[float], float | None]:
    if method not in METHODS:
        raise MergeError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if len(run_dirs) < 2:
        raise MergeError("--adapters needs at least two runs to combine")
    weights = list(weights) if weights else default_weights(method, len(run_dirs))
    if len(weights) != len(run_dirs):
        raise MergeError(f"--weights: {len(weights)} weights for {len(run_dirs)} adapters")
    if method in DENSITY_METHODS:
        density = 0.5 if density is None else density
        if not 0 < density <= 1:
            raise MergeError(f"--density {density}: must be in (0, 1]")
    elif density is not None:
        raise MergeError(f"--density is used by {', '.join(DENSITY_METHODS)}, not by {method}")
    return weights, density


def _combine(base, runs, probes, method: str, weights: list[float], density: float | None):
    """Every source adapter on one base, probed alone; then PEFT's add_weighted_adapter as "default"."""
    from peft import PeftModel

    names = [f"src{i}" for i in range(len(runs))]
    model = PeftModel.from_pretrained(base, str(runs[0].adapter_dir), adapter_name=names[0], is_trainable=False)
    for name, r in zip(names[1:], runs[1:]):
        model.load_adapter(str(r.adapter_dir), adapter_name=name, is_trainable=False)
    model.eval()
    with model.disable_adapter():
        base_logits = probe_logits(model, probes)
    src_logits = []
    for name in names:
        model.set_adapter(name)
        src_logits.append(probe_logits(model, probes))
    try:
        model.add_weighted_adapter(names, weights, "default", combination_type=method, density=density)
    except ValueError as e:
        raise MergeError(f"add_weighted_adapter({method}): {e}") from None
    model.set_adapter("default")
    got = probe_logits(model, probes)
    for name in names:
        model.delete_adapter(name)
    return model, base_logits, src_logits, got


def _score_heldout(runs, model, tok, budget: int, bs: int) -> dict[str, Any]:
    """Exact match of the combination on each source's test split, next to the source's own."""
    heldout: dict[str, Any] = {}
    scored: dict[str, dict[str, Any]] = {}  # runs usually share one test file: score it once
    for r in runs:
        tf = r.recipe.test_file
        ev = r.path / "eval.json"
        src_em = (json.loads(ev.read_text()).get("tuned") or {}).get("exact_match") if ev.is_file() else None
        entry: dict[str, Any] = {"file": tf, "source_exact_match": src_em}
        if tf and Path(tf).is_file():
            if tf not in scored:
                c, refs_t = prompts_and_answers(read_rows(tf))
                preds = generate_answers(model, tok, c, budget, bs, f"combined on {Path(tf).name}")
                scored[tf] = {"combined_exact_match": round(exact_match(preds, refs_t), 4), "n": len(refs_t)}
            entry.update(scored[tf])
        heldout[str(r.path)] = entry
    return heldout


def _write_combined(model, base, tok, runs, weights, method, density, out: Path, report, budget: int, t0: float):
    """A run-like directory: adapter/, manifest.json, eval.json, combine_report.json; staged, then renamed."""
    lead = runs[0]
    heldout = report["heldout"]
    staging = fresh_staging(out)
    model.peft_config["default"].base_model_name_or_path = lead.ref.path
    model.save_pretrained(str(staging / "adapter"))
    tok.save_pretrained(str(staging / "adapter"))
    info = validate_adapter_dir(staging / "adapter")
    free(model, base)
    model = base = None

    manifest = dict(lead.manifest)
    manifest.update(
        {
            "run_name": out.name,
            "status": "complete",
            "adapter": info,
            "combined_from": [{"run": str(r.path), "weight": w} for r, w in zip(runs, weights)],
            "combination": {"method": method, "density": density},
            "finished": datetime.now().isoformat(timespec="seconds"),
        }
    )
    for k in ("log_history", "train", "checkpoints"):
        manifest.pop(k, None)
    write_json(staging / "manifest.json", manifest)
    lead_test = heldout[str(lead.path)]
    if "combined_exact_match" in lead_test:
        write_json(
            staging / "eval.json",
            {
                "tuned": {"exact_match": lead_test["combined_exact_match"], "n": lead_test["n"]},
                "max_new_tokens": budget,
            },
        )
    report["seconds"] = round(time.time() - t0, 2)
    write_json(staging / "combine_report.json", report)
    promote(staging, out)


def print_combine(r: dict[str, Any], log=print) -> None:
    log("")
    log(
        f"  combined adapter: {r['method']} weights {r['weights']}"
        + (f" density {r['density']}" if r["density"] else "")
    )
    log(f"  {'combined vs':40s}{'mean|dlogit|':>13s}{'mean KL':>11s}{'top-1':>7s}")
    for name, c in [("base (no adapter)", r["vs_base"])] + list(r["vs_sources"].items()):
        log(f"  {name[-40:]:40s}{c['mean_abs_logit_diff']:13.2e}{c['mean_kl']:11.2e}{c['top1_agreement']:7.0%}")
    for run, h in r["heldout"].items():
        if "combined_exact_match" in h:
            s = h["source_exact_match"]
            log(
                f"  held-out exact match on {run}'s test split: combined {h['combined_exact_match']:.3f}, "
                f"source " + (f"{s:.3f}" if s is not None else "n/a")
            )


__all__ = ["combine_runs", "check_same_base"]
