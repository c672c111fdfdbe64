"""The ``adapters`` command line. Each verb parses its arguments and calls one function of the package."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import warnings

    warnings.filterwarnings("ignore", message=".*gemm_4bit_forward.*")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # per-call int8 dtype notes on CPU
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from .config import load_recipe, parse_overrides
    from .train import train

    overrides = parse_overrides(rest)
    resume = bool(overrides.pop("resume", False) or args.resume)
    recipe, path = load_recipe(args.recipe, overrides)
    train(recipe, path, resume=resume)
    return 0


def cmd_recipes(args: argparse.Namespace, rest: list[str]) -> int:
    from .config import RECIPE_DIR

    for p in sorted(RECIPE_DIR.glob("*.yaml")):
        head = next((ln[1:].strip() for ln in p.read_text().splitlines() if ln.startswith("#")), "")
        print(f"{p.stem:28s} {head}")
    return 0


def cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    from .report import evaluate_run

    ev = evaluate_run(args.run_dir, base=not args.no_base, limit=args.limit)
    return 1 if args.strict and any(f["name"] == "negative_transfer" for f in ev["flags"]) else 0


def cmd_generate(args: argparse.Namespace, rest: list[str]) -> int:
    from .generate import run_generate

    which = "merged" if args.merged else "base" if args.base else "tuned"
    run_generate(args.run_dir, args.prompt, which, args.max_new_tokens, args.system)
    return 0


def cmd_sweep(args: argparse.Namespace, rest: list[str]) -> int:
    from .config import load_recipe, parse_overrides
    from .sweep import sweep

    overrides = parse_overrides(rest)
    recipe, path = load_recipe(args.recipe, overrides)
    sweep(recipe, path, args.trials, overrides, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="adapters", description=__doc__)
    sub = ap.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("train", help="fine-tune with a recipe; any recipe key can be overridden with --key value",
                       epilog="example: adapters train gemma3-270m-demo --max_steps 10 --run_name quick")
    p.add_argument("recipe", help="a recipe YAML path or the name of a shipped recipe (see `adapters recipes`)")
    p.add_argument("--resume", action="store_true", help="continue the run from its last complete checkpoint")
    p.set_defaults(func=cmd_train, takes_rest=True)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("eval", help="base vs tuned on the held-out split, forgetting probe, flags -> eval.json, report.md",
                       epilog="example: adapters eval outputs/gemma3-270m-demo-20260101-120000 --limit 20")
    p.add_argument("run_dir", help="a finished run directory (outputs/<run_name>)")
    p.add_argument("--no-base", action="store_true", help="score the tuned model only")
    p.add_argument("--limit", type=int, default=None, help="score at most N held-out rows")
    p.add_argument("--strict", action="store_true", help="exit 1 when the negative-transfer flag is raised")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="answer prompts with a run's model and chat template (stdin lines if no --prompt)",
                       epilog="example: adapters generate outputs/<run> --prompt 'Format: ...'")
    p.add_argument("run_dir", help="a finished run directory (outputs/<run_name>)")
    p.add_argument("--prompt", default=None, help="one prompt; without it, each stdin line is a prompt")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--merged", action="store_true", help="use RUN_DIR/merged (from `adapters merge`)")
    g.add_argument("--base", action="store_true", help="use the base model without the adapter")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--system", default=None, help="an optional system message")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sweep", help="Optuna search (TPE + median pruning on validation loss); writes the best recipe",
                       epilog="example: adapters sweep gemma3-270m-demo --trials 3 --max_steps 10")
    p.add_argument("recipe", help="a recipe YAML path or the name of a shipped recipe")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--out", default=None, help="sweep directory (default outputs/sweep-<recipe>-<time>)")
    p.set_defaults(func=cmd_sweep, takes_rest=True)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .checkpoints import CheckpointError
    from .config import RecipeError
    from .data import DataError
    from .forgetting import ProbeError
    from .models import ModelSourceError
    from .runs import RunError

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    _quiet_libraries()
    try:
        return args.func(args, rest)
    except (RecipeError, DataError, ModelSourceError, CheckpointError, FileExistsError, FileNotFoundError,
            RunError, ProbeError) as e:
        print(f"adapters {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
