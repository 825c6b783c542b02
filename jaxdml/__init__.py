"""jaxdml: fault-tolerant data-parallel machine learning in JAX."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxdml.config import ConfigError, default_config, validate

if TYPE_CHECKING:
    import ml_collections

__version__ = "0.1.0"


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains as `config` says, writing records to `workdir`; returns result.json's content.

    Args:
      config: a ConfigDict built on `default_config()` (see configs/).
      workdir: output folder; a folder holding checkpoints resumes from them.

    Returns:
      The result: final accuracies, loss, steps, device count, wall time, params_sha256
      and, under the supervisor, fault accounting (goodput, faults, lost steps, ...).

    Raises:
      ConfigError: a bad config value or data (nothing trained).
      jaxdml.supervisor.GaveUp: too few devices left or the recovery budget spent
        (a final checkpoint and workdir/report.json were written).
    """
    from jaxdml import distributed
    from jaxdml.supervisor import Supervisor
    from jaxdml.training.trainer import Trainer

    trainer = Trainer(config, workdir)
    result = trainer.fit(Supervisor(config) if config.supervisor.enabled else None)
    # Multi-process only: the processes still in the job leave it in order.
    distributed.shutdown(config.distributed.shutdown_timeout_secs, trainer.live_processes)
    return result


def __getattr__(name: str):
    if name == "Trainer":
        from jaxdml.training.trainer import Trainer

        return Trainer
    raise AttributeError(name)


__all__ = ["ConfigError", "Trainer", "default_config", "train", "validate"]
