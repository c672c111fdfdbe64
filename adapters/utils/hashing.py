"""sha256 of files, folders and chat templates: one definition, so every record of the same thing agrees."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def _feed(h, path: Path) -> None:
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)


def file_sha256(path: str | Path) -> str:
    """sha256 of one file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    _feed(h, Path(path))
    return h.hexdigest()


def fingerprint(path: str | Path) -> str:
    """sha256 of a file (same as ``file_sha256``), or of a directory's files: relative names and bytes, sorted."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    h = hashlib.sha256()
    for f in sorted(f for f in p.rglob("*") if f.is_file()):
        h.update(str(f.relative_to(p)).encode() + b"\0")
        _feed(h, f)
    return h.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def chat_template_sha256(tok) -> str:
    """The hash recorded as ``chat_template_sha256``: of the tokenizer's template, "" when it has none."""
    return text_sha256(tok.chat_template or "")
