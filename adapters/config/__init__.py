"""The recipe: schema in sections (schema.py), the libraries' own keys (libraries.py), loading and overrides
(loading.py), help for every key (describe.py)."""

from adapters.config.describe import describe_keys
from adapters.config.loading import (
    RECIPE_DIR,
    apply_values,
    library_changes,
    load_recipe,
    load_yaml,
    parse_overrides,
    recipe_from_config,
    recipe_keys,
    resolve_recipe_path,
)
from adapters.config.schema import Recipe, RecipeError

__all__ = [
    "RECIPE_DIR",
    "Recipe",
    "RecipeError",
    "apply_values",
    "describe_keys",
    "library_changes",
    "load_recipe",
    "load_yaml",
    "parse_overrides",
    "recipe_from_config",
    "recipe_keys",
    "resolve_recipe_path",
]
