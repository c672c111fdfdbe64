"""The recipe: one flat set of keys, loaded from YAML, overridden by --key value on the command line.

Keys use the libraries' own names, so their documentation applies unchanged: r/lora_alpha/target_modules are
peft.LoraConfig fields, load_in_4bit/bnb_4bit_quant_type are transformers.BitsAndBytesConfig arguments, and the
training keys are trl.SFTConfig fields; our own keys are declared in sections (adapters/config/schema.py). This module
is the import path the rest of the package uses.
"""

from __future__ import annotations

from adapters.config.loading import (
    RECIPE_DIR,
    RecipeLoader,
    apply_values,
    coerce,
    key_type,
    library_changes,
    load_recipe,
    load_yaml,
    parse_overrides,
    recipe_from_config,
    recipe_keys,
    resolve_recipe_path,
)
from adapters.config.schema import SECTIONS, Recipe, RecipeError, own_keys

__all__ = [
    "RECIPE_DIR",
    "SECTIONS",
    "Recipe",
    "RecipeError",
    "RecipeLoader",
    "apply_values",
    "coerce",
    "key_type",
    "library_changes",
    "load_recipe",
    "load_yaml",
    "own_keys",
    "parse_overrides",
    "recipe_from_config",
    "recipe_keys",
    "resolve_recipe_path",
]
