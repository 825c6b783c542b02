"""The checkpoint tiers of a run: what is saved where, verified, and where a run resumes.

  persistent  workdir/checkpoints: shared by the processes, survives the machine;
              `checkpoint.every_steps` / `every_secs`.
  memory      one local folder per process (/dev/shm by default): survives the process,
              not the machine; `checkpoint.local_every_secs` / `local_every_steps`; a
              restart reads it first, so it redoes only the steps since the last one.

Every save is verified: the replicas' fingerprints of the saved state are dispatched with
the save and read at the next hook call (a deterministic point, the same step on every
process); a save whose replicas disagree is never sealed and raises SilentCorruption
instead (jaxdml/checkpoint.py has the seal). Final and preemption saves verify first.

Resume precedence (`restore`): the newest step any tier holds valid, the memory tier
first at equal steps. Across processes the step is the newest that some process can
restore; a process without it receives it from one that has it, over the mesh.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdml import distributed
from jaxdml import mesh as mesh_lib
from jaxdml.checkpoint import Checkpointer, NoValidCheckpoint, Tier
from jaxdml.faults import detect
from jaxdml.faults.errors import SilentCorruption
from jaxdml.memory_tier import RUN_MARKER, MemoryTier
from jaxdml.training.hooks import Hook, Periodic, StepInfo, until_multiple

PERSISTENT, MEMORY = "persistent", "memory"


def local_root(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The memory tier's folder for this run (every process keeps its own below it).

    /dev/shm (RAM; $JAXDML_SHM_DIR names another) when it is there and writable, else
    workdir/local. The folder is named after the run's workdir, so a rerun of the same
    command finds it.
    """
    if config.checkpoint.local_dir:
        return os.path.abspath(config.checkpoint.local_dir)
    key = hashlib.sha256(os.path.abspath(workdir).encode()).hexdigest()[:16]
    shm = os.environ.get("JAXDML_SHM_DIR") or "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return os.path.join(shm, f"jaxdml-{_user()}", key)
    return os.path.join(os.path.abspath(workdir), "local")


