"""Verified merge, adapter combination and export on tiny random models (CPU).

One tiny run is trained per session (init_lora_weights=False, so the adapter is not the identity) and merged once;
the other tests reuse it or copies of it. Equivalence checks follow PEFT's own: fp32, allclose(atol=1e-4).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters import cli
from adapters.config import load_recipe
from adapters.data.encode import encode_messages
from adapters.data.validate import read_rows
from adapters.publish.merge import MergeError, ensure_full_precision, merge_into, merge_run, save_merged
from adapters.training.run import train

from .conftest import REPO, build_tokenizer, tiny_overrides


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained_run(tiny_models, tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merge_runs")
    recipe, path = load_recipe(
        "gemma3-270m-demo",
        tiny_overrides(
            tiny_models["llama"],
            tiny_data,
            out,
            run_name="a",
            init_lora_weights=False,
            eval_base=False,
            save_steps=1000,
            eval_strategy="no",
        ),
    )
    return train(recipe, path)


@pytest.fixture(scope="module")
def merged_run(trained_run, tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("merged") / "a"
    shutil.copytree(trained_run, run)
    report = merge_run(run)
    return run, report


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("merged", "checkpoints"))
    return dst


def _perturbed_run(src: Path, dst: Path, seed: int = 1) -> Path:
    """A second adapter on the same base: the first one's tensors plus seeded noise (a stand-in for another run)."""
    from safetensors.torch import load_file, save_file

    _copy_run(src, dst)
    f = dst / "adapter" / "adapter_model.safetensors"
    g = torch.Generator().manual_seed(seed)
    t = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=g) for k, v in load_file(str(f)).items()}
    save_file(t, str(f), metadata={"format": "pt"})
    (dst / "merge_report.json").unlink(missing_ok=True)
    return dst


def _batch(run: Path, n: int = 3) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run / "adapter"))
    rows = read_rows(json.loads((run / "manifest.json").read_text())["config"]["eval_file"])[:n]
    ids = [encode_messages(tok, r.messages)[0] for r in rows]
    width = min(len(i) for i in ids)
    return torch.tensor([i[:width] for i in ids])


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits.float()


