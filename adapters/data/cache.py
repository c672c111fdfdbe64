"""The encoded-data cache: ``<output_root>/.cache/encoded/<key>/``, reused by every run with the same key.

The key is the sha256 of: the data files' hashes (every source, held-out and general file), the tokenizer (its
vocabulary and merges, special tokens) and chat template, every recipe key that changes what is read, cleaned,
split, mixed or encoded, and ``ENCODING_VERSION``. A folder is built under a private staging name and renamed when
complete (utils/atomic.py), and is only read when its ``report.json`` (written last) is there: a killed build is
never taken for a cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from adapters.config import Recipe
from adapters.utils.hashing import chat_template_sha256, fingerprint

ENCODING_VERSION = 2  # bump when the encoded columns or their meaning change: old caches are then never read

# The recipe keys whose value changes the encoded rows or the figures recorded with them.
ENCODING_KEYS = (
    "train_file",
    "eval_file",
    "test_file",
    "data_format",
    "data_columns",
    "skip_invalid",
    "dedup",
    "min_answer_chars",
    "max_answer_chars",
    "max_prompt_chars",
    "val_split",
    "seed",
    "data_mix",
    "augment_prompt_templates",
    "general_data_file",
    "general_data_share",
    "max_length",
    "data_split",
    "data_subset",
)


def tokenizer_sha256(tok) -> str:
    """The tokenizer as it encodes: its serialized vocabulary/model/normalizer, special tokens and class."""
    h = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tok.get_vocab().items())).encode())
    h.update(repr((tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.all_special_tokens)).encode())
    return h.hexdigest()


def data_files(recipe: Recipe) -> list[str]:
    mix = list(recipe.data_mix or {}) + [recipe.train_file]
    return sorted({p for p in (*mix, recipe.eval_file, recipe.test_file, recipe.general_data_file) if p})


def file_hash(path: str, recipe: Recipe) -> str:
    """A local file's or folder's sha256; a hub dataset's is datasets' own fingerprint of what it loaded (it follows
    the data files' hashes/ETags), prefixed ``dataset:``."""
    if Path(path).exists():
        return fingerprint(path)
    from adapters.data.readers import load_hub

    return "dataset:" + load_hub(path, recipe.data_split, recipe.data_subset)._fingerprint


def cache_key(recipe: Recipe, tok) -> dict[str, Any]:
    """Everything the key is made of, and the key (``key``)."""
    parts = {
        "version": ENCODING_VERSION,
        "files": {p: file_hash(p, recipe) for p in data_files(recipe)},
        "tokenizer": tokenizer_sha256(tok),
        "chat_template": chat_template_sha256(tok),
        "keys": {k: getattr(recipe, k, None) for k in ENCODING_KEYS},
    }
    parts["key"] = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return parts


def cache_dir(recipe: Recipe, key: str) -> Path:
    return Path(recipe.output_root) / ".cache" / "encoded" / key


def complete(folder: Path) -> bool:
    return (folder / "report.json").is_file()


def shard_files(folder: Path, split: str) -> list[Path]:
    """The Arrow files of one split, in order (one per encoding process)."""
    return sorted(folder.glob(f"{split}*.arrow"))


def load_split(folder: Path, split: str):
    """The encoded split, memory-mapped from the cache's Arrow files."""
    import datasets

    parts = [datasets.Dataset.from_file(str(f)) for f in shard_files(folder, split)]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
