"""Data at scale: the encoded-data cache (hit, miss, invalidation, never a partial one), the num_proc path, the
filled-in chat template against the real one, streaming validation and dataset sources. Small data only."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from adapters.config import load_recipe
from adapters.data import cache
from adapters.data.encode import encode_rows, render
from adapters.data.fill import TemplateFill, guarded_strings
from adapters.data.pipeline import prepare_data
from adapters.data.rows import DataError
from adapters.data.validate import check, read_rows, scan

from .conftest import build_tokenizer


def _recipe(tmp_path: Path, train: Path, **over):
    base = {"output_root": str(tmp_path / "out"), "train_file": str(train), "eval_file": None, "test_file": None}
    return load_recipe("gemma3-270m-demo", {**base, "max_length": 128, **over})[0]


def _prepare(recipe, tok=None):
    said: list[str] = []
    enc, ev, _, rep = prepare_data(recipe, tok or build_tokenizer(), None, say=said.append)
    return enc, rep, said


def _ids(enc) -> list[tuple[list[int], list[int]]]:
    return [(e.input_ids, e.labels) for e in enc]


def test_cache_hit_then_invalidated_by_file_key_and_template(tmp_path, tiny_data):
    train = tmp_path / "train.jsonl"
    shutil.copy(tiny_data["train"], train)
    r = _recipe(tmp_path, train)
    first, rep1, _ = _prepare(r)
    again, rep2, said = _prepare(r)
    assert (rep1["encoding"]["cache_hit"], rep2["encoding"]["cache_hit"]) == (False, True)
    assert any("encoded cache hit" in s for s in said)
    assert _ids(again) == _ids(first) and rep2["audit"] == rep1["audit"]

    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines[:-1]) + "\n")  # one row fewer: another file hash
    changed, rep3, _ = _prepare(r)
    assert rep3["encoding"]["cache_hit"] is False and len(changed) == len(first) - 1

    rep4 = _prepare(_recipe(tmp_path, train, max_length=100))[1]  # a key that changes encoding
    assert rep4["encoding"]["cache_hit"] is False and rep4["encoding"]["key"] != rep3["encoding"]["key"]

    tok = build_tokenizer()
    tok.chat_template = tok.chat_template.replace("<start_of_turn>", "<start_of_turn> ")
    rep5 = _prepare(r, tok)[1]
    assert rep5["encoding"]["cache_hit"] is False and rep5["encoding"]["key"] != rep3["encoding"]["key"]
    assert _prepare(r)[1]["encoding"]["cache_hit"] is True  # the unchanged recipe still finds its own


def test_a_process_that_must_not_write_leaves_no_cache(tmp_path, tiny_data):
    r = _recipe(tmp_path, tiny_data["train"])
    enc, _, _, rep = prepare_data(r, build_tokenizer(), None, say=lambda s: None, write=False)
    assert len(enc) == 32 and rep["encoding"]["cache_hit"] is False
    assert not (tmp_path / "out").exists()  # rank > 0 of a distributed run writes nothing under the outputs
    assert _prepare(r)[1]["encoding"]["cache_hit"] is False  # the main process builds it


def test_a_partial_cache_is_never_loaded(tmp_path, tiny_data, monkeypatch):
    r = _recipe(tmp_path, tiny_data["train"])
    folder = cache.cache_dir(r, cache.cache_key(r, build_tokenizer())["key"])
    folder.mkdir(parents=True)
    (folder / "train.arrow").write_bytes(b"half a file")  # a build killed before report.json was written
    enc, rep, _ = _prepare(r)
    assert rep["encoding"]["cache_hit"] is False and len(enc) == 32

    import adapters.data.pipeline as pipeline

    def killed(*a, **k):
        raise KeyboardInterrupt

    r2 = _recipe(tmp_path, tiny_data["train"], max_length=120)
    monkeypatch.setattr(pipeline, "figures", killed)  # dies after the encoding wrote its Arrow file
    with pytest.raises(KeyboardInterrupt):
        _prepare(r2)
    root = folder.parent
    key2 = cache.cache_key(r2, build_tokenizer())["key"]
    assert not (root / key2).exists() and not [p for p in root.iterdir() if key2 in p.name]  # staging removed


def test_num_proc_2_encodes_like_num_proc_1_and_like_encode_rows(tmp_path, tiny_data):
    one = _prepare(_recipe(tmp_path / "a", tiny_data["train"], dataset_num_proc=1))
    two = _prepare(_recipe(tmp_path / "b", tiny_data["train"], dataset_num_proc=2))
    assert one[1]["encoding"]["num_proc"] == 1 and two[1]["encoding"]["num_proc"] == 2
    assert _ids(one[0]) == _ids(two[0]) and one[1]["audit"] == two[1]["audit"]
    listed, _ = encode_rows(build_tokenizer(), read_rows(tiny_data["train"]), 128)  # the row-by-row reference
    assert _ids(one[0]) == _ids(listed)


def test_encoded_set_goes_to_the_trainer_as_arrow(tmp_path, tiny_data):
    from adapters.data.encode import to_dataset

    enc = _prepare(_recipe(tmp_path, tiny_data["train"]))[0]
    ds = to_dataset(enc)
    assert ds.column_names == ["input_ids", "labels"] and len(ds) == len(enc) == 32
    assert ds[3]["input_ids"] == enc[3].input_ids and enc[:2][1].labels == enc[1].labels


def test_fill_equals_the_template_and_falls_back_where_content_could_steer_it(tiny_data):
    tok = build_tokenizer()
    fill = TemplateFill(tok)
    rows = read_rows(tiny_data["train"])
    for r in rows:
        for k in range(1, len(r.messages) + 1):
            for agp in (False, True):
                assert fill.render(r.messages[:k], agp) == render(tok, r.messages[:k], agp)
    # gemma.jinja trims content: surrounding whitespace goes through the real template (which trims it)
    padded = [{"role": "user", "content": "  hi \n"}, {"role": "assistant", "content": " yo"}]
    assert fill.render(padded) == render(tok, padded) and "\n  hi" not in fill.render(padded)
    with_system = [{"role": "system", "content": "be brief"}, *padded]
    assert fill.render(with_system) == render(tok, with_system)


def test_fill_refuses_templates_that_look_at_the_content():
    tok = build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if '</think>' in m['content'] %}{{ m['content'].split('</think>')[-1] }}"
        "{% else %}{{ m['role'] + ': ' + m['content'] }}{% endif %}\n{% endfor %}"
    )
    fill = TemplateFill(tok)
    assert "</think>" in guarded_strings(tok.chat_template)
    msgs = [{"role": "user", "content": "a</think>b"}, {"role": "assistant", "content": "c"}]
    assert fill.render(msgs) == render(tok, msgs) == "bassistant: c"  # (trim_blocks eats the newlines)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    upper = TemplateFill(tok)
    assert upper.render(msgs) == render(tok, msgs) and upper._shapes[(("user", "assistant"), False)] is None
    # the runtime sample check: a mismatch switches the fill off
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    odd = TemplateFill(tok)
    odd._shapes[(("user", "assistant"), False)] = ["", "!", "?", ""]  # a wrong fill
    assert odd.check(msgs) is False and odd.render(msgs) == render(tok, msgs)


def test_streaming_check_keeps_no_rows_and_finds_the_same_problems(tmp_path, tiny_data):
    f = tmp_path / "mixed.jsonl"
    good = tiny_data["train"].read_text().splitlines()[:5]
    f.write_text("\n".join([good[0], "{oops", good[1], '{"prompt": "", "completion": 3}', *good[2:]]) + "\n")
    kept = scan(f)
    streamed = scan(f, keep_rows=False)
    assert streamed.rows == [] and streamed.valid == len(kept.rows) == 5
    assert [str(p) for p in streamed.problems] == [str(p) for p in kept.problems]
    res = check([f])
    assert [str(p) for p in res.problems] == [str(p) for p in kept.problems] and res.rows_by_source == {}
    assert [str(p).split(": ")[0] for p in res.problems] == [f"{f}:2:2", f"{f}:4", f"{f}:4"]


def test_dataset_folder_through_load_dataset(tmp_path, tiny_data):
    folder = tmp_path / "my-dataset"
    (folder / "data").mkdir(parents=True)
    shutil.copy(tiny_data["train"], folder / "data" / "train.jsonl")
    shutil.copy(tiny_data["val"], folder / "data" / "validation.jsonl")
    rows = scan(folder, split="validation").rows
    assert len(rows) == 8 and rows[0].where == f"{folder}[validation]:1"
    enc, rep, _ = _prepare(_recipe(tmp_path, folder, data_split="train"))
    assert len(enc) == 32 and rep["validation"]["valid"] == 32
    bad = folder / "data" / "train.jsonl"
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]
    bad.write_text(bad.read_text() + json.dumps({"messages": turns}) + "\n")
    with pytest.raises(DataError, match=r"my-dataset\[train\]:33: messages\[1\].content: missing or empty"):
        _prepare(_recipe(tmp_path, folder, data_split="train"))


def test_unknown_hub_dataset_is_one_located_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"^nobody/no-such-set: cannot load this dataset \(split 'train'\)"):
        scan("nobody/no-such-set")


def test_bench_data_writes_its_json(tmp_path, tiny_models):
    from adapters.bench.data import bench_data

    out = bench_data(40, out=tmp_path, max_length=1024, model=str(tiny_models["gemma3"]), say=lambda s: None)
    saved = json.loads((tmp_path / "data.json").read_text())
    assert saved == out and saved["n"] == 40
    assert set(saved["ours"]) >= {"rows_per_s", "peak_rss_mb", "cached_rerun_s"}
    assert set(saved["trl"]) >= {"rows_per_s", "peak_rss_mb"}
    assert saved["ours"]["kept"] == saved["trl"]["kept"] == 40 and saved["ours"]["cached_hit"] is True


def test_row_number_steps_give_what_the_list_steps_give(tmp_path, tiny_data):
    import random

    import numpy as np

    from adapters.data import clean, table

    rows = read_rows(tiny_data["train"])
    rows += [rows[0], clean.Row(rows[1].file, 99, [dict(m, content=m["content"].upper()) for m in rows[1].messages])]
    rows += [clean.Row("x.jsonl", 7, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "..."}])]
    w = table.RowWriter(tmp_path / "rows.arrow")
    for r in rows:
        w.add(r)
    t = table.Table([w.close()], ["src"])
    ids = np.arange(len(rows))
    r = _recipe(tmp_path, tiny_data["train"], max_answer_chars=60)
    kept_rows, steps = clean.clean_rows(rows, True, 1, 60, None)
    kept_ids, id_steps = table.clean_ids(t, ids, r)
    assert id_steps == steps and [rows[i].where for i in kept_ids] == [x.where for x in kept_rows]
    tr, va = clean.split_rows(kept_rows, 0.25, 3)
    tr_ids, va_rows = table.split_ids(t, kept_ids, 0.25, 3)
    assert [rows[i].where for i in tr_ids] == [x.where for x in tr] and va_rows == va
    a, b = random.Random(5), random.Random(5)
    assert [rows[i].where for i in clean.weighted(list(tr_ids), 1.5, a)] == [
        x.where for x in clean.weighted(tr, 1.5, b)
    ]
    tpls = ["Q: {prompt}", "{prompt}?"]
    t_ids, t_no = table.template_ids(t, tr_ids, tpls)
    made = [table.with_template(rows[i], tpls[k]) if k >= 0 else rows[i] for i, k in zip(t_ids, t_no)]
    assert made == clean.apply_templates(tr, tpls)


def test_default_num_proc():
    from adapters.data.arrow import PARALLEL_MIN_ROWS, default_num_proc

    assert default_num_proc(10, 3) == 3
    assert default_num_proc(PARALLEL_MIN_ROWS - 1, None) == 1
    cores = len(os.sched_getaffinity(0))
    assert default_num_proc(PARALLEL_MIN_ROWS, None) == cores


def test_ranks_on_one_machine_share_its_cores(monkeypatch):
    from adapters.data import parallel
    from adapters.data.arrow import PARALLEL_MIN_ROWS, default_num_proc

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert parallel.cores() == 8 and default_num_proc(PARALLEL_MIN_ROWS, None) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # set by torchrun / accelerate launch for each rank
    assert parallel.cores() == 2 and default_num_proc(PARALLEL_MIN_ROWS, None) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert parallel.cores() == 1


def _messy_jsonl(tmp_path: Path, tiny_data) -> Path:
    """Good rows with bad ones (invalid JSON, a duplicate key, a wrong type), aliases, blank lines and a BOM."""
    good = tiny_data["train"].read_text().splitlines()
    bad = ['{"prompt": "a" "completion": "b"}', '{"prompt": "p", "completion": 4}', '{"prompt": "p", "prompt": "q"}']
    alias = json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    lines = []
    for i, row in enumerate(good * 3):
        lines.append(row)
        if i % 7 == 3:
            lines += [bad[i % 3], "", alias]
    f = tmp_path / "messy.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())
    return f


@pytest.mark.parametrize("parts", [2, 3, 5])
def test_parallel_read_finds_what_one_process_finds(tmp_path, tiny_data, monkeypatch, parts):
    from adapters.data import parallel

    f = _messy_jsonl(tmp_path, tiny_data)
    one = check([f], quarantine=tmp_path / "q1.jsonl")
    cuts = parallel.split_lines(f, parts)
    assert len(cuts) == parts and cuts[0][:1] == (0,) and cuts[-1][1] == f.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))  # contiguous, cut after a newline
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(parallel, "cores", lambda: parts)
    many = check([f], quarantine=tmp_path / "q2.jsonl")
    assert [str(p) for p in many.problems] == [str(p) for p in one.problems] and len(one.problems) >= 6
    assert (many.rows, many.valid, many.bad_rows) == (one.rows, one.valid, one.bad_rows)
    assert (tmp_path / "q2.jsonl").read_text() == (tmp_path / "q1.jsonl").read_text()


def test_parallel_read_writes_the_rows_in_file_order(tmp_path, tiny_data, monkeypatch):
    from adapters.data import parallel

    f = _messy_jsonl(tmp_path, tiny_data)
    r = _recipe(tmp_path, f, skip_invalid=True, dedup=False, output_root=str(tmp_path / "one"))
    one, rep1, _ = _prepare(r)
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(parallel, "cores", lambda: 3)
    r = _recipe(tmp_path, f, skip_invalid=True, dedup=False, output_root=str(tmp_path / "three"))
    three, rep3, _ = _prepare(r)
    assert [e.where for e in three] == [e.where for e in one] and _ids(three) == _ids(one)
    assert rep3["validation"]["invalid"] == rep1["validation"]["invalid"] > 0


def test_a_dead_reading_process_stops_the_read(tmp_path, tiny_data, monkeypatch):
    from adapters.data import parallel

    f = _messy_jsonl(tmp_path, tiny_data)
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(parallel, "_child", lambda *a: os._exit(3))  # killed, as by the OOM killer
    with pytest.raises(DataError, match=r"messy.jsonl: the process reading bytes \d+-\d+ .*died \(exit code 3\)"):
        check([f])


def test_answers_are_tokenized_in_pieces_where_that_equals_the_whole():
    from adapters.data.encode import _ids, encode_messages, joins_cleanly

    tok = build_tokenizer()
    assert joins_cleanly(tok)
    conv = [{"role": "user", "content": "Who wrote it?"}, {"role": "assistant", "content": "Ada, 1843."}]
    ids, labels = encode_messages(tok, conv)
    assert ids == _ids(tok, render(tok, conv))  # here the pieces join to the whole rendering's ids
    prompt = _ids(tok, render(tok, conv[:1], True))
    assert ids[: len(prompt)] == prompt and set(labels[: len(prompt)]) == {-100}
    assert labels[len(prompt) :] == ids[len(prompt) :]


def test_a_tokenizer_that_does_not_join_pieces_keeps_whole_string_tokenization():
    from tokenizers import normalizers

    from adapters.data.encode import _ids, encode_messages, joins_cleanly

    tok = build_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Prepend("@")  # like SentencePiece's dummy prefix
    assert not joins_cleanly(tok)
    conv = [{"role": "user", "content": "Who wrote it?"}, {"role": "assistant", "content": "Ada, 1843."}]
    ids, _ = encode_messages(tok, conv)
    assert ids == _ids(tok, render(tok, conv))


def test_num_proc_2_over_a_selection_with_rows_removed(tmp_path, tiny_data):
    """The map reads the sources' file through the row numbers cleaning left (duplicates and bad rows gone)."""
    f = _messy_jsonl(tmp_path, tiny_data)
    one = _prepare(_recipe(tmp_path / "a", f, skip_invalid=True, dataset_num_proc=1))
    two = _prepare(_recipe(tmp_path / "b", f, skip_invalid=True, dataset_num_proc=2))
    removed = {s["step"]: s["removed"] for s in two[1]["cleaning"]}
    assert removed["exact_duplicates"] > 0 and len(two[0]) < two[1]["validation"]["valid"]
    assert [e.where for e in two[0]] == [e.where for e in one[0]] and _ids(two[0]) == _ids(one[0])
    texts = [tuple(e.input_ids) for e in two[0]]
    assert len(set(texts)) == len(texts)  # no duplicate left