def _run_token(workdir: str) -> str:
    """The run's identity: a random token in workdir/.jaxdml_run, made by the first
    process that starts there. A workdir deleted and made again gets a new one."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, ".jaxdml_run")
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "w") as f:
            f.write(uuid.uuid4().hex)
    for _ in range(100):  # another process may be writing it this instant
        with open(path) as f:
            token = f.read().strip()
        if token:
            return token
        time.sleep(0.01)
    raise RuntimeError(f"{path} stays empty")


def _claim(folder: str, token: str) -> None:
    """Makes `folder` fit to be this run's memory tier: a folder left by another run (the
    same workdir path, deleted and made again) is removed, never resumed from. The tier
    makes the folder, with the run's token in it, at its first save."""
    marker = os.path.join(folder, RUN_MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            if f.read().strip() == token:
                return
    if os.path.isdir(folder):
        logging.warning("memory tier %s belongs to an earlier run: emptied", folder)
        shutil.rmtree(folder, ignore_errors=True)


def _holds_only_its_marker(folder: str) -> bool:
    """Whether a memory tier's folder holds nothing but its run marker (no save committed)."""
    try:
        return os.listdir(folder) == [RUN_MARKER]
    except OSError:  # never made (no save) or already removed (a finished run)
        return False


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


class Tiers:
    """The run's checkpoint tiers, their saves, their verification and the restore.

    Args:
      config: the run's config (reads config.checkpoint).
      workdir: the run folder.
      on_event: callback(kind, step, **fields) for events.jsonl.
      rows: the run's MetricsWriter: a save is sealed once its steps' rows are `through` it.
    """

    def __init__(
        self, config: ml_collections.ConfigDict, workdir: str, on_event: Callable, rows: Any = None
    ):
        ck = config.checkpoint
        self.config, self.on_event = config, on_event
        self.persistent = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            os.path.join(workdir, "checkpoints_set_aside"),
            max_to_keep=ck.max_to_keep,
            keep_period=ck.keep_period,
            async_save=ck.async_save,
            on_event=on_event,
        )
        self.memory: MemoryTier | None = None
        self.local_dir = local_root(config, workdir)
        if ck.local_every_secs or ck.local_every_steps:
            me = distributed.process_index()
            mine, token = os.path.join(self.local_dir, f"process_{me}"), _run_token(workdir)
            _claim(mine, token)
            self.memory = MemoryTier(
                mine,
                os.path.join(self.local_dir, "set_aside", f"process_{me}"),
                max_to_keep=ck.local_max_to_keep,
                on_event=on_event,
                donated=config.train.donate,
                run=token,
            )
        for tier in self.all:
            tier.rows = rows  # seals wait for the metrics rows of their steps
        self.verify = _Verify(self)
        self._fingerprints: tuple[tuple, Any] | None = None  # ((step, mesh), array) of a save

    @property
    def all(self) -> list[Tier]:
        return [t for t in (self.memory, self.persistent) if t is not None]

    # ------------------------------------------------------------------ saving

    def hooks(self, save: Callable[[str, int, Any], None], agree) -> list[Hook]:
        """Periodic saves of both tiers and the verification hook.

        Args:
          save: save(tier, step, state), the trainer's (it adds the meta).
          agree: kind -> `Periodic.agree` (multi-process clock decisions).
        """
        ck = self.config.checkpoint
        schedules = [(PERSISTENT, ck.every_steps, ck.every_secs)]
        if self.memory is not None:
            schedules.append((MEMORY, ck.local_every_steps, ck.local_every_secs))
        hooks: list[Hook] = [
            Periodic(
                functools.partial(save, tier),
                steps,
                secs,
                agree=agree(f"save_{tier}"),
                expedite_rows=True,  # its seal waits for the rows of its steps
            )  # fmt: skip
            for tier, steps, secs in schedules
            if steps or secs
        ]
        return [*hooks, self.verify]

    def save(self, tier: str, step: int, state: Any, meta: dict, mesh: Mesh, wait=False) -> None:
        """Saves `state` in one tier; the seal waits for the replicas' verdict."""
        target = self.persistent if tier == PERSISTENT else self.memory
        if target is None:
            return
        fps = self._fingerprints_of(step, state, mesh)
        if target.save(step, state, meta, wait=False):
            self.verify.expect(step, fps, mesh, target)
        if wait:
            self.verify.resolve()
            target.wait()

    def _fingerprints_of(self, step: int, state: Any, mesh: Mesh) -> Any:
        """The replicas' fingerprints of the whole state, dispatched once per saved step."""
        key = (step, tuple(mesh_lib.device_ids(mesh)))
        if self._fingerprints is None or self._fingerprints[0] != key:
            self._fingerprints = (key, detect.replica_fingerprints(state, mesh))
        return self._fingerprints[1]

    def check_now(self, step: int, state: Any, mesh: Mesh) -> str:
        """Verifies the replicas at once (before a final or preemption save).

        Returns:
          The agreed fingerprint.

        Raises:
          SilentCorruption: they disagree.
        """
        fps = self._fingerprints_of(step, state, mesh)
        ids = mesh_lib.device_ids(mesh)
        good, odd = detect.majority(fps, ids)
        if odd:
            raise SilentCorruption(step, odd, good)
        return detect.hex_of(detect.rows_of(fps)[ids.index(good[0])])

    def wait(self, strict: bool = True) -> None:
        """Pending saves committed, verified and sealed (or set aside). Not `strict`: a
        disagreement is only recorded by rejecting the save (a recovery is under way)."""
        self.verify.resolve(strict)
        for tier in self.all:
            tier.wait()

    def close(self) -> None:
        try:
            self.verify.resolve(strict=False)
        finally:
            for tier in self.all:
                tier.close()
            if self.memory is not None and _holds_only_its_marker(self.memory.directory):
                self._remove_memory_folders()  # nothing was saved: leave no folder in RAM

    def restrict_to(self, process_ids: list[int]) -> None:
        """After a host loss: the persistent tier saves among the survivors."""
        self.persistent.restrict_to(process_ids)

    def forget_pending(self) -> None:
        """The mesh lost devices: verdicts computed on it can no longer be read (their
        collective had the dead devices in it). Those saves stay unsealed: never used."""
        self.verify.forget()
        self._fingerprints = None

    def move_all_aside(self, reason: str) -> None:
        for tier in self.all:
            tier.move_all_aside(reason)

    def remove_memory_tier(self) -> None:
        """At the end of a finished run: the memory tier is only for restarts. Its
        set-aside steps go too (their events said why): left in RAM they would hold a
        state's size of memory per set-aside step for good."""
        if self.memory is not None:
            self._remove_memory_folders()

    def _remove_memory_folders(self) -> None:
        shutil.rmtree(self.memory.directory, ignore_errors=True)
        shutil.rmtree(self.memory.set_aside_dir, ignore_errors=True)
        # The shared folders, once no process of the run uses them.
        for folder in (os.path.dirname(self.memory.set_aside_dir), self.local_dir):
            with contextlib.suppress(OSError):
                os.rmdir(folder)

    # ------------------------------------------------------------------ restoring

    def restore(self, abstract: Any, problem: dict, mesh: Mesh) -> tuple[Any, int, str] | None:
        """The newest valid state across tiers (and processes), placed on `mesh`.

        Returns:
          (state, step, source) with source 'memory', 'persistent' or 'broadcast', or None
          when no tier holds a checkpoint.

        Raises:
          NoValidCheckpoint: checkpoints exist but none is valid.
          CheckpointError: one was written for another problem (names the field).
        """
        self.wait(strict=False)
        processes = sorted({int(d.process_index) for d in mesh.devices.flat})
        failed = False  # a sealed step failed its checks (and was set aside)
        for attempt in range(100):
            offers, broken = self._offers()
            failed = failed or broken > 0
            best = max(offers, default=-1)
            if len(processes) > 1:
                best = max(_exchange(f"best{attempt}", best, processes).values())
            if best < 0:
                break
            mine = self._restore_at(best, offers.get(best, []), abstract, problem)
            failed = failed or (mine is None and best in offers)
            if len(processes) > 1:
                shared = _share(mine, best, abstract, mesh, processes, attempt)
                if shared is not None:
                    return shared
            elif mine is not None:
                return mine
        if failed:
            raise NoValidCheckpoint(
                f"none of the checkpoints in {self.persistent.directory} (or the memory tier "
                f"{self.local_dir}) is valid; they were set aside; use "
                "--config.checkpoint.resume=auto_or_scratch to start over"
            )
        return None

    def _offers(self) -> tuple[dict[int, list[Tier]], int]:
        """({step: tiers holding it sealed, memory first}, broken sealed steps seen)."""
        offers: dict[int, list[Tier]] = {}
        broken = 0
        for tier in self.all:
            steps, bad = tier.valid_candidates()
            broken += bad
            for step in steps:
                offers.setdefault(step, []).append(tier)
        return offers, broken

    def _restore_at(self, step: int, tiers: list[Tier], abstract, problem):
        """This process's restore of `step` from the first tier that has it valid."""
        for tier in tiers:
            t0 = time.perf_counter()
            restored = tier.restore_step(step, abstract, problem)
            if restored is not None:
                source = MEMORY if tier is self.memory else PERSISTENT
                logging.info(
                    "restored step %d from the %s tier in %.2f s",
                    step,
                    source,
                    time.perf_counter() - t0,
                )
                return restored[0], step, source
        return None


