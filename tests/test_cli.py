"""The command line: one module per verb, one error type (AdaptersError -> one stderr line, exit 2), bench flags
built from BenchOptions, train --help followed by the recipe keys."""

from __future__ import annotations

import dataclasses

import pytest

import adapters
import adapters.config
from adapters.cli import VERBS, build_parser, main
from adapters.utils.errors import AdaptersError, PathExistsError, PathNotFoundError

HELP_ARGVS = [[v] for v in VERBS if v != "data"] + [["data", "check"], ["data", "audit"], ["recipes", "show"]]


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_top_help_is_plain_text(capsys):
    out = _help([], capsys)
    assert "`" not in out
    assert "The adapters command line." in out
    for verb in VERBS:
        assert verb in out


@pytest.mark.parametrize("argv", HELP_ARGVS, ids=" ".join)
def test_every_verb_has_help(argv, capsys):
    out = _help(argv, capsys)
    assert out.startswith(f"usage: adapters {' '.join(argv)}") and "`" not in out


def test_every_user_error_class_is_an_adapters_error():
    from adapters.bench.throughput import BenchError
    from adapters.config import RecipeError
    from adapters.data.audit import AuditError
    from adapters.data.rows import DataError
    from adapters.evaluation.forgetting import ProbeError
    from adapters.model.sources import ModelSourceError
    from adapters.planning.preflight import PreflightError
    from adapters.publish.hub import HubError
    from adapters.publish.merge import MergeError
    from adapters.publish.rundir import RunError
    from adapters.training.checkpoints import CheckpointError
    from adapters.training.run import TrainingDiverged
    from adapters.training.speed import FastPathError

    assert adapters.AdaptersError is AdaptersError
    # each keeps its builtin base, so callers catching ValueError or RuntimeError still do
    for cls in (BenchError, RecipeError, AuditError, DataError, ProbeError, PreflightError, FastPathError):
        assert issubclass(cls, AdaptersError) and issubclass(cls, ValueError), cls
    for cls in (ModelSourceError, HubError, MergeError, RunError, CheckpointError, TrainingDiverged):
        assert issubclass(cls, AdaptersError) and issubclass(cls, RuntimeError), cls
    # the file-system mistakes keep their builtin type, so callers catching FileExistsError still do
    assert issubclass(PathExistsError, FileExistsError) and issubclass(PathNotFoundError, FileNotFoundError)


@pytest.mark.parametrize(
    "argv,target",
    [
        (["export", "RUN", "--to", "OUT"], "adapters.publish.export.export_run"),
        (["eval", "RUN"], "adapters.evaluation.evaluate.evaluate_run"),
        (["push", "RUN", "--repo-id", "me/x"], "adapters.publish.hub.push"),
        (["bench"], "adapters.bench.throughput.bench"),
    ],
)
def test_an_adapters_error_is_one_line_and_exit_2(argv, target, monkeypatch, capsys):
    from adapters.training.run import TrainingDiverged

    def fail(*a, **kw):
        raise TrainingDiverged("loss is nan at step 3; lower learning_rate")

    monkeypatch.setattr(target, fail)
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.err.splitlines() == [f"adapters {argv[0]}: error: loss is nan at step 3; lower learning_rate"]


