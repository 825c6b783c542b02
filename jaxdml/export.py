"""Eval-only runs and exported models.

  evaluate(config, workdir)   the newest valid checkpoint of a workdir (restored by the
                              Trainer, as a resume would), scored on the test split or a
                              .npz file: eval.json, and its parameters as params.npz
  load(workdir)               a run's params.npz and model.json as a `Loaded` model with
                              `predict(x)`, for every shipped model

params.npz holds one array per parameter, named by its path ("w", "Dense_0/kernel",
"leaf"); model.json (written by every run) holds the config and the data's shape, which
is all it takes to build the model again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxdml.config import ConfigError
from jaxdml.data import Dataset
from jaxdml.metrics import write_json
from jaxdml.models import build_model, row_losses
from jaxdml.training.state import flat_params, to_host, unflat_params

MODEL_JSON, PARAMS_NPZ, EVAL_JSON = "model.json", "params.npz", "eval.json"


@dataclasses.dataclass
class Loaded:
    """A trained model: `predict(x)` gives class indices 0..K-1 of float features [n, F];
    `class_names[k]` is the original label of class k."""

    model: Any
    params: Any
    config: ml_collections.ConfigDict
    class_names: tuple

    def __post_init__(self):
        self._predict = jax.jit(self.model.predict)

    def predict(self, x: Any) -> np.ndarray:
        return np.asarray(self._predict(self.params, np.asarray(x, np.float32)))

    def predict_labels(self, x: Any) -> np.ndarray:
        """The original labels (as in the training data) of `predict(x)`."""
        return np.asarray(self.class_names)[self.predict(x)]


def load(workdir: str, model: Any = None) -> Loaded:
    """The model a run trained, with the parameters of its params.npz.

    Args:
      workdir: a finished run's folder (or one where `--mode=eval` wrote params.npz).
      model: the model object, for a run of your own module (`Trainer(..., model=...)`);
        default: built from model.json like the run built it.

    Raises:
      FileNotFoundError: no params.npz or model.json in `workdir`.
    """
    with open(os.path.join(workdir, MODEL_JSON)) as f:
        info = json.load(f)
    config = ml_collections.ConfigDict(info["config"])
    if model is None:
        features, classes = info["num_features"], info["num_classes"]
        # A tree ensemble predicts from the thresholds in its parameters; the bin edges
        # (computed from training rows) only bin training data, so any rows do here.
        dummy = np.zeros((2, features), np.float32)
        model = build_model(config, features, classes, dummy)
    like = jax.eval_shape(model.init, jax.random.key(0))
    with np.load(os.path.join(workdir, PARAMS_NPZ)) as npz:
        params = unflat_params(dict(npz), like)
    return Loaded(model, params, config, tuple(info["class_names"]))


def evaluate(config: ml_collections.ConfigDict, workdir: str, data_path: str = "") -> dict:
    """Scores the newest valid checkpoint of `workdir` and writes eval.json (and the
    checkpoint's parameters as params.npz). Nothing is trained.

    Args:
      config: the run's config.
      workdir: the run's folder.
      data_path: a .npz file (X, y) to score instead of the config's test split.

    Returns:
      eval.json's content: step, accuracy, loss, rows, data.

    Raises:
      ConfigError: no checkpoint in `workdir`, or a bad data file.
    """
    from jaxdml.training.trainer import Trainer

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise ConfigError(f"no checkpoint in {workdir}: nothing to evaluate")
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
    config.checkpoint.resume = "required"
    config.train.progress = False
    trainer = Trainer(config, workdir)
    ds = trainer.dataset
    x, y, where = ds.x_test, ds.y_test, f"{ds.name} (test split)"
    if data_path:
        x, y = _npz_rows(data_path, ds, config)
        where = data_path
    params = to_host(trainer.state.params)
    losses, predicted = _score(trainer.model, params, x, y)
    result = {
        "step": int(to_host(trainer.state.step)),
        "accuracy": float(np.mean(predicted == y)),
        "loss": float(np.mean(losses)),
        "rows": len(y),
        "data": where,
        "restored_from": trainer.restored_from,
    }
    write_json(os.path.join(workdir, EVAL_JSON), result)
    np.savez(os.path.join(workdir, PARAMS_NPZ), **flat_params(params))
    trainer.close()
    return result


def _score(model: Any, params: Any, x: Any, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row losses, predicted classes) of every row, chunk by chunk for mapped rows."""
    fn = jax.jit(lambda p, xs, ys: (row_losses(model, p, xs, ys), model.predict(p, xs)))
    chunks = x.chunks() if hasattr(x, "chunks") else [x]
    losses, predicted, start = [], [], 0
    for chunk in chunks:
        chunk = np.asarray(chunk, np.float32)
        part = y[start : start + len(chunk)]
        loss, pred = fn(params, chunk, part)
        losses.append(np.asarray(loss))
        predicted.append(np.asarray(pred))
        start += len(chunk)
    return np.concatenate(losses), np.concatenate(predicted)


def _npz_rows(path: str, ds: Dataset, config) -> tuple[np.ndarray, np.ndarray]:
    """X and y of an .npz file, labels mapped to the training data's classes."""
    if config.data.standardize or config.data.impute != "none":
        raise ConfigError(
            "--eval_data: the run standardizes or imputes its features; evaluate on its "
            "own test split instead (the training statistics are not kept)"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            x, y = np.asarray(npz["X"], np.float32), np.asarray(npz["y"])
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read X and y from it as .npz ({e})") from e
    if x.ndim != 2 or x.shape[1] != ds.num_features or len(y) != len(x):
        raise ConfigError(
            f"{path}: X has shape {x.shape} and y {y.shape}; the model needs [n, "
            f"{ds.num_features}] and n labels"
        )
    names = list(ds.class_names) or list(range(ds.num_classes))
    lookup = {name: k for k, name in enumerate(names)}
    unknown = sorted({v.item() for v in np.unique(y)} - set(lookup))
    if unknown:
        raise ConfigError(f"{path}: labels {unknown[:5]} are not classes of the run {names}")
    return x, np.array([lookup[v.item()] for v in y], np.int32)
