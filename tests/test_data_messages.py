"""Issue #13 item 7 / RELIABILITY.md row 28: empty files, wrong JSON types, duplicate keys, a UTF-8 BOM and
invisible answers, each reported as ``file:line[:col]: field: message`` (or accepted, for the BOM)."""

from __future__ import annotations

import json

import pytest

from adapters.cli import main
from adapters.config import load_recipe
from adapters.data.pipeline import prepare_data
from adapters.data.rows import DataError
from adapters.data.validate import check, read_rows

from .conftest import build_tokenizer, tiny_overrides

BOM = b"\xef\xbb\xbf"
PC = json.dumps({"prompt": "p", "completion": "c"})
CHAT = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def _lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _problems(*paths, **kw):
    return [str(p) for p in check(list(paths), **kw).problems]


def _recipe(tmp_path, train, **extra):
    over = tiny_overrides(tmp_path / "m", {"train": train, "val": None, "test": None}, tmp_path / "out", **extra)
    over.update(eval_file=None, test_file=None)
    return load_recipe("gemma3-270m-demo", over)[0]


# ------------------------------------------------------------------------------------------------ empty sources
def _empty_parquet(path):
    import datasets

    datasets.Dataset.from_dict({"prompt": [], "completion": []}).to_parquet(str(path))


EMPTY = {
    "zero.jsonl": b"",
    "blank.jsonl": b"\n  \n\r\n",
    "bom.jsonl": BOM + b"\n",
    "zero.json": b"",
    "array.json": b"[ ]\n",
    "bom-array.json": BOM + b"[]",
    "zero.csv": b"",
    "header.csv": b"prompt,completion\n",
    "header-blank.csv": b"prompt,completion\n\n\n",
    "bom-header.csv": BOM + b"prompt,completion\r\n",
}


@pytest.mark.parametrize("name", sorted(EMPTY) + ["rows.parquet"])
def test_empty_source_is_a_problem(tmp_path, name, capsys):
    f = tmp_path / name
    if name.endswith(".parquet"):
        _empty_parquet(f)
    else:
        f.write_bytes(EMPTY[name])
    assert _problems(f) == [f"{f}: no rows"]
    assert main(["data", "check", str(f)]) == 1
    assert capsys.readouterr().out.splitlines() == [f"{f}: no rows"]
    # a source with no rows is not a row to set aside: --skip-invalid still fails
    assert main(["data", "check", str(f), "--skip-invalid", "--quarantine", str(tmp_path / "q.jsonl")]) == 1
    with pytest.raises(DataError, match=f"^{f}: no rows$"):
        read_rows(f)