def test_a_real_user_error_exits_2_with_one_line(capsys):
    assert main(["recipes", "show", "gemma3-270m-dmo"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("adapters recipes: error: recipe not found: 'gemma3-270m-dmo'")
    assert "did you mean 'gemma3-270m-demo'" in err[0]


def test_any_other_exception_is_a_bug_and_keeps_its_traceback(monkeypatch, capsys):
    def broken(*a, **kw):
        raise KeyError("internal")

    monkeypatch.setattr("adapters.publish.export.export_run", broken)
    with pytest.raises(KeyError, match="internal"):
        main(["export", "RUN", "--to", "OUT"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("outcome", ["user_error", "bug", "done"])
def test_the_process_group_is_torn_down_before_exit(outcome, monkeypatch, tmp_path, capsys):
    """A verb that created a process group (as train does under a launcher) leaves none behind, however it ends:
    left to interpreter finalization, gloo's threads aborted rank 0 of a refused run under `accelerate launch`
    (SIGABRT, exit -6 instead of 2) on a loaded machine."""
    import torch.distributed as dist

    from adapters.training.run import TrainingDiverged

    def verb(*a, **kw):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        assert dist.is_initialized()
        if outcome == "user_error":
            raise TrainingDiverged("loss is nan at step 3; lower learning_rate")
        if outcome == "bug":
            raise KeyError("internal")

    monkeypatch.setattr("adapters.publish.export.export_run", verb)
    if outcome == "bug":
        with pytest.raises(KeyError, match="internal"):
            main(["export", "RUN", "--to", "OUT"])
    else:
        assert main(["export", "RUN", "--to", "OUT"]) == (2 if outcome == "user_error" else 0)
    assert not dist.is_initialized()


def test_file_system_mistakes_are_adapters_errors(tmp_path, capsys):
    from adapters.planning.preflight import resolve_config_path

    with pytest.raises(PathNotFoundError, match="no such file, nor a shipped config"):
        resolve_config_path(tmp_path / "nope.yaml")
    assert main(["plan", "gemma3-270m-demo", "--accelerate-config", str(tmp_path / "nope.yaml")]) == 2
    assert "adapters plan: error: accelerate config" in capsys.readouterr().err


def test_train_help_lists_the_recipe_keys_when_config_can(monkeypatch, capsys):
    seen = []

    def describe_keys(recipe=None):
        seen.append(recipe)
        return "learning_rate  float  2e-4"

    monkeypatch.delattr(adapters.config, "describe_keys", raising=False)  # the help as before describe_keys
    plain = _help(["train"], capsys)
    assert "example: adapters train" in plain and "learning_rate" not in plain
    monkeypatch.setattr(adapters.config, "describe_keys", describe_keys, raising=False)
    out = _help(["train"], capsys)  # no recipe: the keys with their defaults
    assert out.startswith(plain) and out.rstrip().endswith("learning_rate  float  2e-4") and seen == [None]
    # a recipe before --help: its values (overrides applied), no training, exit 0
    assert main(["train", "gemma3-270m-demo", "--learning_rate", "0.5", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(plain) and "learning_rate  float  2e-4" in out
    assert seen[1].learning_rate == 0.5 and seen[1].model_name_or_path


def test_train_help_with_a_recipe_and_no_describe_keys(monkeypatch, capsys):
    monkeypatch.delattr(adapters.config, "describe_keys", raising=False)
    plain = _help(["train"], capsys)
    assert main(["train", "gemma3-270m-demo", "--help"]) == 0
    assert capsys.readouterr().out == plain


def test_recipes_list_and_show(monkeypatch, capsys):
    assert main(["recipes"]) == 0
    assert "gemma3-270m-demo" in capsys.readouterr().out
    monkeypatch.delattr(adapters.config, "describe_keys", raising=False)
    assert main(["recipes", "show", "gemma3-270m-demo"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("gemma3-270m-demo.yaml") and "model_name_or_path:" in out
    monkeypatch.setattr(adapters.config, "describe_keys", lambda recipe=None: f"r  int  {recipe.r}", raising=False)
    assert main(["recipes", "show", "gemma3-270m-demo"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("r  int  ")


def test_bench_flags_are_built_from_bench_options(monkeypatch):
    from adapters.bench import throughput
    from adapters.bench.throughput import BenchOptions

    bench_parser = build_parser()._subparsers._group_actions[0].choices["bench"]
    # --data N is the data benchmark (adapters/bench/data.py), not a throughput option
    flags = {a.dest: a for a in bench_parser._actions if a.dest not in ("help", "data")}
    assert "data" in {a.dest for a in bench_parser._actions}
    fields = {f.name: f for f in dataclasses.fields(BenchOptions)}
    assert list(flags) == list(fields)
    for name, f in fields.items():
        assert flags[name].default == f.default and flags[name].help == f.metadata["help"], name
    assert flags["quant"].choices == ["nf4", "none"] and flags["ragged_batch"].option_strings == ["--ragged-batch"]

    calls = []

    def fake_bench(options, overrides=None, log=print):
        calls.append((options, overrides))
        verdict = "INVALID" if options.steps == 9 else "PASS"
        return {"comparisons": [{"gate": {"verdict": verdict}}]}

    monkeypatch.setattr(throughput, "bench", fake_bench)
    assert main(["bench"]) == 0
    assert calls[-1] == (BenchOptions(), {})
    argv = ["bench", "--scenarios", "ragged", "--ragged-batch", "4", "--steps", "9", "--padding_free", "false"]
    assert main(argv) == 1  # a failed loss gate
    options, overrides = calls[-1]
    assert options == BenchOptions(scenarios=("ragged",), ragged_batch=4, steps=9)
    assert overrides == {"padding_free": False}


def test_bench_options_resolve_device_defaults():
    from adapters.bench.throughput import BenchOptions, defaults

    cpu = BenchOptions().resolved(cuda=False)
    assert {k: getattr(cpu, k) for k in defaults(False)} == defaults(False)
    kept = BenchOptions(model="tiny-qwen2", warmup=0, steps=7).resolved(cuda=True)
    assert (kept.model, kept.warmup, kept.steps, kept.max_len) == ("tiny-qwen2", 0, 7, 2048)


def test_sweep_interrupted_is_one_line(monkeypatch, capsys, tmp_path):
    """Ctrl-C during a sweep (Optuna re-raises it) ends with one line and 130, not a traceback."""
    import adapters.training.sweep as sweep_mod

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_mod, "sweep", interrupted)
    assert main(["sweep", "gemma3-270m-demo", "--trials", "1", "--out", str(tmp_path / "s")]) == 130
    out = capsys.readouterr()
    assert out.err.strip().splitlines() == [
        "adapters sweep: interrupted; finished trials keep their run directories (see the [sweep] lines)"
    ]
