"""Orbax checkpoints of the whole TrainState, with our own validity check.

A checkpoint step holds two Orbax items: `state` (the TrainState pytree) and
`meta` (JSON: the state's fingerprint, the config fields that define the
problem, leaf shapes, versions, device count). A step is used only if Orbax
committed it (its commit marker is present) and the restored state's
fingerprint equals the one recorded at save time. A step that fails either
check is moved aside (never deleted) and the next older one is tried.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jaxdml.config import ConfigError
from jaxdml.faults.detect import fingerprint_hex

COMMIT_MARKER = "commit_success.txt"
SET_ASIDE_DIR = "checkpoints_set_aside"

# Fields that define the problem: a checkpoint written under other values
# cannot be resumed by this config.
IDENTITY_FIELDS = (
    "seed",
    "data.source",
    "data.name",
    "data.path",
    "data.n_samples",
    "data.n_features",
    "data.n_classes",
    "data.random_state",
    "data.test_size",
    "data.split_seed",
    "data.standardize",
    "model",
    "train.mode",
    "train.batch_size",
    "train.optimizer",
    "train.learning_rate",
    "train.momentum",
)


class CheckpointError(ConfigError):
    """No usable checkpoint, or one written for another problem. Exit status 2."""


class NoValidCheckpoint(CheckpointError):
    """Checkpoints exist but none passes the checks (all were set aside)."""


def identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The IDENTITY_FIELDS of `config`, flattened to JSON-able dotted keys."""
    out: dict[str, Any] = {}
    for field in IDENTITY_FIELDS:
        node: Any = config
        for part in field.split("."):
            node = node[part]
        if isinstance(node, ml_collections.ConfigDict):
            for k, v in node.to_dict().items():
                out[f"{field}.{k}"] = list(v) if isinstance(v, tuple) else v
        else:
            out[field] = list(node) if isinstance(node, tuple) else node
    return out


