"""The benchmark, its correctness gate, and the optimized path's switches (CPU, tiny shapes, no timing asserts)."""

from __future__ import annotations

import json

import pytest
import torch

from adapters.bench.throughput import BenchError, BenchOptions, bench, gate, make_lengths
from adapters.config import RecipeError, load_recipe
from adapters.training import speed as fast

from .conftest import tiny_overrides


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    opts = BenchOptions(
        model="tiny-llama", scenarios=("ragged",), steps=3, warmup=1, ragged_batch=4, max_len=64, median=24, out=out
    )
    res = bench(opts, log=lambda *_: None)
    return out, res


def test_bench_writes_both_rows_and_a_gate(tiny_bench):
    out, res = tiny_bench
    saved = json.loads((out / "bench.json").read_text())
    assert [r["path"] for r in saved["rows"]] == ["baseline", "ours"]
    base, ours = saved["rows"]
    for r in (base, ours):
        assert r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 and r["time_to_first_step_s"] > 0
        assert 0 < r["mfu_vs_measured"] and 0 < r["mfu_vs_989"] < r["mfu_vs_measured"]
        assert len(r["losses"]) == 2
    # both runs counted the same real tokens; the baseline computed padding on top
    assert base["real_tokens"] == ours["real_tokens"] and base["computed_tokens"] > ours["computed_tokens"]
    assert ours["switches"]["padding_free"]["value"] is True and base["gradient_checkpointing"] is True
    comp = saved["comparisons"][0]
    assert comp["gate"]["verdict"] == "PASS", comp["gate"]
    assert "| ragged | ours |" in (out / "bench.md").read_text()


