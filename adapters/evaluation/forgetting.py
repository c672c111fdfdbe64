"""Forgetting probe: perplexity of the base and the tuned model on general text the task data did not contain.

The default probe is built at run time from the docstrings of Python standard-library modules, which every machine
that runs this toolkit has. The selection is deterministic: a fixed module list, names in sorted order, passages in
order. A user file (passages separated by blank lines) replaces it (recipe key ``forgetting_probe``).

The base's perplexity is the same number for every run on the same base: it is kept in
``<output_root>/.cache/forgetting/<key>.json`` and read back by the next evaluation whose key matches. The key is the
base's file hash from the run's manifest, its quantization and dtype, the probe's token ids, the library versions and
the device (LLM.int8 and the CPU's kernels decide the last digits); a run without a file hash is never cached.
``forgetting.ppl_base_from`` in eval.json says where the figure came from.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from adapters.utils.errors import AdaptersError

# Prose-heavy, stable modules (documentation text, not code).
STDLIB_MODULES = (
    "argparse",
    "calendar",
    "collections",
    "csv",
    "difflib",
    "functools",
    "heapq",
    "itertools",
    "json",
    "logging",
    "pathlib",
    "random",
    "shutil",
    "statistics",
    "string",
    "textwrap",
    "threading",
    "unittest",
    "urllib.parse",
    "zipfile",
)
MIN_CHARS = 200


class ProbeError(AdaptersError, ValueError):
    """The probe file is missing, unreadable or empty; the message names the file."""


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def prose_paragraphs(text: str, seen: set[str]) -> list[str]:
    """Paragraphs of ``text`` that read as prose: long enough, mostly letters, no code sample, not in ``seen``
    (which is updated)."""
    out = []
    for p in _paragraphs(text):
        letters = sum(c.isalpha() or c.isspace() for c in p)
        if len(p) >= MIN_CHARS and letters / len(p) > 0.85 and ">>>" not in p and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def stdlib_passages(modules: tuple[str, ...] = STDLIB_MODULES, seen: set[str] | None = None) -> list[str]:
    """Docstring paragraphs of ``modules`` and their public members, deterministic for a Python version; a paragraph
    in ``seen`` (updated) is left out."""
    out: list[str] = []
    seen = set() if seen is None else seen
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(mod) or ""]
        for attr in sorted(a for a in vars(mod) if not a.startswith("_")):
            obj = getattr(mod, attr)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == name:
                docs.append(inspect.getdoc(obj) or "")
        for d in docs:
            out += prose_paragraphs(d, seen)
    return out


def probe_passages(path: str | None) -> tuple[str, list[str]]:
    """(probe name, passages)."""
    if not path:
        v = sys.version_info
        return f"python{v.major}.{v.minor}-stdlib-docstrings", stdlib_passages()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProbeError(f"{p}: forgetting_probe file not found") from None
    except UnicodeDecodeError as e:
        raise ProbeError(f"{p}: forgetting_probe: not UTF-8 (byte offset {e.start})") from None
    passages = _paragraphs(text)
    if not passages:
        raise ProbeError(f"{p}: forgetting_probe file holds no text")
    return p.name, passages


def encode_probe(tok, passages: list[str], max_length: int, token_budget: int) -> list[list[int]]:
    """Token ids per passage (with the tokenizer's BOS), each cut to max_length, until the budget is spent."""
    chunks: list[list[int]] = []
    total = 0
    for text in passages:
        ids = tok(text, add_special_tokens=True)["input_ids"][:max_length]
        if len(ids) < 2:
            continue
        chunks.append(ids)
        total += len(ids) - 1
        if total >= token_budget:
            break
    return chunks


@torch.no_grad()
def perplexity(model, chunks: list[list[int]], desc: str = "forgetting probe") -> float:
    """exp(mean next-token loss over every probe token); one passage per forward, so no padding is involved."""
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for ids in tqdm(chunks, desc=desc, unit="passage"):
        x = torch.tensor([ids], device=device)
        loss = model(input_ids=x, labels=x).loss.float().item()
        nll += loss * (len(ids) - 1)
        count += len(ids) - 1
    return math.exp(nll / count) if count else float("nan")


BASE_CACHE_VERSION = 1


def base_cache_key(model, recipe, manifest: dict[str, Any] | None, probe_sha256: str) -> str | None:
    """The cache key of the base's perplexity on this probe, or None when the base has no file hash to name it."""
    from importlib.metadata import PackageNotFoundError, version

    sha = ((manifest or {}).get("base_model") or {}).get("sha256")
    if not sha:
        return None
    versions = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    device = next(model.parameters()).device
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{device.type}:{torch.backends.cpu.get_cpu_capability()}"
    )
    key = {
        "version": BASE_CACHE_VERSION,
        "base_sha256": sha,
        "base_fingerprint": (manifest or {}).get("base_fingerprint"),
        "quantization": _quantization(recipe),
        "load_in_8bit": bool(recipe.load_in_8bit),
        "load_in_4bit": bool(recipe.load_in_4bit),
        "dtype": recipe.dtype,
        "probe_sha256": probe_sha256,
        "versions": versions,
        "device": where,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _quantization(recipe) -> dict[str, Any] | None:
    """The BitsAndBytesConfig keys that shape the loaded base (the 4-bit ones only when it is loaded in 4 bit)."""
    if not recipe.quantized:
        return None
    kwargs = recipe.library_kwargs("quantization")
    return {k: v for k, v in kwargs.items() if recipe.load_in_4bit or not k.startswith("bnb_4bit_")}


def _cache_path(recipe, key: str) -> Path:
    return Path(recipe.output_root) / ".cache" / "forgetting" / f"{key}.json"


def _cached_base(recipe, key: str | None) -> float | None:
    if key is None:
        return None
    try:
        value = json.loads(_cache_path(recipe, key).read_text()).get("ppl_base")
    except (OSError, ValueError):  # absent, or unreadable: computed again
        return None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else None


def _store_base(recipe, key: str | None, ppl: float, log) -> None:
    from adapters.utils.atomic import write_json

    if key is None or not math.isfinite(ppl):
        return
    try:
        write_json(_cache_path(recipe, key), {"ppl_base": ppl})
    except OSError as e:  # a read-only output root: the figure is still in this run's eval.json
        log(f"[forgetting] base perplexity not cached ({e})")


def probe(model, tok, recipe, base: bool = True, log=print, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"probe", "ppl_base", "ppl_tuned", "rise", "tokens", "passages", "sha256", "ppl_base_from"}`` for a
    PeftModel: the base is the same model with its adapter disabled, so both numbers come from one set of weights in
    memory. With the run's ``manifest`` the base's figure is cached by its key (see the module doc)."""
    name, passages = probe_passages(recipe.forgetting_probe)
    chunks = encode_probe(tok, passages, min(recipe.max_length, 512), recipe.forgetting_probe_tokens)
    if not chunks:
        raise ProbeError(f"forgetting probe {name}: no passage has two tokens or more")
    digest = hashlib.sha256(repr(chunks).encode()).hexdigest()
    out: dict[str, Any] = {
        "probe": name,
        "tokens": sum(len(c) - 1 for c in chunks),
        "passages": len(chunks),
        "sha256": digest,
    }
    ppl_tuned = perplexity(model, chunks, "forgetting probe (tuned)")
    out["ppl_tuned"] = round(ppl_tuned, 4)
    if base:
        key = base_cache_key(model, recipe, manifest, digest)
        ppl_base = _cached_base(recipe, key)
        out["ppl_base_from"] = "cache" if ppl_base is not None else "computed"
        if ppl_base is None:
            ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
            with ctx:
                ppl_base = perplexity(model, chunks, "forgetting probe (base)")
            _store_base(recipe, key, ppl_base, log)
        out["ppl_base"] = round(ppl_base, 4)
        out["rise"] = round((ppl_tuned - ppl_base) / ppl_base, 4)
    else:
        out["ppl_base"] = None
        out["rise"] = None
    log(
        f"[forgetting] {name}: {out['tokens']} tokens, perplexity base {out['ppl_base']}"
        + (" (cached)" if out.get("ppl_base_from") == "cache" else "")
        + f" tuned {out['ppl_tuned']}"
        + (f" ({out['rise']:+.1%})" if out["rise"] is not None else "")
    )
    return out
