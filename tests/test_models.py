"""Model sources: clear errors for missing or unreadable models; the pure quantization-config builder."""

from __future__ import annotations

import pytest
import torch

from adapters.config import load_recipe
from adapters.model.loading import load_tokenizer
from adapters.model.quantization import quantization_config
from adapters.model.sources import ModelSourceError, resolve_model


def test_missing_directory(tmp_path):
    with pytest.raises(ModelSourceError, match="not a directory, .gguf file, embedded name or hub id"):
        resolve_model(str(tmp_path / "nope" / "deeper" / "x"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match="cannot read .*config.json"):
        resolve_model(str(tmp_path))


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelSourceError, match="no such .gguf file"):
        resolve_model(str(tmp_path / "m.gguf"))


def test_unknown_embedded():
    with pytest.raises(ModelSourceError, match="unknown embedded model"):
        resolve_model("embedded:gpt-5")


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe, _ = load_recipe("llama-3.2-1b-qlora")
    ref = resolve_model("some-org/some-model")
    assert ref.kind == "hub"
    with pytest.raises(ModelSourceError, match="no model hub is reachable"):
        load_tokenizer(ref, recipe)


def test_local_dir_resolves(tiny_models):
    ref = resolve_model(str(tiny_models["gemma3"]))
    assert ref.kind == "local" and ref.path == str(tiny_models["gemma3"].resolve())


def test_quantization_config_builder():
    r, _ = load_recipe(
        "gemma3-270m-demo",
        {
            "load_in_8bit": False,
            "load_in_4bit": True,
            "dtype": "bfloat16",
            "bnb_4bit_quant_type": "fp4",
            "bnb_4bit_quant_storage": "bfloat16",
        },
    )
    qc = quantization_config(r)
    assert qc.load_in_4bit and qc.bnb_4bit_quant_type == "fp4" and qc.bnb_4bit_compute_dtype == torch.bfloat16
    assert qc.bnb_4bit_quant_storage == torch.bfloat16
    r, _ = load_recipe("gemma3-270m-demo", {"load_in_8bit": False})
    assert quantization_config(r) is None
