"""bitsandbytes internals this package relies on. Checked against bitsandbytes 0.50.2 (tests/test_compat.py).

- ``Linear4bit.support_avx512bf16_for_cpu``: set from ``has_avx512bf16()`` in ``__init__`` and read by
  ``Linear4bit.forward``; ``keep_cpu_layout_trainable`` turns it off.
"""

from __future__ import annotations


def keep_cpu_layout_trainable(model) -> int:
    """Keep every 4-bit layer of ``model`` in the layout training needs; returns how many layers were switched.

    bitsandbytes on AVX512-BF16 CPUs repacks a 4-bit weight into an inference-only layout at its first eval-mode
    forward without grad (a quantization probe or base scoring does one); training a layer with a bias afterwards
    then fails with an in-place error (Qwen2's q/k/v), and tiny layers cannot be repacked at all. That layout is a
    CPU inference speed-up only, so it is turned off on every layer that has the switch.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n
