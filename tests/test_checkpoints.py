"""Checkpoints: staged and marked complete; partial or corrupt ones are skipped; resume equals an unbroken run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import adapters.training.run as train_mod
import adapters.training.trainer as trainer_mod
from adapters.config import load_recipe
from adapters.training.checkpoints import MARKER, CheckpointError, last_good_checkpoint, validate_adapter_dir

from .conftest import tiny_overrides


def _recipe(tiny_models, tiny_data, tmp_path, name, **kw):
    return load_recipe(
        "gemma3-270m-demo",
        tiny_overrides(
            tiny_models["llama"],
            tiny_data,
            tmp_path,
            run_name=name,
            eval_base=False,
            test_file=None,
            eval_strategy="no",
            report_to="none",
            save_total_limit=None,
            **kw,
        ),
    )


class Killed(RuntimeError):
    pass


def test_resume_after_kill_matches_unbroken_run(tiny_models, tiny_data, tmp_path, monkeypatch):
    recipe, path = _recipe(tiny_models, tiny_data, tmp_path, "unbroken")
    unbroken = train_mod.train(recipe, path)

    real = trainer_mod.make_callbacks

    def killing_callbacks():
        guard = real()
        orig = guard.on_step_end

        def on_step_end(args, state, control, **kw):
            if state.global_step == 4:
                raise Killed("simulated kill at step 4")
            return orig(args, state, control, **kw)

        guard.on_step_end = on_step_end
        return guard

    recipe, path = _recipe(tiny_models, tiny_data, tmp_path, "broken")
    monkeypatch.setattr(trainer_mod, "make_callbacks", killing_callbacks)
    with pytest.raises(Killed):
        train_mod.train(recipe, path)
    run = tmp_path / "broken"
    assert not (run / "adapter").exists()
    assert [p.name for p in (run / "checkpoints").glob("checkpoint-*")] == ["checkpoint-3"]
    # a partial save of step 6 left in staging, and a checkpoint folder without its marker
    (run / "checkpoints" / ".staging" / "checkpoint-6").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-5").mkdir()

    monkeypatch.setattr(trainer_mod, "make_callbacks", real)
    train_mod.train(recipe, path, resume=True)
    m = json.loads((run / "manifest.json").read_text())
    assert m["train"]["resumed_from"].endswith("checkpoint-3")
    a = load_file(str(unbroken / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


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
    from safetensors.torch import save_file

    save_file(
        {"x.lora_A.weight": torch.ones(2, 2), "x.lora_B.weight": torch.zeros(2, 2)},
        str(tmp_path / "adapter_model.safetensors"),
    )
    with pytest.raises(CheckpointError, match="lora_B is zero"):
        validate_adapter_dir(tmp_path)
    save_file(
        {"x.lora_A.weight": torch.tensor([[float("nan")]]), "x.lora_B.weight": torch.ones(1, 1)},
        str(tmp_path / "adapter_model.safetensors"),
    )
    with pytest.raises(CheckpointError, match="NaN"):
        validate_adapter_dir(tmp_path)


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
