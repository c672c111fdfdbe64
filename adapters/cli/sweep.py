"""adapters sweep RECIPE [--key value …] -> adapters.training.sweep.sweep."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="Optuna search (TPE; SFT: validation loss, median pruning; dpo/orpo/kto: held-out preference accuracy, no pruning); writes the best recipe",
        epilog="example: adapters sweep gemma3-270m-demo --trials 3 --max_steps 10",
    )
    p.add_argument("recipe", help="a recipe YAML path or the name of a shipped recipe")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--out", default=None, help="sweep directory (default outputs/sweep-<recipe>-<time>)")
    p.set_defaults(func=run, takes_rest=True)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from adapters.config import load_recipe, parse_overrides
    from adapters.training.sweep import sweep

    overrides = parse_overrides(rest)
    recipe, path = load_recipe(args.recipe, overrides)
    from adapters.training.preclaim import check_before_claim

    check_before_claim(recipe)  # what every trial would refuse, refused once before the sweep folder is made
    try:
        sweep(recipe, path, args.trials, overrides, args.out)
    except KeyboardInterrupt:  # Ctrl-C between trials, or a trial's run interrupted (its manifest says so)
        print(
            "adapters sweep: interrupted; finished trials keep their run directories (see the [sweep] lines)",
            file=sys.stderr,
        )
        return 130
    return 0
