"""Fixtures: tiny random models (Llama, Qwen2, Gemma3) and a tokenizer, built inside the test process.

No model or data set is downloaded. The tokenizer is a byte-level BPE trained in-process on the demo data, with the
special tokens of the Gemma chat format, so the real templates and label masks are exercised.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def _corpus() -> list[str]:
    lines = []
    for split in ("train", "val", "test"):
        for line in (DEMO / f"{split}.jsonl").read_text().splitlines():
            for m in json.loads(line)["messages"]:
                lines.append(m["content"])
    return lines + ["user", "model", "assistant", "system", "Hello world. The quick brown fox."]


def build_tokenizer(pad_is_eos: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<eos>" if pad_is_eos else "<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    tok.chat_template = (REPO / "adapters" / "templates" / "gemma.jinja").read_text()
    return tok


def tiny_config(arch: str, vocab_size: int, **overrides):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        initializer_range=0.2,
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, head_dim=8, sliding_window=64, tie_word_embeddings=True)
    raise ValueError(arch)


def build_model_dir(path: Path, arch: str, pad_is_eos: bool = False, seed: int = 0, **overrides) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = build_tokenizer(pad_is_eos=pad_is_eos)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok), **overrides))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: build_model_dir(root / arch, arch) for arch in ("llama", "qwen2", "gemma3")}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """A 32/8/8-row slice of the demo data."""
    root = tmp_path_factory.mktemp("data")
    out = {}
    for split, n in (("train", 32), ("val", 8), ("test", 8)):
        lines = (DEMO / f"{split}.jsonl").read_text().splitlines()[:n]
        out[split] = root / f"{split}.jsonl"
        out[split].write_text("\n".join(lines) + "\n")
    return out


def tiny_overrides(model_dir: Path, data: dict[str, Path], out_root: Path, **extra) -> dict:
    """Recipe overrides that make any recipe run in seconds on a tiny model."""
    base = dict(
        model_name_or_path=str(model_dir),
        train_file=str(data["train"]),
        eval_file=str(data["val"]),
        test_file=str(data["test"]),
        output_root=str(out_root),
        load_in_8bit=False,
        load_in_4bit=False,
        dtype="float32",
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        warmup_steps=0,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=3,
        save_steps=3,
        report_to="none",
        gradient_checkpointing=False,
        eval_max_new_tokens=8,
        lora_dropout=0.0,
        max_length=128,
    )
    base.update(extra)
    return base
