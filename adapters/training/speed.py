"""The optimized training path: switches chosen from the hardware and the recipe, each one overridable.

Every switch is a recipe key whose value is ``auto`` (decide here), ``true`` or ``false`` (the recipe decides).
``plan(...)`` returns the decision with the reason for each, so the run manifest can say what ran and why.
Only the libraries' documented hooks are used:

- ``padding_free``: TRL's ``padding_free=True`` collator flattens a batch into one row with per-sample
  ``position_ids``; transformers 5 builds a block-diagonal causal mask from them (``masking_utils``), so attention
  never crosses samples. TRL needs ``max_length=None`` then: our data is already cut to ``max_length`` upstream.
- ``use_liger_kernel``: TRL's Liger switch (RMSNorm, RoPE, SwiGLU kernels); only where ``liger_kernel`` imports
  and CUDA is present (it needs Triton).
- ``torch_compile``: TRL/Trainer's ``torch_compile``; ``auto`` leaves it off (not measured to pay with PEFT).
- ``gradient_checkpointing`` (bench only; training keeps the recipe's boolean): off when the activation estimate fits
  the memory budget, else on.
- ``trained_positions_only``: TRL 1.16's fused LM head projects only the labelled positions on Triton devices
  (CUDA/XPU) and every position elsewhere; ``auto`` turns the labelled-only path on for CPU/MPS too
  (``enable_trained_positions_only``), where the 262k-vocabulary head of Gemma is most of the step.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

import torch

AUTO = "auto"
SWITCHES = ("padding_free", "use_liger_kernel", "torch_compile")
EXTRA_SWITCHES = ("trained_positions_only",)
# transformers 5 builds the per-sample mask from position_ids for these (masking_utils / varlen flash kernels)
ISOLATING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


MIN_PADDING = 0.1  # padding-free pays once batches would be at least this much padding


def padding_share(lengths: list[int], batch: int, trials: int = 64, seed: int = 0) -> float:
    """Expected share of padded positions when ``batch`` random samples are padded to the longest one."""
    if batch < 2 or len(lengths) < 2:
        return 0.0
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(lengths, dtype=torch.float64)
    pad = real = 0.0
    for _ in range(trials):
        b = t[torch.randperm(len(t), generator=g)[:batch]]
        real += float(b.sum())
        pad += float(b.max() * len(b) - b.sum())
    return pad / (pad + real)


class FastPathError(ValueError):
    """A switch was asked for where it cannot work; the message names the key."""


def check_switch(name: str, value: Any) -> Any:
    """``auto``, ``true`` or ``false`` (YAML booleans or their strings); anything else is an error naming the key."""
    if value is None or value == AUTO:
        return AUTO
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.lower() in ("true", "yes", "on", "1")
    raise FastPathError(f"{name}: expected auto, true or false, got {value!r}")


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


@dataclass
class Plan:
    """The decided switches; ``report()`` goes into the manifest."""

    values: dict[str, Any] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def set(self, name: str, value: Any, why: str, source: str) -> None:
        self.values[name], self.why[name], self.source[name] = value, why, source

    def sft_kwargs(self) -> dict[str, Any]:
        """SFTConfig fields for the switches TRL implements."""
        # With padding_free TRL also wants max_length=None (inputs are pre-cut upstream): the caller sets that.
        return {k: self.values[k] for k in SWITCHES if k in self.values}

    def report(self) -> dict[str, Any]:
        return {k: {"value": v, "source": self.source[k], "why": self.why[k]} for k, v in self.values.items()}


def plan(
    settings: dict[str, Any],
    *,
    attn_implementation: str | None,
    per_device_batch: int,
    packing: bool = False,
    cuda: bool | None = None,
    activation_gib: float | None = None,
    budget_gib: float | None = None,
    padding: float | None = None,
) -> Plan:
    """Decide each switch. ``settings`` maps switch names to auto/true/false (missing = auto).

    ``activation_gib``/``budget_gib`` feed the gradient-checkpointing decision (only decided when both are given).
    ``padding`` is the expected share of padded positions in a batch (``padding_share``); None means unknown.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    p = Plan()
    attn = attn_implementation or "sdpa"

    # ---- padding-free batching
    want = check_switch("padding_free", settings.get("padding_free"))
    isolates = attn in ISOLATING_ATTENTION and not (attn == "flex_attention" and not cuda)
    if want is True:
        if packing:
            raise FastPathError(
                "padding_free: true together with packing: TRL's bfd packing is already padding-free; set one of them"
            )
        if not isolates:
            raise FastPathError(
                f"padding_free: true needs an attention that keeps samples apart "
                f"({', '.join(ISOLATING_ATTENTION)}; flex_attention only on CUDA), got {attn!r}"
            )
        p.set("padding_free", True, f"set by the recipe; {attn} builds the per-sample mask from position_ids", "recipe")
    elif want is False:
        p.set("padding_free", False, "set by the recipe", "recipe")
    elif packing:
        p.set("padding_free", False, "packing is on (TRL's bfd packing is padding-free itself)", "auto")
    elif not isolates:
        p.set("padding_free", False, f"{attn} is not known to keep packed samples apart", "auto")
    elif per_device_batch < 2:
        p.set("padding_free", False, "per-device batch 1 has no padding to remove", "auto")
    elif padding is not None and padding < MIN_PADDING:
        # measured on CPU/SDPA: with equal lengths the flattened row's block mask costs more than it saves
        p.set("padding_free", False, f"batches are only {padding:.0%} padding (< {MIN_PADDING:.0%})", "auto")
    else:
        share = "" if padding is None else f"batches would be {padding:.0%} padding; "
        p.set("padding_free", True, f"{share}{attn} masks samples apart via position_ids", "auto")

    # ---- Liger kernels
    want = check_switch("use_liger_kernel", settings.get("use_liger_kernel"))
    if want is True and not liger_available():
        raise FastPathError("use_liger_kernel: true, but liger_kernel is not installed or there is no CUDA device")
    if want is AUTO:
        ok = liger_available()
        p.set(
            "use_liger_kernel",
            ok,
            "liger_kernel imports and CUDA is present"
            if ok
            else "liger_kernel not installed or no CUDA (it needs Triton)",
            "auto",
        )
    else:
        p.set("use_liger_kernel", want, "set by the recipe", "recipe")

    # ---- torch.compile
    want = check_switch("torch_compile", settings.get("torch_compile"))
    if want is AUTO:
        p.set(
            "torch_compile",
            False,
            "not measured to pay with PEFT/bitsandbytes here (compile time, graph breaks)",
            "auto",
        )
    else:
        p.set("torch_compile", want, "set by the recipe", "recipe")

    # ---- gradient checkpointing from the memory plan
    if "gradient_checkpointing" in settings or activation_gib is not None:
        want = check_switch("gradient_checkpointing", settings.get("gradient_checkpointing"))
        if want is not AUTO:
            p.set("gradient_checkpointing", want, "set by the recipe", "recipe")
        elif activation_gib is None or budget_gib is None:
            p.set("gradient_checkpointing", True, "no memory estimate: keep the safe default", "auto")
        else:
            fits = activation_gib <= budget_gib
            p.set(
                "gradient_checkpointing",
                not fits,
                f"activations ~{activation_gib:.2f} GiB {'fit' if fits else 'exceed'} the budget {budget_gib:.2f} GiB",
                "auto",
            )

    # ---- loss logits at trained positions only (TRL's fused LM head)
    want = check_switch("trained_positions_only", settings.get("trained_positions_only"))
    tri = triton_available() if cuda else False
    if tri:
        p.set("trained_positions_only", True, "TRL's fused LM head projects only labelled positions on Triton", "trl")
    elif want is False:
        p.set("trained_positions_only", False, "set by the recipe: TRL scores every position off Triton", "recipe")
    elif not compact_hook_available():
        if want is True:
            raise FastPathError("trained_positions_only: true, but this TRL has no fused-LM-head compact switch")
        p.set("trained_positions_only", False, "this TRL has no compact switch: every position is scored", "auto")
    else:
        p.set(
            "trained_positions_only",
            True,
            "only labelled positions go through the LM head (TRL's Triton-device path, run in eager torch here); "
            "prompt positions carry no loss, and the LM head is most of a small model's FLOPs",
            "recipe" if want is True else "auto",
        )
    return p


