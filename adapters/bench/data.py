"""``adapters bench --data N``: our data stage against TRL's own dataset preparation, on N synthetic rows.

The rows are TRL's conversational prompt/completion (``{"prompt": [user turn], "completion": [assistant turn]}``,
about 200 characters), so both sides render the same chat template with the same tokenizer. Three parts, each in a
fresh Python process so that its peak RSS is its own (the tokenizer load is in every part and timed in none):

- ``ours``: file -> validated, cleaned, encoded and audited dataset (``data.pipeline.prepare_data``), cold cache;
- ``trl``: ``datasets.load_dataset("json")`` + TRL's own ``SFTTrainer._prepare_dataset`` (what its constructor
  runs on a raw dataset: chat template, tokenization, completion mask, truncation), on a trainer built for a tiny
  model with the same tokenizer and ``max_length``, and ``dataset_num_proc`` = every core (TRL's faster setting here)
  unless given (building the trainer is not timed);
- ``cached``: ``prepare_data`` again with the same key (the encoded-data cache's load).

Peak RSS is the part's own process (``ru_maxrss``); the worker processes of ``num_proc`` are reported apart
(``children_peak_rss_mb``: the largest single worker).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RECIPE = "gemma3-270m-demo"  # its tokenizer: the embedded Gemma 3 one (real vocabulary and template)
WORDS = (
    "catalogue price item red blue green widget size large small order ship stock return colour weight box "
    "cotton steel wooden pack set new used spare part model brand code fits warranty"
).split()


def write_rows(path: Path, n: int, seed: int = 0) -> Path:
    """N distinct prompt/completion rows of about 200 characters (prompt ~130, answer ~70)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            prompt = f"Row {i}: " + " ".join(rng.choice(WORDS) for _ in range(20))
            answer = " ".join(rng.choice(WORDS) for _ in range(11))
            row = {
                "prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": answer}],
            }
            f.write(json.dumps(row) + "\n")
    return path


def _recipe(file: Path, root: Path, max_length: int, num_proc: int | None, model: str | None = None):
    from adapters.config import load_recipe

    over = {"train_file": str(file), "eval_file": None, "test_file": None, "output_root": str(root)}
    over.update(max_length=max_length, dataset_num_proc=num_proc, **({"model_name_or_path": model} if model else {}))
    return load_recipe(RECIPE, over)[0]


def _tokenizer(recipe):
    from adapters.model.loading import load_tokenizer
    from adapters.model.sources import resolve_model

    return load_tokenizer(resolve_model(recipe.model_name_or_path), recipe)


def _ours(recipe, tok) -> dict[str, Any]:
    from adapters.data.pipeline import prepare_data

    t = time.perf_counter()
    train, _, _, report = prepare_data(recipe, tok, None, say=lambda s: None)
    return {"seconds": time.perf_counter() - t, "kept": len(train), "cache_hit": report["encoding"]["cache_hit"]}


