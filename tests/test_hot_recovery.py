"""Surviving the loss of a host: 2 processes x 2 devices on loopback under jaxdml.launch.

- a non-coordinator is SIGKILLed: the survivor finds it at its next step's barrier of
  the living (jax live_devices), re-forms the mesh on its own devices with the state it
  holds, and finishes in the same process;
- the coordinator is SIGKILLed: the job cannot go on (the coordination service died
  with it), so the launcher cold-restarts the group from the newest checkpoint;
- a process hangs: the watchdogs turn it into exits, and the launcher restarts.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import sgd_logreg
from jaxdml.training.state import flat_params
from jaxdml.training.trainer import Trainer
from tests.conftest import REPO

STEPS = 100
COMMON = (
    f"--config.train.num_steps={STEPS}",
    "--config.checkpoint.every_steps=20",
    "--config.distributed.heartbeat_timeout_secs=3",
    "--config.supervisor.watchdog_secs=15",
)


def launch(workdir, *overrides, hot=True, max_restarts=0, timeout=240):
    """Runs experiments.train under jaxdml.launch (2 x 2 devices); kills all on timeout."""
    cmd = [
        sys.executable, "-m", "jaxdml.launch", "--num_processes=2", "--devices_per_process=2",
        f"--max_restarts={max_restarts}", "--grace_secs=2", "--failure_grace_secs=1",
        "--backoff_secs=0.1", *(["--hot_recovery"] if hot else []), "--",
        sys.executable, "-m", "experiments.train", "--config=configs/sgd_logreg.py",
        f"--workdir={workdir}", *COMMON, *overrides,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
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
    rc, out = launch(tmp_path, "--config.faults=host_loss@45:1")
    assert rc == 0, out[-4000:]
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
    rc, out = launch(tmp_path, "--config.faults=host_loss@50:0", max_restarts=2)
    assert rc == 0, out[-4000:]
    restarts = [e for e in events(tmp_path) if e["kind"] == "cold_restart"]
    assert len(restarts) == 1 and restarts[0]["process"] == 0
    resumed = [e for e in events(tmp_path) if e["kind"] == "resumed"]
    assert [e["step"] for e in resumed] in ([40], [20])
    assert json.loads((tmp_path / "result.json").read_text())["num_devices"] == 4
    assert_matches(tmp_path, reference)


@pytest.mark.slow
def test_a_hung_process_becomes_an_exit_and_the_run_completes(tmp_path, reference):
    rc, out = launch(
        tmp_path, "--config.faults=hang@30:2", "--config.supervisor.watchdog_secs=5",
        max_restarts=2,
    )  # fmt: skip
    assert rc == 0, out[-4000:]
    assert "exited 4" in out  # EXIT_HANG from a watchdog
    hangs = [e for e in events(tmp_path / "process_1") if e["kind"] == "hang"]
    assert len(hangs) == 1
    assert_matches(tmp_path, reference)
