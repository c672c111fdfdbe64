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

from adapters.compat.trl import compact_hook_available
from adapters.compat.trl import enable_trained_positions_only as enable_trained_positions_only  # re-export
from adapters.utils.errors import AdaptersError

AUTO = "auto"
SWITCHES = ("padding_free", "use_liger_kernel", "torch_compile")
EXTRA_SWITCHES = ("trained_positions_only",)
# Attention implementations whose masks keep padding-free/packed samples apart. In transformers 5 the causal mask is
# built by masking_utils from position_ids (a restart at 0 starts a new sample) when no 2D attention mask is given,
# and the flash kernels take cu_seq_lens. That holds only without a KV cache: TRL's compute_loss passes
# use_cache=False. flex_attention only on CUDA: it has no backward on CPU. tests/test_data_packing.py checks sdpa
# and eager on a tiny model.
ISOLATING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
CUDA_ONLY_ISOLATING = ("flex_attention",)


def isolates_samples(attn: str | None, cuda: bool | None = None) -> bool:
    """Whether ``attn`` keeps packed / padding-free samples apart here (``cuda``: None = this machine)."""
    if attn not in ISOLATING_ATTENTION:
        return False
    if attn in CUDA_ONLY_ISOLATING:
        return torch.cuda.is_available() if cuda is None else cuda
    return True


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


class FastPathError(AdaptersError, ValueError):
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
    _padding_free(p, settings, attn_implementation or "sdpa", per_device_batch, packing, cuda, padding)
    _liger(p, settings)
    _compile(p, settings)
    if "gradient_checkpointing" in settings or activation_gib is not None:
        _gradient_checkpointing(p, settings, activation_gib, budget_gib)
    _trained_positions_only(p, settings, cuda)
    return p


def _padding_free(
    p: Plan, settings: dict[str, Any], attn: str, per_device_batch: int, packing: bool, cuda: bool, padding
) -> None:
    want = check_switch("padding_free", settings.get("padding_free"))
    isolates = isolates_samples(attn, cuda)
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


def _liger(p: Plan, settings: dict[str, Any]) -> None:
    want = check_switch("use_liger_kernel", settings.get("use_liger_kernel"))
    if want is True and not liger_available():
        raise FastPathError("use_liger_kernel: true, but liger_kernel is not installed or there is no CUDA device")
    if want is AUTO:
        ok = liger_available()
        why = (
            "liger_kernel imports and CUDA is present"
            if ok
            else "liger_kernel not installed or no CUDA (it needs Triton)"
        )
        p.set("use_liger_kernel", ok, why, "auto")
    else:
        p.set("use_liger_kernel", want, "set by the recipe", "recipe")


def _compile(p: Plan, settings: dict[str, Any]) -> None:
    want = check_switch("torch_compile", settings.get("torch_compile"))
    if want is AUTO:
        why = "not measured to pay with PEFT/bitsandbytes here (compile time, graph breaks)"
        p.set("torch_compile", False, why, "auto")
    else:
        p.set("torch_compile", want, "set by the recipe", "recipe")


def _gradient_checkpointing(p: Plan, settings: dict[str, Any], activation_gib, budget_gib) -> None:
    """From the memory plan: off when the activation estimate fits the budget (bench only)."""
    want = check_switch("gradient_checkpointing", settings.get("gradient_checkpointing"))
    if want is not AUTO:
        p.set("gradient_checkpointing", want, "set by the recipe", "recipe")
    elif activation_gib is None or budget_gib is None:
        p.set("gradient_checkpointing", True, "no memory estimate: keep the safe default", "auto")
    else:
        fits = activation_gib <= budget_gib
        why = f"activations ~{activation_gib:.2f} GiB {'fit' if fits else 'exceed'} the budget {budget_gib:.2f} GiB"
        p.set("gradient_checkpointing", not fits, why, "auto")


def _trained_positions_only(p: Plan, settings: dict[str, Any], cuda: bool) -> None:
    """Loss logits at trained positions only (TRL's fused LM head)."""
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