# ---------------------------------------------------------------------------------------------------- merge core
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merged_equals_adapter_and_differs_from_base(arch, tiny_models, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
    ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    base_logits = _logits(base, ids)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    adapter_logits = _logits(model, ids)
    merged, untied = merge_into(model)
    assert not untied
    merged_logits = _logits(merged, ids)
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 1e-2, "the merge changed nothing"
    save_merged(merged, build_tokenizer(), tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    torch.testing.assert_close(_logits(reloaded, ids), adapter_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("targets", [["lm_head", "q_proj"], ["embed_tokens", "v_proj"]])
def test_tied_embeddings_merge_save_reload(targets, tiny_models, tmp_path):
    """RELIABILITY 12: tied embeddings with lm_head (or embed_tokens) adapted reload to the adapter's logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_models["gemma3"], dtype=torch.float32)
    assert base.config.tie_word_embeddings
    ids = torch.randint(0, base.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    base_logits = _logits(base, ids)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    adapter_logits = _logits(model, ids)
    merged, untied = merge_into(model)
    assert untied
    torch.testing.assert_close(_logits(merged, ids), adapter_logits, atol=1e-4, rtol=1e-4)
    save_merged(merged, build_tokenizer(), tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert not reloaded.config.tie_word_embeddings
    got = _logits(reloaded, ids)
    torch.testing.assert_close(got, adapter_logits, atol=1e-4, rtol=1e-4)
    assert (got - base_logits).abs().max() > 1e-2


def test_quantized_model_is_refused(tiny_models):
    """RELIABILITY 11: never merge into 4-bit weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = AutoModelForCausalLM.from_pretrained(
        tiny_models["llama"], quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map={"": "cpu"}
    )
    with pytest.raises(MergeError, match="rounds most of the update away"):
        ensure_full_precision(q, "test")
    model = get_peft_model(q, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    with pytest.raises(MergeError, match="loaded quantized"):
        merge_into(model)


def test_stored_quantized_base_is_refused(trained_run, tiny_models, tmp_path):
    run = _copy_run(trained_run, tmp_path / "run")
    qbase = tmp_path / "qbase"
    shutil.copytree(tiny_models["llama"], qbase)
    cfg = json.loads((qbase / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (qbase / "config.json").write_text(json.dumps(cfg))
    mf = json.loads((run / "manifest.json").read_text())
    mf["base_model"]["path"] = str(qbase)
    (run / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(MergeError, match="stored quantized .bitsandbytes 4-bit"):
        merge_run(run)
    assert not (run / "merged").exists()


# ---------------------------------------------------------------------------------------------------- merge a run
def test_merge_run_report(merged_run):
    run, report = merged_run
    on_disk = json.loads((run / "merge_report.json").read_text())
    assert on_disk["verdict"] == report["verdict"] == "pass"
    for key in ("vs_adapter_full_precision", "vs_adapter_as_trained", "reloaded_vs_merged"):
        c = on_disk[key]
        assert c["mean_kl"] < 1e-5 and c["max_abs_logit_diff"] < 1e-3 and c["top1_agreement"] == 1.0, (key, c)
    assert on_disk["vs_adapter_full_precision"]["greedy_all_match"]
    assert on_disk["heldout"]["merged_exact_match"] == on_disk["heldout"]["adapter_exact_match"]
    mem = on_disk["memory"]
    assert mem["peak_rss_mb"] >= mem["start_rss_mb"] > 0 and mem["model_mb"] > 0
    assert on_disk["seconds"]["total"] > 0
    assert not (run / ".merged.staging").exists()


def test_merged_folder_loads_with_plain_transformers(merged_run, tiny_models):
    """Plain transformers on merged/ == plain PEFT base + adapter; and != the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = merged_run
    names = {p.name for p in (run / "merged").iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    ids = _batch(run)
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    base_logits = _logits(base, ids)
    peft = PeftModel.from_pretrained(base, run / "adapter")
    torch.testing.assert_close(_logits(merged, ids), _logits(peft, ids), atol=1e-4, rtol=1e-4)
    assert (_logits(merged, ids) - base_logits).abs().max() > 1e-2
    tok = AutoTokenizer.from_pretrained(run / "merged")
    assert tok.chat_template == AutoTokenizer.from_pretrained(run / "adapter").chat_template


def test_max_kl_failure_exit_code(trained_run, tmp_path, monkeypatch, capsys):
    """A merged model that disagrees with the adapter: exit 1, merged/ not written; --force writes it."""
    import adapters.publish.merge as m

    real = m.merge_into

    def corrupt(peft_model):
        merged, untied = real(peft_model)
        with torch.no_grad():
            merged.get_output_embeddings().weight.add_(0.5)
            merged.get_output_embeddings().weight[:7].mul_(3.0)
        return merged, untied

    monkeypatch.setattr(m, "merge_into", corrupt)
    run = _copy_run(trained_run, tmp_path / "run")
    assert cli.main(["merge", str(run), "--max-kl", "1e-3", "--probes", "2"]) == 1
    report = json.loads((run / "merge_report.json").read_text())
    assert report["verdict"] == "fail" and report["vs_adapter_full_precision"]["mean_kl"] > 1e-3
    assert not (run / "merged").exists() and not (run / ".merged.staging").exists()
    assert cli.main(["merge", str(run), "--max-kl", "1e-3", "--probes", "2", "--force"]) == 0
    assert json.loads((run / "merge_report.json").read_text())["verdict"] == "forced"
    assert (run / "merged" / "config.json").is_file()


def test_merge_cli_errors(tmp_path, capsys):
    assert cli.main(["merge", str(tmp_path)]) == 2
    assert "manifest.json: missing" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- combine
def test_combine_two_adapters(trained_run, tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapters.publish.combine import combine_runs

    a = _copy_run(trained_run, tmp_path / "a")
    b = _perturbed_run(trained_run, tmp_path / "b")
    rep = combine_runs([str(a), str(b)], "cat", [1.0, 1.0], None, tmp_path / "ab", n_probes=2)
    out = tmp_path / "ab"
    assert {"adapter", "manifest.json", "combine_report.json", "eval.json"} <= {p.name for p in out.iterdir()}
    assert rep["vs_base"]["max_abs_logit_diff"] > 1e-2
    # cat with weights 1, 1 is exact: the combined adapter equals both adapters active at once
    ids = _batch(a)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    both = PeftModel.from_pretrained(base, a / "adapter", adapter_name="a")
    both.load_adapter(str(b / "adapter"), adapter_name="b")
    both.base_model.set_adapter(["a", "b"])
    want = _logits(both, ids)
    base2 = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    combined = PeftModel.from_pretrained(base2, out / "adapter")
    torch.testing.assert_close(_logits(combined, ids), want, atol=1e-4, rtol=1e-4)
    # linear with weights, merged into the base: a verified merged/ of the combination
    rep = combine_runs([str(a), str(b)], "linear", [0.7, 0.3], None, tmp_path / "lin", merged=True, n_probes=2)
    assert rep["verdict"] == "pass" and (tmp_path / "lin" / "merged" / "config.json").is_file()
    assert json.loads((tmp_path / "lin" / "manifest.json").read_text())["combined_from"][1]["weight"] == 0.3


def test_combine_refuses_different_bases(trained_run, tmp_path):
    from adapters.publish.combine import combine_runs

    a = _copy_run(trained_run, tmp_path / "a")
    b = _copy_run(trained_run, tmp_path / "b")
    mf = json.loads((b / "manifest.json").read_text())
    mf["base_fingerprint"] = "0" * 64
    (b / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(MergeError, match="different base model"):
        combine_runs([str(a), str(b)], "linear", None, None, tmp_path / "ab")
    assert (
        cli.main(
            ["merge", "--adapters", str(a), str(b), "--method", "ties", "--weights", "1", "--out", str(tmp_path / "x")]
        )
        == 2
    )


# ---------------------------------------------------------------------------------------------------- export
def test_export(trained_run, tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    to = tmp_path / "export"
    assert cli.main(["export", str(trained_run), "--to", str(to)]) == 0
    names = {p.name for p in to.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "README.md",
        "chat_template.jinja",
        "tokenizer_config.json",
    } <= names
    card = (to / "README.md").read_text()
    assert card.startswith("---") and "library_name: peft" in card
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    ids = _batch(trained_run)
    want = _logits(PeftModel.from_pretrained(base, trained_run / "adapter"), ids)
    base2 = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(base2, to), ids), want)
    assert (
        AutoTokenizer.from_pretrained(to).chat_template
        == AutoTokenizer.from_pretrained(trained_run / "adapter").chat_template
    )
    assert cli.main(["export", str(trained_run), "--to", str(to)]) == 2  # exists: refused, untouched
    assert (to / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------- memory
MEM_SCRIPT = r"""
import json, shutil, sys
from pathlib import Path
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig
sys.path.insert(0, sys.argv[3])
from adapters.publish.rundir import base_fingerprint
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
# 32000*1024*2 embeddings + 6 layers * (4*1024^2 + 3*1024*2048) = 128M parameters, 0.51 GB in fp32
cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=6,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
model = AutoModelForCausalLM.from_config(cfg)
model.save_pretrained(dst / "base")
shutil.copytree(src, dst / "run", ignore=shutil.ignore_patterns("merged", "checkpoints", "merge_report.json"))
mf = json.loads((dst / "run" / "manifest.json").read_text())
mf["base_model"]["path"] = str(dst / "base")
mf["base_fingerprint"] = base_fingerprint(model)
mf["base_config"] = {k: getattr(model.config, k) for k in ("model_type", "vocab_size", "hidden_size",
                                                            "num_hidden_layers")}
(dst / "run" / "manifest.json").write_text(json.dumps(mf))
peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
peft.save_pretrained(dst / "adapter_tmp")
for f in ("adapter_model.safetensors", "adapter_config.json"):
    shutil.copy(dst / "adapter_tmp" / f, dst / "run" / "adapter" / f)
"""


@pytest.mark.slow
def test_peak_rss_on_128m_model(trained_run, tmp_path):
    """Bounded memory: the whole `adapters merge` of a 128M-parameter model, in a fresh process."""
    py = sys.executable
    subprocess.run([py, "-c", MEM_SCRIPT, str(trained_run), str(tmp_path), str(REPO)], check=True)
    res = subprocess.run(
        [py, "-m", "adapters", "merge", str(tmp_path / "run"), "--max-kl", "1e-3"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    mem = json.loads((tmp_path / "run" / "merge_report.json").read_text())["memory"]
    print(mem)
    assert 480 < mem["model_mb"] < 500
    # the memory the merge holds (anonymous RSS) stays within 1.3x the merged model; total RSS also counts clean,
    # reclaimable pages of the memory-mapped base checkpoint and is recorded next to it
    assert mem["peak_anon_rise_over_model"] < 1.3, mem
    assert mem["peak_rss_mb"] >= mem["peak_anon_mb"] and mem["process_ru_maxrss_mb"] >= mem["model_mb"]


@pytest.mark.slow
def test_merge_int8_trained_run(tiny_models, tiny_data, tmp_path):
    """RELIABILITY 11: a run trained on a quantized base merges on a full-precision reload; both references are
    checked. (int8: bitsandbytes' CPU 4-bit kernels need dimensions divisible by 32, which the tiny models lack.)"""
    recipe, path = load_recipe(
        "gemma3-270m-demo",
        tiny_overrides(
            tiny_models["llama"],
            tiny_data,
            tmp_path,
            run_name="q",
            init_lora_weights=False,
            eval_base=False,
            load_in_8bit=True,
            save_steps=1000,
            eval_strategy="no",
        ),
    )
    run = train(recipe, path)
    report = merge_run(run, n_probes=4)
    assert report["verdict"] == "pass"
    assert report["vs_adapter_as_trained"]["form"] == "int8"
    assert report["vs_adapter_as_trained"]["max_abs_logit_diff"] > 0  # the quantized reference really ran
    assert report["vs_adapter_full_precision"]["mean_kl"] < 1e-5
