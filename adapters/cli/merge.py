"""adapters merge RUN_DIR -> adapters.publish.merge.merge_run; --adapters RUN… -> adapters.publish.combine."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from adapters.publish.merge import DEFAULT_MAX_KL, METHODS

    p = sub.add_parser(
        "merge",
        help="merge a run's adapter into a full-precision base, verified against the adapter",
        epilog="examples: adapters merge outputs/<run>; adapters merge --adapters outputs/a outputs/b "
        "--method ties --weights 1 1 --density 0.5 --out outputs/a+b --merged",
    )
    p.add_argument(
        "run_dir",
        nargs="?",
        help="outputs/<run> (or a hub id ORG/NAME): writes <run>/merged/ and <run>/merge_report.json",
    )
    p.add_argument(
        "--max-kl",
        type=float,
        default=DEFAULT_MAX_KL,
        help="largest mean KL (nats/token) allowed between merged model and adapter model; else exit 1",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier merged/; write merged/ (or --out) even when the check fails",
    )
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    """Exit 0 when the merged model passed its check (or --force, or nothing was checked), 1 when it failed."""
    from adapters.publish.merge import MergeError, merge_run

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
        report = merge_run(args.run_dir, max_kl=args.max_kl, force=args.force, dtype=args.dtype, n_probes=args.probes)
    return 0 if report.get("verdict") in ("pass", "forced", None) else 1
