"""Checkpoints that are never taken for complete unless they are, and hold exactly what the model trains.

Each checkpoint is written into ``checkpoints/.staging/checkpoint-N``, checked against the trainable tensors in
memory (same names, shapes, dtype and values: a save that gathered nothing, one shard, or a corrupted file is
refused, while a lora_B that is legitimately still zero, as at the first warmup step, is kept), fsynced, marked
with ``COMPLETE.json`` and only then renamed into ``checkpoints/checkpoint-N``. A process killed mid-save leaves
only the staging folder, which resume ignores.

Checkpoints carry no tokenizer (Gemma's is 33 MB): the run writes it once into ``<run>/tokenizer/``. The Trainer
resumes without it and ``PeftModel.from_pretrained(base, checkpoint)`` loads without it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from adapters.compat.transformers import StagedCheckpoints
from adapters.utils.atomic import promote, staged_dir
from adapters.utils.errors import AdaptersError

MARKER = "COMPLETE.json"
ADAPTER_FILE = "adapter_model.safetensors"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(AdaptersError, RuntimeError):
    pass


def validate_adapter_dir(
    path: str | Path, expected_modules: int | None = None, reference: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Load the adapter's safetensors and check it; raise CheckpointError naming the path and the fault.

    Without a live model (resume, merge, push) the checks are structural: it loads, every tensor is non-empty and
    finite, each module has one lora_A and one lora_B, of the modules adapter_config.json targets.
    ``expected_modules``: the number of LoRA-wrapped modules of the live model; the file must hold a pair for each.
    ``reference``: the live trainable tensors under their saved names (``distributed.adapter_tensors``); the file
    must hold exactly these. An all-zero lora_B is only wrong where the model in memory says so.
    """
    from safetensors.torch import load_file

    path = Path(path)
    f = path / ADAPTER_FILE
    if not f.is_file() or f.stat().st_size == 0:
        raise CheckpointError(f"{f}: missing or empty adapter file")
    if why := safetensors_problem(f):
        raise CheckpointError(f"{f}: {why}")
    try:
        tensors = load_file(str(f))
    except Exception as e:
        raise CheckpointError(f"{f}: unreadable safetensors ({e})") from None
    if not tensors:
        raise CheckpointError(f"{f}: holds no tensors")
    for name, t in tensors.items():
        if t.numel() == 0:
            raise CheckpointError(f"{f}: tensor {name} is empty")
        if not torch.isfinite(t.float()).all():
            raise CheckpointError(f"{f}: tensor {name} has NaN or inf values")
    a_mods, b_mods = _lora_modules(tensors, "lora_A"), _lora_modules(tensors, "lora_B")
    if expected_modules is not None and (len(a_mods) != expected_modules or len(b_mods) != expected_modules):
        raise CheckpointError(
            f"{f}: holds {len(a_mods)} lora_A and {len(b_mods)} lora_B tensors, expected "
            f"{expected_modules} of each (one per targeted module)"
        )
    _check_pairs(f, a_mods, b_mods, _target_modules(path))
    if reference is not None:
        _check_against(f, tensors, reference)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    return {"tensors": len(tensors), "lora_B": len(b_mods), "dtype": "+".join(dtypes)}


def safetensors_problem(f: Path) -> str | None:
    """What is wrong with a safetensors file's layout, read from its header alone (no tensor is loaded): cut short
    (a copy or a save interrupted), or a header that is not one; None when the layout is whole."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is None or 8 + n > size:
            return f"truncated: {size} bytes, shorter than its own header says (the file was cut short)"
        try:
            header = json.loads(fh.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return "damaged: its header is not a safetensors header"
    need = 8 + n + max(ends, default=0)
    if need > size:
        return f"truncated: {size} bytes, its header describes {need} (the file was cut short)"
    return None


def _lora_modules(tensors: dict[str, torch.Tensor], kind: str) -> list[str]:
    """The module name of every ``kind`` (lora_A / lora_B) tensor, once per tensor."""
    return [n.split(f".{kind}")[0] for n in tensors if f".{kind}." in n or n.endswith(f".{kind}")]


def _target_modules(path: Path) -> list[str] | None:
    """adapter_config.json's target_modules when it lists names (not a regex or 'all-linear'), else None."""
    cfg = path / "adapter_config.json"
    if not cfg.is_file():
        return None
    try:
        targets = json.loads(cfg.read_text()).get("target_modules")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg}: unreadable ({e})") from None
    return list(targets) if isinstance(targets, (list, tuple)) else None


