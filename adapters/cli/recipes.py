"""adapters recipes [show NAME]: the shipped recipes, or every key of one recipe."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def keys_text(recipe: Callable[[], Any]) -> str | None:
    """adapters.config.describe_keys(recipe()) where the config package has it (it is being written); else None.

    recipe is a thunk so that nothing is read when there is nothing to describe."""
    import adapters.config

    describe = getattr(adapters.config, "describe_keys", None)
    return describe(recipe()) if describe is not None else None


def register(sub) -> None:
    p = sub.add_parser("recipes", help="list the shipped recipes")
    rsub = p.add_subparsers(dest="recipes_verb")
    s = rsub.add_parser(
        "show",
        help="every key of one recipe: type, default, the recipe's value, what it does",
        epilog="example: adapters recipes show gemma3-270m-demo",
    )
    s.add_argument("name", help="a recipe YAML path or the name of a shipped recipe")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from adapters.config import RECIPE_DIR, load_recipe, resolve_recipe_path

    if args.recipes_verb == "show":
        path = resolve_recipe_path(args.name)
        keys = keys_text(lambda: load_recipe(path)[0])
        print(f"# {path}")
        print(keys if keys is not None else path.read_text(encoding="utf-8").rstrip("\n"))
        return 0
    for p in sorted(RECIPE_DIR.glob("*.yaml")):
        head = next((ln[1:].strip() for ln in p.read_text().splitlines() if ln.startswith("#")), "")
        print(f"{p.stem:28s} {head}")
    return 0
