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

A preference recipe (``trainer: dpo | orpo | kto``) maximises held-out preference accuracy instead: after each trial
the tuned adapter scores the recipe's held-out pairs (``eval_file``; ``test_file`` when there is none, with a
warning, since the final eval scores those too) exactly as eval.json's ``preference.tuned.accuracy``: the share of
pairs with log p(chosen) > log p(rejected), log-probs summed (ties between trials go to the larger mean margin).
Its pruner is off: the objective exists only once a trial is trained, and what TRL logs during training
(``eval_loss``, ``rewards/accuracies``) is measured against the reference, with a strict ``>`` that reads 0 at step
0, so it ranks trials on another quantity. Forgetting is the same constraint. The default space is the learning
rate, ``beta`` and the epochs (plus ``r`` / ``lora_alpha`` for a new adapter).

With ``init_adapter`` the adapter's LoRA shape is fixed: the default space leaves ``r`` and ``lora_alpha`` out, and
a searched key of that shape (LORA_KEYS) is refused.

Outputs: trials.csv, trials.md, search.png, sweep.json (``objective`` names what was optimised, on which split, and
the pruner) and <recipe>-best.yaml (the recipe with the best values, runnable as is).
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
# preference trainers: TRL's LoRA rates (5e-6..1e-5) sit inside; beta is DPO/KTO's pull to the reference (ORPO's
# odds-ratio weight)
PREFERENCE_SPACE: dict[str, Any] = {
    "learning_rate": [1.0e-6, 1.0e-4],
    "beta": [0.05, 0.5],
    "r": [4, 8, 16, 32],
    "lora_alpha": [8, 16, 32, 64],
    "num_train_epochs": [1, 3],
}
PRUNER_KEYS = {"pruner_startup_trials": 2, "pruner_warmup_steps": 0}
OPTION_KEYS = {"constrain_forgetting": True}
LOG_KEYS = {"learning_rate", "weight_decay", "beta"}


@dataclass(frozen=True)
class Objective:
    """What a sweep optimises: ``name`` (the trials' column and sweep.json's ``best_<name>``), its direction, the
    held-out file it is measured on, and the pruner that goes with it."""

    name: str
    direction: str
    split: str
    what: str
    pruner: str

    @property
    def label(self) -> str:
        return "held-out preference accuracy" if self.name == "preference_accuracy" else "validation loss"


def objective_of(recipe: Recipe, source: str = "recipe") -> Objective:
    """The sweep objective of this recipe; RecipeError when it has no held-out split to measure it on."""
    if recipe.preference:
        held = recipe.eval_file or recipe.test_file
        if not held:
            raise RecipeError(
                f"{source}: a preference sweep needs held-out pairs: set eval_file (or test_file) to a pair file"
            )
        return Objective(
            name="preference_accuracy",
            direction="maximize",
            split=str(held),
            what="share of held-out pairs with log p(chosen | prompt) > log p(rejected | prompt), log-probs summed "
            "over the answer (eval.json's preference.tuned.accuracy), scored after each trial; ties: larger margin",
            pruner="none: the objective exists only after a trial is trained, and TRL's in-training eval_loss and "
            "rewards/accuracies are relative to the reference (0 at step 0), another quantity",
        )
    if not recipe.eval_file or recipe.eval_strategy == "no":
        raise RecipeError(f"{source}: a sweep needs a validation split: set eval_file and eval_strategy: steps")
    return Objective(
        name="eval_loss",
        direction="minimize",
        split=str(recipe.eval_file),
        what="lowest validation loss logged during the trial",
        pruner="median on eval_loss at every evaluation",
    )


def default_space(recipe: Recipe) -> dict[str, Any]:
    """DEFAULT_SPACE (SFT) or PREFERENCE_SPACE; without the LoRA shape when an adapter is continued."""
    space = dict(PREFERENCE_SPACE if recipe.preference else DEFAULT_SPACE)
    if recipe.init_adapter:
        from adapters.model.lora import LORA_KEYS

        space = {k: v for k, v in space.items() if k not in LORA_KEYS}
    return space


def search_space(recipe: Recipe, source: str = "recipe") -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """({key: spec}, options: pruner settings and constrain_forgetting) from DEFAULT_SPACE and ``recipe.sweep``."""
    raw = {**default_space(recipe), **(recipe.sweep or {})}
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
    if recipe.init_adapter:
        from adapters.model.lora import LORA_KEYS

        shape = next((k for k in space if k in LORA_KEYS and space[k]["kind"] != "fixed"), None)
        if shape:
            raise RecipeError(
                f"{source}: sweep.{shape}: init_adapter {recipe.init_adapter} fixes the adapter's LoRA shape; "
                f"remove {shape} from the search"
            )
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
def write_tables(rows: list[dict[str, Any]], keys: list[str], out: Path, metric: str = "eval_loss") -> None:
    extra = ["margin"] if metric == "preference_accuracy" else []
    cols = ["trial", "state", metric, *extra, "forgetting_rise", "feasible", "steps", *keys]
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


