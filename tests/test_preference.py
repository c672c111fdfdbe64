"""Preference tuning (issue 23): the trainer key, preference data and its bad rows, the reference a continued adapter
is compared against, no reference adapter in any output, exact resume, KTO and ORPO, the preference evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapters.training.preference as pref_mod
import adapters.training.run as train_mod
import adapters.training.trainer as trainer_mod
from adapters.config import Recipe, RecipeError, load_recipe
from adapters.config.loading import apply_values
from adapters.data.preference import (
    PreferenceRow,
    audit_preference,
    for_trainer,
    scan_preference,
)
from adapters.data.rows import DataError

from .conftest import DEMO, build_tokenizer, tiny_overrides
from .test_checkpoints import Killed, _kill_at

LOG2 = math.log(2)


# ---------------------------------------------------------------------------------------------------- config
def test_trainer_key_chooses_the_config_class_that_owns_the_keys():
    r = Recipe(trainer="dpo", beta=0.3, loss_type=["sigmoid", "sft"])
    assert (r.beta, r.loss_type, r.bf16, r.precompute_ref_log_probs) == (0.3, ["sigmoid", "sft"], False, True)
    assert r.to_dict()["beta"] == 0.3
    assert Recipe(trainer="kto").desirable_weight == 1.0
    assert Recipe(trainer="orpo").beta == 0.1
    with pytest.raises(RecipeError, match=r"'beta' is a key of trainer dpo / orpo / kto \(trl.DPOConfig\).*'sft'"):
        Recipe(beta=0.1)
    with pytest.raises(RecipeError, match=r"x.yaml: 'packing' is a key of trainer sft \(trl.SFTConfig\).*'dpo'"):
        apply_values({"trainer": "dpo", "packing": True}, "x.yaml")
    with pytest.raises(RecipeError, match=r"'desirable_weight' is a key of trainer kto"):
        apply_values({"trainer": "dpo", "desirable_weight": 2.0}, "x.yaml")
    with pytest.raises(RecipeError, match="trainer: expected one of sft, dpo, orpo, kto"):
        apply_values({"trainer": "ppo"}, "x.yaml")
    with pytest.raises(RecipeError, match="base_kl_source: rows holds the rows' unlabelled positions"):
        Recipe(trainer="dpo", base_kl_weight=1.0, base_kl_source="rows")
    assert Recipe(trainer="dpo", base_kl_weight=1.0).base_kl_source == "auto"  # -> general in the run


def test_help_lists_the_chosen_trainers_keys(capsys):
    from adapters.config.describe import describe_keys

    dpo = describe_keys(load_recipe("gemma3-270m-dpo-demo")[0])
    assert "training: trl.DPOConfig" in dpo and "\n  beta " in dpo and "\n  packing " not in dpo
    assert "precompute_ref_log_probs: the reference is frozen" in dpo  # our default, with its reason
    sft = describe_keys(load_recipe("gemma3-270m-demo")[0])
    assert "training: trl.SFTConfig" in sft and "\n  beta " not in sft


# ---------------------------------------------------------------------------------------------------- data
def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


U = {"role": "user", "content": "Q?"}


def _a(text):
    return {"role": "assistant", "content": text}


def test_each_formats_bad_rows_are_reported_with_file_line_and_field(tmp_path):
    """RELIABILITY 32: missing field, chosen = rejected, empty answer, label not boolean, a prompt that differs
    between the pair's conversations; every problem at file:line with its field."""
    f = _write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Q?", "chosen": "yes", "rejected": "no"},  # 1 ok (strings)
            {"prompt": [U], "chosen": [_a("yes")], "rejected": [_a("no")]},  # 2 ok (messages)
            {"chosen": [U, _a("yes")], "rejected": [U, _a("no")]},  # 3 ok (implicit prompt)
            {"prompt": "Q?", "chosen": "yes"},  # 4 missing rejected
            {"prompt": "Q?", "chosen": "same  answer", "rejected": "same answer"},  # 5 identical
            {"prompt": "Q?", "chosen": " ", "rejected": "no"},  # 6 empty answer
            {"chosen": [U, _a("yes")], "rejected": [{"role": "user", "content": "Other?"}, _a("no")]},  # 7 prompt
            {"prompt": "Q?", "completion": "yes", "label": "true"},  # 8 label not boolean
            {"prompt": "Q?", "completion": "yes", "label": True},  # 9 ok (KTO)
            {"prompt": "Q?", "chosen": [_a("")], "rejected": [_a("no")]},  # 10 empty answer in a message
        ],
    )
    s = scan_preference(f)
    got = {p.line: (p.field, p.message) for p in s.problems}
    assert [r.line for r in s.rows] == [1, 2, 3, 9]
    assert got[4][0] == "rejected" and "missing" in got[4][1]
    assert got[5][0] == "rejected" and "identical to chosen" in got[5][1]
    assert got[6][0] == "chosen" and "empty answer" in got[6][1]
    assert got[7][0] == "rejected" and "prompt differs" in got[7][1]
    assert got[8][0] == "label" and "expected true or false" in got[8][1]
    assert got[10][0] == "chosen[0].content" and "empty answer" in got[10][1]
    assert str(s.problems[0]).startswith(f"{f}:4: rejected: ")
    assert s.rows[2].prompt == [U] and s.rows[2].chosen == [_a("yes")]  # the implicit prompt split off


