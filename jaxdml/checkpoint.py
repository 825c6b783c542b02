"""Checkpoints of the whole TrainState, with our own validity seal.

A checkpoint step holds the state, a JSON meta (the config fields and data identity that
define the problem, leaf shapes, versions, device count) and our seal,
`jaxdml_seal.json`: the fingerprint every replica of the state agreed on when it was
saved. The replicas' fingerprints are dispatched on the device with the save and their
verdict is given later (`approve` / `reject`), so the check costs the loop nothing; a
step whose replicas disagreed is never sealed, so it is never restored (the supervisor
handles the silent data corruption instead). A step is used only if it was committed,
it carries the seal, and the restored state's fingerprint equals the sealed one. A step
that fails is moved aside (never deleted) and the next older one is tried.

`Tier` holds that logic; `Checkpointer` is the persistent tier (Orbax's
CheckpointManager in workdir/checkpoints, shared by the processes) and
jaxdml.memory_tier.MemoryTier the process-local one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jaxdml import distributed
from jaxdml.config import ConfigError
from jaxdml.faults.detect import fingerprint_hex

COMMIT_MARKER = "commit_success.txt"
SEAL = "jaxdml_seal.json"

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


@dataclasses.dataclass
class _Pending:
    """A save whose seal waits for its commit and for the verdict on its replicas."""

    step: int
    fingerprint: str | None = None  # the agreed fingerprint, once approved
    rejected: str | None = None  # why it must never be used, once rejected


class Tier:
    """One checkpoint tier: saves, the seal, validity, restore of the newest valid step.

    Subclasses store the bytes: `_write`, `_finish_writes`, `_committed`, `steps`,
    `_read_meta`, `_read_state`, `_forget`, `close`.

    Args:
      directory: the tier's folder.
      set_aside: where invalid steps are moved (kept for inspection); default: the folder
        beside `directory` with "_set_aside" appended.
      on_event: callback(kind, step, **fields) for events.jsonl.
      primary: this process seals and sets aside (a shared tier has one primary).
    """

    def __init__(
        self, directory: str, set_aside: str | None = None, on_event=None, primary: bool = True
    ):
        self.directory = os.path.abspath(directory)
        self.set_aside_dir = set_aside or self.directory.rstrip(os.sep) + "_set_aside"
        self._on_event = on_event or (lambda *a, **k: None)
        self._primary = primary
        self.failed_saves = 0
        self.saves = 0
        self.last_saved_step: int | None = None
        self._pending: list[_Pending] = []
        # A tier's writer thread may seal too (`poll(seals_only=True)` once it commits).
        self._lock = threading.RLock()
        # What a seal waits for (the run's MetricsWriter: `through`, `drain()`): a step is
        # sealed only once the metrics rows of its steps were accepted by every hook and
        # are on disk.
        self.rows: Any = None

    # ----------------------------------------------------------------- saving

    def save(self, step: int, state: Any, meta: dict[str, Any], wait: bool = False) -> bool:
        """Starts saving `state` as `step` (blocks only for the device->host copy).

        The step is sealed once it is committed and `approve` gave the fingerprint its
        replicas agreed on; until then it is not a valid checkpoint. A failed earlier
        background save is reported here (logged, counted, recorded) and this save is
        still attempted. Returns whether it was issued.
        """
        self._surface_background_errors()
        if step == self.last_saved_step or self._has(step):
            return False
        meta = {
            **meta,
            "step": int(step),
            "shapes": leaf_shapes(state),
            "jax_version": jax.__version__,
            "saved_at": time.time(),
        }
        try:
            self._write(step, state, meta)
        except Exception as e:  # noqa: BLE001 -- a failed save must not end training
            self._record_failure(step, e)
            return False
        self.saves += 1
        self.last_saved_step = step
        with self._lock:
            self._pending.append(_Pending(step))
        if wait:
            self.wait()
        return True

    def approve(self, step: int, fingerprint: str) -> None:
        """The replicas of the state saved as `step` agreed on `fingerprint`: seal it once
        it is committed."""
        with self._lock:
            for p in self._pending:
                if p.step == step:
                    p.fingerprint = fingerprint
            self.poll()

    def reject(self, step: int, reason: str) -> None:
        """The replicas of the state saved as `step` disagreed: it is never sealed, and is
        set aside once it has been written."""
        with self._lock:
            for p in self._pending:
                if p.step == step:
                    p.rejected = reason
            self.poll()

    def poll(self, seals_only: bool = False) -> None:
        """Seals (or sets aside) the pending saves that are committed and have a verdict
        (and whose rows are through the gate); cheap when there is nothing to do (a few
        stat calls). `seals_only`: rejected saves wait for the loop's next call (a writer
        thread's poll, right after a commit: the seal comes a step sooner)."""
        with self._lock:
            self._poll(seals_only)

    def _poll(self, seals_only: bool) -> None:
        still = []
        through = self.rows.through if self.rows is not None else None
        for p in self._pending:
            if (p.fingerprint is None and p.rejected is None) or not self._committed(p.step):
                still.append(p)
            elif p.rejected is None and through is not None and p.step > through:
                still.append(p)  # its rows are not yet accepted and written
            elif p.rejected is not None and seals_only:
                still.append(p)
            elif p.rejected is not None:
                self.set_aside(p.step, p.rejected)
            elif self._primary:
                seal = {"fingerprint": p.fingerprint}
                try:
                    _write_atomically(os.path.join(self._step_dir(p.step), SEAL), seal)
                except FileNotFoundError:
                    # Pruned (max_to_keep) by the memory tier's writer thread after it
                    # was seen committed: nothing is left to seal.
                    logging.warning("checkpoint step %d was removed before its seal", p.step)
        self._pending = still

    def wait(self) -> None:
        """Blocks until pending saves are written, and seals those with a verdict;
        reports a failed save."""
        try:
            self._finish_writes()
        except Exception as e:  # noqa: BLE001
            self._record_failure(self.last_saved_step, e)
        if self.rows is not None:
            self.rows.drain()
        with self._lock:
            self.poll()
            # What did not commit (a failed save) never will.
            self._pending = [p for p in self._pending if os.path.isdir(self._step_dir(p.step))]

    def _surface_background_errors(self) -> None:
        pass

    def _record_failure(self, step: int | None, error: Exception) -> None:
        self.failed_saves += 1
        logging.error("checkpoint save of step %s failed: %s", step, error)
        self._on_event("checkpoint_save_failed", step or 0, error=str(error)[:500])

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # -------------------------------------------------------------- restoring

    def restore_latest_valid(
        self, abstract_state: Any, problem: dict[str, Any], at_most: int | None = None
    ) -> tuple[Any, dict] | None:
        """The newest step (<= at_most) that is committed, sealed, written for `problem`
        and matches its seal; invalid ones are set aside with a warning. None when there
        are no checkpoints at all.

        Raises:
          NoValidCheckpoint: checkpoints exist but none is valid.
          CheckpointError: the newest committed one was written for another problem
            (names the mismatched field).
        """
        steps = [s for s in self.steps() if at_most is None or s <= at_most]
        if not steps:
            return None
        for step in reversed(steps):
            restored = self.restore_step(step, abstract_state, problem)
            if restored is not None:
                return restored
        raise NoValidCheckpoint(f"{self.directory}: none of the checkpoints {steps} is valid")

    def restore_step(self, step: int, abstract_state: Any, problem: dict) -> tuple | None:
        """(state, meta) of `step` if it is valid; otherwise None, and it is set aside.

        Raises:
          CheckpointError: it was written for another problem (names the field).
        """
        restored, problem_text = self._try_restore(step, abstract_state, problem)
        if restored is None:
            logging.warning("checkpoint step %d is not usable (%s)", step, problem_text)
            self.set_aside(step, problem_text)
        return restored

    def valid_candidates(self) -> tuple[list[int], int]:
        """What this tier can offer before anything is read: (sealed and committed steps,
        newest first; how many sealed steps are broken).

        A step without our seal never completed (the process died before its replicas
        were verified, or they disagreed): it is set aside and does not count. A sealed
        step that is not committed was damaged after it completed: it is set aside and
        counts as a checkpoint that existed.
        """
        out, broken = [], 0
        for step in reversed(self.steps()):
            problem = self._marker_problem(step)
            if problem is None:
                out.append(step)
                continue
            logging.warning("checkpoint step %d is not usable (%s)", step, problem)
            broken += os.path.exists(os.path.join(self._step_dir(step), SEAL))
            self.set_aside(step, problem)
        return out, broken

    def _marker_problem(self, step: int) -> str | None:
        if not os.path.exists(os.path.join(self._step_dir(step), SEAL)):
            return "no seal: it never completed (killed before its replicas were verified)"
        if not self._committed(step):
            return f"no commit marker in {step}/"
        return None

    def _try_restore(self, step: int, abstract_state: Any, problem: dict) -> tuple:
        bad = self._marker_problem(step)
        if bad:
            return None, bad
        meta, bad = self._read_meta(step)
        if bad:
            return None, bad
        _check_compatible(meta, abstract_state, problem, step)
        try:
            state = self._read_state(step, abstract_state)
        except Exception as e:  # noqa: BLE001 -- a broken checkpoint is expected here
            return None, f"unreadable state: {str(e)[:200]}"
        with open(os.path.join(self._step_dir(step), SEAL)) as f:
            sealed = json.load(f)["fingerprint"]
        got = fingerprint_hex(state)
        if got != sealed:
            return None, f"checksum mismatch (sealed {sealed}, restored {got})"
        return (state, meta), None

    def set_aside(self, step: int, reason: str) -> str | None:
        """Moves a bad step out of the checkpoint folder (kept for inspection). In a
        shared tier only the primary process moves it (the others would race it)."""
        if not self._primary or not os.path.isdir(self._step_dir(step)):
            return None
        os.makedirs(self.set_aside_dir, exist_ok=True)
        target = os.path.join(self.set_aside_dir, f"{step}-{int(time.time() * 1000)}")
        os.replace(self._step_dir(step), target)
        self._on_event("checkpoint_set_aside", step, reason=reason, moved_to=target)
        self._forget(step)
        return target

    def move_all_aside(self, reason: str) -> None:
        """Sets every step aside (a run told not to resume keeps the old ones)."""
        for step in self.steps():
            self.set_aside(step, reason)

    # ------------------------------------------------------- storage (subclass)

    def steps(self) -> list[int]:
        raise NotImplementedError

    def _has(self, step: int) -> bool:
        return step in self.steps()

    def _write(self, step: int, state: Any, meta: dict) -> None:
        raise NotImplementedError

    def _finish_writes(self) -> None:
        raise NotImplementedError

    def _committed(self, step: int) -> bool:
        raise NotImplementedError

    def _read_meta(self, step: int) -> tuple[dict, str | None]:
        raise NotImplementedError

    def _read_state(self, step: int, abstract_state: Any) -> Any:
        raise NotImplementedError

    def _forget(self, step: int) -> None:
        """After `step` was moved away."""

    def close(self) -> None:
        self.wait()


