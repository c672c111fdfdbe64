"""The recipe schema: our own keys in sections, composed into one flat ``Recipe`` with the libraries' keys.

Our keys live in the section dataclasses below (a docstring under each key is its help). Keys of
``transformers.BitsAndBytesConfig``, ``peft.LoraConfig`` and ``trl.SFTConfig`` are not redeclared: a recipe's value
for one is kept in ``recipe.quantization``, ``recipe.lora`` or ``recipe.training`` (the keys given), and reading
``recipe.learning_rate`` gives the value given, else our default (adapters/config/libraries.py), else the library's.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from adapters.config import libraries
from adapters.utils.errors import AdaptersError


class RecipeError(AdaptersError, ValueError):
    """A recipe file or an override is invalid. The message names the source and the key."""


@dataclass
class RunKeys:
    run_name: str | None = None
    """Name of outputs/<run_name>/: one folder name of letters, digits, '.', '_' and '-'.
    Default: <recipe>-<YYYYmmdd-HHMMSS>."""
    output_root: str = "outputs"
    """Directory that holds the run directories (the one key that chooses where a run is written)."""
    seed: int = 42
    """Seed for Python, NumPy, torch and the data order."""


@dataclass
class ModelKeys:
    model_name_or_path: str = "embedded:gemma-3-270m"
    """Hub id, local directory, a .gguf file, or 'embedded:gemma-3-270m' (the offline default)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when model_name_or_path is a hub id."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model repository (transformers' trust_remote_code)."""
    dtype: str = "float32"
    """Dtype of the weights that stay unquantized, and of LoRA compute: float32, bfloat16, float16 or auto."""
    adapter_dtype: str = "auto"
    """Dtype the LoRA weights train in and are stored in (checkpoints and adapter, resumed or not): float32,
    bfloat16, float16, or auto (the recipe's dtype; float32 when that is auto)."""
    init_adapter: str | None = None
    """Continue training an existing adapter instead of a new LoRA: a run directory, an adapter folder or a hub id
    ORG/NAME. Its base must be this recipe's (fingerprint) and its LoRA config the recipe's (r, alpha, targets)."""
    attn_implementation: str | None = "sdpa"
    """Attention kernel: sdpa, eager, flex_attention, … (None lets transformers choose)."""
    chat_template: str | None = None
    """None: the tokenizer's own template, else a built-in name (e.g. 'gemma') or a path to a .jinja file.
    Models that ship no template fall back to the built-in one for their family."""
    template: str = "auto"
    """How rows become text: chat (the chat template above), raw (prompt + completion as plain text, EOS trained,
    loss on the completion only: what TRL does with non-conversational prompt/completion rows) or auto: raw for
    plain string prompt/completion rows on a model whose tokenizer has no chat
    template of its own, chat otherwise. The manifest's config.template holds the resolved chat or raw."""
    device_map: str | None = None
    """None: one whole model per process, on the local rank's GPU (the only valid choice under several processes).
    'auto': spread one model over every visible GPU (single process only; adapters plan refuses it otherwise)."""


@dataclass
class QuantizationKeys:
    quant_probe: bool = True
    """Before training, report the probe loss of the full-precision and of the quantized model side by side."""


