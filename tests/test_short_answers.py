"""Issue 24: short answers on base models - template raw|chat|auto, the forgetting guard on general text,
classification metrics without a key, the collapse and few_trained_tokens flags."""

from __future__ import annotations

import json
import shutil
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from .conftest import build_tokenizer, tiny_config, tiny_overrides


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory) -> Path:
    """A tiny Gemma 3 whose tokenizer has no chat template of its own (a base model)."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("base") / "gemma3-base"
    torch.manual_seed(0)
    tok = build_tokenizer()
    tok.chat_template = None
    AutoModelForCausalLM.from_config(tiny_config("gemma3", len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    assert not list(path.glob("chat_template*"))
    return path


@pytest.fixture(scope="module")
def pc_data(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """The tiny demo slice as TRL's plain prompt/completion strings."""
    root = tmp_path_factory.mktemp("pc")
    out = {}
    for split, src in tiny_data.items():
        rows = [json.loads(line)["messages"] for line in src.read_text().splitlines()]
        out[split] = root / f"{split}.jsonl"
        out[split].write_text(
            "".join(
                json.dumps({"prompt": m[0]["content"] + "\nAnswer:", "completion": " " + m[1]["content"]}) + "\n"
                for m in rows
            )
        )
    return out


@pytest.fixture(scope="module")
def raw_run(base_model_dir, pc_data, tmp_path_factory) -> Path:
    from adapters.config import load_recipe
    from adapters.training.run import train

    out = tmp_path_factory.mktemp("raw_runs")
    over = tiny_overrides(base_model_dir, pc_data, out, run_name="raw", max_steps=4, save_steps=4, eval_steps=2)
    recipe, path = load_recipe("gemma3-270m-demo", {**over, "eval_max_new_tokens": 6, "base_kl_every": 1})
    assert recipe.template == "auto"
    return train(recipe, path)


