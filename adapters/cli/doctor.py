"""adapters doctor [RECIPE] [--key value …] -> adapters.planning.doctor.doctor (prints; writes doctor.json)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="what this machine can run: versions, device, bitsandbytes, kernels, disk, hub; with a recipe, a "
        "self-test of its step on a tiny twin and each problem with its fix",
        epilog="examples: adapters doctor; adapters doctor gemma3-270m-demo; "
        "adapters doctor llama-3.2-1b-qlora --bf16 false  (recipe overrides as in train)",
    )
    p.add_argument("recipe", nargs="?", default=None, help="a recipe YAML path or a shipped recipe name")
    p.add_argument("--out", default=None, help="where to write the JSON (default <output_root>/doctor.json)")
    p.add_argument(
        "--output-root",
        "--output_root",
        dest="output_root",
        default=None,
        help="the output root whose free disk is read and where doctor.json goes (default: the recipe's, or outputs)",
    )
    p.add_argument("--no-self-test", action="store_true", help="skip the recipe's tiny-twin step")
    p.add_argument("--hub-timeout", type=float, default=3.0, help="seconds to wait for the hub (default 3)")
    p.add_argument(
        "--compile-timeout",
        type=float,
        default=180.0,
        help="seconds to wait for the torch.compile try (default 180; 0 skips it)",
    )
    p.set_defaults(func=run, takes_rest=True)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    """Exit 1 when a problem is an error (the recipe, or the toolkit, cannot run as it is here)."""
    from adapters.config import parse_overrides
    from adapters.planning.doctor import doctor

    overrides = parse_overrides(rest)
    recipe = None
    if args.recipe is not None:
        from adapters.config import load_recipe

        recipe, _ = load_recipe(args.recipe, overrides)
    elif overrides:
        from adapters.utils.errors import AdaptersError

        raise AdaptersError(f"--{next(iter(overrides))} is a recipe key: adapters doctor RECIPE --key value")
    report = doctor(
        recipe,
        args.recipe,
        output_root=args.output_root,
        out_file=args.out,
        hub_timeout=args.hub_timeout,
        compile_timeout=args.compile_timeout,
        run_self_test=not args.no_self_test,
    )
    return 0 if report["ok"] else 1
