"""The keys a recipe passes to the libraries' own config classes, read from those classes.

A recipe key that is a field of the trainer's config (``trl.SFTConfig``, ``trl.DPOConfig``, ``trl.KTOConfig`` or
``trl.experimental.orpo.ORPOConfig``, chosen by the recipe's ``trainer``), ``peft.LoraConfig`` or an argument of
``transformers.BitsAndBytesConfig`` is not redeclared here: its type, default and help come from the library. What
this module adds per library is the table of defaults we choose differently (each with its reason) and the keys the
pipeline sets itself (refused in a recipe).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
import re
import typing
from dataclasses import dataclass
from typing import Any

# Our defaults, where they differ from the library's; (value, why). Everything else is the library's own default.
BNB_DEFAULTS: dict[str, tuple[Any, str]] = {
    "bnb_4bit_quant_type": ("nf4", "NF4 fits normally distributed weights better than fp4 (QLoRA)"),
    "bnb_4bit_use_double_quant": (True, "quantizes the quantization constants too: ~0.4 bit/param less"),
}
LORA_DEFAULTS: dict[str, tuple[Any, str]] = {
    "r": (16, "a common task-adapter rank (QLoRA used 64 on all linear layers; 16 keeps the adapter small)"),
    "lora_alpha": (32, "alpha = 2r: an update scale of 2"),
    "lora_dropout": (0.05, "light regularization: task sets are small"),
    "target_modules": ("all-linear", "adapters on every linear layer train better than on q/v only (QLoRA)"),
}
SFT_DEFAULTS: dict[str, tuple[Any, str]] = {
    "learning_rate": (2e-4, "LoRA tolerates ~10x a full fine-tune's rate"),
    "lr_scheduler_type": ("cosine", "decays smoothly to zero by the last step"),
    "warmup_steps": (0.1, "a float below 1 is a share of the steps: warm up over the first 10%"),
    "num_train_epochs": (1.0, "task sets are small and overfit after one pass; max_steps overrides it"),
    "optim": ("adamw_torch", "the plain AdamW runs on every device (CPU, CUDA, MPS)"),
    "logging_steps": (5, "short runs still log a loss curve"),
    "save_steps": (50, "checkpoints often enough to resume a short run"),
    "save_total_limit": (2, "the latest checkpoint and one before it: bounded disk"),
    "bf16": (False, "TRL turns bf16 on by itself; the recipe's dtype decides precision here"),
    "report_to": ("tensorboard", "a local loss curve in outputs/<run>/tensorboard, no account needed"),
    "disable_tqdm": (False, "transformers hides the bar when its logger is quiet; we quiet it and want the bar"),
    "ddp_timeout": (600, "a collective waits this long (s) for a lost process: 10 min, not torch's 30, ends a run"),
}

# The preference trainers share the SFT defaults that are about the run (schedule, logging, checkpoints, precision),
# not about the loss; their own changes follow.
_RUN_DEFAULTS = {k: SFT_DEFAULTS[k] for k in SFT_DEFAULTS if k != "learning_rate"}


@dataclass(frozen=True)
class OnBase:
    """One of our defaults that depends on how the base is loaded: ``int8`` on an 8-bit (LLM.int8) base, ``other``
    on any other. ``recipe``: a Recipe, or a manifest's config dict."""

    other: Any
    int8: Any

    def resolve(self, recipe: Any = None) -> Any:
        int8 = recipe.get("load_in_8bit") if isinstance(recipe, dict) else getattr(recipe, "load_in_8bit", False)
        return self.int8 if int8 else self.other

    def __str__(self) -> str:
        return f"{self.other} ({self.int8} on an 8-bit base)"


_PRECOMPUTE = (
    OnBase(True, False),
    "the reference is frozen: its log-probs computed once before training save a forward per step. Not on an "
    "8-bit base: LLM.int8 picks its outlier columns from the whole batch, so a pair's log-probs change with the "
    "pairs batched with it (up to 1 nat on the demo) and a precomputed reference no longer equals the policy at "
    "step 0; the reference then runs in the training batch, as TRL's default does",
)
DPO_DEFAULTS: dict[str, tuple[Any, str]] = {
    **_RUN_DEFAULTS,
    "learning_rate": (5e-6, "TRL's docs suggest 5e-6 to 1e-5 for LoRA DPO; 1e-6 is the full fine-tune rate"),
    "precompute_ref_log_probs": _PRECOMPUTE,
}
KTO_DEFAULTS: dict[str, tuple[Any, str]] = {
    **_RUN_DEFAULTS,
    "learning_rate": (5e-6, "as for DPO: LoRA needs more than the full fine-tune rate 1e-6"),
    "precompute_ref_log_probs": _PRECOMPUTE,
}
ORPO_DEFAULTS: dict[str, tuple[Any, str]] = {
    **_RUN_DEFAULTS,
    "learning_rate": (5e-6, "ORPO trains from the base with no reference; TRL's example rate for LoRA"),
}

