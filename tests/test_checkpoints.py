"""Checkpoints: staged and marked complete; partial or corrupt ones are skipped; resume equals an unbroken run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapters.training.run as train_mod
import adapters.training.trainer as trainer_mod
from adapters.config import load_recipe
from adapters.training.checkpoints import MARKER, CheckpointError, last_good_checkpoint, validate_adapter_dir

from .conftest import tiny_overrides


def _recipe(tiny_models, tiny_data, tmp_path, name, **kw):
    given = dict(eval_base=False, test_file=None, eval_strategy="no", report_to="none", save_total_limit=None)
    return load_recipe(
        "gemma3-270m-demo", tiny_overrides(tiny_models["llama"], tiny_data, tmp_path, run_name=name, **{**given, **kw})
    )


class Killed(RuntimeError):
    pass


def _kill_at(step: int):
    """make_callbacks whose guard raises at the end of ``step``: the process dies between two checkpoints."""
    real = trainer_mod.make_callbacks

    def killing_callbacks():
        guard = real()
        orig = guard.on_step_end

        def on_step_end(args, state, control, **kw):
            if state.global_step == step:
                raise Killed(f"simulated kill at step {step}")
            return orig(args, state, control, **kw)

        guard.on_step_end = on_step_end
        return guard

    return killing_callbacks


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _assert_same_adapter(a_dir, b_dir):
    """Equal within 1e-6 (fp32), and stored in the same dtype."""
    a = load_file(str(a_dir / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)  # also checks the dtype
    return a


RESUME_CASES = {
    "full": ({}, torch.float32),
    "4bit": ({"load_in_4bit": True}, torch.float32),
    # an explicit 16-bit adapter, and two micro-batches per step (the forgetting guard draws per micro-batch)
    "4bit-bf16-accum": (
        {
            "load_in_4bit": True,
            "adapter_dtype": "bfloat16",
            "gradient_accumulation_steps": 2,
            "per_device_train_batch_size": 2,
        },
        torch.bfloat16,
    ),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_after_kill_matches_unbroken_run(case, tiny_models, tiny_data, tmp_path, monkeypatch):
    """RELIABILITY 17/26: kill after checkpoint 3, resume: the same adapter, in the dtype it trains in (float32 here;
    TRL casts LoRA on a quantized base to bfloat16 and PEFT's resume load casts it back), and num_tokens goes on."""
    quant, dtype = RESUME_CASES[case]
    recipe, path = _recipe(tiny_models, tiny_data, tmp_path, "unbroken", **quant)
    unbroken = train_mod.train(recipe, path)

    recipe, path = _recipe(tiny_models, tiny_data, tmp_path, "broken", **quant)
    monkeypatch.setattr(trainer_mod, "make_callbacks", _kill_at(4))
    with pytest.raises(Killed):
        train_mod.train(recipe, path)
    run = tmp_path / "broken"
    assert not (run / "adapter").exists()
    assert [p.name for p in (run / "checkpoints").glob("checkpoint-*")] == ["checkpoint-3"]
    assert not [n for n in TOKENIZER_FILES if (run / "checkpoints" / "checkpoint-3" / n).exists()]
    # a partial save of step 6 left in staging, and a checkpoint folder without its marker
    (run / "checkpoints" / ".staging" / "checkpoint-6").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-5").mkdir()

    monkeypatch.undo()
    train_mod.train(recipe, path, resume=True)
    m = json.loads((run / "manifest.json").read_text())
    assert m["train"]["resumed_from"].endswith("checkpoint-3")
    assert m["adapter"]["dtype"] == str(dtype).removeprefix("torch.")
    a = _assert_same_adapter(unbroken / "adapter", run / "adapter")
    assert {t.dtype for t in a.values()} == {dtype}
    for step in (3, 6):
        _assert_same_adapter(
            unbroken / "checkpoints" / f"checkpoint-{step}", run / "checkpoints" / f"checkpoint-{step}"
        )
    tokens = [
        [e["num_tokens"] for e in json.loads((r / "manifest.json").read_text())["log_history"] if "loss" in e]
        for r in (unbroken, run)
    ]
    assert tokens[0] == tokens[1] and tokens[0] == sorted(tokens[0])


def test_truncated_checkpoint_falls_back_to_previous(tiny_models, tiny_data, tmp_path):
    recipe, path = _recipe(tiny_models, tiny_data, tmp_path, "trunc")
    run = train_mod.train(recipe, path)
    ckpts = sorted((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in ckpts] == ["checkpoint-3", "checkpoint-6"]
    f = ckpts[-1] / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="checkpoint-6/adapter_model.safetensors"):
        validate_adapter_dir(ckpts[-1])
    assert last_good_checkpoint(run / "checkpoints", log=lambda m: None) == ckpts[0]


def test_zero_lora_b_is_not_complete(tmp_path):
    """RELIABILITY 13: an all-zero lora_B where the model trained one (a save that gathered nothing) is refused; so
    are missing, extra, reshaped, retyped or NaN tensors. A lora_B the model really holds as zero is complete."""
    from safetensors.torch import save_file

    live = {"m.q.lora_A.weight": torch.ones(2, 3), "m.q.lora_B.weight": torch.full((3, 2), 0.5)}

    def saved(tensors):
        save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
        return tmp_path

    zero_b = {"m.q.lora_A.weight": torch.ones(2, 3), "m.q.lora_B.weight": torch.zeros(3, 2)}
    with pytest.raises(CheckpointError, match="m.q.lora_B.weight differs from the model in memory"):
        validate_adapter_dir(saved(zero_b), reference=live)
    assert validate_adapter_dir(saved(zero_b), reference=zero_b)["lora_B"] == 1  # lr 0 at the first warmup step
    assert validate_adapter_dir(saved(zero_b))["dtype"] == "float32"  # no model: structural checks only
    with pytest.raises(CheckpointError, match="lacks 2 of the model's 4 adapter tensors"):
        validate_adapter_dir(
            saved(live),
            reference={**live, "m.k.lora_A.weight": torch.ones(2, 3), "m.k.lora_B.weight": torch.ones(3, 2)},
        )
    with pytest.raises(CheckpointError, match="holds 2 tensors the model does not train"):
        validate_adapter_dir(
            saved({**live, "m.k.lora_A.weight": torch.ones(2, 3), "m.k.lora_B.weight": torch.ones(3, 2)}),
            reference=live,
        )
    with pytest.raises(CheckpointError, match=r"shape \(3, 1\), the model \(3, 2\)"):
        validate_adapter_dir(saved({**live, "m.q.lora_B.weight": torch.ones(3, 1)}), reference=live)
    with pytest.raises(CheckpointError, match="stored as torch.bfloat16, the model trains it in torch.float32"):
        validate_adapter_dir(saved({k: v.bfloat16() for k, v in live.items()}), reference=live)
    with pytest.raises(CheckpointError, match="m.q has a lora_A but no lora_B"):
        validate_adapter_dir(saved({"m.q.lora_A.weight": torch.ones(2, 3)}))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"target_modules": ["k_proj"]}))
    with pytest.raises(CheckpointError, match="m.q is not among the target_modules"):
        validate_adapter_dir(saved(live))
    (tmp_path / "adapter_config.json").unlink()
    save_file(
        {"x.lora_A.weight": torch.tensor([[float("nan")]]), "x.lora_B.weight": torch.ones(1, 1)},
        str(tmp_path / "adapter_model.safetensors"),
    )
    with pytest.raises(CheckpointError, match="NaN"):
        validate_adapter_dir(tmp_path)


