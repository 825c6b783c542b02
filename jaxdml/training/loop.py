"""The plain training loop with a bounded dispatch depth and periodic hooks."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import logging
from jax.sharding import Mesh

from jaxdml.data import GlobalBatcher
from jaxdml.training.state import TrainState, to_host
from jaxdml.training.step import StepFn


@dataclasses.dataclass
class Periodic:
    """Runs `fn(step, state)` every `every_steps` steps and/or `every_secs` seconds."""

    fn: Callable[[int, TrainState], None]
    every_steps: int = 0
    every_secs: float = 0.0
    clock: Callable[[], float] = time.monotonic
    _last_time: float | None = None

    def __call__(self, step: int, state: TrainState) -> None:
        now = self.clock()
        if self._last_time is None:
            self._last_time = now
        due_steps = self.every_steps > 0 and step % self.every_steps == 0
        due_secs = self.every_secs > 0 and now - self._last_time >= self.every_secs
        if due_steps or due_secs:
            self._last_time = now
            self.fn(step, state)


class Loop:
    """Runs steps from `state.step` to `num_steps`.

    At most `dispatch_depth` steps are in flight: before dispatching step t the
    loop waits for step t - depth (unbounded async dispatch of collectives
    deadlocks XLA's CPU rendezvous). Metrics of each finished step go to
    `on_metrics(step, metrics)`; hooks run after every dispatch. `last_good`
    is the newest (step, state) whose step finished without error: recovery
    starts from it.
    """

    def __init__(
        self,
        step_fn: StepFn,
        batcher: GlobalBatcher,
        mesh: Mesh,
        num_steps: int,
        on_metrics: Callable[[int, dict], None],
        hooks: list[Callable[[int, TrainState], None]] = (),
        dispatch_depth: int = 2,
        log_every: int = 50,
        before_step: Callable[[int, TrainState, dict], tuple[TrainState, dict]] | None = None,
        should_stop: Callable[[int], bool] | None = None,
        skip_fn: StepFn | None = None,
        skip_steps: frozenset[int] = frozenset(),
        step_guard: Callable[[], contextlib.AbstractContextManager] | None = None,
    ):
        self.step_fn, self.batcher, self.mesh = step_fn, batcher, mesh
        self.num_steps, self.on_metrics, self.hooks = num_steps, on_metrics, list(hooks)
        self.dispatch_depth, self.log_every = dispatch_depth, log_every
        self.before_step = before_step
        self.should_stop = should_stop or (lambda step: False)
        self.skip_fn, self.skip_steps = skip_fn, skip_steps
        # A guard makes each step a transaction: dispatched and finished inside it
        # (multi-host: jax's live_devices, whose block succeeds or fails on every process).
        self.step_guard = step_guard
        if step_guard is not None:
            self.dispatch_depth = 1
        self.last_good: tuple[int, TrainState] | None = None
        self.step_seconds: list[float] = []  # time between consecutive finished steps
        self.seconds = 0.0  # wall time spent in run()
        self._last_finish: float | None = None

    def run(self, state: TrainState) -> TrainState:
        """Trains until `num_steps` or until `should_stop(step)`; returns the state of the
        last step, with every dispatched step finished."""
        step = int(to_host(state.step))
        pos = to_host(state.data_pos)
        self.last_good = (step, state)
        inflight: collections.deque = collections.deque()
        t0, s0 = time.perf_counter(), step
        self._last_finish = t0
        try:
            while step < self.num_steps:
                while len(inflight) >= self.dispatch_depth:
                    self._finish(inflight.popleft())
                try:
                    state, metrics = self._dispatch(step, state, pos)
                except Exception:
                    self._salvage(inflight)
                    raise
                step += 1
                pos = metrics.pop("_pos")
                inflight.append((step, state, metrics))
                if self._after_dispatch(step, state, t0, s0):
                    break
            while inflight:
                self._finish(inflight.popleft())
        finally:
            self.seconds += time.perf_counter() - t0
        return state

    def _dispatch(self, step: int, state: TrainState, pos: dict) -> tuple[TrainState, dict]:
        """Builds the batch after `step` steps and dispatches step `step + 1` (inside the
        step guard, if any, where it also waits for the step to finish)."""
        batch, after = self.batcher.next(pos, self.mesh)
        if self.before_step is not None:
            state, batch = self.before_step(step, state, batch)
        fn = self.step_fn
        if step + 1 in self.skip_steps and self.skip_fn is not None:
            fn = self.skip_fn
        if self.step_guard is None:
            state, metrics = fn(state, batch)
        else:
            with self.step_guard():
                state, metrics = jax.block_until_ready(fn(state, batch))
        return state, {**metrics, "_pos": after}

    def _after_dispatch(self, step: int, state: TrainState, t0: float, s0: int) -> bool:
        """Runs the hooks; returns whether to stop early."""
        for hook in self.hooks:
            hook(step, state)
        if step % self.log_every == 0:
            rate = (step - s0) / max(time.perf_counter() - t0, 1e-9)
            logging.info("step %d/%d  %.1f steps/s", step, self.num_steps, rate)
        return self.should_stop(step)

    def _salvage(self, inflight: collections.deque) -> None:
        """After a failed dispatch, keeps the in-flight steps that did finish."""
        while inflight:
            try:
                self._finish(inflight.popleft())
            except Exception:  # noqa: BLE001 -- the step died with the device; not completed
                inflight.clear()

    def _finish(self, item: tuple[int, TrainState, Any]) -> None:
        step, state, metrics = item
        metrics = to_host(metrics)  # jax.device_get cannot read arrays spanning processes
        now = time.perf_counter()
        self.step_seconds.append(now - self._last_finish)
        self._last_finish = now
        self.last_good = (step, state)
        self.on_metrics(step, metrics)
