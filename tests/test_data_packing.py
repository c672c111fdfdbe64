"""Packing isolation (RELIABILITY row 8) and a real chat run whose training labels cover assistant tokens only."""

from __future__ import annotations

import json

import pytest
import torch

from adapters.data.encode import encode_rows, to_dataset
from adapters.data.rows import IGNORE_INDEX
from adapters.data.validate import read_rows

from .conftest import build_tokenizer, tiny_config, tiny_overrides


def _per_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of each label position (shifted as in causal LM training); -100 positions give 0."""
    lp = torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], reduction="none", ignore_index=-100)
    return lp


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sample_loss_same_packed_and_alone(tiny_data, attn):
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok)), attn_implementation=attn).eval()
    enc, _ = encode_rows(tok, read_rows(tiny_data["train"])[:3], max_length=128)
    packed = to_dataset(enc, pack_length=256)  # TRL best-fit-decreasing: all three rows in one sequence
    assert len(packed) == 1 and sorted(packed[0]["seq_lengths"]) == sorted(len(e.input_ids) for e in enc)
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)([packed[0]])
    assert "attention_mask" not in batch
    with torch.no_grad():
        # use_cache=False as SFTTrainer.compute_loss sets it: with a cache, transformers skips the packed-sequence
        # mask and samples would attend to each other
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        # negative control: the same tokens without the position restarts let samples attend to each other
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    ids, labels = packed[0]["input_ids"], batch["labels"][0]
    start, moved = 0, False
    for n in packed[0]["seq_lengths"]:
        alone_ids = torch.tensor(ids[start : start + n])[None]
        with torch.no_grad():
            alone = model(input_ids=alone_ids).logits[0]
        seg_labels = labels[start : start + n]
        assert (seg_labels != IGNORE_INDEX).any()
        a = _per_token_nll(alone, seg_labels)
        p = _per_token_nll(logits[start : start + n], seg_labels)
        torch.testing.assert_close(p, a, atol=1e-5, rtol=1e-5)
        assert torch.isclose(p.sum() / (seg_labels[1:] != -100).sum(), a.sum() / (seg_labels[1:] != -100).sum())
        moved |= not torch.allclose(_per_token_nll(leaky[start : start + n], seg_labels), a, atol=1e-4)
        start += n
    assert moved, "the control without position ids should differ for a later sample"


def test_chat_run_trains_assistant_tokens_only_packed(tiny_models, tiny_data, tmp_path, monkeypatch):
    import adapters.training.run as tr
    from adapters.config import load_recipe

    seen = {}
    real = tr.build_trainer

    def spy(model, tok, recipe, run, train_ds, eval_ds, **kw):
        trainer, guard = real(model, tok, recipe, run, train_ds, eval_ds, **kw)
        seen.update(tok=tok, ds=train_ds, trainer=trainer)
        return trainer, guard

    monkeypatch.setattr(tr, "build_trainer", spy)
    over = tiny_overrides(
        tiny_models["llama"],
        tiny_data,
        tmp_path,
        run_name="chat",
        max_steps=2,
        eval_base=False,
        eval_strategy="no",
        save_steps=50,
        packing=True,
        attn_implementation="sdpa",
    )
    over["test_file"] = None
    recipe, path = load_recipe("gemma3-270m-demo", over)
    run = tr.train(recipe, path)
    tok, ds = seen["tok"], seen["ds"]
    assert "seq_lengths" in ds.column_names and seen["trainer"].args.packing
    answers = {json.loads(line)["messages"][-1]["content"] for line in tiny_data["train"].read_text().splitlines()}
    found = []
    for ex in ds:
        start = 0
        for n in ex["seq_lengths"]:
            ids, labels = ex["input_ids"][start : start + n], ex["labels"][start : start + n]
            trained = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
            assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels))
            text = tok.decode(trained)
            assert text.endswith("<end_of_turn>\n") and text[: -len("<end_of_turn>\n")] in answers, text
            found.append(text)
            start += n
    assert len(found) == 32
    # what the collator hands the model keeps the same labels
    batch = seen["trainer"].data_collator([ds[0]])
    assert batch["labels"][0].tolist() == ds[0]["labels"] and "attention_mask" not in batch
    audit = json.loads((run / "data_audit.json").read_text())
    m = json.loads((run / "manifest.json").read_text())
    assert audit["problems"] == [] and m["data"]["audit"]["train"]["eos_trained"] and m["status"] == "complete"
    assert m["chat_template_sha256"] and m["data"]["sources"][0]["tokens"] > 0