def _check_pairs(f: Path, a_mods: list[str], b_mods: list[str], targets: list[str] | None) -> None:
    """Each adapted module holds one lora_A and one lora_B, and is one the adapter's config targets."""
    for kind, mods, other in (("lora_A", a_mods, b_mods), ("lora_B", b_mods, a_mods)):
        if len(set(mods)) != len(mods):
            raise CheckpointError(f"{f}: a module holds more than one {kind}")
        lone = sorted(set(mods) - set(other))
        if lone:
            raise CheckpointError(f"{f}: {lone[0]} has a {kind} but no {'lora_B' if kind == 'lora_A' else 'lora_A'}")
    if targets:
        stray = sorted(m for m in a_mods if not any(m == t or m.endswith(f".{t}") for t in targets))  # as PEFT matches
        if stray:
            raise CheckpointError(f"{f}: {stray[0]} is not among the target_modules of adapter_config.json")


def _check_against(f: Path, saved: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> None:
    """The file holds the trainable tensors of the model in memory: same names, shapes, dtypes, values."""
    missing, extra = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing:
        raise CheckpointError(
            f"{f}: lacks {len(missing)} of the model's {len(live)} adapter tensors, e.g. {missing[0]}"
        )
    if extra:
        raise CheckpointError(f"{f}: holds {len(extra)} tensors the model does not train, e.g. {extra[0]}")
    for name, want in live.items():
        got = saved[name]
        if got.shape != want.shape:
            raise CheckpointError(f"{f}: tensor {name} has shape {tuple(got.shape)}, the model {tuple(want.shape)}")
        if got.dtype != want.dtype:
            raise CheckpointError(f"{f}: tensor {name} is stored as {got.dtype}, the model trains it in {want.dtype}")
        if not torch.equal(got, want.to(got.device)):
            diff = float((got.float() - want.float().to(got.device)).abs().max())
            raise CheckpointError(f"{f}: tensor {name} differs from the model in memory (max abs diff {diff:.3g})")


def save_run_tokenizer(tok, run: str | Path) -> Path:
    """The run's one copy of the tokenizer (checkpoints carry none), written atomically unless already there."""
    out = Path(run) / TOKENIZER_DIR
    if not out.is_dir():
        with staged_dir(out) as staging:
            tok.save_pretrained(str(staging))
    return out


def _step(p: Path) -> int:
    m = re.fullmatch(r"checkpoint-(\d+)", p.name)
    return int(m.group(1)) if m else -1


def complete_checkpoints(ckpt_root: str | Path) -> list[Path]:
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step(p) >= 0 and (p / MARKER).is_file()]
    return sorted(found, key=_step)


def last_good_checkpoint(ckpt_root: str | Path, log=print) -> Path | None:
    """The newest checkpoint that is marked complete and still validates; older ones are the fallback."""
    for p in reversed(complete_checkpoints(ckpt_root)):
        try:
            validate_adapter_dir(p)
            return p
        except CheckpointError as e:
            log(f"[resume] skipping {p}: {e}")
    return None


class AtomicCheckpointMixin(StagedCheckpoints):
    """Mixed into a transformers Trainer: checkpoints are staged, checked against the model, marked, then renamed.

    The marker also records what the Trainer's own files do not: the dtype the adapter trains in and TRL's running
    ``num_tokens`` (restored on resume by ``resume_extras``).
    """

    checkpoint_tokenizer = False  # the run's one copy is <run>/tokenizer/ (save_run_tokenizer)
    _live_adapter: dict[str, torch.Tensor] | None = None

    def _gather_for_commit(self) -> None:
        from adapters.training.distributed import live_adapter_tensors

        self._live_adapter = live_adapter_tensors(self)  # a collective under FSDP / ZeRO-3: every rank is here

    def _commit_checkpoint(self, staged: Path, final: Path) -> None:
        from adapters.compat.trl import train_tokens

        live, self._live_adapter = self._live_adapter, None
        info = validate_adapter_dir(staged, reference=live)
        marker = {"step": self.state.global_step, **info, "num_tokens": train_tokens(self)}
        (staged / MARKER).write_text(json.dumps(marker) + "\n")
        promote(staged, final)

    def train(self, resume_from_checkpoint=None, **kwargs):
        if isinstance(resume_from_checkpoint, (str, Path)):
            self.resume_extras(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def resume_extras(self, checkpoint: str | Path) -> None:
        """What the Trainer does not restore from a checkpoint: TRL's running token count (the marker's)."""
        from adapters.compat.trl import restore_train_tokens

        f = Path(checkpoint) / MARKER
        marker = json.loads(f.read_text()) if f.is_file() else {}
        if marker.get("num_tokens") is not None:
            restore_train_tokens(self, marker["num_tokens"])
