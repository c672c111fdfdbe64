"""TRL internals this package relies on. Checked against trl 1.16.0 (tests/test_compat.py fails when they change).

- ``trl.trainer.utils._use_triton``: the fused LM head's "score only the labelled positions" decision, widened to
  eager CPU/MPS by ``enable_trained_positions_only``.
- ``trl.trainer.utils._ChunkedLogProbFunction``: the fused LM head's kernel, called as ``.apply(hidden, weight, bias,
  targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)`` and returning ``(log_probs,
  entropy, log_sum_sq_probs, mean_logits, is_top1)``; ``trained_positions_only`` swaps in ``MaterializedLogProb``.
- ``SFTTrainer._metrics``: the per-mode lists ``SFTTrainer.log`` averages into each log line; ``log_metric``
  appends to it.
- The trainers' constructors (``SFTTrainer``, ``DPOTrainer``, ``KTOTrainer``; ``trl.experimental`` for ORPO) cast
  the trainable tensors of a quantized model to bfloat16 in place (QLoRA's recipe); ``exact_trainable`` puts the
  values back.
- ``SFTTrainer._total_train_tokens``: the running count logged as ``num_tokens``, set to 0 in ``__init__`` and kept
  in no checkpoint file; ``train_tokens`` / ``restore_train_tokens`` read it for the checkpoint marker and put it
  back on resume.
"""

from __future__ import annotations

from contextlib import contextmanager


def compact_hook_available() -> bool:
    """Whether this TRL has the module-level ``_use_triton`` switch that ``enable_trained_positions_only`` widens."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:  # pragma: no cover
        return False
    return callable(getattr(trl_utils, "_use_triton", None))


def enable_trained_positions_only(on: bool = True) -> None:
    """Let TRL's fused LM head keep only the labelled positions on CPU/MPS as it does on Triton devices.

    TRL 1.16 (``trl.trainer.utils``, fused LM head) decides with ``_use_triton(device)`` whether to gather the
    positions that carry a label before the vocabulary projection; off Triton it projects every position to keep
    tile shapes fixed for compiled backends (Neuron). Eager CPU/MPS has no such constraint, so we widen that
    decision there; the kernel choice (``trl.kernels.chunked_logprob._use_triton``) is untouched, so the torch
    tiles still run. Same loss and gradients (tested), a fraction of the LM-head work. ``on=False`` restores TRL's.
    """
    import torch
    from trl.trainer import utils as trl_utils

    current = trl_utils._use_triton
    orig = getattr(current, "_adapters_orig", current)
    if not on:
        trl_utils._use_triton = orig
        return
    if current is not orig:
        return

    def use_compact(device: torch.device) -> bool:
        return device.type in ("cpu", "mps") or orig(device)

    use_compact._adapters_orig = orig  # type: ignore[attr-defined]
    trl_utils._use_triton = use_compact


# Logits of at most this many elements ([labelled positions, vocabulary]) are materialised; two such fp32 tensors live
# at once in the forward, one until backward: 2**26 elements = 256 MiB each. Only for a trained LM head (or bias):
# a frozen head, the LoRA case, goes through the lean kernel below at any size.
MATERIALIZE_MAX_ELEMENTS = 2**26
# The lean kernel's logits tile: rows of [rows, vocabulary] fp32 computed at once (2**24 = 64 MiB; 64 rows of Gemma's
# 262k vocabulary). Two tiles live at once in the forward; nothing of [N, vocabulary] is kept for the backward.
LEAN_TILE_ELEMENTS = 2**24


def _tile_stats(z, targets, outputs):
    """Shared by both kernels, on one [n, V] fp32 logits tile (already scaled; modified in place): target logit,
    optional outputs, the row maxima and the exp tile and its row sums."""
    import torch

    target = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    top1 = z.argmax(-1) == targets if "is_top1" in outputs else None  # the first maximum, as TRL's kernel
    mean = z.mean(-1) if "mean_logits" in outputs else None
    z.sub_(z.amax(-1, keepdim=True).detach())  # in place: one [n, V] buffer for the logits
    m = target - z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # the row maxima
    e = torch.exp(z)
    s = e.sum(-1)
    entropy = None
    if "entropy" in outputs:  # log s - E_p[z - max], a batched dot product: no third [n, V] buffer
        entropy = torch.log(s) - torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1) / s
    sq = torch.log((e * e).sum(-1)) - 2 * torch.log(s) if "log_sum_sq_probs" in outputs else None
    return target, m, e, s, entropy, sq, mean, top1


def _materialized_class():
    import torch

    class _Materialized(torch.autograd.Function):
        """Log-probabilities from one materialised logits matrix; its softmax is kept for the backward."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, scale, outputs):
            ctx.set_materialize_grads(False)
            z = torch.nn.functional.linear(
                hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)
            )
            z = z.float()
            if scale != 1.0:
                z.mul_(scale)
            target, m, e, s, entropy, sq, mean, top1 = _tile_stats(z, targets, outputs)
            del z
            p = e.div_(s.unsqueeze(-1))
            ctx.save_for_backward(hidden, weight, bias, targets, p)
            ctx.scale = scale
            log_probs = target - m - torch.log(s)
            ctx.mark_non_differentiable(*(x for x in (entropy, sq, mean, top1) if x is not None))
            return log_probs, entropy, sq, mean, top1

        @staticmethod
        def backward(ctx, grad_log_probs, grad_entropy, *_):
            if grad_entropy is not None:
                raise NotImplementedError("MaterializedLogProb: no gradient through the entropy; unpatch TRL")
            hidden, weight, bias, targets, p = ctx.saved_tensors
            if grad_log_probs is None:
                return None, None, None, None, None, None
            g = grad_log_probs.float()
            grad_z = p.mul_(-g.unsqueeze(-1))  # d log p_t / d z = onehot(t) - p; p is not needed again
            grad_z.scatter_add_(-1, targets.unsqueeze(-1), g.unsqueeze(-1))
            if ctx.scale != 1.0:
                grad_z.mul_(ctx.scale)
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            grad_h = (grad_z @ weight.float()).to(hidden.dtype) if need_h else None
            grad_w = (grad_z.t() @ hidden.float()).to(weight.dtype) if need_w else None
            grad_b = grad_z.sum(0).to(bias.dtype) if need_b else None
            return grad_h, grad_w, grad_b, None, None, None

    return _Materialized