def leaf_shapes(tree: Any) -> dict[str, list[int]]:
    """{keypath: shape} of every leaf."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): list(leaf.shape) for path, leaf in flat}


class Checkpointer:
    """Async Orbax saves of the TrainState; restore of the newest valid step.

    Args:
      workdir: run folder; checkpoints go to workdir/checkpoints.
      max_to_keep: newest steps kept.
      keep_period: also keep every step divisible by this (0: off).
      async_save: save in a background thread.
      on_event: callback(kind, step, **fields) for events.jsonl.
    """

    def __init__(
        self,
        workdir: str,
        max_to_keep: int = 3,
        keep_period: int = 0,
        async_save: bool = True,
        on_event=None,
    ):
        self.workdir = workdir
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._on_event = on_event or (lambda *a, **k: None)
        self.failed_saves = 0
        self.saves = 0
        self.last_saved_step: int | None = None
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_period or None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)
        self._host_copies = False

    def restrict_to(self, process_ids: list[int]) -> None:
        """After a host loss: a new manager among the surviving processes.

        The old manager's next save fails at once (its collectives include the dead
        process). The new one synchronizes only `process_ids`, with the lowest as
        primary host, and is given host numpy copies of the replicated state, which
        Orbax saves from the primary host (it refuses process-local jax.Arrays).
        """
        options = dataclasses.replace(
            self._options,
            create=False,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=min(process_ids),
                active_processes=set(process_ids),
                barrier_sync_key_prefix=f"survivors_{'_'.join(map(str, process_ids))}",
            ),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._host_copies = True

    # ----------------------------------------------------------------- saving

    def save(self, step: int, state: Any, meta: dict[str, Any], wait: bool = False) -> bool:
        """Starts saving `state` as `step` (blocks only for the device->host copy).

        A failure of an earlier background save is reported here (logged, counted,
        recorded) and this save is still attempted. Returns whether it was issued.
        """
        self._surface_background_errors()
        if step == self.last_saved_step or step in self.manager.all_steps():
            return False
        if self._host_copies:
            state = jax.tree.map(_local_copy, state)
        meta = {
            **meta,
            "step": int(step),
            "fingerprint": fingerprint_hex(state),
            "shapes": leaf_shapes(state),
            "jax_version": jax.__version__,
            "saved_at": time.time(),
        }
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 -- a failed save must not end training
            self._record_failure(step, e)
            return False
        self.saves += 1
        self.last_saved_step = step
        if wait:
            self.wait()
        return True

    def wait(self) -> None:
        """Blocks until pending saves are committed; reports a failed one."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._record_failure(self.last_saved_step, e)

    def _surface_background_errors(self) -> None:
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._record_failure(self.last_saved_step, e)

    def _record_failure(self, step: int | None, error: Exception) -> None:
        self.failed_saves += 1
        logging.error("checkpoint save of step %s failed: %s", step, error)
        self._on_event("checkpoint_save_failed", step or 0, error=str(error)[:500])

    # -------------------------------------------------------------- restoring

    def steps(self) -> list[int]:
        """Steps Orbax lists in the checkpoint folder, oldest first."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def restore_latest_valid(
        self, abstract_state: Any, config_identity: dict[str, Any]
    ) -> tuple[Any, dict] | None:
        """The newest step that is committed, matches the config and passes its checksum.

        Invalid steps are set aside with a warning. Returns None when there are no
        checkpoints at all.

        Raises:
          NoValidCheckpoint: checkpoints exist but none is valid.
          CheckpointError: the newest committed one was written for another config
            (names the mismatched field).
        """
        steps = self.steps()
        if not steps:
            return None
        for step in reversed(steps):
            restored, problem = self._try_restore(step, abstract_state, config_identity)
            if restored is not None:
                return restored
            logging.warning(
                "checkpoint step %d is not usable (%s); trying an older one", step, problem
            )
            self.set_aside(step, problem)
        raise NoValidCheckpoint(
            f"{self.directory}: none of the checkpoints {steps} is valid (set aside in "
            f"{SET_ASIDE_DIR}/); use --config.checkpoint.resume=auto_or_scratch to start over"
        )

    def _try_restore(self, step: int, abstract_state: Any, config_identity: dict) -> tuple:
        step_dir = os.path.join(self.directory, str(step))
        for item in ("", "state", "meta"):
            if not os.path.exists(os.path.join(step_dir, item, COMMIT_MARKER)):
                return None, f"no Orbax commit marker in {os.path.join(str(step), item)}"
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = dict(meta["meta"])
        except Exception as e:  # noqa: BLE001 -- a broken checkpoint is expected here
            return None, f"unreadable meta: {str(e)[:200]}"
        _check_compatible(meta, abstract_state, config_identity, step)
        try:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            state = self.manager.restore(step, args=args)["state"]
        except Exception as e:  # noqa: BLE001
            return None, f"unreadable state: {str(e)[:200]}"
        got = fingerprint_hex(state)
        if got != meta.get("fingerprint"):
            return None, f"checksum mismatch (saved {meta.get('fingerprint')}, restored {got})"
        return (state, meta), None

    def set_aside(self, step: int, reason: str) -> str:
        """Moves a bad step out of the checkpoint folder (kept for inspection)."""
        aside = os.path.join(self.workdir, SET_ASIDE_DIR)
        os.makedirs(aside, exist_ok=True)
        target = os.path.join(aside, f"{step}-{int(time.time() * 1000)}")
        os.replace(os.path.join(self.directory, str(step)), target)
        self._on_event("checkpoint_set_aside", step, reason=reason, moved_to=target)
        self.manager.reload()
        return target

    def move_all_aside(self, reason: str) -> None:
        """Sets every step aside (a run told not to resume keeps the old ones)."""
        for step in self.steps():
            self.set_aside(step, reason)

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _local_copy(x: Any) -> Any:
    """A host numpy copy of a replicated array, read from this process's replica."""
    return np.asarray(x.addressable_shards[0].data) if isinstance(x, jax.Array) else x


def _check_compatible(meta: dict, abstract_state: Any, config_identity: dict, step: int) -> None:
    saved = meta.get("config", {})
    for key in sorted(set(saved) | set(config_identity)):
        if saved.get(key) != config_identity.get(key):
            raise CheckpointError(
                f"checkpoint step {step} was written with config.{key}={saved.get(key)!r}, "
                f"this run has config.{key}={config_identity.get(key)!r}; use another "
                f"--workdir or --config.checkpoint.resume=false"
            )
    want = leaf_shapes(abstract_state)
    got = meta.get("shapes", {})
    for path in sorted(set(want) | set(got)):
        if want.get(path) != got.get(path):
            raise CheckpointError(
                f"checkpoint step {step}: state{path} has shape {got.get(path)}, "
                f"this config needs {want.get(path)}"
            )