def test_empty_file_in_a_directory_is_named(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    _lines(d / "a.jsonl", [PC])
    (d / "b.jsonl").write_bytes(b"")
    assert _problems(d) == [f"{d / 'b.jsonl'}: no rows"]
    _lines(d / "c.jsonl", ["{oops"])
    assert main(["data", "check", str(d), "--skip-invalid", "--quarantine", str(tmp_path / "q.jsonl")]) == 1


def test_empty_train_file_stops_the_run_before_the_audit(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_bytes(b"")
    tok = build_tokenizer()
    for skip in (False, True):
        with pytest.raises(DataError, match=f"^{f}: no rows$"):
            prepare_data(_recipe(tmp_path, f, skip_invalid=skip), tok, tmp_path / "run", say=lambda s: None)


def test_every_row_invalid_with_skip_invalid_names_the_file(tmp_path):
    f = _lines(tmp_path / "d.jsonl", ["{oops", '{"prompt": "p"}'])
    with pytest.raises(DataError, match=f"^{f}: no valid rows \\(2 invalid row\\(s\\) quarantined to .*q.jsonl\\)$"):
        prepare_data(
            _recipe(tmp_path, f, skip_invalid=True, quarantine_file=str(tmp_path / "q.jsonl")),
            build_tokenizer(),
            tmp_path / "run",
            say=lambda s: None,
        )


def test_empty_train_file_cli_train_and_audit(tmp_path, tiny_models, tiny_data, capsys):
    f = tmp_path / "empty.jsonl"
    f.write_bytes(b"\n")
    common = ["--model_name_or_path", str(tiny_models["gemma3"]), "--train_file", str(f)]
    common += ["--eval_file", str(tiny_data["val"]), "--output_root", str(tmp_path / "out")]
    assert main(["data", "audit", "gemma3-270m-demo", "--out", str(tmp_path / "audit"), *common]) == 2
    assert capsys.readouterr().err.strip() == f"adapters data: error: {f}: no rows"
    assert main(["train", "gemma3-270m-demo", "--max_steps", "2", "--dtype", "float32", *common]) == 2
    assert capsys.readouterr().err.strip().endswith(f"adapters train: error: {f}: no rows")


# ------------------------------------------------------------------------------------------------ JSON types
WRONG = [(4, "number"), (3.5, "number"), (True, "boolean"), (False, "boolean"), (None, "null"), ({}, "object")]


@pytest.mark.parametrize(("value", "name"), WRONG)
def test_wrong_type_is_named_with_json_type_names(tmp_path, value, name):
    rows = [
        {"prompt": "p", "completion": value},
        {"prompt": value, "completion": "c"},
        {"instruction": value, "output": "o"},
        {"instruction": "i", "input": value, "output": "o"},
        {"instruction": "i", "output": value},
        {"messages": [{"role": "user", "content": value}, CHAT[1]]},
        {"messages": [CHAT[0], {"role": value, "content": "a"}]},
        {"conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "a"}]},
        {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": value}]},
    ]
    f = _lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    want = [
        f"{f}:1: completion: expected a string, got {name}",
        f"{f}:2: prompt: expected a string, got {name}",
        f"{f}:3: instruction: expected a string, got {name}",
        f"{f}:4: input: expected a string, got {name}",
        f"{f}:5: output: expected a string, got {name}",
        f"{f}:6: messages[0].content: expected a string, got {name}",
        f"{f}:7: messages[1].role: expected a string, got {name}",
        f"{f}:8: conversations[0].content: expected a string, got {name}",
        f"{f}:9: completion[0].content: expected a string, got {name}",
    ]
    if value is None:  # alpaca's input is optional: null means no input
        want.remove(f"{f}:4: input: expected a string, got null")
    assert _problems(f) == want
    t = _lines(tmp_path / "t.jsonl", [json.dumps({"text": value})])
    assert _problems(t, data_format="text") == [f"{t}:1: text: expected a string, got {name}"]


def test_array_value_and_non_object_rows_use_json_type_names(tmp_path):
    f = _lines(tmp_path / "d.jsonl", [json.dumps({"instruction": "i", "output": ["o"]}), "[1, 2]", '"row"', "7"])
    assert _problems(f) == [
        f"{f}:1: output: expected a string, got array",
        f"{f}:2: expected a JSON object, got array",
        f"{f}:3: expected a JSON object, got string",
        f"{f}:4: expected a JSON object, got number",
    ]


def test_absent_and_empty_keep_their_wording(tmp_path):
    f = _lines(
        tmp_path / "d.jsonl",
        [
            '{"prompt": "p"}',
            '{"prompt": "p", "completion": ""}',
            '{"messages": [{"content": "q"}, {"role": "assistant"}]}',
            '{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}',
        ],
    )
    assert _problems(f) == [
        f"{f}:1: completion: missing or empty",
        f"{f}:2: completion: missing or empty",
        f"{f}:3: messages[0].role: missing",
        f"{f}:3: messages[1].content: missing or empty",
        f"{f}:4: messages[0].content: missing or empty",
    ]


def test_csv_cells_are_text_and_parquet_types_are_named(tmp_path):
    import datasets

    c = tmp_path / "d.csv"
    c.write_text('prompt,completion\n2+2,4\nhalf of 7,3.5\nis it,true\nanswer?,None\nq,NA\nq,""\n', encoding="utf-8")
    assert _problems(c) == [f"{c}:7: completion: missing or empty"]
    c.write_text("prompt,completion\n2+2,4\n", encoding="utf-8")
    assert [r.messages[1]["content"] for r in read_rows(c)] == ["4"]
    p = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"prompt": ["a", "b"], "completion": [4, None]}).to_parquet(str(p))
    assert _problems(p) == [
        f"{p}:1: completion: expected a string, got number",
        f"{p}:2: completion: expected a string, got null",
    ]


# ------------------------------------------------------------------------------------------------ duplicate keys
def test_duplicate_keys_jsonl_top_level_and_nested(tmp_path):
    f = _lines(
        tmp_path / "d.jsonl",
        [
            PC,
            '{"prompt": "p", "completion": "first", "completion": "second"}',
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "content": "b"}]}',
            '{"prompt": "p", "prompt": "q", "completion": "c", "completion": "d"}',
        ],
    )
    assert _problems(f) == [
        f'{f}:2: duplicate key "completion"',
        f'{f}:3: messages[1]: duplicate key "content"',
        f'{f}:4: duplicate key "prompt"',
        f'{f}:4: duplicate key "completion"',
    ]
    q = tmp_path / "q.jsonl"
    res = check([f], quarantine=q)
    assert res.valid == 1 and res.bad_rows == 3
    assert [json.loads(x)["where"] for x in q.read_text().splitlines()] == [f"{f}:2", f"{f}:3", f"{f}:4"]


