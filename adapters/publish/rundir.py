"""Reading a finished run back: its manifest, recipe, base model and adapter, with identity checks.

Every verb that works on ``outputs/<run>/`` (eval, merge, export, push, generate) loads through here, so the
checks are the same everywhere: the adapter must sit on the base it was trained on, and the tokenizer/chat template
must be the one it was trained with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.config import Recipe, recipe_from_config
from adapters.model.loading import load_model
from adapters.model.sources import ModelRef
from adapters.utils.errors import AdaptersError
from adapters.utils.hashing import chat_template_sha256


class RunError(AdaptersError, RuntimeError):
    """A run directory is incomplete or inconsistent; the message names the file."""


@dataclass
class Run:
    path: Path
    manifest: dict[str, Any]
    recipe: Recipe
    ref: ModelRef

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"


def open_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    mf = path / "manifest.json"
    if not mf.is_file():
        raise RunError(f"{mf}: missing; {path} is not a run directory (expected outputs/<run_name>/)")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{mf}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if manifest.get("status") != "complete":
        raise RunError(f"{mf}: status is {manifest.get('status')!r}, not 'complete'; the run did not finish")
    if not (path / "adapter" / "adapter_config.json").is_file():
        raise RunError(f"{path / 'adapter'}: no adapter_config.json")
    check_adapter_file(path / "adapter")
    recipe = recipe_from_config(manifest["config"], str(mf))
    ref = ModelRef(**manifest["base_model"])
    if not Path(ref.path).exists() and ref.kind in ("embedded", "gguf"):
        from adapters.model.sources import resolve_model

        ref = resolve_model(ref.source)  # the cache was cleared: rebuild it from the same source
    return Run(path, manifest, recipe, ref)


def check_adapter_file(adapter_dir: Path) -> None:
    """The adapter's weights file must be whole before any verb loads it or writes anything: one line naming the
    file and what is wrong (cut short, unreadable, empty, NaN), instead of a library's traceback halfway."""
    from adapters.training.checkpoints import validate_adapter_dir

    validate_adapter_dir(adapter_dir)


def load_run_tokenizer(run: Run):
    """The tokenizer saved with the adapter; its chat template must hash to the manifest's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run.adapter_dir))
    want = run.manifest.get("chat_template_sha256")
    if want and chat_template_sha256(tok) != want:
        raise RunError(
            f"{run.adapter_dir}: chat template hash {chat_template_sha256(tok)[:12]} differs from the one "
            f"trained with ({want[:12]}, manifest.json); the tokenizer or template changed after training"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def check_base(run: Run, base_model) -> None:
    """The base must match the recorded one: same architecture and vocabulary, and same weights fingerprint."""
    cfg = base_model.config
    want = run.manifest.get("base_fingerprint")
    if want:
        got = base_fingerprint(base_model)
        if got != want:
            raise RunError(
                f"{run.path / 'manifest.json'}: base_fingerprint {want[:12]} does not match the loaded "
                f"base {got[:12]} ({run.ref.path}); the adapter belongs to another base model"
            )
    rec = run.manifest.get("base_config") or {}
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        if key in rec and getattr(cfg, key, None) != rec[key]:
            raise RunError(
                f"{run.path / 'manifest.json'}: base {key} is {getattr(cfg, key, None)!r}, "
                f"the adapter was trained on {rec[key]!r}"
            )


def base_fingerprint(model) -> str:
    """A cheap weights fingerprint: sha256 over a strided sample of the embedding matrix (full precision)."""
    emb = model.get_input_embeddings().weight.detach().float().cpu()
    sample = emb.flatten()[:: max(1, emb.numel() // 4096)][:4096]
    return hashlib.sha256(sample.numpy().round(4).tobytes()).hexdigest()


def load_tuned(run: Run, quantize: bool = True, adapter_name: str = "default"):
    """(PeftModel, tokenizer): the base as trained (quantized if ``quantize``) plus the run's adapter."""
    from peft import PeftModel

    tok = load_run_tokenizer(run)
    base = load_model(run.ref, run.recipe, quantize=quantize)
    check_base(run, base)
    model = PeftModel.from_pretrained(base, str(run.adapter_dir), adapter_name=adapter_name, is_trainable=False)
    return model.eval(), tok


BYTES_PER_WEIGHT = {
    "float32": 4.0,
    "bfloat16": 2.0,
    "float16": 2.0,
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,  # a block of 32 int8 values and one f16 scale
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
}


def base_parameters(run: Run) -> int:
    """The base's weight count from its safetensors headers (nothing loaded); 0 when it has none to read."""
    from safetensors import safe_open

    n = 0
    for f in sorted(Path(run.ref.path).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    shape = fh.get_slice(k).get_shape()
                    size = 1
                    for d in shape:
                        size *= d
                    n += size
        except Exception:  # an unreadable base fails at load with the loader's own message
            return 0
    return n


def output_bytes(run: Run, kind: str) -> int:
    """About what a full copy of the base written as ``kind`` (a dtype or a GGUF type) takes."""
    return int(base_parameters(run) * BYTES_PER_WEIGHT.get(kind, 4.0))
