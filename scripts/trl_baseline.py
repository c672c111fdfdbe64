"""Plain TRL SFT, written as a user would, for the short-answer benchmark (docs/training.md#short-answers).

    python scripts/trl_baseline.py --format raw  --train data/region/train_pc.jsonl --test data/region/test.jsonl
    python scripts/trl_baseline.py --format chat --train data/region/train_pc.jsonl --test data/region/test.jsonl

Training is TRL's own: ``SFTTrainer`` on a prompt/completion dataset, ``peft_config=LoraConfig(...)``, ``SFTConfig``
with the demo recipe's numbers (LoRA r16 alpha 32 dropout 0.05 on all linear layers, lr 2e-4 cosine, 10% warmup,
30 steps of batch 8, max_length 128, seed 42) on the same base (embedded Gemma 3 270M, int8 via bitsandbytes, fp32
compute). ``--format raw``: the rows as TRL's non-conversational prompt/completion (strings: TRL joins them as text
and appends EOS); ``--format chat``: the same rows as conversational prompt/completion, rendered with the Gemma
chat template. Gradient checkpointing is off (as in the recipe; it changes the time, not the result). All training
rows are used (TRL has no val split here); 30 x 8 = 240 rows are seen either way.

Scoring uses the toolkit's evaluation (the same greedy generation, metrics and forgetting probe as `adapters eval`),
so the numbers compare with ours; the prompt is rendered exactly as TRL trained it (raw text with BOS, or the chat
template with a generation prompt). Writes OUT/eval.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", choices=("raw", "chat"), required=True)
    ap.add_argument("--train", required=True, help="JSONL of prompt/completion (strings) or messages rows")
    ap.add_argument("--test", required=True, help="held-out rows (any format the toolkit reads)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=42, help="LoRA init and data order (the recipe's seed)")
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
    from trl import SFTConfig, SFTTrainer

    from adapters.model.loading import builtin_template
    from adapters.model.sources import resolve_model

    out = Path(args.out or f"outputs/trl-{args.format}")
    out.mkdir(parents=True, exist_ok=True)
    path = resolve_model("embedded:gemma-3-270m").path  # the cached safetensors of the embedded Gemma 3 270M
    tok = AutoTokenizer.from_pretrained(path)
    # the rows as a user has them: prompt/completion strings (a messages file is read as its user/assistant turns)
    rows = [json.loads(line) for line in open(args.train, encoding="utf-8") if line.strip()]
    if "messages" in rows[0]:
        rows = [{"prompt": r["messages"][0]["content"], "completion": r["messages"][-1]["content"]} for r in rows]
    if args.format == "raw":
        ds = Dataset.from_list(rows)
    else:
        tok.chat_template = builtin_template("gemma")  # the base has none; the same Gemma template as ours
        ds = Dataset.from_list(
            [
                {
                    "prompt": [{"role": "user", "content": r["prompt"]}],
                    "completion": [{"role": "assistant", "content": r["completion"].strip()}],
                }
                for r in rows
            ]
        )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    config = SFTConfig(
        output_dir=str(out / "trl"),
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        max_length=128,
        seed=args.seed,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=5,
        save_strategy="no",
        report_to=[],
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    set_seed(args.seed)
    trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tok, peft_config=peft_config)
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    trainer.model.save_pretrained(str(out / "adapter"))

    # scoring: the toolkit's evaluation, with the prompt rendered as TRL trained it
    import dataclasses

    from adapters.config import load_recipe
    from adapters.evaluation.evaluate import evaluate_model

    if args.format == "raw":
        tok.chat_template = builtin_template("raw")  # BOS + the prompt text, as TRL tokenized it
    recipe, _ = load_recipe("gemma3-270m-demo", {})
    recipe = dataclasses.replace(recipe, test_file=args.test, base_kl_weight=0.0)
    history = [h for h in trainer.state.log_history if "loss" in h]
    ev = evaluate_model(trainer.model, tok, recipe, out, history)
    ev["train_seconds"] = round(seconds, 1)
    ev["trl_format"] = args.format
    (out / "eval.json").write_text(json.dumps(ev, indent=2))
    print(f"[trl-{args.format}] done in {seconds:.0f} s of training; {out / 'eval.json'}")


if __name__ == "__main__":
    main()