def test_duplicate_keys_json_array_top_level_and_nested(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(
        "[\n"
        f"  {PC},\n"
        '  {"prompt": "p",\n   "completion": "a", "completion": "b"},\n'
        '  {"messages": [{"role": "user", "role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
        "]\n",
        encoding="utf-8",
    )
    assert _problems(f) == [f'{f}:3: duplicate key "completion"', f'{f}:5: messages[0]: duplicate key "role"']


def test_duplicate_keys_in_csv_turns_and_columns(tmp_path):
    c = tmp_path / "d.csv"
    turns = (
        '[{""role"": ""user"", ""content"": ""q"", ""content"": ""r""}, {""role"": ""assistant"", ""content"": ""a""}]'
    )
    c.write_text(f'messages\n"{turns}"\n', encoding="utf-8")
    assert _problems(c) == [f'{c}:2: messages[0]: duplicate key "content"']
    c.write_text("prompt,completion,completion\np,a,b\n", encoding="utf-8")
    assert _problems(c) == [f'{c}:1: duplicate column "completion"']


# ------------------------------------------------------------------------------------------------ UTF-8 BOM
def test_bom_accepted_in_jsonl_json_and_csv(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_bytes(BOM + (PC + "\n" + PC + "\n").encode())
    a = tmp_path / "d.json"
    a.write_bytes(BOM + f"[{PC},\n {PC}]\n".encode())
    jl = tmp_path / "lines.json"
    jl.write_bytes(BOM + f"{PC}\n".encode())
    c = tmp_path / "d.csv"
    c.write_bytes(BOM + b"prompt,completion\r\np,c\r\n")
    for f, wheres in ((j, [1, 2]), (a, [1, 2]), (jl, [1]), (c, [2])):
        assert _problems(f) == []
        rows = read_rows(f)
        assert [r.where for r in rows] == [f"{f}:{n}" for n in wheres]
        assert rows[0].messages == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]


def test_bom_keeps_later_lines_columns_and_byte_offsets(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(BOM + b'{"prompt": "a" "completion": "b"}\n' + b'{"prompt": "caf\xe9", "completion": "b"}\n{"x"\n')
    assert _problems(f) == [
        f"{f}:1:16: invalid JSON: Expecting ',' delimiter",
        f"{f}:2: invalid UTF-8 at byte offset {3 + 34 + 15} (byte 0xe9 at column 16)",
        f"{f}:3:5: invalid JSON: Expecting ':' delimiter",
    ]
    first = BOM + b'{"prompt": "caf\xe9", "completion": "b"}\n'
    for suffix in (".jsonl", ".json"):
        g = tmp_path / f"e{suffix}"
        g.write_bytes(first)
        assert _problems(g) == [f"{g}:1: invalid UTF-8 at byte offset {3 + 15} (byte 0xe9 at column 16)"]
    a = tmp_path / "d.json"
    a.write_bytes(BOM + b'[{"prompt": "a", "completion": "b"},\n {"prompt": "a" "completion": "b"}]\n')
    assert _problems(a) == [f"{a}:2:17: invalid JSON: Expecting ',' delimiter"]


# ------------------------------------------------------------------------------------------------ invisible text
INVISIBLE = ["\u200b", "\u200b \ufeff", "\u00a0", "\u2060\u200d", "\u3164"]


@pytest.mark.parametrize("blank", INVISIBLE)
def test_invisible_answers_and_prompts_are_empty(tmp_path, blank):
    rows = [
        {"prompt": "p", "completion": blank},
        {"prompt": blank, "completion": "c"},
        {"instruction": "i", "output": blank},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": blank}]},
        {"messages": [{"role": "system", "content": blank}, *CHAT]},
    ]
    f = _lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    got = _problems(f)
    fields = ["completion", "prompt", "output", "messages[1].content", "messages[0].content"]
    assert [g.split(": ")[0:2] for g in got] == [[f"{f}:{i + 1}", k] for i, k in enumerate(fields)]
    plain = not blank.strip()  # Python already strips it: the existing wording
    for g in got:
        msg = g.split(": ", 2)[2]
        assert msg == "missing or empty" if plain else msg.startswith("empty: only invisible characters (U+")
    t = _lines(tmp_path / "t.jsonl", [json.dumps({"text": blank})])
    assert len(_problems(t, data_format="text")) == 1
    # an input made only of invisible characters is no input
    a = _lines(tmp_path / "a.jsonl", [json.dumps({"instruction": "i", "input": blank, "output": "o"})])
    assert read_rows(a)[0].messages[0]["content"] == "i"


def test_invisible_message_names_the_characters(tmp_path):
    f = _lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "p", "completion": "\u200b \ufeff"})])
    assert _problems(f) == [f"{f}:1: completion: empty: only invisible characters (U+200B, U+FEFF)"]
