"""The encoded-data cache: ``<output_root>/.cache/encoded/<key>/``, reused by every run with the same key.

The key is the sha256 of: the data files' hashes (every source, held-out and general file), the tokenizer (its
vocabulary and merges, special tokens) and chat template, every recipe key that changes what is read, cleaned,
split, mixed or encoded, and ``ENCODING_VERSION``. A folder is built under a private staging name and renamed when
complete (utils/atomic.py), and is only read when its ``report.json`` (written last) is there: a killed build is
never taken for a cache.

Each entry also records the size and sha256 of every file it holds (``integrity.json``, written into the staging
folder before the rename). ``verify`` checks them before an entry is used: a file cut short or changed in place
(a full disk, a copy interrupted, a bad sector) is named in one line, the entry is moved aside to
``<key>.damaged-<time>`` for inspection, and the stage builds it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from adapters.config import Recipe
from adapters.utils.hashing import chat_template_sha256, file_sha256, fingerprint

INTEGRITY = "integrity.json"  # {"files": {name: {"size", "sha256"}}}: what the entry held when it was written
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


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != INTEGRITY)


def seal(folder: Path) -> None:
    """Record the size and sha256 of every file of a finished entry (called on the staging folder, before the
    rename that publishes it)."""
    from adapters.utils.atomic import write_json

    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in _files(folder)
    }
    write_json(folder / INTEGRITY, {"files": files})


def verify(folder: Path) -> str | None:
    """None when every recorded file is there with its size and sha256 (and nothing was added); else what is
    wrong, naming the file. Sizes are compared first, so a cut file is found without reading it."""
    try:
        record = json.loads((folder / INTEGRITY).read_text())["files"]
    except FileNotFoundError:
        return f"{folder / INTEGRITY}: missing (an entry written before integrity records, or cut short)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{folder / INTEGRITY}: unreadable ({e})"
    found = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
    for name, rec in record.items():
        f = found.get(name)
        if f is None:
            return f"{folder / name}: missing"
        size = f.stat().st_size
        if size != rec.get("size"):
            return f"{f}: {size} bytes, {rec.get('size')} when written (truncated or changed)"
    for name, rec in record.items():
        if file_sha256(found[name]) != rec.get("sha256"):
            return f"{found[name]}: sha256 differs from the one recorded when written (changed in place)"
    extra = sorted(set(found) - set(record))
    if extra:
        return f"{folder / extra[0]}: not part of the entry when it was written"
    return None


def set_aside(folder: Path) -> Path:
    """Move a damaged entry out of the way (kept for inspection): ``<key>.damaged-<time>`` next to it."""
    aside = folder.with_name(f"{folder.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        os.replace(folder, aside)
    except FileNotFoundError:  # another process moved or rebuilt it meanwhile
        pass
    return aside
