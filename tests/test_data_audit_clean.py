"""Audit numbers checked by hand; cleaning, split, mixing and augmentation with their counts."""

from __future__ import annotations

import json

import pytest

from adapters.config import load_recipe
from adapters.data.audit import audit, violations
from adapters.data.clean import clean_rows, near_key, split_rows
from adapters.data.encode import EncodeReport
from adapters.data.pipeline import prepare_data
from adapters.data.rows import Encoded, Row

from .conftest import build_tokenizer

X = -100


def test_audit_numbers_by_hand():
    # stop ids 1 (eos) and 5 (end of turn); row 1 trains "12 5" (closes with end-of-turn), row 2 trains "13 14" (no
    # stop token); rows 3 (200 tokens) and 4 (nothing trained) were dropped by encode_rows.
    enc = [Encoded([2, 10, 11, 12, 5, 1], [X, X, X, 12, 5, X], "f:1"), Encoded([2, 10, 13, 14], [X, X, 13, 14], "f:2")]
    rep = EncodeReport(
        rows=4,
        kept=2,
        lengths=[6, 4, 200, 9],
        dropped=[
            {"where": "f:3", "tokens": 200, "reason": "longer than max_length=128; the answer would be cut"},
            {"where": "f:4", "tokens": 9, "reason": "no trained token"},
        ],
    )
    a = audit(enc, rep, 128, [1, 5])
    assert (a["kept"], a["tokens"], a["trained_tokens"], a["trained_share"]) == (2, 10, 4, 0.4)
    assert (a["dropped"], a["dropped_share"]) == (2, 0.5)
    assert [d["where"] for d in a["truncated_answer_rows"]] == ["f:3"]
    assert [d["where"] for d in a["no_trained_token_rows"]] == ["f:4"]
    assert (a["eos_trained_rows"], a["eos_trained"]) == (1, False)
    # sorted lengths 4, 6, 9, 200: median (6+9)/2, p95 = element int(0.95*4)=3
    assert a["length"] == {"min": 4, "median": 7.5, "p95": 200, "max": 200, "max_length": 128, "over_max_length": 1}
    v = violations(a, max_dropped_share=0.1, min_trained_share=0.5, require_eos=True)
    assert len(v) == 3 and "f:3" in v[0] and "40.0%" in v[1] and "1 of 2 rows" in v[2]
    assert violations(a, max_dropped_share=0.5, min_trained_share=0.4, require_eos=False) == []


@pytest.mark.slow
def test_demo_audit_has_no_problems(tmp_path):
    _demo_audit(tmp_path, {}, 480, 40)


def test_demo_recipe_audit_on_demo_slice_has_no_problems(tmp_path, tiny_data):
    _demo_audit(
        tmp_path,
        {
            k + "_file": str(v)
            for k, v in (("train", tiny_data["train"]), ("eval", tiny_data["val"]), ("test", tiny_data["test"]))
        },
        32,
        8,
    )


def _demo_audit(tmp_path, over, n_train, n_eval):
    recipe = load_recipe("gemma3-270m-demo", {"output_root": str(tmp_path), **over})[0]
    said = []
    enc, ev, test, rep = prepare_data(recipe, build_tokenizer(), tmp_path / "run", say=said.append)
    a = json.loads((tmp_path / "run" / "data_audit.json").read_text())
    assert a["problems"] == [] and "[audit] no problems" in said
    assert a["train"]["dropped"] == 0 and a["train"]["eos_trained"] and a["train"]["rows_trained_from_first_token"] == 0
    assert 0 < a["train"]["trained_share"] < 0.6
    assert rep["train"]["sha256"] and rep["sources"][0]["rows"] == n_train and rep["sources"][0]["tokens"] > 0
    assert len(enc) == n_train and len(ev) == n_eval and len(test) == n_eval


def _row(i, q, a):
    return Row("f", i, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])


def test_clean_steps_with_counts():
    rows = [
        _row(1, "Who?", "Ada"),
        _row(2, "Who?", "Ada"),
        _row(3, "  who? ", "ADA"),
        _row(4, "Why?", "..."),
        _row(5, "When?", "1815"),
        _row(6, "x" * 50, "long prompt"),
    ]
    kept, steps = clean_rows(rows, max_prompt_chars=20)
    assert [r.line for r in kept] == [1, 5]
    assert [(s["step"], s["removed"], s["examples"]) for s in steps] == [
        ("exact_duplicates", 1, ["f:2"]),
        ("near_duplicates", 1, ["f:3"]),
        ("empty_answers", 1, ["f:4"]),
        ("length_filter", 1, ["f:6"]),
    ]


def test_split_is_deterministic_and_disjoint():
    rows = [_row(i, f"q{i}", f"a{i}") for i in range(100)]
    t1, v1 = split_rows(rows, 0.2, seed=1)
    t2, v2 = split_rows(rows, 0.2, seed=1)
    assert [r.line for r in v1] == [r.line for r in v2] and len(v1) == 20 and len(t1) == 80
    assert not {near_key(r) for r in t1} & {near_key(r) for r in v1}
    assert [r.line for r in split_rows(rows, 0.2, seed=2)[1]] != [r.line for r in v1]


def _jsonl(path, pairs):
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    return str(path)


def _recipe(tmp_path, **kw):
    base = {"output_root": str(tmp_path), "eval_file": None, "test_file": None}
    return load_recipe("gemma3-270m-demo", {**base, **kw})[0]