# ---------------------------------------------------------------------------------------------------- template
def _resolved(model, data, tmp_path, **kw):
    from adapters.config import load_recipe
    from adapters.model.loading import load_tokenizer, template_of
    from adapters.model.sources import resolve_model

    recipe, _ = load_recipe("gemma3-270m-demo", tiny_overrides(model, data, tmp_path, **kw))
    tok = load_tokenizer(resolve_model(recipe.model_name_or_path), recipe)
    assert template_of(tok) == recipe.template
    return recipe.template, tok


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_auto_template_rule(base_model_dir, tiny_models, tiny_data, pc_data, tmp_path):
    """auto: on a tokenizer without a template, rows of one exchange train raw (plain prompt/completion strings as
    written, rows written as turns with the turns' join); rows of several exchanges, or a tokenizer with its own
    template, chat; an explicit value wins."""
    from adapters.model.loading import builtin_template

    def resolved(model, data, **kw):
        return _resolved(model, data, tmp_path, **kw)

    template, tok = resolved(base_model_dir, pc_data)
    assert template == "raw" and tok.chat_template == builtin_template("raw")  # strings: joined as written
    template, tok = resolved(base_model_dir, tiny_data)  # messages rows, one exchange each
    assert template == "raw" and tok.chat_template == builtin_template("raw-turns")
    alpaca = _write_rows(tmp_path / "alpaca.jsonl", [{"instruction": "Name a city.", "output": "Riga"}])
    assert resolved(base_model_dir, {**pc_data, "train": alpaca})[0] == "raw"
    two = [
        {"role": "user", "content": "Name a city."},
        {"role": "assistant", "content": "Riga"},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Oslo"},
    ]
    one = {"messages": two[:2]}
    multi = _write_rows(tmp_path / "multi.jsonl", [one] * 3 + [{"messages": two}])  # judged on every row read
    assert resolved(base_model_dir, {**pc_data, "train": multi})[0] == "chat"
    conv_pc = _write_rows(tmp_path / "conv_pc.jsonl", [{"prompt": two[:1], "completion": two[1:2]}])
    assert resolved(base_model_dir, {**pc_data, "train": conv_pc})[0] == "raw"
    assert resolved(tiny_models["gemma3"], pc_data)[0] == "chat"  # the tokenizer has a template of its own
    assert resolved(base_model_dir, pc_data, template="chat")[0] == "chat"
    assert resolved(tiny_models["gemma3"], tiny_data, template="raw")[0] == "raw"
    assert resolved(base_model_dir, {**pc_data, "train": multi}, template="raw")[0] == "raw"
    # raw: BOS + prompt + completion + EOS, the completion and EOS trained, nothing else
    from adapters.data.encode import encode_messages

    _, tok = resolved(base_model_dir, pc_data)
    msgs = [{"role": "user", "content": "Region?\nAnswer:"}, {"role": "assistant", "content": " north"}]
    ids, labels = encode_messages(tok, msgs)
    answer = tok(" north", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids[0] == tok.bos_token_id and ids[-len(answer) :] == answer
    assert [x for x in labels if x != -100] == answer and labels[: len(ids) - len(answer)] == [-100] * (
        len(ids) - len(answer)
    )
    assert "<start_of_turn>" not in tok.decode(ids)
    with pytest.raises(Exception, match="template"):
        from adapters.config import load_recipe

        load_recipe("gemma3-270m-demo", tiny_overrides(base_model_dir, pc_data, tmp_path, template="plain"))


def test_turns_trained_raw_read_as_running_text(base_model_dir, tiny_data, pc_data, tmp_path):
    """Rows written as turns, trained raw: after a prompt that ends in a colon the answer is written after a space
    (part of the answer), so a ``messages`` row trains the ids of the same row as prompt/completion strings with the
    space in the completion (what TRL trains); any other prompt ends its line (part of the prompt, in the generation
    prompt too); whitespace already there is kept as it is."""
    from adapters.data.encode import encode_messages, render
    from adapters.data.fill import TemplateFill

    _, strings = _resolved(base_model_dir, pc_data, tmp_path)
    _, turns = _resolved(base_model_dir, tiny_data, tmp_path)
    prompt = "Classify the record by region: north, south or central.\ncity: Leipzig\nAnswer:"
    as_turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "central"}]
    as_strings = [{"role": "user", "content": prompt}, {"role": "assistant", "content": " central"}]
    assert encode_messages(turns, as_turns) == encode_messages(strings, as_strings)
    assert render(turns, as_turns[:1], add_generation_prompt=True) == render(strings, as_strings[:1], True)
    assert render(turns, as_turns).endswith("Answer: central" + turns.eos_token)
    assert render(strings, [as_turns[0], as_turns[1]]).endswith("Answer:central" + turns.eos_token)  # as written
    for spaced in ([as_strings[0], as_strings[1]], [{"role": "user", "content": prompt + "\n"}, as_turns[1]]):
        assert render(turns, spaced) == render(strings, spaced)  # nothing added where whitespace is there
    system = [{"role": "system", "content": "Be brief."}, *as_turns]
    assert render(turns, system).endswith("Be brief.\n\n" + prompt + " central" + turns.eos_token)
    # a prompt that does not end in a colon ends its line, in training and in the generation prompt alike
    record = [
        {"role": "user", "content": "Rewrite as a catalogue entry: born: 1945, name=Farid Zeller, city=Turin"},
        {"role": "assistant", "content": "Zeller, Farid (Turin, 1945)"},
    ]
    assert render(turns, record).endswith("city=Turin\nZeller, Farid (Turin, 1945)" + turns.eos_token)
    assert render(turns, record[:1], add_generation_prompt=True).endswith("city=Turin\n")
    ids, labels = encode_messages(turns, record)
    assert turns.decode([x for x in labels if x != -100]) == "Zeller, Farid (Turin, 1945)" + turns.eos_token
    fill = TemplateFill(turns)  # the data stage's fill without Jinja gives the template's text
    for conv in (as_turns, as_strings, system, record, [{"role": "user", "content": prompt + " "}, as_turns[1]]):
        assert fill.render(conv) == render(turns, conv)


