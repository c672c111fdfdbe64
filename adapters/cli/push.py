"""adapters push RUN_DIR --repo-id ID -> adapters.publish.hub.push."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "push",
        help="share a run on a model hub: adapter (or merged model), tokenizer, card; "
        "the token comes from HF_TOKEN or 'hf auth login'",
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
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
