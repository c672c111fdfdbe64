"""Round trips: every input kind and every format reads back to the same conversations, with row locations."""

from __future__ import annotations

import json

import pytest

from adapters.data.encode import encode_rows
from adapters.data.rows import DataError
from adapters.data.validate import check, read_rows
from adapters.utils.hashing import fingerprint

from .conftest import build_tokenizer

PAIRS = [
    ("Catalogue line for: name=Ada Lovelace; born=1815", "Lovelace, Ada (1815)"),
    ("Catalogue line for: name=Alan Turing; born=1912", "Turing, Alan (1912)"),
    ("Catalogue line for: name=Grace Hopper; born=1906", "Hopper, Grace (1906)"),
]
CONVS = [[{"role": "user", "content": p}, {"role": "assistant", "content": c}] for p, c in PAIRS]


def _records(fmt: str) -> list[dict]:
    if fmt == "chat":
        return [{"messages": c} for c in CONVS]
    if fmt == "prompt_completion":
        return [{"prompt": p, "completion": c} for p, c in PAIRS]
    if fmt == "alpaca":
        return [{"instruction": p.split(": ", 1)[0], "input": p.split(": ", 1)[1], "output": c} for p, c in PAIRS]
    raise ValueError(fmt)


def _expected(fmt: str) -> list[list[dict]]:
    if fmt == "alpaca":
        return [
            [{"role": "user", "content": p.replace(": ", "\n\n", 1)}, {"role": "assistant", "content": c}]
            for p, c in PAIRS
        ]
    return CONVS


def _write(kind: str, path, records: list[dict]):
    import datasets

    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "json":
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    else:
        # nested turns are stored as JSON text in CSV; Parquet/Arrow keep them as lists
        flat = [
            {k: json.dumps(v) if isinstance(v, list) and kind == "csv" else v for k, v in r.items()} for r in records
        ]
        ds = datasets.Dataset.from_list(flat)
        if kind == "csv":
            ds.to_csv(str(path), index=False)
        elif kind == "parquet":
            ds.to_parquet(str(path))
        else:
            ds.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["chat", "prompt_completion", "alpaca"])
@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "disk"])
def test_round_trip(tmp_path, kind, fmt):
    path = _write(kind, tmp_path / (f"d.{kind}" if kind != "disk" else "saved"), _records(fmt))
    rows = read_rows(path)
    assert [r.messages for r in rows] == _expected(fmt)
    first = {"jsonl": 1, "json": 2, "csv": 2, "parquet": 1, "disk": 1}[kind]  # json: the array opens on line 1
    assert [r.line for r in rows] == [first, first + 1, first + 2]
    assert read_rows(path, data_format=fmt)[0].messages == _expected(fmt)[0]


def test_directory_of_mixed_files(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    _write("jsonl", d / "a.jsonl", _records("chat"))
    _write("csv", d / "b.csv", _records("prompt_completion"))
    rows = read_rows(d)
    assert [r.where for r in rows] == [
        f"{d}/a.jsonl:1",
        f"{d}/a.jsonl:2",
        f"{d}/a.jsonl:3",
        f"{d}/b.csv:2",
        f"{d}/b.csv:3",
        f"{d}/b.csv:4",
    ]
    assert len(fingerprint(d)) == 64 and fingerprint(d) != fingerprint(d / "a.jsonl")


def test_column_mapping_and_errors_name_the_users_column(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "q1", "answer": "a1"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    cols = {"prompt": "question", "completion": "answer"}
    res = check([f], columns=cols)
    assert [str(p) for p in res.problems] == [f"{f}:2: answer: missing or empty"]
    f.write_text(json.dumps({"question": "q1", "answer": "a1"}) + "\n")
    assert read_rows(f, columns=cols)[0].messages == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
    ]


def test_plain_text_only_when_asked_and_trains_every_token(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "Hello world. The quick brown fox."}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: messages: missing .*data_format: text"):
        read_rows(f)
    rows = read_rows(f, data_format="text")
    tok = build_tokenizer()
    enc, rep = encode_rows(tok, rows, max_length=64)
    ids, labels = enc[0].input_ids, enc[0].labels
    assert ids[0] == tok.bos_token_id and labels[0] == -100
    assert labels[1:] == ids[1:] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[1:-1]) == "Hello world. The quick brown fox."


def test_trl_conversational_prompt_completion(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": [CONVS[0][0]], "completion": [CONVS[0][1]]}) + "\n")
    assert read_rows(f)[0].messages == CONVS[0]


def test_json_array_error_has_line_and_col(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a" "completion": "b"}\n]\n')
    assert [str(p) for p in check([f]).problems] == [f"{f}:3:18: invalid JSON: Expecting ',' delimiter"]
