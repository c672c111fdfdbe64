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


def cmd_plan(args: argparse.Namespace, rest: list[str]) -> int:
    from .config import load_recipe, parse_overrides
    from .plan import plan, smoke

    recipe, path = load_recipe(args.recipe, parse_overrides(rest))
    print(plan(recipe, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, nproc=args.nproc,
               accelerate_config=args.accelerate_config))
    if args.smoke:
        r = smoke(recipe, path, steps=args.smoke_steps)
        print(f"smoke: ok in {r['seconds']}s on {r['twin']}: {r['steps']} steps, loss {r['train_loss']}, "
              f"quantization {r['quantization']}, merged+reloaded logits max diff {r['merge_max_abs_diff']:.1e}")
        print(f"smoke: changed for a CPU run of seconds: {r['adjusted']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="adapters", description=__doc__)
    sub = ap.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("train", help="fine-tune with a recipe; any recipe key can be overridden with --key value",
                       epilog="example: adapters train gemma3-270m-demo --max_steps 10 --run_name quick")
    p.add_argument("recipe", help="a recipe YAML path or the name of a shipped recipe (see `adapters recipes`)")
    p.add_argument("--resume", action="store_true", help="continue the run from its last complete checkpoint")
    p.set_defaults(func=cmd_train, takes_rest=True)

    p = sub.add_parser("plan", help="preflight checks, per-GPU memory estimate, largest micro-batch; --smoke runs "
                       "the recipe on a tiny random twin of its model", epilog="example: adapters plan "
                       "llama-3.2-1b-qlora --gpus 8 --gpu-mem 24 --accelerate-config fsdp2-qlora --smoke")
    p.add_argument("recipe", help="a recipe YAML path or a shipped recipe name; --key value overrides follow")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per run (processes, unless --nproc)")
    p.add_argument("--gpu-mem", type=float, default=24.0, help="memory of one GPU in GiB (default 24)")
    p.add_argument("--nproc", type=int, default=None, help="processes (overrides the accelerate config's)")
    p.add_argument("--accelerate-config", default=None,
                   help="an accelerate config file or a shipped name: " + ", ".join(
                       sorted(x.stem for x in (Path(__file__).parent / "accelerate_configs").glob("*.yaml"))))
    p.add_argument("--smoke", action="store_true", help="also train a tiny twin a few steps on CPU, merge, reload")
    p.add_argument("--smoke-steps", type=int, default=3)
    p.set_defaults(func=cmd_plan, takes_rest=True)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=cmd_recipes)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .checkpoints import CheckpointError
    from .config import RecipeError
    from .data import DataError
    from .models import ModelSourceError
    from .preflight import PreflightError

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    _quiet_libraries()
    try:
        return args.func(args, rest)
    except (RecipeError, DataError, ModelSourceError, CheckpointError, FileExistsError, FileNotFoundError,
            PreflightError) as e:
        print(f"adapters {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