def test_continued_or_resumed_run_keeps_its_template(base_model_dir, raw_run, tiny_data, tmp_path):
    """Under template: auto, a run that continues an adapter (init_adapter) trains with the template saved with it,
    and a resumed run with its own, not what the rule would pick for the rows now; an explicit value still wins."""
    from adapters.config import load_recipe
    from adapters.model.loading import builtin_template
    from adapters.training.run import train

    # raw_run trained plain strings (raw.jinja); these messages rows alone would resolve to raw-turns
    template, tok = _resolved(base_model_dir, tiny_data, tmp_path, init_adapter=str(raw_run))
    assert template == "raw" and tok.chat_template == builtin_template("raw")
    template, tok = _resolved(base_model_dir, tiny_data, tmp_path, init_adapter=str(raw_run), template="chat")
    assert template == "chat"
    # a run started with the chat template, resumed under auto: still chat (the rule would say raw)
    over = tiny_overrides(base_model_dir, tiny_data, tmp_path / "runs", run_name="kept", save_steps=2, eval_steps=2)
    recipe, path = load_recipe("gemma3-270m-demo", {**over, "template": "chat", "max_steps": 2, "base_kl_weight": 0})
    run = train(recipe, path)
    recipe, path = load_recipe("gemma3-270m-demo", {**over, "max_steps": 4, "base_kl_weight": 0})
    train(recipe, path, resume=True)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["template"] == "chat"
    assert manifest["resumes"] and (run / "adapter" / "chat_template.jinja").read_text() == builtin_template("gemma")


def test_raw_run_end_to_end(raw_run, tmp_path, monkeypatch):
    """Trained raw: recorded, scored with raw prompts, merged, exported to GGUF without a chat template and with a
    plain-prompt Modelfile, and verified by llama.cpp's plain completion."""
    from adapters.cli import main

    manifest = json.loads((raw_run / "manifest.json").read_text())
    assert manifest["config"]["template"] == "raw" and manifest["status"] == "complete"
    # base_kl_source: auto, resolved by the audit's trained share (catalogue lines: over 10% trained -> rows)
    assert manifest["data"]["audit"]["train"]["trained_share"] >= 0.10
    assert manifest["config"]["base_kl_source"] == "rows"
    ev = json.loads((raw_run / "eval.json").read_text())
    assert ev["tuned"]["n"] == 8 and "exact_match" in ev["tuned"]
    assert main(["merge", str(raw_run)]) == 0
    merge = json.loads((raw_run / "merge_report.json").read_text())
    assert (raw_run / "merged" / "config.json").is_file() and merge
    # GGUF: no llama_cpp -> unverified, files kept
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert main(["export", str(raw_run), "--gguf", "--to", str(tmp_path / "g")]) == 0
    from gguf import GGUFReader

    fields = GGUFReader(str(tmp_path / "g" / "base.gguf")).fields
    assert "tokenizer.chat_template" not in fields and "tokenizer.ggml.tokens" in fields
    modelfile = (tmp_path / "g" / "Modelfile").read_text()
    assert 'TEMPLATE """{{ .Prompt }}"""' in modelfile and "<start_of_turn>" not in modelfile
    assert json.loads((tmp_path / "g" / "export_report.json").read_text())["modelfile_chat_format"] == "raw"


def test_raw_gguf_verified_with_plain_completion(raw_run, tmp_path, monkeypatch):
    from adapters.cli import main
    from adapters.evaluation.generation import generate_answers
    from adapters.publish.export import _adapter_model, _probes
    from adapters.publish.merge import _budget
    from adapters.publish.rundir import load_run_tokenizer, open_run

    run = open_run(raw_run)
    tok = load_run_tokenizer(run)
    convs, refs, _ = _probes(run, 20)
    hf = generate_answers(_adapter_model(run), tok, convs, _budget(run, tok, refs), 8)
    prompts: list[str] = []

    class Llama:
        def __init__(self, model_path, lora_path=None, **kw):
            from gguf import GGUFReader

            f = GGUFReader(model_path).fields
            self.metadata = (
                {"tokenizer.chat_template": f["tokenizer.chat_template"].contents()}
                if ("tokenizer.chat_template" in f)
                else {}
            )

        def create_completion(self, prompt, **kw):
            prompts.append(prompt)
            return {"choices": [{"text": hf[len(prompts) - 1]}]}

        def create_chat_completion(self, messages, **kw):
            raise AssertionError("a raw run must not be answered through a chat template")

        def tokenize(self, text: bytes, add_bos=False, special=True):
            return tok(text.decode(), add_special_tokens=False)["input_ids"]

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=Llama, __version__="fake"))
    assert main(["export", str(raw_run), "--gguf", "--to", str(tmp_path / "v")]) == 0
    rep = json.loads((tmp_path / "v" / "export_report.json").read_text())
    assert rep["verdict"] == "pass" and rep["verification"]["gguf_chat_template_is_runs"] is True
    assert prompts[0] == convs[0][-1]["content"]  # the plain prompt text: no template, no BOS (llama.cpp adds it)


