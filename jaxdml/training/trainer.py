"""Trainer: builds data, model, mesh, state and step from a config, and runs the loop."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxdml import mesh as mesh_lib
from jaxdml.config import validate
from jaxdml.data import Dataset, GlobalBatcher, load_dataset
from jaxdml.metrics import EventLog, MetricsWriter, write_result
from jaxdml.models import build_model, model_inputs
from jaxdml.training.loop import Loop
from jaxdml.training.state import TrainState, build_optimizer, init_state, params_sha256, to_host
from jaxdml.training.step import StepFn, make_step


class Trainer:
    """One training run: everything built from `config`, written to `workdir`.

    Use `fit()` for a whole run, or `run_steps(n)` to advance step by step
    (notebooks). `state` is the one TrainState pytree.
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
        self.dataset = dataset or load_dataset(config.data)
        ds = self.dataset
        if model is None:
            model = build_model(config, ds.num_features, ds.num_classes, ds.x_train)
        self.model = model
        self.optimizer = build_optimizer(config)
        full = config.train.mode == "full_batch"
        self.batcher = GlobalBatcher(
            model_inputs(self.model, ds.x_train),
            ds.y_train,
            None if full else config.train.batch_size,
            config.seed,
        )
        self.metrics = MetricsWriter(workdir, config.train.tensorboard)
        self.events = EventLog(workdir)
        self.set_devices(devices or mesh_lib.select_devices(config.num_cpu_devices))
        self.state: TrainState = init_state(self.model, self.optimizer, config.seed, self.mesh)
        self._last_metrics: dict = {}
        self._start_time = time.time()

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

    def make_loop(self, num_steps: int | None = None, hooks: Sequence = ()) -> Loop:
        """A Loop over the current mesh that logs every finished step's metrics."""
        t = self.config.train
        return Loop(
            self.step_fn,
            self.batcher,
            self.mesh,
            num_steps or self.num_steps,
            on_metrics=self._on_metrics,
            hooks=list(hooks),
            dispatch_depth=t.dispatch_depth,
            log_every=t.log_every,
        )

    def _on_metrics(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: np.asarray(v).item() for k, v in metrics.items()}}
        self._last_metrics = row
        every = self.config.train.eval_every
        if every and step % every == 0:
            row.update(self.evaluate())
        self.metrics.write(row)
        if step % self.config.train.log_every == 0:
            logging.info("step %d  loss %.5f  grad_norm %.3g", step, row["loss"], row["grad_norm"])

    def run_steps(self, n: int) -> dict:
        """Advances `n` steps (not past num_steps); returns the last step's metrics."""
        target = min(int(to_host(self.state.step)) + n, self.num_steps)
        self.state = self.make_loop(target).run(self.state)
        return self._last_metrics

    def evaluate(self) -> dict:
        """Train and test accuracy of the current parameters."""
        params = to_host(self.state.params)
        predict = jax.jit(self.model.predict)
        ds = self.dataset
        return {
            "train_accuracy": float(np.mean(np.asarray(predict(params, ds.x_train)) == ds.y_train)),
            "test_accuracy": float(np.mean(np.asarray(predict(params, ds.x_test)) == ds.y_test)),
        }

    def fit(self) -> dict:
        """Runs to `num_steps` and writes result.json; returns the result."""
        self.state = self.make_loop().run(self.state)
        return self.finish()

    def finish(self) -> dict:
        """Writes and returns result.json for the current state."""
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
        write_result(self.workdir, result)
        self.metrics.close()
        self.events.close()
        return result


def describe(result: dict[str, Any]) -> str:
    """A one-screen table of a result."""
    keys = (
        "model",
        "data",
        "num_devices",
        "steps",
        "loss",
        "train_accuracy",
        "test_accuracy",
        "wall_time_s",
        "params_sha256",
    )
    lines = []
    for k in keys:
        v = result.get(k)
        lines.append(f"{k:<16} {v:.4f}" if isinstance(v, float) else f"{k:<16} {v}")
    return "\n".join(lines)
