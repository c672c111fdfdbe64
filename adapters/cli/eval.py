"""adapters eval RUN_DIR -> adapters.evaluation.evaluate.evaluate_run."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="base vs tuned on the held-out split, forgetting probe, flags -> eval.json, report.md",
        epilog="example: adapters eval outputs/gemma3-270m-demo-20260101-120000 --limit 20",
    )
    p.add_argument("run_dir", help="a finished run directory (outputs/<run_name>) or a hub id ORG/NAME")
    p.add_argument("--no-base", action="store_true", help="score the tuned model only")
    p.add_argument("--limit", type=int, default=None, help="score at most N held-out rows")
    p.add_argument("--strict", action="store_true", help="exit 1 when the negative-transfer flag is raised")
    p.add_argument("--probe", default=None, help="forgetting-probe text file (passages separated by blank lines)")
    p.add_argument("--probe-only", action="store_true", help="run only the forgetting probe; print it, write nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from adapters.evaluation.evaluate import evaluate_run

    ev = evaluate_run(
        args.run_dir, base=not args.no_base, limit=args.limit, probe_file=args.probe, probe_only=args.probe_only
    )
    return 1 if args.strict and any(f["name"] == "negative_transfer" for f in ev["flags"]) else 0
