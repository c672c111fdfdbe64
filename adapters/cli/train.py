"""adapters train RECIPE [--key value …] [--resume] -> adapters.training.run.train."""

from __future__ import annotations

import argparse
import shlex
import sys


class _HelpWithKeys(argparse.Action):
    """-h/--help: the usual help, then every recipe key; with the values of RECIPE when it comes before --help."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, "recipe", None) is None:
            from adapters.cli.recipes import keys_text

            parser.print_help()
            keys = keys_text(lambda: None)
            if keys:
                print(f"\n{keys}")
            parser.exit()
        namespace.help_text = parser.format_help()  # run() adds the keys once the recipe and its overrides are read


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune with a recipe; any recipe key can be overridden with --key value",
        epilog="example: adapters train gemma3-270m-demo --max_steps 10 --run_name quick",
        add_help=False,
        allow_abbrev=False,  # --r is the LoRA rank, not an abbreviation of --resume
    )
    p.add_argument("-h", "--help", action=_HelpWithKeys, help="show this help message and exit")
    p.add_argument("recipe", help="a recipe YAML path or the name of a shipped recipe (see 'adapters recipes')")
    p.add_argument("--resume", action="store_true", help="continue the run from its last complete checkpoint")
    p.set_defaults(func=run, takes_rest=True)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from adapters.config import load_recipe, parse_overrides

    overrides = parse_overrides(rest)
    resume = bool(overrides.pop("resume", False) or args.resume)
    if getattr(args, "help_text", None):
        from adapters.cli.recipes import keys_text

        print(args.help_text, end="")
        keys = keys_text(lambda: load_recipe(args.recipe, overrides)[0])
        if keys:
            print(f"\n{keys}")
        return 0
    from adapters.training.lifecycle import RunInterrupted
    from adapters.training.run import train

    recipe, path = load_recipe(args.recipe, overrides)
    try:
        train(recipe, path, resume=resume)
    except RunInterrupted as e:  # Ctrl-C or SIGTERM: one line, the command that continues, no traceback
        print(e.line(_as_typed(args.recipe, rest)), file=sys.stderr)
        return e.exit_code
    return 0


def _as_typed(recipe: str, rest: list[str]) -> str:
    """The recipe and the overrides as the user typed them, without --run_name and --resume (the resume line adds
    them): the resumed recipe must resolve to the run's."""
    kept, i = [], 0
    while i < len(rest):
        key = rest[i].partition("=")[0].replace("-", "_")
        has_value = "=" not in rest[i] and i + 1 < len(rest) and not rest[i + 1].startswith("--")
        if key in ("__run_name", "__resume"):
            i += 2 if has_value else 1
            continue
        kept.append(rest[i])
        i += 1
    return shlex.join([recipe, *kept])