def plot_search(rows: list[dict[str, Any]], out: Path, objective: Objective | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = objective.name if objective else "eval_loss"
    label = objective.label if objective else "validation loss"
    pick = max if objective and objective.direction == "maximize" else min
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=110)
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        pts = [
            (r["trial"], r[metric], r.get("learning_rate"))
            for r in rows
            if r["state"] == state and r[metric] is not None and math.isfinite(r[metric])
        ]
        if pts:
            a.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=state.lower())
            if all(p[2] is not None for p in pts):
                b.scatter([p[2] for p in pts], [p[1] for p in pts], marker=marker, label=state.lower())
    done = [r[metric] for r in rows if r["state"] == "COMPLETE" and r[metric] is not None]
    if done:
        best = [pick(done[: i + 1]) for i in range(len(done))]
        a.plot(
            [r["trial"] for r in rows if r["state"] == "COMPLETE" and r[metric] is not None],
            best,
            label="best so far",
        )
    a.set_xlabel("trial")
    a.set_ylabel(label)
    a.legend()
    b.set_xscale("log")
    b.set_xlabel("learning_rate")
    b.set_ylabel(label)
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
    label: str = "validation loss",
) -> Path:
    raw = load_yaml(recipe_path.read_text(encoding="utf-8")) or {}
    raw.update({k: v for k, v in overrides.items() if k not in ("run_name", "output_root")})
    raw.update(best)
    path = out / f"{recipe_path.stem}-best.yaml"
    header = (
        f"# Best of `adapters sweep {recipe_path.stem}` ({datetime.now():%Y-%m-%d %H:%M}): "
        f"{label} {value:.4f}"
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
    """Optuna TPE over the recipe's search space, forgetting as a constraint; SFT: lowest validation loss, median
    pruning; preference: highest held-out preference accuracy, no pruning. Writes trials.md/csv, search.png,
    sweep.json and the best recipe."""
    import optuna

    from adapters.training.run import TrainingDiverged

    if trials < 1:
        raise RecipeError(f"--trials: must be >= 1, got {trials}")
    objective_spec = objective_of(recipe, str(recipe_path))
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
    log(f"[sweep] objective: {objective_spec.direction} {objective_spec.name} on {objective_spec.split}")
    if recipe.preference and not recipe.eval_file:
        log(
            f"[warn] sweep: no eval_file: trials are scored on test_file's pairs ({recipe.test_file}), which the "
            "final eval scores too; give an eval_file of other pairs for an unbiased held-out figure"
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    constrain = pruner_cfg["constrain_forgetting"]

    def constraints(t) -> tuple[float, ...]:  # <= 0 is feasible (Optuna's convention)
        return tuple(t.user_attrs.get("constraint", (0.0,)))

    pruner = (
        optuna.pruners.NopPruner()
        if recipe.preference
        else optuna.pruners.MedianPruner(
            n_startup_trials=pruner_cfg["pruner_startup_trials"], n_warmup_steps=pruner_cfg["pruner_warmup_steps"]
        )
    )
    study = optuna.create_study(
        direction=objective_spec.direction,
        study_name=out.name,
        sampler=optuna.samplers.TPESampler(seed=recipe.seed, constraints_func=constraints if constrain else None),
        pruner=pruner,
    )
    objective = _Objective(recipe, recipe_path, space, out, constrain, log, objective_spec)
    study.optimize(objective, n_trials=trials, catch=(TrainingDiverged,))
    return _summarise(study, recipe, recipe_path, overrides or {}, space, out, constrain, log, objective_spec)


@dataclass
class _Objective:
    """One trial: train the recipe with the suggested values (its own run dir under the sweep), score it."""

    recipe: Recipe
    recipe_path: Path
    space: dict[str, dict[str, Any]]
    out: Path
    constrain: bool
    log: Any
    objective: Objective | None = None

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
        if self.recipe.preference:
            run = train(t, self.recipe_path)  # no pruner: the objective is scored once the trial is trained
            return self._preference(trial, run)
        run = train(t, self.recipe_path, callbacks=[pruning_callback(trial)])
        history = json.loads((run / "manifest.json").read_text()).get("log_history") or []
        value = best_eval_loss(history)
        trial.set_user_attr("steps", max((h.get("step", 0) for h in history), default=0))
        msg = f"[sweep] trial {trial.number}: best validation loss {value:.4f}"
        if self.constrain:
            msg += self._forgetting(trial, run)
        self.log(msg)
        return value

    def _preference(self, trial, run: Path) -> float:
        """A preference trial: the tuned adapter (loaded once) on the held-out pairs, then on the forgetting probe."""
        import json

        from adapters.evaluation.forgetting import probe
        from adapters.evaluation.preference import held_out_pair_scores
        from adapters.publish.hub import resolve_adapter
        from adapters.publish.rundir import load_tuned

        history = json.loads((run / "manifest.json").read_text()).get("log_history") or []
        trial.set_user_attr("steps", max((h.get("step", 0) for h in history), default=0))
        done = resolve_adapter(run)
        model, tok = load_tuned(done, quantize=True)
        split = self.objective.split if self.objective else self.recipe.eval_file
        scores = held_out_pair_scores(model, tok, done.recipe, split, self.recipe.eval_limit)
        trial.set_user_attr("margin", scores["margin"])
        trial.set_user_attr("accuracy_avg", scores["accuracy_avg"])
        msg = (
            f"[sweep] trial {trial.number}: held-out preference accuracy {scores['accuracy']:.3f} on "
            f"{scores['n']} pairs (length-averaged {scores['accuracy_avg']:.3f}, margin {scores['margin']:.3f})"
        )
        if self.constrain:
            rise = float(probe(model, tok, done.recipe, base=True, log=lambda *_: None, manifest=done.manifest)["rise"])
            msg += self._constrain(trial, rise)
        self.log(msg)
        return float(scores["accuracy"])

    def _forgetting(self, trial, run: Path) -> str:
        """The trial's adapter vs the same model with it disabled, on the recipe's probe: a constraint."""
        from adapters.evaluation.evaluate import evaluate_run

        rise = float(evaluate_run(run, probe_only=True, log=lambda *_: None)["forgetting"]["rise"])
        return self._constrain(trial, rise)

    def _constrain(self, trial, rise: float) -> str:
        limit = self.recipe.forgetting_threshold
        trial.set_user_attr("forgetting_rise", rise)
        trial.set_user_attr("constraint", (rise - limit,))
        ok = rise <= limit
        return f", forgetting {rise:+.1%} ({'feasible' if ok else 'infeasible'}: limit {limit:.0%})"


def _trial_rows(study, metric: str = "eval_loss") -> list[dict[str, Any]]:
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
                metric: value,
                **({"margin": t.user_attrs.get("margin")} if metric == "preference_accuracy" else {}),
                "forgetting_rise": t.user_attrs.get("forgetting_rise"),
                "feasible": None if "constraint" not in t.user_attrs else t.user_attrs["constraint"][0] <= 0,
                "steps": t.user_attrs.get("steps", max(t.intermediate_values, default=None)),
                **t.params,
            }
        )
    return rows