class Checkpointer(Tier):
    """The persistent tier: Orbax's CheckpointManager (async saves, max_to_keep), shared by
    the processes of the job; process 0 (the lowest survivor) seals.

    Args:
      directory, set_aside, on_event: as Tier.
      max_to_keep: newest steps kept.
      keep_period: also keep every step divisible by this (0: off).
      async_save: save in a background thread.
    """

    def __init__(
        self,
        directory: str,
        set_aside: str | None = None,
        max_to_keep: int = 3,
        keep_period: int = 0,
        async_save: bool = True,
        on_event=None,
    ):
        super().__init__(directory, set_aside, on_event, primary=jax.process_index() == 0)
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_period or None,
            enable_async_checkpointing=async_save,
            create=True,
            async_options=_async_options(list(range(jax.process_count()))),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)
        self._host_copies = False
        self._alone: ocp.CheckpointManager | None = None
        # Multi-process, each process reads alone: one may restore a step the others take
        # from their memory tier (Orbax's own restore would wait for all of them).
        self.read_alone = jax.process_count() > 1

    def restrict_to(self, process_ids: list[int]) -> None:
        """After a host loss: a new manager among the surviving processes.

        The old manager's next save fails at once (its collectives include the dead
        process). The new one synchronizes only `process_ids`, with the lowest as
        primary host, and is given host numpy copies of the replicated state, which
        Orbax saves from the primary host (it refuses process-local jax.Arrays).
        """
        self.manager = self._manager(process_ids, f"survivors_{'_'.join(map(str, process_ids))}")
        self._primary = jax.process_index() == min(process_ids)
        self._host_copies = True

    def _manager(self, process_ids: list[int], prefix: str) -> ocp.CheckpointManager:
        options = dataclasses.replace(
            self._options,
            create=False,
            async_options=_async_options(process_ids),
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=min(process_ids),
                active_processes=set(process_ids),
                barrier_sync_key_prefix=prefix,
            ),
        )
        return ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Steps Orbax lists in the folder, oldest first."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def _has(self, step: int) -> bool:
        # Not steps(): reloading races Orbax's own deletion of old steps in its thread.
        return step in self.manager.all_steps()

    def _write(self, step: int, state: Any, meta: dict) -> None:
        if self._host_copies:
            state = jax.tree.map(_local_copy, state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)

    def _finish_writes(self) -> None:
        self.manager.wait_until_finished()

    def _surface_background_errors(self) -> None:
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._record_failure(self.last_saved_step, e)

    def _committed(self, step: int) -> bool:
        return all(
            os.path.exists(os.path.join(self._step_dir(step), item, COMMIT_MARKER))
            for item in ("", "state", "meta")
        )

    def _reader(self) -> ocp.CheckpointManager:
        """The manager to read with: one this process uses alone when multi-process."""
        if not self.read_alone:
            return self.manager
        if self._alone is None:
            me = jax.process_index()
            self._alone = self._manager([me], f"read_{me}")
        self._alone.reload()
        return self._alone

    def _read_meta(self, step: int) -> tuple[dict, str | None]:
        try:
            args = ocp.args.Composite(meta=ocp.args.JsonRestore())
            return dict(self._reader().restore(step, args=args)["meta"]), None
        except Exception as e:  # noqa: BLE001 -- a broken checkpoint is expected here
            return {}, f"unreadable meta: {str(e)[:200]}"

    def _read_state(self, step: int, abstract_state: Any) -> Any:
        if not self.read_alone:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            return self.manager.restore(step, args=args)["state"]
        # Read as host arrays, then laid on this process's devices of the (multi-process)
        # replicated sharding: nothing moves between processes.
        host = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(host))
        restored = self._reader().restore(step, args=args)["state"]
        return jax.tree.map(place_replicated, restored, abstract_state)

    def _forget(self, step: int) -> None:
        self.manager.reload()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
            if self._alone is not None:
                self._alone.close()


