"""A run's lifecycle (issue #13 items 1, 2, 4, 6): resume checks, the run-directory lock, run names, disk full,
interrupts, leftover staging folders, and the manifest status of every ending."""

from __future__ import annotations

import errno
import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import adapters.training.run as train_mod
from adapters.cli import main
from adapters.config import Recipe, RecipeError, load_recipe
from adapters.training import lifecycle
from adapters.training.lifecycle import DiskFullError, ResumeError, RunInterrupted, RunInUseError, RunLock

from .conftest import REPO, tiny_overrides

FAST = dict(eval_strategy="no", eval_after_train=False, eval_base=False, quant_probe=False, test_file=None)


def _ov(tiny_models, tiny_data, tmp_path, name, **kw):
    return tiny_overrides(tiny_models["llama"], tiny_data, tmp_path, run_name=name, **{**FAST, **kw})


def _recipe(tiny_models, tiny_data, tmp_path, name, **kw):
    return load_recipe("gemma3-270m-demo", _ov(tiny_models, tiny_data, tmp_path, name, **kw))


def _args(ov: dict) -> list[str]:
    return [x for k, v in ov.items() if v is not None for x in (f"--{k}", str(v))]


def _manifest(run):
    return json.loads((run / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------------- 1. resume
def test_resume_refuses_a_changed_hyperparameter_and_records_safe_changes(tiny_models, tiny_data, tmp_path, capsys):
    """Issue item 1: --resume --learning_rate 1e-3 on a run trained at 2e-4 used to keep the old schedule and record
    1e-3. Now it is refused, one line per key; cadence and a longer max_steps are allowed and recorded."""
    recipe, path = _recipe(tiny_models, tiny_data, tmp_path, "lr", learning_rate=2e-4, max_steps=3, save_steps=3)
    run = train_mod.train(recipe, path)
    before = (run / "manifest.json").read_text()

    changed, _ = _recipe(tiny_models, tiny_data, tmp_path, "lr", learning_rate=1e-3, max_steps=3, save_steps=3, r=8)
    with pytest.raises(ResumeError) as e:
        train_mod.train(changed, path, resume=True)
    lines = str(e.value).splitlines()
    assert "learning_rate: 0.0002 in the run, 0.001 now" in lines
    assert "r: 16 in the run, 8 now" in lines
    assert (run / "manifest.json").read_text() == before  # the record is untouched
    assert not (run / lifecycle.LOCK).exists()  # and the lock released

    shorter, _ = _recipe(tiny_models, tiny_data, tmp_path, "lr", learning_rate=2e-4, max_steps=2, save_steps=3)
    with pytest.raises(ResumeError, match=r"max_steps: 3 in the run, 2 now \(a resume can only extend training\)"):
        train_mod.train(shorter, path, resume=True)

    # leftovers of killed writes are removed when the run is resumed
    for p in (run / ".adapter.staging", run / ".merged.staging", run / "checkpoints" / ".staging" / "checkpoint-9"):
        p.mkdir(parents=True)
    capsys.readouterr()
    longer, _ = _recipe(
        tiny_models, tiny_data, tmp_path, "lr", learning_rate=2e-4, max_steps=5, save_steps=3, logging_steps=2
    )
    train_mod.train(longer, path, resume=True)
    assert "[run] removed leftover staging folders:" in capsys.readouterr().out
    assert not (run / ".adapter.staging").exists() and not (run / ".merged.staging").exists()
    assert not (run / "checkpoints" / ".staging" / "checkpoint-9").exists()
    m = _manifest(run)
    assert m["status"] == "complete" and m["train"]["global_step"] == 5
    assert m["config"]["learning_rate"] == 2e-4 and m["config"]["max_steps"] == 5 and m["config"]["logging_steps"] == 2
    (event,) = m["resumes"]
    assert event["step"] == 3 and event["time"]
    assert event["changed"] == {"max_steps": [3, 5], "logging_steps": [1, 2]}


def test_safe_keys_and_refused_keys():
    run = Recipe(learning_rate=2e-4, max_steps=30, eval_steps=10, save_steps=15).to_dict()
    ok = Recipe(learning_rate=2e-4, max_steps=60, eval_steps=5, save_steps=5, eval_limit=3, save_on_interrupt=False)
    assert lifecycle.resume_changes(run, ok) == {
        "max_steps": [30, 60],
        "eval_steps": [10, 5],
        "save_steps": [15, 5],
        "eval_limit": [None, 3],
        "save_on_interrupt": [True, False],
    }
    for key, value in [
        ("seed", 1),
        ("lr_scheduler_type", "linear"),
        ("per_device_train_batch_size", 2),
        ("gradient_accumulation_steps", 4),
        ("lora_alpha", 8),
        ("load_in_4bit", True),
        ("train_file", "other.jsonl"),
        ("max_length", 64),
        ("base_kl_weight", 0.5),
        ("dtype", "bfloat16"),
        ("model_name_or_path", "x/y"),
        ("weight_decay", 0.1),  # a library key the run did not record: compared with the library default
    ]:
        with pytest.raises(ResumeError, match=f"\n{key}: "):
            lifecycle.resume_changes(run, Recipe(learning_rate=2e-4, max_steps=30, **{key: value}))
    # with early stopping, the evaluation cadence decides where training stops: not safe
    es = Recipe(early_stopping_patience=2, eval_steps=10, save_steps=10).to_dict()
    with pytest.raises(ResumeError, match="eval_steps: 10 in the run, 5 now \\(early stopping"):
        lifecycle.resume_changes(es, Recipe(early_stopping_patience=2, eval_steps=5, save_steps=10))


def test_resume_refuses_changed_data_contents(tiny_data, tmp_path):
    then = {"sources": [{"file": "a.jsonl", "sha256": "1" * 64}]}
    lifecycle.data_changes(then, {"sources": [{"file": "a.jsonl", "sha256": "1" * 64}]})
    with pytest.raises(ResumeError, match="a.jsonl: sha256 111111111111… in the run, 222222222222… now"):
        lifecycle.data_changes(then, {"sources": [{"file": "a.jsonl", "sha256": "2" * 64}]})


# ---------------------------------------------------------------------------------------------------- 2. the lock
def test_second_run_on_a_live_lock_fails_at_once_naming_the_holder(tiny_models, tiny_data, tmp_path, monkeypatch):
    """Issue item 2: two runs with one --run_name both exited 0 and mixed their files. The directory is claimed
    before any slow work; the second run fails at once, for a new run and for --resume alike."""
    run = tmp_path / "busy"
    run.mkdir()
    (run / lifecycle.LOCK).write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "2025-01-01T10:00:00"})
    )

    def slow_work(*a, **kw):
        raise AssertionError("the model was resolved before the run directory was claimed")

    monkeypatch.setattr(train_mod, "resolve_model", slow_work)
    for resume in (False, True):
        recipe, path = _recipe(tiny_models, tiny_data, tmp_path, "busy")
        with pytest.raises(RunInUseError) as e:
            train_mod.train(recipe, path, resume=resume)
        assert str(e.value).startswith(
            f"{run} is in use by pid {os.getpid()} on host {socket.gethostname()} since 2025-01-01T10:00:00"
        )
    assert (run / lifecycle.LOCK).exists()  # the holder's lock is left alone


