"""adapters bench [--model M] [--switch value …] -> adapters.bench.throughput.bench; flags built from BenchOptions.
adapters bench --recipe RECIPE [--steps N] [--key value …] -> adapters.bench.recipe.bench_recipe."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any


def _flag_type(annotation: Any) -> Any:
    """int for int | None, str for str | Path: the first concrete type of the field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def register(sub) -> None:
    from adapters.bench.throughput import BenchOptions

    p = sub.add_parser(
        "bench",
        help="plain TRL+PEFT baseline vs our path: tokens/s, memory, MFU, loss gate",
        epilog="examples: adapters bench --scenarios ragged --padding_free false  (force a switch); "
        "adapters bench --recipe gemma3-270m-demo --steps 10  (a recipe: plain TRL vs our path, guard off and on)",
    )

    hints = typing.get_type_hints(BenchOptions)
    for f in dataclasses.fields(BenchOptions):
        kw = {"type": _flag_type(hints[f.name]), **f.metadata}
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, **kw)
    p.add_argument("--data", type=int, default=None, metavar="N", help="data stage vs TRL's preparation on N rows")
    p.set_defaults(func=run, takes_rest=True)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    """Exit 1 when a comparison's loss gate fails (its speed figures would compare different computations)."""
    from adapters.bench.throughput import passed
    from adapters.config import parse_overrides

    if args.data:  # adapters bench --data N: adapters/bench/data.py
        from adapters.bench.data import bench_data

        bench_data(args.data, out=args.out)
        return 0
    overrides = parse_overrides(rest)
    if args.recipe:
        result = _recipe_bench(args, overrides)
    else:
        result = _shape_bench(args, overrides)
    return 0 if passed(result) else 1


def _shape_bench(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    from adapters.bench.throughput import BenchOptions, bench

    options = BenchOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchOptions)})
    return bench(options, overrides=overrides)


def _recipe_bench(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    from adapters.bench.recipe import RecipeBenchOptions, bench_recipe
    from adapters.config import resolve_recipe_path

    resolve_recipe_path(args.recipe)  # a missing recipe is refused before --out is created
    warmup = 1 if args.warmup is None else args.warmup
    return bench_recipe(
        RecipeBenchOptions(args.recipe, args.steps, warmup, args.gate_batches, args.out, overrides=overrides)
    )
