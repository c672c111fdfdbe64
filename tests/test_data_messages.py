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












# ------------------------------------------------------------------------------------------------ JSON types
WRONG = [(4, "number"), (3.5, "number"), (True, "boolean"), (False, "boolean"), (None, "null"), ({}, "object")]










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




