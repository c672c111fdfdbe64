"""adapters.compat: each patch of another library's internals, checked against the upstream behaviour it relies on.

A failure here after an upgrade means the private hook moved or changed: revisit the compat module it names, and
update the versions its docstring says it was checked against.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- trl
def _trl_original_use_triton(monkeypatch):
    """TRL's own _use_triton, installed for this test: a trainer built by an earlier test may have left it widened
    (monkeypatch puts back whatever was there)."""
    from trl.trainer import utils as trl_utils

    orig = getattr(trl_utils._use_triton, "_adapters_orig", trl_utils._use_triton)
    monkeypatch.setattr(trl_utils, "_use_triton", orig)
    return orig


def _fused_llama(tiny_models):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    add_fused_lm_head(model)
    ids = torch.arange(3, 15).unsqueeze(0)
    labels = ids.clone()
    labels[:, :7] = -100  # a prompt: no loss on its positions
    return model, ids, labels


def test_trl_fused_lm_head_decides_through_module_level_use_triton(tiny_models, monkeypatch):
    """enable_trained_positions_only replaces trl.trainer.utils._use_triton: the fused forward must look it up there
    at call time, with the hidden states' device, and gather only labelled positions when it says True."""
    from trl.trainer import utils as trl_utils

    _trl_original_use_triton(monkeypatch)
    assert list(inspect.signature(trl_utils._use_triton).parameters) == ["device"]
    assert trl_utils._use_triton(torch.device("cpu")) is False
    model, ids, labels = _fused_llama(tiny_models)
    seen, rows = [], []
    real_apply = trl_utils._ChunkedLogProbFunction.apply

    def spy_apply(hidden, *args):
        rows.append(hidden.shape[0])
        return real_apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", spy_apply)
    for compact in (False, True):
        monkeypatch.setattr(trl_utils, "_use_triton", lambda device, c=compact: seen.append(device.type) or c)
        model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert seen == ["cpu", "cpu"], "the fused LM head no longer asks trl.trainer.utils._use_triton"
    n_labelled = int((labels[:, 1:] != -100).sum())
    assert rows == [ids.shape[1] - 1, n_labelled], "compact=True no longer scores only the labelled positions"


def test_enable_trained_positions_only_widens_and_restores(tiny_models, monkeypatch):
    from trl.kernels import chunked_logprob
    from trl.trainer import utils as trl_utils

    from adapters.compat.trl import compact_hook_available, enable_trained_positions_only

    assert compact_hook_available()
    orig = _trl_original_use_triton(monkeypatch)
    model, ids, labels = _fused_llama(tiny_models)
    want = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
    try:
        enable_trained_positions_only(True)
        enable_trained_positions_only(True)  # idempotent: wraps once
        assert trl_utils._use_triton is not orig and trl_utils._use_triton._adapters_orig is orig
        assert trl_utils._use_triton(torch.device("cpu")) is True
        assert chunked_logprob._use_triton(torch.device("cpu")) is False  # the kernel choice is untouched
        got = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
    finally:
        enable_trained_positions_only(False)
    assert trl_utils._use_triton is orig
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_log_metric_reaches_sft_trainer_log_lines(tiny_models, tmp_path):
    """SFTTrainer averages self._metrics[mode][name] into the next log line and clears it; log_metric feeds that."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from adapters.compat.trl import log_metric

    logged = []

    class Capture(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            logged.append(dict(logs or {}))

    ids = [[3, 4, 5, 6, 7, 8]] * 2
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_models["llama"]),
        args=SFTConfig(
            output_dir=str(tmp_path),
            report_to="none",
            use_cpu=True,
            max_steps=1,
            dataset_kwargs={"skip_prepare_dataset": True},
        ),
        train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
        processing_class=AutoTokenizer.from_pretrained(tiny_models["llama"]),
        callbacks=[Capture()],
    )
    trainer.model.train()
    log_metric(trainer, "base_kl", 0.5)
    log_metric(trainer, "base_kl", 1.5)
    trainer.log({"loss": 1.0})
    assert logged[-1]["base_kl"] == pytest.approx(1.0)
    trainer.log({"loss": 1.0})
    assert "base_kl" not in logged[-1], "SFTTrainer.log no longer clears the metrics it logged"


def test_train_tokens_is_the_count_sft_trainer_logs(tiny_models, tmp_path):
    """SFTTrainer keeps its logged num_tokens in _total_train_tokens (0 in __init__, saved in no checkpoint file):
    train_tokens reads it for the checkpoint marker, restore_train_tokens continues it on resume."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from adapters.compat.trl import restore_train_tokens, train_tokens

    logged = []

    class Capture(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                logged.append(logs["num_tokens"])

    ids = [[3, 4, 5, 6, 7, 8]] * 2
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_models["llama"]),
        args=SFTConfig(
            output_dir=str(tmp_path),
            report_to="none",
            use_cpu=True,
            max_steps=2,
            logging_steps=1,
            per_device_train_batch_size=2,
            dataset_kwargs={"skip_prepare_dataset": True},
        ),
        train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
        processing_class=AutoTokenizer.from_pretrained(tiny_models["llama"]),
        callbacks=[Capture()],
    )
    assert train_tokens(trainer) == 0
    restore_train_tokens(trainer, 100)
    trainer.train()
    assert logged == [112, 124] and train_tokens(trainer) == 124


