"""Supervisor: recovery from device loss, NaN, silent data corruption, hangs; the budget."""

import json

import jax
import numpy as np
import pytest

from configs import seed_logreg, sgd_logreg
from jaxdml import constants
from jaxdml.supervisor import Supervisor
from jaxdml.training.state import to_host
from jaxdml.training.trainer import Trainer
from tests.conftest import run_cli


def supervised(config, workdir, num_devices=4):
    trainer = Trainer(config, str(workdir), devices=jax.devices()[:num_devices])
    result = trainer.fit()
    return result, to_host(trainer.state.params), trainer


def events(workdir) -> list[dict]:
    return [json.loads(x) for x in (workdir / "events.jsonl").read_text().splitlines()]


def assert_params_close(a, b, rtol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-6)


def small(config_module, steps):
    config = config_module.get_config()
    config.train.num_steps = steps
    config.checkpoint.every_steps = 20
    config.train.log_every = 1000
    return config


@pytest.mark.parametrize("config_module", [seed_logreg, sgd_logreg], ids=["gd", "sgd"])
def test_losing_one_then_two_of_four_devices_keeps_the_fault_free_result(tmp_path, config_module):
    config = small(config_module, 100)
    _, want, _ = supervised(config, tmp_path / "clean")
    config.faults = "device_loss@30:3,device_loss@70:1+2"
    result, got, trainer = supervised(config, tmp_path / "faulty")
    assert result["steps"] == 100 and result["num_devices"] == 1
    assert [int(d.id) for d in trainer.mesh.devices.flat] == [0]
    assert_params_close(got, want)
    assert result["lost_steps"] == 0 and result["recoveries"] == 2
    losses = [e for e in events(tmp_path / "faulty") if e["kind"] == "device_loss"]
    assert [(e["step"], e["devices"], e["steps_redone"]) for e in losses] == [
        (30, [3], 0),
        (70, [1, 2], 0),
    ]
    assert all(e["seconds_lost"] > 0 and "survivors' own replicas" in e["action"] for e in losses)
    rows = [json.loads(x) for x in (tmp_path / "faulty" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 101))


def test_a_nan_step_is_skipped_and_logged(tmp_path):
    config = small(seed_logreg, 60)
    config.faults = "nan@25"
    result, _, _ = supervised(config, tmp_path)
    assert result["steps"] == 60 and result["faults"] == {"nan": 1}
    nan_events = [e for e in events(tmp_path) if e["kind"] == "nan"]
    assert [e["step"] for e in nan_events] == [26]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[25]["skipped"] == 1 and rows[25]["param_norm"] == rows[24]["param_norm"]


def test_five_nan_steps_roll_back_to_the_last_checkpoint(tmp_path):
    config = small(seed_logreg, 80)
    config.faults = "nan@45-49"
    result, _, _ = supervised(config, tmp_path)
    assert result["steps"] == 80
    rollbacks = [e for e in events(tmp_path) if e["kind"] == "rollback"]
    assert len(rollbacks) == 1
    assert rollbacks[0]["restored_step"] == 40 and rollbacks[0]["step"] == 48
    assert "set aside" in rollbacks[0]["action"]
    # Steps 41.. that finished before the rollback: at least to the step that tripped
    # the guard, at most a fetch period past it (metrics are read back in bulk).
    assert 8 <= result["lost_steps"] == rollbacks[0]["steps_redone"] <= 8 + config.train.fetch_every
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 81))
    assert [r["step"] for r in rows if r["set_aside"]] == [46, 47, 48]


def test_bitflip_is_detected_excluded_and_replayed_to_the_fault_free_result(tmp_path):
    config = small(seed_logreg, 100)
    config.supervisor.fingerprint_every = 10
    _, want, _ = supervised(config, tmp_path / "clean")
    config.faults = "bitflip@42:1"
    result, got, trainer = supervised(config, tmp_path / "faulty")
    assert_params_close(got, want)
    assert [int(d.id) for d in trainer.mesh.devices.flat] == [0, 2, 3]
    sdc = [e for e in events(tmp_path / "faulty") if e["kind"] == "sdc"]
    assert [(e["step"], e["devices"], e["restored_step"]) for e in sdc] == [(50, [1], 40)]
    assert result["lost_steps"] == 10


def test_a_fault_free_run_reports_nothing(tmp_path):
    config = small(sgd_logreg, 1000)
    config.supervisor.fingerprint_every = 50
    config.supervisor.watchdog_secs = 60.0
    config.supervisor.spike_zscore = 6.0
    result, _, _ = supervised(config, tmp_path)
    assert result["steps"] == 1000
    assert [e["kind"] for e in events(tmp_path)] == []
    assert result["faults"] == {} and result["recoveries"] == 0 and result["lost_steps"] == 0
    assert 0 < result["goodput"] <= 1
    # how close the run came to the watchdog: its longest wait between steps, compiling
    # and restoring (allowed work) left out
    assert 0 < result["watchdog_longest_quiet_s"] < result["watchdog_deadline_s"] == 60.0


