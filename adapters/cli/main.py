"""The ``adapters`` command line. Each verb parses its arguments and calls one function of the package."""

from __future__ import annotations

import argparse
import os
import sys


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import warnings

    warnings.filterwarnings("ignore", message=".*gemm_4bit_forward.*")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices meant for library authors
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # per-call int8 dtype notes on CPU
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from adapters.config.recipe import load_recipe, parse_overrides
    from adapters.training.run import train

    overrides = parse_overrides(rest)
    resume = bool(overrides.pop("resume", False) or args.resume)
    recipe, path = load_recipe(args.recipe, overrides)
    train(recipe, path, resume=resume)
    return 0


def cmd_recipes(args: argparse.Namespace, rest: list[str]) -> int:
    from adapters.config.recipe import RECIPE_DIR

    for p in sorted(RECIPE_DIR.glob("*.yaml")):
        head = next((ln[1:].strip() for ln in p.read_text().splitlines() if ln.startswith("#")), "")
        print(f"{p.stem:28s} {head}")
    return 0


def cmd_data(args: argparse.Namespace, rest: list[str]) -> int:
    """adapters data check FILE…: every problem as file:line[:col]: field: message; exit 1 when there are any."""
    if args.data_verb == "audit":
        return _data_audit(args, rest)
    from adapters.data.validate import check

    columns = dict(kv.split("=", 1) for kv in args.columns) if args.columns else None
    quarantine = args.quarantine or ("quarantine.jsonl" if args.skip_invalid else None)
    res = check(args.files, args.format, columns, quarantine=quarantine if args.skip_invalid else None)
    for p in res.problems:
        print(p)
    print(
        f"{res.files} source(s), {res.rows} row(s): {res.valid} valid, {res.bad_rows} invalid, "
        f"{len(res.problems)} problem(s)",
        file=sys.stderr,
    )
    if res.bad_rows and args.skip_invalid:
        print(f"{res.bad_rows} invalid row(s) written to {res.quarantine}", file=sys.stderr)
        return 0
    return 1 if res.problems else 0


def _data_audit(args: argparse.Namespace, rest: list[str]) -> int:
    """adapters data audit RECIPE [--key value …]: the whole data stage with the recipe's tokenizer, no model."""
    from pathlib import Path

    from adapters.config.recipe import load_recipe, parse_overrides
    from adapters.data.pipeline import packing_guard, prepare_data
    from adapters.model.loading import load_tokenizer
    from adapters.model.sources import resolve_model

    recipe, _ = load_recipe(args.recipe, parse_overrides(rest))
    tok = load_tokenizer(resolve_model(recipe.model_name_or_path), recipe)
    packing_guard(recipe)
    prepare_data(recipe, tok, Path(args.out))
    print(f"audit -> {Path(args.out) / 'data_audit.json'}")
    return 0


def cmd_merge(args: argparse.Namespace, rest: list[str]) -> int:
    from adapters.publish.merge import MergeError, merge_run
    from adapters.publish.rundir import RunError

    try:
        if args.adapters:
            from adapters.publish.combine import combine_runs

            if not args.out:
                raise MergeError("--adapters needs --out DIR (where the combined adapter is written)")
            report = combine_runs(
                args.adapters,
                args.method,
                args.weights,
                args.density,
                args.out,
                merged=args.merged,
                force=args.force,
                max_kl=args.max_kl,
                dtype=args.dtype,
            )
        else:
            if not args.run_dir:
                raise MergeError("give a run directory (adapters merge outputs/<run>) or --adapters RUN_A RUN_B ...")
            report = merge_run(
                args.run_dir, max_kl=args.max_kl, force=args.force, dtype=args.dtype, n_probes=args.probes
            )
    except (MergeError, RunError) as e:
        print(f"adapters merge: error: {e}", file=sys.stderr)
        return 2
    return 0 if report.get("verdict") in ("pass", "forced", None) else 1