def test_data_check_cli_reports_preference_rows(tmp_path, capsys):
    from adapters.cli import main

    f = _write(
        tmp_path / "p.jsonl",
        [{"prompt": "Q?", "chosen": "a", "rejected": "a"}, {"prompt": "Q?", "chosen": "a", "rejected": "b"}],
    )
    assert main(["data", "check", str(f)]) == 1
    out = capsys.readouterr()
    assert f"{f}:1: rejected: identical to chosen" in out.out and "1 valid, 1 invalid" in out.err


def test_a_pair_set_given_to_kto_is_unpaired_and_dpo_refuses_kto_rows(tmp_path):
    pair = PreferenceRow("f", 3, [U], chosen=[_a("yes")], rejected=[_a("no")])
    kto = for_trainer([pair], "kto", "f")
    assert [(r.completion, r.label) for r in kto] == [([_a("yes")], True), ([_a("no")], False)]
    with pytest.raises(DataError, match="f:3: chosen: missing: trainer dpo trains on chosen/rejected pairs"):
        for_trainer(kto[:1], "dpo", "f")


def test_audit_flags_a_prompt_that_fills_max_length_length_bias_and_held_out_overlap():
    tok = build_tokenizer()
    long_prompt = [{"role": "user", "content": "word " * 200}]
    rows = [
        PreferenceRow("t.jsonl", 1, [U], chosen=[_a("a much longer chosen answer " * 3)], rejected=[_a("no")]),
        PreferenceRow("t.jsonl", 2, long_prompt, chosen=[_a("yes")], rejected=[_a("no")]),
    ]
    held = [PreferenceRow("h.jsonl", 1, [U], chosen=[_a("x")], rejected=[_a("y")])]
    audit, problems, kept = audit_preference(tok, rows, 64, held, 0.2)
    assert [k.line for k in kept] == [1]
    assert str(problems[0]).startswith("t.jsonl:2: prompt: the prompt alone is") and "max_length 64" in str(problems[0])
    assert audit["prompt_overlap_held_out"] == 1
    names = {f["name"]: f for f in audit["flags"]}
    assert names["length_bias"]["ratio"] > 1.2 and "sigmoid_norm" in names["length_bias"]["message"]
    assert "held_out_overlap" in names
    demo = PreferenceRow(
        "t", 1, [U], chosen=[_a("Moreau, Alice (Lyon, b. 1950)")], rejected=[_a("Moreau, Alice (Lyon, 1950)")]
    )
    balanced, _, _ = audit_preference(tok, [demo], 64, [], 0.2)
    assert not [f for f in balanced["flags"] if f["name"] == "length_bias"]


def test_a_prompt_that_fills_max_length_stops_training_before_the_model_loads(tiny_models, pref_data, tmp_path):
    recipe, path = load_recipe(
        "gemma3-270m-dpo-demo", _dpo_overrides(tiny_models, pref_data, tmp_path, run_name="short", max_length=8)
    )
    with pytest.raises(DataError, match=r"pref_train.jsonl:1: prompt: the prompt alone is \d+ tokens"):
        train_mod.train(recipe, path)


# ---------------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> dict[str, Path]:
    """16 training pairs and 4 held-out pairs of the demo's house-style change."""
    root = tmp_path_factory.mktemp("pref")
    out = {}
    for split, n in (("train", 16), ("val", 4), ("test", 4)):
        out[split] = root / f"pref_{split}.jsonl"
        out[split].write_text("\n".join((DEMO / f"pref_{split}.jsonl").read_text().splitlines()[:n]) + "\n")
    return out


def _dpo_overrides(tiny_models, pref_data, out, plain: bool = True, **kw):
    """Tiny-run overrides; ``plain``: DPO's own sigmoid loss without the NLL term or the guard (the demo recipe has
    both), so that the reference checks can read log 2 and zero rewards at the first step."""
    given = dict(
        eval_file=None,
        eval_strategy="no",
        max_steps=4,
        save_steps=2,
        save_total_limit=None,
        learning_rate=2e-3,
        eval_max_new_tokens=4,
        quant_probe=False,
        report_to="none",
        logging_steps=1,
        forgetting_probe_tokens=64,
    )
    if plain:
        given.update(loss_type=["sigmoid"], loss_weights=None, base_kl_weight=0.0)
    return tiny_overrides(tiny_models["llama"], pref_data, out, **{**given, **kw})


@pytest.fixture(scope="module")
def sft_adapter(tiny_models, tiny_data, tmp_path_factory):
    """An SFT adapter far from the base (6 steps at a high rate): the start a DPO run continues."""
    root = tmp_path_factory.mktemp("sft")
    recipe, path = load_recipe(
        "gemma3-270m-demo",
        tiny_overrides(
            tiny_models["llama"],
            tiny_data,
            root,
            run_name="sft",
            eval_after_train=False,
            eval_strategy="no",
            base_kl_weight=0.0,
            learning_rate=2e-2,
        ),
    )
    return train_mod.train(recipe, path)


def _first_log(run: Path) -> dict:
    return next(e for e in json.loads((run / "manifest.json").read_text())["log_history"] if "loss" in e)


