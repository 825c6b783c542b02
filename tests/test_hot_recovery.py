"""Surviving the loss of a host: 2 processes x 2 devices on loopback under jaxdml.launch.

- a non-coordinator is SIGKILLed, at a step boundary or from outside at any moment (in a
  collective, a save): the survivor's collective fails after the collective timeout,
  live_devices names the dead peer, the survivor re-forms the mesh on its own devices
  with the state it holds and goes on in the same process; the launcher later restarts
  the group at full size (grow back), from the memory tier;
- a peer is SIGSTOPped: its heartbeats stop, the survivor goes on the same way;
- the coordinator is SIGKILLed: the job cannot go on (the coordination service died
  with it), so the launcher restarts the group from the newest checkpoint;
- a process hangs: the watchdogs turn it into exits, and the launcher restarts.
"""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import sgd_logreg
from jaxdml import goodput, standby
from jaxdml.metrics import read_jsonl
from jaxdml.training.state import flat_params
from jaxdml.training.trainer import Trainer
from tests.conftest import REPO, log_excerpt, wait_until

STEPS = 100
COMMON = (
    f"--config.train.num_steps={STEPS}",
    "--config.checkpoint.every_steps=20",
    "--config.checkpoint.local_every_steps=5",
    "--config.distributed.heartbeat_timeout_secs=3",
    "--config.distributed.collective_timeout_secs=5",
    "--config.supervisor.watchdog_secs=15",
)