def compact_hook_available() -> bool:
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


def activation_estimate_gib(config, tokens_per_micro_batch: int, bytes_per_el: int) -> float:
    """Rough activation memory kept for backward without checkpointing, per micro-batch.

    Per token and layer a Llama-style block keeps about 10 hidden-size tensors (norms, q/k/v/o inputs and outputs,
    residuals) and 4 intermediate-size tensors (gate, up, act, product); attention itself is O(seq) with SDPA.
    """
    h = config.hidden_size
    ffn = getattr(config, "intermediate_size", 4 * h)
    per_token_layer = bytes_per_el * (10 * h + 4 * ffn)
    return per_token_layer * config.num_hidden_layers * tokens_per_micro_batch / 2**30


def memory_budget_gib(fraction: float = 0.85) -> float:
    """What activations may take: a fraction of the GPU's memory, or of the host's available RAM on CPU."""
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return fraction * free / 2**30
    try:
        import psutil

        return fraction * psutil.virtual_memory().available / 2**30
    except ImportError:  # pragma: no cover
        return 4.0


def for_recipe(recipe, train_ds=None, packing: bool | None = None) -> Plan:
    """The plan for a training recipe (adapters.training.trainer.build_trainer); ``train_ds`` gives the length
    profile, ``packing`` the packing decision (data.pipeline.packing_guard; None: the recipe's packing key)."""
    settings = {k: getattr(recipe, k, AUTO) for k in SWITCHES + EXTRA_SWITCHES}
    padding = None
    if train_ds is not None and "input_ids" in train_ds.column_names:
        padding = padding_share([len(x) for x in train_ds["input_ids"]], recipe.per_device_train_batch_size)
    return plan(
        settings,
        attn_implementation=recipe.attn_implementation,
        per_device_batch=recipe.per_device_train_batch_size,
        packing=bool(recipe.packing if packing is None else packing),
        padding=padding,
    )
