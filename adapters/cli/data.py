"""adapters data check FILE… -> adapters.data.validate.check; adapters data audit RECIPE -> data.pipeline.prepare_data."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser("data", help="data tools: 'adapters data check FILE…' validates every row")
    dsub = p.add_subparsers(dest="data_verb", required=True)
    c = dsub.add_parser(
        "check",
        help="report every problem as file:line[:col]: field: message; exit 1 on errors",
        epilog="example: adapters data check data/demo/train.jsonl --skip-invalid",
    )
    c.add_argument("files", nargs="+", help=".jsonl/.json/.csv/.parquet files, directories or save_to_disk folders")
    c.add_argument(
        "--format",
        choices=["chat", "prompt_completion", "alpaca", "text", "preference"],
        default=None,
        help="force a format (default: detect per row; preference: prompt/chosen/rejected pairs or KTO rows, "
        "detected from the first row)",
    )
    c.add_argument("--columns", nargs="*", metavar="NAME=COLUMN", help="map columns, e.g. prompt=question")
    c.add_argument("--skip-invalid", action="store_true", help="write bad rows to the quarantine file, exit 0")
    c.add_argument("--quarantine", default=None, help="quarantine file (default: ./quarantine.jsonl)")
    c.set_defaults(func=check)
    c = dsub.add_parser(
        "audit",
        help="validate, clean, split and audit a recipe's data with its tokenizer (no model); with --streaming true, "
        "the first streaming_audit_rows rows",
        epilog="example: adapters data audit gemma3-270m-demo --max_length 64",
    )
    c.add_argument("recipe", help="a recipe YAML path or a shipped recipe name; --key value overrides follow")
    c.add_argument("--out", default="outputs/data-audit", help="folder for data_audit.json (and quarantine.jsonl)")
    c.set_defaults(func=audit, takes_rest=True)


def check(args: argparse.Namespace, rest: list[str]) -> int:
    """Every problem as file:line[:col]: field: message on stdout, a summary on stderr; exit 1 when there are any."""
    from adapters.data.preference import check_preference_files, sniff_preference
    from adapters.data.validate import check

    columns = dict(kv.split("=", 1) for kv in args.columns) if args.columns else None
    if args.format == "preference" or (args.format is None and all(map(sniff_preference, args.files))):
        problems, rows, valid = check_preference_files(args.files, columns)  # pairs or KTO rows
        for p in problems:
            print(p)
        print(
            f"{len(args.files)} preference source(s), {rows} row(s): {valid} valid, {rows - valid} invalid, "
            f"{len(problems)} problem(s)",
            file=sys.stderr,
        )
        return 1 if problems else 0
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
        if all(p.line is not None for p in res.problems):  # a source with no rows cannot be set aside
            return 0
    return 1 if res.problems else 0


def audit(args: argparse.Namespace, rest: list[str]) -> int:
    """The whole data stage with the recipe's tokenizer, no model."""
    from pathlib import Path

    from adapters.config import load_recipe, parse_overrides
    from adapters.data.pipeline import prepare_data
    from adapters.model.loading import load_tokenizer
    from adapters.model.sources import resolve_model

    recipe, _ = load_recipe(args.recipe, parse_overrides(rest))
    tok = load_tokenizer(resolve_model(recipe.model_name_or_path), recipe)
    if recipe.preference:  # pairs / KTO rows (data/preference.py)
        from adapters.data.preference import prepare_preference

        prepare_preference(recipe, tok, Path(args.out))
    elif recipe.streaming:  # the audit of the first streaming_audit_rows rows (data/streaming.py)
        from adapters.data.pipeline import packing_guard
        from adapters.data.streaming import prepare_stream

        prepare_stream(recipe, tok, Path(args.out), packed=packing_guard(recipe), training=False)
    else:
        prepare_data(recipe, tok, Path(args.out))  # decides packing itself
    print(f"audit -> {Path(args.out) / 'data_audit.json'}")
    return 0
