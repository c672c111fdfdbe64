"""The spine's loss curve (outputs/<run>/loss_curve.png); drawn by the report's plotter so there is one plot style."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def loss_curve(log_history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    from adapters.evaluation.report import plot_curves

    return plot_curves(log_history, Path(path), title=title)
