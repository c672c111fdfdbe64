"""Recipes from YAML (errors at file:line:col), ``--key value`` overrides, and a run manifest's ``config``.

Values are checked against the declared types (ours from the section dataclasses, the libraries' from their own
classes) with ``typing.get_type_hints``; strings from the command line become numbers, booleans and lists.
"""

from __future__ import annotations

import difflib
import functools
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from adapters.config import libraries
from adapters.config.schema import Recipe, RecipeError, check_run_name, own_keys, wrong_trainer


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


# ---------------------------------------------------------------------------------------------------- keys
@functools.cache
def _own_types() -> dict[str, Any]:
    return typing.get_type_hints(Recipe)


def key_type(key: str, trainer: str | None = None) -> Any:
    """The declared type of a recipe key: ours, else the owning library's (for a recipe with this trainer)."""
    if key in own_keys():
        return _own_types()[key]
    lib = libraries.library_of(key, trainer=trainer)
    return lib.keys()[key].type if lib else Any


def recipe_keys(trainer: str | None = None) -> list[str]:
    """Every key a recipe with this trainer accepts: ours, then each library's (pipeline keys and names we own left
    out)."""
    own = list(own_keys())
    libs = libraries.libraries_for(trainer)
    return own + [k for lib in libs for k in lib.keys() if k not in lib.pipeline and k not in own_keys()]


def _unknown_key(key: str, source: str, trainer: str | None = None) -> RecipeError:
    wrong = wrong_trainer(key, trainer, source)
    if wrong is not None:
        return wrong
    close = difflib.get_close_matches(key, recipe_keys(trainer), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return RecipeError(f"{source}: unknown key {key!r}{hint}")


# ---------------------------------------------------------------------------------------------------- coercion
def _is(value: Any, tp: Any) -> bool:
    """``value`` already has type ``tp`` (a bool is no number here)."""
    if tp is type(None):
        return value is None
    cls = typing.get_origin(tp) or tp
    if not isinstance(cls, type):
        return False
    if isinstance(value, bool) and cls in (int, float):
        return False
    return isinstance(value, cls)


def _coerce_union(name: str, value: Any, args: tuple, source: str) -> Any:
    if any(_is(value, a) for a in args):  # "all-linear" stays a string where a list would also do
        return value
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return coerce(name, value, arg, source)
        except RecipeError as e:
            errors.append(str(e))
    raise RecipeError(errors[0] if errors else f"{source}: {name}: invalid value {value!r}")


def _coerce_number(name: str, value: Any, annotation: type, source: str) -> int | float:
    kind = "an integer" if annotation is int else "a number"
    if isinstance(value, bool):
        raise RecipeError(f"{source}: {name}: expected {kind}, got {value!r}")
    try:
        if annotation is float:  # an int is a valid float (logging_steps: 5 stays 5; 0.1 would be a share)
            return value if isinstance(value, int) else float(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{source}: {name}: expected {kind}, got {value!r}") from None


def _coerce_bool(name: str, value: Any, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
        return False
    raise RecipeError(f"{source}: {name}: expected true or false, got {value!r}")


def coerce(name: str, value: Any, annotation: Any, source: str) -> Any:
    """Coerce a YAML/CLI value to the key's declared type, or raise a RecipeError naming the key. Types we do not
    check (Any, Literal, enums, classes) pass through: the library validates them when it builds its config."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        return _coerce_union(name, value, typing.get_args(annotation), source)
    if origin in (list, tuple) or annotation in (list, tuple):
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
        return _coerce_bool(name, value, source)
    if annotation in (int, float):
        return _coerce_number(name, value, annotation, source)
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise RecipeError(f"{source}: {name}: expected a string, got {value!r}")
        return str(value)
    return value


def apply_values(values: dict[str, Any], source: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate and coerce flat ``values`` (from ``source``) on top of ``base``; returns the merged flat dict."""
    own = own_keys()
    merged = dict(base or {})
    given = {str(k).replace("-", "_"): v for k, v in values.items()}
    trainer = given.get("trainer", merged.get("trainer"))
    if trainer is not None and trainer not in libraries.TRAINERS:
        raise RecipeError(f"{source}: trainer: expected one of {', '.join(libraries.TRAINERS)}, got {trainer!r}")
    for key, value in given.items():
        lib = None if key in own else libraries.library_of(key, own, trainer)
        if key not in own and lib is None:
            raise _unknown_key(key, source, trainer)
        if lib is not None and key in lib.pipeline:
            raise RecipeError(f"{source}: {key!r} is set by the pipeline and cannot be given in a recipe")
        merged[key] = coerce(key, value, key_type(key, trainer), source)
        if key == "run_name":  # named where it was given (Recipe checks it again for code that builds one)
            try:
                check_run_name(merged[key])
            except RecipeError as e:
                raise RecipeError(f"{source}: {e}") from None
    return merged


# ---------------------------------------------------------------------------------------------------- sources
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
    file_values = values
    if overrides:
        values = apply_values(overrides, "command line", values)
    try:
        return Recipe(**values), path
    except RecipeError as e:
        raise RecipeError(f"{_blamed(path, file_values, values)}: {e}") from None


def _blamed(path: Path, file_values: dict[str, Any], values: dict[str, Any]) -> str:
    """Where a value the Recipe refused came from: the command line when the file's values alone are a recipe."""
    if values is file_values:
        return str(path)
    try:
        Recipe(**file_values)
    except RecipeError:
        return str(path)
    return "command line"


def recipe_from_config(config: dict[str, Any], source: str, **changes: Any) -> Recipe:
    """The Recipe a run used, from its manifest's ``config`` (``Recipe.to_dict``). Manifests of the old layout keep
    the SFTConfig pass-through keys in an ``sft_extra`` dict; they open the same way. ``changes`` win."""
    cfg = dict(config or {})
    extra = cfg.pop("sft_extra", None) or {}
    values = apply_values({**cfg, **extra, **changes}, source)
    try:
        return Recipe(**values)
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None


def library_changes(config: dict[str, Any]) -> dict[str, Any]:
    """The library keys of a manifest's config whose value is not the default (ours, else the library's): what the
    recipe changed beyond the usual. Reads the old layout's sft_extra too."""
    own = own_keys()
    out = {}
    for key, value in {**config, **(config.get("sft_extra") or {})}.items():
        lib = None if key in own else libraries.library_of(key, own, config.get("trainer"))
        if lib is not None and value != lib.default(key, config):
            out[key] = value
    return out


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