def test_racing_claims_one_wins(tmp_path):
    run = tmp_path / "race"
    start = threading.Barrier(8)
    won, lost = [], []

    def contender():
        start.wait()
        try:
            won.append(lifecycle.claim(run, False, lambda m: None))
        except RunInUseError as e:
            lost.append(str(e))

    threads = [threading.Thread(target=contender) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7
    assert all(f"is in use by pid {os.getpid()}" in m for m in lost)
    won[0].release()
    assert not (run / lifecycle.LOCK).exists()


def test_stale_lock_is_taken_over_with_a_warning(tiny_models, tiny_data, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "stale"
    run.mkdir()
    (run / lifecycle.LOCK).write_text(
        json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "2025-01-01T10:00:00"})
    )
    recipe, path = _recipe(tiny_models, tiny_data, tmp_path, "stale", max_steps=1)
    train_mod.train(recipe, path)
    out = capsys.readouterr().out
    assert f"[run] warning: taking over the stale lock of {run}: pid {dead.pid}" in out
    assert _manifest(run)["status"] == "complete"
    assert not (run / lifecycle.LOCK).exists()  # released at the end


def test_lock_on_another_host_is_respected(tmp_path):
    run = tmp_path / "remote"
    run.mkdir()
    (run / lifecycle.LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    with pytest.raises(RunInUseError, match="in use by pid 1 on host elsewhere"):
        RunLock.acquire(run, print)


# ---------------------------------------------------------------------------------------------------- 3. run names
@pytest.mark.parametrize("name", ["../escape", "/tmp/x", "a/b", ".", "..", "", "a b", "x\\y"])
def test_run_name_must_be_one_folder_name(name, tiny_models, tiny_data, tmp_path, capsys):
    """Issue item 4: --run_name ../escape and /tmp/x wrote outside output_root."""
    with pytest.raises(RecipeError, match="run_name: "):
        Recipe(run_name=name)
    ov = _ov(tiny_models, tiny_data, tmp_path / "out", "x")
    ov["run_name"] = name
    assert main(["train", "gemma3-270m-demo", *_args(ov)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "command line: run_name: " in err[0] and "choose the location with output_root" in err[0]
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out").exists()


def test_good_run_names_and_generated_names(tmp_path):
    for name in ("quick", "run-1.v2_x", "..a", "A"):
        Recipe(run_name=name)
    name = train_mod.new_run_name(tmp_path / "my recipe (v2)!.yaml")
    assert name.startswith("my-recipe-v2-") and lifecycle.RunLock  # one folder name
    Recipe(run_name=name)


# ---------------------------------------------------------------------------------------------------- 4. disk full
def test_disk_full_during_a_checkpoint(tiny_models, tiny_data, tmp_path, monkeypatch):
    """Issue item 6: a save onto a full disk ended in torch's 'unexpected pos' RuntimeError and the manifest stayed
    'running'. Now one line names the cause, the path and the last complete checkpoint; the manifest says failed."""
    real_save = torch.save

    def full_disk_save(obj, f, *a, **kw):
        if "checkpoint-6" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4374")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk_save)
    recipe, path = _recipe(tiny_models, tiny_data, tmp_path, "full")
    run = tmp_path / "full"
    with pytest.raises(DiskFullError) as e:
        train_mod.train(recipe, path)
    expected = (
        f"no space left on device while writing {run}/checkpoints/checkpoint-6; "
        f"the last complete checkpoint is {run}/checkpoints/checkpoint-3"
    )
    assert str(e.value) == expected
    m = _manifest(run)
    assert m["status"] == "failed" and m["failed"]["reason"] == expected and m["failed"]["step"] == 6
    assert not (run / "checkpoints" / ".staging").exists()  # the partial save is gone
    assert not (run / lifecycle.LOCK).exists() and not (run / lifecycle.RESERVE).exists()


def test_disk_full_while_saving_the_adapter_is_one_cli_line(tiny_models, tiny_data, tmp_path, monkeypatch, capsys):
    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_mod, "save_adapter", full)
    ov = _ov(tiny_models, tiny_data, tmp_path, "fulladapter", max_steps=3, save_steps=3)
    assert main(["train", "gemma3-270m-demo", *_args(ov)]) == 2
    run = tmp_path / "fulladapter"
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert err == [  # progress bars aside, one line
        f"adapters train: error: no space left on device while writing {run}/adapter; "
        f"the last complete checkpoint is {run}/checkpoints/checkpoint-3"
    ]
    assert _manifest(run)["status"] == "failed"


def test_any_other_failure_is_recorded_with_its_reason(tiny_models, tiny_data, tmp_path, monkeypatch):
    def broken(*a, **kw):
        raise ValueError("boom")

    monkeypatch.setattr(train_mod, "save_adapter", broken)
    recipe, path = _recipe(tiny_models, tiny_data, tmp_path, "broken", max_steps=1)
    with pytest.raises(ValueError, match="boom"):
        train_mod.train(recipe, path)
    m = _manifest(tmp_path / "broken")
    assert m["status"] == "failed" and m["failed"] == {
        "step": 1,
        "reason": "ValueError: boom",
        "time": m["failed"]["time"],
    }


# ---------------------------------------------------------------------------------------------------- 4. interrupts
def test_ctrl_c_in_process_stops_without_saving_when_asked(tiny_models, tiny_data, tmp_path, monkeypatch):
    """SIGINT at step 2 with save_on_interrupt false: the step finishes, no checkpoint, status interrupted; the
    previous SIGINT handler is back afterwards."""
    real = train_mod.lifecycle.Lifecycle.callback

    def callback(self, guard=None):
        cb = real(self, guard)
        inner = cb.on_step_end

        def on_step_end(args, state, control, **kw):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return inner(args, state, control, **kw)

        cb.on_step_end = on_step_end
        return cb

    monkeypatch.setattr(train_mod.lifecycle.Lifecycle, "callback", callback)
    before = signal.getsignal(signal.SIGINT)
    recipe, path = _recipe(tiny_models, tiny_data, tmp_path, "ctrlc", max_steps=6, save_on_interrupt=False)
    with pytest.raises(RunInterrupted) as e:
        train_mod.train(recipe, path)
    assert signal.getsignal(signal.SIGINT) is before
    assert e.value.exit_code == 130 and e.value.step == 2
    assert str(e.value) == f"interrupted at step 2; resume with: adapters train {path} --run_name ctrlc --resume"
    run = tmp_path / "ctrlc"
    m = _manifest(run)
    assert m["status"] == "interrupted" and m["interrupted"]["step"] == 2 and m["interrupted"]["reason"] == "SIGINT"
    assert m["interrupted"]["checkpoint"] is None and not list((run / "checkpoints").glob("checkpoint-*"))
    assert not (run / lifecycle.LOCK).exists()


def _read_lines(stream, q):
    for line in iter(stream.readline, ""):
        q.put(line)
    q.put(None)


def test_sigterm_saves_a_checkpoint_then_resume_finishes(tiny_models, tiny_data, tmp_path, capsys):
    """A real SIGTERM (what schedulers send) to `python -m adapters train`: the step finishes, a checkpoint is saved
    through the Trainer's own save, one line with the resume command, no traceback; that command then finishes."""
    ov = _ov(tiny_models, tiny_data, tmp_path, "term", max_steps=150, save_steps=1000, logging_steps=1)
    del ov["run_name"]  # the generated name must come back in the resume line
    cmd = [sys.executable, "-m", "adapters", "train", "gemma3-270m-demo", *_args(ov)]
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    deadline = time.time() + 240
    while time.time() < deadline:
        line = lines.get(timeout=deadline - time.time())
        assert line is not None, proc.stderr.read()[-3000:]
        if "'loss'" in line:  # training has started
            break
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 143
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and last.endswith(" --resume"), err[-2000:]
    step = int(last.split()[3].rstrip(";"))
    (run,) = [p for p in tmp_path.iterdir() if p.name.startswith("gemma3-270m-demo-")]
    assert f"--run_name {run.name} --resume" in last
    m = _manifest(run)
    assert m["status"] == "interrupted" and m["interrupted"]["step"] == step and m["interrupted"]["reason"] == "SIGTERM"
    assert (run / "checkpoints" / f"checkpoint-{step}" / "COMPLETE.json").is_file()
    assert not (run / lifecycle.LOCK).exists()

    argv = shlex.split(last.split("resume with: adapters ", 1)[1])
    assert main(argv) == 0
    m = _manifest(run)
    assert m["status"] == "complete" and m["train"]["global_step"] == 150 and "interrupted" not in m
    assert m["resumes"][0]["step"] == step and m["resumes"][0]["previous_status"] == "interrupted"


def test_r_is_the_lora_rank_not_an_abbreviation_of_resume():
    from adapters.cli import build_parser

    args, rest = build_parser().parse_known_args(["train", "gemma3-270m-demo", "--r", "8"])
    assert not args.resume and rest == ["--r", "8"]