@pytest.fixture(scope="module")
def dpo_run(tiny_models, pref_data, sft_adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    recipe, path = load_recipe(
        "gemma3-270m-dpo-demo",
        _dpo_overrides(tiny_models, pref_data, root, run_name="dpo", init_adapter=str(sft_adapter)),
    )
    return train_mod.train(recipe, path)


def test_continued_adapter_is_its_own_reference(dpo_run, sft_adapter):
    """RELIABILITY 33: continuing an SFT adapter, the reference is base + that adapter: at the first step policy =
    reference, so the DPO loss is log 2 and the rewards 0. With the bare base as reference (the classic bug) the
    policy 'wins' from step 0; the next test shows this check catches it."""
    first = _first_log(dpo_run)
    assert abs(first["loss"] - LOG2) < 1e-4, first
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
    m = json.loads((dpo_run / "manifest.json").read_text())
    assert m["reference"]["kind"] == "start_adapter" and m["reference"]["adapter"] == str(sft_adapter)


def test_the_reference_check_fails_when_the_bare_base_is_the_reference(
    tiny_models, pref_data, sft_adapter, tmp_path, monkeypatch
):
    """The same run with TRL's 'ref' copy dropped (reference = base with the adapter disabled): the first loss is no
    longer log 2, so the test above would fail on the bug."""
    real = pref_mod.build_preference_trainer

    def bare_base(model, tok, recipe, *a, **kw):
        import dataclasses

        trainer, guard = real(model, tok, dataclasses.replace(recipe, init_adapter=None), *a, **kw)
        return trainer, guard

    monkeypatch.setattr(pref_mod, "build_preference_trainer", bare_base)
    recipe, path = load_recipe(
        "gemma3-270m-dpo-demo",
        _dpo_overrides(
            tiny_models,
            pref_data,
            tmp_path,
            run_name="bug",
            init_adapter=str(sft_adapter),
            max_steps=1,
            precompute_ref_log_probs=False,
            eval_after_train=False,
        ),
    )
    run = train_mod.train(recipe, path)
    assert abs(_first_log(run)["loss"] - LOG2) > 1e-3


def _no_ref(folder: Path) -> None:
    assert not (folder / "ref").exists(), f"{folder} holds the reference adapter"
    keys = load_file(str(folder / "adapter_model.safetensors")).keys()
    assert keys and not [k for k in keys if ".ref." in k]


def test_no_reference_adapter_in_adapter_checkpoints_or_merge(dpo_run):
    """RELIABILITY 33: TRL's frozen 'ref' copy never reaches the adapter, a checkpoint or the merged model."""
    from adapters.publish.merge import merge_run

    _no_ref(dpo_run / "adapter")
    ckpts = sorted((dpo_run / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 2
    for c in ckpts:
        _no_ref(c)
    cfg = json.loads((dpo_run / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 16
    merge_run(dpo_run)
    merged = dpo_run / "merged"
    names = [k for f in merged.glob("*.safetensors") for k in load_file(str(f))]
    assert names and not [n for n in names if "lora" in n or ".ref." in n]


def test_preference_evaluation_compares_base_start_and_tuned(dpo_run):
    ev = json.loads((dpo_run / "eval.json").read_text())
    p = ev["preference"]
    assert p["n"] == 4 and set(p) >= {"base", "start", "tuned"}
    for side in ("base", "start", "tuned"):
        assert set(p[side]) >= {
            "accuracy",
            "accuracy_avg",
            "margin",
            "chosen_exact_match",
            "mean_new_tokens",
            "budget_stopped_share",
        }
    assert p["start"] != p["base"]  # the SFT adapter was loaded for 'start'
    assert p["tuned"]["margin"] > p["start"]["margin"]  # DPO moved log p(chosen) - log p(rejected) up
    assert "forgetting" in ev and "## Preference" in (dpo_run / "report.md").read_text()
    assert (dpo_run / "preference.png").is_file()


def test_forgetting_flag_of_a_dpo_run_advises_its_own_knobs(dpo_run, monkeypatch):
    """The forgetting flag of a DPO run (forced here: threshold -1) names that run's knobs: the guard on general text,
    beta, the learning rate and the steps, with their values (not SFT's advice)."""
    from adapters.evaluation import evaluate as ev_mod
    from adapters.evaluation import metrics as M

    real = M.forgetting_flag
    monkeypatch.setattr(M, "forgetting_flag", lambda fg, threshold, advice=None: real(fg, -1.0, advice))
    (flag,) = ev_mod.evaluate_run(dpo_run, probe_only=True, log=lambda *a: None)["flags"]
    cfg = json.loads((dpo_run / "manifest.json").read_text())["config"]
    msg = flag["message"]
    assert f"raise base_kl_weight (now {cfg['base_kl_weight']:g}; KL to the base on general text)" in msg, msg
    assert "unlabelled positions" not in msg
    assert f"raise beta (now {cfg['beta']:g}; DPO's pull towards its reference)" in msg
    assert f"lower learning_rate (now {cfg['learning_rate']:g}) or max_steps (now {cfg['max_steps']})" in msg


def test_dpo_resume_after_kill_matches_unbroken_run(
    dpo_run, tiny_models, pref_data, sft_adapter, tmp_path, monkeypatch
):
    """Killed after checkpoint 2 and resumed: the same adapter and checkpoint 4 as the unbroken run (the reference
    is rebuilt from the starting adapter, not from the checkpoint); a changed beta is refused."""
    from adapters.training.lifecycle import ResumeError

    kw = dict(run_name="dpo", init_adapter=str(sft_adapter), eval_after_train=False)
    recipe, path = load_recipe("gemma3-270m-dpo-demo", _dpo_overrides(tiny_models, pref_data, tmp_path, **kw))
    monkeypatch.setattr(trainer_mod, "make_callbacks", _kill_at(3))  # after checkpoint 2
    with pytest.raises(Killed):
        train_mod.train(recipe, path)
    monkeypatch.undo()
    changed, _ = load_recipe("gemma3-270m-dpo-demo", _dpo_overrides(tiny_models, pref_data, tmp_path, beta=0.5, **kw))
    with pytest.raises(ResumeError, match="beta: 0.1 in the run, 0.5 now"):
        train_mod.train(changed, path, resume=True)
    run = train_mod.train(recipe, path, resume=True)
    for sub in ("adapter", "checkpoints/checkpoint-4"):
        a = load_file(str(dpo_run / sub / "adapter_model.safetensors"))
        b = load_file(str(run / sub / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def _entry(run: Path) -> Path:
    enc = json.loads((run / "manifest.json").read_text())["data"]["encoding"]
    return Path(enc["cache"])


def test_dpo_encoded_cache_holds_trls_own_tokenization_and_a_second_run_reuses_it(
    dpo_run, tiny_models, pref_data, sft_adapter, capsys
):
    """The first DPO run stored TRL's tokenized split (sealed); it equals TRL's own _prepare_dataset on the same rows
    token for token, and a second run with the same key reads it (no audit, no tokenization) and trains the same
    adapter and losses."""
    import types

    from datasets import load_from_disk
    from trl import DPOConfig, DPOTrainer

    from adapters.data import cache
    from adapters.data.preference import prepare_preference

    first = json.loads((dpo_run / "manifest.json").read_text())
    enc = first["data"]["encoding"]
    assert enc["cache_hit"] is False and enc["stored"] is True and enc["num_proc"] == 1
    entry = _entry(dpo_run)
    assert cache.verify(entry) is None and (entry / "report.json").is_file()
    cached = load_from_disk(str(entry / "train"))
    # TRL's own tokenization of the same rows (the data stage without a cache: another output_root)
    recipe, _ = load_recipe(
        "gemma3-270m-dpo-demo",
        _dpo_overrides(tiny_models, pref_data, dpo_run.parent / "nocache", init_adapter=str(sft_adapter)),
    )
    tok = _train_tokenizer(recipe)
    rows, _, report = prepare_preference(recipe, tok, None, say=lambda *a: None)
    assert report["encoding"]["cache_hit"] is False and "prompt_ids" not in rows.column_names
    args = DPOConfig(
        output_dir=str(dpo_run.parent / "nocache"),
        max_length=recipe.max_length,
        report_to="none",
        bf16=False,
        use_cpu=True,
    )
    own = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), rows, tok, args, "train")
    assert len(own) == len(cached) == 16
    for col in ("prompt_ids", "chosen_ids", "rejected_ids", "prompt", "chosen", "rejected"):
        assert cached[col] == own[col], col

    recipe2, path = load_recipe(
        "gemma3-270m-dpo-demo",
        _dpo_overrides(
            tiny_models,
            pref_data,
            dpo_run.parent,
            run_name="dpo-again",
            init_adapter=str(sft_adapter),
            eval_after_train=False,
        ),
    )
    capsys.readouterr()
    run = train_mod.train(recipe2, path)
    said = capsys.readouterr()
    assert f"[data] encoded cache hit: {entry}" in said.out and "Tokenizing train dataset" not in said.out + said.err
    again = json.loads((run / "manifest.json").read_text())
    assert again["data"]["encoding"]["cache_hit"] is True and again["data"]["encoding"]["key"] == enc["key"]
    assert again["data"]["train"] == first["data"]["train"]  # the audit, from the entry
    assert json.loads((run / "data_audit.json").read_text())["train"] == first["data"]["train"]
    losses = [(e["step"], e["loss"]) for e in again["log_history"] if "loss" in e]
    assert losses == [(e["step"], e["loss"]) for e in first["log_history"] if "loss" in e]
    a = load_file(str(dpo_run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_a_damaged_preference_cache_entry_is_named_set_aside_and_not_used(dpo_run, tmp_path):
    """RELIABILITY row 35 for preference entries: a changed Arrow file is found before use, named in one line, the
    entry moved aside; the stage reads, validates and audits the rows again."""
    import shutil

    from adapters.data.preference import prepare_preference
    from adapters.publish.rundir import open_run

    src = open_run(dpo_run)
    root = tmp_path / "out"
    shutil.copytree(_entry(dpo_run).parent, root / ".cache" / "encoded")
    recipe = dataclasses_replace(src.recipe, output_root=str(root))
    entry = root / ".cache" / "encoded" / _entry(dpo_run).name
    arrow = sorted((entry / "train").glob("*.arrow"))[0]
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrow.write_bytes(bytes(data))
    said: list[str] = []
    train, _, report = prepare_preference(recipe, _train_tokenizer(recipe), None, say=said.append)
    damaged = [s for s in said if "entry damaged" in s]
    assert len(damaged) == 1 and arrow.name in damaged[0] and "moved aside" in damaged[0], said
    assert report["encoding"]["cache_hit"] is False and "prompt_ids" not in train.column_names
    assert not entry.exists() and [p for p in entry.parent.iterdir() if ".damaged" in p.name]


def test_a_cache_hit_restores_the_data_report_and_the_quarantine(tmp_path):
    """skip_invalid: the rows the first start set aside are stored with the entry and copied to the run that reads
    it, with the same data_audit.json (the stage alone: the split stored as given)."""
    from adapters.data.preference import prepare_preference, store_tokenized

    f = _write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Q?", "chosen": "yes", "rejected": "no"},
            {"prompt": "Q?", "chosen": "same", "rejected": "same"},
            {"prompt": "R?", "chosen": "a", "rejected": "b"},
        ],
    )
    recipe = Recipe(
        trainer="dpo",
        train_file=str(f),
        eval_file=None,
        test_file=None,
        skip_invalid=True,
        max_length=64,
        output_root=str(tmp_path / "out"),
    )
    tok = build_tokenizer()
    first, second = tmp_path / "run1", tmp_path / "run2"
    train, _, report = prepare_preference(recipe, tok, first, say=lambda *a: None)
    assert report["encoding"]["cache_hit"] is False and len(train) == 2
    assert store_tokenized(report["encoding"], {"train": train}, report, first, recipe, say=lambda *a: None)
    said: list[str] = []
    again, _, report2 = prepare_preference(recipe, tok, second, say=said.append)
    assert report2["encoding"]["cache_hit"] is True and again["chosen"] == train["chosen"]
    assert (second / "quarantine.jsonl").read_text() == (first / "quarantine.jsonl").read_text()
    assert json.loads((second / "data_audit.json").read_text()) == json.loads((first / "data_audit.json").read_text())
    assert any("1 invalid row(s) set aside" in s for s in said), said


def _train_tokenizer(recipe):
    """The tokenizer as training loads it (the run's saved copy serializes differently, so its hash differs)."""
    from adapters.model.loading import load_tokenizer
    from adapters.model.sources import resolve_model

    return load_tokenizer(resolve_model(recipe.model_name_or_path), recipe)


def dataclasses_replace(recipe, **kw):
    import dataclasses

    return dataclasses.replace(recipe, **kw)


def _kl_to_base_on_general(run: Path, tiny_models) -> float:
    """Mean KL(base || tuned) over the guard's first general-text windows, for a run's saved adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.training.forgetting_guard import general_passages, general_windows

    tok = AutoTokenizer.from_pretrained(str(tiny_models["llama"]))
    windows = general_windows(tok, general_passages())[:8]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"]))
    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    with torch.no_grad():
        tuned = torch.log_softmax(model(input_ids=windows).logits.float(), -1)
        with model.disable_adapter():
            ref = torch.log_softmax(model(input_ids=windows).logits.float(), -1)
    return float(torch.nn.functional.kl_div(tuned, ref, log_target=True, reduction="none").sum(-1).mean())


def test_dpo_forgetting_guard_holds_the_policy_to_the_base_on_general_text(
    dpo_run, tiny_models, pref_data, sft_adapter, tmp_path
):
    """base_kl_weight on a preference trainer: KL to the bare base on general text joins DPO's loss (auto resolves
    to general, recorded), is logged, and leaves the policy closer to the base there than the same run without."""
    recipe, path = load_recipe(
        "gemma3-270m-dpo-demo",
        _dpo_overrides(
            tiny_models,
            pref_data,
            tmp_path,
            run_name="dpo-guard",
            init_adapter=str(sft_adapter),
            base_kl_weight=20.0,
            base_kl_every=1,
            eval_base=False,
        ),
    )
    run = train_mod.train(recipe, path)
    m = json.loads((run / "manifest.json").read_text())
    assert m["config"]["base_kl_source"] == "general" and m["status"] == "complete"
    logged = [e["base_kl"] for e in m["log_history"] if "base_kl" in e]
    assert logged and all(math.isfinite(x) and x >= 0 for x in logged)
    _no_ref(run / "adapter")
    assert _kl_to_base_on_general(run, tiny_models) < _kl_to_base_on_general(dpo_run, tiny_models)


@pytest.mark.parametrize("trainer", ["kto", "orpo", "dpo"])
def test_each_shipped_preference_recipe_trains_from_the_base(trainer, tiny_models, pref_data, tmp_path, monkeypatch):
    """The shipped DPO (its NLL term and guard), KTO and ORPO demo recipes from the base: KTO unpairs the pairs and,
    like DPO, takes the base (adapter disabled) as its reference; ORPO has none. Each writes a plain adapter and the
    preference section, and a second run reads TRL's tokenized rows from the cache."""
    recipe, path = load_recipe(  # the shipped demo recipes, with their forgetting guard
        f"gemma3-270m-{trainer}-demo",
        _dpo_overrides(tiny_models, pref_data, tmp_path, False, run_name=trainer, max_steps=2, eval_base=False),
    )
    assert recipe.trainer == trainer and recipe.base_kl_weight > 0
    run = train_mod.train(recipe, path)
    m = json.loads((run / "manifest.json").read_text())
    assert m["reference"]["kind"] == ("none" if trainer == "orpo" else "base")
    if trainer == "dpo":
        assert m["config"]["loss_type"] == ["sigmoid", "sft"]
    assert m["status"] == "complete" and math.isfinite(m["train"]["train_loss"])
    _no_ref(run / "adapter")
    assert json.loads((run / "eval.json").read_text())["preference"]["n"] == 4
    enc = m["data"]["encoding"]
    if trainer == "kto":
        assert m["data"]["train"]["labels"] == {"desirable": 16, "undesirable": 16}
    assert m["config"]["base_kl_source"] == "general"
    assert any("base_kl" in e for e in m["log_history"])  # the guard's KL is logged by every trainer
    assert enc["cache_hit"] is False and enc["stored"] is True
    # a second run reads TRL's tokenized rows from the cache (KTO: with their KL completions; ORPO: the columns its
    # tokenize_row returned): the same training
    again, _ = load_recipe(
        f"gemma3-270m-{trainer}-demo",
        _dpo_overrides(
            tiny_models, pref_data, tmp_path, False, run_name=f"{trainer}2", max_steps=2, eval_after_train=False
        ),
    )

    def not_again(*a, **k):
        raise AssertionError("TRL tokenized the rows again")

    trl_cls = pref_mod._classes(trainer)[1]
    monkeypatch.setattr(trl_cls, "tokenize_row" if trainer == "orpo" else "_prepare_dataset", not_again)
    run2 = train_mod.train(again, path)
    m2 = json.loads((run2 / "manifest.json").read_text())
    assert m2["data"]["encoding"]["cache_hit"] is True and m2["data"]["encoding"]["key"] == enc["key"]
    assert [e["loss"] for e in m2["log_history"] if "loss" in e] == [e["loss"] for e in m["log_history"] if "loss" in e]


def test_card_states_trainer_beta_loss_reference_and_preference_accuracy(dpo_run):
    from adapters.publish.card import build_card

    m = json.loads((dpo_run / "manifest.json").read_text())
    text = str(build_card(m, dpo_run, "org/dpo-demo"))
    assert "TRL `DPOTrainer`" in text and "## Preference training" in text
    for needle in (
        "| trainer | dpo |",
        "| beta | 0.1 |",
        "| loss type | sigmoid |",
        "start_adapter",
        "preference accuracy",
    ):
        assert needle in text, needle
    ev = json.loads((dpo_run / "eval.json").read_text())["preference"]
    row = "| accuracy | " + " | ".join(f"{ev[k]['accuracy']:.6g}" for k in ("base", "start", "tuned")) + " |"
    assert row in text, row


def test_sweep_of_a_dpo_recipe_maximises_held_out_preference_accuracy(tiny_models, pref_data, sft_adapter, tmp_path):
    """`adapters sweep` on a DPO recipe: each trial is scored on the held-out pairs (eval_file) as eval.json's
    preference.tuned.accuracy, maximised, no pruning, forgetting a constraint; sweep.json names the objective."""
    from adapters.cli import main
    from adapters.evaluation.preference import held_out_pair_scores
    from adapters.publish.hub import resolve_adapter
    from adapters.publish.rundir import load_tuned

    out = tmp_path / "sw"
    ov = _dpo_overrides(
        tiny_models,
        pref_data,
        tmp_path,
        eval_file=str(pref_data["val"]),
        init_adapter=str(sft_adapter),
        max_steps=2,
        save_steps=2,
        sweep={"learning_rate": [1e-3, 1e-2], "beta": [0.1, 0.5]},
    )
    argv = ["sweep", "gemma3-270m-dpo-demo", "--trials", "2", "--out", str(out)]
    for k, v in ov.items():
        argv += [f"--{k}", json.dumps(v) if isinstance(v, dict) else "null" if v is None else str(v)]
    assert main(argv) == 0
    summary = json.loads((out / "sweep.json").read_text())
    obj = summary["objective"]
    assert (obj["name"], obj["direction"], obj["split"]) == ("preference_accuracy", "maximize", str(pref_data["val"]))
    assert obj["pruner"].startswith("none")
    assert set(summary["best_params"]) == {"learning_rate", "beta"}  # r / alpha: the SFT adapter's own
    assert "best_eval_loss" not in summary
    trials = summary["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE", "COMPLETE"]
    assert (out / "trials.csv").read_text().startswith("trial,state,preference_accuracy,margin,forgetting_rise")
    for t in trials:
        assert t["preference_accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 held-out pairs
        assert t["feasible"] == (t["forgetting_rise"] <= 0.05)
    pool = [t for t in trials if t["feasible"]] or trials
    top = max(pool, key=lambda t: (t["preference_accuracy"], t["margin"]))
    assert summary["best_trial"] == top["trial"] and summary["best_preference_accuracy"] == top["preference_accuracy"]
    # the value is the tuned adapter's accuracy on those pairs, the figure eval.json's preference section holds
    run = resolve_adapter(out / f"trial-{top['trial']:03d}")
    model, tok = load_tuned(run)
    again = held_out_pair_scores(model, tok, run.recipe, pref_data["val"])
    assert (again["accuracy"], again["margin"]) == (top["preference_accuracy"], top["margin"])
    assert "held-out preference accuracy" in Path(summary["best_recipe"]).read_text().splitlines()[0]


def test_generate_merge_gguf_export_and_push_of_a_dpo_run_hold_only_the_trained_adapter(
    dpo_run, tmp_path, monkeypatch, capsys
):
    """Issue 23 item 6 on a run that continued an SFT adapter (so TRL held a 'ref' copy): generate (tuned and
    merged), merge, `export --gguf` (lora and merged; no llama_cpp, so written unverified) and push to a fake hub
    (adapter and merged). No output holds the reference adapter; the pushed card states the preference training."""
    import shutil
    import sys

    from gguf import GGUFReader
    from huggingface_hub import ModelCard, constants

    from adapters.cli import main
    from adapters.publish.hub import push

    from .fake_hub import FakeHub

    run = Path(shutil.copytree(dpo_run, tmp_path / "run", ignore=shutil.ignore_patterns("merged", "gguf", "hub")))
    trained = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    n_lora = len([k for k in trained if ".lora_A." in k or ".lora_B." in k])
    assert n_lora == len(trained) and not [k for k in trained if ".ref." in k]

    ask = ["--prompt", "Format: Alice Moreau, Lyon, 1950", "--max-new-tokens", "4"]
    assert main(["generate", str(run), *ask]) == 0
    tuned_answer = capsys.readouterr().out
    assert tuned_answer.strip()
    assert main(["merge", str(run)]) == 0
    assert json.loads((run / "merge_report.json").read_text())["verdict"] == "pass"
    names = [k for f in (run / "merged").glob("*.safetensors") for k in load_file(str(f))]
    assert names and not [n for n in names if "lora" in n or ".ref." in n]
    assert not [p for p in run.rglob("*") if p.name == "ref"]
    capsys.readouterr()  # the merge check's table
    assert main(["generate", str(run), "--merged", *ask]) == 0
    assert capsys.readouterr().out == tuned_answer  # the merge is the tuned adapter, not the reference

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # no llama.cpp: written, verdict unverified
    for mode in ("lora", "merged"):
        out = tmp_path / f"gguf-{mode}"
        assert main(["export", str(run), "--gguf", "--mode", mode, "--to", str(out)]) == 0
        assert json.loads((out / "export_report.json").read_text())["verdict"] == "unverified"
        assert not [p for p in out.rglob("*") if "ref" in p.name.lower().split(".")]
    lora = GGUFReader(str(tmp_path / "gguf-lora" / "adapter.gguf"))
    lora_names = [t.name for t in lora.tensors]
    assert len(lora_names) == n_lora  # one A and one B per wrapped layer: the trained adapter's, no second copy
    assert all(n.endswith((".lora_a", ".lora_b")) for n in lora_names) and len(set(lora_names)) == n_lora

    monkeypatch.setenv("HF_TOKEN", "hf_FAKEtok3n0nlyForTestsXyZ1234567890abc")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    hub = FakeHub(lifetime=120).start()
    try:
        push(run, "me/dpo-lora", endpoint=hub.url, backoff=0.01, log=lambda *a: None)
        push(run, "me/dpo-merged", merged=True, endpoint=hub.url, backoff=0.01, log=lambda *a: None)
        remote, merged_remote = hub.files("me/dpo-lora"), hub.files("me/dpo-merged")
    finally:
        hub.stop()
    for files in (remote, merged_remote):
        assert not [p for p in files if p.startswith("ref/") or "/ref/" in p], sorted(files)
    assert remote["adapter_model.safetensors"] == (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert "adapter_model.safetensors" not in merged_remote
    cfg = json.loads(remote["adapter_config.json"])
    assert cfg["r"] == 16 and "ref" not in json.dumps(cfg.get("auto_mapping") or {})
    ev = json.loads((run / "eval.json").read_text())["preference"]
    cfg = json.loads((run / "manifest.json").read_text())["config"]
    losses = cfg["loss_type"] if isinstance(cfg["loss_type"], list) else [cfg["loss_type"]]
    for files in (remote, merged_remote):
        text = ModelCard(files["README.md"].decode()).text
        for needle in ("| trainer | dpo |", f"| beta | {cfg['beta']:g} |", "start_adapter"):
            assert needle in text, needle
        (loss_row,) = [ln for ln in text.splitlines() if ln.startswith("| loss type |")]
        assert all(name in loss_row for name in losses), loss_row
        row = "| accuracy | " + " | ".join(f"{ev[k]['accuracy']:.6g}" for k in ("base", "start", "tuned")) + " |"
        assert row in text, row


def test_plan_counts_chosen_and_rejected_and_the_reference_pass():
    import dataclasses

    from adapters.planning.memory import count_parameters, estimate, model_config

    dpo = load_recipe("gemma3-270m-dpo-demo")[0]
    # the same checkpointing on both sides
    sft = load_recipe("gemma3-270m-demo", {"gradient_checkpointing": dpo.gradient_checkpointing})[0]
    counts = count_parameters(model_config(dpo)[0], dpo)
    pre = dataclasses.replace(dpo, precompute_ref_log_probs=True)  # the demo's 8-bit base: not precomputed
    s, d = estimate(sft, counts), estimate(pre, counts)
    assert d.activations_per_sample == pytest.approx(2 * s.activations_per_sample)
    assert d.logits_per_sample == pytest.approx(2 * s.logits_per_sample)  # reference precomputed: no pass
    live = estimate(dpo, counts)
    assert live.details["reference_pass_per_sample"] > 0
    assert live.logits_per_sample == pytest.approx(d.logits_per_sample + live.details["reference_pass_per_sample"])


def test_dpo_two_processes_on_gloo(tiny_models, pref_data, sft_adapter, tmp_path):
    """A 2-process DDP run (accelerate launch, gloo on CPU) continuing the SFT adapter: one world of 2, the reference
    right on both ranks (first loss log 2), one adapter without 'ref'."""

    from .test_dist import launch_two

    ov = _dpo_overrides(
        tiny_models,
        pref_data,
        tmp_path / "out",
        run_name="ddp",
        init_adapter=str(sft_adapter),
        max_steps=2,
        per_device_train_batch_size=2,
        eval_after_train=False,
    )
    args = [a for k, v in ov.items() for a in (f"--{k}", "null" if v is None else str(v))]
    proc = launch_two("gemma3-270m-dpo-demo", args, tmp_path, port=29541, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "out" / "ddp"
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "complete" and m["world_size"] == 2 and m["effective_batch_size"] == 4
    assert abs(_first_log(run)["loss"] - LOG2) < 1e-4
    _no_ref(run / "adapter")
    assert m["data"]["encoding"]["stored"] is True  # rank 0 stored TRL's tokenized rows; both ranks tokenized
    assert "Tokenizing train dataset" in proc.stderr
    # a second 2-process run: every rank reads the entry (the main process's decision), no rank tokenizes
    args[args.index("ddp")] = "ddp2"
    proc = launch_two("gemma3-270m-dpo-demo", args, tmp_path, port=29542, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = json.loads((tmp_path / "out" / "ddp2" / "manifest.json").read_text())
    assert again["data"]["encoding"]["cache_hit"] is True and "Tokenizing train dataset" not in proc.stderr
    assert [e["loss"] for e in again["log_history"] if "loss" in e] == [
        e["loss"] for e in m["log_history"] if "loss" in e
    ]


def test_precompute_default_follows_the_base_and_a_recipe_value_wins():
    """Our DPO/KTO default precomputes the frozen reference's log-probs, except on an 8-bit base (LLM.int8's outlier
    columns come from the whole batch, so a precomputed pair's log-probs differ from the same pair in a training
    batch); the resolved value is what the manifest's config records, and a recipe's own value wins."""
    from adapters.config.describe import describe_keys
    from adapters.training import preference_speed

    int8 = load_recipe("gemma3-270m-dpo-demo")[0]
    assert int8.load_in_8bit and int8.precompute_ref_log_probs is False
    assert int8.to_dict()["precompute_ref_log_probs"] is False
    why = preference_speed.plan(int8)["precompute_ref_log_probs"]
    assert why["value"] is False and why["source"] == "ours" and "8-bit" in why["why"]
    for name in ("gemma3-270m-dpo-demo", "gemma3-270m-kto-demo"):
        nf4 = load_recipe(name, {"load_in_8bit": False, "load_in_4bit": True})[0]
        assert nf4.precompute_ref_log_probs is True and nf4.to_dict()["precompute_ref_log_probs"] is True
    given = load_recipe("gemma3-270m-dpo-demo", {"precompute_ref_log_probs": True})[0]
    assert given.precompute_ref_log_probs is True
    assert preference_speed.plan(given)["precompute_ref_log_probs"]["source"] == "recipe"
    line = next(x for x in describe_keys(int8).splitlines() if x.split()[:1] == ["precompute_ref_log_probs"])
    assert "True (False on an 8-b" in line and "False" in line.split("...")[1]  # the default, then this recipe's


def test_trainer_constructor_keeps_the_continued_adapters_exact_values(tiny_models, pref_data, sft_adapter, tmp_path):
    """On a quantized base TRL rounds the trainable LoRA tensors to bfloat16 in its constructor (after it copied the
    continued adapter to 'ref'). Our constructor wrapper puts the exact values back: the policy starts equal to
    its reference and to the saved SFT adapter, bit for bit, on an 8-bit base (no precompute: the reference runs in
    the training batch) and the first DPO loss is log 2 with zero rewards."""
    recipe, path = load_recipe(
        "gemma3-270m-dpo-demo",
        _dpo_overrides(
            tiny_models,
            pref_data,
            tmp_path,
            run_name="int8",
            init_adapter=str(sft_adapter),
            load_in_8bit=True,
            max_steps=1,
            eval_after_train=False,
        ),
    )
    seen = {}
    real = pref_mod.build_preference_trainer

    def spy(model, *a, **kw):
        trainer, guard = real(model, *a, **kw)
        params = dict(trainer.model.named_parameters())
        pairs = [(p, params[n.replace(".default.", ".ref.")]) for n, p in params.items() if ".default." in n]
        seen["pairs"] = [(p.dtype, torch.equal(p.float(), r.float())) for p, r in pairs]  # before any step
        seen["trainable"] = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
        return trainer, guard

    import unittest.mock

    with unittest.mock.patch.object(pref_mod, "build_preference_trainer", spy):
        run = train_mod.train(recipe, path)
    assert seen["pairs"] and all(dtype == torch.float32 and same for dtype, same in seen["pairs"])
    saved = load_file(str(sft_adapter / "adapter" / "adapter_model.safetensors"))
    start = {k.replace(".default", ""): v for k, v in seen["trainable"].items()}
    assert all(torch.equal(start[k], v) for k, v in saved.items() if k in start) and saved.keys() <= start.keys()
    m = json.loads((run / "manifest.json").read_text())
    assert m["fast_path"]["precompute_ref_log_probs"]["value"] is False
    first = _first_log(run)
    assert abs(first["loss"] - LOG2) < 1e-6 and abs(first["rewards/chosen"]) < 1e-6, first


def test_exact_trainable_restores_values_a_constructor_rounded():
    from adapters.compat.trl import exact_trainable

    model = torch.nn.Linear(4, 3)
    model.bias.requires_grad_(False)
    before = model.weight.detach().clone()
    with exact_trainable(model):
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)  # what TRL's constructors do to trainable tensors
    assert model.weight.dtype == torch.float32 and torch.equal(model.weight, before)
    assert model.bias.dtype == torch.bfloat16  # not trainable: not ours to restore


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_answer_log_probs_score_only_answer_positions_and_equal_full_logits(tiny_models, arch):
    """The preference evaluation's log-probs run the LM head on the batch's answer positions only
    (``logits_to_keep``); they equal the same sums from every position's logits, one sequence at a time."""
    from transformers import AutoModelForCausalLM

    from adapters.evaluation.preference import answer_logps

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models[arch]), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    seqs = [
        (torch.randint(3, vocab, (n,), generator=g).tolist(), start)
        for n, start in ((9, 4), (14, 10), (6, 1), (11, 0), (5, 5))
    ]
    got = answer_logps(model, seqs, batch_size=3)
    for (ids, start), (lp, n) in zip(seqs, got):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        pos = torch.arange(max(start, 1) - 1, len(ids) - 1)
        want = torch.log_softmax(logits[pos], -1).gather(-1, torch.tensor(ids)[pos + 1, None]).sum()
        assert n == len(pos) and lp == pytest.approx(float(want), abs=1e-4)