# Keys the pipeline sets (or that it cannot honour); a recipe may not give them. Names a library lacks are ignored.
BNB_PIPELINE: frozenset[str] = frozenset()
LORA_PIPELINE = frozenset(
    {"task_type", "peft_type", "base_model_name_or_path", "inference_mode", "auto_mapping", "peft_version", "revision"}
)
SFT_PIPELINE = frozenset(
    {
        "output_dir",  # outputs/<run>/checkpoints
        "logging_dir",
        "dataset_kwargs",  # we tokenize and mask by position ourselves
        "resume_from_checkpoint",  # adapters train --resume
        "push_to_hub",  # adapters push
        "hub_token",
        "use_cpu",  # follows the device
        "dataloader_pin_memory",  # follows the device
        "save_strategy",  # "steps": resume and early stopping restore checkpoints
        "data_seed",  # the recipe's seed
        "activation_checkpointing",  # set up on the base by attach_lora (gradient_checkpointing)
    }
)

PREFERENCE_PIPELINE = (SFT_PIPELINE - {"dataset_kwargs"}) | {
    "sync_ref_model",  # the reference is frozen (a PEFT model cannot sync it)
    "ref_model_sync_steps",
    "ref_model_mixup_alpha",
    "is_encoder_decoder",  # ORPO: decided by the model
}


@dataclass(frozen=True)
class LibraryKey:
    """One key of a library config class, as the library declares it."""

    name: str
    type: Any
    default: Any
    doc: str


@dataclass(frozen=True)
class Library:
    """A library config class whose keys a recipe may set; ``section`` names the Recipe dict that holds them."""

    section: str
    path: str  # module:Class
    ours: dict[str, tuple[Any, str]]
    pipeline: frozenset[str]

    @property
    def name(self) -> str:
        return self.path.replace(":", ".")

    def cls(self) -> type:
        module, _, cls = self.path.partition(":")
        if module.startswith("trl.experimental"):
            os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        return getattr(importlib.import_module(module), cls)

    def keys(self) -> dict[str, LibraryKey]:
        """Every key the class accepts (pipeline keys included), with its type, library default and help."""
        return _library_keys(self.path)

    def default(self, name: str, recipe: Any = None) -> Any:
        """Our default where we chose one (resolved for ``recipe`` where it depends on the base), else the
        library's."""
        if name in self.ours:
            value = self.ours[name][0]
            return value.resolve(recipe) if isinstance(value, OnBase) else value
        return self.keys()[name].default


# The training section's config class follows the recipe's ``trainer`` key.
TRAINERS: dict[str, Library] = {
    "sft": Library("training", "trl:SFTConfig", SFT_DEFAULTS, SFT_PIPELINE),
    "dpo": Library("training", "trl:DPOConfig", DPO_DEFAULTS, PREFERENCE_PIPELINE),
    "orpo": Library("training", "trl.experimental.orpo:ORPOConfig", ORPO_DEFAULTS, PREFERENCE_PIPELINE),
    "kto": Library("training", "trl:KTOConfig", KTO_DEFAULTS, PREFERENCE_PIPELINE),
}
DEFAULT_TRAINER = "sft"
PREFERENCE_TRAINERS = ("dpo", "orpo", "kto")

LIBRARIES: tuple[Library, ...] = (
    Library("quantization", "transformers:BitsAndBytesConfig", BNB_DEFAULTS, BNB_PIPELINE),
    Library("lora", "peft:LoraConfig", LORA_DEFAULTS, LORA_PIPELINE),
    TRAINERS[DEFAULT_TRAINER],
)
SECTIONS = tuple(lib.section for lib in LIBRARIES)
BY_SECTION = {lib.section: lib for lib in LIBRARIES}


def trainer_name(trainer: str | None) -> str:
    return DEFAULT_TRAINER if trainer is None else trainer