def test_save_steps_1_with_warmup_keeps_the_zero_lora_b(tiny_models, tiny_data, tmp_path):
    """Issue 13.3: warmup gives step 1 a learning rate of 0, so every lora_B is still zero at checkpoint-1: the
    checkpoint matches the model in memory, so it is complete and the run goes on."""
    recipe, path = _recipe(tiny_models, tiny_data, tmp_path, "warm", max_steps=2, save_steps=1, warmup_steps=0.1)
    run = train_mod.train(recipe, path)
    first = run / "checkpoints" / "checkpoint-1"
    b = [t for n, t in load_file(str(first / "adapter_model.safetensors")).items() if "lora_B" in n]
    assert b and all(float(t.abs().max()) == 0.0 for t in b)
    assert json.loads((first / MARKER).read_text())["step"] == 1
    assert (run / "checkpoints" / "checkpoint-2" / MARKER).is_file() and (run / "adapter").is_dir()


def test_checkpoints_carry_no_tokenizer_and_load_with_plain_peft(tiny_models, tiny_data, tmp_path):
    """Issue 13.8: the run writes its tokenizer once (tokenizer/, and adapter/ at the end); a checkpoint holds
    none and still loads with PeftModel.from_pretrained(base, checkpoint)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, path = _recipe(tiny_models, tiny_data, tmp_path, "tok", max_steps=3)
    run = train_mod.train(recipe, path)
    ckpt = run / "checkpoints" / "checkpoint-3"
    assert not [n for n in TOKENIZER_FILES if (ckpt / n).exists()]
    assert (run / "tokenizer" / "tokenizer.json").is_file() and (run / "adapter" / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(run / "tokenizer").chat_template
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]), str(ckpt))
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    live = dict(model.named_parameters())
    for k, v in saved.items():
        torch.testing.assert_close(live[k.replace(".weight", ".default.weight")], v, atol=0, rtol=0)


def test_best_model_checkpoint_is_the_renamed_folder(tiny_models, tiny_data, tmp_path):
    """Issue 13.5: trainer_state.json in a checkpoint named the best checkpoint under .staging/ (written before the
    rename); it names the final folder, which exists."""
    recipe, path = _recipe(
        tiny_models, tiny_data, tmp_path, "best", eval_strategy="steps", eval_steps=3, metric_for_best_model="eval_loss"
    )
    run = train_mod.train(recipe, path)
    for step in (3, 6):
        state = json.loads((run / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
        best = state["best_model_checkpoint"]
        assert best and ".staging" not in best and Path(best).is_dir(), best


def test_resume_keeps_early_stopping_patience(tiny_models, tiny_data, tmp_path, monkeypatch):
    """A resumed run counts evaluations without improvement from where the checkpoint was, so it stops at the same
    step as an unbroken one (the count lives in EarlyStoppingCallback, restored only when asked)."""
    # greater_is_better with eval_loss: every falling loss is "no improvement", so the count grows each evaluation
    kw = dict(
        eval_strategy="steps",
        eval_steps=1,
        save_steps=1,
        max_steps=10,
        early_stopping_patience=4,
        greater_is_better=True,
    )
    recipe, path = _recipe(tiny_models, tiny_data, tmp_path, "es-unbroken", **kw)
    unbroken = train_mod.train(recipe, path)
    steps = json.loads((unbroken / "manifest.json").read_text())["train"]["global_step"]
    assert steps < 10  # early stopping did stop it

    recipe, path = _recipe(tiny_models, tiny_data, tmp_path, "es-broken", **kw)
    monkeypatch.setattr(trainer_mod, "make_callbacks", _kill_at(steps - 1))
    with pytest.raises(Killed):
        train_mod.train(recipe, path)
    monkeypatch.undo()
    run = train_mod.train(recipe, path, resume=True)
    assert json.loads((run / "manifest.json").read_text())["train"]["global_step"] == steps
    _assert_same_adapter(unbroken / "adapter", run / "adapter")


def test_marker_is_written_last(tiny_models, tiny_data, tmp_path):
    recipe, path = _recipe(tiny_models, tiny_data, tmp_path, "marker", max_steps=3)
    run = train_mod.train(recipe, path)
    marker = json.loads((run / "checkpoints" / "checkpoint-3" / MARKER).read_text())
    assert marker["step"] == 3 and marker["tensors"] > 0


def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(tiny_models, tiny_data, tmp_path, monkeypatch):
    """RELIABILITY row 10: a NaN loss stops the run; nothing NaN is saved; the last good checkpoint is intact."""
    real_attach = train_mod.attach_lora
    calls = {"n": 0}

    def attach_with_poison(model, recipe):
        peft_model = real_attach(model, recipe)

        def poison(module, args, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] > 4:  # from the 5th training forward (step 5, batch 1 per step) on
                    return output * float("nan")
            return output

        peft_model.get_base_model().model.norm.register_forward_hook(poison)
        return peft_model

    monkeypatch.setattr(train_mod, "attach_lora", attach_with_poison)
    # one training forward per step: the forgetting guard's base forward would also pass the hooked norm
    recipe, path = _recipe(tiny_models, tiny_data, tmp_path, "nan", max_steps=9, base_kl_weight=0.0)
    with pytest.raises(train_mod.TrainingDiverged, match="non-finite"):
        train_mod.train(recipe, path)
    run = tmp_path / "nan"
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "diverged" and m["diverged"]["step"] == 5
    assert not (run / "adapter").exists()
    assert [p.name for p in (run / "checkpoints").glob("checkpoint-*")] == ["checkpoint-3"]
    validate_adapter_dir(run / "checkpoints" / "checkpoint-3")


@pytest.mark.slow
def test_resume_after_kill_matches_unbroken_run_on_the_demo_model(tmp_path, monkeypatch):
    """Issue 13.5 on the real Gemma 3 270M (int8 base, where TRL casts LoRA to bfloat16): kill after checkpoint-2 of
    4 steps, resume: the same float32 adapter within 1e-6 as the unbroken run."""
    kw = dict(
        output_root=str(tmp_path),
        max_steps=4,
        save_steps=2,
        eval_after_train=False,
        quant_probe=False,
        eval_strategy="no",
        report_to="none",
    )
    recipe, path = load_recipe("gemma3-270m-demo", {**kw, "run_name": "unbroken"})
    unbroken = train_mod.train(recipe, path)
    recipe, path = load_recipe("gemma3-270m-demo", {**kw, "run_name": "broken"})
    monkeypatch.setattr(trainer_mod, "make_callbacks", _kill_at(3))
    with pytest.raises(Killed):
        train_mod.train(recipe, path)
    monkeypatch.undo()
    run = train_mod.train(recipe, path, resume=True)
    a = _assert_same_adapter(unbroken / "adapter", run / "adapter")
    assert {t.dtype for t in a.values()} == {torch.float32}
    _assert_same_adapter(unbroken / "checkpoints" / "checkpoint-4", run / "checkpoints" / "checkpoint-4")
