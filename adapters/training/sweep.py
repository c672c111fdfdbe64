"""`adapters sweep RECIPE --trials N`: Optuna search over LoRA and training hyperparameters.

TPE sampler, median pruner fed by the validation loss at every evaluation (a TrainerCallback reports it and raises
``optuna.TrialPruned``). The objective is the lowest validation loss of the trial. Each trial is a normal run under
``outputs/sweep-<recipe>-<time>/trial-NNN/`` (task scoring and the quantization probe are skipped to save time).

The search space is the recipe's ``sweep:`` mapping on top of DEFAULT_SPACE. Per key:

- ``[low, high]``: a range (integers if both are integers; learning_rate is searched on a log scale);
- ``[a, b, c, ...]`` or a list of strings: choices;
- ``{low: .., high: .., log: true, step: ..}`` or ``{choices: [...]}``: explicit;
- a single value: fixed. ``null`` removes a default key from the search.

``pruner_startup_trials`` (default 2) and ``pruner_warmup_steps`` (default 0) in the same mapping tune the pruner.

Forgetting is a constraint, not an afterthought: each finished trial is scored on the forgetting probe
(adapters/evaluation/forgetting.py); a rise above the recipe's ``forgetting_threshold`` makes the trial infeasible for
Optuna's TPE sampler (``constraints_func``) and for the choice of the best trial. Low validation loss bought by
forgetting general text is not "best". ``constrain_forgetting: false`` in the mapping turns this off.

Outputs: trials.csv, trials.md, search.png and <recipe>-best.yaml (the recipe with the best values, runnable as is).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from adapters.config import Recipe, RecipeError, load_yaml, recipe_keys

DEFAULT_SPACE: dict[str, Any] = {
    "learning_rate": [5.0e-5, 1.0e-3],  # log scale; LoRA tolerates ~10x a full fine-tune's rate
    "r": [4, 8, 16, 32],
    "lora_alpha": [8, 16, 32, 64],
    "lora_dropout": [0.0, 0.2],
    "num_train_epochs": [1, 3],
}
PRUNER_KEYS = {"pruner_startup_trials": 2, "pruner_warmup_steps": 0}
OPTION_KEYS = {"constrain_forgetting": True}
LOG_KEYS = {"learning_rate", "weight_decay"}


def search_space(recipe: Recipe, source: str = "recipe") -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """({key: spec}, options: pruner settings and constrain_forgetting) from DEFAULT_SPACE and ``recipe.sweep``."""
    raw = {**DEFAULT_SPACE, **(recipe.sweep or {})}
    pruner: dict[str, Any] = {k: int(raw.pop(k, v)) for k, v in PRUNER_KEYS.items()}
    for k, v in OPTION_KEYS.items():
        val = raw.pop(k, v)
        if not isinstance(val, bool):
            raise RecipeError(f"{source}: sweep.{k}: expected true or false, got {val!r}")
        pruner[k] = val
    keys = set(recipe_keys(recipe.trainer)) - {"sweep"}
    space: dict[str, dict[str, Any]] = {}
    for key, v in raw.items():
        where = f"{source}: sweep.{key}"
        if key not in keys:
            raise RecipeError(f"{where}: not a recipe key that can be searched")
        if v is None:
            continue
        if isinstance(v, dict):
            if "choices" in v:
                spec = {"kind": "choice", "choices": list(v["choices"])}
            elif "low" in v and "high" in v:
                spec = {
                    "kind": "range",
                    "low": v["low"],
                    "high": v["high"],
                    "log": bool(v.get("log", key in LOG_KEYS)),
                    "step": v.get("step"),
                }
            else:
                raise RecipeError(f"{where}: a mapping needs low and high, or choices; got {v!r}")
        elif isinstance(v, list):
            if not v:
                raise RecipeError(f"{where}: empty list")
            numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            if len(v) == 2 and numeric:
                spec = {"kind": "range", "low": v[0], "high": v[1], "log": key in LOG_KEYS, "step": None}
            else:
                spec = {"kind": "choice", "choices": v}
        else:
            spec = {"kind": "fixed", "value": v}
        if spec["kind"] == "range":
            if not all(isinstance(spec[x], (int, float)) for x in ("low", "high")) or spec["low"] > spec["high"]:
                raise RecipeError(f"{where}: expected low <= high numbers, got {v!r}")
            if spec["log"] and spec["low"] <= 0:
                raise RecipeError(f"{where}: a log-scale range needs low > 0, got {spec['low']}")
            spec["int"] = isinstance(spec["low"], int) and isinstance(spec["high"], int)
        space[key] = spec
    if recipe.max_steps > 0 and "num_train_epochs" in space:
        del space["num_train_epochs"]  # max_steps wins over epochs: searching epochs would change nothing
    return space, pruner


def suggest(trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, s in space.items():
        if s["kind"] == "fixed":
            out[key] = s["value"]
        elif s["kind"] == "choice":
            out[key] = trial.suggest_categorical(key, s["choices"])
        elif s["int"]:
            out[key] = trial.suggest_int(key, s["low"], s["high"], log=s["log"], step=s["step"] or 1)
        else:
            out[key] = trial.suggest_float(key, float(s["low"]), float(s["high"]), log=s["log"], step=s["step"])
    return out


def pruning_callback(trial):
    import optuna
    from transformers import TrainerCallback

    class _Prune(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kw):
            loss = (metrics or {}).get("eval_loss")
            if loss is None:
                return
            trial.report(float(loss), state.global_step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"eval_loss {loss:.4f} at step {state.global_step} is worse than the median")

    return _Prune()


def best_eval_loss(log_history: list[dict[str, Any]]) -> float:
    losses = [float(h["eval_loss"]) for h in log_history if "eval_loss" in h]
    return min(losses) if losses else math.inf


# ---------------------------------------------------------------------------------------------------- outputs
def write_tables(rows: list[dict[str, Any]], keys: list[str], out: Path) -> None:
    cols = ["trial", "state", "eval_loss", "forgetting_rise", "feasible", "steps", *keys]
    with open(out / "trials.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in cols})

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    (out / "trials.md").write_text("\n".join(lines) + "\n")


def plot_search(rows: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=110)
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        pts = [
            (r["trial"], r["eval_loss"], r.get("learning_rate"))
            for r in rows
            if r["state"] == state and r["eval_loss"] is not None and math.isfinite(r["eval_loss"])
        ]
        if pts:
            a.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=state.lower())
            if all(p[2] is not None for p in pts):
                b.scatter([p[2] for p in pts], [p[1] for p in pts], marker=marker, label=state.lower())
    done = [r["eval_loss"] for r in rows if r["state"] == "COMPLETE" and r["eval_loss"] is not None]
    if done:
        best = [min(done[: i + 1]) for i in range(len(done))]
        a.plot(
            [r["trial"] for r in rows if r["state"] == "COMPLETE" and r["eval_loss"] is not None],
            best,
            label="best so far",
        )
    a.set_xlabel("trial")
    a.set_ylabel("best validation loss")
    a.legend()
    b.set_xscale("log")
    b.set_xlabel("learning_rate")
    b.set_ylabel("best validation loss")
    fig.tight_layout()
    fig.savefig(out / "search.png")
    plt.close(fig)
    return out / "search.png"


def write_best_recipe(
    recipe_path: Path,
    overrides: dict[str, Any],
    best: dict[str, Any],
    value: float,
    out: Path,
    rise: float | None = None,
) -> Path:
    raw = load_yaml(recipe_path.read_text(encoding="utf-8")) or {}
    raw.update({k: v for k, v in overrides.items() if k not in ("run_name", "output_root")})
    raw.update(best)
    path = out / f"{recipe_path.stem}-best.yaml"
    header = (
        f"# Best of `adapters sweep {recipe_path.stem}` ({datetime.now():%Y-%m-%d %H:%M}): "
        f"validation loss {value:.4f}"
        + ("" if rise is None else f", forgetting-probe rise {rise:+.1%}")
        + f"\n# Run: adapters train {path}\n"
    )
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------- sweep
def sweep(
    recipe: Recipe,
    recipe_path: Path,
    trials: int,
    overrides: dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
    log=print,
) -> dict[str, Any]:
    """Optuna TPE over the recipe's search space, median pruning on validation loss, forgetting as a constraint;
    writes trials.md/csv, search.png, sweep.json and the best recipe."""
    import optuna

    from adapters.training.run import TrainingDiverged

    if trials < 1:
        raise RecipeError(f"--trials: must be >= 1, got {trials}")
    if not recipe.eval_file or recipe.eval_strategy == "no":
        raise RecipeError(f"{recipe_path}: a sweep needs a validation split: set eval_file and eval_strategy: steps")
    space, pruner_cfg = search_space(recipe, str(recipe_path))
    out = (
        Path(out_dir)
        if out_dir
        else Path(recipe.output_root) / f"sweep-{recipe_path.stem}-{datetime.now():%Y%m%d-%H%M%S}"
    )
    out.mkdir(parents=True, exist_ok=True)
    log(
        f"[sweep] {trials} trials -> {out}; space: "
        + ", ".join(f"{k}={s.get('choices') or s.get('value') or [s['low'], s['high']]}" for k, s in space.items())
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    constrain = pruner_cfg["constrain_forgetting"]

    def constraints(t) -> tuple[float, ...]:  # <= 0 is feasible (Optuna's convention)
        return tuple(t.user_attrs.get("constraint", (0.0,)))

    study = optuna.create_study(
        direction="minimize",
        study_name=out.name,
        sampler=optuna.samplers.TPESampler(seed=recipe.seed, constraints_func=constraints if constrain else None),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=pruner_cfg["pruner_startup_trials"], n_warmup_steps=pruner_cfg["pruner_warmup_steps"]
        ),
    )
    objective = _Objective(recipe, recipe_path, space, out, constrain, log)
    study.optimize(objective, n_trials=trials, catch=(TrainingDiverged,))
    return _summarise(study, recipe, recipe_path, overrides or {}, space, out, constrain, log)


@dataclass
class _Objective:
    """One trial: train the recipe with the suggested values (its own run dir under the sweep), score it."""

    recipe: Recipe
    recipe_path: Path
    space: dict[str, dict[str, Any]]
    out: Path
    constrain: bool
    log: Any

    def __call__(self, trial) -> float:
        import json

        from adapters.training.run import train

        params = suggest(trial, self.space)
        t = dataclasses.replace(
            self.recipe,
            **params,
            run_name=f"trial-{trial.number:03d}",
            output_root=str(self.out),
            eval_after_train=False,
            eval_base=False,
            quant_probe=False,
        )
        self.log(
            f"[sweep] trial {trial.number}: "
            + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        )
        run = train(t, self.recipe_path, callbacks=[pruning_callback(trial)])
        history = json.loads((run / "manifest.json").read_text()).get("log_history") or []
        value = best_eval_loss(history)
        trial.set_user_attr("steps", max((h.get("step", 0) for h in history), default=0))
        msg = f"[sweep] trial {trial.number}: best validation loss {value:.4f}"
        if self.constrain:
            msg += self._forgetting(trial, run)
        self.log(msg)
        return value

    def _forgetting(self, trial, run: Path) -> str:
        """The trial's adapter vs the same model with it disabled, on the recipe's probe: a constraint."""
        from adapters.evaluation.evaluate import evaluate_run

        limit = self.recipe.forgetting_threshold
        rise = float(evaluate_run(run, probe_only=True, log=lambda *_: None)["forgetting"]["rise"])
        trial.set_user_attr("forgetting_rise", rise)
        trial.set_user_attr("constraint", (rise - limit,))
        ok = rise <= limit
        return f", forgetting {rise:+.1%} ({'feasible' if ok else 'infeasible'}: limit {limit:.0%})"


def _trial_rows(study) -> list[dict[str, Any]]:
    rows = []
    for t in study.trials:
        value = (
            t.value
            if t.value is not None
            else (max(t.intermediate_values.items())[1] if t.intermediate_values else None)
        )
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "eval_loss": value,
                "forgetting_rise": t.user_attrs.get("forgetting_rise"),
                "feasible": None if "constraint" not in t.user_attrs else t.user_attrs["constraint"][0] <= 0,
                "steps": t.user_attrs.get("steps", max(t.intermediate_values, default=None)),
                **t.params,
            }
        )
    return rows


def _summarise(study, recipe: Recipe, recipe_path: Path, overrides, space, out: Path, constrain: bool, log):
    """Tables and plot of every trial; the best feasible trial (lowest validation loss) becomes the best recipe."""
    from adapters.utils.atomic import write_json

    rows = _trial_rows(study)
    write_tables(rows, list(space), out)
    plot_search(rows, out)
    complete = [t for t in study.trials if t.state.name == "COMPLETE" and t.value is not None]
    if not complete:
        raise RuntimeError(f"{out}: no trial completed (see trials.md)")
    feasible = [t for t in complete if t.user_attrs.get("constraint", (0.0,))[0] <= 0]
    best = min(feasible or complete, key=lambda t: t.value)
    if constrain and not feasible:
        log(
            f"[warn] sweep: every trial forgot more than {recipe.forgetting_threshold:.0%} on the probe; the best "
            "validation loss is reported anyway - raise base_kl_weight or lower the learning_rate range"
        )
    best_params = {**{k: s["value"] for k, s in space.items() if s["kind"] == "fixed"}, **best.params}
    best_path = write_best_recipe(
        recipe_path, overrides, best_params, best.value, out, best.user_attrs.get("forgetting_rise")
    )
    summary = {
        "best_trial": best.number,
        "best_eval_loss": best.value,
        "best_forgetting_rise": best.user_attrs.get("forgetting_rise"),
        "best_is_feasible": bool(feasible) if constrain else None,
        "best_params": best_params,
        "best_recipe": str(best_path),
        "trials": rows,
    }
    write_json(out / "sweep.json", summary)
    log(f"[sweep] best trial {best.number}: validation loss {best.value:.4f} -> {best_path}")
    return summary