def _lean_class():
    import torch

    class _Lean(torch.autograd.Function):
        """Log-probabilities for a frozen LM head, in tiles of rows, keeping only ``[N, hidden]`` for the backward.

        d log p_t / d h = scale * (W[t] - p @ W): the second term is one [n, V] x [V, H] product per tile, the same
        matmul the materialised kernel runs in its backward (grad_z @ W), moved into the forward while the tile's
        softmax is still there. So: two vocabulary matmuls per position as before, and the [N, V] softmax is never
        held; peak logits memory is two tiles, whatever N.
        """

        @staticmethod
        def forward(ctx, hidden, weight, targets, scale, outputs):
            ctx.set_materialize_grads(False)
            n = hidden.shape[0]
            rows = max(1, LEAN_TILE_ELEMENTS // max(weight.shape[0], 1))
            w = weight.to(hidden.dtype)
            wf = weight.float()
            parts: list[list] = [[] for _ in range(6)]
            pw = hidden.new_empty((n, weight.shape[1]), dtype=torch.float32)
            for i in range(0, n, rows):
                z = torch.nn.functional.linear(hidden[i : i + rows], w).float()
                if scale != 1.0:
                    z.mul_(scale)
                t = targets[i : i + rows]
                target, m, e, s, entropy, sq, mean, top1 = _tile_stats(z, t, outputs)
                del z
                torch.matmul(e.div_(s.unsqueeze(-1)), wf, out=pw[i : i + rows])  # p @ W
                del e
                for k, x in enumerate((target - m - torch.log(s), entropy, sq, mean, top1)):
                    parts[k].append(x)
            if n == 0:  # no labelled position in the batch: empty outputs, still connected to the graph
                names = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
                kinds = (torch.float32,) * 4 + (torch.bool,)
                out = [
                    hidden.new_zeros((0,), dtype=k) if j == 0 or name in outputs else None
                    for j, (name, k) in enumerate(zip(names, kinds))
                ]
            else:
                out = [None if xs[0] is None else torch.cat(xs) for xs in parts[:5]]
            ctx.save_for_backward(weight, targets, pw)
            ctx.scale, ctx.h_dtype = scale, hidden.dtype
            ctx.mark_non_differentiable(*(x for x in out[1:] if x is not None))
            return tuple(out)

        @staticmethod
        def backward(ctx, grad_log_probs, grad_entropy, *_):
            if grad_entropy is not None:
                raise NotImplementedError("MaterializedLogProb: no gradient through the entropy; unpatch TRL")
            weight, targets, pw = ctx.saved_tensors
            if grad_log_probs is None or not ctx.needs_input_grad[0]:
                return None, None, None, None, None
            g = grad_log_probs.float().unsqueeze(-1) * ctx.scale
            grad_h = (weight.float()[targets] - pw).mul_(g)
            return grad_h.to(ctx.h_dtype), None, None, None, None

    return _Lean


class MaterializedLogProb:
    """TRL's ``ChunkedLogProbFunction`` for eager CPU/MPS when the labelled positions' logits fit in memory.

    TRL's kernel never materialises the ``[N, vocab]`` logits: its backward recomputes every tile, so its LM head
    costs three matmuls instead of two, plus tile bookkeeping in eager torch. With only the labelled positions left
    (``_use_triton`` widened) the logits are small (demo: ~128 x 262k), and one matmul with in-place softmax does
    the same work. Same outputs and gradients (tests/test_compat.py). The entropy, as every extra output, comes
    without a gradient (SFTTrainer only logs it; a backward through it raises). Anything else (CUDA, large N,
    soft-capped logits) goes to TRL's kernel.
    """

    original = None  # TRL's class, set by trained_positions_only
    _fn = None
    _lean = None

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0, outputs=None):
        orig = MaterializedLogProb.original
        if outputs is None:
            from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS as outputs
        frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
        big = hidden.shape[0] * weight.shape[0] > MATERIALIZE_MAX_ELEMENTS and not frozen
        if orig is not None and (hidden.device.type not in ("cpu", "mps") or big or softcap is not None):
            return orig.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs)
        if frozen and bias is None:  # LoRA: the head is frozen; nothing of [N, vocabulary] outlives the forward
            if MaterializedLogProb._lean is None:
                MaterializedLogProb._lean = _lean_class()
            return MaterializedLogProb._lean.apply(hidden, weight, targets, logit_scale / temperature, tuple(outputs))
        if MaterializedLogProb._fn is None:
            MaterializedLogProb._fn = _materialized_class()
        return MaterializedLogProb._fn.apply(hidden, weight, bias, targets, logit_scale / temperature, tuple(outputs))