# ---------------------------------------------------------------------------------------------------- transformers
def test_transformers_checkpoint_hooks_keep_their_signatures():
    from transformers import Trainer
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    assert list(inspect.signature(Trainer._get_output_dir).parameters) == ["self", "trial"]
    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    assert list(inspect.signature(Trainer._save).parameters) == ["self", "output_dir", "state_dict"]
    assert {"output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime"} <= set(
        inspect.signature(rotate_checkpoints).parameters
    )
    assert PREFIX_CHECKPOINT_DIR == "checkpoint"


def test_transformers_trainer_writes_checkpoints_through_the_staging_hooks(tiny_models, tmp_path):
    """The training loop calls _save_checkpoint, which writes every file under _get_output_dir(): so all of a
    checkpoint lands in the staging folder, and nothing is in the real folder until _commit_checkpoint."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from adapters.compat.transformers import STAGING, StagedCheckpoints

    root = tmp_path / "ck"
    commits = []

    class Staged(StagedCheckpoints, Trainer):
        def _gather_for_commit(self):
            commits.append("gathered")

        def _commit_checkpoint(self, staged, final):
            commits.append((staged, sorted(p.name for p in staged.iterdir()), final.exists()))
            super()._commit_checkpoint(staged, final)

    ids = [[3, 4, 5, 6, 7, 8]] * 4
    args = TrainingArguments(
        output_dir=str(root),
        max_steps=2,
        save_steps=1,
        save_total_limit=1,
        per_device_train_batch_size=2,
        report_to="none",
        use_cpu=True,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    Staged(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids})).train()
    assert commits[0::2] == ["gathered", "gathered"]  # on every process, before each commit
    commits = commits[1::2]
    assert [c[0] for c in commits] == [root / STAGING / "checkpoint-1", root / STAGING / "checkpoint-2"]
    for _, names, final_existed in commits:
        assert {"model.safetensors", "trainer_state.json", "optimizer.pt", "rng_state.pth"} <= set(names)
        assert not final_existed
    # promoted, and rotated in the real folder (save_total_limit=1)
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not list((root / STAGING).glob("checkpoint-*"))


def test_transformers_trainer_save_writes_the_processing_class(tiny_models, tmp_path):
    """Trainer._save writes processing_class next to the model; StagedCheckpoints with checkpoint_tokenizer = False
    keeps it out of checkpoints only (and puts the attribute back)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from adapters.compat.transformers import StagedCheckpoints

    class NoTok(StagedCheckpoints, Trainer):
        checkpoint_tokenizer = False

    ids = [[3, 4, 5, 6, 7, 8]] * 2
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    for cls, root in ((Trainer, tmp_path / "plain"), (NoTok, tmp_path / "staged")):
        args = TrainingArguments(output_dir=str(root), max_steps=1, save_steps=1, report_to="none", use_cpu=True)
        model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
        trainer = cls(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
            processing_class=tok,
        )
        trainer.train()
        assert ((root / "checkpoint-1" / "tokenizer.json").is_file()) == (cls is Trainer)
        assert trainer.processing_class is tok and trainer.data_collator is not None
        trainer.save_model(str(root / "final"))  # outside a checkpoint the tokenizer is still written
        assert (root / "final" / "tokenizer.json").is_file()


