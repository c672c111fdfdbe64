"""RELIABILITY.md rows 1-8, one test each, plus `adapters data check` on planted faults."""

from __future__ import annotations

import json
import logging

import pytest

from adapters.cli import main
from adapters.config import load_recipe
from adapters.data.audit import AuditError
from adapters.data.encode import encode_messages, encode_rows
from adapters.data.pipeline import packing_guard, prepare_data
from adapters.data.rows import IGNORE_INDEX, DataError
from adapters.data.validate import check, read_rows

from .conftest import DEMO, build_tokenizer, tiny_overrides

CONV = [
    {"role": "user", "content": "Catalogue line for: name=Ada Lovelace; born=1815; city=London"},
    {"role": "assistant", "content": "Lovelace, Ada (London, 1815)"},
]
GOOD = json.dumps({"messages": CONV})


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def _recipe(tmp_path, train, **extra):
    over = tiny_overrides(tmp_path / "m", {"train": train, "val": None, "test": None}, tmp_path / "out", **extra)
    over.update(eval_file=None, test_file=None)
    return load_recipe("gemma3-270m-demo", over)[0]


# 1 ---------------------------------------------------------------------------------------------- pad == eos
def test_row1_pad_eq_eos_keeps_eos_trained():
    tok = build_tokenizer(pad_is_eos=True)
    assert tok.pad_token_id == tok.eos_token_id
    ids, labels = encode_messages(tok, CONV)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    trained = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    # labels by position: the answer's closing end-of-turn is trained, with its own id as label
    assert eot in trained
    pos = max(i for i, t in enumerate(ids) if t == eot)
    assert labels[pos] == eot


# 2 ---------------------------------------------------------------------------------------------- truncated answer
def test_row2_truncated_answer_rows_dropped_listed_and_run_stops(tmp_path):
    tok = build_tokenizer()
    long = json.dumps({"prompt": "word " * 150, "completion": "answer"})
    f = _write(
        tmp_path / "d.jsonl",
        [GOOD] * 1
        + [long]
        + [json.dumps({"messages": CONV[:1] + [{"role": "assistant", "content": f"Lovelace {i}"}]}) for i in range(8)],
    )
    recipe = _recipe(tmp_path, f, max_length=128)
    enc, _, _, rep = prepare_data(recipe, tok, tmp_path / "run", say=lambda s: None)
    audit = json.loads((tmp_path / "run" / "data_audit.json").read_text())
    assert [d["where"] for d in audit["train"]["truncated_answer_rows"]] == [f"{f}:2"]
    assert audit["train"]["dropped"] == 1 and len(enc) == 9
    assert all(any(lab != IGNORE_INDEX for lab in e.labels) for e in enc)  # never an all -100 row
    # most rows dropped -> the run stops before training, and the audit is still written
    recipe = _recipe(tmp_path, f, max_length=20, run_name="r2")
    with pytest.raises(AuditError, match=r"rows dropped .*first: .*d.jsonl:1"):
        prepare_data(recipe, tok, tmp_path / "run2", say=lambda s: None)
    assert json.loads((tmp_path / "run2" / "data_audit.json").read_text())["problems"]


# 3 ---------------------------------------------------------------------------------------------- assistant-only
def test_row3_chat_default_trains_assistant_tokens_only(tmp_path):
    tok = build_tokenizer()
    conv = (
        [{"role": "system", "content": "Be terse."}]
        + CONV
        + [{"role": "user", "content": "And Alan Turing?"}, {"role": "assistant", "content": "Turing, Alan"}]
    )
    ids, labels = encode_messages(tok, conv)
    spans, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    assert spans == ["Lovelace, Ada (London, 1815)<end_of_turn>\n", "Turing, Alan<end_of_turn>\n"]


def test_row3_template_that_cannot_mask_is_an_error():
    tok = build_tokenizer()
    # a template that renders the generation prompt differently from the full conversation
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT>{% endif %}"
    )
    with pytest.raises(DataError, match=r"x.jsonl:3: messages\[1\]: .*loss mask cannot be built"):
        encode_messages(tok, CONV, "x.jsonl:3")


# 4 ---------------------------------------------------------------------------------------------- malformed JSON
def test_row4_malformed_json_every_line_reported_and_quarantined(tmp_path):
    f = _write(tmp_path / "d.jsonl", [GOOD, '{"messages": [}', GOOD, '{"prompt": "a" "completion": "b"}'])
    res = check([f])
    assert [str(p) for p in res.problems] == [
        f"{f}:2:15: invalid JSON: Expecting value",
        f"{f}:4:16: invalid JSON: Expecting ',' delimiter",
    ]
    q = tmp_path / "q.jsonl"
    res = check([f], quarantine=q)
    assert res.bad_rows == 2 and res.valid == 2
    rows = [json.loads(x) for x in q.read_text().splitlines()]
    assert [r["where"] for r in rows] == [f"{f}:2", f"{f}:4"] and rows[0]["raw"] == '{"messages": [}'


def test_row4_train_quarantines_with_skip_invalid(tmp_path):
    f = _write(
        tmp_path / "d.jsonl",
        [GOOD, "{oops"] + [json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(5)],
    )
    tok = build_tokenizer()
    with pytest.raises(DataError, match=r"(?s)1 problem\(s\) in 1 row\(s\).*d.jsonl:2:2: invalid JSON"):
        prepare_data(_recipe(tmp_path, f), tok, tmp_path / "run", say=lambda s: None)
    said = []
    enc, _, _, rep = prepare_data(_recipe(tmp_path, f, skip_invalid=True), tok, tmp_path / "run", say=said.append)
    assert len(enc) == 6 and rep["validation"]["invalid"] == 1
    assert (tmp_path / "run" / "quarantine.jsonl").read_text().count("\n") == 1
    assert any("1 invalid row(s) skipped" in s for s in said)


