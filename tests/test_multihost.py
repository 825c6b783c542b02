"""Multi-process training on loopback (jax.distributed + gloo) equals single-process training.

N processes x 2 simulated CPU devices are started by jaxdml.launch; the reference is an
in-process run on the same total device count. Also: how the distributed settings are
resolved from config and environment.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import seed_logreg, sgd_logreg
from jaxdml import distributed
from jaxdml.config import ConfigError, default_config, validate
from jaxdml.training.state import flat_params
from jaxdml.training.trainer import Trainer
from tests.conftest import REPO, log_excerpt

DEVICES_PER_PROCESS = 2
CONFIGS = {"seed_logreg": seed_logreg, "sgd_logreg": sgd_logreg}


def _launch_training(workdir, num_processes: int, config_name: str, timeout: float = 240):
    """Runs experiments.train under jaxdml.launch; kills the whole tree on timeout."""
    cmd = [
        sys.executable, "-m", "jaxdml.launch",
        f"--num_processes={num_processes}", f"--devices_per_process={DEVICES_PER_PROCESS}",
        "--grace_secs=2", "--",
        sys.executable, "-m", "experiments.train",
        f"--config=configs/{config_name}.py:smoke", f"--workdir={workdir}",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # the children die with the launcher (PR_SET_PDEATHSIG)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, out


def _single_process(config_name: str, workdir, num_devices: int):
    config = CONFIGS[config_name].get_config("smoke")
    trainer = Trainer(config, str(workdir), devices=jax.devices()[:num_devices])
    result = trainer.fit()
    return result, flat_params(trainer.state.params)


@pytest.mark.slow
@pytest.mark.parametrize("config_name", ["seed_logreg", "sgd_logreg"], ids=["gd", "sgd"])
@pytest.mark.parametrize("num_processes", [2, 4], ids=["2proc", "4proc"])
def test_multi_process_training_matches_single_process(tmp_path, num_processes, config_name):
    workdir = tmp_path / "multi"
    rc, out = _launch_training(workdir, num_processes, config_name)
    assert rc == 0, log_excerpt(out)
    total = num_processes * DEVICES_PER_PROCESS
    ref_result, ref_params = _single_process(config_name, tmp_path / "single", total)

    result = json.loads((workdir / "result.json").read_text())
    assert result["num_devices"] == total and result["steps"] == ref_result["steps"]
    with np.load(workdir / "params.npz") as multi:
        assert sorted(multi.files) == sorted(ref_params)
        for name, ref in ref_params.items():
            np.testing.assert_allclose(multi[name], ref, rtol=1e-5, atol=1e-7, err_msg=name)
            assert np.linalg.norm(multi[name] - ref) <= 1e-5 * np.linalg.norm(ref)
    # Per-step losses agree too, and only process 0 wrote the run's records.
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    ref_rows = (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()
    ref_loss = [json.loads(line)["loss"] for line in ref_rows]
    np.testing.assert_allclose([r["loss"] for r in rows], ref_loss, rtol=1e-5)
    for p in range(1, num_processes):
        assert (workdir / f"process_{p}" / "metrics.jsonl").exists()
        assert not (workdir / f"process_{p}" / "result.json").exists()
    assert not list(workdir.glob("process_0"))
    # One summary for the job, from process 0 (the others' mains stay quiet even though
    # they ask after jax.distributed.shutdown).
    assert f"[p0] num_devices      {total}" in out
    assert out.count("params_sha256") == 1


def _config(**distributed_fields):
    config = default_config()
    for k, v in distributed_fields.items():
        config.distributed[k] = v
    return validate(config)


def test_single_process_is_the_default_and_touches_nothing():
    settings = distributed.resolve(_config(), env={})
    assert not settings.multi_process
    assert distributed.initialize(_config()) is False


def test_settings_come_from_the_launcher_environment_unless_the_config_sets_them():
    env = {
        "JAXDML_COORDINATOR": "127.0.0.1:1234",
        "JAXDML_NUM_PROCESSES": "4",
        "JAXDML_PROCESS_ID": "3",
        "JAXDML_NUM_CPU_DEVICES": "2",
    }
    s = distributed.resolve(_config(), env=env)
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("127.0.0.1:1234", 4, 3)
    assert s.num_cpu_devices == 2 and s.multi_process
    config = _config(coordinator_address="10.0.0.1:99", num_processes=2, process_id=1)
    config.num_cpu_devices = 8
    s = distributed.resolve(config, env=env)
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("10.0.0.1:99", 2, 1)
    assert s.num_cpu_devices == 2  # the launcher's device split wins
    assert distributed.resolve(_config(auto_detect=True), env={}).multi_process


@pytest.mark.parametrize(
    "env,message",
    [
        ({"JAXDML_NUM_PROCESSES": "2", "JAXDML_PROCESS_ID": "0"}, "coordinator_address"),
        ({"JAXDML_NUM_PROCESSES": "2", "JAXDML_COORDINATOR": "h:1"}, "process_id"),
        ({"JAXDML_NUM_PROCESSES": "two"}, "JAXDML_NUM_PROCESSES='two' must be an integer"),
        (
            {"JAXDML_NUM_PROCESSES": "2", "JAXDML_PROCESS_ID": "2", "JAXDML_COORDINATOR": "h:1"},
            r"process_id \(2\) must be < config.distributed.num_processes \(2\)",
        ),
    ],
)
def test_an_incomplete_or_bad_environment_is_a_config_error(env, message):
    with pytest.raises(ConfigError, match=message):
        distributed.resolve(_config(), env=env)


@pytest.mark.parametrize(
    "field,value",
    [
        ("coordinator_address", "localhost"),
        ("coordinator_address", "h:99999"),
        ("num_processes", -1),
        ("process_id", -2),
        ("heartbeat_timeout_secs", 0),
        ("cpu_collectives", "nccl"),
    ],
)
def test_each_bad_distributed_value_names_its_field(field, value):
    config = default_config()
    config.distributed[field] = value
    with pytest.raises(ConfigError, match=rf"config\.distributed\.{field}\b"):
        validate(config)
