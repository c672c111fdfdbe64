"""Evaluation and training control on tiny random models: report at the end of train, `adapters eval`, generate,
early stopping with best-checkpoint restore, the forgetting probe, and a 3-trial sweep."""

from __future__ import annotations

import io
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from adapters.cli import main
from adapters.config import load_recipe
from adapters.training.run import train

from .conftest import tiny_overrides


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared, loaded CPU one thread was ~20x faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


WORDS = "Riga Ghent Bilbao Selma Isak Kira Olsen Conti 1956 2008 1969 city person born".split()


@pytest.fixture(scope="module")
def finished_run(tiny_models, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    recipe, path = load_recipe(
        "gemma3-270m-demo",
        tiny_overrides(
            tiny_models["llama"], tiny_data, root, run_name="r", forgetting_probe_tokens=256, eval_samples=3
        ),
    )
    return train(recipe, path)


def test_train_ends_with_eval_report(finished_run):
    run = finished_run
    ev = json.loads((run / "eval.json").read_text())
    for side in ("base", "tuned"):
        assert set(ev[side]) >= {"exact_match", "n", "samples"} and ev[side]["n"] == 8
    fg = ev["forgetting"]
    assert set(fg) >= {"probe", "ppl_base", "ppl_tuned", "rise"} and fg["probe"].startswith("python3.")
    assert fg["rise"] == pytest.approx((fg["ppl_tuned"] - fg["ppl_base"]) / fg["ppl_base"], abs=1e-3)
    assert isinstance(ev["flags"], list) and ev["max_new_tokens"] == 8
    for png in ("task_metrics.png", "curves.png"):
        assert (run / png).stat().st_size > 0
    text = (run / "report.md").read_text()
    for part in (
        "## Task metrics",
        "| exact_match |",
        "## Forgetting probe",
        "## Flags",
        "## Sample outputs",
        "| prompt | expected | base | tuned |",
        "![train and validation loss](curves.png)",
    ):
        assert part in text, part
    assert len(ev["sample_rows"]) == 3
    # during training: eval loss, perplexity and token accuracy every eval_steps
    hist = json.loads((run / "manifest.json").read_text())["log_history"]
    evals = [h for h in hist if "eval_loss" in h]
    assert [h["step"] for h in evals] == [3, 6]
    for h in evals:
        assert h["eval_perplexity"] == pytest.approx(math.exp(h["eval_loss"]))
        assert 0.0 <= h["eval_mean_token_accuracy"] <= 1.0


def test_eval_verb_rescoring_and_errors(finished_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    (run / "eval.json").unlink()
    assert main(["eval", str(run), "--no-base", "--limit", "3"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert "base" not in ev and ev["tuned"]["n"] == 3 and ev["forgetting"]["ppl_base"] > 0
    assert (run / "report.md").is_file()
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "manifest.json: missing" in capsys.readouterr().err
    # a run that did not finish is never scored as if it had (and its files stay as they are)
    mf = run / "manifest.json"
    mf.write_text(mf.read_text().replace('"status": "complete"', '"status": "running"'))
    before = (run / "eval.json").read_bytes()
    assert main(["eval", str(run)]) == 2
    assert "status is 'running', not 'complete'" in capsys.readouterr().err
    assert (run / "eval.json").read_bytes() == before


@pytest.mark.parametrize("verb", [["eval"], ["merge"], ["generate", "--prompt", "x"]])
def test_changed_chat_template_is_refused_at_load(finished_run, tmp_path, capsys, verb):
    """RELIABILITY 18: a tokenizer or chat template changed after training is a hash mismatch, not a silent load."""
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    tpl = run / "adapter" / "chat_template.jinja"
    tpl.write_text(tpl.read_text() + "{# edited #}")
    assert main([verb[0], str(run), *verb[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chat template hash" in err[0] and "changed after training" in err[0], err


def test_eval_probe_only_uses_another_text_and_writes_nothing(finished_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    text = tmp_path / "probe.txt"
    text.write_text(
        "The quick brown fox jumps over the lazy dog near the river bank.\n\nA second passage of plain text.\n"
    )
    assert main(["eval", str(run), "--probe", str(text), "--probe-only"]) == 0
    out = capsys.readouterr()
    assert "[forgetting] probe.txt:" in out.out + out.err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert main(["eval", str(run), "--probe", str(tmp_path / "missing.txt"), "--probe-only"]) == 2
    assert "missing.txt: forgetting_probe file not found" in capsys.readouterr().err


def test_generate_prompt_interactive_and_merged_missing(finished_run, capsys):
    from adapters.evaluation.generate import run_generate

    out = io.StringIO()
    one = run_generate(finished_run, prompt="Catalogue line for this record: city: Riga", max_new_tokens=6, stdout=out)
    assert len(one) == 1 and out.getvalue() == one[0] + "\n"
    two = run_generate(
        finished_run,
        max_new_tokens=6,
        stdin=io.StringIO("first prompt\nsecond prompt\n\nignored\n"),
        stdout=io.StringIO(),
    )
    assert len(two) == 2
    base = run_generate(
        finished_run,
        prompt="Catalogue line for this record: city: Riga",
        which="base",
        max_new_tokens=6,
        stdout=io.StringIO(),
    )
    assert isinstance(base[0], str)
    assert main(["generate", str(finished_run), "--merged", "--prompt", "x"]) == 2
    assert "no merged model" in capsys.readouterr().err


def _random_rows(rng: random.Random, n: int) -> str:
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Catalogue line for: " + " ".join(rng.sample(WORDS, 4))},
                {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(6))},
            ]
        }
        for _ in range(n)
    ]
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def test_early_stopping_stops_overfitting_run_and_restores_best(tiny_models, tmp_path):
    """4 training rows of random answers, memorised at a high rate: validation loss turns up, training stops,
    and the saved adapter is the best checkpoint's."""
    from safetensors.torch import load_file

    rng = random.Random(0)
    data = {}
    for split, n in (("train", 4), ("val", 8), ("test", 2)):
        data[split] = tmp_path / f"{split}.jsonl"
        data[split].write_text(_random_rows(rng, n))
    max_steps = 40
    recipe, path = load_recipe(
        "gemma3-270m-demo",
        tiny_overrides(
            tiny_models["llama"],
            data,
            tmp_path,
            run_name="es",
            max_steps=max_steps,
            learning_rate=5e-2,
            lr_scheduler_type="constant",
            eval_steps=1,
            save_steps=1,
            save_total_limit=1,
            early_stopping_patience=2,
            eval_after_train=False,
        ),
    )
    run = train(recipe, path)
    m = json.loads((run / "manifest.json").read_text())
    evals = [(h["step"], h["eval_loss"]) for h in m["log_history"] if "eval_loss" in h]
    best_step = min(evals, key=lambda e: e[1])[0]
    assert m["train"]["global_step"] < max_steps, evals
    assert evals[-1][0] - best_step == 2, evals  # patience 2: two evaluations without improvement
    best = run / "checkpoints" / f"checkpoint-{best_step}"
    assert (best / "COMPLETE.json").is_file()
    saved, best_w = (
        load_file(str(run / "adapter" / "adapter_model.safetensors")),
        load_file(str(best / "adapter_model.safetensors")),
    )
    assert saved.keys() == best_w.keys()
    for k in saved:
        assert torch.equal(saved[k], best_w[k]), k
    last = run / "checkpoints" / f"checkpoint-{evals[-1][0]}"
    if last.exists():  # the last checkpoint differs from the restored best
        assert any(not torch.equal(saved[k], v) for k, v in load_file(str(last / ADAPTER)).items())


ADAPTER = "adapter_model.safetensors"


def _pretrain_on_probe(model_dir: Path, out: Path, steps: int = 100) -> Path:
    """A random tiny model knows no general text; give it some (the default probe) so that it can forget it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.evaluation.forgetting import encode_probe, stdlib_passages

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    chunks = encode_probe(tok, stdlib_passages(), 128, 10**9)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for i in range(steps):
        x = torch.tensor([chunks[i % len(chunks)]])
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_forgetting_probe_rises_after_hard_training_on_unrelated_data(tiny_models, tiny_data, tmp_path):
    from adapters.data.encode import encode_rows, to_dataset
    from adapters.data.validate import read_rows
    from adapters.evaluation.forgetting import probe
    from adapters.model.loading import load_model, load_tokenizer
    from adapters.model.lora import attach_lora
    from adapters.model.sources import resolve_model
    from adapters.training.trainer import build_trainer

    unrelated = tmp_path / "digits.jsonl"
    unrelated.write_text(
        "\n".join(
            json.dumps(
                {
                    "messages": [  # one answer, repeated: nothing like prose
                        {"role": "user", "content": f"{i}"},
                        {"role": "assistant", "content": "2008 " * 20},
                    ]
                }
            )
            for i in range(16)
        )
        + "\n"
    )
    recipe, _ = load_recipe(
        "gemma3-270m-demo",
        tiny_overrides(
            _pretrain_on_probe(tiny_models["qwen2"], tmp_path / "knows-prose"),
            {**tiny_data, "train": unrelated},
            tmp_path,
            max_steps=8,
            learning_rate=5e-2,
            max_grad_norm=10.0,
            lr_scheduler_type="constant",
            eval_strategy="no",
            save_steps=1000,
            forgetting_probe_tokens=512,
            base_kl_weight=0.0,  # no forgetting guard: this test is about the probe seeing the damage
        ),
    )
    ref = resolve_model(recipe.model_name_or_path)
    tok = load_tokenizer(ref, recipe)
    enc, _ = encode_rows(tok, read_rows(recipe.train_file), recipe.max_length)
    model = attach_lora(load_model(ref, recipe), recipe)
    before = probe(model, tok, recipe)
    assert before["rise"] == 0.0  # a fresh LoRA (B = 0) is the identity
    trainer, _ = build_trainer(model, tok, recipe, tmp_path / "run", to_dataset(enc), None)
    trainer.train()
    after = probe(model, tok, recipe)
    assert after["ppl_base"] == pytest.approx(before["ppl_base"], rel=1e-4)  # the base is untouched
    assert after["rise"] > 0.05, after
    from adapters.evaluation.metrics import forgetting_flag

    assert forgetting_flag(after, recipe.forgetting_threshold)["name"] == "forgetting"


def test_pruning_callback_raises_trial_pruned():
    import optuna

    from adapters.training.sweep import pruning_callback

    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    t0 = study.ask()
    t0.report(1.0, 2)
    study.tell(t0, 1.0)

    class S:
        global_step = 2

    pruning_callback(study.ask()).on_evaluate(None, S, None, metrics={"eval_loss": 0.5})  # better: goes on
    with pytest.raises(optuna.TrialPruned):
        pruning_callback(study.ask()).on_evaluate(None, S, None, metrics={"eval_loss": 5.0})


def test_sweep_three_trials_writes_best_recipe(tiny_models, tiny_data, tmp_path):
    from adapters.config import parse_overrides

    out = tmp_path / "sw"
    overrides = tiny_overrides(
        tiny_models["llama"],
        tiny_data,
        tmp_path,
        max_steps=4,
        eval_steps=2,
        save_steps=4,
        sweep={"learning_rate": [1e-3, 1e-2], "r": [4, 8], "lora_alpha": [8, 16], "lora_dropout": [0.0, 0.1]},
    )
    argv = ["sweep", "gemma3-270m-demo", "--trials", "3", "--out", str(out)]
    for k, v in overrides.items():
        argv += [f"--{k}", json.dumps(v) if isinstance(v, dict) else str(v)]
    assert parse_overrides(argv[6:])["sweep"]["r"] == [4, 8]
    assert main(argv) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert len(summary["trials"]) == 3
    lines = (out / "trials.csv").read_text().splitlines()
    assert lines[0].startswith("trial,state,eval_loss,forgetting_rise,feasible,steps,learning_rate,r,lora_alpha")
    assert len(lines) == 4 and (out / "trials.md").is_file() and (out / "search.png").stat().st_size > 0
    best_path = Path(summary["best_recipe"])
    best, _ = load_recipe(best_path)
    for k, v in summary["best_params"].items():
        assert getattr(best, k) == pytest.approx(v), k
    done = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
    # every finished trial was scored on the forgetting probe; the best is the lowest loss among the feasible ones
    assert all(isinstance(t["forgetting_rise"], float) for t in done)
    assert all(t["feasible"] == (t["forgetting_rise"] <= 0.05) for t in done)
    pool = [t for t in done if t["feasible"]] or done
    assert summary["best_eval_loss"] == min(t["eval_loss"] for t in pool)
    assert summary["best_is_feasible"] == any(t["feasible"] for t in done)
    assert best.model_name_or_path == str(tiny_models["llama"]) and best.max_steps == 4


def test_base_perplexity_is_cached_by_its_key(finished_run, tmp_path, monkeypatch):
    """The base's probe perplexity is computed once per key (base file hash, quantization, probe tokens, libraries,
    device) and read back after; another key, a damaged entry or a base without a file hash computes it again."""
    import dataclasses

    from adapters.evaluation import forgetting as F
    from adapters.publish.hub import resolve_adapter
    from adapters.publish.rundir import load_tuned

    run = resolve_adapter(finished_run)
    model, tok = load_tuned(run, quantize=True)
    recipe = dataclasses.replace(run.recipe, output_root=str(tmp_path))
    manifest = {**run.manifest, "base_model": {**run.manifest["base_model"], "sha256": "ab" * 32}}
    calls: list[str] = []
    real = F.perplexity
    monkeypatch.setattr(F, "perplexity", lambda m, c, desc="": calls.append(desc) or real(m, c, desc))
    quiet = {"log": lambda *_: None}
    tuned, base = "forgetting probe (tuned)", "forgetting probe (base)"

    first = F.probe(model, tok, recipe, manifest=manifest, **quiet)
    assert calls == [tuned, base] and first["ppl_base_from"] == "computed"
    assert len(list((tmp_path / ".cache" / "forgetting").glob("*.json"))) == 1
    calls.clear()
    second = F.probe(model, tok, recipe, manifest=manifest, **quiet)
    assert calls == [tuned] and second["ppl_base_from"] == "cache"
    assert (second["ppl_base"], second["rise"]) == (first["ppl_base"], first["rise"])

    other_base = {**manifest, "base_model": {"sha256": "cd" * 32}}
    for m, r in ((other_base, recipe), (manifest, dataclasses.replace(recipe, forgetting_probe_tokens=128))):
        calls.clear()
        assert F.probe(model, tok, r, manifest=m, **quiet)["ppl_base_from"] == "computed" and calls == [tuned, base]

    for entry in (tmp_path / ".cache" / "forgetting").glob("*.json"):
        entry.write_text("{cut short")
    calls.clear()
    again = F.probe(model, tok, recipe, manifest=manifest, **quiet)
    assert calls == [tuned, base] and again["ppl_base"] == first["ppl_base"]

    entries = sorted((tmp_path / ".cache" / "forgetting").glob("*.json"))
    no_hash = {**manifest, "base_model": {"sha256": None}}
    calls.clear()
    assert F.probe(model, tok, recipe, manifest=no_hash, **quiet)["ppl_base_from"] == "computed"
    assert calls == [tuned, base] and sorted((tmp_path / ".cache" / "forgetting").glob("*.json")) == entries
