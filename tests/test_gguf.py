"""GGUF export without llama.cpp: tiny random Gemma3 / Llama / Qwen2 written with the gguf package and read back
with gguf.GGUFReader (names, shapes, types, template, tokenizer, values); LoRA on the base == merged, in torch."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.publish import gguf_export as gx

ARCHS = ("gemma3", "llama", "qwen2")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _read(path: Path):
    import gguf

    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.tokens")}
    return r, fields


def _tensor(r, name: str) -> torch.Tensor:
    """A tensor of a GGUF file, dequantized, in PyTorch's (rows, cols) order."""
    from gguf.quants import dequantize

    t = next(t for t in r.tensors if t.name == name)
    a = dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.array(a, dtype=np.float32)).reshape(list(reversed(t.shape.tolist())))


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load(tiny_models, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_models[arch]
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), AutoTokenizer.from_pretrained(d)


@pytest.mark.parametrize("arch", ARCHS)
def test_model_gguf_reads_back(tiny_models, tmp_path, arch):
    import gguf

    model, tok = _load(tiny_models, arch)
    cfg = model.config
    path = gx.write_model(tmp_path / "m.gguf", model.state_dict(), cfg, tok, "f16", tok.chat_template, arch)
    r, f = _read(path)
    assert f["general.architecture"] == gx.gguf_arch(cfg) and f["tokenizer.chat_template"] == tok.chat_template
    assert f["tokenizer.ggml.model"] == "gpt2" and len(r.fields["tokenizer.ggml.tokens"].data) == cfg.vocab_size
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id and f["general.type"] == "model"
    names = {t.name for t in r.tensors}
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[gx.ARCHS[cfg.model_type]], cfg.num_hidden_layers)
    sd = model.state_dict()
    want = {gx.map_name(tmap, k) for k in sd if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    assert names == want
    assert ("output.weight" in names) == (not cfg.tie_word_embeddings)
    assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")
    for k, v in sd.items():
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = next(t for t in r.tensors if t.name == gx.map_name(tmap, k))
        assert list(reversed(t.shape.tolist())) == list(v.shape), k
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if v.ndim == 1 else gguf.GGMLQuantizationType.F16)
        got = _tensor(r, t.name)
        if arch == "gemma3" and k.endswith("norm.weight"):
            got = got - 1  # stored +1, as llama.cpp's converter does
        if arch == "llama" and ".q_proj." in k:
            got = _unpermute(got, cfg.num_attention_heads)
        if arch == "llama" and ".k_proj." in k:
            got = _unpermute(got, cfg.num_key_value_heads)
        torch.testing.assert_close(got, v.float(), atol=2e-3, rtol=1e-3, msg=k)


def test_q8_0_and_bf16_round_trip(tiny_models, tmp_path):
    import gguf

    model, tok = _load(tiny_models, "qwen2")
    w = model.state_dict()["model.layers.0.mlp.down_proj.weight"]
    for outtype, atol in (("q8_0", 0.02), ("bf16", 0.01)):
        p = gx.write_model(tmp_path / f"{outtype}.gguf", model.state_dict(), model.config, tok, outtype, "x", "q")
        r, f = _read(p)
        t = next(t for t in r.tensors if t.name == "blk.0.ffn_down.weight")
        assert t.tensor_type == gx.qtype(outtype) and f["general.file_type"] == gx.file_type(outtype)
        torch.testing.assert_close(_tensor(r, t.name), w, atol=atol, rtol=0.02)
    assert gx.qtype("q8_0") == gguf.GGMLQuantizationType.Q8_0


def _peft(model, r=4, alpha=8, **kw):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False, **kw)
    return get_peft_model(model, cfg)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_gguf_on_base_equals_merged(tiny_models, tmp_path, arch):
    """W + (alpha/r) B A, computed from the GGUF files as llama.cpp applies them, equals the merged GGUF."""
    from peft import get_peft_model_state_dict

    model, tok = _load(tiny_models, arch)
    cfg = model.config
    base = gx.write_model(tmp_path / "b.gguf", model.state_dict(), cfg, tok, "f32", "t", "b")
    pm = _peft(model)
    for p in pm.parameters():  # B is zero-free already (init_lora_weights=False); make the delta large
        if p.requires_grad:
            p.data.mul_(3)
    acfg = {"r": 4, "lora_alpha": 8}
    lora = gx.write_lora(tmp_path / "a.gguf", get_peft_model_state_dict(pm), acfg, cfg, "f32", "a")
    merged = pm.merge_and_unload()
    mpath = gx.write_model(tmp_path / "m.gguf", merged.state_dict(), cfg, tok, "f32", "t", "m")
    rb, rl, rm = _read(base)[0], _read(lora), _read(mpath)[0]
    rl, fl = rl
    assert fl["general.type"] == "adapter" and fl["adapter.type"] == "lora" and fl["adapter.lora.alpha"] == 8.0
    lora_names = sorted({t.name.rsplit(".", 1)[0] for t in rl.tensors})
    assert len(lora_names) == len(TARGETS) * cfg.num_hidden_layers
    changed = 0
    for name in lora_names:
        a, b = _tensor(rl, name + ".lora_a"), _tensor(rl, name + ".lora_b")
        assert a.shape[0] == 4 and b.shape[1] == 4
        w = _tensor(rb, name) + (8 / 4) * b @ a
        torch.testing.assert_close(w, _tensor(rm, name), atol=1e-5, rtol=1e-5, msg=name)
        changed += not torch.allclose(_tensor(rb, name), _tensor(rm, name), atol=1e-3)
    assert changed == len(lora_names)


