"""The trainer's own hooks for finished steps: evaluation rows, the metrics writer, and
the watchdog's pet."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxdml.metrics import MetricsWriter
from jaxdml.training.hooks import Hook, StepInfo, until_multiple

SPLITS = ("train", "test")


def evaluation(task: str, predicted: dict[str, np.ndarray], dataset: Any) -> dict[str, float]:
    """Scores of predictions on each split: accuracy for classification; for regression
    rmse and r2 (1 - mse / variance of the split's targets), and `baseline_rmse`, the
    test rmse of predicting the training targets' mean (what a model must beat)."""
    targets = {"train": dataset.y_train, "test": dataset.y_test}
    if task != "regression":
        return {f"{s}_accuracy": float(np.mean(predicted[s] == targets[s])) for s in SPLITS}
    out = {}
    for s in SPLITS:
        y = np.asarray(targets[s], np.float64)
        mse = float(np.mean((np.asarray(predicted[s], np.float64).reshape(y.shape) - y) ** 2))
        out[f"{s}_rmse"] = mse**0.5
        out[f"{s}_r2"] = 1.0 - mse / max(float(np.var(y)), 1e-30)
    mean = float(np.mean(np.asarray(targets["train"], np.float64)))
    out["baseline_rmse"] = float(np.mean((np.asarray(targets["test"]) - mean) ** 2)) ** 0.5
    return out


class EvalRows(Hook):
    """Adds train/test scores (`evaluation`) to the rows of every `every`-th step,
    evaluated on that very step's state (a host sync, but only every `every` steps)."""

    def __init__(self, evaluate: Callable, every: int):
        self.evaluate, self.every = evaluate, every
        self.pending: dict[int, dict] = {}

    def max_fused(self, step: int) -> int:
        return until_multiple(step, self.every)

    def after_step(self, info: StepInfo) -> bool:
        if self.every and info.step % self.every == 0:
            self.pending[info.step] = self.evaluate(info.state)
        return False

    def on_metrics(self, rows: list[dict]) -> None:
        for row in rows:
            row.update(self.pending.pop(row["step"], {}))


class WriteRows(Hook):
    """metrics.jsonl (and TensorBoard) rows (the log lines are jaxdml.training.progress's)."""

    def __init__(self, metrics: MetricsWriter):
        self.metrics = metrics
        self.last_row: dict = {}

    def on_metrics(self, rows: list[dict]) -> None:
        self.metrics.write_rows(rows)
        self.last_row = rows[-1]


class Pet(Hook):
    """Tells the watchdog the loop is making progress."""

    def __init__(self, watchdog):
        self.watchdog = watchdog

    def after_step(self, info: StepInfo) -> bool:
        self.watchdog.pet()
        return False