# ---------------------------------------------------------------------------------------------------- huggingface_hub
def test_hub_client_timeout_wraps_the_private_client_factory():
    import httpx2
    from huggingface_hub import close_session, get_session
    from huggingface_hub.utils import _http

    from adapters.compat.huggingface_hub import client_timeout

    before = _http._GLOBAL_CLIENT_FACTORY
    assert callable(before)
    try:
        with client_timeout(2.5):
            client = get_session()
            assert isinstance(client, httpx2.Client)
            assert client.timeout == httpx2.Timeout(2.5)
        assert _http._GLOBAL_CLIENT_FACTORY is before
        assert get_session().timeout == before().timeout  # the shared client was rebuilt from the old factory
        with client_timeout(None):
            assert _http._GLOBAL_CLIENT_FACTORY is before
    finally:
        close_session()


def test_httpx2_comes_with_huggingface_hub():
    """compat.huggingface_hub imports httpx2 without pyproject declaring it: huggingface_hub must require it."""
    import importlib.metadata as md

    assert any(r.replace(" ", "").startswith("httpx2") for r in md.requires("huggingface_hub") or [])


# ---------------------------------------------------------------------------------------------------- bitsandbytes
def _linear4bit():
    from bitsandbytes.nn import Linear4bit

    torch.manual_seed(0)
    return Linear4bit(64, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4").to("cpu").eval()


def test_bnb_cpu_inference_layout_switch_still_decides_the_repack():
    """On an AVX512-BF16 CPU, Linear4bit sets support_avx512bf16_for_cpu and its first eval no-grad forward
    repacks the weight into the inference-only layout; keep_cpu_layout_trainable turns that off."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    from adapters.compat.bitsandbytes import keep_cpu_layout_trainable

    assert "support_avx512bf16_for_cpu" in inspect.getsource(Linear4bit.forward)
    layer = _linear4bit()
    assert hasattr(layer, "support_avx512bf16_for_cpu")
    layer.support_avx512bf16_for_cpu = True  # what __init__ sets on an AVX512-BF16 CPU
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False), "the CPU repack moved"

    layer = _linear4bit()
    layer.support_avx512bf16_for_cpu = True
    assert keep_cpu_layout_trainable(torch.nn.Sequential(layer, torch.nn.ReLU())) == 1
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def test_no_unittest_mock_in_the_package():
    hits = [
        str(p.relative_to(REPO))
        for p in (REPO / "adapters").rglob("*.py")
        if "unittest.mock" in p.read_text() or "from unittest import mock" in p.read_text()
    ]
    assert hits == []


def test_trained_positions_only_is_scoped_to_the_training_call(tiny_models, tiny_data, tmp_path):
    """The TRL switch is on while the trainer trains (the run's fast path says so) and TRL's own decision is back
    afterwards: a run changes no module state of another library."""
    from trl.trainer import utils as trl_utils

    import adapters.training.run as train_mod
    from adapters.compat.trl import trained_positions_only
    from adapters.config import load_recipe

    from .conftest import tiny_overrides

    original = getattr(trl_utils._use_triton, "_adapters_orig", trl_utils._use_triton)
    trl_utils._use_triton = original  # an earlier test may have left it widened
    with trained_positions_only(True):
        assert trl_utils._use_triton is not original and trl_utils._use_triton(torch.device("cpu")) is True
    assert trl_utils._use_triton is original
    seen = []
    recipe, path = load_recipe(
        "gemma3-270m-demo",
        tiny_overrides(
            tiny_models["llama"],
            tiny_data,
            tmp_path,
            run_name="scoped",
            eval_after_train=False,
            eval_strategy="no",
            report_to="none",
            max_steps=1,
            trained_positions_only=True,
        ),
    )
    from transformers import TrainerCallback

    class Spy(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            seen.append(trl_utils._use_triton(torch.device("cpu")))

    train_mod.train(recipe, path, callbacks=[Spy()])
    assert seen == [True]
    assert trl_utils._use_triton is original


def test_materialized_lm_head_matches_trl_chunked_kernel():
    """trained_positions_only swaps trl.trainer.utils._ChunkedLogProbFunction for MaterializedLogProb (same apply()
    arguments and outputs): values and gradients must equal TRL's kernel's, and TRL's is back afterwards."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer import utils as trl_utils

    from adapters.compat.trl import MaterializedLogProb, trained_positions_only

    params = list(inspect.signature(ChunkedLogProbFunction.forward).parameters)[1:]
    assert params == [
        "hidden",
        "weight",
        "bias",
        "targets",
        "temperature",
        "chunk_size",
        "final_logit_softcapping",
        "logit_scale",
        "outputs",
    ], "TRL's chunked log-prob kernel changed its arguments"
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(300, 16, generator=g), torch.randn(300, generator=g)
    targets = torch.randint(0, 300, (7,), generator=g)
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    for scale, temperature in ((1.0, 1.0), (0.5, 0.7)):
        got = []
        for kernel in (ChunkedLogProbFunction, MaterializedLogProb):
            h = torch.randn(7, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
            w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
            out = kernel.apply(h, w, b, targets, temperature, 64, None, scale, outputs)
            (out[0] * torch.arange(7.0)).sum().backward()
            got.append([*out, h.grad, w.grad, b.grad])
        for want, have in zip(*got):
            torch.testing.assert_close(have.float(), want.float(), rtol=1e-4, atol=1e-5)
    before = trl_utils._ChunkedLogProbFunction
    with trained_positions_only(True):
        assert trl_utils._ChunkedLogProbFunction is MaterializedLogProb
        assert MaterializedLogProb.original is before
    assert trl_utils._ChunkedLogProbFunction is before


def test_lean_lm_head_for_a_frozen_head_matches_trl_chunked_kernel(monkeypatch):
    """A frozen LM head (LoRA) goes through the tiled kernel that keeps [N, hidden], not the [N, vocabulary] softmax,
    for the backward: every output and the hidden states' gradient equal TRL's kernel's, with tiles of 2 rows and
    with no labelled position at all."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    import adapters.compat.trl as compat
    from adapters.compat.trl import MaterializedLogProb

    monkeypatch.setattr(compat, "LEAN_TILE_ELEMENTS", 600)  # 2 rows of 300 per tile, the last one short
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 16, generator=g)  # frozen: requires_grad False
    targets = torch.randint(0, 300, (7,), generator=g)
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    for scale, temperature in ((1.0, 1.0), (0.5, 0.7)):
        got = []
        for kernel in (ChunkedLogProbFunction, MaterializedLogProb):
            h = torch.randn(7, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
            out = kernel.apply(h, weight, None, targets, temperature, 64, None, scale, outputs)
            (out[0] * torch.arange(7.0)).sum().backward()
            got.append([*out, h.grad])
        for want, have in zip(*got):
            torch.testing.assert_close(have.float(), want.float(), rtol=1e-4, atol=1e-5)
    h = torch.randn(0, 16, requires_grad=True)
    out = MaterializedLogProb.apply(h, weight, None, targets[:0], 1.0, 64, None, 1.0, outputs)
    assert [tuple(x.shape) for x in out] == [(0,)] * 5
    out[0].sum().backward()
    assert h.grad is not None and h.grad.shape == (0, 16)


def test_materialized_lm_head_gives_the_fused_forwards_loss(tiny_models, monkeypatch):
    """Through TRL's fused LM head (labelled positions only): the same loss and gradients with either kernel."""
    from trl.trainer import utils as trl_utils

    from adapters.compat.trl import trained_positions_only

    _trl_original_use_triton(monkeypatch)
    model, ids, labels = _fused_llama(tiny_models)
    results = []
    for materialize in (False, True):
        model.zero_grad()
        if materialize:
            with trained_positions_only(True):
                assert trl_utils._ChunkedLogProbFunction.__name__ == "MaterializedLogProb"
                out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        else:
            monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)  # TRL's kernel, labelled only
            out = model(input_ids=ids, labels=labels, fused_lm_head=True)
            monkeypatch.undo()
            _trl_original_use_triton(monkeypatch)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((out.loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
