"""Checkpointing: exact resume after kill -9 / SIGTERM, other device counts, broken checkpoints."""

import glob
import json
import os
import shutil

import numpy as np
import pytest

from jaxdml.checkpoint import Checkpointer
from tests.conftest import run_cli

SMOKE = "configs/sgd_logreg.py:smoke"
STEPS = 120
# The persistent tier alone (the memory tier has tests of its own).
COMMON = [
    f"--config.train.num_steps={STEPS}",
    "--config.checkpoint.every_steps=25",
    "--config.checkpoint.local_every_secs=0",
]


def train(workdir, *overrides, timeout=180):
    return run_cli(
        "experiments.train",
        f"--config={SMOKE}",
        f"--workdir={workdir}",
        *COMMON,
        *overrides,
        timeout=timeout,
    )


def result(workdir) -> dict:
    return json.loads((workdir / "result.json").read_text())


def metric_steps(workdir) -> list[int]:
    return [
        json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
    ]


def committed_steps(workdir) -> list[int]:
    names = os.listdir(workdir / "checkpoints")
    return sorted(int(n) for n in names if n.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 4-device run."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = train(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_resume_after_kill_at_five_points_is_bitwise_identical(tmp_path, reference):
    # Each rerun fires the next kill: a fault fires once per workdir. 50 and 75 kill right
    # after an async save of that step was issued, while it is still being written.
    kills = "sigkill@5,sigkill@37,sigkill@50,sigkill@75,sigkill@99"
    saw_torn_save = False
    for attempt in range(5):
        proc = train(tmp_path, f"--config.faults={kills}")
        assert proc.returncode == -9, f"attempt {attempt}: {proc.returncode} {proc.stderr[-2000:]}"
        leftovers = [n for n in os.listdir(tmp_path / "checkpoints") if "tmp" in n]
        killed_at = [50, 75]
        if attempt in (2, 3) and (
            leftovers or killed_at[attempt - 2] not in committed_steps(tmp_path)
        ):
            saw_torn_save = True
    proc = train(tmp_path, f"--config.faults={kills}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert saw_torn_save, "no kill landed while an async save was in flight"
    assert result(tmp_path)["params_sha256"] == result(reference)["params_sha256"]
    assert metric_steps(tmp_path) == list(range(1, STEPS + 1))
    fired = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["fault"] for e in fired if e["kind"] == "fault_injected"] == kills.split(",")


def test_sigterm_saves_exits_0_and_the_rerun_is_bitwise_identical(tmp_path, reference):
    proc = train(tmp_path, "--config.faults=sigterm@40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preempted at step 41" in proc.stdout
    assert 41 in committed_steps(tmp_path)
    assert not (tmp_path / "result.json").exists()
    proc = train(tmp_path, "--config.faults=sigterm@40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result(tmp_path)["params_sha256"] == result(reference)["params_sha256"]
    assert metric_steps(tmp_path) == list(range(1, STEPS + 1))


@pytest.mark.parametrize("new_devices", [3, 8])
def test_resume_on_another_device_count_matches_and_covers_each_sample_once(
    tmp_path, reference, new_devices
):
    proc = train(tmp_path, "--config.faults=sigterm@60")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = train(tmp_path, f"--config.num_cpu_devices={new_devices}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result(tmp_path)["num_devices"] == new_devices
    got, want = np.load(tmp_path / "params.npz"), np.load(reference / "params.npz")
    for key in want.files:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    per_epoch: dict[int, float] = {}
    for r in rows:
        per_epoch[r["epoch"]] = per_epoch.get(r["epoch"], 0) + r["samples"]
    full_epochs = [e for e in per_epoch if e < max(per_epoch)]
    assert full_epochs and all(per_epoch[e] == 8000 for e in full_epochs), per_epoch


def _break_newest_and_resume(tmp_path, reference, breaker):
    proc = train(tmp_path, "--config.faults=sigterm@80")
    assert proc.returncode == 0, proc.stderr[-3000:]
    newest = max(committed_steps(tmp_path))
    assert newest == 81
    breaker(tmp_path / "checkpoints" / str(newest))
    proc = train(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint step 81 is not usable" in proc.stderr
    aside = os.listdir(tmp_path / "checkpoints_set_aside")
    assert len(aside) == 1 and aside[0].startswith("81-")
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e["kind"] == "resumed"]
    assert resumed[-1]["step"] == 75
    assert result(tmp_path)["params_sha256"] == result(reference)["params_sha256"]


def test_truncated_checkpoint_file_falls_back_to_the_previous_one(tmp_path, reference):
    def truncate_largest_data_file(step_dir):
        # state/d/ holds the array chunks Orbax reads (through state/manifest.ocdbt).
        victim = max(glob.glob(f"{step_dir}/state/d/*"), key=os.path.getsize)
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)

    _break_newest_and_resume(tmp_path, reference, truncate_largest_data_file)


def test_missing_commit_marker_falls_back_to_the_previous_one(tmp_path, reference):
    _break_newest_and_resume(tmp_path, reference, lambda d: os.remove(d / "commit_success.txt"))


def test_altered_checkpoint_value_fails_the_checksum(tmp_path, reference):
    def flip_a_byte_everywhere(step_dir):
        # Rewrite the state with one changed value through Orbax itself, keeping the
        # old meta and seal (its fingerprint): only our checksum can notice.
        import jax
        import orbax.checkpoint as ocp

        ckptr = ocp.StandardCheckpointer()
        state = ckptr.restore(step_dir / "state")
        state["params"]["b"] = np.asarray(state["params"]["b"]) + 1.0
        shutil.rmtree(step_dir / "state")
        ckptr.save(step_dir / "state", jax.tree.map(np.asarray, state))
        ckptr.wait_until_finished()
        (step_dir / "state" / "commit_success.txt").write_text("ok")

    _break_newest_and_resume(tmp_path, reference, flip_a_byte_everywhere)


def test_no_valid_checkpoint_exits_2_unless_auto_or_scratch(tmp_path):
    proc = train(tmp_path, "--config.faults=sigterm@30")
    assert proc.returncode == 0
    for step in committed_steps(tmp_path):
        os.remove(tmp_path / "checkpoints" / str(step) / "commit_success.txt")
    proc = train(tmp_path)
    assert proc.returncode == 2
    assert "none of the checkpoints in" in proc.stderr and "is valid" in proc.stderr
    proc = train(tmp_path, "--config.checkpoint.resume=auto_or_scratch")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result(tmp_path)["steps"] == STEPS


def test_config_mismatch_on_resume_exits_2_naming_the_field(tmp_path):
    proc = train(tmp_path, "--config.faults=sigterm@30")
    assert proc.returncode == 0
    proc = train(tmp_path, "--config.model.l2=0.5")
    assert proc.returncode == 2
    assert "config.model.l2" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_false_starts_over_and_keeps_old_checkpoints(tmp_path, reference):
    proc = train(tmp_path, "--config.faults=sigterm@30")
    assert proc.returncode == 0
    proc = train(tmp_path, "--config.checkpoint.resume=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(os.listdir(tmp_path / "checkpoints_set_aside")) == 2
    assert result(tmp_path)["params_sha256"] == result(reference)["params_sha256"]


class _FlakyManager:
    """Wraps an Orbax manager so that chosen calls raise once."""

    def __init__(self, inner, fail):
        self._inner, self._fail = inner, set(fail)

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name in self._fail:
            self._fail.discard(name)

            def broken(*a, **k):
                raise OSError(f"injected {name} failure")

            return broken
        return attr


def test_failed_saves_are_reported_counted_and_the_next_save_is_attempted(tmp_path):
    import jax.numpy as jnp

    events = []
    ck = Checkpointer(
        str(tmp_path / "checkpoints"),
        str(tmp_path / "aside"),
        on_event=lambda kind, step, **f: events.append((kind, step)),
    )
    ck.manager = _FlakyManager(ck.manager, fail={"save"})
    state = {"w": jnp.arange(4.0)}
    assert ck.save(1, state, {}) is False
    assert ck.failed_saves == 1 and events == [("checkpoint_save_failed", 1)]
    assert ck.save(2, state, {}, wait=True) is True
    # A background failure surfaces at the next save, which still goes ahead.
    ck.manager = _FlakyManager(ck.manager._inner, fail={"check_for_errors"})
    assert ck.save(3, state, {}, wait=True) is True
    assert ck.failed_saves == 2 and events[-1] == ("checkpoint_save_failed", 2)
    assert ck.steps() == [2, 3]
    ck.close()


def test_a_finished_run_leaves_no_memory_tier_in_ram_set_aside_steps_included(tmp_path):
    from jaxdml.config import default_config
    from jaxdml.training.tiers import Tiers

    config = default_config()
    config.checkpoint.local_every_steps = 5
    config.checkpoint.local_dir = str(tmp_path / "ram")
    tiers = Tiers(config, str(tmp_path / "run"), on_event=lambda *a, **k: None)
    aside = os.path.join(tiers.memory.set_aside_dir, "30-123")  # a step set aside
    os.makedirs(aside)
    with open(os.path.join(aside, "state"), "wb") as f:
        f.write(b"\0" * 1024)
    saved = os.path.join(tiers.memory.directory, "40")  # a step the tier holds
    os.makedirs(saved)
    tiers.close()
    assert os.path.isdir(saved) and os.path.isdir(aside)  # kept for a restart
    tiers.remove_memory_tier()  # the run finished
    assert not os.path.exists(tmp_path / "ram")
    # A run that never saves makes no folder, closed or not; its first save makes it.
    unused = Tiers(config, str(tmp_path / "run"), on_event=lambda *a, **k: None)
    assert not os.path.exists(tmp_path / "ram")
    unused.close()
    assert not os.path.exists(tmp_path / "ram")
    never_closed = Tiers(config, str(tmp_path / "run"), on_event=lambda *a, **k: None)
    del never_closed
    assert not os.path.exists(tmp_path / "ram")
    saving = Tiers(config, str(tmp_path / "run"), on_event=lambda *a, **k: None)
    assert saving.memory.save(5, {"w": np.zeros(3, np.float32)}, {}, wait=True) is True
    token = (tmp_path / "run" / ".jaxdml_run").read_text().strip()
    with open(os.path.join(saving.memory.directory, "run")) as f:
        assert f.read() == token
    assert saving.memory.steps() == [5]
    saving.close()


def test_a_save_is_sealed_only_once_the_metrics_rows_of_its_steps_are_written(tmp_path):
    import jax.numpy as jnp

    from jaxdml.checkpoint import SEAL

    class Rows:  # a MetricsWriter whose rows are through step 3 until drained
        through = 3

        def drain(self):
            self.through = 8

    ck = Checkpointer(str(tmp_path / "checkpoints"), str(tmp_path / "aside"))
    ck.rows = Rows()
    assert ck.save(5, {"w": jnp.arange(4.0)}, {}) is True
    ck.approve(5, "0123456789abcdef")
    ck.manager.wait_until_finished()
    ck.poll()  # committed and approved, but rows 4-5 are not on disk yet
    seal = os.path.join(ck._step_dir(5), SEAL)
    assert not os.path.exists(seal)
    ck.wait()  # drains the rows, then seals
    with open(seal) as f:
        assert json.load(f) == {"fingerprint": "0123456789abcdef"}
    ck.close()


def test_the_memory_tier_seals_an_approved_save_when_it_commits(tmp_path):
    """An approved save is sealed by the writer thread right after its commit, with no
    further poll from the loop (a process killed a step later restarts from it); a
    rejected one is left to the loop's next poll, which sets it aside."""
    import threading

    import jax.numpy as jnp

    from jaxdml.checkpoint import SEAL
    from jaxdml.memory_tier import MemoryTier

    tier = MemoryTier(str(tmp_path / "memory"), str(tmp_path / "aside"))
    gate = threading.Event()
    real = tier._write_files
    tier._write_files = lambda *a: gate.wait(10) and real(*a)  # commits when released
    assert tier.save(5, {"w": jnp.arange(4.0)}, {}) is True
    assert tier.save(6, {"w": jnp.arange(4.0)}, {}) is True
    tier.approve(5, "0123456789abcdef")  # before the commit: nothing to seal yet
    tier.reject(6, "replicas disagreed")
    assert not os.path.exists(os.path.join(tier._step_dir(5), SEAL))
    gate.set()
    for f in list(tier._writes):
        f.result(10)
    with open(os.path.join(tier._step_dir(5), SEAL)) as f:
        assert json.load(f) == {"fingerprint": "0123456789abcdef"}
    assert [p.step for p in tier._pending] == [6] and 6 in tier.steps()
    tier.poll()  # the loop's poll: the rejected save goes aside
    assert 6 not in tier.steps() and tier._pending == []
    tier.close()
