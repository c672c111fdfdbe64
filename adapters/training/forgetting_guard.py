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

Where the positions come from (``base_kl_source``):

- ``rows``: the unlabelled positions of the training rows themselves (prompt, template), as above. On a task whose
  rows train a few tokens each (a one-word answer: 3 trained tokens, ~7% of a row) this fights the task: the answer
  can only be learnt by changing the representations of the prompt it is predicted from, and those are exactly the
  positions held to the base, through the same LoRA weights. It cost accuracy there and still forgot (the
  prompts are in-domain text, the forgetting is on everything else).
- ``general``: general text that is not the task's, appended to the micro-batch as extra rows with no
  labels, so one forward (and, under DDP, one backward) still covers both. It holds the model to its base where
  forgetting is measured - text the task has nothing to say about - and leaves the task's prompts free to move.
  The built-in text is the docstrings of Python standard-library modules that the default forgetting probe does
  not read (``GUARD_MODULES``; any paragraph the probe also holds is dropped), cut into ``GENERAL_LENGTH``-token
  windows; a path to a text file (passages separated by blank lines) replaces it. Each guarded step appends
  enough windows for ``base_kl_positions`` positions per training row (two windows of 64 tokens for batch 8).
  Measured against ``rows`` in docs/training.md#forgetting-guard.
