"""scripts/gpu_check.sh and its Python half: the report, the carry size, the plain-PEFT adapter check, the script
end to end with --cpu (slow)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides


def _steps(work: Path, *rows) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "steps.jsonl").write_text(
        "".join(
            json.dumps({"name": n, "status": s, "rc": 0, "seconds": 1.5, "log": f"{n}.log", "note": ""}) + "\n"
            for n, s in rows
        )
    )


def test_report_gathers_results_and_passes_only_if_every_step_that_ran_passed(tmp_path):
    from adapters.planning.gpu_check import report

    work = tmp_path / "work"
    _steps(work, ("doctor", "ok"), ("bench", "ok"), ("bench_recipe", "skipped"))
    (work / "doctor.json").write_text(json.dumps({"ok": True, "problems": []}))
    (work / "bench").mkdir()
    (work / "bench" / "bench.json").write_text(json.dumps({"rows": [{"peak_mem_gib": 1.0}], "comparisons": []}))
    doc = report(work, tmp_path / "res" / "gpu_check.json", "cpu", 100)
    on_disk = json.loads((tmp_path / "res" / "gpu_check.json").read_text())
    assert on_disk["passed"] is True and doc["skipped"] == ["bench_recipe"] and on_disk["elapsed_s"] == 4.5
    by = {s["name"]: s for s in on_disk["steps"]}
    assert by["doctor"]["result"] == {"ok": True, "problems": []}
    assert by["bench"]["result"]["rows"][0]["peak_mem_gib"] == 1.0 and by["bench_recipe"]["result"] is None
    _steps(work, ("doctor", "ok"), ("train", "timeout"))
    assert report(work, tmp_path / "g.json", "gpu", 100)["passed"] is False
    _steps(work, ("doctor", "skipped"))
    assert report(work, tmp_path / "g.json", "gpu", 100)["passed"] is False  # nothing ran: nothing passed


def test_carry_size_counts_the_tree_and_the_wheels(tmp_path):
    from adapters.planning.gpu_check import carry_size

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text(".whl/\nbig/\n")
    (tmp_path / "a.txt").write_bytes(b"x" * 2**20)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "ignored.bin").write_bytes(b"x" * 2**20)  # ignored and not carried: not counted
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "w-1.0-py3-none-any.whl").write_bytes(b"x" * 3 * 2**20)
    info = carry_size(tmp_path)
    assert info["tree_mib"] == 1.0 and info["wheels_mib"] == 3.0 and info["total_mib"] == 4.0 and info["ok"]
    (tmp_path / ".whl" / "huge-1.0-py3-none-any.whl").write_bytes(b"\0" * 57 * 2**20)
    assert carry_size(tmp_path)["ok"] is False  # 61 MiB: under 64, but not well under


def test_validate_loads_the_adapter_in_plain_peft(tiny_models, tiny_data, tmp_path):
    from adapters.config import Recipe
    from adapters.planning.gpu_check import validate
    from adapters.training.run import train

    ov = tiny_overrides(tiny_models["llama"], tiny_data, tmp_path, max_steps=2, eval_after_train=False)
    run = train(Recipe(**ov, run_name="v"), REPO / "adapters" / "recipes" / "gemma3-270m-demo.yaml")
    res = validate(run)
    assert res["ok"] and res["status"] == "complete" and res["global_step"] == 2
    assert res["sharding"] is None and res["world_size"] == 1  # one process, nothing sharded
    assert res["peft"]["loaded"] and res["peft"]["finite"] and res["peft"]["max_logit_change_vs_base"] > 0
    assert res["adapter"]["lora_B"] > 0
    assert validate(run, expect_sharding="fsdp")["ok"] is False  # what the GPU run requires


@pytest.mark.slow
def test_gpu_check_cpu_end_to_end(tmp_path):
    """scripts/gpu_check.sh --cpu: every step at tiny shapes, one JSON and the logs (about 8 minutes here)."""
    env = {**os.environ, "OUT": str(tmp_path / "res"), "GPU_CHECK_WORK": str(tmp_path / "work")}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu"], cwd=REPO, env=env, capture_output=True, text=True
    )
    doc = json.loads((tmp_path / "res" / "gpu_check.json").read_text())
    names = [s["name"] for s in doc["steps"]]
    assert names == ["setup", "model", "doctor", "train", "merge", "fsdp", "bench", "bench_recipe"], proc.stdout
    assert proc.returncode == 0 and doc["passed"], proc.stdout
    by = {s["name"]: s["result"] for s in doc["steps"]}
    assert by["train"]["quantization"] == "4bit-nf4+double_quant" and by["train"]["config"]["bf16"] is True
    assert by["train"]["merge"]["verdict"] == "pass"
    assert by["fsdp"]["ok"] and by["fsdp"]["peft"]["loaded"]
    assert {c["scenario"] for c in by["bench"]["comparisons"]} >= {"fixed", "ragged"}
    assert len(list((tmp_path / "res").iterdir())) <= 8  # what the device tool brings back
