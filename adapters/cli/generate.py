"""adapters generate RUN_DIR [--prompt P] -> adapters.evaluation.generate.run_generate."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="answer prompts with a run's model and chat template (stdin lines if no --prompt)",
        epilog="example: adapters generate outputs/<run> --prompt 'Format: ...'",
    )
    p.add_argument("run_dir", help="a finished run directory (outputs/<run_name>) or a hub id ORG/NAME")
    p.add_argument("--prompt", default=None, help="one prompt; without it, each stdin line is a prompt")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--merged", action="store_true", help="use RUN_DIR/merged (from 'adapters merge')")
    g.add_argument("--base", action="store_true", help="use the base model without the adapter")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--system", default=None, help="an optional system message")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from adapters.evaluation.generate import run_generate

    which = "merged" if args.merged else "base" if args.base else "tuned"
    run_generate(args.run_dir, args.prompt, which, args.max_new_tokens, args.system)
    return 0