@pytest.fixture(scope="module")
def turns_runs(base_model_dir, tiny_data, tmp_path_factory) -> dict[str, Path]:
    """The tiny demo's messages rows on the template-less base, trained raw (auto: raw-turns) and with --template chat."""
    from adapters.config import load_recipe
    from adapters.training.run import train

    out = tmp_path_factory.mktemp("turns_runs")
    runs = {}
    for name, extra in (("turns", {}), ("chat", {"template": "chat"})):
        over = tiny_overrides(base_model_dir, tiny_data, out, run_name=name, max_steps=2, save_steps=2, eval_steps=2)
        recipe, path = load_recipe("gemma3-270m-demo", {**over, **extra, "base_kl_weight": 0, "eval_max_new_tokens": 4})
        runs[name] = train(recipe, path)
    return runs


@pytest.mark.parametrize("kind", ["raw", "turns", "chat"])
def test_hub_card_usage_runs_as_written(kind, raw_run, turns_runs, base_model_dir, capsys):
    """The hub card's usage snippet, run as a user copies it (the repo id and base pointed at local folders): it
    loads the adapter, renders the prompt the way the run was trained and generates."""
    import re

    from adapters.publish.card import build_card

    run = raw_run if kind == "raw" else turns_runs[kind]
    manifest = json.loads((run / "manifest.json").read_text())
    card = str(build_card(manifest, run, "org/some-adapter"))
    usage = card[card.index("## Usage") :]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    base = manifest["base_model"]["canonical_name"]
    code = code.replace('"org/some-adapter"', repr(str(run / "adapter"))).replace(
        repr(base).replace("'", '"'), repr(str(base_model_dir))
    )
    exec(compile(code, f"card-{kind}", "exec"), {})
    assert capsys.readouterr().out.strip() is not None
    if kind == "turns":
        assert "ends with a newline" in usage and "apply_chat_template" in code
        from adapters.publish.modelfile import modelfile

        text, fmt = modelfile("model.gguf", None, None, 2048, turns=True)  # no Ollama test of a prompt's last char
        assert fmt == "raw" and "end a prompt with a newline unless it ends in a colon" in text
        assert "newline" not in modelfile("model.gguf", None, None, 2048)[0]
    elif kind == "raw":
        assert "exactly as the training rows wrote it" in usage


def test_changed_template_is_refused(raw_run, tmp_path, capsys):
    """A raw run whose tokenizer renders a chat template (or the reverse) is refused before anything is scored,
    even where the manifest's template hash was made to match."""
    from adapters.cli import main
    from adapters.model.loading import builtin_template
    from adapters.publish.rundir import RunError, load_run_tokenizer, open_run
    from adapters.utils.hashing import chat_template_sha256

    run_dir = tmp_path / "run"
    shutil.copytree(raw_run, run_dir, ignore=shutil.ignore_patterns("merged"))
    (run_dir / "adapter" / "chat_template.jinja").write_text(builtin_template("gemma"))
    assert main(["eval", str(run_dir)]) == 2
    assert "chat template" in capsys.readouterr().err
    run = open_run(run_dir)
    from transformers import AutoTokenizer

    mf = json.loads((run_dir / "manifest.json").read_text())
    mf["chat_template_sha256"] = chat_template_sha256(AutoTokenizer.from_pretrained(str(run_dir / "adapter")))
    (run_dir / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(RunError, match="trained as plain text"):
        load_run_tokenizer(open_run(run_dir))
    del run


# ---------------------------------------------------------------------------------------------------- metrics
class _Fake:
    @contextmanager
    def disable_adapter(self):
        yield


def _fake_eval(tmp_path, monkeypatch, answers, refs, **recipe_keys):
    """evaluate_model on a fake model that answers ``answers`` (base: the references' first word)."""
    import dataclasses

    from adapters.config import load_recipe
    from adapters.evaluation import evaluate as E

    tmp_path.mkdir(parents=True, exist_ok=True)
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"prompt": f"row {i}", "completion": r}) + "\n" for i, r in enumerate(refs)))
    calls = iter([list(refs), list(answers)])  # base answers right, tuned as given
    monkeypatch.setattr(E, "generate_answers", lambda *a, **k: next(calls))
    monkeypatch.setattr(
        E, "probe", lambda *a, **k: {"probe": "p", "tokens": 10, "ppl_base": 2.0, "ppl_tuned": 2.02, "rise": 0.01}
    )
    recipe, _ = load_recipe("gemma3-270m-demo", {"eval_max_new_tokens": 4})
    recipe = dataclasses.replace(recipe, test_file=str(test), **recipe_keys)
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(
        json.dumps({"data": {"audit": {"warnings": [{"name": "few_trained_tokens", "message": "only 5.2% ..."}]}}})
    )
    return E.evaluate_model(_Fake(), None, recipe, run, [], log=lambda *a: None), run


