"""Quantization: the recipe's ``BitsAndBytesConfig``, and what quantizing did to the base (probe losses of the
full-precision and the quantized model side by side)."""

from __future__ import annotations

import gc
from typing import Any

import torch

from adapters.config import Recipe
from adapters.model.sources import ModelRef
from adapters.utils.dtypes import torch_dtype


def quantization_config(recipe: Recipe):
    """A ``BitsAndBytesConfig`` for the recipe, or None. Pure: builds a config, loads nothing.

    Every BitsAndBytesConfig key of the recipe reaches it by name; the 4-bit keys only when loading in 4 bit, and
    the 4-bit compute dtype defaults to the recipe's dtype (bfloat16 for auto) instead of the library's float32.
    """
    if not recipe.quantized:
        return None
    from transformers import BitsAndBytesConfig

    kwargs = recipe.library_kwargs("quantization")
    if not recipe.load_in_4bit:
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("bnb_4bit_")}
    elif kwargs.get("bnb_4bit_compute_dtype") is None:
        kwargs["bnb_4bit_compute_dtype"] = torch_dtype(recipe.dtype if recipe.dtype != "auto" else "bfloat16")
    return BitsAndBytesConfig(**kwargs)


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
    from adapters.model.loading import load_model  # loading builds its BitsAndBytesConfig here

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


def print_quant_report(r: dict[str, Any], log=print) -> None:
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


@torch.no_grad()
def probe_loss(model, batch: dict[str, torch.Tensor]) -> float:
    """Mean token loss on a fixed batch (labels -100 are ignored)."""
    model.eval()
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()})
    return float(out.loss)


def model_memory_mb(model) -> float:
    return model.get_memory_footprint() / 2**20