def cmd_export(args: argparse.Namespace, rest: list[str]) -> int:
    from adapters.publish.export import export_run
    from adapters.publish.merge import MergeError
    from adapters.publish.rundir import RunError

    try:
        export_run(args.run_dir, args.to, force=args.force)
    except (MergeError, RunError) as e:
        print(f"adapters export: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_plan(args: argparse.Namespace, rest: list[str]) -> int:
    from adapters.config.recipe import load_recipe, parse_overrides
    from adapters.planning.memory import plan
    from adapters.planning.smoke import smoke

    recipe, path = load_recipe(args.recipe, parse_overrides(rest))
    print(
        plan(
            recipe, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, nproc=args.nproc, accelerate_config=args.accelerate_config
        )
    )
    if args.smoke:
        r = smoke(recipe, path, steps=args.smoke_steps)
        print(
            f"smoke: ok in {r['seconds']}s on {r['twin']}: {r['steps']} steps, loss {r['train_loss']}, "
            f"quantization {r['quantization']}, merged+reloaded logits max diff {r['merge_max_abs_diff']:.1e}"
        )
        print(f"smoke: changed for a CPU run of seconds: {r['adjusted']}")
    return 0


def cmd_push(args: argparse.Namespace, rest: list[str]) -> int:
    from adapters.publish.hub import push

    push(
        args.run_dir,
        args.repo_id,
        merged=args.merged,
        private=args.private,
        revision=args.revision,
        endpoint=args.endpoint,
        dry_run=args.dry_run,
        datasets=args.dataset,
        timeout=args.timeout,
    )
    return 0


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    import dataclasses

    from adapters.bench.throughput import BenchOptions, bench, passed
    from adapters.config.recipe import parse_overrides

    options = BenchOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchOptions)})
    return 0 if passed(bench(options, overrides=parse_overrides(rest))) else 1


def cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    from adapters.evaluation.evaluate import evaluate_run

    ev = evaluate_run(
        args.run_dir, base=not args.no_base, limit=args.limit, probe_file=args.probe, probe_only=args.probe_only
    )
    return 1 if args.strict and any(f["name"] == "negative_transfer" for f in ev["flags"]) else 0


def cmd_generate(args: argparse.Namespace, rest: list[str]) -> int:
    from adapters.evaluation.generate import run_generate

    which = "merged" if args.merged else "base" if args.base else "tuned"
    run_generate(args.run_dir, args.prompt, which, args.max_new_tokens, args.system)
    return 0


