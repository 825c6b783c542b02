"""The chaos runner: plans run as processes, restarted until they complete."""

import json

import pytest

from jaxdml import chaos
from tests.conftest import run_cli


def test_lost_work_counts_in_process_redo_and_crash_gaps():
    events = [
        {"kind": "fault_injected", "fault_kind": "sigkill", "step": 37, "time": 10.0},
        {"kind": "resumed", "step": 25, "time": 12.5},
        {"kind": "rollback", "step": 48, "steps_redone": 8, "seconds_lost": 0.5, "time": 20.0},
        {"kind": "hang", "step": 61, "seconds_lost": 5.0, "time": 30.0},
        {"kind": "resumed", "step": 50, "time": 33.0},
    ]
    steps, seconds = chaos.lost_work(events)
    assert steps == 12 + 8 + 11
    assert seconds == pytest.approx(2.5 + 0.5 + 5.0 + 3.0)


@pytest.mark.slow
def test_chaos_command_prints_a_row_per_plan(tmp_path):
    proc = run_cli(
        "experiments.chaos",
        "--config=configs/seed_logreg.py",
        f"--workdir={tmp_path}",
        "--plans=sigterm@60;device_loss@40:3",
        "--override=config.train.num_steps=100",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "chaos.json").read_text())
    assert [r["plan"] for r in rows] == ["(none)", "sigterm@60", "device_loss@40:3"]
    assert all(r["completed"] for r in rows)
    assert rows[1]["attempts"] == 2 and rows[1]["exit_codes"] == [0, 0]
    assert rows[1]["param_rel_diff"] == 0.0
    assert rows[2]["param_rel_diff"] < 1e-5 and rows[2]["lost_steps"] == 0
    assert rows[1]["param_l2_diff"] == 0.0 and 0 < rows[2]["param_l2_diff"] < 1e-6
    # Goodput from the job records too: nothing is put on faults in the fault-free run;
    # the preempted one paid a second start-up.
    assert rows[0]["goodput_accounted"] == 1.0 and rows[1]["goodput_accounted"] < 1.0
    assert all(0 < r["job_goodput"] < 1 for r in rows)
    assert "| `device_loss@40:3` | yes |" in proc.stdout