def test_lora_alpha_rules():
    assert gx.lora_alpha({"r": 16, "lora_alpha": 32}) == 32.0
    assert gx.lora_alpha({"r": 16, "lora_alpha": 32, "use_rslora": True}) == pytest.approx(128.0)  # 32/4 == 128/16
    with pytest.raises(gx.GGUFExportError, match="use_dora"):
        gx.lora_alpha({"r": 8, "lora_alpha": 8, "use_dora": True})
    with pytest.raises(gx.GGUFExportError, match="rank_pattern"):
        gx.lora_alpha({"r": 8, "lora_alpha": 8, "rank_pattern": {"q_proj": 4}})
    with pytest.raises(gx.GGUFExportError, match="modules_to_save"):
        gx.lora_pairs({"base_model.model.lm_head.modules_to_save.default.weight": torch.zeros(2, 2)})


def test_other_family_refused_with_llama_cpp_hint():
    from transformers import MistralConfig

    with pytest.raises(gx.GGUFExportError, match="--llama-cpp DIR"):
        gx.gguf_arch(MistralConfig())


def test_low_types_refused_for_merged_weights():
    from adapters.publish.export import _check_outtype

    with pytest.raises(gx.GGUFExportError, match=r"0/20.*20/20"):
        _check_outtype("q4_0", "merged", force=False)
    _check_outtype("q4_0", "merged", force=True)
    _check_outtype("q4_0", "lora", force=False)  # the adapter stays 16-bit; only the base is rounded
    _check_outtype("q8_0", "merged", force=False)
    with pytest.raises(gx.GGUFExportError, match="choose one of"):
        _check_outtype("q4_k_m", "merged", force=True)


def test_copy_with_template_keeps_tensors_and_tokenizer(tiny_models, tmp_path):
    model, tok = _load(tiny_models, "gemma3")
    src = gx.write_model(tmp_path / "s.gguf", model.state_dict(), model.config, tok, "q8_0", "OLD", "s")
    dst = gx.copy_with_template(src, tmp_path / "d.gguf", "NEW {{ messages }}")
    (rs, fs), (rd, fd) = _read(src), _read(dst)
    assert fd.pop("tokenizer.chat_template") == "NEW {{ messages }}" and fs.pop("tokenizer.chat_template") == "OLD"
    assert fd == fs
    assert rd.fields["tokenizer.ggml.tokens"].contents() == rs.fields["tokenizer.ggml.tokens"].contents()
    for a, b in zip(rs.tensors, rd.tensors):
        assert a.name == b.name and a.tensor_type == b.tensor_type and bytes(a.data) == bytes(b.data)


def test_modelfile_formats():
    from adapters.publish.modelfile import modelfile

    gemma = (Path(__file__).parents[1] / "adapters" / "templates" / "gemma.jinja").read_text()
    text, fmt = modelfile("base.gguf", "adapter.gguf", gemma, 512)
    assert fmt == "gemma" and text.startswith('FROM ./base.gguf\nADAPTER ./adapter.gguf\nTEMPLATE """')
    assert 'PARAMETER stop "<end_of_turn>"' in text and "<start_of_turn>model" in text and "num_ctx 512" in text
    chatml = (Path(__file__).parents[1] / "adapters" / "templates" / "chatml.jinja").read_text()
    text, fmt = modelfile("model.gguf", None, chatml, 512)
    assert fmt == "chatml" and "ADAPTER" not in text and 'PARAMETER stop "<|im_end|>"' in text
    text, fmt = modelfile("model.gguf", None, "{{ messages }}", 512)
    assert fmt is None and "TEMPLATE" not in text.replace("no TEMPLATE", "")


