"""Push and pull against a local fake hub with the real huggingface_hub client (RELIABILITY 20, 21)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from adapters.config import load_recipe
from adapters.publish.hub import HubError, push, resolve_adapter
from adapters.publish.rundir import RunError, load_tuned, open_run
from adapters.training.run import train

from .conftest import build_model_dir, tiny_overrides
from .fake_hub import FakeHub

TOKEN = "hf_FAKEtok3n0nlyForTestsXyZ1234567890abc"
ADAPTER_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "README.md",
    "training_manifest.json",
    "eval.json",
}


@pytest.fixture(scope="module")
def trained(tiny_models, tiny_data, tmp_path_factory):
    """One tiny finished run, trained with a fake token in the environment (it must end up nowhere)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", TOKEN)
        out = tmp_path_factory.mktemp("hub_runs")
        recipe, path = load_recipe(
            "gemma3-270m-demo",
            tiny_overrides(
                tiny_models["llama"],
                tiny_data,
                out,
                run_name="tiny",
                max_steps=4,
                save_steps=2,
                eval_steps=2,
                eval_max_new_tokens=4,
            ),
        )
        return train(recipe, path)


@pytest.fixture
def run_dir(trained, tmp_path):
    """A private copy of the run per test, so published.json of one test is not seen by another."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for everything else
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    h = FakeHub(lifetime=120, stall=1.5).start()
    yield h
    h.stop()


def _quiet(msg: str) -> None:
    pass


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_dry_run_lists_files_and_writes_a_valid_card(run_dir):
    from huggingface_hub import ModelCard

    plan = push(run_dir, "me/tiny-lora", dry_run=True, datasets=["me/demo-format"], log=_quiet)
    assert {f["path"] for f in plan["files"]} == ADAPTER_FILES
    for f in plan["files"]:
        assert f["sha256"] == _sha(Path(f["local"])) and f["size"] == Path(f["local"]).stat().st_size
    assert not (run_dir / "published.json").exists()
    assert json.loads((run_dir / "hub" / "dry_run.json").read_text())["files"] == plan["files"]

    canonical = open_run(run_dir).manifest["base_model"]["canonical_name"]
    card = ModelCard.load(run_dir / "hub" / "README.md")
    assert card.data.base_model == canonical and card.data.library_name == "peft"
    assert card.data.pipeline_tag == "text-generation" and card.data.datasets == ["me/demo-format"]
    assert "/" not in canonical or not Path(canonical).is_absolute()
    ev = json.loads((run_dir / "eval.json").read_text())
    assert "| base |" in card.text and "| tuned |" in card.text
    assert f"{ev['tuned']['exact_match']:.6g}" in card.text
    assert "Forgetting probe" in card.text and "merge_report.json` is absent" in card.text
    assert "PeftModel.from_pretrained" in card.text and "merge_and_unload" in card.text
    cfg = json.loads((run_dir / "hub" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == canonical  # never the local cache path


def test_card_carries_eval_merge_report_and_forgetting(run_dir):
    from huggingface_hub import ModelCard

    ev = json.loads((run_dir / "eval.json").read_text())
    ev["base"]["exact_match"], ev["tuned"]["exact_match"] = 0.125, 0.875
    ev["forgetting"] = {"probe_loss": {"base": 2.2, "tuned": 2.4}}
    (run_dir / "eval.json").write_text(json.dumps(ev))
    (run_dir / "merge_report.json").write_text(json.dumps({"max_abs_logit_diff": 1.5e-5, "ok": True}))
    plan = push(run_dir, "me/tiny-lora", dry_run=True, log=_quiet)
    assert "merge_report.json" in {f["path"] for f in plan["files"]}
    card = ModelCard.load(run_dir / "hub" / "README.md")
    assert "probe_loss.tuned | 2.4" in card.text and "max_abs_logit_diff | 1.5e-05" in card.text
    assert "| base | 0.125 | 8 |" in card.text and "| tuned | 0.875 | 8 |" in card.text and "+0.750" in card.text
    assert card.data.eval_results[0].metric_value == 0.875


def test_card_names_the_canonical_base_and_inherits_its_license(run_dir):
    from huggingface_hub import ModelCard

    mf = run_dir / "manifest.json"
    m = json.loads(mf.read_text())
    m["base_model"].update(canonical_name="google/gemma-3-270m", license="gemma")  # as for the embedded default
    mf.write_text(json.dumps(m))
    push(run_dir, "me/tiny-lora", dry_run=True, log=_quiet)
    card = ModelCard.load(run_dir / "hub" / "README.md")
    assert card.data.base_model == "google/gemma-3-270m" and card.data.license == "gemma"
    assert m["base_model"]["path"] not in card.content and str(run_dir.parent) not in card.content  # no local paths
    pub = json.loads((run_dir / "hub" / "training_manifest.json").read_text())
    assert pub["config"]["model_name_or_path"] == "google/gemma-3-270m" and str(run_dir.parent) not in json.dumps(pub)


def test_nan_adapter_is_never_pushed(run_dir):
    from safetensors.torch import load_file, save_file

    from adapters.training.checkpoints import CheckpointError

    f = run_dir / "adapter" / "adapter_model.safetensors"
    t = load_file(str(f))
    next(v for k, v in t.items() if "lora_A" in k)[0, 0] = float("nan")
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match="NaN"):
        push(run_dir, "me/tiny-lora", dry_run=True, log=_quiet)


def test_merged_push_uploads_the_merged_model(run_dir, hub):
    from huggingface_hub import ModelCard

    from adapters.publish.merge import merge_run

    merge_run(run_dir, n_probes=2, log=_quiet)  # the real merge verb: merged/ + merge_report.json
    push(run_dir, "me/tiny-merged", merged=True, endpoint=hub.url, backoff=0.01, log=_quiet)
    remote = set(hub.files("me/tiny-merged"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "merge_report.json"} <= remote
    assert "adapter_model.safetensors" not in remote
    card = ModelCard.load(run_dir / "hub" / "README.md")
    assert card.data.library_name == "transformers" and card.data.base_model_relation == "finetune"
    assert "### Merge report" in card.text and "merge_report.json` is absent" not in card.text


def test_remote_mismatch_writes_no_published_record(run_dir, hub):
    hub.faults["commit"] = ["corrupt"]
    with pytest.raises(HubError, match="do not match"):
        push(run_dir, "me/corrupt", endpoint=hub.url, backoff=0.01, log=_quiet)
    assert not (run_dir / "published.json").exists()


def test_token_appears_in_no_file_under_the_run(run_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push(run_dir, "me/tiny-lora", dry_run=True, log=_quiet)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files) and any(p.name == "trainer_state.json" for p in files)
    assert (run_dir / "hub" / "README.md") in files
    needle = TOKEN.encode()
    leaks = [str(p) for p in files if needle in p.read_bytes()]
    assert leaks == []


def test_push_uploads_the_planned_files_once_and_is_idempotent(run_dir, hub):
    plan = push(run_dir, "me/tiny-lora", dry_run=True, log=_quiet)
    rec = push(run_dir, "me/tiny-lora", endpoint=hub.url, backoff=0.01, log=_quiet)
    remote = hub.files("me/tiny-lora")
    assert set(remote) - {".gitattributes"} == ADAPTER_FILES
    for f in plan["files"]:
        assert remote[f["path"]] == Path(f["local"]).read_bytes(), f["path"]
    assert hub.commits == 1 and rec["verified"] and rec["commit"] == hub.repos["me/tiny-lora"]["branches"]["main"]
    assert f"Bearer {TOKEN}" in hub.auth  # the token came from HF_TOKEN, by header only
    published = json.loads((run_dir / "published.json").read_text())
    assert published["commit"] == rec["commit"] and {f["path"] for f in published["files"]} == ADAPTER_FILES

    again = push(run_dir, "me/tiny-lora", endpoint=hub.url, backoff=0.01, log=_quiet)
    assert hub.commits == 1 and again["commit"] == rec["commit"]  # same files: no new commit
    needle = TOKEN.encode()
    assert not [p for p, d in remote.items() if needle in d]
    assert not [p for p in run_dir.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_push_to_a_branch(run_dir, hub):
    rec = push(run_dir, "me/tiny-lora", revision="exp/1", endpoint=hub.url, backoff=0.01, log=_quiet)
    assert rec["revision"] == "exp/1" and set(hub.files("me/tiny-lora", "exp/1")) - {".gitattributes"} == ADAPTER_FILES
    assert set(hub.files("me/tiny-lora", "main")) == {".gitattributes"}


def test_push_retries_a_500(run_dir, hub):
    hub.faults["commit"] = [500]
    rec = push(run_dir, "me/retry", endpoint=hub.url, backoff=0.01, log=_quiet)
    assert sum(1 for m, p in hub.calls if p.endswith("/commit/main")) == 2
    assert hub.commits == 1 and rec["verified"]


def test_push_timeout_after_commit_retries_as_a_no_op(run_dir, hub):
    hub.faults["commit"] = ["timeout"]  # the commit lands, the answer is lost
    msgs: list[str] = []
    rec = push(run_dir, "me/timeout", endpoint=hub.url, backoff=0.01, timeout=0.5, log=msgs.append)
    assert any("retrying" in m for m in msgs)
    assert hub.commits == 1, "the retry must not commit the same files again"
    assert rec["commit"] == hub.repos["me/timeout"]["branches"]["main"]
    assert json.loads((run_dir / "published.json").read_text())["commit"] == rec["commit"]


def test_push_that_keeps_failing_writes_no_published_record(run_dir, hub):
    before = {p: _sha(p) for p in (run_dir / "adapter").iterdir()}
    hub.faults["commit"] = [503, 503, 503]
    with pytest.raises(HubError, match="after 3 attempts"):
        push(run_dir, "me/down", endpoint=hub.url, attempts=3, backoff=0.01, log=_quiet)
    assert not (run_dir / "published.json").exists()
    assert {p: _sha(p) for p in (run_dir / "adapter").iterdir()} == before
    assert hub.commits == 0


def test_push_without_token_is_refused(run_dir, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(HubError, match="HF_TOKEN"):
        push(run_dir, "me/x", endpoint=hub.url, log=_quiet)


def test_pull_hub_id_loads_like_the_run_and_refuses_a_wrong_base(run_dir, hub, tiny_models, tmp_path, monkeypatch):
    push(run_dir, "me/pull", endpoint=hub.url, backoff=0.01, log=_quiet)
    # the base is named in adapter_config.json by its canonical name ("llama", the tiny model's folder name):
    # resolve it from the folder that holds it
    monkeypatch.chdir(tiny_models["llama"].parent)
    pulled = resolve_adapter("me/pull", endpoint=hub.url)
    assert Path(pulled.ref.path) == tiny_models["llama"].resolve()
    assert (pulled.adapter_dir / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[2, 5, 9, 11, 7]])
    model, _ = load_tuned(pulled, quantize=False)
    local, _ = load_tuned(open_run(run_dir), quantize=False)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, local(input_ids=ids).logits, atol=1e-5)

    other = build_model_dir(tmp_path / "other", "llama", seed=1)  # same shapes, other weights
    wrong = resolve_adapter("me/pull", endpoint=hub.url, base=str(other))
    with pytest.raises(RunError, match="base_fingerprint"):
        load_tuned(wrong, quantize=False)


def test_verify_remote_compares_lfs_files_by_sha256(tmp_path):
    from huggingface_hub.hf_api import RepoFile

    from adapters.publish.hub import Upload, verify_remote

    u = Upload("adapter_model.safetensors", tmp_path / "x", 10, "ab" * 32, "cd" * 20)
    lfs = RepoFile(path=u.path_in_repo, size=10, oid="ee" * 20, lfs={"size": 10, "oid": "ab" * 32, "pointerSize": 130})
    assert verify_remote([lfs], [u]) == {u.path_in_repo: "ee" * 20}
    other = RepoFile(path=u.path_in_repo, size=10, oid="ee" * 20, lfs={"size": 10, "oid": "ff" * 32, "pointerSize": 1})
    with pytest.raises(HubError, match="adapter_model.safetensors: remote size/hash differ"):
        verify_remote([other], [u])
    with pytest.raises(HubError, match="missing"):
        verify_remote([], [u])


def test_resolve_adapter_errors(tmp_path):
    with pytest.raises(HubError, match="neither a run directory"):
        resolve_adapter(tmp_path)
    with pytest.raises(HubError, match="not a hub id"):
        resolve_adapter(str(tmp_path / "missing" / "x" / "y"))


def test_cli_push_dry_run_and_bad_repo_id(run_dir, capsys):
    from adapters.cli import main

    assert main(["push", str(run_dir), "--repo-id", "me/tiny-lora", "--dry-run"]) == 0
    assert "README.md" in capsys.readouterr().out
    assert main(["push", str(run_dir), "--repo-id", "no-slash", "--dry-run"]) == 2
    assert "ORG/NAME" in capsys.readouterr().err


@pytest.mark.slow
def test_default_demo_dry_run_card(tmp_path, tiny_data, monkeypatch):
    """The embedded default (Gemma 3 270M), 3 short steps: its card names google/gemma-3-270m and carries the eval."""
    from huggingface_hub import ModelCard

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    recipe, path = load_recipe(
        "gemma3-270m-demo",
        {
            "output_root": str(tmp_path),
            "run_name": "demo",
            "max_steps": 3,
            "save_steps": 3,
            "eval_steps": 3,
            "per_device_train_batch_size": 4,
            "eval_base": False,
            "quant_probe": False,
            "report_to": "none",
            "eval_file": str(tiny_data["val"]),
            "test_file": str(tiny_data["test"]),
        },
    )
    run = train(recipe, path)
    push(run, "me/gemma-demo-lora", dry_run=True, log=_quiet)
    card = ModelCard.load(run / "hub" / "README.md")
    assert card.data.base_model == "google/gemma-3-270m" and card.data.library_name == "peft"
    assert card.data.license == "gemma" and "| tuned |" in card.text
    assert not [p for p in run.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]


# ---------------------------------------------------------------------------------------------------- hub id in every verb
@pytest.fixture
def pulled_cwd(run_dir, hub, tiny_models, tiny_data, tmp_path, monkeypatch):
    """me/pull on the fake hub; the cwd holds the base under its canonical name and the splits under the names the
    public manifest keeps (file names only), as a user who pulls an adapter would have them."""
    push(run_dir, "me/pull", endpoint=hub.url, backoff=0.01, log=_quiet)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # what HF_ENDPOINT sets at import, for every verb
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    work = tmp_path / "work"
    work.mkdir()
    (work / "llama").symlink_to(tiny_models["llama"])
    for p in tiny_data.values():
        shutil.copy(p, work / p.name)
    monkeypatch.chdir(work)
    return work


def test_every_verb_takes_a_hub_id(pulled_cwd, monkeypatch, capsys):
    import sys

    from adapters.cli import main

    pulled = pulled_cwd / "outputs" / "hub--me--pull"
    assert main(["eval", "me/pull", "--no-base", "--limit", "2"]) == 0
    assert (pulled / "eval.json").is_file() and (pulled / "adapter_model.safetensors").is_file()
    assert not (pulled / "eval.json").is_symlink()
    assert main(["generate", "me/pull", "--prompt", "Format: a b", "--max-new-tokens", "3"]) == 0
    assert main(["merge", "me/pull", "--probes", "2"]) == 0
    assert (pulled / "merged" / "config.json").is_file() and (pulled / "merge_report.json").is_file()
    assert main(["export", "me/pull", "--to", str(pulled_cwd / "peft")]) == 0
    assert (pulled_cwd / "peft" / "adapter_model.safetensors").is_file()
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert main(["export", "me/pull", "--gguf", "--mode", "lora"]) == 0
    assert {"adapter.gguf", "base.gguf", "Modelfile", "export_report.json"} <= {
        p.name for p in (pulled / "gguf").iterdir()
    }
    assert "UNVERIFIED" in capsys.readouterr().out


def _adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _continue(tiny_models, tiny_data, out, **extra):
    recipe, path = load_recipe(
        "gemma3-270m-demo",
        tiny_overrides(tiny_models["llama"], tiny_data, out, max_steps=1, save_steps=1, eval_steps=1, **extra),
    )
    return train(recipe, path)


def test_init_adapter_continues_a_run_and_a_hub_id(trained, pulled_cwd, tiny_models, tiny_data, tmp_path):
    before = _adapter_weights(trained / "adapter")
    for i, source in enumerate((str(trained), "me/pull")):
        run = _continue(tiny_models, tiny_data, tmp_path, run_name=f"c{i}", init_adapter=source, learning_rate=1e-12)
        after = _adapter_weights(run / "adapter")
        assert after.keys() == before.keys()
        for k in before:  # one step at a learning rate of 1e-12: the adapter it started from, not a new LoRA
            torch.testing.assert_close(after[k], before[k], atol=1e-6, rtol=1e-6)
        assert json.loads((run / "manifest.json").read_text())["config"]["init_adapter"] == source
    fresh = _adapter_weights(
        _continue(tiny_models, tiny_data, tmp_path / "f", run_name="f", learning_rate=1e-12) / "adapter"
    )
    assert any(not torch.allclose(fresh[k], before[k]) for k in before)


def test_init_adapter_refuses_another_lora_config_or_base(trained, tiny_models, tiny_data, tmp_path):
    from adapters.model.lora import InitAdapterError

    with pytest.raises(InitAdapterError, match=r"r: adapter \d+, recipe 4"):
        _continue(tiny_models, tiny_data, tmp_path / "a", run_name="a", init_adapter=str(trained), r=4)
    other = build_model_dir(tmp_path / "other", "llama", seed=1)
    recipe, path = load_recipe(
        "gemma3-270m-demo",
        tiny_overrides(other, tiny_data, tmp_path / "b", run_name="b", max_steps=1, init_adapter=str(trained)),
    )
    with pytest.raises(RunError, match="base_fingerprint"):
        train(recipe, path)