# 5 ---------------------------------------------------------------------------------------------- non-UTF-8
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_row5_non_utf8_reports_line_and_byte_offset(tmp_path, suffix):
    head = {
        ".jsonl": b'{"prompt": "a", "completion": "b"}\n',
        ".json": b'[{"prompt": "a", "completion": "b"},\n',
        ".csv": b"prompt,completion\n",
    }[suffix]
    bad = b'{"prompt": "caf\xe9", "completion": "b"}\n' if suffix != ".csv" else b"caf\xe9,b\n"
    f = tmp_path / f"d{suffix}"
    f.write_bytes(head + bad + (b"]\n" if suffix == ".json" else b""))
    col = bad.index(b"\xe9")
    res = check([f])
    assert [str(p) for p in res.problems] == [
        f"{f}:2: invalid UTF-8 at byte offset {len(head) + col} (byte 0xe9 at column {col + 1})"
    ]


# 6 ---------------------------------------------------------------------------------------------- fields / roles
def test_row6_every_field_problem_named(tmp_path):
    f = _write(
        tmp_path / "d.jsonl",
        [
            GOOD,
            '{"messages": [{"role": "user", "content": ""}, {"role": "wizard", "content": "x"}]}',
            '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
            '{"messages": [{"role": "user", "content": "a"}]}',
            '{"prompt": "a"}',
            '{"messages": [{"content": "a"}, {"role": "assistant"}]}',
        ],
    )
    res = check([f])
    assert [str(p) for p in res.problems] == [
        f"{f}:2: messages[0].content: missing or empty",
        f"{f}:2: messages[1].role: unknown role 'wizard' (expected one of ['assistant', 'system', 'user'])",
        f"{f}:3: messages: turns must alternate user/assistant; turn 2 is 'user'",
        f"{f}:4: messages: no assistant turn to learn from (the last turn must be the assistant's)",
        f"{f}:5: completion: missing or empty",
        f"{f}:6: messages[0].role: missing",
        f"{f}:6: messages[1].content: missing or empty",
    ]
    assert main(["data", "check", str(f)]) == 1


def test_row6_aliases_normalised_with_warning(tmp_path, caplog):
    f = _write(
        tmp_path / "d.jsonl", ['{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}']
    )
    with caplog.at_level(logging.WARNING, logger="adapters.data"):
        rows = read_rows(f)
    assert rows[0].messages == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert f"{f}:1: role/field aliases" in caplog.text


def test_check_cli_clean_file_passes_and_planted_faults_fail(tmp_path, capsys):
    assert main(["data", "check", str(DEMO / "train.jsonl"), str(DEMO / "val.jsonl")]) == 0
    f = _write(tmp_path / "d.jsonl", [GOOD, "{", '{"prompt": "", "completion": "x"}'])
    assert main(["data", "check", str(f)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{f}:2:2: invalid JSON: Expecting property name enclosed in double quotes",
        f"{f}:3: prompt: missing or empty",
    ]
    q = tmp_path / "q.jsonl"
    assert main(["data", "check", str(f), "--skip-invalid", "--quarantine", str(q)]) == 0
    assert len(q.read_text().splitlines()) == 2
    assert "2 invalid row(s) written to" in capsys.readouterr().err


# 7 ---------------------------------------------------------------------------------------------- over-length
def test_row7_overlength_stats_and_never_cut(tmp_path):
    tok = build_tokenizer()
    rows = [json.dumps({"prompt": "p " * n, "completion": "the answer"}) for n in (1, 2, 3, 60)]
    f = _write(tmp_path / "d.jsonl", rows)
    enc, rep = encode_rows(tok, read_rows(f), max_length=40, max_drop_share=1.0)
    assert len(enc) == 3 and rep.dropped[0]["where"] == f"{f}:4"
    assert all(e.input_ids == encode_messages(tok, r.messages)[0] for e, r in zip(enc, read_rows(f)))  # not cut
    s = rep.summary(40)
    assert s["length"]["max"] > 40 and s["length"]["max_length"] == 40


# 8 ---------------------------------------------------------------------------------------------- packing
def test_row8_packing_without_isolating_attention_is_disabled_with_warning(tmp_path):
    r = _recipe(tmp_path, DEMO / "train.jsonl", attn_implementation="some_kernel", packing=True)
    said = []
    with pytest.warns(UserWarning, match="packing/padding_free disabled"):
        assert packing_guard(r, say=said.append) is False
    assert said and r.packing is True  # the decision is returned; the recipe is left as it is
    r = _recipe(tmp_path, DEMO / "train.jsonl", attn_implementation="sdpa", packing=True)
    assert packing_guard(r) is True and r.packing is True
    # padding_free is the fast path's own key (adapters/training/speed.py): TRL's per-batch flattening, not packing
    r = _recipe(tmp_path, DEMO / "train.jsonl", attn_implementation="sdpa", padding_free=True)
    assert packing_guard(r) is False and r.padding_free is True and "padding_free" not in r.training
    r = _recipe(tmp_path, DEMO / "train.jsonl", packing=True, packing_strategy="wrapped")
    with pytest.raises(DataError, match="wrapped"):
        packing_guard(r)
