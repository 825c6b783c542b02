"""Trainer: builds data, model, mesh, state and step from a config, runs the one loop,
and offers the supervisor its recovery verbs.

The supervisor sees a Trainer only through `jaxdml.supervisor.Recoverable`: the devices,
the last finished step, and three verbs (`reform`, `rollback`, `checkpoint_now`) plus
`record`. It never assigns the state or reaches into the checkpoint tiers, the metrics
or the injector.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from jaxdml import distributed, goodput, liveness
from jaxdml import mesh as mesh_lib
from jaxdml.accounting import Accounting
from jaxdml.batcher import GlobalBatcher
from jaxdml.checkpoint import NoValidCheckpoint, identity
from jaxdml.config import ConfigError, validate
from jaxdml.constants import VERSION
from jaxdml.data import Dataset, load_dataset
from jaxdml.faults import inject
from jaxdml.faults.detect import StopSignals, Watchdog
from jaxdml.faults.errors import GaveUp
from jaxdml.goodput import GoodputLog
from jaxdml.metrics import EventLog, MetricsWriter, last_row_through, write_json
from jaxdml.models import build_model, check_model, is_boosted, model_inputs, num_steps
from jaxdml.models.base import predict_with_state, task
from jaxdml.supervisor import Supervisor
from jaxdml.training import step_common
from jaxdml.training.hooks import BeforeStep, Hook, StopWhen
from jaxdml.training.loop import Loop
from jaxdml.training.optimizers import build_optimizer
from jaxdml.training.progress import Progress
from jaxdml.training.rows import SPLITS, EvalRows, Pet, WriteRows, evaluation
from jaxdml.training.state import (
    TrainState,
    abstract_state,
    flat_params,
    from_replica,
    init_state,
    params_sha256,
    to_host,
)
from jaxdml.training.step import make_gradient_step
from jaxdml.training.step_common import FusedFn, StepFn, make_fused_step, make_skip_step
from jaxdml.training.tiers import MEMORY, PERSISTENT, Tiers
from jaxdml.training.tree_step import make_tree_step


class Trainer:
    """One training run: everything built from `config`, written to `workdir`.

    Use `fit()` for a whole (supervised, as `config.supervisor` says) run, or
    `run_steps(n)` to advance step by step (notebooks). `state` is the one TrainState
    pytree (params, optimizer state, step, RNG key, data position); building a Trainer
    on a workdir that holds checkpoints resumes from the newest valid one.

        trainer = jaxdml.Trainer(config, "/tmp/run")
        trainer.run_steps(50)          # the metrics row of step 50
        trainer.evaluate()             # {'train_accuracy': ..., 'test_accuracy': ...}
        trainer.state.params           # replicated over trainer.mesh
        result = trainer.fit()         # the remaining steps, supervised
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str,
        devices: Sequence[jax.Device] | None = None,
        dataset: Dataset | None = None,
        model: Any = None,
        hooks: Sequence[Hook] = (),
        supervisor: Any = None,
        optimizer: optax.GradientTransformation | None = None,
    ):
        """Args:
        config: a ConfigDict built on `jaxdml.config.default_config()` (validated here).
        workdir: output folder (metrics.jsonl, events.jsonl, result.json, checkpoints).
        devices: devices to train on (default: `config.num_cpu_devices` or all).
        dataset: an already loaded data set (default: load `config.data`).
        model: a model to train instead of the one `config.model` names, e.g. a
          `jaxdml.models.mlp.FlaxModel` around your own Flax module.
        hooks: extra `jaxdml.training.hooks.Hook`s for the loop (after the built-in ones).
        optimizer: any optax transformation, used instead of the one `config.train`
          describes (its state is checkpointed and resumed with the rest; an optimizer
          with extra arguments, e.g. `optax.lbfgs`, gets value, grad and value_fn).
        supervisor: the recovery policy (default: `jaxdml.supervisor.Supervisor(config)`
          when `config.supervisor.enabled`, else none: any failure ends the run).
        """
        self.config = validate(config)
        self.workdir = workdir
        distributed.initialize(config)  # multi-process only; before any JAX computation
        if config.train.compilation_cache:
            distributed.compilation_cache(os.path.join(workdir, "xla_cache"))
        # Before anything else starts JAX: simulated CPU devices must be set up front.
        devices = devices or distributed.default_devices(config)
        self.dataset = dataset or load_dataset(config.data)
        # What a checkpoint must have been written for: the problem-defining config
        # fields and the training data's identity (other data: exit 2, naming it).
        self.problem = {"config": identity(config), "data": self.dataset.identity()}
        self._build_model(model, optimizer)
        # Process 0 writes the run's records; the others keep theirs apart, per process.
        mine = os.path.join(workdir, f"process_{distributed.process_index()}")
        records = workdir if distributed.is_coordinator() else mine
        self.metrics = MetricsWriter(records, config.train.tensorboard)
        self.events = EventLog(records, tensorboard=lambda: self.metrics.tensorboard)
        self.goodput = GoodputLog(records)  # the job's goodput record, across restarts
        self.tiers = Tiers(config, workdir, self.events.record, rows=self.metrics)
        self.tiers.verify.every = config.supervisor.fingerprint_every
        faults = inject.parse(config.faults)
        try:
            inject.check_targets(faults, len(jax.devices()), jax.process_count())
        except inject.FaultPlanError as e:
            raise ConfigError(f"config.faults: {e}") from e
        self.injector = inject.Injector(
            faults,
            already_fired=[e["fault"] for e in self.events.rows() if "fault" in e],
            record=self.events.record,
        )
        if supervisor is None and config.supervisor.enabled:
            supervisor = Supervisor(config)
        self.supervisor = supervisor
        self.accounting = Accounting(self.events, self.goodput)
        self.user_hooks = list(hooks)
        self._rows = WriteRows(self.metrics)
        # One for the run: evaluations waiting for their rows survive a new loop.
        self._eval_rows = EvalRows(self.evaluate, config.train.eval_every)
        show = config.train.progress and distributed.is_coordinator()
        self.progress = Progress(self.num_steps, config.train.log_every, enabled=show)
        self.events.listeners.append(lambda event: self.progress.on_event(event))
        self.set_devices(devices)
        self.agreement = liveness.Agreement(liveness.multi_process(), distributed.is_coordinator())
        self._start_time = time.time()
        self.stopped_by: int | None = None  # the signal that stopped the run, if any
        self.skip_steps: set[int] = set()  # steps whose batch is set aside (after a rollback)
        self.live_processes: list[int] | None = None  # set after a host loss: the survivors
        self._running: Loop | None = None  # the loop in progress (or the one that failed)
        self._restored_from: str | None = None  # the tier the state came from
        self._trained_from = 0  # the step this process's training started at
        self._watch = self._watchdog()  # started by fit()
        self.state: TrainState = self.restore_or_init()
        if distributed.is_coordinator():
            self._write_model_info()

    @property
    def restored_from(self) -> str | None:
        """The tier the starting state came from ('memory', 'persistent', 'broadcast';
        None: a fresh state)."""
        return self._restored_from

    def _write_model_info(self) -> None:
        """model.json: the config and the data's shape, all that `jaxdml.load` needs to
        build the model again (jaxdml/export.py)."""
        ds = self.dataset
        info = {
            "config": json.loads(self.config.to_json_best_effort()),
            "num_features": ds.num_features,
            "num_classes": ds.num_classes,
            "class_names": [c.item() if isinstance(c, np.generic) else c for c in ds.class_names],
        }
        write_json(os.path.join(self.workdir, "model.json"), info)

    def _build_model(self, model: Any, optimizer: optax.GradientTransformation | None) -> None:
        config, ds = self.config, self.dataset
        if model is None:
            model = build_model(config, ds.num_features, ds.num_classes, ds.x_train)
        try:
            check_model(model)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from e
        self.model = model
        if is_boosted(model) and config.train.steps_per_call > 1:
            raise ConfigError(
                "train.steps_per_call applies to gradient-trained models: a boosting round "
                "keeps its margins between calls on the host side, and is long enough to "
                "run alone (set it to 1)"
            )
        # compiled once, not at every evaluation
        self._predict = jax.jit(lambda p, x: predict_with_state(model, p[0], p[1], x))
        self.optimizer = optimizer or build_optimizer(config, model)
        self.num_steps = num_steps(model, config)
        full = config.train.mode == "full_batch"
        self.batcher = GlobalBatcher(
            model_inputs(model, ds.x_train),
            ds.y_train,
            None if full else config.train.batch_size,
            config.seed,
        )

    # ------------------------------------------------------------------ building

    def set_devices(self, devices: Sequence[jax.Device]) -> None:
        """(Re)builds the mesh over `devices` and the step compiled for it."""
        mesh = self.mesh = mesh_lib.make_mesh(devices)
        t, advance, boosted = self.config.train, self.batcher.advance, is_boosted(self.model)
        few, donate = not boosted and t.optimizer == "lbfgs", t.donate  # L-BFGS: few big steps
        options = step_common.compiler_options(t.compiler_options, devices[0].platform, few)
        if boosted:
            self.step_fn: StepFn = make_tree_step(self.model, mesh, advance, donate, options)
        else:
            self.step_fn = make_gradient_step(
                self.model, self.optimizer, mesh, advance, donate, options
            )
        self.skip_fn: StepFn = make_skip_step(mesh, advance, options)
        k, full = t.steps_per_call, self.batcher.full_batch
        fused = make_fused_step(self.step_fn, mesh, k, full, donate, options) if k > 1 else None
        self.fused_fn: FusedFn | None = fused
        self._warm = False

    def restore_or_init(self) -> TrainState:
        """The state to start from.

        Resume precedence: (1) the newest valid checkpoint in either tier, the memory tier
        first at equal steps (jaxdml/training/tiers.py; invalid ones are set aside, older
        ones tried); (2) a fresh init when there are none, when checkpoint.resume='false'
        (old checkpoints are set aside, not deleted), or when none is valid and
        resume='auto_or_scratch'.
        """
        c = self.config
        if c.checkpoint.resume == "false":
            self.tiers.move_all_aside("checkpoint.resume=false")
            return self._fresh_state()
        t0 = time.perf_counter()
        try:
            with self._watch.allow(c.distributed.initialization_timeout_secs):
                state = self._restore_newest()
        except NoValidCheckpoint as e:
            if c.checkpoint.resume != "auto_or_scratch":
                raise
            logging.warning("%s; starting from scratch (resume=auto_or_scratch)", e)
            return self._fresh_state()
        step = self._trained_from = int(to_host(state.step))
        if self._restored_from is not None:  # (a fresh state's making is start-up)
            self.goodput.span("restore", time.perf_counter() - t0)
        if step:  # (a fresh state recorded its own)
            self.goodput.resume(step)
        if step and c.checkpoint.resume != "required":  # an eval-only run resumes nothing
            self.record(
                "resumed",
                step,
                num_devices=int(self.mesh.devices.size),
                source=self._restored_from,
                restore_seconds=time.perf_counter() - t0,
            )
            logging.info("resumed from step %d (%s tier)", step, self._restored_from)
        return state

    def _restore_newest(self) -> TrainState:
        """The newest valid checkpoint on the current mesh (a fresh state if there is
        none); metrics rows past its step are dropped, since those steps run again."""
        abstract = abstract_state(self.model, self.optimizer, self.config.seed, self.mesh)
        restored = self.tiers.restore(abstract, self.problem, self.mesh)
        if restored is None:
            if self.config.checkpoint.resume == "required":
                raise ConfigError(f"no checkpoint in {self.workdir} (checkpoint.resume=required)")
            self._restored_from = None
            return self._fresh_state()
        state, step, self._restored_from = restored
        self.metrics.truncate_after(step)
        return state

    def _fresh_state(self) -> TrainState:
        self.metrics.truncate_after(0)  # rows of an earlier, unsaved attempt
        self.goodput.resume(0)
        return init_state(self.model, self.optimizer, self.config.seed, self.mesh)

    def save_checkpoint(self, step: int, state: TrainState, tier: str = PERSISTENT, wait=False):
        """Saves `state` in one tier (async unless `wait`), with the meta that validates it.
        The time it blocks is goodput's `checkpoint` (a periodic save's is inside the
        loop's host work)."""
        t0 = time.perf_counter()
        meta = {
            **self.problem,
            "num_devices": int(self.mesh.devices.size),
            "jaxdml_version": VERSION,
        }
        self.tiers.save(tier, step, state, meta, self.mesh, wait=wait)
        seconds = time.perf_counter() - t0
        self.goodput.span("checkpoint", seconds, in_loop=not wait, tier=tier, wait=wait)

    def _save_verified(self, step: int, memory: bool = True) -> None:
        """A synchronous save (persistent tier, and the memory tier when a restart may
        follow), of replicas verified to agree first: a final, preemption or give-up save
        has no later check to catch a flipped bit.

        Raises:
          SilentCorruption: the replicas disagree; nothing was saved.
        """
        with self._watch.allow(self.config.distributed.shutdown_timeout_secs):
            self.tiers.check_now(step, self.state, self.mesh)
            self.save_checkpoint(step, self.state, PERSISTENT, wait=True)
            if memory:
                self.save_checkpoint(step, self.state, MEMORY, wait=True)

    # ------------------------------------------------------------------ the loop

    def _hooks(self, checkpoints: bool, supervised: bool, stop_when=None) -> list[Hook]:
        """The loop's hooks, in the order they run."""
        hooks: list[Hook] = [BeforeStep(self.injector.before_step, self.injector.max_fused)]
        if checkpoints:  # fit(): goodput and step accounting, supervised or not. First:
            # its clock marks the step's dispatch, so a save that blocks (a dead peer in
            # its barrier) counts toward the next failure's detection time.
            hooks.append(self.accounting)
        # Evaluation before the saves: its scores join the row a save asks for early.
        hooks.append(self._eval_rows)
        if checkpoints:
            save = lambda tier, step, state: self.save_checkpoint(step, state, tier)  # noqa: E731
            hooks += self.tiers.hooks(save, self.agreement.decider)
        hooks += [self._rows, self.progress]
        if supervised:
            hooks += [*self.supervisor.hooks(self), Pet(self._watch)]
        if stop_when is not None:
            hooks.append(StopWhen(stop_when))
        return hooks + self.user_hooks

    def _loop(self, num_steps: int, hooks: list[Hook]) -> Loop:
        """A Loop over the current mesh; multi-process, in live_devices spans."""
        self.progress.begin(int(to_host(self.state.step)))
        spans = None
        if self.agreement.multi:
            spans = liveness.Spans(lambda: self.devices, self.agreement)
        return Loop(
            self.step_fn,
            self.batcher,
            self.mesh,
            num_steps,
            hooks=hooks,
            dispatch_depth=self.config.train.dispatch_depth,
            fetch_every=self.config.train.fetch_every,
            skip_fn=self.skip_fn,
            skip_steps=frozenset(self.skip_steps),
            transaction=spans,
            span=self.config.distributed.steps_per_transaction,
            fused_fn=self.fused_fn,
            steps_per_call=self.config.train.steps_per_call,
            accepted=self.metrics.accept,
        )

    def _warm_up(self) -> None:
        """Compiles this mesh's step before the loop (under the watchdog's allowance, so
        that a slow compilation is not a hang); multi-process, the processes then meet
        at a barrier, so that one's slower compilation never counts against the
        collective timeout."""
        if self._warm:
            return
        t0, timeout = time.perf_counter(), self.config.distributed.initialization_timeout_secs
        with self._watch.allow(timeout):
            pos = to_host(self.state.data_pos)
            batch, _ = self.batcher.next(pos, self.mesh)
            fns = [f for f in (self.step_fn, self.skip_fn) if hasattr(f, "lower")]
            lowered = [f.lower(self.state, batch) for f in fns]
            if self.fused_fn is not None:
                slots = self.config.train.steps_per_call
                batches, _ = self.batcher.next_many(pos, 1, self.mesh, slots)
                lowered.append(self.fused_fn.lower(self.state, batches, np.int32(slots)))
            step = int(to_host(self.state.step))
            verify = functools.partial(self.tiers.check_now, step, self.state, self.mesh)
            step_common.compile_together(lowered, verify)
            processes = sorted({int(d.process_index) for d in self.devices})
            distributed.barrier("warm_up", timeout, processes)
        self._warm = True
        self.goodput.span("compile", time.perf_counter() - t0)

    def run_steps(self, n: int) -> dict:
        """Advances `n` steps with the plain loop (no supervisor, no periodic checkpoints).

        Stops at the run's last step; a later `fit()` continues from `state.step`.
        Faults in `config.faults` still fire, and without a supervisor a lost device
        raises here; use `fit()` or `jaxdml.train` for recovery.

        Args:
          n: steps to run.

        Returns:
          The metrics row of the last finished step (loss, batch_accuracy, ...).
        """
        target = min(int(to_host(self.state.step)) + n, self.num_steps)
        self._warm_up()
        self._running = self._loop(target, self._hooks(checkpoints=False, supervised=False))
        self.state = self._running.run(self.state)
        return self._rows.last_row

    def fit(self) -> dict:
        """Runs to the last step and writes result.json; returns the result.

        Under a supervisor, failures are recovered (jaxdml.supervisor); without one any
        failure ends the run. On SIGTERM (preemption) or SIGINT (Ctrl-C) the step finishes,
        a verified checkpoint is saved in both tiers; the result has stopped_by (no result.json).

        Raises:
          GaveUp: the supervisor stopped (report.json and a final checkpoint were written).
        """
        with StopSignals() as signals, self._watch:
            try:
                self._train(signals)
            except GaveUp as e:
                self._write_report(e.report)
                raise
        step = int(to_host(self.state.step))
        if step < self.num_steps:
            return self.stopped(step, signals.signum)
        extra = {**self.accounting.report(), **self._watch.report()} if self.supervisor else {}
        result = self.finish(extra)
        self.tiers.remove_memory_tier()
        return result

    def _train(self, signals: StopSignals) -> None:
        """The one loop, restarted on the recovered state after each recovery; the last
        (or the stopping) save is part of it, so a disagreement found there is recovered."""
        supervised = self.supervisor is not None
        stop = lambda step: self.agreement.decide("stop", signals.requested, anyone=True)  # noqa: E731
        self.accounting.start()
        self.goodput.started()
        while True:
            hooks = self._hooks(checkpoints=True, supervised=supervised, stop_when=stop)
            try:
                self._warm_up()
                self._running = self._loop(self.num_steps, hooks)
                self.state = self._running.run(self.state)
                step = int(to_host(self.state.step))
                self._save_verified(step, memory=step < self.num_steps)
                break
            except Exception as error:  # noqa: BLE001 -- the supervisor classifies; bugs re-raise
                if not supervised:
                    raise
                # Recovering (probing devices, restoring, a backoff) is no hang.
                with self._watch.allow(self.config.distributed.initialization_timeout_secs):
                    recovery = self.supervisor.recover(error, self)
                self.accounting.begin_recovery(recovery)
                self.goodput.resume(int(to_host(self.state.step)))
                self.accounting.loop_started()
                self._watch.pet()
        self.accounting.stop()

    def _watchdog(self) -> Watchdog:
        sup = self.config.supervisor
        floor = sup.watchdog_secs if self.supervisor else 0.0
        on_hang = lambda idle: self.supervisor.on_hang(idle, self)  # noqa: E731
        return Watchdog(floor, on_hang, factor=sup.watchdog_step_factor)

    # ------------------------------------------------------------------ recovery verbs

    @property
    def devices(self) -> list[jax.Device]:
        """The devices of the current mesh, in mesh order."""
        return list(self.mesh.devices.flat)

    @property
    def finished_step(self) -> int:
        """The newest step that finished without error (where recovery starts from)."""
        return self._newest_finished()[0]

    def _newest_finished(self) -> tuple[int, TrainState]:
        if self._running is not None and self._running.last_good is not None:
            return self._running.last_good
        return int(to_host(self.state.step)), self.state

    def _adopt(self, state: TrainState) -> int:
        """Makes `state` the run's state (a recovery verb's result); returns its step."""
        self.state, self._running = state, None
        return int(to_host(state.step))

    def reform(self, devices: Sequence[jax.Device]) -> int:
        """Re-forms the mesh on `devices`; the state of the newest finished step is rebuilt
        from the replicas those devices already hold (no checkpoint is read). When whole
        processes are gone, checkpoints are saved by the survivors from then on.

        Returns:
          The step the state is at.
        """
        _, state = self._newest_finished()
        processes = sorted({int(d.process_index) for d in devices})
        lost_processes = processes != sorted({int(d.process_index) for d in self.devices})
        self.tiers.forget_pending()
        self.set_devices(devices)
        step = self._adopt(from_replica(state, self.mesh))
        if lost_processes:
            self.tiers.restrict_to(processes)
            self.live_processes = processes
        return step

    def rollback(self, set_aside_batches: Sequence[int] = ()) -> int:
        """Restores the newest valid checkpoint of either tier (after pending saves are
        verified); the batches of `set_aside_batches` steps are skipped when they run again.

        Returns:
          The restored step.
        """
        self.skip_steps.update(set_aside_batches)
        return self._adopt(self._restore_newest())

    def checkpoint_now(self) -> int:
        """Saves the current state synchronously in both tiers, verified; returns its step."""
        step = int(to_host(self.state.step))
        self._save_verified(step)
        return step

    def record(self, kind: str, step: int, **fields) -> dict:
        """One line of events.jsonl."""
        return self.events.record(kind, step, **fields)

    # ------------------------------------------------------------------ results

    def evaluate(self, state: TrainState | None = None) -> dict:
        """Train and test scores of `state`'s model (default: the current state).

        Returns:
          classification: {'train_accuracy', 'test_accuracy'}; regression: train/test
          rmse and r2, and the rmse of the mean predictor (the training targets' mean).
        """
        state = self.state if state is None else state
        variables = to_host((state.params, state.model_state))
        ds = self.dataset
        # ds.predict: chunk by chunk when the data is memory-mapped
        predicted = {split: ds.predict(self._predict, variables, split) for split in SPLITS}
        return evaluation(task(self.model), predicted, ds)

    def _last_logged_loss(self) -> float | None:
        """The loss of the newest row in metrics.jsonl (no step ran in this process)."""
        self.metrics.drain()
        _, row = last_row_through(self.metrics.path)
        return row.get("loss") if row else None

    def stopped(self, step: int, signum: int | None) -> dict:
        """After a stop signal: the verified save is done; record it and close. The next
        start resumes."""
        kind = "interrupted" if signum == 2 else "preemption"
        self.record(kind, step, action="saved checkpoint and exited")
        logging.warning("%s at step %d: checkpoint saved, exiting", kind, step)
        self.stopped_by = signum
        self.close()
        return {"preempted": kind == "preemption", "interrupted": kind == "interrupted",
                "steps": step}  # fmt: skip

    def close(self) -> None:
        """Waits for pending saves and closes every writer."""
        self.tiers.close()
        self.progress.close()
        self.metrics.close()
        self.events.close()
        self.goodput.close()

    def _write_report(self, report: dict) -> None:
        """report.json (the supervisor gave up): why, where, and the accounting so far."""
        report = {**report, **self.accounting.report()}
        self.record(
            "gave_up",
            report["step"],
            devices=report.get("lost_devices", []),
            action=report["reason"],
            checkpoint_step=report.get("checkpoint_step"),
        )
        write_json(os.path.join(self.workdir, "report.json"), report)
        self.close()

    def finish(self, extra: dict | None = None) -> dict:
        """Writes and returns result.json for the current state (plus `extra` fields).

        A run that was already finished when this process started trains nothing: its
        result.json is returned as it is (with `already_finished`), not replaced by one
        that knows no loss and no goodput."""
        previous = os.path.join(self.workdir, "result.json")
        if self._trained_from >= self.num_steps and os.path.exists(previous):
            with open(previous) as f:
                result = {**json.load(f), "already_finished": True}
            self.close()
            return result
        result = {
            **self.evaluate(),
            "loss": self._rows.last_row.get("loss", self._last_logged_loss()),
            "steps": int(to_host(self.state.step)),
            "num_devices": int(self.mesh.devices.size),
            "wall_time_s": time.time() - self._start_time,
            "params_sha256": params_sha256(self.state.params),
            "model": self.config.model.name,
            "data": self.dataset.name,
        }
        result.update(extra or {})
        job = goodput.summarize(goodput.read(self.workdir)) if distributed.is_coordinator() else {}
        result.update({k: job[k] for k in ("job_goodput", "job_wall_seconds")} if job else {})
        result["badput"] = job.get("fractions", {})
        result["checkpoint_saves"] = self.tiers.persistent.saves
        result["checkpoint_failed_saves"] = self.tiers.persistent.failed_saves
        if distributed.is_coordinator():
            write_json(os.path.join(self.workdir, "result.json"), result)
            np.savez(os.path.join(self.workdir, "params.npz"), **flat_params(self.state.params))
        self.close()
        return result