class _Verify(Hook):
    """Replica verdicts, read at the next hook call after they were dispatched.

    A deterministic point: every process reads the verdict at the same step (a clock or
    `is_ready()` would differ between processes, and so would their decisions).
    """

    def __init__(self, tiers: Tiers):
        self.tiers = tiers
        self._pending: list[tuple[int, Any, list[int], Tier | None]] = []
        self.every = 0  # replica check every k steps without a save (supervisor's setting)

    def forget(self) -> None:
        self._pending = []

    def expect(self, step: int, fps: Any, mesh: Mesh, tier: Tier | None) -> None:
        self._pending.append((step, fps, mesh_lib.device_ids(mesh), tier))

    def max_fused(self, step: int) -> int:
        return until_multiple(step, self.every)

    def after_step(self, info: StepInfo) -> bool:
        # Verdicts on states before this one: the fingerprints of a save made just now
        # would make the loop wait for this very step (the hot path must not).
        self.resolve(before_step=info.step)
        if self.every and info.step % self.every == 0:
            mesh = jax.tree.leaves(info.state.params)[0].sharding.mesh
            fps = self.tiers._fingerprints_of(info.step, info.state, mesh)
            self.expect(info.step, fps, mesh, None)
        for tier in self.tiers.all:
            tier.poll()
        return False

    def resolve(self, strict: bool = True, before_step: int | None = None) -> None:
        """Reads the pending verdicts (of states before `before_step`, default all); seals
        the agreeing saves.

        Raises:
          SilentCorruption: (when `strict`) the replicas of a checked or saved state
            disagree; the save is rejected (never sealed, set aside) either way.
        """
        if before_step is None:
            pending, self._pending = self._pending, []
        else:
            pending = [p for p in self._pending if p[0] < before_step]
            self._pending = [p for p in self._pending if p[0] >= before_step]
        corrupt = None
        for step, fps, ids, tier in pending:
            good, odd = detect.majority(fps, ids)
            if odd:
                if tier is not None:
                    tier.reject(step, f"replicas disagreed when it was saved (odd {odd})")
                corrupt = corrupt or SilentCorruption(step, odd, good)
            elif tier is not None:
                tier.approve(step, detect.hex_of(detect.rows_of(fps)[ids.index(good[0])]))
        if corrupt is not None and strict:
            raise corrupt


