"""``streaming: true``: train_file as an IterableDataset, validated and encoded on the fly; the audit of its head;
the refusals; a run on a tiny model. Small data, tiny in-process tokenizers and models only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adapters.config import load_recipe
from adapters.data.audit import AuditError
from adapters.data.pipeline import prepare_data
from adapters.data.rows import DataError
from adapters.data.streaming import prepare_stream

from .conftest import build_tokenizer, tiny_overrides
from .test_eval_training import one_thread  # noqa: F401 - the module's autouse fixture: one torch thread


def _recipe(tmp_path: Path, train, **over):
    base = {"output_root": str(tmp_path / "out"), "train_file": str(train), "eval_file": None, "test_file": None}
    return load_recipe("gemma3-270m-demo", {**base, "max_length": 128, "streaming": True, **over})[0]


def _stream(recipe, run_dir=None, tok=None):
    said: list[str] = []
    out = prepare_stream(recipe, tok or build_tokenizer(), run_dir, say=said.append)
    return (*out, said)


def _pairs(ds) -> list[tuple[list[int], list[int]]]:
    return [(list(r["input_ids"]), list(r["labels"])) for r in ds]


def _bad_row() -> str:
    return json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}) + "\n"


def test_stream_encodes_like_the_arrow_path(tmp_path, tiny_data):
    tok = build_tokenizer()
    train, _, _, report, said = _stream(_recipe(tmp_path, tiny_data["train"], streaming_audit_rows=10), tok=tok)
    assert not (tmp_path / "out" / ".cache").exists()  # no encoded cache (the Arrow path below builds one)
    whole = prepare_data(_recipe(tmp_path, tiny_data["train"], streaming=False), tok, None, say=lambda s: None)[0]
    assert _pairs(train.dataset) == [(e.input_ids, e.labels) for e in whole]
    assert len(_pairs(train.dataset)) == 32
    assert report["streaming"] is True and report["encoding"]["cache"] is None
    assert report["cleaning"].startswith("not applied in streaming mode")
    assert report["audit"]["audited_rows"] == 10 and report["train"]["rows"] == 10
    assert train.stream.counts()["rows_read"] == 32 and train.stream.counts()["kept"] == 32
    assert any("later rows are validated as they stream" in s for s in said)


def test_invalid_row_raises_with_file_line_as_it_streams(tmp_path, tiny_data):
    train = tmp_path / "train.jsonl"
    train.write_text(tiny_data["train"].read_text() + _bad_row())
    stream = _stream(_recipe(tmp_path, train, streaming_audit_rows=5))[0]  # the head is clean: the audit passes
    with pytest.raises(DataError, match=rf"^{train}:33: messages\[1\]\.content: missing or empty; fix it"):
        list(stream.dataset)
    with pytest.raises(DataError, match=rf"{train}:33: messages\[1\]\.content"):  # in the head: before the model
        _stream(_recipe(tmp_path, train, streaming_audit_rows=100))


def test_skip_invalid_quarantines_once_as_it_goes(tmp_path, tiny_data):
    train = tmp_path / "train.jsonl"
    lines = tiny_data["train"].read_text().splitlines(keepends=True)
    train.write_text(lines[0] + _bad_row() + "".join(lines[1:]) + _bad_row())
    run = tmp_path / "run"
    run.mkdir()
    stream = _stream(_recipe(tmp_path, train, skip_invalid=True, streaming_audit_rows=4), run)[0]
    assert len(_pairs(stream.dataset)) == 32 and len(_pairs(stream.dataset)) == 32  # two passes, as two epochs
    q = [json.loads(line) for line in (run / "quarantine.jsonl").read_text().splitlines()]
    assert [r["where"] for r in q] == [f"{train}:2", f"{train}:34"]  # each once, though read three times
    c = stream.stream.counts()
    assert (c["invalid"], c["rows_read"], c["kept"], c["passes"]) == (2, 34, 32, 2)


@pytest.mark.parametrize(
    "key, value",
    [
        ("val_split", 0.1),
        ("data_mix", {"x.jsonl": 1.0}),
        ("augment_prompt_templates", ["Q: {prompt}"]),
        ("general_data_file", "x.jsonl"),
        ("max_steps", -1),
    ],
)
def test_refusals_name_the_key(tmp_path, tiny_data, key, value):
    with pytest.raises(DataError, match=rf"^{key}: ") as e:
        _stream(_recipe(tmp_path, tiny_data["train"], **{key: value}))
    assert "\n" not in str(e.value)


def test_audit_report_and_thresholds_on_the_head(tmp_path, tiny_data):
    run = tmp_path / "run"
    run.mkdir()
    _stream(_recipe(tmp_path, tiny_data["train"], streaming_audit_rows=8), run)
    audit = json.loads((run / "data_audit.json").read_text())
    assert audit["streaming"] is True and audit["audited_rows"] == 8 and audit["train"]["rows"] == 8
    assert "are not audited" in audit["not_audited"] and audit["problems"] == []
    with pytest.raises(AuditError, match="streamed head"):  # every row is over max_length: all dropped
        _stream(_recipe(tmp_path, tiny_data["train"], streaming_audit_rows=8, max_length=8), run)
    dropped = json.loads((run / "data_audit.json").read_text())["train"]
    assert dropped["dropped"] == 8 and dropped["rows"] == 8


def test_cli_data_audit_streaming(tmp_path, tiny_data, tiny_models, capsys):
    from adapters.cli import main

    out = tmp_path / "audit"
    argv = ["data", "audit", "gemma3-270m-demo", "--out", str(out), "--streaming", "true"]
    argv += ["--model_name_or_path", str(tiny_models["llama"]), "--train_file", str(tiny_data["train"])]
    argv += ["--eval_file", str(tiny_data["val"]), "--test_file", "null", "--streaming_audit_rows", "16"]
    assert main(argv) == 0
    audit = json.loads((out / "data_audit.json").read_text())
    assert audit["streaming"] is True and audit["audited_rows"] == 16 and audit["eval"]["rows"] == 8


def test_hub_style_dataset_folder_streams(tmp_path, tiny_data):
    folder = tmp_path / "my-dataset"
    (folder / "data").mkdir(parents=True)
    shutil.copy(tiny_data["train"], folder / "data" / "train.jsonl")
    bad = folder / "data" / "train.jsonl"
    bad.write_text(bad.read_text() + _bad_row())
    stream = _stream(_recipe(tmp_path, folder, data_split="train", streaming_audit_rows=4))[0]
    with pytest.raises(DataError, match=r"my-dataset\[train\]:33: messages\[1\]\.content: missing or empty"):
        list(stream.dataset)


def test_streaming_run_trains_for_max_steps(tiny_models, tiny_data, tmp_path):
    from adapters.training.run import train

    ov = tiny_overrides(tiny_models["llama"], tiny_data, tmp_path, run_name="s", max_steps=10, streaming=True)
    ov.update(eval_after_train=False, quant_probe=False, streaming_audit_rows=8)
    run = train(*load_recipe("gemma3-270m-demo", ov))
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "complete" and m["train"]["global_step"] == 10
    assert m["data"]["streaming"] is True and m["data"]["audit"]["audited_rows"] == 8
    # 10 steps x 4 rows = 40 > 32: the stream was read a second time, its rows counted once
    s = m["data"]["stream"]
    assert s["passes"] >= 2 and s["rows_read"] == 32 and s["kept"] == 32  # TRL also opens it once for a peek
    assert any("eval_loss" in e for e in m["log_history"])  # eval_file still read whole and evaluated
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_two_processes_read_different_rows(tiny_models, tiny_data, tmp_path):
    """A world of 2 on gloo (accelerate launch --multi_gpu on CPU): each rank reads the stream and keeps its own
    batches (dispatch_batches off, trainer.py); together the ranks train on the 32 rows once."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.test_dist import _cli_args, free_port, trace_env

    ov = tiny_overrides(tiny_models["llama"], tiny_data, tmp_path / "out", run_name="s2", max_steps=4, streaming=True)
    ov.update(eval_after_train=False, quant_probe=False, eval_strategy="no", save_steps=100, test_file="null")
    ov.update(per_device_train_batch_size=4, streaming_audit_rows=8)
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port()), str(REPO / "tests" / "_dist_entry.py")]
    cmd = [*launch, "train", "gemma3-270m-demo", *_cli_args(ov)]
    env = trace_env(tmp_path)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    traces = {r: json.loads((tmp_path / "trace" / f"rank{r}.json").read_text()) for r in (0, 1)}
    t0, t1 = traces[0]["samples"], traces[1]["samples"]
    assert len(t0) == len(t1) == 4 * 4  # 4 steps x micro-batch 4 on each rank
    assert not set(t0) & set(t1), "the two ranks trained on the same rows"
    assert len(set(t0) | set(t1)) == 32
    m = json.loads((tmp_path / "out" / "s2" / "manifest.json").read_text())
    assert m["status"] == "complete" and m["world_size"] == 2 and m["data"]["streaming"] is True
    assert os.path.isfile(tmp_path / "out" / "s2" / "adapter" / "adapter_model.safetensors")


