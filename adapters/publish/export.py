"""Adapter-only export: ``adapters export outputs/<run> --to DIR``.

DIR gets the PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``), the tokenizer with the chat
template the run was trained with, and a ``README.md`` model-card stub (huggingface_hub ``ModelCard``) that the hub
verb fills in. The adapter's ``base_model_name_or_path`` is rewritten from the local cache path to the base's
canonical name, so the folder is portable; the local path is kept in ``export.json``. Written through a staging
folder and renamed, so DIR is either complete or absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from adapters.publish.rundir import load_run_tokenizer, output_bytes
from adapters.training.checkpoints import validate_adapter_dir
from adapters.utils.atomic import check_room, discard, fresh_staging, promote, write_json
from adapters.utils.errors import PathExistsError

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A LoRA adapter for [{{ base_model }}](https://huggingface.co/{{ base_model }}), trained with the `adapters` toolkit.

- LoRA: r={{ r }}, alpha={{ alpha }}, target modules: {{ targets }}
- Base loaded as: {{ quant }}
- Training data: {{ train_file }} (sha256 {{ train_sha }})
- Held-out exact match: {{ em }}

## Use

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{{ model_name }}")
tok = AutoTokenizer.from_pretrained("{{ model_name }}")
```

<!-- stub written by `adapters export`; `adapters push` completes it -->
"""


def model_card(run, adapter_cfg: dict[str, Any]) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    m = run.manifest
    ev = run.path / "eval.json"
    em = "not scored"
    if ev.is_file():
        e = json.loads(ev.read_text())
        parts = [f"{k} {e[k]['exact_match']:.3f}" for k in ("base", "tuned") if isinstance(e.get(k), dict)]
        em = ", ".join(parts) or em
    data = (m.get("data") or {}).get("train") or {}
    card_data = ModelCardData(
        base_model=run.ref.canonical_name,
        library_name="peft",
        license=run.ref.license,
        tags=["lora", "peft", "sft", "adapters-toolkit"],
        pipeline_tag="text-generation",
    )
    return str(
        ModelCard.from_template(
            card_data,
            template_str=CARD_TEMPLATE,
            model_name=m.get("run_name", run.path.name),
            base_model=run.ref.canonical_name,
            r=adapter_cfg.get("r"),
            alpha=adapter_cfg.get("lora_alpha"),
            targets=run.recipe.target_modules,
            quant=(m.get("quantization") or {}).get("method", "none"),
            train_file=data.get("file", "?"),
            train_sha=str(data.get("sha256", "?"))[:12],
            em=em,
        )
    )


def export_run(run_dir: str | Path, to: str | Path, force: bool = False, log=print) -> Path:
    from adapters.publish.hub import resolve_adapter

    run = resolve_adapter(run_dir)  # a run directory, an adapter folder or a hub id
    tok = load_run_tokenizer(run)  # the chat template must be the one trained with
    validate_adapter_dir(run.adapter_dir)
    to = Path(to)
    if to.exists() and any(to.iterdir()) and not force:
        raise PathExistsError(f"{to}: already exists; choose another --to or pass --force")
    need = sum(f.stat().st_size for f in run.adapter_dir.iterdir() if f.is_file())
    check_room(to, need, hint="choose another --to")
    staging = fresh_staging(to)
    try:
        _write_peft_export(run, tok, staging)
    except BaseException:  # Ctrl-C or a failure: nothing half-written is left next to DIR
        discard(staging)
        raise
    promote(staging, to)
    log(f"[export] {run.path} -> {to}")
    return to


def _write_peft_export(run, tok, staging: Path) -> None:
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy2(run.adapter_dir / name, staging / name)
    cfg_path = staging / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    local_base = cfg.get("base_model_name_or_path")
    cfg["base_model_name_or_path"] = run.ref.canonical_name
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    tok.save_pretrained(str(staging))
    if tok.chat_template and not any(staging.glob("chat_template.*")):
        (staging / "chat_template.jinja").write_text(tok.chat_template)
    (staging / "README.md").write_text(model_card(run, cfg))
    write_json(
        staging / "export.json",
        {
            "run": str(run.path),
            "base_model": run.ref.canonical_name,
            "local_base_path": local_base,
            "chat_template_sha256": run.manifest.get("chat_template_sha256"),
        },
    )
    validate_adapter_dir(staging)