@dataclass
class DataKeys:
    train_file: str = "data/demo/train.jsonl"
    """Training split (JSONL, JSON, CSV or Parquet)."""
    eval_file: str | None = "data/demo/val.jsonl"
    """Validation split (loss during training)."""
    test_file: str | None = "data/demo/test.jsonl"
    """Held-out split scored by exact match for the base and the tuned model."""
    max_length: int = 512
    """Longest tokenized example; rows whose answer would be cut are dropped and reported, never truncated."""
    data_format: str | None = None
    """chat, prompt_completion, alpaca or text; None detects chat/prompt_completion/alpaca per row (text is never
    guessed: it trains on every token)."""
    data_columns: dict[str, str] | None = None
    """Rename source columns to the format's names, e.g. {prompt: question, completion: answer}."""
    data_split: str | None = None
    """Split of a dataset read through datasets.load_dataset: a hub dataset id given as train_file/eval_file/
    test_file (default 'train'), or a local dataset folder, which setting this key sends through load_dataset."""
    data_subset: str | None = None
    """Subset (configuration name) of such a dataset, load_dataset's ``name``."""
    skip_invalid: bool = False
    """Invalid rows go to a quarantine file (count reported) instead of stopping the run."""
    quarantine_file: str | None = None
    """Where skipped rows go; default <run_dir>/quarantine.jsonl."""
    dedup: bool = True
    """Drop exact and near-exact (whitespace/case) duplicate training rows."""
    min_answer_chars: int = 1
    """Drop rows whose answer is shorter (characters, before tokenization)."""
    max_answer_chars: int | None = None
    """Drop rows whose answer is longer (characters, before tokenization)."""
    max_prompt_chars: int | None = None
    """Length filters in characters, applied before tokenization (each step's count is reported)."""
    val_split: float = 0.0
    """Fraction of the training rows held out for validation (by seed) when eval_file is null."""
    data_mix: dict[str, float] | None = None
    """Extra training sources with weights, e.g. {data/a.jsonl: 1.0, data/b.parquet: 0.5}; a weight is a sampling
    multiplier (2.0 = every row twice, 0.5 = a seeded half). train_file keeps weight 1 unless listed."""
    augment_prompt_templates: list[str] | None = None
    """Opt-in: one variant of each single-turn training row per template, e.g. ['{prompt}', 'Q: {prompt}']."""
    general_data_file: str | None = None
    """General text rows mixed into training (see general_data_share)."""
    general_data_share: float = 0.0
    """Opt-in: share of the final training rows drawn from general_data_file, to limit forgetting."""
    audit_max_dropped_share: float = 0.1
    """Stop before training when more than this share of training rows is dropped (answer cut, nothing trained)."""
    audit_min_trained_share: float = 0.01
    """Stop when fewer than this share of training tokens carry a label."""
    audit_require_eos: bool = True
    """Stop unless every kept row trains the EOS/end-of-turn token that closes its answer."""
    length_bias_threshold: float = 0.2
    """Preference data: flag length bias when the mean chosen answer is longer (or shorter) than the mean rejected
    one by more than this share (0.2 = 20%); DPO then learns length."""
    streaming: bool = False
    """Read, validate and encode train_file as training asks for rows (a datasets.IterableDataset), for sets that do
    not fit on disk: no encoded cache, no dedup/filters/split/mix/augmentation (they need every row), max_steps
    required; the audit covers the first streaming_audit_rows rows only (docs/data.md)."""
    streaming_audit_rows: int = 1000
    """With streaming: how many leading training rows are encoded and audited (thresholds checked) before the model
    loads; later rows are validated as they stream, never audited."""


@dataclass
class TrainingKeys:
    trainer: str = "sft"
    """sft, dpo, orpo or kto: TRL's SFTTrainer on answers, or a preference trainer on pairs (DPO, ORPO) or on
    labelled answers (KTO). The trainer's config class (SFTConfig, DPOConfig, ORPOConfig, KTOConfig) owns the
    training keys; docs/preference.md."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward: set up on the base with LoRA (and the k-bit preparation), so the Trainer
    is told not to wrap the model again."""
    base_kl_weight: float = 0.0
    """Learning without Forgetting (adapters/training/forgetting_guard.py): add this times KL(base || tuned) at
    sampled positions that carry no label (prompt, template) to the training loss; the answers may change, the rest
    stays the base's. 0 turns it off. Costs one no-grad base forward per step."""
    base_kl_positions: int = 16
    """Unlabelled positions sampled per sequence for base_kl_weight (0 = all of them)."""
    base_kl_every: int = 1
    """Apply the base_kl_weight term on every k-th optimizer step only, weighted by k (same expected pull, 1/k of
    its cost)."""
    base_kl_source: str = "auto"
    """Where base_kl_weight's positions come from: general (built-in general text appended to each guarded
    micro-batch, adapters/training/forgetting_guard.py), rows (the training rows' unlabelled positions), a path
    to a text file of passages separated by blank lines, or auto: rows when at least 10% of the training tokens are
    trained, general below that (short answers); the manifest records the choice."""
    save_on_interrupt: bool = True
    """On Ctrl-C or SIGTERM, finish the current step and save a checkpoint before stopping, so --resume continues
    from there."""
    sweep: dict[str, Any] = field(default_factory=dict)
    """Search space of adapters sweep: key: [low, high] (a range) or [a, b, c] (choices); see training/sweep.py."""


