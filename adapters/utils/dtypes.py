"""Dtype names as recipes write them (float32, bfloat16, float16, auto) and the torch dtypes they mean."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NAMES = ("float32", "bfloat16", "float16")  # each is also the torch attribute's name


def torch_dtype(name: str | None) -> torch.dtype | str:
    if name in (None, "auto"):
        return "auto"
    if name not in NAMES:
        raise ValueError(f"unknown dtype {name!r}")
    import torch  # here, not at import: the planner reads sizes without loading torch

    return getattr(torch, name)


def dtype_bytes(name: str | None, default: int = 4) -> int:
    """Bytes per element of a named dtype; ``default`` for auto or a name this map does not know."""
    return torch_dtype(name).itemsize if name in NAMES else default
