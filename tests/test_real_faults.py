"""Faults that do not wait for a step boundary, on one process: the memory tier, never
sealing a corrupted checkpoint, Ctrl-C, bad input, data identity, no false alarms."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import seed_logreg, sgd_logreg
from jaxdml.checkpoint import CheckpointError
from jaxdml.data import load_dataset
from jaxdml.faults.detect import Watchdog
from jaxdml.memory_tier import MemoryTier
from jaxdml.training.tiers import local_root
from jaxdml.training.trainer import Trainer
from tests.conftest import REPO, process_alive, run_cli, wait_until

SMOKE = "configs/sgd_logreg.py:smoke"
STEPS = 120
# Persistent checkpoints every 50 steps, the memory tier every 5: a restart should come
# back from the memory tier with at most 5 steps to redo.
COMMON = (
    f"--config.train.num_steps={STEPS}",
    "--config.checkpoint.every_steps=50",
    "--config.checkpoint.local_every_steps=5",
    "--config.checkpoint.local_every_secs=0",
)


def train(workdir, *overrides, timeout=180):
    args = ["experiments.train", f"--config={SMOKE}", f"--workdir={workdir}", *COMMON]
    return run_cli(*args, *overrides, timeout=timeout)


def events(workdir) -> list[dict]:
    path = workdir / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def result(workdir) -> dict:
    return json.loads((workdir / "result.json").read_text())


def metric_steps(workdir) -> list[int]:
    return [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def max_rel_diff(a_dir, b_dir) -> float:
    with np.load(a_dir / "params.npz") as a, np.load(b_dir / "params.npz") as b:
        return max(
            float(np.max(np.abs(a[k] - b[k]) / np.maximum(np.abs(b[k]), 1e-6))) for k in b.files
        )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 4-device run."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = train(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_a_kill_resumes_from_one_of_the_two_newest_memory_tier_saves(tmp_path, reference):
    proc = train(tmp_path, "--config.faults=sigkill@43")
    assert proc.returncode == -9
    proc = train(tmp_path, "--config.faults=sigkill@43")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (resumed,) = [e for e in events(tmp_path) if e["kind"] == "resumed"]
    # The memory tier saves every 5 steps; the save of step 40 is written and sealed in
    # the background, and on a loaded machine may still be in flight when the kill lands
    # 3 steps later: then the one before it (35) is the newest sealed.
    assert resumed["source"] == "memory" and resumed["step"] in (35, 40)
    assert result(tmp_path)["params_sha256"] == result(reference)["params_sha256"]
    assert metric_steps(tmp_path) == list(range(1, STEPS + 1))
    # A finished run leaves nothing in the memory tier.
    assert not os.path.exists(os.path.join(local_root(_config(), str(tmp_path)), "process_0"))


def _config():
    config = sgd_logreg.get_config("smoke")
    config.checkpoint.local_dir = ""
    return config


def test_a_checkpoint_saved_between_a_bit_flip_and_a_kill_is_never_resumed(tmp_path, reference):
    # The flip lands after step 27; the saves of step 30 (both tiers) are issued from the
    # disagreeing replicas and the process dies before their verdict: they are never
    # sealed, so the restart goes back to step 25, saved before the flip.
    plan = "--config.faults=bitflip@27:1,sigkill@30"
    proc = train(tmp_path, plan, "--config.checkpoint.every_steps=10")
    assert proc.returncode == -9
    proc = train(tmp_path, plan, "--config.checkpoint.every_steps=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (resumed,) = [e for e in events(tmp_path) if e["kind"] == "resumed"]
    assert resumed["step"] == 25
    # Whatever of step 30 was written (the memory tier's files may be) was set aside.
    aside = [e for e in events(tmp_path) if e["kind"] == "checkpoint_set_aside"]
    assert {e["step"] for e in aside} <= {30} and all("seal" in e["reason"] for e in aside)
    assert result(tmp_path)["params_sha256"] == result(reference)["params_sha256"]


def test_a_bit_flip_before_a_preemption_is_recovered_before_the_save(tmp_path, reference):
    # Without the check at every save, the preemption checkpoint held the flipped replica.
    plan = "--config.faults=bitflip@27:1,sigterm@28"
    proc = train(tmp_path, plan)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdc,) = [e for e in events(tmp_path) if e["kind"] == "sdc"]
    assert sdc["devices"] == [1] and sdc["restored_step"] == 25
    assert [e["kind"] for e in events(tmp_path)][-1] == "preemption"
    proc = train(tmp_path, plan)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_rel_diff(tmp_path, reference) <= 1e-5


def test_a_bit_flip_before_the_final_save_is_recovered_not_saved(tmp_path, reference):
    proc = train(tmp_path, f"--config.faults=bitflip@{STEPS - 2}:1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdc,) = [e for e in events(tmp_path) if e["kind"] == "sdc"]
    assert sdc["devices"] == [1] and sdc["restored_step"] == STEPS - 5
    assert result(tmp_path)["num_devices"] == 3
    assert max_rel_diff(tmp_path, reference) <= 1e-5


def interrupt(workdir, ready, *overrides) -> dict:
    """Starts a 3000-step run, sends SIGINT once `ready()`, and checks the clean stop:
    exit 130, no traceback, one `interrupted` event at a step that was checkpointed.
    Returns that event."""
    cmd = [sys.executable, "-m", "experiments.train", f"--config={SMOKE}",
           f"--workdir={workdir}", *COMMON, "--config.train.num_steps=3000",
           *overrides]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_until(ready, 120)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert b"Traceback" not in err and b"interrupted at step" in out
    (stop,) = [e for e in events(workdir) if e["kind"] == "interrupted"]
    assert stop["step"] < 3000 and str(stop["step"]) in os.listdir(workdir / "checkpoints")
    return stop


def test_ctrl_c_finishes_the_step_saves_exits_130_and_the_rerun_is_identical(tmp_path, reference):
    metrics = tmp_path / "metrics.jsonl"
    interrupt(
        tmp_path, lambda: metrics.exists() and len(metrics.read_bytes()) > 5000,
        "--config.supervisor.fingerprint_every=7",
    )  # fmt: skip
    proc = train(
        tmp_path, "--config.train.num_steps=3000", "--config.supervisor.fingerprint_every=7"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert metric_steps(tmp_path) == list(range(1, 3001))


@pytest.mark.parametrize("per_call, local_every", [(8, 100), (1, 5)])
def test_a_run_killed_from_outside_at_a_random_moment_resumes_to_the_same_result(
    tmp_path, per_call, local_every
):
    """SIGKILLed by another process at a random wall-clock moment (inside a fused call, a
    memory-tier commit or the seal its writer thread writes, a delivery: wherever it
    lands); the rerun ends with every step logged once and the parameters of an
    uninterrupted one-step-per-call run."""
    import random

    steps = 4000
    args = (f"--config.train.num_steps={steps}", "--config.checkpoint.every_steps=500",
            f"--config.checkpoint.local_every_steps={local_every}")  # fmt: skip
    reference = tmp_path / "reference"
    assert train(reference, *args).returncode == 0
    run, fused = tmp_path / "run", f"--config.train.steps_per_call={per_call}"
    cmd = [sys.executable, "-m", "experiments.train", f"--config={SMOKE}",
           f"--workdir={run}", *COMMON, *args, fused]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        metrics = run / "metrics.jsonl"
        assert wait_until(lambda: metrics.exists() and metrics.stat().st_size > 0, 120)
        # Within the first half second: the training lasts ~1.4 s here at 8 steps per
        # call (one step per call: longer), so the kill lands mid-run on a faster machine too.
        time.sleep(random.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -9
    assert max(metric_steps(run)) < steps  # killed mid-run
    rerun = train(run, *args, fused)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert metric_steps(run) == list(range(1, steps + 1))
    assert result(run)["params_sha256"] == result(reference)["params_sha256"]


def test_ctrl_c_during_start_up_is_kept_for_the_loop_not_lost(tmp_path):
    """A SIGINT while the run starts (restore, compilation: JAX's callbacks run then, and
    a KeyboardInterrupt raised in one is dropped by Python) stops the run after its first
    step, saved, exit 130."""

    def starting():  # the run's records exist: the trainer is being built, no step ran
        records = (tmp_path / "goodput.jsonl").exists()
        return records and (not (tmp_path / "metrics.jsonl").exists() or not metric_steps(tmp_path))

    interrupt(tmp_path, starting)


def test_a_rerun_after_the_workdir_was_deleted_starts_over(tmp_path):
    proc = train(tmp_path, "--config.faults=sigkill@43")
    assert proc.returncode == -9
    import shutil

    shutil.rmtree(tmp_path)
    proc = train(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [e for e in events(tmp_path) if e["kind"] == "resumed"] == []
    assert "belongs to an earlier run" in proc.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config=configs/no_such_config.py"], "no_such_config.py"),
        (["--config.train.no_such_field=3"], "no_such_field"),
        (["--config.faults=device_loss@5:9"], "device 9 does not exist"),
        (["--config.faults=host_loss@5:1"], "process 1 does not exist"),
    ],
)
def test_bad_input_is_exit_2_with_one_line(tmp_path, args, message):
    base = ["experiments.train", f"--config={SMOKE}", f"--workdir={tmp_path}"]
    if args[0].startswith("--config="):
        base = base[:1] + base[2:]
    proc = run_cli(*base, *args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_an_unparseable_config_file_is_exit_2(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("def get_config(:\n")
    proc = run_cli("experiments.train", f"--config={bad}", f"--workdir={tmp_path}/w", timeout=60)
    assert proc.returncode == 2 and "SyntaxError" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("content", ["", "a,b,label\n1,2,0\n3,4\n"], ids=["empty", "ragged"])
def test_an_empty_or_ragged_data_file_is_exit_2(tmp_path, content):
    path = tmp_path / "data.csv"
    path.write_text(content)
    data = ("--config.data.source=file", f"--config.data.path={path}")
    proc = run_cli("experiments.train", f"--config={SMOKE}", f"--workdir={tmp_path}/w", *data)
    assert proc.returncode == 2 and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resuming_with_other_data_is_refused_naming_the_data(tmp_path):
    config = seed_logreg.get_config()
    config.train.num_steps = 20
    config.checkpoint.every_steps = 10
    data = load_dataset(config.data)
    Trainer(config, str(tmp_path), devices=jax.devices()[:4], dataset=data).fit()
    other = dataclasses.replace(data, x_train=data.x_train + 1.0)
    with pytest.raises(CheckpointError, match="training data"):
        Trainer(config, str(tmp_path), devices=jax.devices()[:4], dataset=other)


def test_a_straggler_is_a_step_5x_the_median_and_100_ms_slower():
    from jaxdml.accounting import slow_steps

    steady = [0.0005] * 200
    assert slow_steps(steady + [0.05, 0.09]) == 0  # a descheduled process: tens of ms
    assert slow_steps(steady + [0.2, 0.5]) == 2  # a device that stalls
    assert slow_steps([1.0] * 50 + [4.0]) == 0  # slow steps: under 5x their median
    assert slow_steps([1.0] * 50 + [6.0]) == 1
    assert slow_steps([]) == 0


def test_a_fault_free_run_reports_no_stragglers(tmp_path):
    config = seed_logreg.get_config()
    config.checkpoint.every_steps = 100
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:4])
    result = trainer.fit()
    assert result["steps"] == 300 and [e for e in events(tmp_path) if e["kind"] == "hang"] == []
    # The compiling step (seconds, not milliseconds) is no straggler. On the suite's shared
    # 2 cores one step in 300 can still lose over 100 ms to the other worker's processes
    # (seen once in a fresh-clone run): one is tolerated; the rule itself is tested above.
    assert result["slow_steps"] <= 1
    assert 1 in trainer.accounting._compile_steps


def test_the_watchdog_has_no_false_alarm_while_other_processes_load_the_cores(tmp_path):
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)
    ]  # fmt: skip
    try:
        load = ("--config.train.num_steps=1500", "--config.supervisor.watchdog_secs=10")
        proc = train(tmp_path, *load, "--config.supervisor.fingerprint_every=50", timeout=400)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any(process_alive(h.pid) for h in hogs)
    assert [e for e in events(tmp_path) if e["kind"] == "hang"] == []


# ----------------------------------------------------------------- units


def test_the_watchdog_deadline_is_a_multiple_of_the_median_step_with_a_floor():
    now, fired = [0.0], []
    dog = Watchdog(5.0, fired.append, factor=50.0, clock=lambda: now[0], poll=0.01)
    assert dog.deadline() == 5.0
    for _ in range(10):
        now[0] += 0.5
        dog.pet()
    assert dog.deadline() == 25.0  # 50 x 0.5 s
    with dog.allow(100.0):
        assert dog.deadline() == 100.0
    assert dog.deadline() == 25.0
    with dog:
        now[0] += 24.0
        time.sleep(0.1)
        assert fired == []
        now[0] += 2.0
        assert wait_until(lambda: fired, 5)


def test_the_memory_tier_seals_only_approved_saves_and_restores_them(tmp_path, devices):
    from jaxdml.mesh import make_mesh, replicated

    mesh = make_mesh(devices[:2])
    state = jax.device_put({"w": jnp.arange(6.0), "s": jnp.int32(3)}, replicated(mesh))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)  # fmt: skip
    tier = MemoryTier(str(tmp_path / "m"), str(tmp_path / "aside"), max_to_keep=2)
    from jaxdml.faults.detect import fingerprint_hex

    problem = {"config": {"a": 1}, "data": {"sha256": "x"}}
    assert tier.save(1, state, dict(problem), wait=True)
    assert tier.valid_candidates() == ([], 0)  # committed but never approved: not sealed
    assert tier.save(2, state, dict(problem))
    tier.approve(2, fingerprint_hex(state))
    tier.wait()
    assert tier.save(3, state, dict(problem))
    tier.reject(3, "replicas disagreed")
    tier.wait()
    assert tier.valid_candidates() == ([2], 0)
    restored, meta = tier.restore_step(2, abstract, problem)
    assert meta["step"] == 2 and np.array_equal(np.asarray(restored["w"]), np.arange(6.0))
    assert sorted(n.split("-")[0] for n in os.listdir(tmp_path / "aside")) == ["1", "3"]
    with pytest.raises(CheckpointError, match="config.a"):
        tier.restore_step(2, abstract, {"config": {"a": 2}, "data": {"sha256": "x"}})
    tier.close()


def test_a_memory_tier_step_pruned_before_its_seal_is_dropped_not_a_crash(tmp_path, devices):
    """The writer thread prunes old steps (max_to_keep) as newer ones commit; a step seen
    committed can be gone by the time its seal is written (random chaos, single soak
    seed 101: FileNotFoundError on .../750/jaxdml_seal.json.tmp ended the process)."""
    from jaxdml.faults.detect import fingerprint_hex
    from jaxdml.mesh import make_mesh, replicated

    state = jax.device_put({"w": jnp.arange(4.0)}, replicated(make_mesh(devices[:2])))
    tier = MemoryTier(str(tmp_path / "m"), str(tmp_path / "aside"), max_to_keep=2)
    problem = {"config": {"a": 1}, "data": {"sha256": "x"}}
    assert tier.save(5, state, dict(problem), wait=True)
    committed = tier._committed
    tier._committed = lambda step: True  # seen committed ...
    shutil.rmtree(tmp_path / "m" / "5")  # ... then pruned by the writer
    tier.approve(5, fingerprint_hex(state))  # seals: must not raise
    tier._committed = committed
    assert tier.valid_candidates() == ([], 0)
    assert tier.save(10, state, dict(problem))
    tier.approve(10, fingerprint_hex(state))
    tier.wait()
    assert tier.valid_candidates() == ([10], 0)
    tier.close()


def test_the_memory_tier_keeps_its_newest_sealed_step_while_newer_ones_wait(tmp_path):
    """Steps still waiting for their replicas' verdict do not push the newest sealed step
    out: a restart always finds a valid step in the memory tier (no fall back to the
    persistent tier and its longer redo)."""
    from jaxdml.checkpoint import fingerprint_hex

    tier = MemoryTier(str(tmp_path / "m"), max_to_keep=2)
    state = {"w": jnp.arange(3.0)}
    tier.save(5, state, {})
    tier.approve(5, fingerprint_hex(state))
    tier.wait()
    for step in (10, 15, 20):  # no verdict yet
        tier.save(step, state, {})
        tier.wait()
    assert tier.steps() == [5, 15, 20]
    tier.approve(20, fingerprint_hex(state))
    tier.save(25, state, {})
    tier.wait()
    assert tier.steps() == [20, 25]
    assert tier.valid_candidates()[0] == [20]  # (25 never got a verdict)
    tier.close()