- ``auto`` (default): ``rows`` when at least ``ROWS_MIN_TRAINED_SHARE`` of the training tokens carry a label (the
  demo's catalogue lines: 33%), ``general`` below it (one-word answers: 5%). Each was the better of the two where
  it is chosen (docs/training.md#where-the-guards-positions-come-from); the data audit's share decides, and the
  manifest's ``config.base_kl_source`` records the choice.

The KL term is a training regulariser only: evaluation loss stays the plain task loss, so early stopping, sweeps
and reports compare like with like. Its value is logged as ``base_kl``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from adapters.compat.trl import log_metric
from adapters.data.audit import FEW_TRAINED_SHARE
from adapters.data.rows import IGNORE_INDEX


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


def _kl(model, ht: torch.Tensor, hb: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p_tuned), mean over rows, from the tuned hidden states ``ht`` (with the gradient) and the base's
    ``hb`` at the same positions; in tiles (``_LeanKL``: [N, hidden] kept for the backward, not [N, vocabulary]) when
    the LM head allows, else through both log-softmaxes."""
    head = _head(model)
    if head is not None:
        return _LeanKL.apply(ht, hb.detach(), head[0], head[1]) / ht.shape[0]
    with torch.no_grad():
        logp_base = F.log_softmax(_logits(model, hb), dim=-1)
    logp_tuned = F.log_softmax(_logits(model, ht), dim=-1)
    return F.kl_div(logp_tuned, logp_base, log_target=True, reduction="batchmean")


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
    return _kl(model, hidden[rows, cols], hb)


# Prose-heavy standard-library modules that the default forgetting probe (evaluation/forgetting.py) does not read.
GUARD_MODULES = (
    "asyncio",
    "configparser",
    "dataclasses",
    "datetime",
    "decimal",
    "email.message",
    "enum",
    "fractions",
    "ftplib",
    "http.client",
    "inspect",
    "io",
    "ipaddress",
    "mailbox",
    "os",
    "pickle",
    "re",
    "sqlite3",
    "subprocess",
    "tarfile",
    "tempfile",
    "typing",
)
GENERAL_LENGTH = 64  # tokens per general-text window (BOS + 63)
# The per-sample bounds TRL's padding-free collator adds next to position_ids; append_general extends them.
PADDING_FREE_BOUNDS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"})


ROWS_MIN_TRAINED_SHARE = FEW_TRAINED_SHARE  # the audit's few_trained_tokens threshold


def trained_share_of(data_report: dict[str, Any] | None) -> float | None:
    """The training split's share of tokens that carry a label, from the data stage's report (audit or stream)."""
    report = data_report or {}
    for part in (((report.get("audit") or {}).get("train")), report.get("train")):
        if isinstance(part, dict) and part.get("trained_share") is not None:
            return float(part["trained_share"])
    return None


def source_for_rows(source: str, rows, limit: int = 2048) -> str:
    """``base_kl_source`` as trained for a caller without the data stage's report: ``auto`` resolved from the trained
    share of up to ``limit`` of ``rows`` (encoded rows with ``labels``), as the audit's share would resolve it."""
    if source != "auto":
        return source
    trained = total = 0
    try:
        for i, row in enumerate(rows):
            if i >= limit:
                break
            labels = row["labels"] if isinstance(row, dict) else row.labels
            trained += sum(1 for x in labels if x != IGNORE_INDEX)
            total += len(labels)
    except (TypeError, KeyError, AttributeError):  # rows without labels (a stream not read twice): general
        total = 0
    return resolve_source("auto", trained / total if total else None)[0]


def resolve_source(source: str, trained_share: float | None) -> tuple[str, str | None]:
    """``base_kl_source`` as trained: ``auto`` becomes ``rows`` or ``general`` by the trained share; returns the
    value and, for ``auto``, the reason in a line (else None)."""
    if source != "auto":
        return source, None
    if trained_share is None:  # preference pairs (no unlabelled positions of their own to hold)
        return "general", "base_kl_source auto -> general (no trained-token share: preference rows)"
    chosen = "rows" if trained_share >= ROWS_MIN_TRAINED_SHARE else "general"
    cmp = ">=" if chosen == "rows" else "<"
    return chosen, (
        f"base_kl_source auto -> {chosen} ({trained_share:.1%} of the training tokens are trained, "
        f"{cmp} {ROWS_MIN_TRAINED_SHARE:.0%})"
    )


def general_passages(source: str = "general") -> list[str]:
    """The guard's general text: ``general`` (built-in, see GUARD_MODULES) or a text file's passages."""
    from adapters.evaluation.forgetting import probe_passages, stdlib_passages

    if source != "general":
        return probe_passages(source)[1]  # a user's file: the same reader (and errors) as a probe file
    return stdlib_passages(GUARD_MODULES, seen=set(stdlib_passages()))  # never a paragraph of the default probe


def general_windows(tok, passages: list[str], length: int = GENERAL_LENGTH) -> torch.Tensor:
    """[N, length] token windows: the passages' ids joined by blank lines, cut in order, each after a BOS."""
    stream: list[int] = []
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    for text in passages:
        stream += tok(text, add_special_tokens=False)["input_ids"] + sep
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    step = length - len(bos)
    rows = [bos + stream[i : i + step] for i in range(0, len(stream) - step + 1, step)]
    if not rows:
        raise ValueError("base_kl_source: the general text is shorter than one window")
    return torch.tensor(rows, dtype=torch.long)


def append_general(inputs: dict[str, Any], windows: torch.Tensor, pad_id: int) -> tuple[dict[str, Any], Any]:
    """``inputs`` with ``windows`` ([G, L], no labels) appended as extra samples of the micro-batch; returns the new
    inputs and the flat indices, into the body's hidden states viewed as [-1, H], of each window's first L-1
    positions in order (each predicts the window's next token). A padded batch gets G more rows (both padded to
    the longer length); a padding-free one (``position_ids``, no attention mask, and TRL's ``cu_seq_lens_*``,
    ``max_length_*`` and ``seq_idx`` bounds when present) G more samples in its one row. None instead of the indices
    when the batch has a layout this does not know: the caller then runs the windows in a forward of their own
    (never the rows' prompts, which is another guard)."""
    ids = inputs["input_ids"]
    g, length = windows.shape
    windows = windows.to(ids.device)
    known = {"input_ids", "labels", "attention_mask", "position_ids"}
    if "attention_mask" not in inputs:
        known |= PADDING_FREE_BOUNDS
    if any(isinstance(v, torch.Tensor) for k, v in inputs.items() if k not in known) or ids.dim() != 2:
        return inputs, None
    out = dict(inputs)
    if "attention_mask" in inputs:
        b, t = ids.shape
        width = max(t, length)

        def grow(x: torch.Tensor, fill: int, rows: torch.Tensor) -> torch.Tensor:
            x = F.pad(x, (0, width - t), value=fill)
            return torch.cat([x, F.pad(rows.to(x.dtype), (0, width - length), value=fill)], 0)

        out["input_ids"] = grow(ids, pad_id, windows)
        out["attention_mask"] = grow(inputs["attention_mask"], 0, torch.ones_like(windows))
        out["labels"] = grow(inputs["labels"], -100, torch.full_like(windows, -100))
        if "position_ids" in inputs:
            out["position_ids"] = grow(inputs["position_ids"], 0, torch.arange(length).expand(g, length))
        r = torch.arange(b, b + g).repeat_interleave(length - 1)
        c = torch.arange(length - 1).repeat(g)
        return out, (r * width + c).to(ids.device)
    if "position_ids" not in inputs or ids.shape[0] != 1:
        return inputs, None
    n = ids.shape[1]
    out["input_ids"] = torch.cat([ids, windows.reshape(1, -1)], 1)
    out["labels"] = torch.cat([inputs["labels"], torch.full((1, g * length), -100, device=ids.device)], 1)
    pos = torch.arange(length, device=ids.device).repeat(g).reshape(1, -1)
    out["position_ids"] = torch.cat([inputs["position_ids"], pos.to(inputs["position_ids"].dtype)], 1)
    # the varlen bounds TRL's padding-free collator computes (flash attention, linear-attention convolutions)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if key in inputs:
            cu = inputs[key]
            ends = cu[-1] + length * torch.arange(1, g + 1, device=cu.device, dtype=cu.dtype)
            out[key] = torch.cat([cu, ends])
    for key in ("max_length_q", "max_length_k"):
        if key in inputs:
            out[key] = max(int(inputs[key]), length)
    if "seq_idx" in inputs:
        seq = inputs["seq_idx"]
        nxt = int(seq.max()) + 1 if seq.numel() else 0
        more = (nxt + torch.arange(g, device=seq.device, dtype=seq.dtype)).repeat_interleave(length)
        out["seq_idx"] = torch.cat([seq, more.reshape(1, -1)], 1)
    starts = n + torch.arange(g) * length
    flat = (starts.unsqueeze(1) + torch.arange(length - 1)).reshape(-1)
    return out, flat.to(ids.device)


def kl_on_general(model, windows: torch.Tensor, hidden: torch.Tensor, flat: torch.Tensor, k: int, generator=None):
    """KL(p_base || p_tuned) at up to ``k`` sampled positions of the appended windows; ``hidden``: the tuned body's
    output for the whole micro-batch, ``flat``: append_general's indices (window order)."""
    pick = torch.randperm(flat.numel(), generator=generator)[:k] if 0 < k < flat.numel() else torch.arange(flat.numel())
    length = windows.shape[1]
    rows, cols = pick // (length - 1), pick % (length - 1)
    width = int(cols.max()) + 1
    with torch.no_grad(), model.disable_adapter():
        hb = _hidden(_body(model)(input_ids=windows[:, :width].to(hidden.device), use_cache=False))
        hb = hb[rows.to(hb.device), cols.to(hb.device)]
    return _kl(model, hidden.reshape(-1, hidden.shape[-1])[flat[pick.to(flat.device)]], hb)


def _n_rows(inputs: dict[str, Any]) -> int:
    """Training samples in a micro-batch (a padding-free row holds several: count the position resets)."""
    if "position_ids" in inputs and "attention_mask" not in inputs:
        return int((inputs["position_ids"] == 0).sum())
    return int(inputs["input_ids"].shape[0])


class BaseKLMixin:
    """Trainer mixin: adds ``base_kl_weight * KL(base || tuned)`` on unlabelled positions to the training loss."""

    base_kl_weight: float = 0.0
    base_kl_positions: int = 16
    base_kl_every: int = 1
    base_kl_source: str = "general"  # resolved: never auto here (resolve_source, in the run and the bench)
    last_task_loss: float | None = None  # the task loss of the last training micro-batch, without the KL term
    _general: torch.Tensor | None = None

    def _windows(self, n_rows: int, generator) -> torch.Tensor:
        """Enough general-text windows for base_kl_positions per training row, drawn from (seed, step)."""
        if self._general is None:
            self._general = general_windows(self.processing_class, general_passages(self.base_kl_source))
        want = max(1, -(-n_rows * max(1, self.base_kl_positions) // (self._general.shape[1] - 1)))
        pick = torch.randperm(self._general.shape[0], generator=generator)[: min(want, self._general.shape[0])]
        return self._general[pick]

    def _k(self, n_rows: int) -> int:
        """Positions the KL samples on general text for ``n_rows`` training rows (0: every position)."""
        return n_rows * self.base_kl_positions if self.base_kl_positions else 0

    def _kl_on_own_windows(self, inner, windows: torch.Tensor, n_rows: int, gen) -> torch.Tensor:
        """KL(base || tuned) on general-text windows run through the tuned body in a forward of their own (with the
        gradient), not appended to a training batch: the preference trainers' rows, or a batch layout that
        append_general does not know."""
        windows = windows.to(next(inner.parameters()).device)
        hidden = _hidden(_body(inner)(input_ids=windows, use_cache=False))
        length = windows.shape[1]
        flat = (torch.arange(windows.shape[0]).unsqueeze(1) * length + torch.arange(length - 1)).reshape(-1)
        return kl_on_general(inner, windows, hidden, flat.to(hidden.device), self._k(n_rows), gen)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        every = max(1, int(self.base_kl_every))
        if not (model.training and self.base_kl_weight > 0 and self.state.global_step % every == 0):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.last_task_loss = float((out[0] if return_outputs else out).detach())
            return out
        captured: dict[str, torch.Tensor] = {}
        inner = self.accelerator.unwrap_model(model)  # DDP/FSDP wrappers have no disable_adapter()
        body = _body(inner)
        # positions drawn from (seed, step, micro-batch): a resumed run samples exactly what an unbroken one did
        step = self.state.global_step
        micro = self._kl_micro[1] + 1 if getattr(self, "_kl_micro", (None, 0))[0] == step else 0
        self._kl_micro = (step, micro)
        gen = torch.Generator().manual_seed(int(self.args.seed) * 1_000_003 + step * 1009 + micro)
        flat = None
        if self.base_kl_source != "rows":
            n_rows = _n_rows(inputs)
            windows = self._windows(n_rows, gen)
            pad = self.processing_class.pad_token_id
            inputs, flat = append_general(inputs, windows, pad if pad is not None else 0)
        handle = body.register_forward_hook(lambda _m, _a, out: captured.__setitem__("h", _hidden(out)))
        try:
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        if "h" not in captured:
            raise RuntimeError("base_kl_weight: the decoder body did not run in the training forward")
        self.last_task_loss = float((out[0] if return_outputs else out).detach())
        if self.base_kl_source == "rows":
            kl = kl_to_base(inner, inputs, captured["h"], self.base_kl_positions, gen)
        elif flat is not None:
            kl = kl_on_general(inner, windows, captured["h"], flat, self._k(n_rows), gen)
        else:  # a batch layout append_general does not know: the windows in a forward of their own
            kl = self._kl_on_own_windows(inner, windows, n_rows, gen)
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


class PreferenceKLMixin(BaseKLMixin):
    """The guard for the preference trainers (DPO / KTO / ORPO): ``base_kl_weight * KL(base || tuned)`` on general
    text, added to the trainer's own loss.

    A preference loss moves the policy relative to its reference (DPO, KTO) or to nothing (ORPO); none of it holds
    the rest of the distribution, and on the demo DPO added +4% probe perplexity to what the SFT adapter it continued
    had (docs/preference.md). The reference is no help there: continuing an SFT adapter, it is base + that adapter,
    which has already drifted. This holds the policy to the bare base (every adapter disabled, the ``ref`` copy
    included) on the general-text windows of ``base_kl_source: general`` (or a file of passages): windows are
    drawn from (seed, step, micro-batch) as in the SFT guard, the tuned forward on them runs with the gradient
    after the trainer's own loss, and the base forward without. The preference rows have no unlabelled positions of
    their own to hold (``rows`` is refused for these trainers)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super(BaseKLMixin, self).compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.last_task_loss = float((out[0] if return_outputs else out).detach())  # the trainer's own loss
        every = max(1, int(self.base_kl_every))
        if not (model.training and self.base_kl_weight > 0 and self.state.global_step % every == 0):
            return out
        inner = self.accelerator.unwrap_model(model)
        step = self.state.global_step
        micro = self._kl_micro[1] + 1 if getattr(self, "_kl_micro", (None, 0))[0] == step else 0
        self._kl_micro = (step, micro)
        gen = torch.Generator().manual_seed(int(self.args.seed) * 1_000_003 + step * 1009 + micro)
        n_rows = int(self.args.per_device_train_batch_size)
        kl = self._kl_on_own_windows(inner, self._windows(n_rows, gen), n_rows, gen)
        log_metric(self, "base_kl", float(kl.detach()))
        term = self.base_kl_weight * every * kl
        if return_outputs:
            return out[0] + term, out[1]
        return out + term