# ---------------------------------------------------------------------------------------------------- the verb
@pytest.fixture(scope="module")
def gemma_run(tiny_models, tiny_data, tmp_path_factory):
    from adapters.config import load_recipe
    from adapters.training.run import train

    from .conftest import tiny_overrides

    out = tmp_path_factory.mktemp("gguf_runs")
    over = tiny_overrides(tiny_models["gemma3"], tiny_data, out, run_name="g", max_steps=2, save_steps=2)
    recipe, path = load_recipe("gemma3-270m-demo", {**over, "eval_steps": 2, "eval_max_new_tokens": 4})
    return train(recipe, path)


class _FakeLlama:
    """Stands in for llama_cpp.Llama: answers what the test sets, tokenizes with the run's tokenizer."""

    answers: list[str] = []
    tok = None

    def __init__(self, model_path, lora_path=None, **kw):
        from gguf import GGUFReader

        r = GGUFReader(model_path)
        self.metadata = {"tokenizer.chat_template": r.fields["tokenizer.chat_template"].contents()}
        self.lora_path, self.i = lora_path, 0

    def create_chat_completion(self, messages, **kw):
        a = self.answers[self.i]
        self.i += 1
        return {"choices": [{"message": {"content": a}}]}

    def tokenize(self, text: bytes, add_bos=False, special=True):
        return self.tok(text.decode(), add_special_tokens=False)["input_ids"]


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    mod = types.ModuleType("llama_cpp")
    mod.Llama, mod.__version__ = _FakeLlama, "fake"
    monkeypatch.setitem(sys.modules, "llama_cpp", mod)
    return _FakeLlama


def _hf_answers(run_dir):
    from adapters.publish.export import _adapter_model, _probes
    from adapters.publish.merge import _budget
    from adapters.publish.rundir import load_run_tokenizer, open_run

    run = open_run(run_dir)
    tok = load_run_tokenizer(run)
    convs, refs, _ = _probes(run, 20)
    from adapters.evaluation.generation import generate_answers

    return generate_answers(_adapter_model(run), tok, convs, _budget(run, tok, refs), 8), tok


def test_export_without_llama_cpp_is_unverified(gemma_run, tmp_path, monkeypatch, capsys):
    from adapters.cli import main

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    assert main(["export", str(gemma_run), "--gguf", "--to", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert "UNVERIFIED" in out and "gguf-check" in out
    rep = json.loads((tmp_path / "g" / "export_report.json").read_text())
    assert rep["verdict"] == "unverified" and rep["verification"]["verified"] == "unverified"
    assert {"adapter.gguf", "base.gguf", "Modelfile"} <= set(rep["files"])
    _, f = _read(tmp_path / "g" / "base.gguf")
    assert f["tokenizer.chat_template"] == (gemma_run / "adapter" / "chat_template.jinja").read_text()
    assert "ADAPTER ./adapter.gguf" in (tmp_path / "g" / "Modelfile").read_text()


def test_export_verified_by_llama_cpp_passes_and_fails(gemma_run, tmp_path, fake_llama_cpp, capsys):
    from adapters.cli import main

    hf, tok = _hf_answers(gemma_run)
    fake_llama_cpp.tok, fake_llama_cpp.answers = tok, list(hf)
    assert main(["export", str(gemma_run), "--gguf", "--mode", "merged", "--to", str(tmp_path / "ok")]) == 0
    rep = json.loads((tmp_path / "ok" / "export_report.json").read_text())
    v = rep["verification"]
    assert rep["verdict"] == "pass" and v["verified"] is True and v["agreement"] == 1.0
    assert v["tokenization_agreement"] == 1.0 and v["gguf_chat_template_is_runs"] is True
    assert (tmp_path / "ok" / "model.gguf").is_file() and "FROM ./model.gguf" in (
        tmp_path / "ok" / "Modelfile"
    ).read_text()

    fake_llama_cpp.answers = ["wrong"] * len(hf)
    assert main(["export", str(gemma_run), "--gguf", "--mode", "merged", "--to", str(tmp_path / "bad")]) == 1
    rep = json.loads((tmp_path / "bad" / "export_report.json").read_text())
    assert rep["verdict"] == "fail" and not (tmp_path / "bad" / "model.gguf").exists()
    assert "FAILED" in capsys.readouterr().out
    args = ["export", str(gemma_run), "--gguf", "--mode", "merged", "--to", str(tmp_path / "bad"), "--force"]
    assert main(args) == 0
    assert (tmp_path / "bad" / "model.gguf").is_file()
    assert json.loads((tmp_path / "bad" / "export_report.json").read_text())["verdict"] == "forced"


def test_export_refusals_exit_2(gemma_run, tmp_path, capsys):
    from adapters.cli import main

    assert main(["export", str(gemma_run), "--gguf", "--mode", "merged", "--outtype", "q4_0"]) == 2
    assert "0/20" in capsys.readouterr().err
    assert main(["export", str(gemma_run)]) == 2
    assert "--to DIR is required" in capsys.readouterr().err
