"""adapters export RUN_DIR --to DIR -> adapters.publish.export.export_run."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("export", help="write a run's adapter, tokenizer, chat template and model card to a folder")
    p.add_argument("run_dir", help="outputs/<run>")
    p.add_argument("--to", required=True, help="target directory (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing target directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from adapters.publish.export import export_run

    export_run(args.run_dir, args.to, force=args.force)
    return 0