# ---------------------------------------------------------------------------------------------------- GGUF
GGUF_FILES = ("adapter.gguf", "base.gguf", "model.gguf")


def _source_gguf(run) -> Path | None:
    """The GGUF the base was dequantized from (embedded or a .gguf recipe source), or None."""
    if run.ref.kind not in ("embedded", "gguf"):
        return None
    src = Path(run.ref.path) / "source.json"
    path = Path(json.loads(src.read_text())["gguf"]) if src.is_file() else Path(run.ref.source)
    if not path.is_file():
        from adapters.model.sources import resolve_model

        run.ref = resolve_model(run.ref.source)  # rebuilds the embedded GGUF
        return _source_gguf(run)
    return path


def _check_outtype(outtype: str, mode: str, force: bool) -> None:
    from adapters.publish.gguf_export import FULL_TYPES, LOW_TYPE_REASON, LOW_TYPES, GGUFExportError

    if outtype not in FULL_TYPES + LOW_TYPES:
        raise GGUFExportError(f"--outtype {outtype!r}: choose one of {', '.join(FULL_TYPES + LOW_TYPES)}")
    if outtype in LOW_TYPES and mode == "merged" and not force:
        raise GGUFExportError(
            f"--outtype {outtype}: below Q8_0 for fine-tuned weights is refused ({LOW_TYPE_REASON}); use q8_0, "
            "or --mode lora (the adapter stays 16-bit), or --force"
        )


def _base_config(run):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(run.ref.path, trust_remote_code=run.recipe.trust_remote_code)


def _adapter_model(run):
    """The adapter on a float32 reload of its base, with the base-fingerprint check: the reference the GGUF's
    answers are compared with, and what merged mode folds."""
    import dataclasses

    from peft import PeftModel

    from adapters.model.loading import load_model
    from adapters.publish.merge import ensure_full_precision
    from adapters.publish.rundir import check_base

    recipe = dataclasses.replace(run.recipe, dtype="float32")
    base = load_model(run.ref, recipe, quantize=False)
    ensure_full_precision(base, str(run.ref.path))
    check_base(run, base)
    return PeftModel.from_pretrained(base, str(run.adapter_dir), is_trainable=False).eval()


def _write_lora_mode(run, tok, staging: Path, outtype: str, report: dict) -> tuple[Path, Path]:
    from safetensors.torch import load_file

    from adapters.publish import gguf_export as gx

    cfg = _base_config(run)
    adapter_type = outtype if outtype in ("f32", "bf16") else "f16"  # 16-bit at least: the fine-tune lives here
    acfg = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    state = load_file(str(run.adapter_dir / "adapter_model.safetensors"))
    name = run.manifest.get("run_name", run.path.name)
    adapter = gx.write_lora(staging / "adapter.gguf", state, acfg, cfg, adapter_type, name)
    src = _source_gguf(run)
    if src is not None:  # the exact weights the adapter was trained on, plus the run's template
        base = gx.copy_with_template(src, staging / "base.gguf", gguf_template(tok))
        report["base_gguf"] = {"from": str(src), "types": "as the source GGUF"}
    else:
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(run.ref.path, dtype="float32")
        base = gx.write_model(staging / "base.gguf", m.state_dict(), cfg, tok, outtype, gguf_template(tok), name)
        report["base_gguf"] = {"from": run.ref.path, "types": outtype}
    report["adapter_gguf"] = {"types": adapter_type, "lora_alpha": gx.lora_alpha(acfg), "r": acfg.get("r")}
    return base, adapter


def _write_merged_mode(run, peft_model, tok, staging: Path, outtype: str, report: dict) -> Path:
    from adapters.publish import gguf_export as gx
    from adapters.publish.merge import merge_into

    merged, _ = merge_into(peft_model)
    name = run.manifest.get("run_name", run.path.name)
    path = gx.write_model(
        staging / "model.gguf",
        merged.state_dict(),
        merged.config,
        tok,
        outtype,
        gguf_template(tok),
        name,
        source_gguf=_source_gguf(run),  # its tokenizer metadata (sentencepiece-style for Gemma)
    )
    report["model_gguf"] = {"types": outtype, "tokenizer_from": "source GGUF" if _source_gguf(run) else "tokenizer"}
    return path


