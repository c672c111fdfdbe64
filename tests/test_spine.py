"""End-to-end behaviour of the spine on tiny random models (CPU, seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapters.config import load_recipe
from adapters.data.encode import encode_rows, to_dataset
from adapters.data.validate import read_rows
from adapters.model.loading import load_model, load_tokenizer
from adapters.model.lora import attach_lora
from adapters.model.sources import resolve_model
from adapters.training.run import save_adapter, train
from adapters.training.trainer import build_trainer

from .conftest import REPO, tiny_overrides

ARCHS = ["llama", "qwen2", "gemma3"]


def _setup(model_dir, data, tmp_path, **extra):
    recipe, path = load_recipe("gemma3-270m-demo", tiny_overrides(model_dir, data, tmp_path, **extra))
    ref = resolve_model(recipe.model_name_or_path)
    tok = load_tokenizer(ref, recipe)
    enc, _ = encode_rows(tok, read_rows(recipe.train_file), recipe.max_length)
    return recipe, ref, tok, enc


@pytest.mark.parametrize("arch", ARCHS)
def test_base_frozen_lora_moves(arch, tiny_models, tiny_data, tmp_path):
    recipe, ref, tok, enc = _setup(tiny_models[arch], tiny_data, tmp_path, init_lora_weights=False)
    model = load_model(ref, recipe)
    base_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model = attach_lora(model, recipe)
    lora_before = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
    assert lora_before, "no LoRA parameters were attached"
    trainer, _ = build_trainer(model, tok, recipe, tmp_path / "run", to_dataset(enc), None)
    trainer.train()
    after = dict(model.named_parameters())
    for k, v in lora_before.items():
        assert not torch.equal(v, after[k].detach()), f"LoRA weight {k} did not move"
    base_after = model.get_base_model().state_dict()
    for k, v in base_before.items():
        mod, _, leaf = k.rpartition(".")
        key = k if k in base_after else f"{mod}.base_layer.{leaf}"
        assert torch.equal(v, base_after[key]), f"base weight {k} changed"


def test_loss_falls_on_repeated_batch(tiny_models, tiny_data, tmp_path):
    recipe, ref, tok, enc = _setup(
        tiny_models["llama"],
        tiny_data,
        tmp_path,
        max_steps=25,
        learning_rate=3e-2,
        save_steps=1000,
        logging_steps=5,
        lr_scheduler_type="constant",
    )
    model = attach_lora(load_model(ref, recipe), recipe)
    trainer, _ = build_trainer(model, tok, recipe, tmp_path / "run", to_dataset(enc[:4] * 4), None)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_adapter_loads_with_plain_peft(arch, tiny_models, tiny_data, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers import AutoModelForCausalLM

    recipe, ref, tok, enc = _setup(tiny_models[arch], tiny_data, tmp_path, max_steps=3)
    model = attach_lora(load_model(ref, recipe), recipe)
    trainer, _ = build_trainer(model, tok, recipe, tmp_path / "run", to_dataset(enc), None)
    trainer.train()
    out = tmp_path / "adapter"
    save_adapter(model, tok, out, ref.path)

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == ref.path
    assert (out / "tokenizer_config.json").is_file()
    assert (out / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (out / "tokenizer_config.json").read_text()
    )

    saved = load_peft_weights(str(out))
    expected = get_peft_model_state_dict(model)
    assert set(saved) == set(expected), "saved adapter keys differ from the model's LoRA keys"

    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(out)).eval()
    model.eval()
    x = torch.tensor([enc[0].input_ids])
    with torch.no_grad():
        a = model(input_ids=x).logits
        b = reloaded(input_ids=x).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_train_writes_run_directory(tiny_models, tiny_data, tmp_path):
    recipe, path = load_recipe(
        "gemma3-270m-demo",
        tiny_overrides(tiny_models["qwen2"], tiny_data, tmp_path, run_name="r1", report_to="tensorboard"),
    )
    run = train(recipe, path)
    assert run == tmp_path / "r1"
    for name in (
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "manifest.json",
        "eval.json",
        "loss_curve.png",
    ):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").rglob("events.out.tfevents*"))
    ckpts = sorted((run / "checkpoints").glob("checkpoint-*"))
    assert ckpts and all((c / "COMPLETE.json").is_file() for c in ckpts)
    assert not list((run / "checkpoints" / ".staging").glob("checkpoint-*"))

    ev = json.loads((run / "eval.json").read_text())
    for k in ("base", "tuned"):
        assert set(ev[k]) >= {"exact_match", "n"} and ev[k]["n"] == 8 and 0.0 <= ev[k]["exact_match"] <= 1.0

    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "complete"
    assert m["config"]["max_steps"] == 6 and m["seed"] == 42
    for pkg in ("python", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets"):
        assert m["versions"][pkg], pkg
    assert "commit" in m["git"] and m["hardware"]["cpu_count"]
    assert len(m["data"]["train"]["sha256"]) == 64 and m["data"]["train"]["tokens"] > 0
    assert m["data"]["train"]["trained_tokens"] < m["data"]["train"]["tokens"]
    assert m["base_model"]["path"] == str(tiny_models["qwen2"]) and m["base_model"]["canonical_name"]
    assert m["world_size"] == 1 and m["effective_batch_size"] == 4
    assert m["parameters"]["trainable"] < m["parameters"]["total"]
    assert m["wall_seconds"] > 0 and m["train"]["global_step"] == 6


def test_existing_run_is_not_overwritten(tiny_models, tiny_data, tmp_path):
    run = tmp_path / "keep"
    run.mkdir()
    (run / "precious.txt").write_text("x")
    recipe, path = load_recipe(
        "gemma3-270m-demo", tiny_overrides(tiny_models["llama"], tiny_data, tmp_path, run_name="keep")
    )
    with pytest.raises(FileExistsError):
        train(recipe, path)
    assert (run / "precious.txt").read_text() == "x"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v carry a bias
def test_quantized_4bit_run_reports_both_losses(arch, tiny_models, tiny_data, tmp_path):
    model_dir = tiny_models[arch]
    recipe, path = load_recipe(
        "gemma3-270m-demo",
        tiny_overrides(
            model_dir,
            tiny_data,
            tmp_path,
            run_name="q4",
            load_in_4bit=True,
            max_steps=2,
            eval_base=False,
            test_file=None,
            eval_strategy="no",
        ),
    )
    run = train(recipe, path)
    q = json.loads((run / "manifest.json").read_text())["quantization"]
    assert q["method"] == "4bit-nf4+double_quant"
    for key in ("full_precision", "quantized"):
        assert q[key]["task_loss"] > 0 and q[key]["general_loss"] > 0
    assert q["quantized"]["memory_mb"] < q["full_precision"]["memory_mb"]
    assert "task_loss_change" in q and "general_loss_change" in q


def test_package_is_this_repo():
    import adapters

    assert Path(adapters.__file__).resolve().is_relative_to(REPO), adapters.__file__


@pytest.mark.slow
def test_real_embedded_model_few_steps(tmp_path):
    """The real Gemma 3 270M (int8 base) for a few steps; needs the demo extra."""
    recipe, path = load_recipe(
        "gemma3-270m-demo",
        dict(
            run_name="slow",
            output_root=str(tmp_path),
            max_steps=3,
            eval_strategy="no",
            report_to="none",
            eval_base=False,
            test_file=None,
            save_steps=3,
        ),
    )
    run = train(recipe, path)
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "complete" and m["base_model"]["canonical_name"] == "google/gemma-3-270m"
    q = m["quantization"]
    assert q["full_precision"]["general_loss"] > 0 and q["quantized"]["general_loss"] > 0
