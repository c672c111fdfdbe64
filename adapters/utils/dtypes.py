"""Dtype names as recipes write them (float32, bfloat16, float16, auto) and the torch dtypes they mean."""

from __future__ import annotations

import torch


def torch_dtype(name: str | None) -> torch.dtype | str:
    if name in (None, "auto"):
        return "auto"
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}") from None