def test_streaming_turns_batch_dispatch_off(tmp_path, tiny_data):
    """On a GPU accelerate's default for an IterableDataset has rank 0 read and torch.cat every rank's batch, which
    fails on batches padded to different lengths (TRL's DPOTrainer turns it off for the same reason)."""
    from adapters.training.trainer import _streaming_kwargs

    on = _streaming_kwargs(_recipe(tmp_path, tiny_data["train"], accelerator_config={"split_batches": False}))
    assert on == {"accelerator_config": {"split_batches": False, "dispatch_batches": False}}
    assert _streaming_kwargs(_recipe(tmp_path, tiny_data["train"], streaming=False)) == {}


def test_packed_stream_keeps_every_token(tmp_path, tiny_data):
    train = _stream(_recipe(tmp_path, tiny_data["train"]))[0]
    rows = _pairs(train.dataset)
    packed = list(train.trainer_dataset(pack_length=128))
    assert len(packed) < len(rows) and all(len(p["input_ids"]) <= 128 for p in packed)
    tokens = sum(len(ids) for ids, _ in rows)
    assert sum(len(p["input_ids"]) for p in packed) == tokens == sum(sum(p["seq_lengths"]) for p in packed)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_csv_and_parquet_stream_through_the_builders(tmp_path, tiny_data, suffix):
    import datasets

    objs = [json.loads(line) for line in tiny_data["train"].read_text().splitlines()]
    qa = [{"prompt": o["messages"][0]["content"], "completion": o["messages"][1]["content"]} for o in objs]
    path = tmp_path / f"train{suffix}"
    ds = datasets.Dataset.from_list(qa + [{"prompt": "q", "completion": " "}])  # the last row is invalid
    ds.to_csv(str(path), index=False) if suffix == ".csv" else ds.to_parquet(str(path))
    tok = build_tokenizer()
    train = _stream(_recipe(tmp_path, path, streaming_audit_rows=4, skip_invalid=True), tok=tok)[0]
    whole = prepare_data(_recipe(tmp_path, path, streaming=False, skip_invalid=True), tok, None, say=lambda s: 0)[0]
    assert _pairs(train.dataset) == [(e.input_ids, e.labels) for e in whole] and len(whole) == 32
    line = 34 if suffix == ".csv" else 33  # CSV: the header is line 1
    with pytest.raises(DataError, match=rf"^{path}:{line}: completion: missing or empty"):
        list(_stream(_recipe(tmp_path, path, streaming_audit_rows=4), tok=tok)[0].dataset)
