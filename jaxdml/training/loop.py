"""The one training loop: bounded dispatch depth, hooks, metrics fetched in bulk, and
(multi-host) spans of steps that commit or fail on every process together."""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxdml.batcher import GlobalBatcher
from jaxdml.training.hooks import Hook, StepInfo
from jaxdml.training.state import TrainState, fetch
from jaxdml.training.step_common import FusedFn, StepFn, unpack_rows

# transaction(end_step) -> a context manager around one span: the span's steps are
# dispatched and finished inside it, and it either completes on every process or raises
# on every process (jax's live_devices).
Transaction = Callable[[int], contextlib.AbstractContextManager]


class Loop:
    """Runs steps from `state.step` to `num_steps`.

    At most `dispatch_depth` steps are in flight: before dispatching step t the loop
    waits for step t - depth to finish (unbounded async dispatch of collectives
    deadlocks XLA's CPU rendezvous). Waiting reads nothing back: the metrics of
    finished steps stay on the device and are fetched in one transfer every
    `fetch_every` finished steps (and for the first finished step, as soon as a step a
    hook asked for through `StepInfo.expedite` finishes, and when the loop ends or
    fails), then handed to the hooks' `on_metrics`.

    With a `fused_fn` (`train.steps_per_call` = K > 1), up to K steps run in one call:
    as many as every hook's `max_fused` allows (a save, a replica check, an evaluation
    or an injected fault at step s ends a call at s), never a set-aside batch; a step
    the hooks want alone runs alone. A call counts as one step for the dispatch depth,
    `after_step` sees its last step, and its rows are delivered one per step.

    With a `transaction`, steps run in spans of `span` steps, each span inside
    `transaction(end)` and finished there; a span is committed (its rows delivered, its
    end the newest good state, `after_step` called with it) only when the transaction
    succeeded, so every process agrees on which steps happened. Without one, `after_step`
    follows every step's dispatch and `last_good` is the newest finished step.

    Args:
      step_fn, skip_fn: the step, and the step that consumes a set-aside batch.
      batcher, mesh: where batches come from and go to.
      num_steps: the loop ends when this many steps are done.
      hooks: `jaxdml.training.hooks.Hook`s, called in order.
      skip_steps: steps whose batch is set aside (`skip_fn` runs instead).
      fused_fn, steps_per_call: see above (`make_fused_step(..., max_steps=K)`).
      accepted: called with the last step of every delivery no hook raised on (the
        run's MetricsWriter.accept: checkpoint seals wait for it).
      transaction, span: see above.
      clock, wall: monotonic clock for the rows' `seconds`, wall clock for their `time`.
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
        span: int = 1,
        fused_fn: FusedFn | None = None,
        steps_per_call: int = 1,
        accepted: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        wall: Callable[[], float] = time.time,
    ):
        self.step_fn, self.skip_fn, self.skip_steps = step_fn, skip_fn, skip_steps
        self.batcher, self.mesh, self.num_steps = batcher, mesh, num_steps
        self.hooks = list(hooks)
        # The hooks that act at each step (a call per hook per step is host time the
        # devices wait for on a small step: only those that override the method).
        self._before = [h for h in self.hooks if _overrides(h, "before_step")]
        self._after = [h for h in self.hooks if _overrides(h, "after_step")]
        self.transaction, self.span = transaction, max(1, span)
        self.fused_fn = fused_fn
        self.accepted = accepted
        self.steps_per_call = max(1, steps_per_call) if fused_fn is not None else 1
        self.dispatch_depth = dispatch_depth
        self.fetch_every = max(1, fetch_every)
        self.clock, self.wall = clock, wall
        self.last_good: tuple[int, TrainState] | None = None
        self.seconds = 0.0  # wall time spent in run()
        # (last step, device metrics, seconds since the previous finish, hook seconds, of
        # them stalling the devices, wall time, steps in the call)
        self._finished: list[tuple[int, Any, float, float, float, float, int]] = []
        self._last_finish = 0.0
        self._host = 0.0  # seconds in after_step hooks and deliveries since the previous finish
        self._stall = 0.0  # of those, the seconds after which the devices had run dry
        self._busy_at = 0.0  # in a delivery: the last time the devices were seen busy
        self._newest: Any = None  # metrics of the newest dispatched call
        # The first finished step of a run is delivered at once: it tells the hooks that
        # training goes on (a recovery's event is written then), whatever comes next.
        self._delivered = False
        self._expedite = 0  # deliver as soon as this step has finished (a save's seal waits)

    def run(self, state: TrainState) -> TrainState:
        """Trains until `num_steps` or until a hook asks to stop; returns the state of the
        last step, with every dispatched step finished and its metrics delivered."""
        step, pos = fetch((state.step, state.data_pos))
        step = int(step)
        self.last_good = (step, state)
        t0 = self._last_finish = self.clock()
        try:
            if self.transaction is None:
                state = self._run_plain(step, state, pos)
            else:
                state = self._run_spans(step, state, pos)
            self._deliver()
        except Exception:
            # The rows of finished, committed steps still queued are delivered: recovery
            # goes on after `last_good`, so those steps are not run again.
            with contextlib.suppress(Exception):
                self._deliver()
            raise
        finally:
            self.seconds += self.clock() - t0
        return state

    # ------------------------------------------------------------------ one process

    def _run_plain(self, step: int, state: TrainState, pos: dict) -> TrainState:
        inflight: collections.deque = collections.deque()
        while step < self.num_steps:
            while len(inflight) >= self.dispatch_depth:
                self._finish(*inflight.popleft())
            # Rows a hook asked for early (a save's seal waits for them) go out as soon
            # as their steps are done, not when the depth bound next waits for them: a
            # save is then sealed, a restart's point, steps sooner. Nothing waits here.
            while self._expedite and inflight and inflight[0][0] <= self._expedite:
                if not _finished(inflight[0][2]):
                    break
                self._finish(*inflight.popleft())
            try:
                state, pos, metrics, k = self._dispatch(step, state, pos, self.num_steps)
            except Exception:
                self._salvage(inflight)
                raise
            step += k
            inflight.append((step, state, metrics, k))
            if self._after_step(step, state):
                break
        while inflight:
            self._finish(*inflight.popleft())
        return state

    def _salvage(self, inflight: collections.deque) -> None:
        """After a failed dispatch, keeps the in-flight steps that did finish."""
        while inflight:
            try:
                self._finish(*inflight.popleft())
            except Exception:  # noqa: BLE001 -- the step died with the device; not completed
                inflight.clear()
        with contextlib.suppress(Exception):  # rows of finished steps are kept if readable
            self._deliver()

    # ------------------------------------------------------------------ spans

    def _run_spans(self, step: int, state: TrainState, pos: dict) -> TrainState:
        while step < self.num_steps:
            end = min(step + self.span, self.num_steps)
            rows_before = len(self._finished)
            try:
                with self.transaction(end):
                    state, pos = self._span(step, end, state, pos)
            except Exception:
                del self._finished[rows_before:]  # the span did not happen: rows go
                raise
            step = end
            self.last_good = (step, state)
            if self._delivery_due(step):
                self._deliver()
            if self._after_step(step, state):
                break
        return state

    def _span(self, step: int, end: int, state: TrainState, pos: dict):
        """Dispatches steps step+1..end (depth-bounded) and waits for all of them."""
        inflight: collections.deque = collections.deque()
        while step < end:
            while len(inflight) >= self.dispatch_depth:
                self._finish(*inflight.popleft(), commit=False)
            state, pos, metrics, k = self._dispatch(step, state, pos, end)
            step += k
            inflight.append((step, state, metrics, k))
        while inflight:
            self._finish(*inflight.popleft(), commit=False)
        return state, pos

    # ------------------------------------------------------------------ steps

    def _dispatch(self, step: int, state: TrainState, pos: dict, end: int):
        """Dispatches step `step + 1` (or steps `step + 1 ..` up to `end`, fused) with its
        batches; returns (state, the data position after, metrics, steps dispatched)."""
        k = self._fusable(step, end)
        if k > 1:
            batches, after = self.batcher.next_many(pos, k, self.mesh, self.steps_per_call)
            state, metrics = self.fused_fn(state, batches, np.int32(k))
            self._newest = metrics
            return state, after, metrics, k
        batch, after = self.batcher.next(pos, self.mesh)
        for hook in self._before:
            state, batch = hook.before_step(step, state, batch)
        fn = self.step_fn
        if step + 1 in self.skip_steps and self.skip_fn is not None:
            fn = self.skip_fn
        state, metrics = fn(state, batch)
        self._newest = metrics
        return state, after, metrics, 1

    def _fusable(self, step: int, end: int) -> int:
        """How many steps from `step` one call may run: up to `steps_per_call` and `end`,
        before the next set-aside batch, within every hook's `max_fused`."""
        k = min(self.steps_per_call, end - step)
        if k < 2:
            return 1
        skips = [s for s in self.skip_steps if step < s <= step + k]
        if skips:
            k = min(skips) - step - 1
        for hook in self.hooks:
            if k < 2:
                return 1
            k = min(k, hook.max_fused(step))
        return max(k, 1)

    def _after_step(self, step: int, state: TrainState) -> bool:
        """Runs every hook's after_step; True when one asks to stop. Their time is the
        host work of the next finished step's row (`host_seconds`).

        It stalled the devices only if they ran out of work meanwhile: the newest
        dispatched call was finished when the hooks returned (a device runs its queue in
        order, so while that call is unfinished the devices never idled). Such time is
        the row's `stall_seconds` too (all of it: the devices may have run dry only
        towards its end, so this overcounts by at most the work that was in flight); host
        work the devices' queue hid (a save dispatched while a long step runs) is not.
        """
        t0 = self.clock()
        info = StepInfo(step, state, lambda: self._expedite_through(step))
        stop = any([hook.after_step(info) for hook in self._after])
        spent = self.clock() - t0
        self._host += spent
        if _finished(self._newest):
            self._stall += spent
        return stop

    def _finish(
        self, step: int, state: TrainState, metrics, k: int = 1, commit: bool = True
    ) -> None:
        """Waits for a step, or a call of `k` steps ending at `step` (nothing is read
        back), and queues its metrics."""
        metrics.block_until_ready()  # one array: the step's metrics row(s)
        now = self.clock()
        row = (step, metrics, now - self._last_finish, self._host, self._stall, self.wall(), k)
        self._finished.append(row)
        self._last_finish, self._host, self._stall = now, 0.0, 0.0
        if commit:
            self.last_good = (step, state)
            if self._delivery_due(step):
                self._deliver()

    def _expedite_through(self, step: int) -> None:
        self._expedite = max(self._expedite, step)

    def _delivery_due(self, finished: int) -> bool:
        """Whether the queued rows go out now that step `finished` has finished."""
        if len(self._finished) >= self.fetch_every or not self._delivered:
            return True
        return self._expedite > 0 and finished >= self._expedite

    def _deliver(self) -> None:
        """Fetches the queued metrics and hands the rows to the hooks. Its time is host
        work of the next finished step's row; the part after the last check that found
        the newest dispatched call still running (before the fetch and before each hook)
        stalled the devices if that call had finished by the end: the calls in flight
        usually hide a delivery's first milliseconds."""
        if not self._finished:
            return
        t0 = self._busy_at = self.clock()
        try:
            self._hand_out()
        finally:
            end = self.clock()
            self._host += end - t0
            if _finished(self._newest):  # nothing is dispatched meanwhile: it stays so
                self._stall += end - self._busy_at

    def _still_busy(self) -> None:
        """During a delivery: notes now as a time the devices still had work, if the
        newest dispatched call has not finished."""
        if not _finished(self._newest):
            self._busy_at = self.clock()

    def _hand_out(self) -> None:
        finished, self._finished = self._finished, []
        self._delivered = True
        if finished[-1][0] >= self._expedite:
            self._expedite = 0
        self._still_busy()
        values = fetch([item[1] for item in finished])
        # One conversion for all the rows: a fused call's first k rows are its steps'.
        calls = zip(finished, values, strict=True)
        table = np.concatenate([np.reshape(v, (-1, v.shape[-1]))[:k] for (*_, k), v in calls])
        metrics = iter(unpack_rows(table))
        rows = []
        for step, _, secs, hook, stall, t, k in finished:
            # A fused call's k rows share its time evenly; `time` is each one's finish.
            for i in range(k):
                row = {"step": step - k + 1 + i, **next(metrics), "seconds": secs / k,
                       "host_seconds": hook / k, "stall_seconds": stall / k,
                       "time": t - (k - 1 - i) * secs / k}  # fmt: skip
                rows.append(row)
        # Every hook sees every row, also when one of them raises (the guard asking for a
        # rollback): the first error is raised once all have seen the rows.
        error = None
        for hook in self.hooks:
            self._still_busy()
            try:
                hook.on_metrics(rows)
            except Exception as e:  # noqa: BLE001 -- re-raised below
                error = error or e
        if error is not None:
            raise error
        if self.accepted is not None:
            self.accepted(rows[-1]["step"])


def _finished(metrics: jax.Array | None) -> bool:
    """Whether a dispatched call has finished (True when there is none), without waiting."""
    return metrics is None or metrics.is_ready()


def _overrides(hook: Any, method: str) -> bool:
    """Whether `hook` has its own `method`: its class overrides Hook's, or the instance
    was given one (a duck-typed hook: whether it has one at all)."""
    if not isinstance(hook, Hook):
        return hasattr(hook, method)
    own = method in getattr(hook, "__dict__", {})
    return own or getattr(type(hook), method) is not getattr(Hook, method)