def _summarise(
    study,
    recipe: Recipe,
    recipe_path: Path,
    overrides,
    space,
    out: Path,
    constrain: bool,
    log,
    objective: Objective | None = None,
):
    """Tables and plot of every trial; the best feasible trial (by the objective) becomes the best recipe."""
    from adapters.utils.atomic import write_json

    objective = objective or objective_of(recipe, str(recipe_path))
    rows = _trial_rows(study, objective.name)
    write_tables(rows, list(space), out, objective.name)
    plot_search(rows, out, objective)
    complete = [t for t in study.trials if t.state.name == "COMPLETE" and t.value is not None]
    if not complete:
        raise RuntimeError(f"{out}: no trial completed (see trials.md)")
    feasible = [t for t in complete if t.user_attrs.get("constraint", (0.0,))[0] <= 0]
    if objective.direction == "maximize":  # ties (a few held-out pairs) go to the larger margin
        best = max(feasible or complete, key=lambda t: (t.value, t.user_attrs.get("margin") or -math.inf))
    else:
        best = min(feasible or complete, key=lambda t: t.value)
    if constrain and not feasible:
        log(
            f"[warn] sweep: every trial forgot more than {recipe.forgetting_threshold:.0%} on the probe; the best "
            f"{objective.label} is reported anyway - {_infeasible_advice(recipe)}"
        )
    best_params = {**{k: s["value"] for k, s in space.items() if s["kind"] == "fixed"}, **best.params}
    best_path = write_best_recipe(
        recipe_path, overrides, best_params, best.value, out, best.user_attrs.get("forgetting_rise"), objective.label
    )
    summary = {
        "objective": {
            "name": objective.name,
            "direction": objective.direction,
            "split": objective.split,
            "what": objective.what,
            "pruner": objective.pruner,
        },
        "best_trial": best.number,
        f"best_{objective.name}": best.value,
        "best_forgetting_rise": best.user_attrs.get("forgetting_rise"),
        "best_is_feasible": bool(feasible) if constrain else None,
        "best_params": best_params,
        "best_recipe": str(best_path),
        "trials": rows,
    }
    write_json(out / "sweep.json", summary)
    log(f"[sweep] best trial {best.number}: {objective.label} {best.value:.4f} -> {best_path}")
    return summary


def _infeasible_advice(recipe: Recipe) -> str:
    """What to search instead when every trial forgot too much: the knobs this trainer has."""
    from adapters.evaluation.metrics import guard_accepted

    knobs = ["raise base_kl_weight"] if guard_accepted(recipe) else []
    if recipe.trainer in ("dpo", "kto"):
        knobs.append("search a higher beta")
    knobs.append("lower the learning_rate range")
    return " or ".join([", ".join(knobs[:-1]), knobs[-1]] if len(knobs) > 1 else knobs)