@contextmanager
def trained_positions_only(on: bool):
    """``enable_trained_positions_only`` for the duration of a block only, with the labelled positions' logits
    computed in one matmul where they fit (``MaterializedLogProb``); TRL's own decision and kernel are back
    afterwards, so a run leaves no changed module state behind it."""
    if not on:
        yield
        return
    from trl.trainer import utils as trl_utils

    before, kernel = trl_utils._use_triton, trl_utils._ChunkedLogProbFunction
    enable_trained_positions_only(True)
    if kernel is not MaterializedLogProb:
        MaterializedLogProb.original = kernel
        trl_utils._ChunkedLogProbFunction = MaterializedLogProb
    try:
        yield
    finally:
        trl_utils._use_triton, trl_utils._ChunkedLogProbFunction = before, kernel


@contextmanager
def exact_trainable(model):
    """Around a TRL trainer's constructor: the trainable tensors come out with the values they went in with.

    On a quantized base TRL 1.16 rounds every trainable tensor to bfloat16 in its constructor (``param.data =
    param.data.to(torch.bfloat16)``). Casting back to our ``adapter_dtype`` afterwards restores the dtype, not the
    bits: a continued adapter (``--init_adapter``) would start 2**-8 relative away from the adapter it continues,
    and for DPO away from TRL's ``ref`` copy of it, made before the cast, so the policy would not equal the
    reference at step 0. A tensor the constructor left in its dtype is left alone."""
    saved = {n: p.data for n, p in model.named_parameters() if p.requires_grad}
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            old = saved.get(n)
            if old is not None and p.data.dtype != old.dtype and p.data.shape == old.shape:
                p.data = old


def log_metric(trainer, name: str, value: float, mode: str = "train") -> None:
    """Add one value to the metric ``name`` that SFTTrainer averages into its next log line (as it does for
    ``entropy`` and ``mean_token_accuracy``); trl.experimental's ORPOTrainer keeps them in ``_stored_metrics``."""
    store = getattr(trainer, "_metrics", None)
    if store is None:
        store = trainer._stored_metrics
    store[mode][name].append(value)


def train_tokens(trainer) -> int | None:
    """TRL's running ``num_tokens`` (None for a trainer that keeps none)."""
    n = getattr(trainer, "_total_train_tokens", None)
    return None if n is None else int(n)


def restore_train_tokens(trainer, n: int) -> None:
    """Continue ``num_tokens`` from a checkpoint's count instead of 0."""
    trainer._total_train_tokens = int(n)
