"""adapters.utils: the one staged-write helper, hashing, the memory sampler, dtype names; the one isolating-attention
rule that the data pipeline and the fast path share."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch

from adapters.utils import atomic
from adapters.utils.atomic import fresh_staging, promote, staged_dir, staging_path, write_json
from adapters.utils.dtypes import dtype_bytes, torch_dtype
from adapters.utils.hashing import chat_template_sha256, file_sha256, fingerprint
from adapters.utils.memory import PeakRSS

from .conftest import DEMO, tiny_overrides


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------- atomic
def test_staged_dir_replaces_the_target_only_when_complete(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with staged_dir(target) as tmp:
        assert tmp == staging_path(target) and tmp.parent == target.parent
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("new")
        assert _tree(target) == {"old.txt": "old"}  # the old target is untouched until the rename
    assert _tree(target) == {"sub/a.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or .old left


def test_staged_dir_keeps_the_target_when_the_write_fails(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), staged_dir(target) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert _tree(target) == {"old.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_a_killed_write_are_removed_or_ignored(tmp_path):
    target = tmp_path / "out"
    leftover = staging_path(target)
    leftover.mkdir()
    (leftover / "partial.bin").write_text("x")
    (tmp_path / ".out.old").mkdir()  # killed between moving the old target aside and the rename
    staging = fresh_staging(target)
    assert staging == leftover and list(staging.iterdir()) == []
    (staging / "done.txt").write_text("ok")
    promote(staging, target)
    assert _tree(target) == {"done.txt": "ok"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    private = fresh_staging(target, unique=True)  # several processes building one target: private names
    assert private != fresh_staging(target, unique=True) and private.name.startswith(".out.")


def test_promote_fsyncs_every_file_and_directory_then_the_parent(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    staging = fresh_staging(tmp_path / "out")
    (staging / "d").mkdir()
    (staging / "d" / "f.bin").write_bytes(b"1")
    (staging / "g.bin").write_bytes(b"2")
    promote(staging, tmp_path / "out")
    assert set(synced[:-1]) == {str(staging / p) for p in ("d/f.bin", "g.bin", "d")} | {str(staging)}
    assert synced.index(str(staging / "d")) > synced.index(str(staging / "d" / "f.bin"))  # files before their dir
    assert synced[-1] == str(tmp_path)  # the rename itself, made durable


def test_write_json_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "r.json"
    write_json(path, {"a": 1, "p": Path("/x")})
    assert path.read_text() == '{\n  "a": 1,\n  "p": "/x"\n}\n'

    def broken(obj, **kw):
        raise TypeError("not serialisable")

    monkeypatch.setattr(atomic.json, "dumps", broken)
    with pytest.raises(TypeError):
        write_json(path, {"b": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1, "p": "/x"}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_provenance_still_exports_write_json():
    from adapters.utils import provenance

    assert provenance.write_json is write_json


# ---------------------------------------------------------------------------------------------------- hashing
def test_hashes(tmp_path):
    f = tmp_path / "d" / "a.jsonl"
    f.parent.mkdir()
    f.write_bytes(b"x" * (3 << 20) + b"tail")  # more than one read block
    assert file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest() == fingerprint(f)
    d1 = fingerprint(f.parent)
    (f.parent / "b.jsonl").write_text("b")
    assert fingerprint(f.parent) != d1 and len(d1) == 64

    class Tok:
        chat_template = None

    assert chat_template_sha256(Tok()) == hashlib.sha256(b"").hexdigest()
    Tok.chat_template = "{{ messages }}"
    assert chat_template_sha256(Tok()) == hashlib.sha256(b"{{ messages }}").hexdigest()


# ---------------------------------------------------------------------------------------------------- memory
def test_peak_rss_sees_a_block_held_only_inside_it():
    with PeakRSS(free_first=True) as mem:
        block = b"\x01" * (64 << 20)
        time.sleep(0.1)  # the sampler thread polls every 5 ms
        del block
    assert mem.peak - mem.start >= 48 << 20
    s = mem.summary(model_mb=64.0)
    assert s["peak_rise_mb"] >= 48 and s["peak_rss_mb"] >= s["start_rss_mb"] > 0
    assert s["peak_rss_mb"] >= s["peak_anon_mb"] and s["peak_rise_over_model"] == pytest.approx(
        s["peak_rise_mb"] / 64.0, abs=0.01
    )


# ---------------------------------------------------------------------------------------------------- dtypes
def test_dtype_names():
    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype(None) == torch_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        torch_dtype("fp8")
    assert [dtype_bytes(n) for n in ("float32", "bfloat16", "float16", "auto", None)] == [4, 2, 2, 4, 4]


# ---------------------------------------------------------------------------------------------------- attention
def test_one_isolating_attention_rule_for_packing_and_padding_free(tmp_path, monkeypatch):
    """flex_attention keeps samples apart only on CUDA (no backward on CPU): the data pipeline's packing guard and
    the fast path's padding_free decision both follow training.speed.isolates_samples."""
    from adapters.config import load_recipe
    from adapters.data.pipeline import packing_guard
    from adapters.training import speed

    assert speed.isolates_samples("sdpa", cuda=False) and speed.isolates_samples("flex_attention", cuda=True)
    assert not speed.isolates_samples("flex_attention", cuda=False) and not speed.isolates_samples(None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = {"train": DEMO / "train.jsonl", "val": None, "test": None}
    for attn, ok in (("flex_attention", False), ("eager", True)):
        over = tiny_overrides(tmp_path / "m", data, tmp_path / "out", attn_implementation=attn, packing=True)
        over.update(eval_file=None, test_file=None)
        recipe = load_recipe("gemma3-270m-demo", over)[0]
        if ok:
            assert packing_guard(recipe, say=lambda *_: None) is True
        else:
            with pytest.warns(UserWarning, match="flex_attention only on CUDA"):
                assert packing_guard(recipe, say=lambda *_: None) is False
        padding_free = speed.plan({}, attn_implementation=attn, per_device_batch=8, padding=0.5).padding_free
        assert padding_free is ok