def cmd_sweep(args: argparse.Namespace, rest: list[str]) -> int:
    from adapters.config.recipe import load_recipe, parse_overrides
    from adapters.training.sweep import sweep

    overrides = parse_overrides(rest)
    recipe, path = load_recipe(args.recipe, overrides)
    sweep(recipe, path, args.trials, overrides, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="adapters", description=__doc__)
    sub = ap.add_subparsers(dest="verb", required=True)

    p = sub.add_parser(
        "train",
        help="fine-tune with a recipe; any recipe key can be overridden with --key value",
        epilog="example: adapters train gemma3-270m-demo --max_steps 10 --run_name quick",
    )
    p.add_argument("recipe", help="a recipe YAML path or the name of a shipped recipe (see `adapters recipes`)")
    p.add_argument("--resume", action="store_true", help="continue the run from its last complete checkpoint")
    p.set_defaults(func=cmd_train, takes_rest=True)

    p = sub.add_parser(
        "plan",
        help="preflight checks, per-GPU memory estimate, largest micro-batch; --smoke runs "
        "the recipe on a tiny random twin of its model",
        epilog="example: adapters plan "
        "llama-3.2-1b-qlora --gpus 8 --gpu-mem 24 --accelerate-config fsdp2-qlora --smoke",
    )
    p.add_argument("recipe", help="a recipe YAML path or a shipped recipe name; --key value overrides follow")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per run (processes, unless --nproc)")
    p.add_argument("--gpu-mem", type=float, default=24.0, help="memory of one GPU in GiB (default 24)")
    p.add_argument("--nproc", type=int, default=None, help="processes (overrides the accelerate config's)")
    from adapters.planning.preflight import CONFIG_DIR

    p.add_argument(
        "--accelerate-config",
        default=None,
        help="an accelerate config file or a shipped name: "
        + ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))),
    )
    p.add_argument("--smoke", action="store_true", help="also train a tiny twin a few steps on CPU, merge, reload")
    p.add_argument("--smoke-steps", type=int, default=3)
    p.set_defaults(func=cmd_plan, takes_rest=True)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("data", help="data tools: `adapters data check FILE…` validates every row")
    dsub = p.add_subparsers(dest="data_verb", required=True)
    c = dsub.add_parser(
        "check",
        help="report every problem as file:line[:col]: field: message; exit 1 on errors",
        epilog="example: adapters data check data/demo/train.jsonl --skip-invalid",
    )
    c.add_argument("files", nargs="+", help=".jsonl/.json/.csv/.parquet files, directories or save_to_disk folders")
    c.add_argument(
        "--format",
        choices=["chat", "prompt_completion", "alpaca", "text"],
        default=None,
        help="force a format (default: detect per row)",
    )
    c.add_argument("--columns", nargs="*", metavar="NAME=COLUMN", help="map columns, e.g. prompt=question")
    c.add_argument("--skip-invalid", action="store_true", help="write bad rows to the quarantine file, exit 0")
    c.add_argument("--quarantine", default=None, help="quarantine file (default: ./quarantine.jsonl)")
    c.set_defaults(func=cmd_data)
    c = dsub.add_parser(
        "audit",
        help="validate, clean, split and audit a recipe's data with its tokenizer (no model)",
        epilog="example: adapters data audit gemma3-270m-demo --max_length 64",
    )
    c.add_argument("recipe", help="a recipe YAML path or a shipped recipe name; --key value overrides follow")
    c.add_argument("--out", default="outputs/data-audit", help="folder for data_audit.json (and quarantine.jsonl)")
    c.set_defaults(func=cmd_data, takes_rest=True)

    from adapters.publish.merge import DEFAULT_MAX_KL, METHODS

    p = sub.add_parser(
        "merge",
        help="merge a run's adapter into a full-precision base, verified against the adapter",
        epilog="examples: adapters merge outputs/<run>; adapters merge --adapters outputs/a outputs/b "
        "--method ties --weights 1 1 --density 0.5 --out outputs/a+b --merged",
    )
    p.add_argument("run_dir", nargs="?", help="outputs/<run>: writes <run>/merged/ and <run>/merge_report.json")
    p.add_argument(
        "--max-kl",
        type=float,
        default=DEFAULT_MAX_KL,
        help="largest mean KL (nats/token) allowed between merged model and adapter model; else exit 1",
    )
    p.add_argument("--force", action="store_true", help="write merged/ (or --out) even when the check fails")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="merge precision (default: the recipe's dtype)")
    p.add_argument("--probes", type=int, default=8, help="probe prompts taken from the eval split")
    p.add_argument("--adapters", nargs="+", metavar="RUN", help="combine these runs' adapters (same base) instead")
    p.add_argument("--method", choices=METHODS, default="linear", help="PEFT add_weighted_adapter combination_type")
    p.add_argument(
        "--weights",
        nargs="+",
        type=float,
        help="one weight per adapter (default: 1/n for linear and cat, 1.0 for the others)",
    )
    p.add_argument("--density", type=float, help="share of values kept by ties/dare/magnitude_prune (default 0.5)")
    p.add_argument("--out", help="with --adapters: the new run-like directory (adapter/, manifest, report)")
    p.add_argument("--merged", action="store_true", help="with --adapters: also merge the combination (<out>/merged)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write a run's adapter, tokenizer, chat template and model card to a folder")
    p.add_argument("run_dir", help="outputs/<run>")
    p.add_argument("--to", required=True, help="target directory (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing target directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "push",
        help="share a run on a model hub: adapter (or merged model), tokenizer, card; "
        "the token comes from HF_TOKEN or `hf auth login`",
        epilog="example: adapters push outputs/demo --repo-id me/demo-lora --dry-run",
    )
    p.add_argument("run_dir", help="a finished run directory (outputs/<run_name>)")
    p.add_argument("--repo-id", required=True, help="ORG/NAME of the model repo (created if needed)")
    p.add_argument("--merged", action="store_true", help="push RUN_DIR/merged instead of the adapter")
    p.add_argument("--private", action="store_true", help="create the repo private (ignored if it exists)")
    p.add_argument("--revision", help="branch to commit to (created from main if needed); default main")
    p.add_argument("--endpoint", help="hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--dataset", action="append", default=[], help="data set id for the card metadata (repeatable)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a hub request is retried")
    p.add_argument("--dry-run", action="store_true", help="list the files (size, sha256) and write the card only")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser(
        "bench",
        help="plain TRL+PEFT baseline vs our path: tokens/s, memory, MFU, loss gate",
        epilog="example: adapters bench --scenarios ragged --padding_free false  (force a switch)",
    )
    p.add_argument(
        "--model",
        help="architecture shape: tiny-llama (CPU default), llama-3.2-1b (GPU default), "
        "llama-3.1-8b, qwen2.5-1.5b, tiny-qwen2",
    )
    p.add_argument(
        "--scenarios",
        default=("fixed", "ragged"),
        type=lambda s: tuple(x for x in s.split(",") if x),
        help="comma list of fixed, ragged",
    )
    p.add_argument("--steps", type=int, help="optimizer steps per run (CPU 5, GPU 25)")
    p.add_argument("--warmup", type=int, help="untimed first steps (CPU 1, GPU 5)")
    p.add_argument("--batch", type=int, help="per-device batch, fixed scenario (4)")
    p.add_argument("--ragged-batch", type=int, help="per-device batch, ragged scenario (8)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-len", type=int, help="fixed length and ragged cap (CPU 256, GPU 2048)")
    p.add_argument("--median", type=int, help="ragged median length (CPU 80, GPU 600)")
    p.add_argument("--quant", choices=["nf4", "none"], help="base quantization of both runs (GPU nf4, CPU none)")
    p.add_argument("--gate-batches", type=int, default=2, help="first micro-batches whose losses must agree")
    p.add_argument("--out", default="outputs/bench", help="where bench.json and bench.md go")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads during a CPU bench (1: steadiest on a shared machine)"
    )
    p.set_defaults(func=cmd_bench, takes_rest=True)

    p = sub.add_parser(
        "eval",
        help="base vs tuned on the held-out split, forgetting probe, flags -> eval.json, report.md",
        epilog="example: adapters eval outputs/gemma3-270m-demo-20260101-120000 --limit 20",
    )
    p.add_argument("run_dir", help="a finished run directory (outputs/<run_name>)")
    p.add_argument("--no-base", action="store_true", help="score the tuned model only")
    p.add_argument("--limit", type=int, default=None, help="score at most N held-out rows")
    p.add_argument("--strict", action="store_true", help="exit 1 when the negative-transfer flag is raised")
    p.add_argument("--probe", default=None, help="forgetting-probe text file (passages separated by blank lines)")
    p.add_argument("--probe-only", action="store_true", help="run only the forgetting probe; print it, write nothing")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "generate",
        help="answer prompts with a run's model and chat template (stdin lines if no --prompt)",
        epilog="example: adapters generate outputs/<run> --prompt 'Format: ...'",
    )
    p.add_argument("run_dir", help="a finished run directory (outputs/<run_name>)")
    p.add_argument("--prompt", default=None, help="one prompt; without it, each stdin line is a prompt")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--merged", action="store_true", help="use RUN_DIR/merged (from `adapters merge`)")
    g.add_argument("--base", action="store_true", help="use the base model without the adapter")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--system", default=None, help="an optional system message")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "sweep",
        help="Optuna search (TPE + median pruning on validation loss); writes the best recipe",
        epilog="example: adapters sweep gemma3-270m-demo --trials 3 --max_steps 10",
    )
    p.add_argument("recipe", help="a recipe YAML path or the name of a shipped recipe")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--out", default=None, help="sweep directory (default outputs/sweep-<recipe>-<time>)")
    p.set_defaults(func=cmd_sweep, takes_rest=True)
    return ap


def main(argv: list[str] | None = None) -> int:
    from adapters.bench.throughput import BenchError
    from adapters.config.recipe import RecipeError
    from adapters.data.rows import DataError
    from adapters.evaluation.forgetting import ProbeError
    from adapters.model.sources import ModelSourceError
    from adapters.planning.preflight import PreflightError
    from adapters.publish.hub import HubError
    from adapters.publish.rundir import RunError
    from adapters.training.checkpoints import CheckpointError
    from adapters.training.speed import FastPathError

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    _quiet_libraries()
    try:
        return args.func(args, rest)
    except (
        RecipeError,
        DataError,
        BenchError,
        FastPathError,
        ModelSourceError,
        CheckpointError,
        HubError,
        RunError,
        ProbeError,
        PreflightError,
        FileExistsError,
        FileNotFoundError,
    ) as e:
        print(f"adapters {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
