"""The one callback protocol of the training loop, and periodic actions built on it.

Everything that runs beside the step plugs in as a `Hook`: fault injection (before a
step), checkpoints, replica checks and preemption (after a step is dispatched), the
metrics writer, the anomaly guard, accounting and the progress line (on finished steps'
metrics). The loop itself knows none of them.

    class CountSkips(Hook):
        def on_metrics(self, rows):
            self.skipped += sum(r["skipped"] for r in rows)

    Loop(..., hooks=[CountSkips(), Periodic(save, every_steps=100)])
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from jaxdml.constants import UNLIMITED_STEPS

TrainState = Any  # jaxdml.training.state.TrainState (not imported: no training import here)


UNLIMITED = UNLIMITED_STEPS  # Hook.max_fused: any number of steps


def until_multiple(step: int, every: int) -> int:
    """Steps from `step` to the next multiple of `every` (UNLIMITED when `every` is 0): a
    hook that acts at multiples of `every` lets a fused call run up to there."""
    return every - step % every if every > 0 else UNLIMITED


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """A step just dispatched. `step` steps are done once it finishes; `state` is its
    result (a future: reading it waits for the step, which the hot path must not do).
    `expedite()` asks the loop to hand the rows through this step to `on_metrics` as soon
    as it finishes, not at the next fetch period (a save's seal waits for them), without
    waiting for it now."""

    step: int
    state: TrainState
    expedite: Callable[[], None] = lambda: None


class Hook:
    """Loop callbacks; every method is a no-op here, override what you need.

    before_step(step, state, batch) -> (state, batch): before step `step + 1` is
        dispatched; may replace the state or the batch (fault injection does).
    after_step(info) -> bool: after a step was dispatched; True asks the loop to stop
        once the steps in flight have finished (preemption).
    on_metrics(rows): host rows of finished steps, in step order, each step exactly once
        (`step`, the step's metrics, `seconds` between consecutive finishes). May raise to
        stop the loop (the anomaly guard asks for a rollback that way).
    max_fused(step) -> int: how many steps from `step` the loop may run in one fused call
        (`train.steps_per_call`) without this hook missing one it must see: after_step
        sees only a call's last step, and before_step is called only for steps that run
        alone. Default: no limit, or 1 for a hook that overrides before_step.
    """

    def max_fused(self, step: int) -> int:
        del step
        return 1 if type(self).before_step is not Hook.before_step else UNLIMITED

    def before_step(self, step: int, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return state, batch

    def after_step(self, info: StepInfo) -> bool:
        del info
        return False

    def on_metrics(self, rows: list[dict]) -> None:
        del rows


@dataclasses.dataclass
class Periodic(Hook):
    """Runs `fn(step, state)` after every `every_steps` steps and/or `every_secs` seconds.

    Step schedules fire when the step count crosses a multiple of `every_steps` (a loop
    that calls after_step once per span of several steps still fires once per multiple).
    The first call only starts the clock: a time-based action runs `every_secs` after the
    loop started, not at once. Multi-process, clocks differ: `agree(due)` turns this
    process's "time is up" into the decision every process takes at the same step
    (jaxdml.liveness.Agreement); the default takes it as it is. `clock` is injectable.
    `expedite_rows`: the rows through the step are asked for early (`StepInfo.expedite`).
    """

    fn: Callable[[int, TrainState], None]
    every_steps: int = 0
    every_secs: float = 0.0
    clock: Callable[[], float] = time.monotonic
    agree: Callable[[bool], bool] | None = None
    expedite_rows: bool = False
    _last_time: float | None = None
    _last_step: int | None = None

    def max_fused(self, step: int) -> int:
        """A step schedule ends a fused call at its multiple (saves stay on it)."""
        return until_multiple(step, self.every_steps)

    def after_step(self, info: StepInfo) -> bool:
        now = self.clock()
        if self._last_time is None:
            self._last_time = now
        due_steps = self.every_steps > 0 and self._crossed(info.step)
        due_secs = self.every_secs > 0 and now - self._last_time >= self.every_secs
        if self.agree is not None and self.every_secs > 0:
            due_secs = self.agree(due_secs)
        self._last_step = info.step
        if due_steps or due_secs:
            self._last_time = now
            if self.expedite_rows:
                info.expedite()
            self.fn(info.step, info.state)
        return False

    def _crossed(self, step: int) -> bool:
        if self._last_step is None or step <= self._last_step:
            return step % self.every_steps == 0
        return step // self.every_steps > self._last_step // self.every_steps


@dataclasses.dataclass
class BeforeStep(Hook):
    """Adapts a plain `fn(step, state, batch) -> (state, batch)` (the fault injector's)."""

    fn: Callable[[int, TrainState, dict], tuple[TrainState, dict]]
    # step -> the steps from it that fn leaves alone (None: fn may act at every step)
    fusable: Callable[[int], int] | None = None

    def max_fused(self, step: int) -> int:
        return 1 if self.fusable is None else self.fusable(step)

    def before_step(self, step: int, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self.fn(step, state, batch)


@dataclasses.dataclass
class OnMetrics(Hook):
    """Adapts a plain `fn(rows)`."""

    fn: Callable[[list[dict]], None]

    def on_metrics(self, rows: list[dict]) -> None:
        self.fn(rows)


@dataclasses.dataclass
class StopWhen(Hook):
    """Asks the loop to stop once `predicate(step)` is true (a preemption notice)."""

    predicate: Callable[[int], bool]

    def after_step(self, info: StepInfo) -> bool:
        return bool(self.predicate(info.step))