def test_collapsed_run_gets_class_metrics_and_the_flag(tmp_path, monkeypatch):
    refs = ["north", "south", "central"] * 10
    ev, run = _fake_eval(tmp_path, monkeypatch, ["north"] + ["south"] * 29, refs)
    t = ev["tuned"]
    assert ev["labels"] == {"classes": ["central", "north", "south"], "from": "held-out answers"}
    assert t["accuracy"] == pytest.approx(11 / 30, abs=1e-4) and t["exact_match"] == t["accuracy"]
    assert t["per_class"]["south"] == {
        "precision": pytest.approx(10 / 29, abs=1e-4),
        "recall": 1.0,
        "f1": pytest.approx(2 * (10 / 29) / (1 + 10 / 29), abs=1e-4),
        "support": 10,
    }
    assert t["per_class"]["central"]["recall"] == 0.0 and t["confusion"][0] == [0, 0, 10, 0]
    assert t["macro_f1"] == pytest.approx(sum(c["f1"] for c in t["per_class"].values()) / 3, abs=1e-4)
    assert ev["base"]["accuracy"] == 1.0 and ev["base"]["macro_f1"] == 1.0
    flags = {f["name"]: f for f in ev["flags"]}
    assert flags["collapse"]["answer"] == "south" and flags["collapse"]["predicted_share"] == pytest.approx(
        29 / 30, abs=1e-4
    )
    assert "few_trained_tokens" in flags and "negative_transfer" in flags
    saved = json.loads((run / "eval.json").read_text())
    assert {f["name"] for f in saved["flags"]} == set(flags)
    report = (run / "report.md").read_text()
    assert "**collapse**" in report and "**few_trained_tokens**" in report and "Confusion matrix (tuned" in report
    assert "| central | 0 | 0 | 10 | 0 |" in report
    assert (run / "confusion_tuned.png").stat().st_size > 0 and (run / "confusion_base.png").is_file()


def test_no_collapse_flag_when_the_answer_is_the_majority(tmp_path, monkeypatch):
    refs = ["yes"] * 26 + ["no"] * 4  # "yes" predicted for 100% while it is 87% of the references: not a collapse
    ev, _ = _fake_eval(tmp_path, monkeypatch, ["yes"] * 30, refs)
    assert "collapse" not in {f["name"] for f in ev["flags"]}


def test_labels_key_fixes_set_and_order_and_free_text_has_none(tmp_path, monkeypatch):
    refs = ["north", "south", "central"] * 4
    ev, _ = _fake_eval(tmp_path / "a", monkeypatch, refs, refs, labels=["south", "north", "central", "west"])
    assert ev["tuned"]["classes"] == ["south", "north", "central", "west", "<other>"]
    assert ev["labels"]["from"] == "labels key"
    free = [f"answer number {i}" for i in range(21)]
    (tmp_path / "b").mkdir()
    ev, _ = _fake_eval(tmp_path / "b", monkeypatch, free, free)
    assert "accuracy" not in ev["tuned"] and "labels" not in ev


def test_collapse_rule_edges():
    from adapters.evaluation.metrics import answer_classes, collapse

    assert collapse(["A"] * 8 + ["b", "c"], ["a", "b", "c", "d"] * 2 + ["b", "c"])["answer"] == "A"  # case-insensitive
    assert collapse(["a"] * 7 + ["b"] * 3, ["b"] * 10) is None  # 70% < 80%
    assert answer_classes(["x"] * 5) is None and answer_classes([" Yes", "yes ", "no"]) == ["no", "Yes"]
    assert answer_classes([str(i) for i in range(20)]) and answer_classes([str(i) for i in range(21)]) is None


