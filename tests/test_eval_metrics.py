"""Metrics, flags, probe selection, sweep space and report writing, checked against hand-computed values (no model)."""

from __future__ import annotations

import math

import pytest

from adapters.config import Recipe, RecipeError, load_recipe
from adapters.evaluation import metrics as M


def test_label_metrics_match_hand_values():
    labels = ["cat", "dog", "bird"]
    refs = ["cat", "cat", "cat", "dog", "dog", "bird", "bird", "bird"]
    preds = ["cat", "cat", "dog", "dog", " Cat ", "bird", "fish", "dog"]
    m = M.label_metrics(preds, refs, labels)
    # confusion rows = true, cols = predicted [cat, dog, bird, <other>]
    assert m["classes"] == ["cat", "dog", "bird", "<other>"]
    assert m["confusion"] == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]]
    assert m["accuracy"] == round(4 / 8, 4)
    # cat: tp 2, predicted 3, actual 3 -> P 2/3, R 2/3, F1 2/3
    # dog: tp 1, predicted 3, actual 2 -> P 1/3, R 1/2, F1 0.4
    # bird: tp 1, predicted 1, actual 3 -> P 1, R 1/3, F1 0.5
    pc = m["per_class"]
    assert pc["cat"] == {"precision": 0.6667, "recall": 0.6667, "f1": 0.6667, "support": 3}
    assert pc["dog"] == {"precision": 0.3333, "recall": 0.5, "f1": 0.4, "support": 2}
    assert pc["bird"] == {"precision": 1.0, "recall": 0.3333, "f1": 0.5, "support": 3}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.4 + 0.5) / 3, abs=1e-4)


def test_label_metrics_never_divide_by_zero():
    m = M.label_metrics(["x", "x"], ["a", "a"], ["a", "b"])
    assert m["accuracy"] == 0.0 and m["macro_f1"] == 0.0
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_rouge_l_hand_values():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = the cat on the mat = 5; P = R = 5/6
    assert M.rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # LCS = 2 ("a c"), P = 2/3, R = 2/2 -> F1 = 0.8
    assert M.rouge_l("a b c", "a c") == pytest.approx(0.8)
    assert M.rouge_l("x y", "a b") == 0.0
    assert M.rouge_l("", "") == 1.0 and M.rouge_l("", "a") == 0.0
    assert M.mean_rouge_l(["a b c", "x"], ["a c", "x"]) == pytest.approx(0.9)


def test_task_scores_keys():
    s = M.task_scores(["yes", "no"], ["yes", "yes"], labels=["yes", "no"], with_rouge=True)
    assert s["exact_match"] == 0.5 and s["n"] == 2 and s["accuracy"] == 0.5 and s["rouge_l"] == 0.5
    assert M.primary_metric(["a"]) == "macro_f1" and M.primary_metric(None) == "exact_match"


def test_negative_transfer_flag():
    assert M.negative_transfer({"exact_match": 0.5}, {"exact_match": 0.6}, "exact_match") is None
    assert M.negative_transfer({"exact_match": 0.5}, {"exact_match": 0.5}, "exact_match") is None
    f = M.negative_transfer({"exact_match": 0.5}, {"exact_match": 0.25}, "exact_match")
    assert f["name"] == "negative_transfer" and "0.2500 < 0.5000" in f["message"]
    assert M.negative_transfer(None, {"exact_match": 0.1}, "exact_match") is None


def _history(train, val):
    return [{"step": s, "loss": v} for s, v in train] + [{"step": s, "eval_loss": v} for s, v in val]


def test_overfitting_flag():
    train = [(i, 3.0 - 0.2 * i) for i in range(1, 13)]
    rising = [(3, 2.0), (6, 1.8), (9, 1.9), (12, 2.1)]
    f = M.overfitting(_history(train, rising), window=2)
    assert f and f["name"] == "overfitting" and f["steps"] == [6, 12] and f["eval_loss"] == [1.8, 1.9, 2.1]
    assert M.overfitting(_history(train, rising), window=3) is None  # 2.0 -> 1.8 fell within the window
    assert M.overfitting(_history(train, [(3, 2.0), (6, 1.8), (9, 1.7), (12, 1.6)]), window=2) is None
    flat_train = [(i, 1.0 + 0.01 * i) for i in range(1, 13)]  # train loss did not fall: underfitting, not overfit
    assert M.overfitting(_history(flat_train, rising), window=2) is None
    assert M.overfitting(_history(train, rising[:2]), window=2) is None  # too few evaluations


def test_forgetting_flag_threshold():
    fg = {"probe": "p", "ppl_base": 10.0, "ppl_tuned": 10.4, "rise": 0.04}
    assert M.forgetting_flag(fg, 0.05) is None
    f = M.forgetting_flag({**fg, "ppl_tuned": 11.0, "rise": 0.1}, 0.05)
    assert f["name"] == "forgetting" and "10.0%" in f["message"]
    assert M.forgetting_flag({**fg, "rise": None}, 0.05) is None
    assert M.perplexity(0.0) == 1.0 and math.isinf(M.perplexity(1e4))