def test_val_split_by_fraction_and_overlap_with_test_removed(tmp_path):
    train = _jsonl(tmp_path / "t.jsonl", [(f"Who is number {i}?", f"Person {i}") for i in range(40)])
    test = _jsonl(tmp_path / "x.jsonl", [("who is NUMBER  3?", "person 3")])  # near-duplicate of train row 4
    r = _recipe(tmp_path, train_file=train, test_file=test, val_split=0.25)
    enc, ev, _, rep = prepare_data(r, build_tokenizer(), tmp_path / "run", say=lambda s: None)
    assert rep["split"]["by"] == "fraction" and len(ev) == 10
    leak = next(s for s in rep["cleaning"] if s["step"] == "overlap_with_eval_or_test")
    # train row 4 is in train or validation; either way it cannot stay in train
    assert {e.where for e in enc}.isdisjoint({f"{train}:4"}) and {e.where for e in enc}.isdisjoint(
        {e.where for e in ev}
    )
    assert leak["removed"] in (0, 1) and len(enc) + len(ev) == 40 - leak["removed"]
    with pytest.raises(Exception, match="val_split"):
        prepare_data(
            _recipe(tmp_path, train_file=train, eval_file=test, val_split=0.25),
            build_tokenizer(),
            None,
            say=lambda s: None,
        )


def test_mixing_weights_and_augmentation_recorded(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [(f"Alpha question {i}?", f"Alpha {i}") for i in range(10)])
    b = _jsonl(tmp_path / "b.jsonl", [(f"Beta question {i}?", f"Beta {i}") for i in range(10)])
    g = _jsonl(tmp_path / "g.jsonl", [(f"General fact {i}?", f"Fact {i}") for i in range(50)])
    r = _recipe(
        tmp_path,
        train_file=a,
        data_mix={b: 0.5, a: 2.0},
        augment_prompt_templates=["{prompt}", "Q: {prompt}"],
        general_data_file=g,
        general_data_share=0.2,
    )
    enc, _, _, rep = prepare_data(r, build_tokenizer(), tmp_path / "run", say=lambda s: None)
    src = {s["file"]: s for s in rep["sources"]}
    assert (src[a]["rows"], src[a]["rows_used"]) == (10, 20) and (src[b]["rows"], src[b]["rows_used"]) == (10, 5)
    aug = rep["augmentation"]
    assert aug["prompt_templates"] == {"templates": ["{prompt}", "Q: {prompt}"], "rows_before": 25, "rows_after": 50}
    # 20% of the result is general data: 50 task rows -> 12.5 -> 12 general rows
    assert aug["general_data"]["rows_added"] == 12 and len(enc) == 62 and src[g]["rows_used"] == 12
    assert all(len(s["sha256"]) == 64 and s["tokens"] > 0 for s in rep["sources"])
    assert sum(s["tokens"] for s in rep["sources"]) == sum(len(e.input_ids) for e in enc)
    # same recipe, same seed -> same rows in the same order
    enc2 = prepare_data(r, build_tokenizer(), None, say=lambda s: None)[0]
    assert [e.input_ids for e in enc2] == [e.input_ids for e in enc]


def test_data_audit_cli_uses_recipe_tokenizer(tmp_path, tiny_models, tiny_data, capsys):
    from adapters.cli import main

    out = tmp_path / "audit"
    rc = main(
        [
            "data",
            "audit",
            "gemma3-270m-demo",
            "--out",
            str(out),
            "--model_name_or_path",
            str(tiny_models["gemma3"]),
            "--train_file",
            str(tiny_data["train"]),
            "--eval_file",
            str(tiny_data["val"]),
            "--test_file",
            str(tiny_data["test"]),
        ]
    )
    assert rc == 0 and json.loads((out / "data_audit.json").read_text())["train"]["kept"] == 32
    assert "[audit] no problems" in capsys.readouterr().out
    rc = main(
        [
            "data",
            "audit",
            "gemma3-270m-demo",
            "--out",
            str(out),
            "--model_name_or_path",
            str(tiny_models["gemma3"]),
            "--train_file",
            str(tiny_data["train"]),
            "--max_length",
            "30",
        ]
    )
    assert rc == 2 and "data audit failed" in capsys.readouterr().err


def test_template_from_jinja_file_hashed_and_unstoppable_template_refused(tmp_path, tiny_models, tiny_data):
    import hashlib

    from adapters.data.audit import AuditError
    from adapters.model.loading import TEMPLATE_DIR, load_tokenizer
    from adapters.model.sources import resolve_model

    over = {
        "output_root": str(tmp_path),
        "model_name_or_path": str(tiny_models["gemma3"]),
        "train_file": str(tiny_data["train"]),
        "eval_file": None,
        "test_file": None,
    }
    gemma = TEMPLATE_DIR / "gemma.jinja"
    r = load_recipe("gemma3-270m-demo", {**over, "chat_template": str(gemma)})[0]
    tok = load_tokenizer(resolve_model(r.model_name_or_path), r)
    rep = prepare_data(r, tok, None, say=lambda s: None)[3]
    assert rep["chat_template"]["sha256"] == hashlib.sha256(gemma.read_bytes()).hexdigest()
    # ChatML closes turns with <|im_end|>, which this tokenizer splits into plain pieces: no stop token is trained
    r = load_recipe("gemma3-270m-demo", {**over, "chat_template": "chatml"})[0]
    tok = load_tokenizer(resolve_model(r.model_name_or_path), r)
    with pytest.raises(AuditError, match=r"0 of 32 rows train their closing EOS/end-of-turn"):
        prepare_data(r, tok, None, say=lambda s: None)