def _exchange(name: str, value: int, processes: list[int]) -> dict:
    return distributed.exchange(f"resume/{name}", value, 300.0, processes)


def _share(mine, step: int, abstract, mesh: Mesh, processes: list[int], attempt: int):
    """Multi-process: every process has `step` (from its own tiers) or gets it from the
    lowest process that does; None when nobody could restore it."""
    holders = _exchange(f"ok{attempt}", mine is not None, processes)
    sources = [pid for pid, ok in sorted(holders.items()) if ok]
    if not sources:
        return None
    if len(sources) == len(processes):
        return mine
    state = broadcast(mine[0] if mine is not None else None, abstract, mesh, sources[0])
    source = mine[2] if mine is not None else "broadcast"
    return state, step, source


def broadcast(state: Any | None, abstract: Any, mesh: Mesh, source_process: int) -> Any:
    """The state of `source_process` replicated over `mesh` (bit for bit: a gather and a
    select, no arithmetic). Processes without it pass None.

    Each device contributes its process's copy (zeros where there is none) as one row of
    a [D, ...] array sharded over the mesh; row `source` is selected and replicated.
    """
    ids = [d.process_index for d in mesh.devices.flat]
    row = ids.index(source_process)
    sharded = NamedSharding(mesh, P(mesh.axis_names[0]))

    def rows(a: jax.ShapeDtypeStruct, x: Any) -> jax.Array:
        if x is None:
            data = np.zeros(a.shape, a.dtype)
        else:
            data = np.asarray(x.addressable_shards[0].data if isinstance(x, jax.Array) else x)
        return jax.make_array_from_callback((len(ids), *a.shape), sharded, lambda _: data[None])

    leaves, treedef = jax.tree.flatten(abstract)
    mine = treedef.flatten_up_to(state) if state is not None else [None] * len(leaves)
    stacked = treedef.unflatten([rows(a, x) for a, x in zip(leaves, mine, strict=True)])
    select = jax.jit(
        lambda t: jax.tree.map(lambda x: x[row], t), out_shardings=mesh_lib.replicated(mesh)
    )
    return select(stacked)