@dataclass
class EvaluationKeys:
    eval_base: bool = True
    """Score the base model (the tuned model with its adapter disabled) on the test split, for before/after."""
    eval_max_new_tokens: int | None = None
    """Generation budget; default: the longest test answer in tokens plus a margin."""
    eval_generation_batch_size: int = 20
    """Rows generated at once when scoring the test split."""
    eval_after_train: bool = True
    """At the end of train, run adapters eval: task metrics, forgetting probe, flags, report.md."""
    eval_limit: int | None = None
    """Score at most this many held-out rows (None: all of them)."""
    labels: list[str] | None = None
    """Label set of a classification task: adds accuracy, per-class precision/recall/F1, macro-F1, confusion matrix."""
    rouge_l: bool = False
    """Also report ROUGE-L F1 (longest common subsequence of words) for free-text answers."""
    eval_samples: int = 5
    """Rows shown in report.md's sample table (prompt, expected, base, tuned)."""
    forgetting_probe: str | None = None
    """Text file for the forgetting probe (passages separated by blank lines); None: Python stdlib docstrings."""
    forgetting_probe_tokens: int = 2048
    """Token budget of the forgetting probe (each passage is cut to max_length tokens)."""
    forgetting_threshold: float = 0.05
    """Warn (flag 'forgetting') when the probe perplexity rises by more than this fraction (0.05 = 5%)."""
    overfit_window: int = 3
    """K: flag overfitting when validation loss rose over the last K evaluations while training loss fell."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improvement of metric_for_best_model (default eval_loss) and
    restore the best checkpoint (sets load_best_model_at_end)."""
    early_stopping_threshold: float = 0.0
    """Smallest change of the metric that counts as an improvement for early stopping."""


@dataclass
class SpeedKeys:
    """Switches decided per run (adapters/training/speed.py); the decided value is what SFTConfig gets."""

    padding_free: bool | str = "auto"
    """auto, true or false. Flatten each batch into one row with per-sample position ids (no padding computed);
    auto turns it on where the attention keeps samples apart (sdpa, eager, flash; flex on CUDA) and batch > 1."""
    use_liger_kernel: bool | str = "auto"
    """auto, true or false. Liger's RMSNorm/RoPE/SwiGLU kernels through TRL; auto: on where liger_kernel and CUDA exist."""
    trained_positions_only: bool | str = "auto"
    """auto, true or false. Send only labelled positions through the LM head (TRL does this on Triton devices; auto
    turns it on for CPU/MPS too). Same loss and gradients; prompt positions cost no vocabulary projection."""
    torch_compile: bool | str = "auto"
    """auto, true or false. torch.compile the model through the Trainer; auto leaves it off (not measured to pay)."""


# Our sections in the order help lists them; the libraries' keys follow in libraries.LIBRARIES.
SECTIONS: tuple[tuple[str, type], ...] = (
    ("run", RunKeys),
    ("model", ModelKeys),
    ("quantization", QuantizationKeys),
    ("data", DataKeys),
    ("training", TrainingKeys),
    ("evaluation", EvaluationKeys),
    ("speed", SpeedKeys),
)


@dataclass  # bases in reverse: dataclass fields follow the reversed MRO, so the run keys come first
class _RecipeFields(SpeedKeys, EvaluationKeys, TrainingKeys, DataKeys, QuantizationKeys, ModelKeys, RunKeys):
    quantization: dict[str, Any] = field(default_factory=dict)
    """transformers.BitsAndBytesConfig keys the recipe gives."""
    lora: dict[str, Any] = field(default_factory=dict)
    """peft.LoraConfig keys the recipe gives."""
    training: dict[str, Any] = field(default_factory=dict)
    """Keys of the trainer's config class (trl.SFTConfig, DPOConfig, ORPOConfig or KTOConfig) the recipe gives."""


def own_keys() -> dict[str, dataclasses.Field]:
    """Our keys (every section), without the per-library dicts."""
    return {f.name: f for f in dataclasses.fields(_RecipeFields) if f.name not in libraries.SECTIONS}


