"""Compare `adapters plan`'s training-memory estimate with the peak RSS growth of a real CPU run.

Run: PYTHONPATH=. python scripts/plan_memory_check.py [--hidden 512 --layers 4 --batch 16]
Builds a small random Llama-style model (no download), trains 3 steps of the demo data on CPU in fp32, samples the
process RSS every 2 ms during training, and prints measured peak growth over the loaded-model baseline next to the
estimate of what training adds (LoRA params + grads + optimizer, activations, logits). Each setting runs in its own
subprocess so allocator caches do not carry over.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from adapters.config import load_recipe
    from adapters.data.encode import encode_rows, to_dataset
    from adapters.data.validate import read_rows
    from adapters.model.lora import attach_lora
    from adapters.planning.memory import count_parameters, estimate
    from adapters.planning.smoke import _fallback_tokenizer
    from adapters.training.trainer import build_trainer
    from adapters.utils.memory import PeakRSS

    torch.manual_seed(0)
    torch.set_num_threads(1)
    rows = read_rows(str(REPO / "data/demo/train.jsonl"))
    tok = _fallback_tokenizer([m["content"] for r in rows for m in r.messages], "chatml")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    out = Path(tempfile.mkdtemp())
    recipe = load_recipe(
        "gemma3-270m-demo",
        dict(
            model_name_or_path=str(out),
            load_in_8bit=False,
            dtype="float32",
            max_steps=3,
            logging_steps=1,
            per_device_train_batch_size=args.batch,
            gradient_checkpointing=args.ckpt,
            report_to="none",
            eval_strategy="no",
            save_steps=1000,
            lora_dropout=args.dropout,
            max_length=128,
        ),
    )[0]
    enc, _ = encode_rows(tok, rows[: args.batch * 3], recipe.max_length)
    tokens = max(len(e.input_ids) for e in enc)  # the collator pads each batch to its longest row
    model = AutoModelForCausalLM.from_config(cfg)
    model = attach_lora(model, recipe)
    trainer, _ = build_trainer(model, tok, recipe, out, to_dataset(enc), None)
    import gc

    gc.collect()
    with PeakRSS(interval=0.002) as mem:
        trainer.train()
    counts = count_parameters(cfg, recipe)
    est = estimate(recipe, counts, tokens=tokens, overhead_bytes=0)
    predicted = est.lora + args.batch * (est.activations_per_sample + est.logits_per_sample)
    measured = mem.peak - mem.start
    return {
        "hidden": args.hidden,
        "layers": args.layers,
        "batch": args.batch,
        "tokens": tokens,
        "gradient_checkpointing": args.ckpt,
        "lora_dropout": args.dropout,
        "estimate_mib": round(predicted / 2**20, 1),
        "measured_mib": round(measured / 2**20, 1),
        "error_pct": round(100 * (predicted - measured) / measured, 1) if measured > 0 else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ckpt", type=lambda s: s.lower() == "true", default=None)
    ap.add_argument("--dropout", type=float, default=0.05)
    args = ap.parse_args()
    if args.ckpt is not None:
        print(json.dumps(one(args)))
        return 0
    for ckpt in (False, True):
        cmd = [
            sys.executable,
            __file__,
            "--hidden",
            str(args.hidden),
            "--layers",
            str(args.layers),
            "--batch",
            str(args.batch),
            "--ckpt",
            str(ckpt),
            "--dropout",
            str(args.dropout),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        print(line[-1] if line else res.stderr[-2000:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
