"""TRL internals this package relies on. Checked against trl 1.16.0 (tests/test_compat.py fails when they change).

- ``trl.trainer.utils._use_triton``: the fused LM head's "score only the labelled positions" decision, widened to
  eager CPU/MPS by ``enable_trained_positions_only``.
- ``SFTTrainer._metrics``: the per-mode lists ``SFTTrainer.log`` averages into each log line; ``log_metric``
  appends to it.
- ``SFTTrainer._total_train_tokens``: the running count logged as ``num_tokens``, set to 0 in ``__init__`` and kept
  in no checkpoint file; ``train_tokens`` / ``restore_train_tokens`` read it for the checkpoint marker and put it
  back on resume.
"""

from __future__ import annotations

from contextlib import contextmanager


def compact_hook_available() -> bool:
    """Whether this TRL has the module-level ``_use_triton`` switch that ``enable_trained_positions_only`` widens."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:  # pragma: no cover
        return False
    return callable(getattr(trl_utils, "_use_triton", None))


def enable_trained_positions_only(on: bool = True) -> None:
    """Let TRL's fused LM head keep only the labelled positions on CPU/MPS as it does on Triton devices.

    TRL 1.16 (``trl.trainer.utils``, fused LM head) decides with ``_use_triton(device)`` whether to gather the
    positions that carry a label before the vocabulary projection; off Triton it projects every position to keep
    tile shapes fixed for compiled backends (Neuron). Eager CPU/MPS has no such constraint, so we widen that
    decision there; the kernel choice (``trl.kernels.chunked_logprob._use_triton``) is untouched, so the torch
    tiles still run. Same loss and gradients (tested), a fraction of the LM-head work. ``on=False`` restores TRL's.
    """
    import torch
    from trl.trainer import utils as trl_utils

    current = trl_utils._use_triton
    orig = getattr(current, "_adapters_orig", current)
    if not on:
        trl_utils._use_triton = orig
        return
    if current is not orig:
        return

    def use_compact(device: torch.device) -> bool:
        return device.type in ("cpu", "mps") or orig(device)

    use_compact._adapters_orig = orig  # type: ignore[attr-defined]
    trl_utils._use_triton = use_compact


@contextmanager
def trained_positions_only(on: bool):
    """``enable_trained_positions_only`` for the duration of a block only; TRL's own decision is back afterwards, so
    a run leaves no changed module state behind it."""
    if not on:
        yield
        return
    from trl.trainer import utils as trl_utils

    before = trl_utils._use_triton
    enable_trained_positions_only(True)
    try:
        yield
    finally:
        trl_utils._use_triton = before


def log_metric(trainer, name: str, value: float, mode: str = "train") -> None:
    """Add one value to the metric ``name`` that SFTTrainer averages into its next log line (as it does for
    ``entropy`` and ``mean_token_accuracy``)."""
    trainer._metrics[mode][name].append(value)


def train_tokens(trainer) -> int | None:
    """TRL's running ``num_tokens`` (None for a trainer that keeps none)."""
    n = getattr(trainer, "_total_train_tokens", None)
    return None if n is None else int(n)


def restore_train_tokens(trainer, n: int) -> None:
    """Continue ``num_tokens`` from a checkpoint's count instead of 0."""
    trainer._total_train_tokens = int(n)