class Recipe(_RecipeFields):
    """One flat recipe: ``Recipe(learning_rate=1e-4, r=8, max_length=256)``; ``dataclasses.replace`` works alike.

    A library key given as a keyword goes to that library's dict (on top of a dict given as well); reading or
    setting ``recipe.<library key>`` goes through the same dict.
    """

    def __init__(self, **values: Any) -> None:
        own = own_keys()
        trainer = values.get("trainer")
        if trainer is not None and trainer not in libraries.TRAINERS:
            raise RecipeError(f"trainer: expected one of {', '.join(libraries.TRAINERS)}, got {trainer!r}")
        given: dict[str, dict[str, Any]] = {s: dict(values.pop(s, None) or {}) for s in libraries.SECTIONS}
        for key in [k for k in values if k not in own]:
            given[_library_section(key, own, trainer)][key] = values.pop(key)
        super().__init__(**values, **given)
        self.__post_init__()  # the generated __init__ of _RecipeFields does not know this subclass's hook

    def __post_init__(self) -> None:
        check_run_name(self.run_name)
        if self.template not in ("chat", "raw", "auto"):
            raise RecipeError(f"template: expected chat, raw or auto, got {self.template!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise RecipeError("load_in_4bit and load_in_8bit are exclusive: choose one")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise RecipeError(f"bnb_4bit_quant_type: expected 'nf4' or 'fp4', got {self.bnb_4bit_quant_type!r}")
        if self.r <= 0:
            raise RecipeError(f"r: must be a positive integer, got {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise RecipeError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if self.learning_rate <= 0:
            raise RecipeError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if self.base_kl_weight < 0:
            raise RecipeError(f"base_kl_weight: must be >= 0, got {self.base_kl_weight}")
        if self.base_kl_weight and self.trainer in libraries.PREFERENCE_TRAINERS and self.base_kl_source == "rows":
            raise RecipeError(
                f"base_kl_source: rows holds the rows' unlabelled positions, which trainer {self.trainer} does not "
                "have; use general (or auto, the same here) or a file of passages"
            )
        if self.base_kl_positions < 0:
            raise RecipeError(f"base_kl_positions: must be >= 0 (0 = all), got {self.base_kl_positions}")
        if self.base_kl_source not in ("auto", "general", "rows") and not self.base_kl_source.endswith((".txt", ".md")):
            raise RecipeError(
                "base_kl_source: expected auto, general, rows or a .txt/.md file of passages, "
                f"got {self.base_kl_source!r}"
            )
        if self.base_kl_every < 1:
            raise RecipeError(f"base_kl_every: must be >= 1, got {self.base_kl_every}")
        if self.bf16 and self.fp16:
            raise RecipeError("bf16 and fp16 are exclusive")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise RecipeError(f"dtype: expected float32, bfloat16, float16 or auto, got {self.dtype!r}")
        if self.adapter_dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise RecipeError(f"adapter_dtype: expected float32, bfloat16, float16 or auto, got {self.adapter_dtype!r}")
        if self.max_length <= 0:
            raise RecipeError(f"max_length: must be > 0, got {self.max_length}")
        if self.streaming_audit_rows <= 0:
            raise RecipeError(f"streaming_audit_rows: must be > 0, got {self.streaming_audit_rows}")
        check_counts(self)
        from adapters.training.speed import EXTRA_SWITCHES, SWITCHES, FastPathError, check_switch

        for name in SWITCHES + EXTRA_SWITCHES:
            try:
                setattr(self, name, check_switch(name, getattr(self, name)))
            except FastPathError as e:
                raise RecipeError(str(e)) from None

    # ------------------------------------------------------------------ the libraries' keys, read and set flat
    def __getattr__(self, name: str) -> Any:  # only called when normal lookup fails: not one of our fields
        lib = None if name.startswith("_") else libraries.library_of(name, trainer=self.__dict__.get("trainer"))
        if lib is None and not name.startswith("_") and libraries.library_of(name) is not None:
            # an SFT-only key read by shared pipeline code on a preference recipe: SFT's default (a recipe can
            # never set it, see _library_section), e.g. packing False
            return copy.deepcopy(libraries.library_of(name).default(name))
        if lib is None:
            raise AttributeError(f"{type(self).__name__!r} has no key {name!r}")
        given = self.__dict__.get(lib.section) or {}
        return given[name] if name in given else copy.deepcopy(lib.default(name, self))  # defaults are shared

    def __setattr__(self, name: str, value: Any) -> None:
        lib = (
            None
            if name in self.__dataclass_fields__
            else libraries.library_of(name, trainer=self.__dict__.get("trainer"))
        )
        if lib is None:
            object.__setattr__(self, name, value)
        else:  # a new dict: a copy made by dataclasses.replace shares the old one
            object.__setattr__(self, lib.section, {**getattr(self, lib.section), name: value})

    def library_kwargs(self, section: str) -> dict[str, Any]:
        """Keyword arguments for one library's config class: our defaults, then the keys the recipe gives."""
        lib = libraries.section_library(section, self.trainer)
        return copy.deepcopy({**{k: lib.default(k, self) for k in lib.ours}, **getattr(self, section)})

    @property
    def preference(self) -> bool:
        """A preference trainer (dpo, orpo, kto): pairs or labelled answers instead of SFT rows."""
        return self.trainer in libraries.PREFERENCE_TRAINERS

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    def to_dict(self) -> dict[str, Any]:
        """What the run used, flat (the manifest's config): our keys, then every library key given or defaulted by
        us (the libraries' own defaults are left to the library versions recorded next to it)."""
        out = {name: copy.deepcopy(getattr(self, name)) for name in own_keys()}
        for section in libraries.SECTIONS:
            out.update(self.library_kwargs(section))
        return out


# Counts and lengths that have no meaning at or below a bound, ours and the libraries' (checked when the key
# exists, so a trainer's config keys join when they are there): refused when the recipe is read, before the data
# stage or the model load would find them (a batch of 0 used to fail in torch's DataLoader after both).
AT_LEAST_ONE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
POSITIVE_WHEN_SET = (  # None (or the library's own "unset" value) means not used
    "eval_steps",
    "save_steps",
    "logging_steps",
    "eval_max_new_tokens",
    "eval_limit",
    "eval_generation_batch_size",
    "max_answer_chars",
    "max_prompt_chars",
    "max_prompt_length",
    "max_completion_length",
    "forgetting_probe_tokens",
)
NOT_NEGATIVE = ("warmup_steps", "num_train_epochs", "min_answer_chars", "eval_samples", "save_total_limit")


def _known(recipe, key: str) -> Any:
    try:
        return getattr(recipe, key)
    except AttributeError:  # a key of a library section this recipe's trainer does not have
        return None


def check_counts(recipe) -> None:
    """RecipeError naming the first count or length that cannot be (batch size 0, negative steps or lengths)."""
    for key in AT_LEAST_ONE:
        v = _known(recipe, key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 1:
            raise RecipeError(f"{key}: must be at least 1, got {v}")
    for key in POSITIVE_WHEN_SET:
        v = _known(recipe, key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0:
            raise RecipeError(f"{key}: must be > 0 (or unset), got {v}")
    for key in NOT_NEGATIVE:
        v = _known(recipe, key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
            raise RecipeError(f"{key}: must be >= 0, got {v}")
    steps = _known(recipe, "max_steps")
    if isinstance(steps, int) and not isinstance(steps, bool) and steps < -1:
        raise RecipeError(f"max_steps: must be > 0 (or -1: train num_train_epochs), got {steps}")


RUN_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")


def check_run_name(name: str | None) -> None:
    """A run name is one folder under output_root: never a path, so a run cannot be written anywhere else."""
    if name is None:
        return
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise RecipeError(
            f"run_name: {name!r} is not a folder name: use letters, digits, '.', '_' and '-' "
            "(no '/', not '.' or '..'); choose the location with output_root"
        )


def _library_section(key: str, own: dict[str, Any], trainer: str | None = None) -> str:
    lib = libraries.library_of(key, own, trainer)
    if lib is None:
        raise wrong_trainer(key, trainer) or RecipeError(f"Recipe: unknown key {key!r}")
    if key in lib.pipeline:
        raise RecipeError(f"{key!r} is set by the pipeline and cannot be given in a recipe")
    return lib.section


def wrong_trainer(key: str, trainer: str | None, source: str = "Recipe") -> RecipeError | None:
    """The error for a key that belongs to another trainer's config (None when no trainer owns it)."""
    owners = libraries.other_trainers(key, trainer)
    if not owners:
        return None
    cls = libraries.TRAINERS[owners[0]].name
    return RecipeError(
        f"{source}: {key!r} is a key of trainer {' / '.join(owners)} ({cls}), not of this recipe's trainer "
        f"{libraries.trainer_name(trainer)!r}; set trainer: {owners[0]} or remove the key"
    )