def launch(workdir, *overrides, hot=True, max_restarts=0, timeout=240, grow_back=-1.0, during=None):
    """Runs experiments.train under jaxdml.launch (2 x 2 devices); kills all on timeout.
    `during(launcher_pid)` runs while the job does (a fault sent from outside)."""
    cmd = [
        sys.executable, "-m", "jaxdml.launch", "--num_processes=2", "--devices_per_process=2",
        f"--max_restarts={max_restarts}", "--grace_secs=10", "--failure_grace_secs=1",
        "--backoff_secs=0.1", f"--grow_back_secs={grow_back}",
        *(["--hot_recovery"] if hot else []), "--",
        sys.executable, "-m", "experiments.train", "--config=configs/sgd_logreg.py",
        f"--workdir={workdir}", *COMMON, *overrides,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        if during is not None:
            during(proc.pid)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    pids = [int(p) for p in _pids_of(out)]
    assert not [p for p in pids if _alive(p)], "a child outlived the launcher"
    return proc.returncode, out


def _pids_of(out: str) -> list[str]:
    import re

    return re.findall(r"pids \[([\d, ]+)\]", out) and [
        p for group in re.findall(r"pids \[([\d, ]+)\]", out) for p in group.split(", ")
    ]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def events(workdir) -> list[dict]:
    return [json.loads(x) for x in (workdir / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The fault-free run, in-process on the same 4 devices."""
    config = sgd_logreg.get_config()
    config.train.num_steps = STEPS
    trainer = Trainer(config, str(tmp_path_factory.mktemp("ref")), devices=jax.devices()[:4])
    trainer.fit()
    return flat_params(trainer.state.params)


def assert_matches(workdir, reference):
    with np.load(workdir / "params.npz") as got:
        for name, want in reference.items():
            np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.slow
def test_killed_host_is_survived_in_process(tmp_path, reference):
    rc, out = launch(tmp_path, "--config.faults=host_loss@45:1", grow_back=-1)
    assert rc == 0, log_excerpt(out)
    assert "process 1 exited -9 (lost)" in out and "cold_restart" not in out
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == STEPS and result["num_devices"] == 2
    assert result["lost_steps"] <= 1
    assert_matches(tmp_path, reference)
    (loss,) = [e for e in events(tmp_path) if e["kind"] == "host_loss"]
    assert loss["step"] == 45 and loss["devices"] == [2048, 2049]
    assert 1.0 < loss["detect_seconds"] < 15 and 0 < loss["recover_seconds"] < 15
    # Every sample exactly once per epoch, across the change of mesh.
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    per_epoch: dict[int, float] = {}
    for r in rows:
        per_epoch[r["epoch"]] = per_epoch.get(r["epoch"], 0) + r["samples"]
    assert [per_epoch[e] for e in sorted(per_epoch)[:-1]] == [8000.0] * 3
    # The survivor kept checkpointing (Orbax among the survivors only).
    names = os.listdir(tmp_path / "checkpoints")
    assert {"60", "80", "100"} <= set(names)


@pytest.mark.slow
def test_killed_coordinator_cold_restarts_from_the_newest_checkpoint(tmp_path, reference):
    """The whole group restarts from the memory tier; the job's goodput record counts
    the first life's steps past the restart point as redone, as its metrics show them."""
    first_life: list[dict] = []

    def keep_first_life_rows(launcher_pid):
        assert wait_until(lambda: len(_children(launcher_pid)) == 2, 60, interval=0.01)
        first = _children(launcher_pid)[0]  # process 0, which writes metrics.jsonl
        # It kills itself; its rows are final then, and the restarted group takes seconds
        # (imports, restore) before it truncates them to the restart point.
        assert wait_until(lambda: not _alive(first), 120, interval=0.01)
        first_life.extend(read_jsonl(str(tmp_path / "metrics.jsonl")))

    rc, out = launch(
        tmp_path, "--config.faults=host_loss@50:0", max_restarts=2, during=keep_first_life_rows
    )
    assert rc == 0, log_excerpt(out)
    restarts = [e for e in events(tmp_path) if e["kind"] == "cold_restart"]
    assert len(restarts) == 1 and restarts[0]["process"] == 0
    (resumed,) = [e for e in events(tmp_path) if e["kind"] == "resumed"]
    assert resumed["source"] == "memory" and 45 <= resumed["step"] <= 50
    assert json.loads((tmp_path / "result.json").read_text())["num_devices"] == 4
    assert_matches(tmp_path, reference)

    summary = goodput.summarize(goodput.read(str(tmp_path)))
    lost = [r for r in first_life if r["step"] > resumed["step"]]
    assert summary["lives"] == 2 and summary["steps_kept"] == STEPS
    assert summary["steps_redone"] == len(lost)
    device_seconds = sum(max(0.0, r["seconds"] - r["stall_seconds"]) for r in lost)
    assert summary["seconds"]["redone"] == pytest.approx(device_seconds, abs=1e-4)
    assert summary["seconds"]["down"] > 0
    assert sum(summary["seconds"].values()) == pytest.approx(summary["job_wall_seconds"], rel=0.01)
    # Process 1 was stopped by the launcher and restarted too: its own record has two
    # lives, and the same steps kept.
    processes = goodput.per_process(str(tmp_path))
    assert [p["process"] for p in processes] == [0, 1]
    assert processes[1]["lives"] == 2 and processes[1]["steps_kept"] == STEPS


@pytest.mark.slow
def test_a_hung_process_becomes_an_exit_and_the_run_completes(tmp_path, reference):
    rc, out = launch(
        tmp_path, "--config.faults=hang@30:2", "--config.supervisor.watchdog_secs=5",
        max_restarts=2,
    )  # fmt: skip
    assert rc == 0, log_excerpt(out)
    assert "exited 4" in out  # EXIT_HANG from a watchdog
    # Process 1 hung; process 0 waits in the step's collective for it, so its watchdog
    # sees no progress either. Both fire within milliseconds of each other, and the
    # launcher stops the group at the first exit: one or both record the hang.
    (fault,) = [e for e in events(tmp_path / "process_1") if e["kind"] == "fault_injected"]
    both = events(tmp_path) + events(tmp_path / "process_1")
    hangs = [e for e in both if e["kind"] == "hang"]
    assert 1 <= len(hangs) <= 2 and {h["step"] for h in hangs} == {fault["step"]}
    assert_matches(tmp_path, reference)


def _children(launcher_pid: int) -> list[int]:
    """The launcher's running children (the training processes, not the spares waiting
    for the next start), by process id order."""
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        return [int(p) for p in f.read().split() if not standby.is_waiting(int(p))]


def _when_training(workdir, launcher_pid, min_rows=10, timeout=120.0) -> list[int]:
    """Waits until process 0 wrote `min_rows` metrics rows; returns the children."""
    metrics = workdir / "metrics.jsonl"

    def ready():
        if not metrics.exists():
            return False
        return (
            len(metrics.read_text().splitlines()) >= min_rows and len(_children(launcher_pid)) == 2
        )

    assert wait_until(ready, timeout)
    return _children(launcher_pid)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_a_peer_killed_from_outside_at_a_random_moment_is_survived_then_grows_back(
    tmp_path, reference, seed
):
    def kill_process_1(launcher_pid):
        children = _when_training(tmp_path, launcher_pid)
        time.sleep(random.Random(seed).uniform(0.0, 1.5))
        os.kill(children[1], signal.SIGKILL)

    rc, out = launch(tmp_path, "--config.train.num_steps=400", grow_back=2.0, during=kill_process_1)
    assert rc == 0, log_excerpt(out)
    kinds = [e["kind"] for e in events(tmp_path)]
    assert "host_loss" in kinds and "grow_back" in kinds and "cold_restart" not in kinds
    (loss,) = [e for e in events(tmp_path) if e["kind"] == "host_loss"]
    assert loss["detect_seconds"] + loss["recover_seconds"] < 3 + 5 + 10  # heartbeat, timeout
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == 400 and result["num_devices"] == 4  # back at full size
    rows = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 401))


@pytest.mark.slow
def test_a_stopped_peer_is_declared_dead_and_the_survivor_goes_on(tmp_path, reference):
    def stop_process_1(launcher_pid):
        children = _when_training(tmp_path, launcher_pid)
        os.kill(children[1], signal.SIGSTOP)
        time.sleep(3 + 5)  # the heartbeat timeout and more
        with contextlib.suppress(ProcessLookupError):
            os.kill(children[1], signal.SIGCONT)

    rc, out = launch(tmp_path, "--config.train.num_steps=400", during=stop_process_1)
    assert rc == 0, log_excerpt(out)
    assert "host_loss" in [e["kind"] for e in events(tmp_path)]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == 400 and result["num_devices"] == 2


@pytest.mark.slow
def test_without_the_supervisor_a_multi_process_run_exits_0(tmp_path, reference):
    rc, out = launch(tmp_path, "--config.supervisor.enabled=false", hot=False)
    assert rc == 0, log_excerpt(out)
    assert "exited 0 (done)" in out and "exited 134" not in out
    assert_matches(tmp_path, reference)
