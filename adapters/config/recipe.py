"""Recipes: one flat dataclass, loaded from YAML, overridden by ``--key value`` on the command line.

Keys use the libraries' own names, so their documentation applies unchanged:
``r``/``lora_alpha``/``target_modules`` are ``peft.LoraConfig`` fields, ``load_in_4bit``/``bnb_4bit_quant_type``
are ``transformers.BitsAndBytesConfig`` fields, and the training keys are ``trl.SFTConfig`` fields. Any other
``SFTConfig`` field is accepted as well and passed through untouched (it lands in ``sft_extra``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapters.utils.errors import AdaptersError


class RecipeLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false (any case) are booleans, so ``eval_strategy: no`` stays the string "no"
    instead of YAML 1.1's False (which HF would reject as 'False is not a valid IntervalStrategy')."""


RecipeLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


RECIPE_DIR = Path(__file__).parents[1] / "recipes"


class RecipeError(AdaptersError, ValueError):
    """A recipe file or an override is invalid. The message names the source and the key."""


@dataclass
class Recipe:
    # ---------------------------------------------------------------- run
    run_name: str | None = None
    """Name of outputs/<run_name>/. Default: <recipe>-<YYYYmmdd-HHMMSS>."""
    output_root: str = "outputs"
    """Directory that holds the run directories."""
    seed: int = 42
    """Seed for Python, NumPy, torch and the data order."""

    # ---------------------------------------------------------------- model
    model_name_or_path: str = "embedded:gemma-3-270m"
    """Hub id, local directory, a .gguf file, or 'embedded:gemma-3-270m' (the offline default)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when model_name_or_path is a hub id."""
    trust_remote_code: bool = False
    dtype: str = "float32"
    """Dtype of the weights that stay unquantized, and of LoRA compute: float32, bfloat16, float16 or auto."""
    attn_implementation: str | None = "sdpa"
    """Attention kernel: sdpa, eager, flex_attention, … (None lets transformers choose)."""
    chat_template: str | None = None
    """None: the tokenizer's own template, else a built-in name (e.g. 'gemma') or a path to a .jinja file.
    Models that ship no template fall back to the built-in one for their family."""
    device_map: str | None = None
    """None: one whole model per process, on the local rank's GPU (the only valid choice under several processes).
    'auto': spread one model over every visible GPU (single process only; `adapters plan` refuses it otherwise)."""

    # ---------------------------------------------------------------- quantization (BitsAndBytesConfig)
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    """nf4 or fp4."""
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str | None = None
    """Default: the recipe's dtype."""
    bnb_4bit_quant_storage: str | None = None
    """Storage dtype of packed 4-bit weights; set it equal to the compute dtype for FSDP."""
    quant_probe: bool = True
    """Before training, report the probe loss of the full-precision and of the quantized model side by side."""

    # ---------------------------------------------------------------- LoRA (peft.LoraConfig)
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: Any = "all-linear"
    """'all-linear', a list of module names, or a regex string."""
    layers_to_transform: Any = None
    """Layer indices that get adapters; the other layers stay frozen entirely."""
    modules_to_save: list[str] | None = None
    use_dora: bool = False
    use_rslora: bool = False
    init_lora_weights: Any = True
    bias: str = "none"

    # ---------------------------------------------------------------- data
    train_file: str = "data/demo/train.jsonl"
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
    skip_invalid: bool = False
    """Invalid rows go to a quarantine file (count reported) instead of stopping the run."""
    quarantine_file: str | None = None
    """Where skipped rows go; default <run_dir>/quarantine.jsonl."""
    dedup: bool = True
    """Drop exact and near-exact (whitespace/case) duplicate training rows."""
    min_answer_chars: int = 1
    max_answer_chars: int | None = None
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
    general_data_share: float = 0.0
    """Opt-in: share of the final training rows drawn from general_data_file, to limit forgetting."""
    audit_max_dropped_share: float = 0.1
    """Stop before training when more than this share of training rows is dropped (answer cut, nothing trained)."""
    audit_min_trained_share: float = 0.01
    """Stop when fewer than this share of training tokens carry a label."""
    audit_require_eos: bool = True
    """Stop unless every kept row trains the EOS/end-of-turn token that closes its answer."""

    # ---------------------------------------------------------------- training (trl.SFTConfig)
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.1
    """An int is a step count, a float below 1 a fraction of the total steps."""
    num_train_epochs: float = 1.0
    max_steps: int = -1
    """Overrides num_train_epochs when > 0."""
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = True
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    neftune_noise_alpha: float | None = None
    base_kl_weight: float = 0.0
    """Learning without Forgetting (adapters/training/forgetting_guard.py): add this x KL(base||tuned) at sampled tokens
    that carry no label (prompt, template) to the training loss; the answers may change, the rest stays the base's.
    0 turns it off. Costs one no-grad base forward per step."""
    base_kl_positions: int = 16
    """Unlabelled positions sampled per sequence for base_kl_weight (0 = all of them)."""
    logging_steps: int = 5
    eval_strategy: str = "no"
    eval_steps: int | None = None
    save_steps: int = 50
    save_total_limit: int | None = 2
    bf16: bool = False
    fp16: bool = False
    report_to: Any = "tensorboard"
    padding_free: Any = "auto"
    """auto, true or false. Flatten each batch into one row with per-sample position ids (no padding computed);
    auto turns it on where the attention keeps samples apart (sdpa, eager, flash; flex on CUDA) and batch > 1."""
    use_liger_kernel: Any = "auto"
    """auto, true or false. Liger's RMSNorm/RoPE/SwiGLU kernels through TRL; auto: on where liger_kernel and CUDA exist."""
    trained_positions_only: Any = "auto"
    """auto, true or false. Send only labelled positions through the LM head (TRL does this on Triton devices; auto
    turns it on for CPU/MPS too). Same loss and gradients; prompt positions cost no vocabulary projection."""
    torch_compile: Any = "auto"
    """auto, true or false. torch.compile the model through the Trainer; auto leaves it off (not measured to pay)."""

    # ---------------------------------------------------------------- evaluation
    eval_base: bool = True
    """Score the base model (the tuned model with its adapter disabled) on the test split, for before/after."""
    eval_max_new_tokens: int | None = None
    """Generation budget; default: the longest test answer in tokens plus a margin."""
    eval_generation_batch_size: int = 20
    eval_after_train: bool = True
    """At the end of `train`, run `adapters eval`: task metrics, forgetting probe, flags, report.md."""
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
    sweep: dict[str, Any] = field(default_factory=dict)
    """`adapters sweep` search space (adapters/training/sweep.py): key: [low, high] (a range) or [a, b, c] (choices)."""

    # ---------------------------------------------------------------- pass-through
    sft_extra: dict[str, Any] = field(default_factory=dict)
    """Any other trl.SFTConfig field given in the recipe or on the command line."""

    # --------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
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
        if self.base_kl_positions < 0:
            raise RecipeError(f"base_kl_positions: must be >= 0 (0 = all), got {self.base_kl_positions}")
        if self.bf16 and self.fp16:
            raise RecipeError("bf16 and fp16 are exclusive")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise RecipeError(f"dtype: expected float32, bfloat16, float16 or auto, got {self.dtype!r}")
        if self.max_length <= 0:
            raise RecipeError(f"max_length: must be > 0, got {self.max_length}")
        from adapters.training.speed import EXTRA_SWITCHES, SWITCHES, FastPathError, check_switch

        for name in SWITCHES + EXTRA_SWITCHES:
            try:
                setattr(self, name, check_switch(name, getattr(self, name)))
            except FastPathError as e:
                raise RecipeError(str(e)) from None

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------- keys
def _own_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Recipe) if f.name != "sft_extra"}


