"""Plots of a run: loss curves, task metrics base vs tuned, confusion matrices (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters.evaluation import metrics as M


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_task_metrics(evaluation: dict[str, Any], path: Path) -> Path | None:
    keys = [k for k in ("exact_match", "accuracy", "macro_f1", "rouge_l") if k in evaluation.get("tuned", {})]
    if not keys:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    width = 0.38
    for i, side in enumerate(s for s in ("base", "tuned") if s in evaluation):
        vals = [evaluation[side].get(k, 0.0) for k in keys]
        xs = [j + (i - 0.5) * width for j in range(len(keys))]
        bars = ax.bar(xs, vals, width, label=side)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylim(0, 1.1)
    ax.set_title(f"held-out task metrics (n={evaluation['tuned']['n']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(scores: dict[str, Any], path: Path, title: str) -> Path:
    plt = _plt()
    classes, cm = scores["classes"], scores["confusion"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(classes), 1.0 + 0.6 * len(classes)), dpi=110)
    ax.imshow(cm, cmap="Blues")
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(log_history: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Training and validation loss in one figure (the overfitting check reads the same two curves)."""
    train, val = M.loss_curves(log_history)
    if not train and not val:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", marker=".")
    if val:
        ax.plot(*zip(*val), label="validation loss", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
