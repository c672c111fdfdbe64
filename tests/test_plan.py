"""`adapters plan`: meta-device counts, the memory estimate, config fallbacks, and the tiny-twin smoke run."""

from __future__ import annotations

import pytest

from adapters.config import load_recipe
from tests.conftest import REPO, tiny_overrides

RECIPES = sorted(p.stem for p in (REPO / "adapters" / "recipes").glob("*.yaml"))


def test_counts_match_the_real_model(tiny_models):
    """Counting on the meta device gives exactly what transformers and PEFT build for real."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapters.model.lora import lora_config
    from adapters.planning.memory import count_parameters

    for arch in ("llama", "gemma3"):
        recipe = load_recipe("llama-3.2-1b-qlora", {"model_name_or_path": str(tiny_models[arch])})[0]
        config = AutoConfig.from_pretrained(tiny_models[arch])
        counts = count_parameters(config, recipe)
        model = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
        assert counts.quantizable + counts.other == sum(p.numel() for p in model.parameters())
        peft = get_peft_model(model, lora_config(recipe))
        assert counts.lora == peft.get_nb_trainable_parameters()[0]
        assert counts.lora_modules == 2 * 7


def test_estimate_orders_and_micro_batch():
    from transformers import AutoConfig

    from adapters.planning.memory import GIB, KNOWN_CONFIGS, count_parameters, estimate
    from adapters.planning.preflight import launch_from_config

    values = dict(KNOWN_CONFIGS["llama-3.2-1b"])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    r4 = load_recipe("llama-3.2-1b-qlora")[0]
    counts = count_parameters(config, r4)
    assert 1.2e9 < counts.quantizable + counts.other < 1.3e9  # Llama 3.2 1B: 1.24B with tied embeddings
    e4 = estimate(r4, counts)
    e8 = estimate(load_recipe("llama-3.2-1b-qlora", {"load_in_4bit": False, "load_in_8bit": True})[0], counts)
    e16 = estimate(load_recipe("llama-3.2-1b-qlora", {"load_in_4bit": False})[0], counts)
    assert e4.weights < e8.weights < e16.weights
    assert e16.weights == pytest.approx(2 * 1.236e9, rel=0.01)  # bf16: 2 bytes per parameter
    assert e4.activations_per_sample_ckpt < e4.activations_per_sample_no_ckpt / 5
    assert e4.max_batch(24 * GIB) < e4.max_batch(80 * GIB)
    assert e4.total(e4.max_batch(24 * GIB)) <= 24 * GIB < e4.total(e4.max_batch(24 * GIB) + 1)
    fsdp = estimate(
        load_recipe("llama-3.2-1b-qlora", {"bnb_4bit_quant_storage": "bfloat16"})[0],
        counts,
        launch_from_config("fsdp2-qlora", num_processes=4),
    )
    assert fsdp.weights == pytest.approx(e4.weights / 4)


def test_plan_report_and_hub_fallback():
    from adapters.planning.memory import plan

    text = plan(load_recipe("qwen2.5-1.5b-qlora")[0], gpus=2, gpu_mem_gib=16)
    assert "preflight: ok" in text and "built-in qwen2.5-1.5b config (hub not reachable" in text
    for part in (
        "weights (4-bit)",
        "LoRA params + grads + optimizer state",
        "gradient checkpointing",
        "no checkpointing",
        "logits",
        "largest micro-batch that fits",
    ):
        assert part in text


def test_plan_two_nodes_70b_qlora_fsdp2_offline(capsys):
    """The worked example of docs/scale-out.md: 2 machines x 8 GPUs, 70B QLoRA under FSDP2, with the hub out of
    reach: the real 70B shape (not the family's 1B default), sharded over all 16 processes, and the launch lines."""
    from adapters.cli import main

    argv = ["plan", "llama-3.2-1b-qlora", "--model_name_or_path", "meta-llama/Llama-3.1-70B", "--nodes", "2"]
    argv += ["--gpus", "8", "--gpu-mem", "80", "--accelerate-config", "fsdp2-qlora"]
    assert main([*argv, "--bnb_4bit_quant_storage", "bfloat16"]) == 0
    text = capsys.readouterr().out
    assert "built-in llama-3.1-70b config (hub not reachable" in text
    assert "parameters: 70,553,706,496" in text  # meta-llama/Llama-3.1-70B: 70.6B
    assert "16 process(es) on 2 machine(s), FSDP" in text and "(sharded over 16)" in text
    assert "--num_machines 2 --num_processes 16 --machine_rank r" in text
    assert "ACCELERATE_CONFIG=fsdp2-qlora GPUS_PER_NODE=8 sbatch --nodes 2" in text
    assert main(argv) == 2  # the same without quant storage = compute dtype: preflight names the fix
    assert "--bnb_4bit_quant_storage bfloat16" in capsys.readouterr().err


def test_offline_config_never_plans_a_named_size_with_another():
    from adapters.planning.memory import builtin_config_for
    from adapters.utils.errors import PathNotFoundError

    key, note = builtin_config_for("meta-llama/Llama-3.3-70B-Instruct", "OSError")
    assert key == "llama-3.1-70b" and note.startswith("ASSUMED") and "size 70B" in note
    key, note = builtin_config_for("someorg/llama-custom", "OSError")
    assert key == "llama-3.2-1b" and "names no size" in note
    assert builtin_config_for("meta-llama/Meta-Llama-3-8B", "OSError")[0] == "llama-3.1-8b"
    with pytest.raises(PathNotFoundError, match="no built-in llama config of size 405B"):
        builtin_config_for("meta-llama/Llama-3.1-405B", "OSError")


def test_plan_unknown_model_and_fp16_gemma(tiny_models, capsys):
    from adapters.cli import main

    assert main(["plan", "llama-3.2-1b-qlora", "--model_name_or_path", "someorg/mystery-7b"]) == 2
    assert "no built-in config" in capsys.readouterr().err
    rc = main(["plan", "gemma3-270m-demo", "--model_name_or_path", str(tiny_models["gemma3"]), "--fp16", "true"])
    assert rc == 2
    assert "fp16 on a bf16-only model" in capsys.readouterr().err
    rc = main(["plan", "llama-3.2-1b-qlora", "--accelerate-config", "zero3", "--nproc", "2"])
    assert rc == 2 and "ZeRO-3 with load_in_4bit" in capsys.readouterr().err


def test_twin_keeps_the_architecture():
    from transformers import AutoConfig

    from adapters.planning.memory import KNOWN_CONFIGS
    from adapters.planning.smoke import twin_config

    values = dict(KNOWN_CONFIGS["gemma-3-270m"])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    twin = twin_config(config)
    assert twin.model_type == config.model_type and twin.num_hidden_layers == 2 and twin.hidden_size == 64
    assert "full_attention" in twin.layer_types and len(twin.layer_types) == 2
    assert config.num_hidden_layers == 18  # the original is untouched


def test_smoke_on_a_local_model(tiny_models, tiny_data, tmp_path):
    """The 4-bit QLoRA recipe on a twin of a local model: trains, merges on a full-precision reload, reloads."""
    from adapters.planning.smoke import smoke

    ov = tiny_overrides(tiny_models["qwen2"], tiny_data, tmp_path)
    ov.update(load_in_4bit=True, dtype="bfloat16", bf16=True)
    recipe, path = load_recipe("qwen2.5-1.5b-qlora", ov)
    r = smoke(recipe, path, steps=2)
    assert r["ok"] and r["steps"] == 2 and r["quantization"].startswith("4bit")
    assert r["merge_max_abs_diff"] < 1e-3
    assert r["adjusted"]["bf16"] is False  # reported, not silent


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_smoke_on_every_shipped_recipe(name):
    from adapters.planning.smoke import smoke

    recipe, path = load_recipe(name)
    r = smoke(recipe, path, steps=2)
    assert r["ok"] and r["steps"] == 2 and r["merge_max_abs_diff"] < 1e-3
