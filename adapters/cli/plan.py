"""adapters plan RECIPE [--key value …] -> adapters.planning.memory.plan (and planning.smoke.smoke with --smoke)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from adapters.planning.preflight import CONFIG_DIR

    p = sub.add_parser(
        "plan",
        help="preflight checks, per-GPU memory estimate, largest micro-batch; --smoke runs "
        "the recipe on a tiny random twin of its model",
        epilog="example: adapters plan "
        "llama-3.2-1b-qlora --gpus 8 --gpu-mem 24 --accelerate-config fsdp2-qlora --smoke",
    )
    p.add_argument("recipe", help="a recipe YAML path or a shipped recipe name; --key value overrides follow")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per machine (processes, unless --nproc)")
    p.add_argument("--nodes", type=int, default=1, help="machines; processes = nodes x gpus (default 1)")
    p.add_argument("--gpu-mem", type=float, default=24.0, help="memory of one GPU in GiB (default 24)")
    p.add_argument("--nproc", type=int, default=None, help="processes (overrides the accelerate config's)")
    p.add_argument(
        "--accelerate-config",
        default=None,
        help="an accelerate config file or a shipped name: "
        + ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))),
    )
    p.add_argument("--smoke", action="store_true", help="also train a tiny twin a few steps on CPU, merge, reload")
    p.add_argument("--smoke-steps", type=int, default=3)
    p.set_defaults(func=run, takes_rest=True)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from adapters.config import load_recipe, parse_overrides
    from adapters.planning.memory import plan

    recipe, path = load_recipe(args.recipe, parse_overrides(rest))
    print(
        plan(
            recipe,
            gpus=args.gpus,
            gpu_mem_gib=args.gpu_mem,
            nproc=args.nproc,
            accelerate_config=args.accelerate_config,
            nodes=args.nodes,
            recipe_name=args.recipe,
        )
    )
    if args.smoke:
        from adapters.planning.smoke import smoke

        r = smoke(recipe, path, steps=args.smoke_steps)
        print(
            f"smoke: ok in {r['seconds']}s on {r['twin']}: {r['steps']} steps, loss {r['train_loss']}, "
            f"quantization {r['quantization']}, merged+reloaded logits max diff {r['merge_max_abs_diff']:.1e}"
        )
        print(f"smoke: changed for a CPU run of seconds: {r['adjusted']}")
    return 0
