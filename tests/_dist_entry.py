"""Entry point for the multi-process tests: `accelerate launch ... tests/_dist_entry.py train RECIPE ...`.

Runs `adapters.cli.main` unchanged, plus two observers per rank, written to $ADAPTERS_TRACE_DIR/rank<R>.json:
- the training samples this rank's data loader produced (a hash of each example's input_ids);
- every file or folder this rank created, wrote, renamed or removed under $ADAPTERS_TRACE_WATCH (Python audit hooks).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
from pathlib import Path

TRACE = Path(os.environ["ADAPTERS_TRACE_DIR"])
WATCH = os.path.realpath(os.environ["ADAPTERS_TRACE_WATCH"])
RANK = int(os.environ.get("RANK", "0"))
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
record: dict = {"rank": RANK, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "samples": [], "writes": []}


def _under_watch(p) -> bool:
    try:
        return os.path.realpath(os.fsdecode(p)).startswith(WATCH)
    except (TypeError, ValueError):
        return False


def _audit(event: str, args) -> None:
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & WRITE_FLAGS
        )
        if writing and _under_watch(path):
            record["writes"].append([event, os.fsdecode(path)])
    elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.move"):
        if args and _under_watch(args[0]):
            record["writes"].append([event, os.fsdecode(args[0])])


TRAINERS: list = []


def _dump() -> None:
    if TRAINERS:  # how the parameters ended up: DTensor shards under FSDP2, plain tensors under DDP
        from adapters.training.distributed import sharding

        trainer = TRAINERS[0]
        record["sharding"] = sharding(trainer)
        record["param_types"] = sorted({type(p).__name__ for p in trainer.model.parameters()})
    TRACE.mkdir(parents=True, exist_ok=True)
    (TRACE / f"rank{RANK}.json").write_text(json.dumps(record))


def _trace_collator(trainer) -> None:
    """The training DataLoader gets a collator that records each example; evaluation loaders keep the plain one."""
    inner = trainer.data_collator
    get_train_dataloader = trainer.get_train_dataloader

    def collate(features):
        for f in features:
            record["samples"].append(hashlib.sha1(json.dumps(list(f["input_ids"])).encode()).hexdigest()[:16])
        return inner(features)

    def traced_train_dataloader(*a, **kw):
        trainer.data_collator = collate
        try:
            return get_train_dataloader(*a, **kw)
        finally:
            trainer.data_collator = inner

    trainer.get_train_dataloader = traced_train_dataloader


def _sleep_callback(seconds: float):
    """Sleeps after each step (so a test can kill a rank mid-run) and writes the step this rank finished."""
    import time

    from transformers import TrainerCallback

    class SleepAfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            TRACE.mkdir(parents=True, exist_ok=True)
            (TRACE / f"rank{RANK}.step").write_text(str(state.global_step))
            time.sleep(seconds)

    return SleepAfterStep()


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import adapters.training.run as train_mod
    from adapters.cli import main as cli_main

    build = train_mod.build_trainer

    def build_traced(*a, **kw):
        trainer, guard = build(*a, **kw)
        _trace_collator(trainer)
        if os.environ.get("ADAPTERS_TRACE_STEP_SLEEP"):  # slows steps so a test can kill a rank mid-run
            trainer.add_callback(_sleep_callback(float(os.environ["ADAPTERS_TRACE_STEP_SLEEP"])))
        TRAINERS.append(trainer)
        return trainer, guard

    train_mod.build_trainer = build_traced
    atexit.register(_dump)
    sys.addaudithook(_audit)
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
