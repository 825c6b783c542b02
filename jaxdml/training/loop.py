"""The one training loop: bounded dispatch depth, hooks, metrics fetched in bulk."""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from jaxdml.data import GlobalBatcher
from jaxdml.training.hooks import Hook, StepInfo
from jaxdml.training.state import TrainState, to_host
from jaxdml.training.step_common import StepFn

Transaction = Callable[[], contextlib.AbstractContextManager]


class Loop:
    """Runs steps from `state.step` to `num_steps`.

    At most `dispatch_depth` steps are in flight: before dispatching step t the loop
    waits for step t - depth to finish (unbounded async dispatch of collectives
    deadlocks XLA's CPU rendezvous). Waiting reads nothing back: the metrics of
    finished steps stay on the device and are fetched in one transfer every
    `fetch_every` finished steps (and when the loop ends or fails), then handed to the
    hooks' `on_metrics`. `last_good` is the newest (step, state) whose step finished
    without error: recovery starts from it.

    Args:
      step_fn, skip_fn: the step, and the step that consumes a set-aside batch.
      batcher, mesh: where batches come from and go to.
      num_steps: the loop ends when this many steps are done.
      hooks: `jaxdml.training.hooks.Hook`s, called in order.
      skip_steps: steps whose batch is set aside (`skip_fn` runs instead).
      transaction: multi-host: each step is dispatched and finished inside
        `transaction()` (a live_devices block: it completes or raises on every process).
      clock: for the `seconds` of each row (injectable).
    """

    def __init__(
        self,
        step_fn: StepFn,
        batcher: GlobalBatcher,
        mesh: Mesh,
        num_steps: int,
        hooks: Sequence[Hook] = (),
        dispatch_depth: int = 2,
        fetch_every: int = 1,
        skip_fn: StepFn | None = None,
        skip_steps: frozenset[int] = frozenset(),
        transaction: Transaction | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.step_fn, self.skip_fn, self.skip_steps = step_fn, skip_fn, skip_steps
        self.batcher, self.mesh, self.num_steps = batcher, mesh, num_steps
        self.hooks = list(hooks)
        self.transaction = transaction
        self.dispatch_depth = 1 if transaction is not None else dispatch_depth
        self.fetch_every = max(1, fetch_every)
        self.clock = clock
        self.last_good: tuple[int, TrainState] | None = None
        self.seconds = 0.0  # wall time spent in run()
        self._finished: list[tuple[int, Any, float]] = []  # (step, device metrics, seconds)
        self._last_finish = 0.0

    def run(self, state: TrainState) -> TrainState:
        """Trains until `num_steps` or until a hook asks to stop; returns the state of the
        last step, with every dispatched step finished and its metrics delivered."""
        step = int(to_host(state.step))
        pos = to_host(state.data_pos)
        self.last_good = (step, state)
        inflight: collections.deque = collections.deque()
        t0 = self._last_finish = self.clock()
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
                if any([hook.after_step(StepInfo(step, state)) for hook in self.hooks]):
                    break
            while inflight:
                self._finish(inflight.popleft())
            self._deliver()
        finally:
            self.seconds += self.clock() - t0
        return state

    def _dispatch(self, step: int, state: TrainState, pos: dict) -> tuple[TrainState, dict]:
        """Builds the batch after `step` steps and dispatches step `step + 1` (inside the
        transaction, if any, where it also waits for the step to finish)."""
        batch, after = self.batcher.next(pos, self.mesh)
        for hook in self.hooks:
            state, batch = hook.before_step(step, state, batch)
        fn = self.step_fn
        if step + 1 in self.skip_steps and self.skip_fn is not None:
            fn = self.skip_fn
        if self.transaction is None:
            state, metrics = fn(state, batch)
        else:
            with self.transaction():
                state, metrics = jax.block_until_ready(fn(state, batch))
        return state, {**metrics, "_pos": after}

    def _salvage(self, inflight: collections.deque) -> None:
        """After a failed dispatch, keeps the in-flight steps that did finish."""
        while inflight:
            try:
                self._finish(inflight.popleft())
            except Exception:  # noqa: BLE001 -- the step died with the device; not completed
                inflight.clear()
        with contextlib.suppress(Exception):  # rows of finished steps are kept if readable
            self._deliver()

    def _finish(self, item: tuple[int, TrainState, dict]) -> None:
        """Waits for a step (nothing is read back) and queues its metrics."""
        step, state, metrics = item
        jax.block_until_ready(metrics)
        now = self.clock()
        self._finished.append((step, metrics, now - self._last_finish))
        self._last_finish = now
        self.last_good = (step, state)
        if len(self._finished) >= self.fetch_every:
            self._deliver()

    def _deliver(self) -> None:
        """Fetches the queued metrics in one transfer and hands the rows to the hooks."""
        if not self._finished:
            return
        finished, self._finished = self._finished, []
        # to_host, not jax.device_get: it reads arrays that span several processes.
        values = to_host([metrics for _, metrics, _ in finished])
        rows = [
            {"step": step, **{k: v.item() for k, v in host.items()}, "seconds": seconds}
            for (step, _, seconds), host in zip(finished, values, strict=True)
        ]
        for hook in self.hooks:
            hook.on_metrics(rows)
