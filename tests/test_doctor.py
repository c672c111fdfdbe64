"""`adapters doctor`: the CPU path end to end on a tiny model, and each problem line on a report faked where a GPU is
needed (torch.cuda monkeypatched, or the collected facts edited as a GPU machine would report them)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def cpu_report():
    """The facts of this machine without a recipe (no compile try: it takes a minute on a small CPU)."""
    from adapters.planning.doctor import collect

    return collect(None, output_root="outputs", hub_timeout=0.5, compile_timeout=0)


def _recipe(tiny_models, tiny_data, tmp_path, **extra):
    from adapters.config import Recipe

    return Recipe(**tiny_overrides(tiny_models["llama"], tiny_data, tmp_path, **extra))


def _gpu(report, *, name="NVIDIA H200", capability="9.0", bf16=True):
    """The report as a GPU machine would write it: the device part."""
    r = copy.deepcopy(report)
    r["device"].update(
        kind="cuda",
        torch_cuda="12.8",
        gpus=[
            {
                "index": 0,
                "name": name,
                "memory_gib": 139.8,
                "free_gib": 139.0,
                "capability": capability,
                "multiprocessors": 132,
                "bf16": bf16,
                "driver": "580.159.03",
            }
        ],
        nvidia_smi=[{"name": name, "driver": "580.159.03", "memory_mib": "143771"}],
    )
    return r


def _lines(problems):
    return [p.line() for p in problems]


def test_cpu_path_with_a_recipe_writes_doctor_json(tiny_models, tiny_data, tmp_path, capsys):
    """The CLI on a 4-bit tiny Llama recipe: every section, the switch verdicts, a self-test that stepped, exit 0."""
    import yaml

    from adapters.cli import main

    ov = tiny_overrides(tiny_models["llama"], tiny_data, tmp_path / "runs", load_in_4bit=True, dtype="float32")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(ov))
    code = main(["doctor", str(recipe_file), "--compile-timeout", "0", "--hub-timeout", "0.5"])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "runs" / "doctor.json").read_text())
    assert code == 0, out
    assert report["ok"] and report["problems"] == []
    assert report["device"]["kind"] == "cpu" and report["device"]["cpu"]["usable_cores"] >= 1
    assert {x["name"] for x in report["libraries"]} >= {"torch", "transformers", "peft", "trl", "bitsandbytes"}
    assert all(x["ok"] for x in report["libraries"])  # this venv is the tested set
    assert report["bitsandbytes"]["int8"]["ok"] and report["bitsandbytes"]["4bit"]["ok"]
    assert report["kernels"]["sdpa"]["ok"] is True
    assert report["kernels"]["liger_kernel"]["ok"] is False  # no CUDA here, whether or not it is installed
    st = report["recipe"]["self_test"]
    assert st["ok"] and st["device"] == "cpu" and st["quantization"] == "4bit-nf4+double_quant"
    changed, total = map(int, st["lora_tensors_changed"].split("/"))
    assert changed == total > 0 and st["step_s"] > 0 and st["peak_rss_rise_mb"] >= 0
    switches = report["recipe"]["speed"]["switches"]
    assert set(switches) >= {"padding_free", "use_liger_kernel", "torch_compile"}
    assert switches["use_liger_kernel"]["value"] is False and "CUDA" in switches["use_liger_kernel"]["why"]
    assert report["recipe"]["needs"]["parameters"] > 0 and report["recipe"]["needs"]["merge_dtype"] == "float32"
    assert "self-test ok on cpu" in out and "problems    none" in out


def test_self_test_steps_padding_free_when_decided(tiny_models, tiny_data, tmp_path):
    from adapters.planning.doctor import self_test, switch_verdicts

    recipe = _recipe(tiny_models, tiny_data, tmp_path, padding_free=True)
    verdicts = switch_verdicts(recipe, cuda=False)
    assert verdicts["switches"]["padding_free"]["value"] is True
    st = self_test(recipe, verdicts["switches"])
    assert st["ok"], st
    assert "padding-free" in st["batch"]


def test_self_test_names_the_failing_stage(tiny_models, tiny_data, tmp_path, monkeypatch):
    from adapters.planning import doctor

    def broken(recipe, model):
        raise RuntimeError("no kernel for this optimizer here")

    monkeypatch.setattr(doctor, "_optimizer", broken)
    st = doctor.self_test(_recipe(tiny_models, tiny_data, tmp_path))
    assert st["ok"] is False and st["error"].startswith("at optimizer: RuntimeError: no kernel")
    report = {"self_test": st}
    fake = {"device": {"kind": "cpu", "cpu": {"bf16_instructions": []}}, "kernels": {}, "bitsandbytes": {}}
    lines = _lines(
        doctor.recipe_problems(
            {**fake, "hub": {}, "disk": _disk(9.0), "recipe": report}, _recipe(tiny_models, tiny_data, tmp_path)
        )
    )
    assert any(ln.startswith("ERROR [self-test]") and "at optimizer" in ln and "Fix:" in ln for ln in lines)


def _disk(free):
    return {
        "output_root": {"path": "/x", "free_gib": free, "total_gib": 10},
        "hf_cache": {"path": "/h", "free_gib": free},
    }


def test_device_report_reads_each_gpu(monkeypatch):
    """A faked CUDA device: name, memory, free memory, compute capability, bf16 and the driver from nvidia-smi."""
    import torch

    from adapters.planning import doctor

    props = SimpleNamespace(name="Tesla T4", total_memory=15 * 2**30, multi_processor_count=40)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: props.name)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (14 * 2**30, 15 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 5))
    monkeypatch.setattr(doctor, "_nvidia_smi", lambda: [{"name": "Tesla T4", "driver": "535.1", "memory_mib": "15360"}])
    dev = doctor.device_report()
    assert dev["kind"] == "cuda"
    assert dev["gpus"] == [
        {
            "index": 0,
            "name": "Tesla T4",
            "memory_gib": 15.0,
            "free_gib": 14.0,
            "capability": "7.5",
            "multiprocessors": 40,
            "bf16": False,
            "driver": "535.1",
        }
    ]
    assert "1 x Tesla T4" in doctor.device_name(dev)


def test_bitsandbytes_without_cuda_on_a_gpu_machine(cpu_report, monkeypatch):
    """bitsandbytes tried on 'cuda' where its layers cannot go there (a CPU-only build, faked by this CPU torch):
    the 4-bit try fails, and the line says so with the reinstall / BNB_CUDA_VERSION fix."""
    from adapters.planning import doctor

    monkeypatch.setattr(doctor, "_device", lambda: "cuda")
    bnb = doctor.bitsandbytes_report()
    assert bnb["device"] == "cuda" and bnb["native_library"] == "CPU"
    assert bnb["4bit"]["ok"] is False and bnb["int8"]["ok"] is False
    report = _gpu(cpu_report)
    report["bitsandbytes"] = bnb
    lines = _lines(doctor.find_problems(report))
    hit = [ln for ln in lines if "no working CUDA backend" in ln]
    assert len(hit) == 1 and hit[0].startswith("ERROR [bitsandbytes]") and "BNB_CUDA_VERSION" in hit[0]
    # the same facts on a CPU machine are no CUDA problem
    assert not any("CUDA backend" in ln for ln in _lines(doctor.find_problems(cpu_report)))


def test_bf16_on_a_gpu_without_it(cpu_report, tiny_models, tiny_data, tmp_path):
    from adapters.planning.doctor import find_problems

    recipe = _recipe(tiny_models, tiny_data, tmp_path, bf16=True, dtype="bfloat16")
    report = _gpu(cpu_report, name="Tesla T4", capability="7.5", bf16=False)
    report["bitsandbytes"]["native_library"] = "CUDA"
    report["recipe"] = {"needs": {}, "speed": {}, "preflight": []}
    lines = [ln for ln in _lines(find_problems(report, recipe)) if "[precision]" in ln]
    assert len(lines) == 1
    assert (
        lines[0].startswith("ERROR") and "Tesla T4 (sm 7.5)" in lines[0] and "bf16: true, dtype: bfloat16" in lines[0]
    )
    assert "Fix: --bf16 false --fp16 true --dtype float16" in lines[0]
    # on an H200 the same recipe is fine
    h200 = _gpu(cpu_report)
    h200["recipe"] = report["recipe"]
    assert not [ln for ln in _lines(find_problems(h200, recipe)) if "[precision]" in ln]


def test_bf16_on_a_cpu_without_bf16_instructions(cpu_report, tiny_models, tiny_data, tmp_path):
    from adapters.planning.doctor import find_problems

    recipe = _recipe(tiny_models, tiny_data, tmp_path, load_in_4bit=True, bnb_4bit_compute_dtype="bfloat16")
    report = copy.deepcopy(cpu_report)
    report["recipe"] = {"needs": {}, "speed": {}, "preflight": []}
    report["device"]["cpu"]["bf16_instructions"] = []
    lines = [ln for ln in _lines(find_problems(report, recipe)) if "[precision]" in ln]
    assert lines == [
        "WARNING [precision] the recipe asks for bfloat16 (bnb_4bit_compute_dtype: bfloat16) on a CPU without "
        "avx512_bf16/amx_bf16: it runs emulated, slower than float32. Fix: --dtype float32 --bf16 false "
        "--bnb_4bit_compute_dtype float32"
    ]
    report["device"]["cpu"]["bf16_instructions"] = ["amx_bf16"]
    assert not [ln for ln in _lines(find_problems(report, recipe)) if "[precision]" in ln]


def test_too_little_disk_for_the_merged_model(cpu_report, tiny_models, tiny_data, tmp_path):
    from adapters.planning.doctor import find_problems, recipe_needs

    recipe = _recipe(tiny_models, tiny_data, tmp_path)
    needs = recipe_needs(recipe)
    needs.pop("config")
    assert needs["model_kind"] == "local" and needs["merge_dtype"] == "float32" and needs["download_gib"] == 0
    report = copy.deepcopy(cpu_report)
    report["recipe"] = {
        "needs": {**needs, "merged_model_gib": 3.2, "parameters": 800_000_000},
        "speed": {},
        "preflight": [],
    }
    report["disk"]["output_root"]["free_gib"] = 1.5
    lines = [ln for ln in _lines(find_problems(report, recipe)) if "[disk]" in ln]
    assert len(lines) == 1 and lines[0].startswith("ERROR")
    assert "1.5 GiB free" in lines[0] and "needs about 3.2 GiB" in lines[0] and "--output_root" in lines[0]
    report["disk"]["output_root"]["free_gib"] = 50.0
    assert not [ln for ln in _lines(find_problems(report, recipe)) if "[disk]" in ln]


def test_cpu_torch_on_a_machine_with_an_nvidia_gpu(cpu_report):
    from adapters.planning.doctor import find_problems

    report = copy.deepcopy(cpu_report)
    report["device"]["nvidia_smi"] = [{"name": "NVIDIA H200", "driver": "580", "memory_mib": "143771"}]
    lines = [ln for ln in _lines(find_problems(report)) if "[device]" in ln]
    assert len(lines) == 1 and "has no CUDA" in lines[0] and "install a CUDA build of torch" in lines[0]


def test_versions_missing_or_outside_the_tested_range(cpu_report):
    from adapters.planning.doctor import find_problems

    report = copy.deepcopy(cpu_report)
    libs = {x["name"]: x for x in report["libraries"]}
    libs["trl"].update(installed=None, ok=False)
    libs["huggingface_hub"].update(installed="1.33.0", ok=False)
    lines = _lines(find_problems(report))
    assert "ERROR [versions] trl is not installed. Fix: pip install 'trl<2,>=1.16'" in lines
    assert (
        "WARNING [versions] huggingface_hub 1.33.0 is outside the tested range <3,>=2.4. "
        "Fix: pip install 'huggingface_hub<3,>=2.4'"
    ) in lines


def test_hub_model_without_hub_or_cache(cpu_report, tiny_models, tiny_data, tmp_path):
    from adapters.planning.doctor import find_problems

    recipe = _recipe(tiny_models, tiny_data, tmp_path, model_name_or_path="meta-llama/Llama-3.2-1B-Instruct")
    report = copy.deepcopy(cpu_report)
    report["hub"] = {"endpoint": "https://huggingface.co", "offline": True, "reachable": None}
    report["recipe"] = {"needs": {"model_kind": "hub", "in_hub_cache": False}, "speed": {}, "preflight": []}
    lines = [ln for ln in _lines(find_problems(report, recipe)) if "[hub]" in ln]
    assert len(lines) == 1 and "HF_HUB_OFFLINE is set" in lines[0] and "local directory" in lines[0]
    report["recipe"]["needs"]["in_hub_cache"] = True
    assert not [ln for ln in _lines(find_problems(report, recipe)) if "[hub]" in ln]


def test_optimizer_attention_speed_and_preflight_lines(cpu_report, tiny_models, tiny_data, tmp_path):
    from adapters.planning.doctor import find_problems, switch_verdicts

    recipe = _recipe(
        tiny_models,
        tiny_data,
        tmp_path,
        optim="paged_adamw_8bit",
        attn_implementation="flash_attention_2",
        use_liger_kernel=True,
        packing=True,
        packing_strategy="wrapped",
    )
    report = copy.deepcopy(cpu_report)
    report["bitsandbytes"]["optim_8bit"] = {"ok": False, "error": "RuntimeError: no 8-bit optimizer kernel"}
    from adapters.planning.preflight import Launch, problems

    speed = switch_verdicts(recipe, cuda=False)  # use_liger_kernel: true without CUDA is refused by speed.plan
    report["recipe"] = {"needs": {}, "speed": speed, "preflight": problems(recipe, Launch())}
    lines = _lines(find_problems(report, recipe))
    text = "\n".join(lines)
    assert "ERROR [optimizer] optim paged_adamw_8bit needs bitsandbytes' 8-bit optimizer" in text
    assert "Fix: --optim adamw_torch" in text
    assert "ERROR [attention] attn_implementation flash_attention_2: flash-attn" in text
    assert "Fix: --attn_implementation sdpa" in text
    assert "ERROR [speed] use_liger_kernel: true, but liger_kernel is not installed or there is no CUDA device" in text
    assert "Fix: --use_liger_kernel auto" in text
    assert any(ln.startswith("ERROR [preflight] packing with packing_strategy 'wrapped'") for ln in lines)
    assert all(". Fix: " in ln for ln in lines)


def test_hub_offline_and_unreachable(monkeypatch):
    from huggingface_hub import constants

    from adapters.planning.doctor import hub_report

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_report()["reachable"] is None and hub_report()["offline"] is True
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    r = hub_report(timeout=2)
    assert r["reachable"] is False and r["error"]


def test_compile_probe_timeout_and_failure_are_reported():
    from adapters.planning.doctor import finish_compile_probe

    slow = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    r = finish_compile_probe(slow, timeout=0.2)
    assert r["ok"] is None and "did not finish" in r["error"] and slow.poll() is not None
    bad = subprocess.Popen(
        [sys.executable, "-c", "raise RuntimeError('no C++ compiler')"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    r = finish_compile_probe(bad, timeout=30)
    assert r["ok"] is False and "no C++ compiler" in r["error"]


def test_doctor_without_recipe_writes_under_output_root(tmp_path, capsys):
    from adapters.cli import main

    code = main(["doctor", "--compile-timeout", "0", "--hub-timeout", "0.2", "--output_root", str(tmp_path)])
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert code == 0 and report["ok"] and "recipe" not in report
    assert report["disk"]["output_root"]["path"] == str(tmp_path)
    assert f"wrote {tmp_path / 'doctor.json'}" in capsys.readouterr().out


def test_sdpa_and_quantized_layer_failures(cpu_report, tiny_models, tiny_data, tmp_path):
    from adapters.planning.doctor import find_problems

    report = copy.deepcopy(cpu_report)
    report["kernels"]["sdpa"] = {"ok": False, "error": "RuntimeError: no kernel"}
    report["bitsandbytes"]["int8"] = {"ok": False, "error": "RuntimeError: int8 matmul missing"}
    report["recipe"] = {"needs": {}, "speed": {}, "preflight": []}
    int8 = _recipe(tiny_models, tiny_data, tmp_path, load_in_8bit=True)
    lines = _lines(find_problems(report, int8))
    assert (
        "ERROR [sdpa] scaled_dot_product_attention failed: RuntimeError: no kernel. Fix: --attn_implementation eager"
        in lines
    )
    assert any(
        ln.startswith("ERROR [bitsandbytes] bitsandbytes int8 does not run on cpu") and "--load_in_8bit false" in ln
        for ln in lines
    )
    # a recipe that does not quantize in int8 only gets a warning about it
    lines = _lines(find_problems(report, _recipe(tiny_models, tiny_data, tmp_path)))
    assert any(ln.startswith("WARNING [bitsandbytes] bitsandbytes int8") for ln in lines)


def test_cuda_only_kernels_say_why_they_are_unusable(monkeypatch):
    import torch

    from adapters.planning.doctor import _cuda_kernel

    assert _cuda_kernel("no_such_module_here", "nope", "", None)["error"] == "nope is not installed"
    r = _cuda_kernel("json", "json", " (Triton)", None)  # installed, but this machine has no CUDA
    assert r["ok"] is False and r["installed"] and r["error"] == "json needs a CUDA GPU (Triton)"

    def broken():
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    r = _cuda_kernel("json", "json", "", broken)
    assert r["ok"] is False and r["error"].startswith("RuntimeError: CUDA error: no kernel image")
    assert _cuda_kernel("json", "json", "", lambda: None)["ok"] is True