def test_forgetting_advice_names_the_knobs_of_the_runs_trainer():
    """The forgetting flag advises what the run's trainer has, with the config's values: base_kl_weight where the
    recipe accepts it (SFT: on unlabelled positions; preference trainers: on general text, never with
    base_kl_source: rows), beta for DPO/KTO (their pull to the reference), never ORPO's beta (no reference)."""
    fg = {"probe": "p", "ppl_base": 10.0, "ppl_tuned": 11.0, "rise": 0.1}
    sft = M.forgetting_flag(fg, 0.05, M.forgetting_advice(Recipe(max_steps=30)))
    assert "raise base_kl_weight (now 0; KL to the base on unlabelled positions)" in sft["message"]
    assert "max_steps (now 30)" in sft["message"] and "beta" not in sft["message"]
    for trainer in ("dpo", "kto"):
        f = M.forgetting_flag(fg, 0.05, M.forgetting_advice(Recipe(trainer=trainer, beta=0.25, learning_rate=1e-5)))
        assert "raise base_kl_weight (now 0; KL to the base on general text)" in f["message"], f["message"]
        assert f"raise beta (now 0.25; {trainer.upper()}'s pull" in f["message"]
        assert "lower learning_rate (now 1e-05) or num_train_epochs (now 1)" in f["advice"]
        rows = M.forgetting_advice(Recipe(trainer=trainer, base_kl_source="rows"))  # the guard refused here
        assert "base_kl_weight" not in rows and rows.startswith("raise beta (now 0.1;")
    orpo = M.forgetting_advice(Recipe(trainer="orpo", max_steps=8))
    assert "raise beta" not in orpo and "max_steps (now 8)" in orpo and "ORPO has no reference" in orpo
    assert "base_kl_weight" not in M.forgetting_advice(Recipe(trainer="orpo", base_kl_source="rows"))


def test_stdlib_probe_is_deterministic_prose():
    from adapters.evaluation.forgetting import probe_passages, stdlib_passages

    a, b = stdlib_passages(), stdlib_passages()
    assert a == b and len(a) >= 20
    assert all(len(p) >= 200 and ">>>" not in p for p in a)
    name, passages = probe_passages(None)
    assert name.startswith("python3.") and passages == a


