"""adapters export RUN_DIR|ORG/NAME --to DIR -> adapters.publish.export.export_run;
with --gguf -> adapters.publish.export.export_gguf (llama.cpp / Ollama files, checked by llama.cpp)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's adapter, tokenizer, chat template and card to a folder; or GGUF for llama.cpp/Ollama",
        epilog="examples: adapters export outputs/<run> --to DIR; adapters export outputs/<run> --gguf "
        "[--mode merged] [--outtype q8_0]",
    )
    p.add_argument("run_dir", help="outputs/<run>, an adapter folder, or a hub id ORG/NAME")
    p.add_argument("--to", help="target directory (PEFT export: required; GGUF: default RUN_DIR/gguf)")
    p.add_argument("--force", action="store_true", help="replace an existing target; keep GGUF files that fail")
    g = p.add_argument_group("GGUF (llama.cpp, Ollama)")
    g.add_argument("--gguf", action="store_true", help="write GGUF files, a Modelfile and export_report.json")
    g.add_argument(
        "--mode",
        choices=["lora", "merged"],
        default="lora",
        help="lora: adapter.gguf + base.gguf (default); merged: one model.gguf",
    )
    g.add_argument(
        "--outtype",
        default="f16",
        help="f16 (default), bf16, f32, q8_0; q4_0/q4_1/q5_0/q5_1 are refused for merged weights unless --force",
    )
    g.add_argument("--llama-cpp", metavar="DIR", help="a llama.cpp checkout: convert other families with its script")
    g.add_argument("--min-agreement", type=float, help="share of llama.cpp answers equal to the adapter's (0.95)")
    g.add_argument("--probes", type=int, default=20, help="number of probe prompts (first rows of the split)")
    g.add_argument("--probe-split", choices=["eval", "test"], default="eval", help="where the probe prompts come from")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    """GGUF: exit 1 when llama.cpp's answers disagree with the adapter's (unless --force)."""
    from adapters.publish.export import export_gguf, export_run
    from adapters.utils.errors import AdaptersError

    if args.gguf:
        report = export_gguf(
            args.run_dir,
            mode=args.mode,
            outtype=args.outtype,
            to=args.to,
            force=args.force,
            llama_cpp=args.llama_cpp,
            min_agreement=args.min_agreement,
            n_probes=args.probes,
            probe_split=args.probe_split,
        )
        return 1 if report["verdict"] == "fail" else 0
    if not args.to:
        raise AdaptersError("--to DIR is required (or --gguf for llama.cpp/Ollama files)")
    export_run(args.run_dir, args.to, force=args.force)
    return 0