# ---------------------------------------------------------------------------------------------------- audit
def test_audit_warns_about_few_trained_tokens(base_model_dir, pc_data, tmp_path, capsys):
    """One-word answers after long prompts: the audit warns (it is not an error) and says what it means."""
    from adapters.cli import main

    short = tmp_path / "short.jsonl"
    rows = [json.loads(line) for line in pc_data["train"].read_text().splitlines()]
    short.write_text("".join(json.dumps({"prompt": r["prompt"] * 3, "completion": " yes"}) + "\n" for r in rows))
    args = [
        "data",
        "audit",
        "gemma3-270m-demo",
        "--model_name_or_path",
        str(base_model_dir),
        "--train_file",
        str(short),
        "--eval_file",
        "null",
        "--test_file",
        "null",
        "--output_root",
        str(tmp_path / "o"),
        "--load_in_8bit",
        "false",
        "--max_length",
        "512",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[warn] few_trained_tokens: only" in out and "more steps" in out and "forgetting guard" in out
    args[6] = str(pc_data["train"])  # catalogue lines: ~25% of the tokens trained
    assert main(args) == 0
    assert "few_trained_tokens" not in capsys.readouterr().out


def test_few_trained_tokens_threshold():
    from adapters.data.audit import few_trained_tokens

    a = {"kept": 10, "trained_tokens": 30, "tokens": 400, "trained_share": 0.075}
    f = few_trained_tokens(a)
    assert f["name"] == "few_trained_tokens" and f["trained_tokens_per_row"] == 3.0
    assert few_trained_tokens({**a, "trained_share": 0.1}) is None


# ---------------------------------------------------------------------------------------------------- guard
@pytest.mark.parametrize("layout", ["padded", "padding_free"])
def test_general_rows_appended_see_what_a_forward_of_their_own_sees(tiny_models, layout):
    """The guard's general-text windows ride in the training forward as extra samples with no label; the hidden
    states at their positions equal those of the windows run alone, whatever the batch layout."""
    from transformers import AutoModelForCausalLM

    from adapters.training.forgetting_guard import _body, _hidden, append_general

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"])).eval()
    windows = torch.randint(5, 300, (2, 12))
    if layout == "padded":
        ids = torch.randint(5, 300, (3, 9))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        inputs["attention_mask"][2, 6:] = 0
    else:  # what training gets: TRL's padding-free collator, with its varlen bounds (cu_seq_lens_*, seq_idx)
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
        inputs = collate([{"input_ids": torch.randint(5, 300, (n,)).tolist()} for n in (7, 8)])
        assert {"cu_seq_lens_q", "seq_idx"} <= set(inputs)  # the layout that once fell back to the rows' prompts
    new, flat = append_general(inputs, windows, pad_id=0)
    assert flat is not None, "append_general refused the batch: the guard would not hold general text"
    assert flat.numel() == 2 * 11 and bool((new["labels"].reshape(-1)[flat] == -100).all())
    if layout == "padding_free":  # the bounds describe the new samples too
        assert new["cu_seq_lens_q"].tolist() == [0, 7, 15, 27, 39] == new["cu_seq_lens_k"].tolist()
        assert new["max_length_q"] == 12 and new["seq_idx"].tolist() == [[0] * 7 + [1] * 8 + [2] * 12 + [3] * 12]
    body = _body(model)
    with torch.no_grad():
        # no cache, as in training: transformers builds the per-sample mask from position_ids only then
        h = _hidden(body(**{k: v for k, v in new.items() if k != "labels"}, use_cache=False))
        alone = _hidden(body(input_ids=windows, use_cache=False))
    got = h.reshape(-1, h.shape[-1])[flat]
    torch.testing.assert_close(got, alone[:, :11].reshape(-1, h.shape[-1]), atol=1e-4, rtol=1e-4)


def test_general_guard_in_a_forward_of_its_own_equals_the_appended_one(tiny_models):
    """A batch layout append_general does not know runs the windows in a forward of their own: the same KL, at the
    same sampled positions, as the windows riding in the training batch (and never the rows' prompts instead)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapters.training.forgetting_guard import BaseKLMixin, _body, _hidden, append_general, kl_on_general

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"]))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    windows = torch.randint(5, 300, (2, 12))
    ids = torch.randint(5, 300, (2, 9))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    guard = BaseKLMixin()
    guard.base_kl_positions = 4
    new, flat = append_general(inputs, windows, pad_id=0)
    with torch.no_grad():
        h = _hidden(_body(model)(**{k: v for k, v in new.items() if k != "labels"}, use_cache=False))
        appended = kl_on_general(model, windows, h, flat, guard._k(2), torch.Generator().manual_seed(3))
        own = guard._kl_on_own_windows(model, windows, 2, torch.Generator().manual_seed(3))
    assert float(own) > 0
    torch.testing.assert_close(own, appended, atol=1e-5, rtol=1e-4)
    unknown = {**inputs, "token_type_ids": torch.zeros_like(ids)}
    assert append_general(unknown, windows, pad_id=0)[1] is None  # -> the forward of its own, as above


def test_general_text_is_not_the_probe():
    from adapters.evaluation.forgetting import stdlib_passages
    from adapters.training.forgetting_guard import general_passages

    guard, probe = general_passages(), set(stdlib_passages())
    assert len(guard) > 100 and not probe & set(guard)


def test_guard_source_auto_rule():
    """auto: the rows' prompts when at least 10% of the tokens are trained, general text below (short answers);
    an explicit source is kept; the share comes from the audit or, for a stream, the split's summary; a resume
    does not count auto against its resolved value as a change."""
    from adapters.config import load_recipe
    from adapters.training.forgetting_guard import ROWS_MIN_TRAINED_SHARE, resolve_source, trained_share_of
    from adapters.training.lifecycle import resume_changes

    assert ROWS_MIN_TRAINED_SHARE == 0.10
    assert resolve_source("auto", 0.327)[0] == "rows" and "32.7%" in resolve_source("auto", 0.327)[1]
    assert resolve_source("auto", 0.052) == (
        "general",
        "base_kl_source auto -> general (5.2% of the training tokens are trained, < 10%)",
    )
    assert resolve_source("auto", 0.10)[0] == "rows" and resolve_source("auto", None)[0] == "general"
    assert resolve_source("general", 0.9) == ("general", None) and resolve_source("rows", 0.01) == ("rows", None)
    assert resolve_source("my.txt", 0.01) == ("my.txt", None)
    assert trained_share_of({"audit": {"train": {"trained_share": 0.05}}, "train": {"trained_share": 0.5}}) == 0.05
    assert trained_share_of({"train": {"trained_share": 0.5}}) == 0.5 and trained_share_of({}) is None
    recipe, _ = load_recipe("gemma3-270m-demo")
    assert recipe.base_kl_source == "auto"
    assert resume_changes({**recipe.to_dict(), "base_kl_source": "rows"}, recipe) == {}
    with pytest.raises(Exception, match="base_kl_source"):
        resume_changes(
            {**recipe.to_dict(), "base_kl_source": "rows"},
            load_recipe("gemma3-270m-demo", {"base_kl_source": "general"})[0],
        )


def test_sentiment_check_task_is_balanced_disjoint_and_the_same_rows_in_both_forms(tmp_path):
    """scripts/make_sentiment_check.py (the task kept aside from tuning): 135/30 rows a class, no prompt in both
    splits, the messages and prompt/completion files hold the same rows, and a second run writes the same bytes."""
    import subprocess
    from collections import Counter

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_sentiment_check.py"
    for out in ("a", "b"):
        subprocess.run([sys.executable, str(script), "--out", str(tmp_path / out)], check=True, capture_output=True)
    prompts = {}
    for split, per_class in (("train", 135), ("test", 30)):
        msgs = [json.loads(x) for x in (tmp_path / "a" / f"{split}.jsonl").read_text().splitlines()]
        pcs = [json.loads(x) for x in (tmp_path / "a" / f"{split}_pc.jsonl").read_text().splitlines()]
        labels = [m["messages"][1]["content"] for m in msgs]
        assert Counter(labels) == {"positive": per_class, "negative": per_class, "neutral": per_class}
        assert [(m["messages"][0]["content"], " " + a) for m, a in zip(msgs, labels)] == [
            (p["prompt"], p["completion"]) for p in pcs
        ]
        assert all(p["prompt"].endswith("\n\nSentiment:") for p in pcs)
        prompts[split] = {p["prompt"] for p in pcs}
        assert len(prompts[split]) == len(pcs)
        for name in (f"{split}.jsonl", f"{split}_pc.jsonl"):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not prompts["train"] & prompts["test"]
