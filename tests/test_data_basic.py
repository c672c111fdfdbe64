"""Data reading and label building: locations in errors, EOS supervised, assistant-only loss."""

from __future__ import annotations

import pytest

from adapters.data.encode import encode_messages, encode_rows
from adapters.data.rows import IGNORE_INDEX, DataError
from adapters.data.validate import read_rows

from .conftest import build_tokenizer

CONV = [
    {"role": "user", "content": "Catalogue line for: name=Ada Lovelace; born=1815; city=London"},
    {"role": "assistant", "content": "Lovelace, Ada (London, 1815)"},
]


def test_malformed_json_has_file_line_col(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": }\n')
    with pytest.raises(DataError, match=r"d.jsonl:2:31: invalid JSON"):
        read_rows(f)


def test_non_utf8_has_byte_offset(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid UTF-8 at byte offset 47 \(byte 0xff at column 13\)"):
        read_rows(f)


@pytest.mark.parametrize(
    "row,field",
    [
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]}',
            r"messages\[1\].role",
        ),
        (
            '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}',
            r"messages\[0\].content",
        ),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "alternate"),
        ('{"messages": [{"role": "user", "content": "a"}]}', "no assistant turn"),
        ('{"prompt": "a"}', "completion: missing"),
        ('{"text": "a"}', "messages: missing"),
    ],
)
def test_bad_rows_name_file_line_field(tmp_path, row, field):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "ok", "completion": "ok"}\n' + row + "\n")
    with pytest.raises(DataError, match=rf"d.jsonl:2: .*{field}"):
        read_rows(f)


def test_aliases_are_normalised(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}\n')
    assert read_rows(f)[0].messages == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_labels_cover_answer_and_end_of_turn_only(pad_is_eos):
    tok = build_tokenizer(pad_is_eos=pad_is_eos)
    ids, labels = encode_messages(tok, CONV)
    trained = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    text = tok.decode(trained)
    assert text.startswith("Lovelace, Ada (London, 1815)"), text
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert eot in trained, "the end-of-turn token that stops generation must be supervised"
    assert "Catalogue" not in text and "user" not in text
    if pad_is_eos:
        assert tok.pad_token_id == tok.eos_token_id


def test_multi_turn_trains_every_assistant_turn():
    tok = build_tokenizer()
    conv = CONV + [
        {"role": "user", "content": "And for Alan Turing?"},
        {"role": "assistant", "content": "Turing, Alan"},
    ]
    ids, labels = encode_messages(tok, conv)
    text = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert "Lovelace, Ada" in text and "Turing, Alan" in text and "And for" not in text


def test_overlong_rows_are_dropped_and_reported(tmp_path):
    tok = build_tokenizer()
    f = tmp_path / "d.jsonl"
    long = {"prompt": "word " * 200, "completion": "x"}
    import json

    f.write_text("\n".join(json.dumps(r) for r in [{"prompt": "a", "completion": "b"}] * 3 + [long]) + "\n")
    enc, rep = encode_rows(tok, read_rows(f), max_length=64)
    assert len(enc) == 3 and rep.dropped[0]["where"].endswith("d.jsonl:4")
    with pytest.raises(DataError, match="rows would be dropped"):
        encode_rows(tok, read_rows(f), max_length=4)
