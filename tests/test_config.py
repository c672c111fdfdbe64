"""The recipe schema: our keys in sections, the libraries' keys owned by their config classes, help for every key."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re

import pytest

from adapters.config import (
    Recipe,
    RecipeError,
    describe_keys,
    libraries,
    library_changes,
    load_recipe,
    loading,
    recipe_from_config,
    recipe_keys,
)
from adapters.model.lora import lora_config
from adapters.model.quantization import quantization_config
from adapters.training.trainer import sft_config

from .conftest import tiny_overrides

# The defaults of the flat Recipe before the split: a recipe that does not set a key must still mean the same.
OLD_DEFAULTS = {
    "load_in_4bit": False,
    "load_in_8bit": False,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": None,
    "bnb_4bit_quant_storage": None,
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": "all-linear",
    "layers_to_transform": None,
    "modules_to_save": None,
    "use_dora": False,
    "use_rslora": False,
    "init_lora_weights": True,
    "bias": "none",
    "learning_rate": 2e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.1,
    "num_train_epochs": 1.0,
    "max_steps": -1,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": True,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "optim": "adamw_torch",
    "neftune_noise_alpha": None,
    "logging_steps": 5,
    "eval_strategy": "no",
    "eval_steps": None,
    "save_steps": 50,
    "save_total_limit": 2,
    "bf16": False,
    "fp16": False,
    "report_to": "tensorboard",
    "max_length": 512,
    "seed": 42,
    "base_kl_weight": 0.0,
    "padding_free": "auto",
}


def test_defaults_are_unchanged():
    r = Recipe()
    assert {k: getattr(r, k) for k in OLD_DEFAULTS} == OLD_DEFAULTS


def test_our_default_tables_name_real_library_keys():
    for lib in libraries.LIBRARIES:
        keys = lib.keys()
        for name, (value, why) in lib.ours.items():
            assert name in keys, f"{lib.name} has no key {name!r} (renamed upstream?)"
            assert value != keys[name].default and why, f"{lib.name}.{name}: same as the library's or no reason"


def test_flat_access_and_replace_route_library_keys():
    r = Recipe(learning_rate=1e-4, r=8, load_in_4bit=True, max_length=256)
    assert r.training == {"learning_rate": 1e-4} and r.lora == {"r": 8} and r.quantization == {"load_in_4bit": True}
    assert r.learning_rate == 1e-4 and r.r == 8 and r.max_length == 256 and r.quantized
    assert r.adam_beta2 == 0.999  # neither given nor ours: the library's default
    t = dataclasses.replace(r, learning_rate=3e-4, lora_dropout=0.1, run_name="t")
    assert (t.learning_rate, t.lora_dropout, t.r, t.run_name) == (3e-4, 0.1, 8, "t")
    assert r.learning_rate == 1e-4 and "lora_dropout" not in r.lora  # the original is untouched
    t.max_steps = 10
    assert t.training["max_steps"] == 10 and "max_steps" not in r.training
    with pytest.raises(RecipeError, match="set by the pipeline"):
        Recipe(output_dir="/tmp/x")
    with pytest.raises(AttributeError):
        _ = r.no_such_key


def test_builders_pass_every_key_by_name():
    r = Recipe(adam_beta2=0.98, use_dora=True, exclude_modules=["lm_head"], load_in_8bit=True, llm_int8_threshold=5.0)
    args = sft_config(r)
    assert args.adam_beta2 == 0.98 and args.learning_rate == 2e-4 and args.save_total_limit == 2
    assert args.disable_tqdm is False and args.report_to == ["tensorboard"]
    lc = lora_config(r)
    assert lc.use_dora and lc.exclude_modules == {"lm_head"} and lc.r == 16 and lc.target_modules == "all-linear"
    assert lc.task_type == "CAUSAL_LM"
    qc = quantization_config(r)
    assert qc.load_in_8bit and qc.llm_int8_threshold == 5.0
    q4 = quantization_config(Recipe(load_in_4bit=True, dtype="bfloat16"))
    assert str(q4.bnb_4bit_compute_dtype) == "torch.bfloat16" and q4.bnb_4bit_quant_type == "nf4"
    assert quantization_config(Recipe()) is None


def test_library_keys_are_checked_and_suggested():
    with pytest.raises(RecipeError, match=r"command line: llm_int8_threshold: expected a number, got 'high'"):
        load_recipe("gemma3-270m-demo", {"llm_int8_threshold": "high"})
    with pytest.raises(RecipeError, match=r"command line: use_dora: expected true or false, got 'maybe'"):
        load_recipe("gemma3-270m-demo", {"use_dora": "maybe"})
    with pytest.raises(RecipeError, match=r"unknown key 'adam_epsilo'; did you mean 'adam_epsilon'\?"):
        load_recipe("gemma3-270m-demo", {"adam_epsilo": 1e-8})
    with pytest.raises(RecipeError, match="'task_type' is set by the pipeline"):
        load_recipe("gemma3-270m-demo", {"task_type": "SEQ_CLS"})
    recipe, _ = load_recipe("gemma3-270m-demo", {"target_modules": "q_proj,v_proj", "report_to": "none"})
    assert recipe.target_modules == "q_proj,v_proj" and recipe.report_to == "none"  # a string stays a string
    assert "learning_rate" in recipe_keys() and "output_dir" not in recipe_keys()


def test_types_come_from_type_hints_not_eval():
    assert "eval(" not in inspect.getsource(loading)


def test_manifest_config_round_trips_and_old_layout_opens():
    recipe, _ = load_recipe("gemma3-270m-demo", {"adam_beta2": 0.98})
    cfg = recipe.to_dict()
    assert cfg["learning_rate"] == 2e-4 and cfg["adam_beta2"] == 0.98 and cfg["save_total_limit"] == 2
    assert cfg["max_length"] == 128 and "training" not in cfg and "sft_extra" not in cfg
    again = recipe_from_config(cfg, "manifest.json")
    assert again.to_dict() == cfg
    # written by the flat Recipe: every key at the top, SFTConfig pass-through keys in sft_extra
    old = {k: v for k, v in cfg.items() if k in (*Recipe.__dataclass_fields__, *OLD_DEFAULTS)}
    old["sft_extra"] = {"adam_beta2": 0.98}
    opened = recipe_from_config(old, "manifest.json", model_name_or_path="x")
    assert opened.adam_beta2 == 0.98 and opened.max_steps == 30 and opened.model_name_or_path == "x"
    changed = library_changes(cfg)  # what the model card lists beyond its fixed keys
    assert library_changes(old) == changed and changed["adam_beta2"] == 0.98 and "learning_rate" not in changed


def test_describe_keys_lists_every_key_with_defaults():
    text = describe_keys()
    for name, tp, default in (
        ("learning_rate", "float", "0.0002 *"),
        ("lora_alpha", "int", "32 *"),
        ("load_in_4bit", "bool", "False"),
        ("base_kl_weight", "float", "0.0"),
        ("max_length", "int", "512"),
    ):
        assert re.search(rf"^  {name} +{re.escape(tp)} +{re.escape(default)}  ", text, re.M), name
    for name in recipe_keys():
        assert re.search(rf"^  {name} ", text, re.M), name
    assert "`" not in text and "learning_rate: LoRA tolerates" in text
    recipe, _ = load_recipe("gemma3-270m-demo")
    shown = describe_keys(recipe)
    assert re.search(r"^  max_length +int +512 +128 ", shown, re.M) and re.search(
        r"^  load_in_8bit +bool +False +True ", shown, re.M
    )


def test_build_trainer_takes_callbacks_and_a_per_run_tensorboard(tiny_models, tiny_data, tmp_path):
    from transformers import TrainerCallback
    from transformers.integrations import TensorBoardCallback

    from adapters.data.encode import encode_rows, to_dataset
    from adapters.data.validate import read_rows
    from adapters.model.loading import load_model, load_tokenizer
    from adapters.model.lora import attach_lora
    from adapters.model.sources import resolve_model
    from adapters.training.trainer import build_trainer

    recipe, _ = load_recipe(
        "gemma3-270m-demo", tiny_overrides(tiny_models["llama"], tiny_data, tmp_path, report_to="tensorboard")
    )
    ref = resolve_model(recipe.model_name_or_path)
    tok = load_tokenizer(ref, recipe)
    enc, _ = encode_rows(tok, read_rows(recipe.train_file)[:8], recipe.max_length)
    model = attach_lora(load_model(ref, recipe), recipe)
    marker = TrainerCallback()
    trainer, _ = build_trainer(model, tok, recipe, tmp_path / "run", to_dataset(enc), None, callbacks=[marker])
    cbs = trainer.callback_handler.callbacks
    assert marker in cbs
    (tb,) = [cb for cb in cbs if isinstance(cb, TensorBoardCallback)]
    assert os.path.samefile(tb.tb_writer.log_dir, tmp_path / "run" / "tensorboard")
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ
    assert trainer.args.packing is False and trainer.args.learning_rate == 5e-3
