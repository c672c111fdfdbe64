"""Keep the tuned model close to its base where the task has nothing to say (Learning without Forgetting).

LoRA on a narrow task drifts the whole output distribution, not just the answers: after the demo's 30 steps the
tuned Gemma predicts "(" and "," (the answer format) far more often on any text, and its perplexity on unrelated
prose rises by half. Learning without Forgetting (Li & Hoiem, 2016) distils the old model into the new one on the
new task's own inputs, so no old data is needed. Here the "old model" is the same network with the adapter switched
off, and the inputs are the positions of each training row that carry no label (the prompt, the chat template):

    loss = cross-entropy(answer tokens) + base_kl_weight * KL(p_base || p_tuned) at sampled unlabelled positions

The answer tokens are free to change; everything else is pulled back to what the base predicted. Cost per step: one
no-grad forward of the base body, only up to the last sampled position (attention is causal, so the hidden states
there are the same), and the LM head at ``base_kl_positions`` positions per row, for the base and (with its
gradient) for the tuned model: the vocabulary projection is the expensive part of a small model, so positions are
sampled rather than all used. ``base_kl_every: k`` applies the term on every k-th step only, weighted by k, so its
expected contribution over a run is the same at 1/k of the cost.

The KL term is a training regulariser only: evaluation loss stays the plain task loss, so early stopping, sweeps
and reports compare like with like. Its value is logged as ``base_kl``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from adapters.compat.trl import log_metric


def _body(model):
    """The decoder stack (the module whose output the LM head projects) of a PeftModel or plain causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, base.base_model_prefix, None) if getattr(base, "base_model_prefix", None) else None
    if body is None or body is base:
        raise ValueError(f"base_kl_weight: cannot find the decoder body of {type(base).__name__}")
    return body


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def unlabelled_positions(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Bool mask [B, T]: position t predicts a real next token of the same sequence that carries no label."""
    labels = inputs["labels"]
    nxt_unlabelled = labels[:, 1:] == -100
    if "attention_mask" in inputs:
        am = inputs["attention_mask"].bool()
        same = am[:, :-1] & am[:, 1:]
    elif "position_ids" in inputs:  # padding-free: a new sequence starts where the position resets
        pos = inputs["position_ids"]
        same = pos[:, 1:] == pos[:, :-1] + 1
    else:
        same = torch.ones_like(nxt_unlabelled)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = nxt_unlabelled & same
    return mask


def sample_positions(mask: torch.Tensor, per_row: int, n_rows: int, generator: torch.Generator | None = None):
    """Flat indices into mask.view(-1): up to ``per_row * n_rows`` of the True positions, uniformly (0 = all)."""
    idx = mask.reshape(-1).nonzero().squeeze(1)
    k = per_row * n_rows
    if per_row <= 0 or idx.numel() <= k:
        return idx
    pick = torch.randperm(idx.numel(), generator=generator, device="cpu")[:k].to(idx.device)
    return idx[pick]


def _logits(model, h: torch.Tensor) -> torch.Tensor:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    z = base.get_output_embeddings()(h).float()
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        z = z * scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        z = torch.tanh(z / cap) * cap
    return z


# Rows of the [rows, vocabulary] fp32 logits the KL computes at once (2**24 elements = 64 MiB; 64 rows of Gemma's
# 262k vocabulary): the guard's peak memory is a few such tiles, whatever base_kl_positions x batch is.
KL_TILE_ELEMENTS = 2**24


def _head(model):
    """(weight, logit scale) of the LM head when the lean KL applies (a frozen head without bias or soft-capping),
    else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    scale = getattr(cfg, "logit_scale", None)
    scale = float(scale) if isinstance(scale, (int, float)) else 1.0
    w = getattr(head, "weight", None)
    if (
        not isinstance(w, torch.Tensor)
        or w.requires_grad
        or getattr(head, "bias", None) is not None
        or getattr(cfg, "final_logit_softcapping", None)
        or type(head) is not torch.nn.Linear
    ):
        return None
    return w, scale


class _LeanKL(torch.autograd.Function):
    """KL(p_base || p_tuned) summed over rows, from the two hidden states and a frozen LM head, in row tiles.

    Per row, d KL / d z_tuned = p_tuned - p_base, so d KL / d h_tuned = scale * (p_tuned - p_base) @ W: computed in
    the forward, tile by tile, and kept as [N, hidden]. No [N, vocabulary] tensor outlives its tile (the plain
    autograd version keeps three: both log-softmaxes and the tuned logits' softmax), and the arithmetic is the same.
    """

    @staticmethod
    def forward(ctx, h_tuned, h_base, weight, scale):
        n = h_tuned.shape[0]
        rows = max(1, KL_TILE_ELEMENTS // max(weight.shape[0], 1))
        w, wf = weight.to(h_tuned.dtype), weight.float()
        total = torch.zeros((), dtype=torch.float32, device=h_tuned.device)
        grad = h_tuned.new_empty((n, weight.shape[1]), dtype=torch.float32)
        for i in range(0, n, rows):
            zb = F.linear(h_base[i : i + rows].to(w.dtype), w).float()
            zt = F.linear(h_tuned[i : i + rows], w).float()
            if scale != 1.0:
                zb.mul_(scale)
                zt.mul_(scale)
            lb = F.log_softmax(zb, dim=-1)
            del zb
            lt = F.log_softmax(zt, dim=-1)
            del zt
            pb = lb.exp()
            total += (pb * (lb - lt)).sum()
            del lb
            torch.matmul(lt.exp_().sub_(pb), wf, out=grad[i : i + rows])  # (p_tuned - p_base) @ W
            del lt, pb
        ctx.save_for_backward(grad)
        ctx.scale, ctx.h_dtype = scale, h_tuned.dtype
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * (g * ctx.scale)).to(ctx.h_dtype), None, None, None


def _up_to(inputs: dict[str, Any], width: int, seq_len: int) -> dict[str, Any]:
    """The body's inputs cut to the first ``width`` positions (causal attention: earlier hidden states are the same).

    Padding-free batches carry flash-attention sequence bounds (``cu_seq_*``), which a cut would break: kept whole.
    """
    body_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    body_inputs["use_cache"] = False
    if width >= seq_len or any(k.startswith(("cu_seq", "max_length")) for k in body_inputs):
        return body_inputs
    return {
        k: v[:, :width] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == seq_len else v
        for k, v in body_inputs.items()
    }


def kl_to_base(model, inputs: dict[str, Any], hidden: torch.Tensor, per_row: int, generator=None) -> torch.Tensor:
    """KL(p_base || p_tuned), mean over sampled unlabelled positions; ``hidden`` is the tuned body's output."""
    mask = unlabelled_positions(inputs)
    n_rows, seq_len = mask.shape
    if "position_ids" in inputs and "attention_mask" not in inputs:
        n_rows = int((inputs["position_ids"] == 0).sum())
    idx = sample_positions(mask, per_row, n_rows, generator)
    if idx.numel() == 0:
        return hidden.sum() * 0.0  # connected zero: nothing to regularise in this micro-batch
    rows, cols = idx // seq_len, idx % seq_len
    body_inputs = _up_to(inputs, int(cols.max()) + 1, seq_len)
    with torch.no_grad(), model.disable_adapter():
        hb = _hidden(_body(model)(**body_inputs))[rows, cols]
    ht = hidden[rows, cols]
    head = _head(model)
    if head is not None:  # the same KL, in tiles, keeping [N, hidden] instead of [N, vocabulary] for the backward
        return _LeanKL.apply(ht, hb.detach(), head[0], head[1]) / ht.shape[0]
    with torch.no_grad():
        logp_base = F.log_softmax(_logits(model, hb), dim=-1)
    logp_tuned = F.log_softmax(_logits(model, ht), dim=-1)
    return F.kl_div(logp_tuned, logp_base, log_target=True, reduction="batchmean")


class BaseKLMixin:
    """Trainer mixin: adds ``base_kl_weight * KL(base || tuned)`` on unlabelled positions to the training loss."""

    base_kl_weight: float = 0.0
    base_kl_positions: int = 16
    base_kl_every: int = 1
    last_task_loss: float | None = None  # the task loss of the last training micro-batch, without the KL term

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        every = max(1, int(self.base_kl_every))
        if not (model.training and self.base_kl_weight > 0 and self.state.global_step % every == 0):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.last_task_loss = float((out[0] if return_outputs else out).detach())
            return out
        captured: dict[str, torch.Tensor] = {}
        inner = self.accelerator.unwrap_model(model)  # DDP/FSDP wrappers have no disable_adapter()
        body = _body(inner)
        handle = body.register_forward_hook(lambda _m, _a, out: captured.__setitem__("h", _hidden(out)))
        try:
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        if "h" not in captured:
            raise RuntimeError("base_kl_weight: the decoder body did not run in the training forward")
        self.last_task_loss = float((out[0] if return_outputs else out).detach())
        # positions drawn from (seed, step, micro-batch): a resumed run samples exactly what an unbroken one did
        step = self.state.global_step
        micro = self._kl_micro[1] + 1 if getattr(self, "_kl_micro", (None, 0))[0] == step else 0
        self._kl_micro = (step, micro)
        gen = torch.Generator().manual_seed(int(self.args.seed) * 1_000_003 + step * 1009 + micro)
        kl = kl_to_base(inner, inputs, captured["h"], self.base_kl_positions, gen)
        log_metric(self, "base_kl", float(kl.detach()))  # averaged into the next log line
        term = self.base_kl_weight * every * kl  # every k-th step, k times the weight: the same on average
        # the task loss was normalised over the whole accumulated batch (num_items_in_batch); match that
        scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
            getattr(self, "compute_loss_func", None) is not None
        )
        if scaled:
            term = term / self.current_gradient_accumulation_steps
        if return_outputs:
            return out[0] + term, out[1]
        return out + term