def _llama_cpp_convert(run, peft_model, tok, staging: Path, outtype: str, llama_cpp: Path, report: dict) -> Path:
    """Another family: llama.cpp's own convert_hf_to_gguf.py on the merged model, then the run's template."""
    import subprocess
    import sys
    import tempfile

    from adapters.publish import gguf_export as gx
    from adapters.publish.merge import merge_into, save_merged

    script = Path(llama_cpp) / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise gx.GGUFExportError(f"--llama-cpp {llama_cpp}: no convert_hf_to_gguf.py there")
    if outtype not in gx.FULL_TYPES:
        raise gx.GGUFExportError(f"--outtype {outtype}: with --llama-cpp use one of {', '.join(gx.FULL_TYPES)}")
    merged, _ = merge_into(peft_model)
    with tempfile.TemporaryDirectory(dir=staging) as tmp:
        save_merged(merged, tok, Path(tmp) / "hf")
        raw = Path(tmp) / "raw.gguf"
        cmd = [sys.executable, str(script), str(Path(tmp) / "hf"), "--outfile", str(raw), "--outtype", outtype]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            raise gx.GGUFExportError(f"{script} failed (exit {done.returncode}): {' '.join(tail)}")
        path = gx.copy_with_template(raw, staging / "model.gguf", gguf_template(tok))
    report["model_gguf"] = {"types": outtype, "converter": str(script)}
    return path


def gguf_template(tok) -> str | None:
    """The chat template a GGUF carries: the run's, or none for a run trained raw (template: raw), whose prompts
    llama.cpp and Ollama must pass as plain text."""
    from adapters.model.loading import template_of

    return None if template_of(tok) == "raw" else tok.chat_template


def _probes(run, n: int, split: str = "eval") -> tuple[list, list[str], str | None]:
    """The first ``n`` rows of the eval split (else the test split; ``split="test"``: the other way round):
    conversations and reference answers."""
    from adapters.data.encode import prompts_and_answers
    from adapters.data.preference import task_rows

    files = (run.recipe.eval_file, run.recipe.test_file)
    for src in files if split == "eval" else files[::-1]:
        if src and Path(src).is_file():
            rows = task_rows(src, run.recipe)  # a preference run's pairs: prompt + chosen
            convs, refs = prompts_and_answers(rows[:n])
            return convs, refs, src
    return [], [], None


def export_gguf(
    run_dir: str | Path,
    mode: str = "lora",
    outtype: str = "f16",
    to: str | Path | None = None,
    force: bool = False,
    llama_cpp: str | Path | None = None,
    min_agreement: float | None = None,
    n_probes: int = 20,
    probe_split: str = "eval",
    log=print,
) -> dict[str, Any]:
    """Write GGUF files, a Modelfile and export_report.json; verify with llama.cpp when it is importable."""
    import time

    from adapters.evaluation.generation import generate_answers
    from adapters.publish import gguf_export as gx
    from adapters.publish.gguf_verify import DEFAULT_MIN_AGREEMENT
    from adapters.publish.hub import resolve_adapter
    from adapters.publish.merge import _budget

    t0 = time.time()
    run = resolve_adapter(run_dir)
    tok = load_run_tokenizer(run)
    if mode not in ("lora", "merged"):
        raise gx.GGUFExportError(f"--mode {mode!r}: choose lora or merged")
    if not tok.chat_template:
        raise gx.GGUFExportError(f"{run.adapter_dir}: the tokenizer has no chat template to write into the GGUF")
    _check_outtype(outtype, mode, force)
    out = Path(to) if to else run.path / "gguf"  # a hub id's run.path is its copy under outputs/
    if out.exists() and any(out.iterdir()) and not force:  # an earlier export is never replaced unasked
        raise PathExistsError(
            f"{out}: holds an earlier export; it is kept. Choose another --to, or pass --force to replace it"
        )
    copies_source = mode == "lora" and run.ref.kind in ("embedded", "gguf")  # base.gguf: the source file's size
    check_room(out, 0 if copies_source else output_bytes(run, outtype), hint="choose another --to")
    cfg = _base_config(run)
    if cfg.model_type not in gx.ARCHS and (llama_cpp is None or mode == "lora"):
        gx.gguf_arch(cfg)  # raises, naming --llama-cpp
    convs, refs, probe_file = _probes(run, n_probes, probe_split)
    peft_model = _adapter_model(run)
    budget = _budget(run, tok, refs) if refs else 0
    hf = (
        generate_answers(peft_model, tok, convs, budget, run.recipe.eval_generation_batch_size, "adapter")
        if convs
        else []
    )
    report: dict[str, Any] = {"run": str(run.path), "mode": mode, "outtype": outtype, "probe_file": probe_file}
    staging = fresh_staging(out)
    try:  # Ctrl-C, SIGTERM or a failure: the staging folder goes, an earlier export stays as it was
        if mode == "lora":
            model, adapter = _write_lora_mode(run, tok, staging, outtype, report)
        elif cfg.model_type in gx.ARCHS:
            model, adapter = _write_merged_mode(run, peft_model, tok, staging, outtype, report), None
        else:
            model, adapter = _llama_cpp_convert(run, peft_model, tok, staging, outtype, Path(llama_cpp), report), None
        del peft_model
        report["seconds_write"] = round(time.time() - t0, 1)
        return _finish_export(
            run,
            tok,
            staging,
            out,
            model,
            adapter,
            convs,
            refs,
            hf,
            budget,
            report,
            min_agreement if min_agreement is not None else DEFAULT_MIN_AGREEMENT,
            force,
            log,
        )
    except BaseException:
        discard(staging)
        raise


