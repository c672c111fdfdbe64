"""Issue 25: faults on the newer surfaces, and RELIABILITY.md rows 35-42 (one ``test_row<N>_...`` or more each).

The encoded-data cache checked before use, export/merge over an earlier one, read-only or full output locations,
damaged adapters in every verb, impossible command-line values, an empty prompt, Ctrl-C in export/merge, and no
run folder left by a refusal. Tiny in-process models; one trained run shared by the module.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from adapters.cli import main
from adapters.config import RecipeError, load_recipe
from adapters.data import cache

from .conftest import tiny_overrides


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def done_run(tiny_models, tiny_data, tmp_path_factory) -> Path:
    """A finished tiny Llama run (the Llama path writes GGUF from the tokenizer, no source GGUF needed)."""
    from adapters.training.run import train

    out = tmp_path_factory.mktemp("fault_runs")
    over = tiny_overrides(
        tiny_models["llama"],
        tiny_data,
        out,
        run_name="done",
        max_steps=2,
        save_steps=1000,
        eval_strategy="no",
        eval_base=False,
        eval_max_new_tokens=4,
        eval_after_train=False,
        init_lora_weights=False,
    )
    recipe, path = load_recipe("gemma3-270m-demo", over)
    return train(recipe, path)


@pytest.fixture
def run_copy(done_run, tmp_path) -> Path:
    return Path(shutil.copytree(done_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints")))


def _truncate_adapter(run: Path) -> Path:
    f = run / "adapter" / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return f


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


PROGRESS = re.compile(r"\d+%\||\d+/\d+ \[")  # tqdm progress bars (libraries' loading and generation), not messages


def _one_line(capsys, rc: int, want_rc: int = 2) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not PROGRESS.search(ln)]
    assert rc == want_rc, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@contextlib.contextmanager
def _read_only(folder: Path):
    """``folder`` made read-only for this process: chmod for a normal user; for root (whom modes do not stop) a
    read-only tmpfs mounted on it, holding a copy of what was there. Skips where neither is possible."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield folder
        finally:
            for p, m in modes.items():
                p.chmod(m)
        return
    keep = folder.with_name(folder.name + ".keep")
    shutil.copytree(folder, keep)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)]).returncode != 0:
        shutil.rmtree(keep)
        pytest.skip("running as root and cannot mount a read-only tmpfs")
    try:
        shutil.copytree(keep, folder, dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        shutil.rmtree(keep, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- row 35
def _audit(tiny_models, tiny_data, root: Path, capsys) -> tuple[int, str, str]:
    over = tiny_overrides(tiny_models["llama"], tiny_data, root)
    args = [
        f"--{k}={v}" for k, v in over.items() if k in ("model_name_or_path", "train_file", "eval_file", "output_root")
    ]
    rc = main(["data", "audit", "gemma3-270m-demo", "--out", str(root / "audit"), "--test_file=null", *args])
    got = capsys.readouterr()
    return rc, got.out, got.err


def _entry(root: Path) -> Path:
    (entry,) = [p for p in (root / ".cache" / "encoded").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return entry


@pytest.mark.parametrize("damage", ["truncated", "same_size"])
def test_row35_damaged_cache_entry_is_reported_moved_aside_and_rebuilt(
    damage, tiny_models, tiny_data, tmp_path, capsys
):
    """RELIABILITY row 35 / issue 25 #1: a truncated Arrow file, or bytes changed at the same size, in the encoded
    cache is found before use (sizes and digests recorded when the entry was written): one line, the entry moved
    aside, rebuilt, and the stage goes on."""
    rc, _, _ = _audit(tiny_models, tiny_data, tmp_path, capsys)
    assert rc == 0
    entry = _entry(tmp_path)
    good = (tmp_path / "audit" / "data_audit.json").read_text()
    arrow = sorted(entry.glob("train*.arrow"))[0]
    data = bytearray(arrow.read_bytes())
    if damage == "truncated":
        arrow.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        arrow.write_bytes(bytes(data))
    rc, out, err = _audit(tiny_models, tiny_data, tmp_path, capsys)
    assert rc == 0, err
    said = [ln for ln in (out + err).splitlines() if "entry damaged" in ln]
    assert len(said) == 1 and arrow.name in said[0] and "rebuilding" in said[0], out + err
    assert "Traceback" not in err and "encoded cache hit" not in out
    aside = [p for p in entry.parent.iterdir() if ".damaged" in p.name]
    assert len(aside) == 1 and (aside[0] / arrow.name).is_file()
    assert (tmp_path / "audit" / "data_audit.json").read_text() == good
    rc, out, _ = _audit(tiny_models, tiny_data, tmp_path, capsys)  # the rebuilt entry is a good one
    assert rc == 0 and "encoded cache hit" in out and "entry damaged" not in out


def test_row35_cache_entry_records_sizes_and_digests(tiny_models, tiny_data, tmp_path, capsys):
    assert _audit(tiny_models, tiny_data, tmp_path, capsys)[0] == 0
    entry = _entry(tmp_path)
    assert cache.verify(entry) is None
    record = json.loads((entry / cache.INTEGRITY).read_text())
    files = {p.name for p in entry.iterdir() if p.is_file() and p.name != cache.INTEGRITY}
    assert set(record["files"]) == files
    for name, rec in record["files"].items():
        assert rec["size"] == (entry / name).stat().st_size and len(rec["sha256"]) == 64
    (entry / "audits.json").unlink()
    assert "audits.json" in cache.verify(entry) and "missing" in cache.verify(entry)


def _build_cache(recipe, tok) -> None:
    from adapters.data.pipeline import prepare_data

    prepare_data(recipe, tok, None, say=lambda _m: None)


def test_pin_concurrent_cache_builds_give_identical_data(tiny_data, tmp_path):
    """Issue 25 (passed): two processes building one cache entry at the same time give the data of one build."""
    import multiprocessing

    from .conftest import build_tokenizer

    tok = build_tokenizer()
    base = {"train_file": str(tiny_data["train"]), "eval_file": str(tiny_data["val"]), "test_file": None}
    two = load_recipe("gemma3-270m-demo", {**base, "output_root": str(tmp_path / "two"), "max_length": 128})[0]
    one = load_recipe("gemma3-270m-demo", {**base, "output_root": str(tmp_path / "one"), "max_length": 128})[0]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_cache, args=(two, tok)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    _build_cache(one, tok)
    a, b = _entry(tmp_path / "two"), _entry(tmp_path / "one")
    assert a.name == b.name and cache.verify(a) is None
    for split in ("train", "eval"):
        assert cache.load_split(a, split).to_dict() == cache.load_split(b, split).to_dict()


# ---------------------------------------------------------------------------------------------------- row 36
def test_row36_gguf_export_over_an_earlier_one_is_refused_without_force(run_copy, capsys):
    """RELIABILITY row 36 / issue 25 #2: RUN/gguf/ holds an earlier export; --mode merged without --force is
    refused and the earlier files stay."""
    earlier = run_copy / "gguf"
    earlier.mkdir()
    (earlier / "model.gguf").write_bytes(b"earlier export")
    (earlier / "export_report.json").write_text("{}")
    line = _one_line(capsys, main(["export", str(run_copy), "--gguf", "--mode", "merged"]))
    assert str(earlier) in line and "--force" in line
    assert _tree(earlier) == {"model.gguf": b"earlier export", "export_report.json": b"{}"}
    assert not (run_copy / ".gguf.staging").exists()


def test_row36_merge_a_second_time_is_refused_without_force(run_copy, capsys, monkeypatch):
    """RELIABILITY row 36 / issue 25 #7: a second merge is refused at once without --force; the first stays."""
    merged = run_copy / "merged"
    merged.mkdir()
    (merged / "config.json").write_text('{"first": true}')
    (run_copy / "merge_report.json").write_text('{"verdict": "pass"}')
    import adapters.publish.merge as m

    monkeypatch.setattr(m, "load_model", lambda *a, **k: pytest.fail("a refused merge loaded the model"))
    line = _one_line(capsys, main(["merge", str(run_copy)]))
    assert str(merged) in line and "--force" in line
    assert (merged / "config.json").read_text() == '{"first": true}'
    assert (run_copy / "merge_report.json").read_text() == '{"verdict": "pass"}'


def test_row36_merge_with_force_goes_ahead_and_a_failure_keeps_the_earlier_one(run_copy, capsys, monkeypatch):
    """--force passes the refusal; a forced merge that stops midway still leaves the first merge as it was."""
    import adapters.publish.merge as m
    from adapters.utils.errors import AdaptersError

    merged = run_copy / "merged"
    merged.mkdir()
    (merged / "config.json").write_text('{"first": true}')

    def stopped(pr, recipe, staging, *a, **k):
        (staging / "half.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (staging / "half.safetensors").write_bytes(b"half")
        raise AdaptersError("second merge reached the work")

    monkeypatch.setattr(m, "_merge_and_save", stopped)
    line = _one_line(capsys, main(["merge", str(run_copy), "--force"]))
    assert "second merge reached the work" in line
    assert _tree(merged) == {"config.json": b'{"first": true}'} and not (run_copy / ".merged.staging").exists()


# ---------------------------------------------------------------------------------------------------- row 37
@pytest.mark.parametrize("gguf", [True, False])
def test_row37_export_to_a_read_only_parent_is_refused_before_any_work(gguf, done_run, tmp_path, capsys, monkeypatch):
    """RELIABILITY row 37 / issue 25 #3: checked before any work; one line naming the folder; nothing staged."""
    import adapters.publish.export as ex

    monkeypatch.setattr(ex, "_adapter_model", lambda *a, **k: pytest.fail("converted before checking the target"))
    with _read_only(tmp_path / "ro") as ro:
        rc = main(["export", str(done_run), *(["--gguf"] if gguf else []), "--to", str(ro / "out")])
        line = _one_line(capsys, rc)
        assert str(ro) in line and ("read-only" in line.lower() or "permission" in line.lower()), line
        assert list(ro.iterdir()) == []


def test_row37_merge_into_a_full_disk_is_refused_before_any_work(run_copy, capsys, monkeypatch):
    import shutil as sh

    import adapters.publish.merge as m
    import adapters.utils.atomic as atomic

    real = sh.disk_usage
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    monkeypatch.setattr(m, "load_model", lambda *a, **k: pytest.fail("merged before checking the target"))
    before = _tree(run_copy)
    line = _one_line(capsys, main(["merge", str(run_copy)]))
    assert str(run_copy) in line and "free" in line
    assert _tree(run_copy) == before


def test_row37_merge_in_a_read_only_run_is_refused_before_any_work(done_run, tmp_path, capsys, monkeypatch):
    import adapters.publish.merge as m

    monkeypatch.setattr(m, "load_model", lambda *a, **k: pytest.fail("merged before checking the target"))
    src = tmp_path / "ro"
    shutil.copytree(done_run, src, ignore=shutil.ignore_patterns("checkpoints"))
    with _read_only(src) as ro:
        line = _one_line(capsys, main(["merge", str(ro)]))
        assert str(ro) in line


# ---------------------------------------------------------------------------------------------------- row 38
@pytest.mark.parametrize(
    "verb",
    [
        ["export", "--gguf"],
        ["export", "--to", "OUT"],
        ["merge"],
        ["eval"],
        ["generate", "--prompt", "hi"],
        ["push", "--repo-id", "me/x", "--dry-run"],
    ],
    ids=lambda v: "-".join(v[:2]).replace("--", ""),
)
def test_row38_truncated_adapter_is_one_line_naming_the_file(verb, run_copy, tmp_path, capsys):
    """RELIABILITY row 38 / issue 25 #4: one line naming the file and what is wrong; nothing written."""
    f = _truncate_adapter(run_copy)
    before = _tree(run_copy)
    argv = [verb[0], str(run_copy), *[str(tmp_path / "out") if a == "OUT" else a for a in verb[1:]]]
    line = _one_line(capsys, main(argv))
    assert str(f) in line and "truncated" in line, line
    assert _tree(run_copy) == before and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- row 39
@pytest.mark.parametrize(
    "flag,value",
    [
        ("per_device_train_batch_size", "0"),
        ("per_device_train_batch_size", "-2"),
        ("gradient_accumulation_steps", "0"),
        ("max_steps", "-5"),
        ("num_train_epochs", "-1"),
        ("max_length", "-8"),
        ("warmup_steps", "-1"),
        ("save_steps", "0"),
        ("per_device_eval_batch_size", "0"),
        ("eval_max_new_tokens", "-4"),
    ],
)
def test_row39_impossible_values_refused_on_the_command_line_before_anything(
    flag, value, tmp_path, capsys, monkeypatch
):
    """RELIABILITY row 39 / issue 25 #5: refused before the run folder is claimed (no data stage, no model load),
    the command line named as the source."""
    import adapters.training.run as run_mod

    monkeypatch.setattr(run_mod, "train", lambda *a, **k: pytest.fail("train() was called"))
    rc = main(["train", "gemma3-270m-demo", f"--{flag}", value, "--output_root", str(tmp_path / "out")])
    line = _one_line(capsys, rc)
    assert "command line" in line and flag in line and value in line, line
    assert not (tmp_path / "out").exists()


def test_row39_lora_dropout_from_the_command_line_names_the_command_line(tmp_path, capsys):
    """Issue 25 #6: the value came from the command line, so the message names it, not the recipe file."""
    line = _one_line(capsys, main(["train", "gemma3-270m-demo", "--lora_dropout", "1.5"]))
    assert line.startswith("adapters train: error: command line: lora_dropout") and "1.5" in line
    assert "gemma3-270m-demo.yaml" not in line


def test_row39_a_bad_value_in_the_recipe_file_still_names_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("per_device_train_batch_size: 0\n")
    with pytest.raises(RecipeError, match=rf"^{str(recipe)}: per_device_train_batch_size"):
        load_recipe(recipe)
    with pytest.raises(RecipeError, match=rf"^{str(recipe)}: per_device_train_batch_size"):
        load_recipe(recipe, {"learning_rate": 1e-4})  # an override that is fine does not take the blame


def test_row39_values_that_mean_unset_are_accepted():
    r, _ = load_recipe("gemma3-270m-demo", {"max_steps": -1, "eval_max_new_tokens": None, "warmup_steps": 0})
    assert r.max_steps == -1


# ---------------------------------------------------------------------------------------------------- row 40
@pytest.mark.parametrize("prompt", ["", "   "])
def test_row40_empty_prompt_to_generate_is_refused(prompt, done_run, capsys, monkeypatch):
    """RELIABILITY row 40 / issue 25 #8: refused in one line, before the model is loaded."""
    import adapters.evaluation.generate as g

    monkeypatch.setattr(g, "load_for_generation", lambda *a, **k: pytest.fail("the model was loaded"))
    line = _one_line(capsys, main(["generate", str(done_run), "--prompt", prompt]))
    assert "--prompt" in line and "empty" in line


# ---------------------------------------------------------------------------------------------------- row 41
def test_row41_ctrl_c_during_gguf_export_is_one_line_130_and_no_staging(run_copy, capsys, monkeypatch):
    """RELIABILITY row 41 / issue 25 #9."""
    import adapters.publish.gguf_export as gx

    def interrupted(path, *a, **k):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gx, "write_lora", interrupted)
    line = _one_line(capsys, main(["export", str(run_copy), "--gguf"]), want_rc=130)
    assert "interrupted" in line
    assert not (run_copy / ".gguf.staging").exists() and not (run_copy / "gguf").exists()


def test_row41_ctrl_c_during_merge_is_one_line_130_and_no_staging(run_copy, capsys, monkeypatch):
    import adapters.publish.merge as m

    def interrupted(pr, recipe, staging, *a, **k):  # Ctrl-C while the merged model is being saved
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "model-00001-of-00002.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(m, "_merge_and_save", interrupted)
    line = _one_line(capsys, main(["merge", str(run_copy), "--probes", "2"]), want_rc=130)
    assert "interrupted" in line
    assert not (run_copy / ".merged.staging").exists() and not (run_copy / "merged").exists()
    assert not (run_copy / "merge_report.json").exists()


def test_row41_ctrl_c_during_peft_export_leaves_no_staging(done_run, tmp_path, capsys, monkeypatch):
    import adapters.publish.export as ex

    monkeypatch.setattr(ex, "model_card", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    line = _one_line(capsys, main(["export", str(done_run), "--to", str(tmp_path / "x")]), want_rc=130)
    assert "interrupted" in line and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- row 42
def _train_argv(tiny_models, tiny_data, root: Path, **extra) -> list[str]:
    over = tiny_overrides(tiny_models["llama"], tiny_data, root, run_name="r", **extra)
    return ["train", "gemma3-270m-demo", *[f"--{k}={'null' if v is None else v}" for k, v in over.items()]]


@pytest.mark.parametrize(
    "case",
    [
        "report_to",
        "init_adapter_missing",
        "init_adapter_not_an_adapter",
        "init_adapter_hub_offline",
        "train_file",
        "streaming_conflict",
        "init_adapter_other_r",
    ],
)
def test_row42_refusals_before_training_leave_no_run_folder(
    case, tiny_models, tiny_data, done_run, tmp_path, capsys, monkeypatch
):
    """RELIABILITY row 42 (and the issue's 'also seen'): each refusal is one line, found before the run folder is
    claimed (no model load), and leaves no run folder; the passing cases of issue 25 (report_to, --init_adapter
    not an adapter / another r / an unknown hub id offline) are pinned here too."""
    import importlib.util

    import adapters.training.run as run_mod

    if case == "report_to" and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    monkeypatch.setattr(run_mod, "_claim_run_dir", lambda *a, **k: pytest.fail("the run folder was claimed"))
    (tmp_path / "plain").mkdir()
    extra, want = {
        "report_to": ({"report_to": "wandb"}, "report_to: 'wandb' is not installed"),
        "report_to_unknown": ({"report_to": "no_such_tracker"}, "report_to: 'no_such_tracker'"),
        "init_adapter_missing": ({"init_adapter": str(tmp_path / "nope" / "run")}, "not a run directory"),
        "init_adapter_not_an_adapter": ({"init_adapter": str(tmp_path / "plain")}, "adapter_config.json"),
        "init_adapter_hub_offline": ({"init_adapter": "nobody-here/no-such-adapter"}, "nobody-here/no-such-adapter"),
        "train_file": ({"train_file": str(tmp_path / "missing.jsonl")}, "missing.jsonl"),
        "streaming_conflict": ({"streaming": "true", "val_split": 0.1}, "val_split"),
        "init_adapter_other_r": ({"init_adapter": str(done_run), "r": 4}, "r: adapter"),
    }[case]
    line = _one_line(capsys, main(_train_argv(tiny_models, tiny_data, tmp_path / "out", **extra)))
    assert want in line, line
    assert not (tmp_path / "out" / "r").exists()


def test_row42_a_refusal_after_the_claim_removes_the_folder_it_created(
    tiny_models, tiny_data, tmp_path, capsys, monkeypatch
):
    """A refusal found after the claim (here the preflight) still leaves no run folder behind."""
    import adapters.training.run as run_mod
    from adapters.planning.preflight import PreflightError

    def refuse(*a, **k):
        raise PreflightError("a known-bad combination")

    monkeypatch.setattr("adapters.planning.preflight.before_train", refuse)
    line = _one_line(capsys, main(_train_argv(tiny_models, tiny_data, tmp_path / "out")))
    assert "known-bad" in line
    assert not (tmp_path / "out" / "r").exists()
    assert run_mod is not None


def test_row42_a_failed_resume_keeps_the_run_folder(done_run, tmp_path):
    """The cleanup never removes a folder that holds a run (manifest.json) or files it did not write."""
    from adapters.training.lifecycle import remove_unborn

    run = Path(shutil.copytree(done_run, tmp_path / "kept"))
    assert remove_unborn(run) is False and (run / "manifest.json").is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert remove_unborn(other) is False and (other / "notes.txt").is_file()


# ---------------------------------------------------------------------------------------------------- pins
def test_pin_exporting_a_running_run_is_refused(run_copy, capsys):
    """Issue 25 (passed): exporting a running run is refused in one line (PEFT and GGUF)."""
    mf = run_copy / "manifest.json"
    mf.write_text(json.dumps({**json.loads(mf.read_text()), "status": "running"}))
    for extra in (["--gguf"], ["--to", str(run_copy.parent / "x")]):
        line = _one_line(capsys, main(["export", str(run_copy), *extra]))
        assert "status is 'running'" in line


def test_pin_yaml_tab_is_file_line_col(tmp_path):
    recipe = tmp_path / "tab.yaml"
    recipe.write_text("learning_rate: 1e-4\n\tr: 8\n")
    with pytest.raises(RecipeError, match=rf"^{str(recipe)}:2:1: invalid YAML"):
        load_recipe(recipe)


# ---------------------------------------------------------------------------------------------------- every verb
RECIPE_VERBS = {
    "data-audit": ["data", "audit", "RECIPE", "--out", "OUT"],
    "plan": ["plan", "RECIPE"],
    "sweep": ["sweep", "RECIPE", "--trials", "1", "--out", "OUT"],
    "bench": ["bench", "--recipe", "RECIPE", "--out", "OUT"],
    "train": ["train", "RECIPE"],
    "doctor": ["doctor", "RECIPE", "--output-root", "OUT"],
}
RUN_VERBS = {
    "merge": ["merge", "RUN"],
    "eval": ["eval", "RUN"],
    "generate": ["generate", "RUN", "--prompt", "hi"],
    "push": ["push", "RUN", "--repo-id", "me/x", "--dry-run"],
    "export": ["export", "RUN", "--to", "OUT"],
    "export-gguf": ["export", "RUN", "--gguf"],
    "train-init": ["train", "gemma3-270m-demo", "--init_adapter", "RUN", "--output_root", "OUT"],
    "sweep-init": ["sweep", "gemma3-270m-demo", "--trials", "1", "--init_adapter", "RUN", "--out", "OUT"],
}


def _fill(argv: list[str], **subst: str) -> list[str]:
    return [subst.get(a, a) for a in argv]


@pytest.mark.parametrize("verb", list(RUN_VERBS) + ["data-check"])
def test_every_verb_with_a_truncated_adapter_or_a_missing_run_is_one_line(verb, run_copy, tmp_path, capsys):
    """Issue 25 'done when': no verb prints a traceback for these user errors; one line, exit 2."""
    if verb == "data-check":
        line = _one_line(capsys, main(["data", "check", str(tmp_path / "missing.jsonl")]))
        assert "missing.jsonl" in line
        return
    missing = _fill(RUN_VERBS[verb], RUN=str(tmp_path / "no" / "run"), OUT=str(tmp_path / "out"))
    line = _one_line(capsys, main(missing))
    assert str(tmp_path / "no" / "run") in line
    f = _truncate_adapter(run_copy)
    line = _one_line(capsys, main(_fill(RUN_VERBS[verb], RUN=str(run_copy), OUT=str(tmp_path / "out"))))
    assert str(f) in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb", list(RECIPE_VERBS))
def test_every_recipe_verb_with_a_missing_recipe_is_one_line(verb, tmp_path, capsys):
    argv = _fill(RECIPE_VERBS[verb], RECIPE=str(tmp_path / "missing.yaml"), OUT=str(tmp_path / "out"))
    line = _one_line(capsys, main(argv))
    assert "missing.yaml" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb", ["merge", "eval", "push", "export", "export-gguf", "train", "data-audit", "sweep"])
def test_every_verb_with_a_read_only_output_is_one_line(verb, done_run, tiny_models, tiny_data, tmp_path, capsys):
    src = tmp_path / "ro"
    src.mkdir()
    if verb in ("merge", "eval", "push", "export-gguf"):
        shutil.copytree(done_run, src / "run", ignore=shutil.ignore_patterns("checkpoints"))
    with _read_only(src) as ro:
        if verb in ("merge", "eval", "push", "export-gguf"):
            argv = _fill(RUN_VERBS[verb], RUN=str(ro / "run"))
        elif verb == "export":
            argv = _fill(RUN_VERBS[verb], RUN=str(done_run), OUT=str(ro / "out"))
        elif verb == "train":
            argv = _train_argv(tiny_models, tiny_data, ro / "outputs")
        else:
            over = tiny_overrides(tiny_models["llama"], tiny_data, ro / "outputs")
            argv = [
                *_fill(RECIPE_VERBS[verb], RECIPE="gemma3-270m-demo", OUT=str(ro / "out")),
                *[f"--{k}={over[k]}" for k in ("model_name_or_path", "train_file", "eval_file", "output_root")],
            ]
        line = _one_line(capsys, main(argv))
        assert str(ro) in line, line


def test_pin_streaming_run_killed_then_resumed_finishes(tiny_models, tiny_data, tmp_path, monkeypatch):
    """Issue 25 (passed): a streaming run killed between checkpoints (simulated in-process, as the kill tests of
    test_checkpoints.py do) resumes from its last complete checkpoint and finishes."""
    import adapters.training.run as run_mod
    import adapters.training.trainer as trainer_mod

    from .test_checkpoints import Killed, _kill_at

    over = tiny_overrides(
        tiny_models["llama"],
        tiny_data,
        tmp_path,
        run_name="s",
        streaming=True,
        max_steps=3,
        save_steps=1,
        per_device_train_batch_size=2,
        eval_strategy="no",
        eval_file=None,
        eval_after_train=False,
        quant_probe=False,
        base_kl_weight=0.0,
    )
    recipe, path = load_recipe("gemma3-270m-demo", over)
    monkeypatch.setattr(trainer_mod, "make_callbacks", _kill_at(2))
    with pytest.raises(Killed):
        run_mod.train(recipe, path)
    monkeypatch.undo()
    run_mod.train(recipe, path, resume=True)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["status"] == "complete" and m["train"]["resumed_from"].endswith("checkpoint-1")
