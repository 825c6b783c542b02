"""The trainer's own hooks for finished steps: evaluation rows, the metrics writer, and
the watchdog's pet."""

from __future__ import annotations

from collections.abc import Callable

from jaxdml.metrics import MetricsWriter
from jaxdml.training.hooks import Hook, StepInfo


class EvalRows(Hook):
    """Adds train/test accuracy to the rows of every `every`-th step, evaluated on that very
    step's state (a host sync, but only every `every` steps)."""

    def __init__(self, evaluate: Callable, every: int):
        self.evaluate, self.every = evaluate, every
        self.pending: dict[int, dict] = {}

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