def _finish_export(
    run, tok, staging, out, model, adapter, convs, refs, hf, budget, report, min_agreement, force, log
) -> dict[str, Any]:
    """Modelfile, llama.cpp check, export_report.json; the GGUF files are kept only when the check passes (or
    --force, or no check could run, which the report and the log say loudly)."""
    from adapters.publish.gguf_verify import INSTALL_HINT, verify
    from adapters.publish.modelfile import modelfile

    num_ctx = max(run.recipe.max_length or 0, 2048)  # max_length bounds one training row, not a conversation
    from adapters.model.loading import raw_turns

    turns = raw_turns(tok.chat_template)
    text, fmt = modelfile(model.name, adapter.name if adapter else None, gguf_template(tok), num_ctx, turns=turns)
    (staging / "Modelfile").write_text(text)
    report["modelfile_chat_format"] = fmt
    report["files"] = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
    if convs:
        v = verify(model, adapter, tok, convs, refs, hf, budget)
    else:
        v = {"verified": "unverified", "reason": "no eval_file/test_file found for probe prompts"}
    report["verification"] = v
    report["min_agreement"] = min_agreement
    if v.get("verified") == "unverified":
        report["verdict"] = "unverified"
    else:
        v["verified"] = v["agreement"] >= min_agreement
        report["verdict"] = "pass" if v["verified"] else ("forced" if force else "fail")
    if report["verdict"] == "fail":
        for p in staging.iterdir():
            if p.suffix == ".gguf":
                p.unlink()  # a file that answers differently from the adapter is not left to be used
    write_json(staging / "export_report.json", report)
    promote(staging, out)
    report["out"] = str(out)
    sizes = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in report["files"].items() if k.endswith(".gguf"))
    log(f"[export] {report['mode']} {report['outtype']} -> {out}: {sizes}")
    if v.get("verified") == "unverified":
        log(f"[export] UNVERIFIED: {v['reason']}; to check the GGUF with llama.cpp: {INSTALL_HINT}")
    else:
        log(
            f"[export] llama.cpp vs transformers on {v['n']} probe prompts: {v['agree_count']}/{v['n']} answers "
            f"equal ({v['agreement']:.0%}), exact match {v['exact_match_llama_cpp']:.3f} vs "
            f"{v['exact_match_transformers']:.3f}, tokenization {v['tokenization_agreement']:.0%}; "
            f"verdict {report['verdict']}"
        )
        if report["verdict"] == "fail":
            log(f"[export] FAILED: agreement below {min_agreement:.0%}; GGUF files removed (--force keeps them)")
    return report
