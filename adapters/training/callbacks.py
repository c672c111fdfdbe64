"""Training control: evaluation metrics during training, early stopping with best-checkpoint restore, extra hooks.

``build_trainer`` takes the SFTConfig fields early stopping needs from :func:`config_fields` and installs the
callbacks of :func:`callbacks` plus those its caller passes (the sweep's pruner, through ``train(callbacks=...)``).
Early stopping uses transformers' own ``EarlyStoppingCallback`` with ``load_best_model_at_end``; the atomic
checkpoints of adapters/training/checkpoints.py point ``state.best_model_checkpoint`` at the renamed folder, so the
restore loads the best complete checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from adapters.config import Recipe, RecipeError

REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_report_to(report_to: Any) -> None:
    """A logger named in report_to must be importable; say which package to install instead of failing mid-setup."""
    import importlib.util

    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if str(name) not in INTEGRATION_TO_CALLBACK and str(name) not in ("none", "all"):
            raise RecipeError(
                f"report_to: {name!r} is not a tracker transformers knows; use one of none, tensorboard, "
                + ", ".join(sorted(k for k in INTEGRATION_TO_CALLBACK if k != "tensorboard"))
            )
        pkg = REPORTERS.get(str(name))
        if pkg and importlib.util.find_spec(pkg) is None:
            raise RecipeError(
                f"report_to: {name!r} is not installed (pip install {pkg}); "
                f"or use report_to: tensorboard (the default) or none"
            )


def config_fields(recipe: Recipe, has_eval: bool) -> dict[str, Any]:
    """SFTConfig fields early stopping needs (none without it); the recipe's own values for them are kept."""
    if recipe.early_stopping_patience is None:
        return {}
    if recipe.early_stopping_patience < 1:
        raise RecipeError(f"early_stopping_patience: must be >= 1, got {recipe.early_stopping_patience}")
    if not has_eval:
        raise RecipeError("early_stopping_patience needs a validation split (eval_file) and eval_strategy: steps")
    if recipe.eval_strategy == "steps":
        every = recipe.eval_steps or recipe.logging_steps
        if recipe.save_steps % every:
            raise RecipeError(
                f"early_stopping_patience: save_steps ({recipe.save_steps}) must be a multiple of "
                f"eval_steps ({every}) so that every evaluated step has a checkpoint to restore"
            )
    given = recipe.training  # explicit values only: the library's default False must not count as a refusal
    out = {
        "load_best_model_at_end": given.get("load_best_model_at_end", True),
        "metric_for_best_model": given.get("metric_for_best_model", "eval_loss"),
    }
    if not out["load_best_model_at_end"]:
        raise RecipeError("early_stopping_patience requires load_best_model_at_end: true (it restores the best)")
    return out


class EvalMetrics:
    """Adds eval_perplexity = exp(eval_loss) to every evaluation log, before the loggers see it.

    TRL already logs eval_mean_token_accuracy (and the training mean_token_accuracy).
    """

    @staticmethod
    def make():
        from transformers import TrainerCallback

        class _EvalMetrics(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "eval_loss" in logs and "eval_perplexity" not in logs:
                    loss = float(logs["eval_loss"])
                    logs["eval_perplexity"] = math.exp(loss) if loss < 700 else float("inf")
                    if state.log_history and state.log_history[-1].get("eval_loss") == logs["eval_loss"]:
                        state.log_history[-1]["eval_perplexity"] = logs["eval_perplexity"]

        return _EvalMetrics()


def callbacks(recipe: Recipe) -> list[Any]:
    from transformers import EarlyStoppingCallback

    out: list[Any] = []
    if recipe.early_stopping_patience is not None:
        out.append(
            EarlyStoppingCallback(
                early_stopping_patience=recipe.early_stopping_patience,
                early_stopping_threshold=recipe.early_stopping_threshold,
            )
        )
    return out


def install(trainer, recipe: Recipe, extra: Sequence[Any] = ()) -> None:
    """Put the perplexity callback first (so TensorBoard/wandb/mlflow log it) and add the others, then ``extra``."""
    trainer.callback_handler.callbacks.insert(0, EvalMetrics.make())
    for cb in [*callbacks(recipe), *extra]:
        trainer.add_callback(cb)