def test_probe_file_replaces_default_and_bad_files_error(tmp_path):
    from adapters.evaluation.forgetting import ProbeError, probe_passages

    f = tmp_path / "probe.txt"
    f.write_text("First passage\nwraps here.\n\nSecond passage.\n")
    assert probe_passages(str(f)) == ("probe.txt", ["First passage wraps here.", "Second passage."])
    with pytest.raises(ProbeError, match="not found"):
        probe_passages(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe")
    with pytest.raises(ProbeError, match=r"bad.txt: .*byte offset 3"):
        probe_passages(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ProbeError, match="no text"):
        probe_passages(str(empty))


def test_sweep_space_parsing():
    from adapters.training.sweep import search_space

    recipe, _ = load_recipe(
        "gemma3-270m-demo",
        {
            "max_steps": -1,
            "sweep": {
                "learning_rate": [1e-4, 1e-3],
                "r": [8, 16],
                "lora_dropout": None,
                "lora_alpha": {"choices": [16, 32]},
                "weight_decay": 0.01,
                "pruner_startup_trials": 1,
            },
        },
    )
    space, pruner = search_space(recipe)
    assert space["learning_rate"] == {
        "kind": "range",
        "low": 1e-4,
        "high": 1e-3,
        "log": True,
        "step": None,
        "int": False,
    }
    assert space["r"]["kind"] == "range" and space["r"]["int"]  # two integers: an integer range
    assert space["lora_alpha"] == {"kind": "choice", "choices": [16, 32]}
    assert "lora_dropout" not in space and space["weight_decay"] == {"kind": "fixed", "value": 0.01}
    assert space["num_train_epochs"]["int"] and pruner == {
        "pruner_startup_trials": 1,
        "pruner_warmup_steps": 0,
        "constrain_forgetting": True,
    }
    recipe.max_steps = 10
    assert "num_train_epochs" not in search_space(recipe)[0]  # max_steps wins over epochs
    for bad, msg in (
        ({"nonsense": [1, 2]}, "sweep.nonsense: not a recipe key"),
        ({"learning_rate": [0, 1e-3]}, "log-scale range needs low > 0"),
        ({"r": [16, 8]}, "low <= high"),
        ({"r": {"x": 1}}, "needs low and high"),
        ({"constrain_forgetting": "maybe"}, "sweep.constrain_forgetting: expected true or false"),
    ):
        with pytest.raises(RecipeError, match=msg):
            search_space(Recipe(sweep=bad), "my.yaml")


def test_early_stopping_config_errors():
    from adapters.training.callbacks import config_fields

    r = Recipe(early_stopping_patience=2, eval_strategy="steps", eval_steps=3, save_steps=6)
    f = config_fields(r, has_eval=True)
    assert f["load_best_model_at_end"] is True and f["metric_for_best_model"] == "eval_loss"
    assert config_fields(Recipe(), has_eval=True) == {}
    with pytest.raises(RecipeError, match=r"save_steps \(5\) must be a multiple of eval_steps \(3\)"):
        config_fields(Recipe(early_stopping_patience=2, eval_strategy="steps", eval_steps=3, save_steps=5), True)
    with pytest.raises(RecipeError, match="needs a validation split"):
        config_fields(r, has_eval=False)
    with pytest.raises(RecipeError, match="requires load_best_model_at_end"):
        config_fields(
            Recipe(
                early_stopping_patience=1,
                eval_strategy="steps",
                eval_steps=3,
                save_steps=6,
                load_best_model_at_end=False,
            ),
            True,
        )


def test_report_md_from_evaluation(tmp_path):
    from adapters.evaluation.plots import plot_confusion, plot_task_metrics
    from adapters.evaluation.report import write_report

    base = {**M.task_scores(["a", "b"], ["a", "a"], ["a", "b"]), "samples": []}
    tuned = {**M.task_scores(["a", "a"], ["a", "a"], ["a", "b"]), "samples": []}
    ev = {
        "base": base,
        "tuned": tuned,
        "max_new_tokens": 8,
        "forgetting": {"probe": "p", "tokens": 10, "ppl_base": 5.0, "ppl_tuned": 5.1, "rise": 0.02},
        "flags": [],
        "plots": {"task metrics": "task_metrics.png"},
        "sample_rows": [{"prompt": "x|y", "expected": "a", "base": "b", "tuned": "a"}],
    }
    assert plot_task_metrics(ev, tmp_path / "task_metrics.png").stat().st_size > 0
    assert plot_confusion(tuned, tmp_path / "c.png", "t").stat().st_size > 0
    text = write_report(ev, tmp_path, "run").read_text()
    assert "| exact_match | 0.5000 | 1.0000 |" in text and "| macro_f1 |" in text
    assert "| 5.0000 | 5.1000 | +2.00% |" in text and "| x\\|y | a | b | a |" in text
    assert "![task metrics](task_metrics.png)" in text and "None: no negative transfer" in text


def test_report_to_needs_the_logger_installed(monkeypatch):
    import importlib.util

    from adapters.training.callbacks import check_report_to

    check_report_to("tensorboard")
    check_report_to("none")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RecipeError, match=r"report_to: 'wandb' is not installed \(pip install wandb\)"):
        check_report_to(["tensorboard", "wandb"])


def test_preference_sweep_objective_space_and_a_continued_adapters_fixed_shape():
    from adapters.training.sweep import objective_of, search_space

    dpo = Recipe(trainer="dpo", eval_file="pairs_val.jsonl", max_steps=4)
    obj = objective_of(dpo)
    assert (obj.name, obj.direction, obj.split) == ("preference_accuracy", "maximize", "pairs_val.jsonl")
    assert obj.pruner.startswith("none")
    assert objective_of(Recipe(trainer="dpo", eval_file=None, test_file="t.jsonl")).split == "t.jsonl"
    with pytest.raises(RecipeError, match="a preference sweep needs held-out pairs"):
        objective_of(Recipe(trainer="kto", eval_file=None, test_file=None))
    assert objective_of(Recipe(eval_strategy="steps")).name == "eval_loss"
    space, _ = search_space(dpo)
    assert set(space) == {"learning_rate", "beta", "r", "lora_alpha"} and space["beta"]["log"]
    assert space["learning_rate"]["high"] <= 1e-4  # a DPO LoRA rate, not SFT's
    cont, _ = search_space(Recipe(trainer="dpo", max_steps=4, init_adapter="outputs/sft"))
    assert set(cont) == {"learning_rate", "beta"}  # the continued adapter's r / alpha are its own
    with pytest.raises(RecipeError, match=r"x.yaml: sweep.r: init_adapter outputs/sft fixes the adapter's LoRA"):
        search_space(Recipe(trainer="dpo", init_adapter="outputs/sft", sweep={"r": [4, 8]}), "x.yaml")


def test_sweep_refuses_without_validation_split(tmp_path):
    from pathlib import Path

    from adapters.training.sweep import sweep

    with pytest.raises(RecipeError, match="a sweep needs a validation split"):
        sweep(Recipe(eval_strategy="no"), Path("x.yaml"), 3, out_dir=tmp_path)
    with pytest.raises(RecipeError, match="--trials: must be >= 1"):
        sweep(Recipe(eval_strategy="steps"), Path("x.yaml"), 0, out_dir=tmp_path)