def _async_options(process_ids: list[int]) -> ocp.options.AsyncOptions:
    """Orbax's background barriers (a save's commit and finalize) among `process_ids`
    fail once a member is dead instead of waiting out their timeout (jaxdml.pulse)."""
    return ocp.options.AsyncOptions(barrier_sync_fn=distributed.orbax_barrier(process_ids))


def _local_copy(x: Any) -> Any:
    """A host numpy copy of a replicated array, read from this process's replica."""
    return np.asarray(x.addressable_shards[0].data) if isinstance(x, jax.Array) else x


def place_replicated(host: np.ndarray, abstract: jax.ShapeDtypeStruct) -> jax.Array:
    """A host array laid on this process's devices of `abstract`'s replicated sharding."""
    return jax.make_array_from_callback(
        abstract.shape, abstract.sharding, lambda index: np.asarray(host)[index]
    )


def _write_atomically(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _check_compatible(meta: dict, abstract_state: Any, problem: dict, step: int) -> None:
    saved = {**meta.get("config", {}), **_prefixed("data", meta.get("data", {}))}
    want = {**problem.get("config", {}), **_prefixed("data", problem.get("data", {}))}
    for key in sorted(set(saved) | set(want)):
        if saved.get(key) != want.get(key):
            what = f"the training data ({key[5:]})" if key.startswith("data:") else f"config.{key}"
            raise CheckpointError(
                f"checkpoint step {step} was written for {what}={saved.get(key)!r}, this run "
                f"has {want.get(key)!r}; use another --workdir or "
                "--config.checkpoint.resume=false"
            )
    want_shapes = leaf_shapes(abstract_state)
    got = meta.get("shapes", {})
    for path in sorted(set(want_shapes) | set(got)):
        if want_shapes.get(path) != got.get(path):
            raise CheckpointError(
                f"checkpoint step {step}: state{path} has shape {got.get(path)}, "
                f"this config needs {want_shapes.get(path)}"
            )


def _prefixed(prefix: str, d: dict) -> dict:
    return {f"{prefix}:{k}": v for k, v in d.items()}
