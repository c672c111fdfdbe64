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

from adapters.publish.rundir import load_run_tokenizer, open_run
from adapters.training.checkpoints import validate_adapter_dir
from adapters.utils.atomic import fresh_staging, promote, write_json
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
    run = open_run(run_dir)
    tok = load_run_tokenizer(run)  # the chat template must be the one trained with
    validate_adapter_dir(run.adapter_dir)
    to = Path(to)
    if to.exists() and any(to.iterdir()) and not force:
        raise PathExistsError(f"{to}: already exists; choose another --to or pass --force")
    staging = fresh_staging(to)
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
    promote(staging, to)
    log(f"[export] {run.path} -> {to}")
    return to