def _trl(recipe, tok, file: Path, root: Path) -> dict[str, Any]:
    import datasets
    from transformers import AutoModelForCausalLM, Gemma3TextConfig
    from trl import SFTConfig, SFTTrainer

    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, head_dim=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg)  # tiny: the model is not what is timed
    args = SFTConfig(
        output_dir=str(root / "trl"),
        max_length=recipe.max_length,
        # TRL's rows go through Jinja and Python per row, so every core pays for it (2 cores, 50k rows: 2.0k rows/s
        # with 2 processes, 1.4k with 1): the baseline gets its faster setting unless the recipe names one.
        dataset_num_proc=recipe.dataset_num_proc or _cores(),
        report_to="none",
        use_cpu=True,
    )
    ready = datasets.Dataset.from_dict({"input_ids": [[tok.bos_token_id]]})  # already tokenized: nothing to prepare
    trainer = SFTTrainer(model=model, args=args, train_dataset=ready, processing_class=tok)
    t = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(file), split="train", cache_dir=str(root / "hf"))
    ds = trainer._prepare_dataset(ds, tok, args, False, None, "train")  # what SFTTrainer(train_dataset=ds) runs
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "kept": len(ds), "num_proc": args.dataset_num_proc}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def part(name: str, file: Path, root: Path, max_length: int, num_proc: int | None, model: str | None) -> dict:
    """One timed part in this process; its figures, with this process's peak RSS."""
    recipe = _recipe(file, root, max_length, num_proc, model)
    tok = _tokenizer(recipe)
    out = _trl(recipe, tok, file, root) if name == "trl" else _ours(recipe, tok)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["children_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    return out


def _run_part(name: str, file: Path, root: Path, max_length: int, num_proc: int | None, model: str | None) -> dict:
    cmd = [sys.executable, "-m", "adapters.bench.data", name, str(file), str(root), str(max_length), str(num_proc or 0)]
    cmd += [model or "-"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"bench --data part {name!r} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_data(
    n: int,
    out: str | Path = "outputs/bench",
    max_length: int = 128,
    num_proc: int | None = None,
    model: str | None = None,
    say=print,
) -> dict[str, Any]:
    """Time the three parts on N rows, print the table, write ``<out>/data.json``. ``model``: whose tokenizer and
    template (default: the demo recipe's, the embedded Gemma 3)."""
    from adapters.utils.atomic import write_json

    root = Path(tempfile.mkdtemp(prefix="adapters-bench-data-"))
    try:
        file = write_rows(root / "rows.jsonl", n)
        parts = {k: _run_part(k, file, root, max_length, num_proc, model) for k in ("ours", "trl", "cached")}
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the rows, TRL's Arrow cache and ours: GBs at 10^6 rows
    ours, trl, cached = parts["ours"], parts["trl"], parts["cached"]
    result = {
        "n": n,
        "max_length": max_length,
        "ours": {
            "rows_per_s": round(n / ours["seconds"], 1),
            "peak_rss_mb": ours["peak_rss_mb"],
            "cached_rerun_s": round(cached["seconds"], 2),
            "seconds": round(ours["seconds"], 2),
            "kept": ours["kept"],
            "children_peak_rss_mb": ours["children_peak_rss_mb"],
            "cached_peak_rss_mb": cached["peak_rss_mb"],
            "cached_hit": cached["cache_hit"],
        },
        "trl": {
            "rows_per_s": round(n / trl["seconds"], 1),
            "peak_rss_mb": trl["peak_rss_mb"],
            "seconds": round(trl["seconds"], 2),
            "kept": trl["kept"],
            "num_proc": trl["num_proc"],
            "children_peak_rss_mb": trl["children_peak_rss_mb"],
        },
    }
    path = Path(out) / "data.json"
    write_json(path, result)
    for line in table(result):
        say(line)
    say(f"-> {path}")
    return result


def table(r: dict[str, Any]) -> list[str]:
    o, t = r["ours"], r["trl"]
    return [
        f"data stage on {r['n']:,} rows (max_length {r['max_length']}, TRL's dataset_num_proc {t['num_proc']})",
        "| part | rows/s | seconds | peak RSS MB | child processes' peak RSS MB |",
        "|---|---|---|---|---|",
        f"| ours: validate+clean+encode+audit | {o['rows_per_s']:,.0f} | {o['seconds']} | {o['peak_rss_mb']} | "
        f"{o['children_peak_rss_mb']} |",
        f"| TRL: load_dataset + SFTTrainer preparation | {t['rows_per_s']:,.0f} | {t['seconds']} | "
        f"{t['peak_rss_mb']} | {t['children_peak_rss_mb']} |",
        f"| ours, cached rerun | {r['n'] / max(o['cached_rerun_s'], 1e-9):,.0f} | {o['cached_rerun_s']} | "
        f"{o['cached_peak_rss_mb']} | |",
    ]


if __name__ == "__main__":  # one part: name file root max_length num_proc (0 = default) model ("-" = default)
    name, file, root, max_length, num_proc, model = sys.argv[1:7]
    print(
        json.dumps(
            part(name, Path(file), Path(root), int(max_length), int(num_proc) or None, None if model == "-" else model)
        )
    )
