"""Trainer: builds data, model, mesh, state and step from a config, and runs the loop."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

import jaxdml
from jaxdml import checkpoint as ckpt_lib
from jaxdml import distributed
from jaxdml import mesh as mesh_lib
from jaxdml.config import validate
from jaxdml.data import Dataset, GlobalBatcher, load_dataset
from jaxdml.faults import inject
from jaxdml.faults.detect import PreemptionWatcher
from jaxdml.metrics import EventLog, MetricsWriter, write_result
from jaxdml.models import build_model, model_inputs
from jaxdml.training.loop import Loop, Periodic
from jaxdml.training.state import (
    TrainState,
    abstract_state,
    build_optimizer,
    flat_params,
    init_state,
    params_sha256,
    to_host,
)
from jaxdml.training.step import StepFn, make_skip_step, make_step


class Trainer:
    """One training run: everything built from `config`, written to `workdir`.

    Use `fit()` for a whole run, or `run_steps(n)` to advance step by step
    (notebooks). `state` is the one TrainState pytree (params, optimizer state,
    step, RNG key, data position); building a Trainer on a workdir that holds
    checkpoints resumes from the newest valid one.

        from jaxdml.supervisor import Supervisor

        trainer = jaxdml.Trainer(config, "/tmp/run")
        trainer.run_steps(50)          # the metrics row of step 50
        trainer.evaluate()             # {'train_accuracy': ..., 'test_accuracy': ...}
        trainer.state.params           # replicated over trainer.mesh
        result = trainer.fit(Supervisor(config))  # the remaining steps, supervised
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str,
        devices: Sequence[jax.Device] | None = None,
        dataset: Dataset | None = None,
        model: Any = None,
    ):
        """Args:
        config: a validated-or-not ConfigDict built on `jaxdml.config.default_config()`.
        workdir: output folder (metrics.jsonl, events.jsonl, result.json, checkpoints).
        devices: devices to train on (default: `config.num_cpu_devices` or all).
        dataset: an already loaded data set (default: load `config.data`).
        model: a model to train instead of the one `config.model` names, e.g. a
          `jaxdml.models.mlp.FlaxModel` around your own Flax module.
        """
        self.config = validate(config)
        self.workdir = workdir
        distributed.initialize(config)  # multi-process only; before any JAX computation
        # Before anything else starts JAX: simulated CPU devices must be set up front.
        devices = devices or distributed.default_devices(config)
        self.dataset = dataset or load_dataset(config.data)
        ds = self.dataset
        if model is None:
            model = build_model(config, ds.num_features, ds.num_classes, ds.x_train)
        self.model = model
        self._predict = jax.jit(model.predict)  # compiled once, not at every evaluation
        self.optimizer = build_optimizer(config)
        full = config.train.mode == "full_batch"
        self.batcher = GlobalBatcher(
            model_inputs(self.model, ds.x_train),
            ds.y_train,
            None if full else config.train.batch_size,
            config.seed,
        )
        # Process 0 writes the run's records; the others keep theirs apart, per process.
        records = workdir if distributed.is_coordinator() else _process_dir(workdir)
        self.metrics = MetricsWriter(records, config.train.tensorboard)
        self.events = EventLog(records, tensorboard=self.metrics.tensorboard)
        self.checkpointer = ckpt_lib.Checkpointer(
            workdir,
            max_to_keep=config.checkpoint.max_to_keep,
            keep_period=config.checkpoint.keep_period,
            async_save=config.checkpoint.async_save,
            on_event=self.events.record,
        )
        self.injector = inject.Injector(
            inject.parse(config.faults),
            already_fired=[e["fault"] for e in self.events.rows() if "fault" in e],
            record=self.events.record,
        )
        self.set_devices(devices)
        self._last_metrics: dict = {}
        self._start_time = time.time()
        self.preempted = False
        self.skip_steps: set[int] = set()  # steps whose batch is set aside (after a rollback)
        self.observers: list = []  # extra on_metrics(step, row) callbacks (the supervisor's)
        self.live_processes: list[int] | None = None  # set after a host loss: the survivors
        self.state: TrainState = self.restore_or_init()

    @property
    def num_steps(self) -> int:
        m = self.config.model
        return m.num_trees if m.name == "gbdt" else self.config.train.num_steps  # a step = a round

    def set_devices(self, devices: Sequence[jax.Device]) -> None:
        """(Re)builds the mesh over `devices` and the step compiled for it."""
        self.mesh = mesh_lib.make_mesh(devices)
        self.step_fn: StepFn = make_step(
            self.model, self.optimizer, self.mesh, self.config.train.donate
        )
        self.skip_fn: StepFn = make_skip_step(self.mesh)

    def restore_or_init(self) -> TrainState:
        """The state to start from.

        Resume precedence: (1) the newest valid checkpoint in workdir/checkpoints
        (invalid ones are set aside, older ones tried); (2) a fresh init when there
        are none, when checkpoint.resume='false' (old checkpoints are set aside, not
        deleted), or when none is valid and resume='auto_or_scratch'.
        """
        c = self.config
        if c.checkpoint.resume == "false":
            self.checkpointer.move_all_aside("checkpoint.resume=false")
            return self._fresh_state()
        try:
            state = self.restore_latest()
        except ckpt_lib.NoValidCheckpoint as e:
            if c.checkpoint.resume != "auto_or_scratch":
                raise
            logging.warning("%s; starting from scratch (resume=auto_or_scratch)", e)
            return self._fresh_state()
        step = int(to_host(state.step))
        if step:
            self.events.record("resumed", step, num_devices=int(self.mesh.devices.size))
            logging.info("resumed from checkpoint step %d", step)
        return state

    def restore_latest(self) -> TrainState:
        """The newest valid checkpoint on the current mesh (a fresh state if there is
        none); metrics rows past its step are dropped, since those steps run again."""
        abstract = abstract_state(self.model, self.optimizer, self.config.seed, self.mesh)
        restored = self.checkpointer.restore_latest_valid(abstract, ckpt_lib.identity(self.config))
        if restored is None:
            return self._fresh_state()
        state, meta = restored
        self.metrics.truncate_after(int(meta["step"]))
        return state

    def _fresh_state(self) -> TrainState:
        self.metrics.truncate_after(0)  # rows of an earlier, unsaved attempt
        return init_state(self.model, self.optimizer, self.config.seed, self.mesh)

    def replicated_sharding(self):
        """Every device of the current mesh holds the whole array (the state's layout)."""
        return mesh_lib.replicated(self.mesh)

    def save_checkpoint(self, step: int, state: TrainState, wait: bool = False) -> None:
        """Saves `state` (async unless `wait`), with the meta that validates it later."""
        meta = {
            "config": ckpt_lib.identity(self.config),
            "num_devices": int(self.mesh.devices.size),
            "jaxdml_version": jaxdml.__version__,
        }
        self.checkpointer.save(step, state, meta, wait=wait)

    def make_loop(
        self,
        num_steps: int | None = None,
        hooks: Sequence = (),
        should_stop=None,
        step_guard=None,
    ) -> Loop:
        """A Loop over the current mesh that logs every finished step's metrics."""
        t = self.config.train
        self._loop = Loop(
            self.step_fn,
            self.batcher,
            self.mesh,
            num_steps or self.num_steps,
            on_metrics=self._on_metrics,
            hooks=list(hooks),
            dispatch_depth=t.dispatch_depth,
            log_every=t.log_every,
            before_step=self.injector.before_step,
            should_stop=should_stop,
            skip_fn=self.skip_fn,
            skip_steps=frozenset(self.skip_steps),
            step_guard=step_guard,
        )
        return self._loop

    def checkpoint_hooks(self) -> list[Periodic]:
        """The periodic checkpoint save, as the config asks (empty when off)."""
        ck = self.config.checkpoint
        if not (ck.every_steps or ck.every_secs):
            return []
        return [Periodic(self.save_checkpoint, ck.every_steps, ck.every_secs)]

    def _on_metrics(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: np.asarray(v).item() for k, v in metrics.items()}}
        self._last_metrics = row
        every = self.config.train.eval_every
        if every and step % every == 0:
            # The state of this very step: self.state is only updated when the loop returns.
            row.update(self.evaluate(self._loop.last_good[1]))
        self.metrics.write(row)
        for observe in self.observers:
            observe(step, row)
        if step % self.config.train.log_every == 0:
            logging.info("step %d  loss %.5f  grad_norm %.3g", step, row["loss"], row["grad_norm"])

    def run_steps(self, n: int) -> dict:
        """Advances `n` steps with the plain loop (no supervisor, no periodic checkpoints).

        Stops at `config.train.num_steps`; a later `fit()` continues from `state.step`.
        Faults in `config.faults` still fire, and without a supervisor a lost device
        raises here; use `fit()` or `jaxdml.train` for recovery.

        Args:
          n: steps to run.

        Returns:
          The metrics row of the last finished step (loss, batch_accuracy, ...).
        """
        target = min(int(to_host(self.state.step)) + n, self.num_steps)
        self.state = self.make_loop(target).run(self.state)
        return self._last_metrics

    def evaluate(self, state: TrainState | None = None) -> dict:
        """Train and test accuracy of `state`'s parameters (default: the current state).

        Returns:
          {'train_accuracy': float, 'test_accuracy': float}.
        """
        params = to_host((self.state if state is None else state).params)
        ds = self.dataset
        predict = self._predict  # ds.predict: chunk by chunk when the data is memory-mapped
        return {
            "train_accuracy": float(np.mean(ds.predict(predict, params, "train") == ds.y_train)),
            "test_accuracy": float(np.mean(ds.predict(predict, params, "test") == ds.y_test)),
        }

    def fit(self, supervisor=None) -> dict:
        """Runs to `num_steps` and writes result.json; returns the result.

        Args:
          supervisor: None runs the plain loop, where any failure ends the run;
            otherwise an object with `run(trainer, should_stop)` that runs the loop,
            recovers from failures and leaves the final state in `trainer.state`,
            and `report()` -> dict of fields added to the result.

        On preemption (SIGTERM) the current step finishes, a checkpoint is saved
        synchronously, and the returned result has preempted=True (no result.json).
        """
        with PreemptionWatcher() as preemption:
            if supervisor is None:
                loop = self.make_loop(hooks=self.checkpoint_hooks(), should_stop=preemption.reached)
                self.state = loop.run(self.state)
            else:
                supervisor.run(self, should_stop=preemption.reached)
        step = int(to_host(self.state.step))
        if step < self.num_steps:
            return self.stop_preempted(step)
        self.save_checkpoint(step, self.state, wait=True)
        return self.finish(supervisor.report() if supervisor else {})

    def stop_preempted(self, step: int) -> dict:
        """Saves now, records the preemption and closes; the next start resumes."""
        self.save_checkpoint(step, self.state, wait=True)
        self.events.record("preemption", step, action="saved checkpoint and exited")
        logging.warning("preempted at step %d: checkpoint saved, exiting", step)
        self.preempted = True
        self.close()
        return {"preempted": True, "steps": step}

    def close(self) -> None:
        """Waits for pending saves and closes every writer."""
        self.checkpointer.close()
        self.metrics.close()
        self.events.close()

    def finish(self, extra: dict | None = None) -> dict:
        """Writes and returns result.json for the current state (plus `extra` fields)."""
        result = {
            **self.evaluate(),
            "loss": self._last_metrics.get("loss"),
            "steps": int(to_host(self.state.step)),
            "num_devices": int(self.mesh.devices.size),
            "wall_time_s": time.time() - self._start_time,
            "params_sha256": params_sha256(self.state.params),
            "model": self.config.model.name,
            "data": self.dataset.name,
        }
        result.update(extra or {})
        result["checkpoint_saves"] = self.checkpointer.saves
        result["checkpoint_failed_saves"] = self.checkpointer.failed_saves
        if distributed.is_coordinator():
            write_result(self.workdir, result)
            np.savez(os.path.join(self.workdir, "params.npz"), **flat_params(self.state.params))
        self.close()
        return result


def _process_dir(workdir: str) -> str:
    return os.path.join(workdir, f"process_{distributed.process_index()}")


def describe(result: dict[str, Any], events: list[dict] = ()) -> str:
    """A one-screen table of a result, and the faults and recoveries of the run."""
    keys = ("model", "data", "num_devices", "steps", "loss", "train_accuracy", "test_accuracy",
            "wall_time_s", "goodput", "lost_steps", "params_sha256")  # fmt: skip
    lines = []
    for k in keys:
        v = result.get(k)
        if v is not None:
            lines.append(f"{k:<16} {v:.4f}" if isinstance(v, float) else f"{k:<16} {v}")
    shown = [e for e in events if e["kind"] != "fault_injected"]
    if shown:
        lines.append("events:")
    for e in shown:
        lost = e.get("seconds_lost")
        lines.append(
            f"  step {e['step'] if e['step'] is not None else '-':>5}  {e['kind']:<12} "
            f"devices {e.get('devices', [])}  "
            f"{e.get('action', '')}" + (f"  ({lost:.2f} s lost)" if lost is not None else "")
        )
    return "\n".join(lines)
