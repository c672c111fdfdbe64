"""Every shipped recipe validates; bad keys and values fail with the key named."""

from __future__ import annotations

import pytest

from adapters.config import RECIPE_DIR, Recipe, RecipeError, load_recipe, parse_overrides
from adapters.model.lora import lora_config
from adapters.model.quantization import quantization_config

SHIPPED = sorted(RECIPE_DIR.glob("*.yaml"))


def test_recipes_are_shipped():
    assert len(SHIPPED) >= 3


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_validates(path):
    recipe, resolved = load_recipe(path.stem)
    assert resolved == path
    assert isinstance(recipe, Recipe)
    header = [ln for ln in path.read_text().splitlines() if ln.startswith("#")]
    assert any("Run:" in ln for ln in header), "the header comment must give the command that runs the recipe"
    lc = lora_config(recipe)  # builds the PEFT config without loading a model
    assert lc.r == recipe.r and lc.lora_alpha == recipe.lora_alpha
    qc = quantization_config(recipe)
    assert (qc is None) == (not recipe.quantized)


def test_larger_recipes_default_to_nf4_double_quant():
    for name in ("llama-3.2-1b-qlora", "qwen2.5-1.5b-qlora"):
        qc = quantization_config(load_recipe(name)[0])
        assert qc.load_in_4bit and qc.bnb_4bit_quant_type == "nf4" and qc.bnb_4bit_use_double_quant


def test_demo_recipe_uses_int8():
    assert quantization_config(load_recipe("gemma3-270m-demo")[0]).load_in_8bit


def test_unknown_key_names_key_and_suggestion(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.001\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: unknown key 'learning_rat'; did you mean 'learning_rate'\?"):
        load_recipe(bad)


def test_unknown_override_names_command_line():
    with pytest.raises(RecipeError, match=r"command line: unknown key 'lora_rank'"):
        load_recipe("gemma3-270m-demo", {"lora_rank": 8})


def test_wrong_type_names_key():
    with pytest.raises(RecipeError, match=r"command line: max_steps: expected an integer, got 'many'"):
        load_recipe("gemma3-270m-demo", {"max_steps": "many"})


def test_invalid_value_is_rejected():
    with pytest.raises(RecipeError, match="load_in_4bit and load_in_8bit are exclusive"):
        load_recipe("gemma3-270m-demo", {"load_in_4bit": True})


def test_yaml_syntax_error_has_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("r: 8\nlora_alpha: [1, 2\n")
    with pytest.raises(RecipeError, match=r"broken.yaml:\d+:\d+: invalid YAML"):
        load_recipe(bad)


def test_missing_recipe_suggests_shipped():
    with pytest.raises(RecipeError, match="did you mean 'gemma3-270m-demo'"):
        load_recipe("gemma3-270m-dem")


def test_sft_passthrough_and_reserved_keys():
    from adapters.training.trainer import sft_config

    recipe, _ = load_recipe("gemma3-270m-demo", {"dataloader_num_workers": 0})
    assert recipe.training["dataloader_num_workers"] == 0 and recipe.dataloader_num_workers == 0
    assert "dataloader_num_workers" not in recipe.lora and "dataloader_num_workers" not in recipe.quantization
    assert sft_config(recipe).dataloader_num_workers == 0  # reaches SFTConfig by name
    with pytest.raises(RecipeError, match="set by the pipeline"):
        load_recipe("gemma3-270m-demo", {"output_dir": "/tmp/x"})


def test_parse_overrides_types():
    got = parse_overrides(
        [
            "--max_steps",
            "10",
            "--use_dora",
            "--learning-rate=1e-4",
            "--target_modules",
            "[q_proj, v_proj]",
            "--run_name",
            "x",
        ]
    )
    assert got == {
        "max_steps": 10,
        "use_dora": True,
        "learning_rate": "1e-4",  # YAML 1.1; coerced below
        "target_modules": ["q_proj", "v_proj"],
        "run_name": "x",
    }
    recipe, _ = load_recipe("gemma3-270m-demo", got)
    assert recipe.learning_rate == 1e-4 and recipe.use_dora and recipe.target_modules == ["q_proj", "v_proj"]


def test_cli_reports_bad_key(capsys):
    from adapters.cli import main

    assert main(["train", "gemma3-270m-demo", "--lerning_rate", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lerning_rate'" in err and "learning_rate" in err


def test_yaml_no_stays_a_string_for_string_keys(tmp_path):
    """YAML 1.1 reads `no` as False; HF then rejects eval_strategy=False. Recipes and --key value use 1.2 booleans."""
    assert parse_overrides(["--eval_strategy", "no", "--eval_base", "no", "--bf16", "false"]) == {
        "eval_strategy": "no",
        "eval_base": "no",
        "bf16": False,
    }
    recipe, _ = load_recipe("gemma3-270m-demo", parse_overrides(["--eval_strategy", "no", "--eval_base", "off"]))
    assert recipe.eval_strategy == "no" and recipe.eval_base is False
    f = tmp_path / "r.yaml"
    f.write_text("model_name_or_path: x\ntrain_file: t.jsonl\neval_strategy: no\neval_after_train: no\n")
    recipe, _ = load_recipe(f)
    assert recipe.eval_strategy == "no" and recipe.eval_after_train is False