def _sft_fields() -> dict[str, dataclasses.Field]:
    from trl import SFTConfig

    return {f.name: f for f in dataclasses.fields(SFTConfig) if f.init}


# Fields that SFTConfig has but that the pipeline sets itself; a recipe may not set them.
_RESERVED = {"output_dir", "logging_dir", "dataset_kwargs", "resume_from_checkpoint", "push_to_hub", "hub_token"}


def field_help(name: str) -> str:
    """The docstring written under a Recipe field (one source of help text)."""
    import ast
    import inspect

    src = inspect.getsource(Recipe)
    tree = ast.parse(src)
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name:
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                return " ".join(str(nxt.value.value).split())
    return ""


def _coerce(name: str, value: Any, annotation: Any, source: str) -> Any:
    """Coerce a YAML/CLI value to the field's declared type, or raise a RecipeError naming the key."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"Any": Any})  # noqa: S307 - our own annotations
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg, source)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if errors else f"{source}: {name}: invalid value {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{source}: {name}: expected a list, got {value!r}")
        return list(value)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: {name}: expected a mapping, got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise RecipeError(f"{source}: {name}: expected true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise RecipeError(f"{source}: {name}: expected a number, got {value!r}")
        try:
            number = float(value) if annotation is float else value
            if annotation is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                number = int(value)
            return number
        except (TypeError, ValueError):
            kind = "an integer" if annotation is int else "a number"
            raise RecipeError(f"{source}: {name}: expected {kind}, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise RecipeError(f"{source}: {name}: expected a string, got {value!r}")
        return str(value)
    return value


def _unknown_key(key: str, source: str) -> RecipeError:
    valid = list(_own_fields()) + [k for k in _sft_fields() if k not in _RESERVED]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return RecipeError(f"{source}: unknown key {key!r}{hint}")


def apply_values(values: dict[str, Any], source: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate and coerce ``values`` (from ``source``) on top of ``base``; returns the merged raw dict."""
    own, sft = _own_fields(), None
    merged = dict(base or {})
    extra = dict(merged.get("sft_extra") or {})
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key in own:
            merged[key] = _coerce(key, value, own[key].type, source)
            continue
        if key in _RESERVED:
            raise RecipeError(f"{source}: {key!r} is set by the pipeline and cannot be given in a recipe")
        sft = sft if sft is not None else _sft_fields()
        if key in sft:
            extra[key] = _coerce(key, value, sft[key].type, source)
            continue
        raise _unknown_key(key, source)
    if extra:
        merged["sft_extra"] = extra
    return merged


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A path to a YAML file, or the name of a recipe shipped in adapters/recipes/."""
    p = Path(recipe)
    if p.is_file():
        return p
    for candidate in (RECIPE_DIR / f"{recipe}.yaml", RECIPE_DIR / str(recipe)):
        if candidate.is_file():
            return candidate
    shipped = sorted(x.stem for x in RECIPE_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(str(recipe), shipped, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise RecipeError(f"recipe not found: {recipe!r} (not a file, nor a shipped recipe: {', '.join(shipped)}){hint}")


def load_recipe(recipe: str | Path, overrides: dict[str, Any] | None = None) -> tuple[Recipe, Path]:
    path = resolve_recipe_path(recipe)
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of key: value, got {type(raw).__name__}")
    values = apply_values(raw, str(path))
    if overrides:
        values = apply_values(overrides, "command line", values)
    try:
        return Recipe(**values), path
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``['--lr', '1e-4', '--use_dora', '--target_modules', 'q_proj,v_proj']`` -> typed dict.

    A flag without a value means true. Values are parsed as YAML scalars (numbers, booleans, null, lists).
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise RecipeError(f"command line: expected --key value, got {tok!r}")
        key, eq, val = tok[2:].partition("=")
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                val = tokens[i + 1]
                i += 1
            else:
                val = "true"
        try:
            out[key.replace("-", "_")] = load_yaml(val) if val != "" else ""
        except yaml.YAMLError:
            out[key.replace("-", "_")] = val
        i += 1
    return out
