"""Learning without Forgetting: KL to the base at unlabelled positions (adapters/training/forgetting_guard.py)."""

from __future__ import annotations

import json

import pytest
import torch

from adapters.config import RecipeError, load_recipe
from adapters.training.forgetting_guard import kl_to_base, sample_positions, unlabelled_positions

from .conftest import tiny_overrides
from .test_eval_training import _pretrain_on_probe


def test_unlabelled_positions_padded_and_padding_free():
    labels = torch.tensor([[-100, -100, -100, 7, 8, -100], [-100, -100, 5, 6, -100, -100]])
    am = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    m = unlabelled_positions({"labels": labels, "attention_mask": am})
    # position t counts when token t+1 is real, in the same row, and unlabelled
    assert m.tolist() == [[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    # the same two sequences flattened (padding-free): the position before a new sequence's first token is excluded
    flat = {
        "labels": torch.tensor([[-100, -100, -100, 7, 8, -100, -100, 5, 6]]),
        "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]]),
    }
    assert unlabelled_positions(flat).tolist() == [[1, 1, 0, 0, 0, 1, 0, 0, 0]]
    mask = torch.ones(4, 10, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    assert sample_positions(mask, 3, 4, g).numel() == 12 and sample_positions(mask, 0, 4).numel() == 40
    assert len(set(sample_positions(mask, 3, 4, g).tolist())) == 12


def test_kl_is_zero_for_a_fresh_adapter_and_has_gradients_after(tiny_models, tiny_data, tmp_path):
    from adapters.model.loading import load_model
    from adapters.model.lora import attach_lora
    from adapters.model.sources import resolve_model

    recipe, _ = load_recipe("gemma3-270m-demo", tiny_overrides(tiny_models["gemma3"], tiny_data, tmp_path))
    model = attach_lora(load_model(resolve_model(recipe.model_name_or_path), recipe), recipe)
    model.train()
    ids = torch.randint(3, 90, (2, 12))
    labels = ids.clone()
    labels[:, :8] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    body = model.get_base_model().model
    h = body(input_ids=ids, attention_mask=inputs["attention_mask"]).last_hidden_state
    assert float(kl_to_base(model, inputs, h, 0).detach()) == pytest.approx(0.0, abs=1e-6)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    h = body(input_ids=ids, attention_mask=inputs["attention_mask"]).last_hidden_state
    kl = kl_to_base(model, inputs, h, 0)
    assert kl > 0
    kl.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("where", ["rows", "general"])
def test_lean_kl_equals_the_log_softmax_kl_in_value_and_gradients(where, tiny_models, tiny_data, tmp_path, monkeypatch):
    """The guard's tiled KL (nothing of [N, vocabulary] kept for the backward) against F.kl_div on both
    log-softmaxes, on a tiny Gemma 3 with the tiles forced small (3 rows): same KL, same LoRA gradients (fp32). Both
    sources: the rows' unlabelled positions (kl_to_base) and general-text windows (kl_on_general, the preference
    trainers' guard)."""
    import adapters.training.forgetting_guard as guard
    from adapters.model.loading import load_model
    from adapters.model.lora import attach_lora
    from adapters.model.sources import resolve_model

    recipe, _ = load_recipe("gemma3-270m-demo", tiny_overrides(tiny_models["gemma3"], tiny_data, tmp_path))
    model = attach_lora(load_model(resolve_model(recipe.model_name_or_path), recipe), recipe)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    assert guard._head(model) is not None  # the lean path applies to this model
    vocab = model.get_base_model().get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(guard, "KL_TILE_ELEMENTS", 3 * vocab)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 90, (3, 14), generator=g)
    labels = ids.clone()
    labels[:, :9] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    body = model.get_base_model().model
    results, tiled = [], []
    real_apply = guard._LeanKL.apply
    monkeypatch.setattr(guard._LeanKL, "apply", lambda *a: tiled.append(1) or real_apply(*a))
    for lean in (True, False):
        if not lean:
            assert tiled, "the tiled KL was not used"
            monkeypatch.setattr(guard, "_head", lambda _m: None)
        model.zero_grad()
        h = body(input_ids=ids, attention_mask=inputs["attention_mask"]).last_hidden_state
        if where == "rows":
            kl = kl_to_base(model, inputs, h, 0)
        else:
            flat = (torch.arange(3).unsqueeze(1) * 14 + torch.arange(13)).reshape(-1)
            kl = guard.kl_on_general(model, ids, h, flat, 10, torch.Generator().manual_seed(7))
        (2.5 * kl).backward()
        results.append((kl.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (k_lean, g_lean), (k_ref, g_ref) = results
    assert k_ref > 0 and set(g_lean) == set(g_ref) and g_ref
    torch.testing.assert_close(k_lean, k_ref, rtol=1e-5, atol=1e-7)
    for n in g_ref:
        torch.testing.assert_close(g_lean[n], g_ref[n], rtol=1e-4, atol=1e-7, msg=n)


def test_recipe_checks_base_kl_values(tiny_models, tiny_data, tmp_path):
    with pytest.raises(RecipeError, match="base_kl_weight"):
        load_recipe("gemma3-270m-demo", tiny_overrides(tiny_models["llama"], tiny_data, tmp_path, base_kl_weight=-1))
    with pytest.raises(RecipeError, match="base_kl_every"):
        load_recipe("gemma3-270m-demo", tiny_overrides(tiny_models["llama"], tiny_data, tmp_path, base_kl_every=0))


def test_base_forward_cut_at_the_last_sampled_position_gives_the_same_kl(tiny_models, tiny_data, tmp_path):
    """The base runs only up to the last sampled position (attention is causal): the KL and its gradients are those
    of the full-length base forward, and the base really ran on fewer positions."""
    import adapters.training.forgetting_guard as guard
    from adapters.model.loading import load_model
    from adapters.model.lora import attach_lora
    from adapters.model.sources import resolve_model

    recipe, _ = load_recipe("gemma3-270m-demo", tiny_overrides(tiny_models["llama"], tiny_data, tmp_path))
    model = attach_lora(load_model(resolve_model(recipe.model_name_or_path), recipe), recipe)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    ids = torch.randint(3, 90, (3, 16))
    labels = ids.clone()
    labels[:, :9] = -100  # the prompt: positions 0..7 predict an unlabelled token
    am = torch.ones_like(ids)
    am[2, 12:] = 0  # a padded row
    inputs = {"input_ids": ids, "attention_mask": am, "labels": labels}
    body = model.get_base_model().model
    widths, results = [], []
    orig = guard._up_to
    for cut in (True, False):
        guard._up_to = (lambda i, w, n: widths.append(w) or orig(i, w, n)) if cut else (lambda i, w, n: orig(i, n, n))
        try:
            model.zero_grad()
            h = body(input_ids=ids, attention_mask=am).last_hidden_state
            kl = kl_to_base(model, inputs, h, 0)
            kl.backward()
        finally:
            guard._up_to = orig
        results.append((kl.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert widths == [8]
    (k_cut, g_cut), (k_full, g_full) = results
    assert k_full > 0
    torch.testing.assert_close(k_cut, k_full, rtol=1e-5, atol=1e-7)
    for a, b in zip(g_cut, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_base_kl_every_k_steps_with_k_times_the_weight(tiny_models, tiny_data, tmp_path):
    """base_kl_every: 2 adds the term on steps 0, 2, 4 ... only, at twice the weight; the task loss is kept apart."""
    from adapters.data.encode import encode_rows, to_dataset
    from adapters.data.validate import read_rows
    from adapters.model.loading import load_model, load_tokenizer
    from adapters.model.lora import attach_lora
    from adapters.model.sources import resolve_model
    from adapters.training.trainer import build_trainer

    recipe, _ = load_recipe(
        "gemma3-270m-demo",
        tiny_overrides(tiny_models["llama"], tiny_data, tmp_path, base_kl_weight=0.5, base_kl_every=2),
    )
    ref = resolve_model(recipe.model_name_or_path)
    tok = load_tokenizer(ref, recipe)
    enc, _ = encode_rows(tok, read_rows(recipe.train_file)[:4], recipe.max_length)
    model = attach_lora(load_model(ref, recipe), recipe)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # a non-zero KL from the first step
    ds = to_dataset(enc)
    trainer, _ = build_trainer(model, tok, recipe, tmp_path / "run", ds, None)
    batch = trainer._prepare_inputs(trainer.data_collator([ds[i] for i in range(4)]))
    model.train()
    seen = {}
    for step in (0, 1, 2):
        trainer.state.global_step = step
        trainer._metrics["train"]["base_kl"].clear()
        total = float(trainer.compute_loss(model, dict(batch)).detach())
        kl = trainer._metrics["train"]["base_kl"]
        seen[step] = (total, trainer.last_task_loss, list(kl))
    assert seen[1][2] == [] and seen[1][0] == pytest.approx(seen[1][1])  # no KL on an odd step
    for step in (0, 2):
        total, task, kl = seen[step]
        assert len(kl) == 1 and kl[0] > 0
        assert total == pytest.approx(task + 2 * 0.5 * kl[0], rel=1e-5)


@pytest.fixture(scope="module")
def knows_prose(tiny_models, tmp_path_factory):
    return _pretrain_on_probe(tiny_models["qwen2"], tmp_path_factory.mktemp("knows-prose"))


def _train_and_probe(model_dir, tiny_data, tmp_path, **extra):
    from adapters.data.encode import encode_rows, to_dataset
    from adapters.data.validate import read_rows
    from adapters.evaluation.forgetting import probe
    from adapters.model.loading import load_model, load_tokenizer
    from adapters.model.lora import attach_lora
    from adapters.model.sources import resolve_model
    from adapters.training.trainer import build_trainer

    words = "the of a module returns value list when is an object for this by with".split()
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = tmp_path / "task.jsonl"
    rows.write_text(
        "\n".join(
            json.dumps(
                {
                    "messages": [  # prose-like prompts, a fixed non-prose answer
                        {"role": "user", "content": " ".join(words[(i * 7 + j) % len(words)] for j in range(10))},
                        {"role": "assistant", "content": "2008 " * 4},
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
            model_dir,
            {**tiny_data, "train": rows},
            tmp_path,
            max_steps=8,
            learning_rate=2e-2,
            lr_scheduler_type="constant",
            base_kl_every=1,  # the guard's weight as given on every step (the demo applies it every 2nd, x2)
            eval_strategy="no",
            save_steps=1000,
            forgetting_probe_tokens=512,
            lora_dropout=0.0,
            logging_steps=1,
            **extra,
        ),
    )
    ref = resolve_model(recipe.model_name_or_path)
    tok = load_tokenizer(ref, recipe)
    enc, _ = encode_rows(tok, read_rows(recipe.train_file), recipe.max_length)
    torch.manual_seed(0)
    model = attach_lora(load_model(ref, recipe), recipe)
    trainer, _ = build_trainer(model, tok, recipe, tmp_path / "run", to_dataset(enc), None)
    trainer.train()
    hist = trainer.state.log_history
    return probe(model, tok, recipe, log=lambda *_: None), hist


def test_kl_to_base_limits_forgetting_and_still_learns(knows_prose, tiny_data, tmp_path):
    plain, hist_plain = _train_and_probe(knows_prose, tiny_data, tmp_path / "plain", base_kl_weight=0.0)
    kept, hist_kept = _train_and_probe(knows_prose, tiny_data, tmp_path / "kl", base_kl_weight=5.0, base_kl_positions=0)
    assert plain["rise"] > 0.2, plain
    assert kept["rise"] < plain["rise"] / 2, (plain, kept)
    assert any("base_kl" in h for h in hist_kept) and not any("base_kl" in h for h in hist_plain)
    # the task is still learned: the final training loss is low in both runs
    # the task is still learned: the task part of the logged loss (loss - weight * base_kl) falls by half or more
    steps = [h for h in hist_kept if "loss" in h and "base_kl" in h]
    first, last = steps[0], steps[-1]
    assert last["loss"] - 5.0 * last["base_kl"] < 0.5 * (first["loss"] - 5.0 * first["base_kl"]), steps
