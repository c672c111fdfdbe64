"""Atomic writes: build the result in a staging path next to the target, fsync it, then one ``os.replace``.

Every finished artefact (adapter, checkpoint, merged model, export, combined run, model cache, JSON record) is
written through here, so a reader sees the old target or the complete new one, never a half-written one, and a
power cut after the rename cannot lose what was renamed: every file and directory of the staging tree is fsynced
before the rename, the parent directory after it.

A process killed mid-write leaves only a hidden ``.NAME.staging`` (or ``.NAME.XXXX``) sibling: the next write of
the same target removes a fixed-name leftover first; nothing ever reads a staging path as a result.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adapters.utils.errors import AdaptersError


def staging_path(target: str | Path) -> Path:
    """The fixed staging sibling of ``target``: hidden, and on the same filesystem so the rename is atomic."""
    target = Path(target)
    return target.with_name(f".{target.name}.staging")


def clear(path: str | Path) -> None:
    """Remove a file or folder if it is there (a leftover of a killed write)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def fresh_staging(target: str | Path, unique: bool = False) -> Path:
    """An empty staging folder for ``target``, its parent created.

    ``unique``: a private ``mkdtemp`` name, for targets that several processes may build at once (every rank
    resolving the same model cache); otherwise the fixed name, whose leftover from a killed process is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if unique:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
    staging = staging_path(target)
    clear(staging)
    staging.mkdir()
    return staging


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so the names created or renamed in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under ``root``, then every directory, deepest first, ``root`` last."""
    root = Path(root)
    dirs = []
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            continue
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        elif p.is_dir():
            dirs.append(p)
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)
    fsync_dir(root)


def promote(staging: str | Path, target: str | Path) -> None:
    """Make the finished ``staging`` folder ``target``; the old ``target`` is kept until the rename.

    The old folder is moved aside to a hidden ``.NAME.old`` sibling just before the new one takes its name (a
    directory cannot be renamed over a non-empty one), and removed after.
    """
    staging, target = Path(staging), Path(target)
    fsync_tree(staging)
    old = target.with_name(f".{target.name}.old")
    clear(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def discard(staging: str | Path) -> None:
    """Drop a staging folder that is not to be promoted."""
    shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_dir(target: str | Path, unique: bool = False) -> Iterator[Path]:
    """``with staged_dir(target) as tmp:`` write into ``tmp``; on a clean exit it becomes ``target``.

    An exception (or a kill) leaves ``target`` as it was and removes the staging folder.
    """
    staging = fresh_staging(target, unique=unique)
    try:
        yield staging
    except BaseException:
        discard(staging)
        raise
    promote(staging, target)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically: a temporary file in the same folder, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON (indented, non-JSON values as ``str``) atomically through ``write_text``."""
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------- room
class OutputError(AdaptersError, OSError):
    """The place an output goes cannot take it (read-only, no permission, not enough free space)."""


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_room(target: str | Path, need_bytes: int = 0, hint: str = "choose another location") -> None:
    """Before any slow work: the folder ``target`` will be written in (its nearest existing ancestor, as
    ``fresh_staging`` creates the rest) takes a new entry and has ``need_bytes`` free. OutputError names the folder.

    Tried, not inferred from modes: a folder is probed with a private sub-folder created and removed again, so a
    read-only mount and root's permissions both give the answer the real write would."""
    target = Path(target).absolute()
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{folder}: not a folder, so {target} cannot be written; {hint}")
    try:
        probe = tempfile.mkdtemp(prefix=f".{target.name}.probe.", dir=folder)
    except OSError as e:
        raise OutputError(f"{folder}: cannot write here ({e.strerror or e}); {hint}") from None
    os.rmdir(probe)
    if need_bytes:
        free = shutil.disk_usage(folder).free
        if free < need_bytes:
            raise OutputError(
                f"{folder}: {_size(free)} free, {target.name} needs about {_size(need_bytes)}; free some space or "
                f"{hint}"
            )