def test_every_event_matches_what_was_injected(tmp_path):
    config = small(seed_logreg, 120)
    config.supervisor.fingerprint_every = 10
    config.faults = "nan@15,device_loss@33:2,bitflip@61:0,nan@90"
    supervised(config, tmp_path)
    log = events(tmp_path)
    injected = [
        (e["fault_kind"], e["step"], e["devices"]) for e in log if e["kind"] == "fault_injected"
    ]
    assert injected == [
        ("nan", 15, []),
        ("device_loss", 33, [2]),
        ("bitflip", 61, [0]),
        ("nan", 90, []),
    ]
    detected = [(e["kind"], e["step"], e["devices"]) for e in log if e["kind"] != "fault_injected"]
    # bitflip at 61 on device 0 is caught at the next fingerprint check (70).
    assert detected == [
        ("nan", 16, []),
        ("device_loss", 33, [2]),
        ("sdc", 70, [0]),
        ("nan", 91, []),
    ]


def test_programming_errors_are_raised_not_retried(tmp_path):
    config = small(seed_logreg, 30)
    supervisor = Supervisor(config)
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:2], supervisor=supervisor)

    def broken(state, batch):
        raise TypeError("a bug")

    trainer.step_fn = broken
    with pytest.raises(TypeError, match="a bug"):
        trainer.fit()
    assert supervisor.recoveries == 0


def _cli(workdir, *overrides):
    return run_cli(
        "experiments.train",
        "--config=configs/seed_logreg.py",
        f"--workdir={workdir}",
        "--config.train.num_steps=80",
        "--config.checkpoint.every_steps=20",
        *overrides,
        timeout=240,
    )


@pytest.mark.slow
def test_hang_exits_with_the_hang_code_and_the_rerun_completes(tmp_path):
    reference = tmp_path / "reference"
    assert _cli(reference).returncode == 0
    workdir = tmp_path / "hang"
    args = ("--config.faults=hang@50:2", "--config.supervisor.watchdog_secs=3")
    proc = _cli(workdir, *args)
    assert proc.returncode == constants.EXIT_HANG, proc.stderr[-2000:]
    hang = [e for e in events(workdir) if e["kind"] == "hang"]
    # The event names the last step seen finished: the hang holds the loop before step 50,
    # with up to `dispatch_depth` steps before it still in flight.
    depth = seed_logreg.get_config().train.dispatch_depth
    assert len(hang) == 1 and 50 - depth <= hang[0]["step"] <= 50
    assert 3 <= hang[0]["seconds_lost"] < 10
    proc = _cli(workdir, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((workdir / "result.json").read_text())
    want = json.loads((reference / "result.json").read_text())
    assert got["params_sha256"] == want["params_sha256"]


@pytest.mark.slow
def test_below_min_devices_stops_with_a_report_and_resumes_with_devices_back(tmp_path):
    args = ("--config.faults=device_loss@50:2+3", "--config.supervisor.min_devices=3")
    proc = _cli(tmp_path, *args)
    assert proc.returncode == constants.EXIT_GAVE_UP, proc.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "gave_up" and report["checkpoint_step"] == 50
    assert report["lost_devices"] == [2, 3] and "min_devices=3" in report["reason"]
    assert "50" in [p.name for p in (tmp_path / "checkpoints").iterdir()]
    proc = _cli(tmp_path, *args)  # same command, all 4 devices back
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == 80 and result["num_devices"] == 4
    resumed = [e for e in events(tmp_path) if e["kind"] == "resumed"]
    assert [e["step"] for e in resumed] == [50]


def test_a_recovery_longer_than_the_watchdog_deadline_is_not_a_hang(tmp_path):
    """A recovery is allowed work, like compiling: a backoff of 4 s before re-forming the
    mesh, with a 1.5-s hang floor, must not make the watchdog call a hang."""
    config = small(seed_logreg, 60)
    config.faults = "device_loss@30:3"
    config.supervisor.watchdog_secs = 1.5
    config.supervisor.watchdog_step_factor = 0.0
    config.supervisor.backoff_secs = 4.0
    exits = []
    supervisor = Supervisor(config, exit_process=exits.append)
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:4], supervisor=supervisor)
    result = trainer.fit()
    assert exits == [] and [e for e in events(tmp_path) if e["kind"] == "hang"] == []
    assert result["steps"] == 60 and result["recoveries"] == 1 and result["num_devices"] == 3
    loss = [e for e in events(tmp_path) if e["kind"] == "device_loss"]
    assert len(loss) == 1 and loss[0]["seconds_lost"] >= 4.0  # the backoff is its cost