def test_gate_marks_a_perturbed_loss_invalid(tiny_bench):
    _, res = tiny_bench
    base, ours = res["rows"][0]["losses"], res["rows"][1]["losses"]
    assert gate(base, ours)["verdict"] == "PASS"
    bad = [ours[0] * (1 + 2e-3), *ours[1:]]
    g = gate(base, bad)
    assert g["verdict"] == "INVALID" and g["max_rel_diff"] > 1e-3
    assert gate(base, [float("nan"), *ours[1:]])["verdict"] == "INVALID"
    assert gate(base, ours[:1])["verdict"] == "INVALID"


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("qwen2", "eager")])
def test_padding_free_loss_equals_padded_loss(arch, attn):
    """Same batch, fp32: TRL's padding-free collator + position-id masking gives the padded loss and gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from .conftest import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, 97), attn_implementation=attn, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    g = torch.Generator().manual_seed(3)
    examples = [{"input_ids": torch.randint(3, 97, (n,), generator=g).tolist()} for n in (17, 5, 30, 11)]

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch, use_cache=False).loss  # as TRL's compute_loss: a cache disables packed masking
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert flat["input_ids"].shape == (1, 63) and "attention_mask" not in flat
    flat = {k: flat[k] for k in ("input_ids", "labels", "position_ids")}
    lp, gp = loss_and_grads(padded)
    lf, gf = loss_and_grads(flat)
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-6)
    for k in gp:
        torch.testing.assert_close(gf[k], gp[k], rtol=1e-4, atol=1e-6, msg=k)
    # without per-sample positions, attention crosses samples and the loss differs: the check above can fail
    crossed, _ = loss_and_grads({"input_ids": flat["input_ids"], "labels": flat["labels"]})
    assert abs(crossed - lp) > 1e-4


def test_plan_switches_auto_and_overrides():
    p = fast.plan({}, attn_implementation="sdpa", per_device_batch=8, cuda=False)
    assert p.padding_free is True and p.report()["padding_free"]["source"] == "auto"
    assert p.use_liger_kernel is False and p.torch_compile is False  # no CUDA / Triton here
    assert fast.plan({}, attn_implementation="sdpa", per_device_batch=1, cuda=False).padding_free is False
    assert fast.plan({}, attn_implementation="sdpa", per_device_batch=8, packing=True).padding_free is False
    assert fast.plan({"padding_free": "false"}, attn_implementation="sdpa", per_device_batch=8).padding_free is False
    # flex_attention has no backward on CPU (FACTS.md): auto declines, an explicit request is refused
    assert fast.plan({}, attn_implementation="flex_attention", per_device_batch=8, cuda=False).padding_free is False
    with pytest.raises(fast.FastPathError, match="padding_free"):
        fast.plan({"padding_free": True}, attn_implementation="flex_attention", per_device_batch=8, cuda=False)
    with pytest.raises(fast.FastPathError, match="use_liger_kernel"):
        fast.plan({"use_liger_kernel": True}, attn_implementation="sdpa", per_device_batch=8, cuda=False)
    # equal lengths: nothing to remove, and the flattened row's block mask would cost more than it saves
    assert fast.padding_share([64] * 32, 8) == 0.0 and fast.padding_share(make_lengths(64, "ragged", 256, 60), 8) > 0.3
    assert fast.plan({}, attn_implementation="sdpa", per_device_batch=8, padding=0.0).padding_free is False
    assert fast.plan({}, attn_implementation="sdpa", per_device_batch=8, padding=0.4).padding_free is True
    gc_small = fast.plan({}, attn_implementation="sdpa", per_device_batch=8, activation_gib=1.0, budget_gib=10.0)
    gc_big = fast.plan({}, attn_implementation="sdpa", per_device_batch=8, activation_gib=20.0, budget_gib=10.0)
    assert gc_small.gradient_checkpointing is False and gc_big.gradient_checkpointing is True


def test_recipe_switch_values_are_checked(tiny_models, tiny_data, tmp_path):
    with pytest.raises(RecipeError, match="padding_free: expected auto, true or false"):
        load_recipe("gemma3-270m-demo", tiny_overrides(tiny_models["llama"], tiny_data, tmp_path, padding_free="maybe"))
    recipe, _ = load_recipe(
        "gemma3-270m-demo", tiny_overrides(tiny_models["llama"], tiny_data, tmp_path, padding_free="false")
    )
    assert recipe.padding_free is False and "padding_free" not in recipe.training


@pytest.mark.parametrize("setting,ragged,expect", [("auto", True, True), ("auto", False, False), (False, True, False)])
def test_build_trainer_applies_the_switches(setting, ragged, expect, tiny_models, tiny_data, tmp_path):
    from datasets import Dataset

    from adapters.data.encode import encode_rows
    from adapters.data.validate import read_rows
    from adapters.model.loading import load_model, load_tokenizer
    from adapters.model.lora import attach_lora
    from adapters.model.sources import resolve_model
    from adapters.training.trainer import build_trainer

    recipe, _ = load_recipe(
        "gemma3-270m-demo", tiny_overrides(tiny_models["llama"], tiny_data, tmp_path, padding_free=setting)
    )
    ref = resolve_model(recipe.model_name_or_path)
    tok = load_tokenizer(ref, recipe)
    enc, _ = encode_rows(tok, read_rows(recipe.train_file)[:8], recipe.max_length)
    # ragged: rows cut to very different lengths; else: all cut to the shortest row's length (no padding at all)
    short = min(len(e.input_ids) for e in enc)
    cuts = [max(4, len(e.input_ids) // (1 + 3 * (i % 2))) if ragged else short for i, e in enumerate(enc)]
    ds = Dataset.from_dict(
        {"input_ids": [e.input_ids[:n] for e, n in zip(enc, cuts)], "labels": [e.labels[:n] for e, n in zip(enc, cuts)]}
    )
    model = attach_lora(load_model(ref, recipe), recipe)
    trainer, _ = build_trainer(model, tok, recipe, tmp_path / "run", ds, None)
    assert trainer.args.padding_free is expect and trainer.padding_free is expect
    assert trainer.args.max_length == (None if expect else recipe.max_length)
    assert trainer.fast_path["padding_free"]["value"] is expect
    assert trainer.fast_path["padding_free"]["source"] == ("auto" if setting == "auto" else "recipe")
    batch = trainer.data_collator([ds[i] for i in range(3)])
    assert ("position_ids" in batch) is expect


def test_bench_rejects_bad_arguments(tmp_path):
    with pytest.raises(BenchError, match="--model"):
        bench(BenchOptions(model="gpt-9", out=tmp_path))
    with pytest.raises(BenchError, match="unknown switch"):
        bench(BenchOptions(model="tiny-llama", out=tmp_path), overrides={"padding_fre": True})
    with pytest.raises(BenchError, match="--steps"):
        bench(BenchOptions(model="tiny-llama", steps=2, warmup=2, out=tmp_path))
    lens = make_lengths(200, "ragged", 128, 40)
    assert max(lens) <= 128 and 20 < sorted(lens)[100] < 80


def test_trained_positions_only_gives_the_same_loss_and_gradients(tiny_models, tiny_data, tmp_path):
    """The labelled-only LM head (TRL's Triton-device path, widened to CPU) matches scoring every position."""
    from datasets import Dataset

    from adapters.data.encode import encode_rows
    from adapters.data.validate import read_rows
    from adapters.model.loading import load_model, load_tokenizer
    from adapters.model.lora import attach_lora
    from adapters.model.sources import resolve_model
    from adapters.training.trainer import build_trainer

    recipe, _ = load_recipe(
        "gemma3-270m-demo",
        tiny_overrides(tiny_models["gemma3"], tiny_data, tmp_path, lora_dropout=0.0, base_kl_weight=0.0),
    )
    ref = resolve_model(recipe.model_name_or_path)
    tok = load_tokenizer(ref, recipe)
    enc, _ = encode_rows(tok, read_rows(recipe.train_file)[:4], recipe.max_length)
    ds = Dataset.from_dict({"input_ids": [e.input_ids for e in enc], "labels": [e.labels for e in enc]})
    assert any(x == -100 for e in enc for x in e.labels)  # prompt positions carry no label: there is work to skip
    torch.manual_seed(0)
    model = attach_lora(load_model(ref, recipe), recipe)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # B = 0 would hide a wrong gradient through A
    trainer, _ = build_trainer(model, tok, recipe, tmp_path / "run", ds, None)
    assert trainer.fast_path["trained_positions_only"]["value"] is True
    batch = trainer._prepare_inputs(trainer.data_collator([ds[i] for i in range(4)]))
    model.train()

    def loss_and_grads(on: bool):
        fast.enable_trained_positions_only(on)
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    try:
        lc, gc = loss_and_grads(True)
        lf, gf = loss_and_grads(False)
    finally:
        fast.enable_trained_positions_only(False)
    torch.testing.assert_close(lc, lf, rtol=1e-5, atol=1e-6)
    for k in gf:
        torch.testing.assert_close(gc[k], gf[k], rtol=1e-4, atol=1e-7, msg=k)
    assert any(g.abs().sum() > 0 for g in gc.values())
    p = fast.plan({"trained_positions_only": False}, attn_implementation="sdpa", per_device_batch=8, cuda=False)
    assert p.trained_positions_only is False and p.report()["trained_positions_only"]["source"] == "recipe"


def test_recipe_bench_runs_three_paths_and_writes_the_comparisons(tiny_models, tiny_data, tmp_path):
    """adapters bench --recipe on a tiny model: plain TRL, guard off, guard on, each in its own fresh process; the
    same task losses on the first batches (our data stage and TRL's prompt/completion tokenisation agree, the guard's
    KL is left out)."""
    import os

    from adapters.bench.recipe import RecipeBenchOptions, bench_recipe
    from adapters.cli import main

    dropout = 0.05

    overrides = tiny_overrides(
        tiny_models["gemma3"], tiny_data, tmp_path / "runs", base_kl_weight=1.0, lora_dropout=dropout
    )
    res = bench_recipe(
        RecipeBenchOptions("gemma3-270m-demo", steps=3, out=tmp_path / "out", overrides=overrides), log=lambda *_: None
    )
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [r["path"] for r in saved["rows"]] == ["plain TRL", "recipe", "recipe+guard"]
    assert [c["scenario"] for c in saved["comparisons"]] == ["recipe", "recipe+guard"]
    for c in saved["comparisons"]:
        assert c["speedup"] > 0 and c["speedup_wall"] > 0 and c["gate"]["verdict"] == "PASS", c
    assert "guard_extra_step_time" in saved["comparisons"][1]
    plain, off, guard = saved["rows"]
    assert plain["gradient_checkpointing"] is True and off["gradient_checkpointing"] is False  # TRL's default, ours
    assert off["guard"]["base_kl_weight"] == 0.0 and guard["guard"]["base_kl_weight"] == 1.0
    assert all(r["real_tokens"] > 0 and len(r["losses"]) == 2 for r in saved["rows"])
    assert res["table"] == (tmp_path / "out" / "bench.md").read_text().strip()
    # each path in its own process: three distinct children, none of them this one, each with its own peak RSS
    pids = [r["pid"] for r in saved["rows"]]
    assert len(set(pids)) == 3 and os.getpid() not in pids and saved["isolation"] == "process"
    for r in saved["rows"]:
        assert r["peak_mem_kind"] == "process_peak_rss" and r["peak_mem_gib"] >= r["train_peak_gib"] > 0
        assert (tmp_path / "out" / f"{r['path'].replace(' ', '_').replace('+', '-')}.log").is_file()
    for c in saved["comparisons"]:
        assert c["memory_ratio"] == round(
            next(r for r in saved["rows"] if r["path"] == c["scenario"])["peak_mem_gib"] / plain["peak_mem_gib"], 3
        )
    args = ["bench", "--recipe", "gemma3-270m-demo", "--steps", "1", "--out", str(tmp_path / "o2")]
    assert main(args) == 2  # 1 step leaves nothing to time after the warmup step: one line, exit 2


def test_dpo_recipe_bench_isolates_paths_and_gates_on_log_probs(tiny_models, tiny_data, tmp_path):
    """adapters bench --recipe on a DPO recipe (tiny Gemma 3, continuing a tiny SFT run): plain TRL DPOTrainer and
    our path, each in its own process; bench.json's shape; the gate compares the first losses and the policy's
    log-probs of chosen and rejected (equal: same rows, template, adapter and levers that change no value)."""
    from adapters.bench.recipe import RecipeBenchOptions, bench_recipe
    from adapters.training.run import train

    from .conftest import DEMO

    sft = tiny_overrides(tiny_models["gemma3"], tiny_data, tmp_path / "runs", run_name="sft", max_steps=2)
    sft.update(eval_strategy="no", eval_after_train=False, save_steps=2, base_kl_weight=0.0)
    recipe, path = load_recipe("gemma3-270m-demo", sft)
    run = train(recipe, path)
    data = {}
    for split, n in (("train", 16), ("val", 4), ("test", 4)):
        data[split] = tmp_path / f"pref_{split}.jsonl"
        data[split].write_text("\n".join((DEMO / f"pref_{split}.jsonl").read_text().splitlines()[:n]) + "\n")
    over = tiny_overrides(tiny_models["gemma3"], data, tmp_path / "runs", trainer="dpo", init_adapter=str(run))
    over.update(base_kl_weight=0.0, learning_rate=1e-3, lora_dropout=0.0)
    over.pop("eval_steps")
    res = bench_recipe(
        RecipeBenchOptions("gemma3-270m-demo", steps=3, gate_batches=2, out=tmp_path / "out", overrides=over),
        log=lambda *_: None,
    )
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["trainer"] == "dpo" and [r["path"] for r in saved["rows"]] == ["plain TRL", "recipe"]
    plain, ours = saved["rows"]
    assert plain["pid"] != ours["pid"]
    assert plain["gradient_checkpointing"] is True and plain["precompute_ref_log_probs"] is False  # TRL's defaults
    assert ours["switches"] == {"trained_positions_only": True, "precompute_ref_log_probs": True}
    assert ours["reference"]["kind"] == "start_adapter"
    for r in (plain, ours):
        assert r["peak_mem_gib"] > 0 and len(r["losses"]) == 2 and len(r["gate_values"]["logps/chosen"]) == 2
    (comp,) = saved["comparisons"]
    assert (
        comp["scenario"] == "recipe" and comp["speedup"] > 0 and comp["memory_ratio"] > 0 and comp["speedup_wall"] > 0
    )
    assert comp["gate"]["verdict"] == "PASS" and comp["gate"]["batches"] == 6, comp  # 2 losses + 2 x 2 log-probs
    assert res["table"].count("| plain TRL |") == 1
