"""The DPO speed levers (adapters/training/preference_speed.py) against TRL's plain DPOTrainer: the same loss and the
same LoRA gradients on the same batch (tiny Gemma 3, fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.config import load_recipe

from .conftest import DEMO, tiny_overrides


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pref")
    out = {}
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        lines = (DEMO / f"pref_{split}.jsonl").read_text().splitlines()[:n]
        out[split] = root / f"{split}.jsonl"
        out[split].write_text("\n".join(lines) + "\n")
    return out


def _recipe(tiny_models, pref_data, tmp_path, **extra):
    over = tiny_overrides(tiny_models["gemma3"], pref_data, tmp_path, trainer="dpo", eval_strategy="no", **extra)
    over.pop("eval_steps")
    over["base_kl_weight"] = 0.0
    return load_recipe("gemma3-270m-demo", over)[0]


def _perturb(model, seed: int = 7) -> None:
    """Move the trained adapter away from the reference (LoRA B = 0 would hide a wrong gradient through A)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _loss_and_grads(trainer, model, batch, levers: bool):
    from adapters.compat.trl import trained_positions_only

    model.train()
    model.zero_grad()
    with trained_positions_only(levers):
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def test_dpo_levers_give_trl_plain_loss_and_gradients(tiny_models, pref_data, tmp_path):
    """Ours: build_preference_trainer (completion positions only, through the lean kernel; reference log-probs
    precomputed in the constructor under the same switch). Plain: DPOTrainer(PeftModel, ref_model=None) as a user
    writes it, reference in every step, every position scored. Same model, adapter, batch."""
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from adapters.data.preference import prepare_preference
    from adapters.model.loading import load_model, load_tokenizer
    from adapters.model.lora import attach_lora
    from adapters.model.sources import resolve_model
    from adapters.training.preference import build_preference_trainer

    recipe = _recipe(tiny_models, pref_data, tmp_path, lora_dropout=0.0)
    ref = resolve_model(recipe.model_name_or_path)
    tok = load_tokenizer(ref, recipe)
    train_ds, _, _ = prepare_preference(recipe, tok, None, say=lambda *_: None, write=False)

    set_seed(0)
    ours_model = attach_lora(load_model(ref, recipe), recipe)
    ours, _ = build_preference_trainer(ours_model, tok, recipe, tmp_path / "ours", train_ds, None)
    assert ours.fast_path["trained_positions_only"]["value"] is True
    assert ours.fast_path["precompute_ref_log_probs"]["value"] is True
    assert "ref_chosen_logps" in ours.train_dataset.column_names  # the reference ran once, in the constructor

    set_seed(0)
    plain_model = attach_lora(load_model(ref, recipe), recipe)
    args = DPOConfig(
        output_dir=str(tmp_path / "plain"),
        per_device_train_batch_size=4,
        max_length=recipe.max_length,
        bf16=False,
        use_cpu=True,
        report_to=[],
        beta=recipe.beta,
    )
    plain = DPOTrainer(model=plain_model, ref_model=None, args=args, train_dataset=train_ds, processing_class=tok)
    assert not plain.precompute_ref_logps
    for m in (ours_model, plain_model):
        _perturb(m)

    rows = [ours.train_dataset[i] for i in range(4)]
    batch_ours = ours._prepare_inputs(ours.data_collator(rows))
    batch_plain = plain._prepare_inputs(plain.data_collator([plain.train_dataset[i] for i in range(4)]))
    assert torch.equal(batch_ours["input_ids"], batch_plain["input_ids"])  # the same tokens
    assert (batch_ours["completion_mask"] == 0).any()  # prompt positions: work the levers skip

    l_ours, g_ours = _loss_and_grads(ours, ours_model, batch_ours, levers=True)
    l_plain, g_plain = _loss_and_grads(plain, plain_model, batch_plain, levers=False)
    assert abs(float(l_plain) - 0.6931) > 1e-3  # the policy differs from the reference: the reference matters
    torch.testing.assert_close(l_ours, l_plain, rtol=1e-5, atol=1e-6)
    assert set(g_ours) == set(g_plain) and g_plain
    for n in g_plain:
        torch.testing.assert_close(g_ours[n], g_plain[n], rtol=1e-4, atol=1e-7, msg=n)
    assert any(g.abs().sum() > 0 for g in g_ours.values())


def test_preference_plan_reports_the_switches(tiny_models, pref_data, tmp_path):
    from adapters.training import preference_speed

    plan = preference_speed.plan(_recipe(tiny_models, pref_data, tmp_path))
    assert plan["trained_positions_only"]["value"] is True and plan["precompute_ref_log_probs"]["value"] is True
    off = preference_speed.plan(
        _recipe(tiny_models, pref_data, tmp_path, trained_positions_only=False, precompute_ref_log_probs=False)
    )
    assert off["trained_positions_only"]["value"] is False and off["trained_positions_only"]["source"] == "recipe"
    assert off["precompute_ref_log_probs"] == {
        "value": False,
        "source": "recipe",
        "why": "the reference runs in every step",
    }