def libraries_for(trainer: str | None = None) -> tuple[Library, ...]:
    """The config classes of a recipe with this trainer: quantization, LoRA, and the trainer's own config."""
    lib = TRAINERS.get(trainer_name(trainer))
    return LIBRARIES if lib is None else (*LIBRARIES[:-1], lib)


def section_library(section: str, trainer: str | None = None) -> Library:
    return next(lib for lib in libraries_for(trainer) if lib.section == section)


def library_of(name: str, own: typing.Container[str] = (), trainer: str | None = None) -> Library | None:
    """The library whose config class owns ``name`` (our own keys win) for a recipe with this ``trainer``, or None.
    Checks our tables first, so the common keys resolve without importing the libraries."""
    if name in own or name.startswith("_"):
        return None
    libs = libraries_for(trainer)
    for lib in libs:
        if name in lib.ours:
            return lib
    for lib in libs:
        if name in lib.keys():
            return lib
    return None


def other_trainers(name: str, trainer: str | None = None) -> list[str]:
    """The trainers (other than this one) whose config owns ``name``: a key given to the wrong trainer."""
    mine = trainer_name(trainer)
    return [t for t, lib in TRAINERS.items() if t != mine and name in lib.keys() and name not in lib.pipeline]


def library_default(name: str, trainer: str | None = None) -> Any:
    lib = library_of(name, trainer=trainer)
    if lib is None:
        raise KeyError(name)
    return lib.default(name)


# ---------------------------------------------------------------------------------------------------- introspection
def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


@functools.cache
def _library_keys(path: str) -> dict[str, LibraryKey]:
    module, _, name = path.partition(":")
    if module.startswith("trl.experimental"):
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO lives there; importing it warns otherwise
    cls = getattr(importlib.import_module(module), name)
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    fields = {f.name for f in dataclasses.fields(cls) if f.init} if dataclasses.is_dataclass(cls) else set()
    if fields and fields == {p.name for p in params[1:]}:  # SFTConfig, LoraConfig: typed fields, metadata["help"]
        hints = typing.get_type_hints(cls)
        return {
            f.name: LibraryKey(f.name, hints.get(f.name, Any), _default(f), one_line(f.metadata.get("help", "")))
            for f in dataclasses.fields(cls)
            if f.init
        }
    # BitsAndBytesConfig: its own __init__ without annotations; the type follows the default, help the docstring
    hints = typing.get_type_hints(cls.__init__)
    docs = docstring_args(cls.__doc__ or "")
    out = {}
    for p in params[1:]:
        tp = hints.get(p.name) or (type(p.default) if isinstance(p.default, (bool, int, float, str)) else Any)
        out[p.name] = LibraryKey(p.name, tp, p.default, docs.get(p.name, ("", ""))[1])
    return out


def docstring_args(doc: str) -> dict[str, tuple[str, str]]:
    """``name (`type`, *optional*, defaults to ...):`` entries of a Google-style ``Args:`` block -> (type, help)."""
    out: dict[str, tuple[str, str]] = {}
    body = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    entry = re.compile(r"^\s{4,8}(\w+) \((.*)\):\s*$")
    name, kind, lines = None, "", []
    for line in body.splitlines() + ["    end ():"]:
        m = entry.match(line)
        if m:
            if name:
                out[name] = (plain(kind.split(",")[0]), one_line(" ".join(lines)))
            name, kind, lines = m.group(1), m.group(2), []
        elif name:
            lines.append(line.strip())
    return out


def plain(text: str) -> str:
    """Help text without reStructuredText/Markdown markup."""
    text = re.sub(r"\[`~?([^\]`]+)`\]", r"\1", text)  # [`Trainer`] links
    text = re.sub(r"<a href=['\"]?([^'\" >]+)['\"]?>(.*?)</a>", r"\2 (\1)", text)
    text = re.sub(r"</?(?:a|b|i|br|code|em|strong|p)\b[^>]*>", "", text)
    return text.replace("`", "").replace("*", "").strip()


def one_line(text: str) -> str:
    """The first sentence of a help text, markup removed."""
    text = " ".join(plain(text).split())
    m = re.search(r"(?<!\be\.g)(?<!\bi\.e)(?<!\betc)(?<!\bvs)(?<=[a-z0-9)\]])\.\s", text)
    return text[: m.start() + 1] if m else text
