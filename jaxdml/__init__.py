"""jaxdml: fault-tolerant data-parallel machine learning in JAX.

The research API:

  jaxdml.default_config()       the config schema (ml_collections), every field commented
  jaxdml.load_config(name)      a shipped config by name ("seed_logreg", "mlp:smoke") or path
  jaxdml.train(config, workdir) a whole supervised run; returns result.json's content
  jaxdml.Trainer(config, workdir)
      .run_steps(n) / .evaluate() / .state / .fit()   step-by-step use (notebooks)
  jaxdml.evaluate(config, workdir) the newest checkpoint scored: eval.json (trains nothing)
  jaxdml.load(workdir)          the trained model: .predict(x), .params, .model
  jaxdml.faults.parse(plan)     a fault plan string -> Faults ("nan@60,device_loss@100:3")
  jaxdml.plots.plot_run(workdir) loss/accuracy curves with every event marked (extra 'plots')
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxdml.config import ConfigError, default_config, validate
from jaxdml.constants import VERSION

if TYPE_CHECKING:
    import ml_collections

__version__ = VERSION


def train(config: ml_collections.ConfigDict, workdir: str, **components) -> dict:
    """Trains as `config` says, writing records to `workdir`; returns result.json's content.

    Args:
      config: a ConfigDict built on `default_config()` (see configs/).
      workdir: output folder; a folder holding checkpoints resumes from them.
      **components: what to use instead of what the config names, as `Trainer` takes
        them: model= (e.g. `jaxdml.models.flax.FlaxModel(module, ...)`), optimizer= (any
        optax transformation), dataset=, hooks=, devices=.

    Returns:
      The result: final accuracies, loss, steps, device count, wall time, params_sha256
      and, under the supervisor, fault accounting (goodput, faults, lost steps, ...).

    Raises:
      ConfigError: a bad config value or data (nothing trained).
      jaxdml.faults.errors.GaveUp: too few devices left or the recovery budget spent
        (a final checkpoint and workdir/report.json were written).
    """
    from jaxdml import distributed
    from jaxdml.training.trainer import Trainer

    trainer = Trainer(config, workdir, **components)
    result = trainer.fit()
    # Multi-process only: the processes still in the job leave it in order.
    distributed.shutdown(config.distributed.shutdown_timeout_secs, trainer.live_processes)
    return result


def load_config(name_or_path: str) -> ml_collections.ConfigDict:
    """A shipped config by name ('seed_logreg', 'mlp:smoke') or a config file by path.

    Works from any folder once jaxdml is installed (the configs ship in jaxdml/configs).
    """
    from jaxdml import configs

    return configs.load(name_or_path)


def load(workdir: str, model=None):
    """The model a run trained, from its params.npz: `.predict(x)` gives class indices,
    `.model`, `.params`, `.config` (see jaxdml/export.py).

    Args:
      workdir: a finished run's folder (or one `--mode=eval` exported).
      model: your own model object, for a run of your own module (default: built from
        the run's model.json).
    """
    from jaxdml.export import load as load_workdir

    return load_workdir(workdir, model)


def evaluate(config: ml_collections.ConfigDict, workdir: str, data_path: str = "") -> dict:
    """Scores the newest valid checkpoint of `workdir` on the test split (or a .npz file
    of X, y); writes eval.json and params.npz; trains nothing. Returns eval.json's content.

    Raises:
      ConfigError: no checkpoint in `workdir`, or a bad data file.
    """
    from jaxdml.export import evaluate as evaluate_workdir

    return evaluate_workdir(config, workdir, data_path)


def __getattr__(name: str):
    if name == "Trainer":
        from jaxdml.training.trainer import Trainer

        return Trainer
    raise AttributeError(name)


__all__ = [
    "ConfigError", "Trainer", "default_config", "evaluate", "load", "load_config", "train",
    "validate",
]  # fmt: skip
