"""Speed levers of the preference trainers (DPO and KTO: TRL 1.16 scores both through its fused LM head).

TRL's ``DPOTrainer`` / ``KTOTrainer`` call the model with ``labels`` = the completion tokens (prompt and padding
-100) and ``fused_lm_head=True``, for the policy and for the reference. Off Triton devices TRL's fused head projects
every position onto the vocabulary (to keep tile shapes fixed for compiled backends) and recomputes every tile in
its backward; on Gemma's 262k vocabulary that is most of a small model's step. The levers (exact; the precompute not
on an 8-bit base):

- ``trained_positions_only`` (the SFT switch, ``adapters/compat/trl.py``): only completion positions go through the
  LM head, policy and reference alike: no logits for prompt tokens. With a frozen head (LoRA) the log-probs come
  from the lean tiled kernel, which keeps ``[N, hidden]`` instead of the ``[N, vocabulary]`` softmax for the
  backward.
- ``precompute_ref_log_probs`` (a DPOConfig / KTOConfig key, our default true in config/libraries.py, false on an
  8-bit base): the reference is frozen, so TRL computes its log-probs once, in the trainer's constructor, and a
  step runs the policy only. Not exact on an 8-bit base: LLM.int8 chooses its outlier columns from the whole batch,
  so a pair scored in the precompute's batch and again in a shuffled training batch gets other log-probs.
  ``constructing`` puts the switch above around that constructor, so the precompute also scores completion
  positions only (the training loop's switch, run.py, starts after it).

ORPO (``trl.experimental.orpo``) computes its logits itself: none of this applies, and the report says so.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from adapters.compat.trl import trained_positions_only
from adapters.training import speed

FUSED_HEAD_TRAINERS = ("dpo", "kto")  # trainers whose TRL class scores through trl.trainer.utils' fused LM head


def plan(recipe) -> dict[str, Any]:
    """The preference run's switches, in the manifest's ``fast_path`` form (``{name: {value, source, why}}``)."""
    p = speed.Plan()
    if recipe.trainer in FUSED_HEAD_TRAINERS:
        speed._trained_positions_only(p, {"trained_positions_only": recipe.trained_positions_only}, _cuda())
    else:
        p.set("trained_positions_only", False, f"{recipe.trainer}: TRL's trainer computes its own logits", "trl")
    fused = recipe.trainer in FUSED_HEAD_TRAINERS
    pre = bool(getattr(recipe, "precompute_ref_log_probs", False)) if fused else False
    given = "precompute_ref_log_probs" in (recipe.training or {})
    if not fused:
        why = f"{recipe.trainer}: no reference model"
    elif pre:
        why = "the frozen reference's log-probs computed once before training"
    elif recipe.load_in_8bit and not given:
        why = (
            "8-bit base: LLM.int8's log-probs depend on the other rows of the batch, so the reference runs in each "
            "training batch (exact at step 0: policy = reference)"
        )
    else:
        why = "the reference runs in every step"
    p.set("precompute_ref_log_probs", pre, why, "recipe" if given else "ours")
    return p.report()


def _cuda() -> bool:
    return torch.cuda.is_available()


def on(fast_path: dict[str, Any]) -> bool:
    """Whether ``trained_positions_only`` is on in a ``fast_path`` report."""
    return bool((fast_path.get("trained_positions_only") or {}).get("value"))


@contextmanager
def constructing(fast_path: dict[str, Any]):
    """Around the preference trainer's constructor: TRL's reference precompute runs there and scores completion
    positions only when the switch is on (the switch is restored afterwards, as around ``trainer.train()``)."""
    with trained_positions_only(on(fast_path)):
        yield
