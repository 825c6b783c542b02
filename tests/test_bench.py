"""scripts/bench.py: the quick benchmark run end to end, and the helpers of its sections
(the package scripts/benchmarks, importable as `benchmarks`: pyproject.toml puts scripts/
on pytest's path as `python scripts/bench.py` puts it on its own)."""

import json
import math
import os
import subprocess
import sys

import pytest
from benchmarks import common, goodput, models, recovery, scaling

from jaxdml.faults import parse
from tests.conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_goodput_plan_rotates_faults_over_healthy_devices():
    plan = goodput.goodput_plan(num_steps=10_000, interval=1000, num_devices=4)
    faults = parse(plan)
    assert [f.start for f in faults] == list(range(1000, 10_000, 1000))
    assert [f.kind for f in faults] == [
        "device_loss", "sigkill", "nan", "bitflip", "hang",
        "device_loss", "sigkill", "nan", "bitflip",
    ]  # fmt: skip
    # A device loss takes device 3 of 4; after it, the bit flip hits one of the 3 left.
    assert faults[0].devices == (3,) and faults[3].devices == (1,)
    assert faults[2].end == faults[2].start + 2  # a burst of 3 NaN batches: a rollback


def test_goodput_plan_skips_a_bitflip_without_a_majority():
    plan = goodput.goodput_plan(num_steps=5000, interval=1000, num_devices=2)
    kinds = [f.kind for f in parse(plan)]
    assert "bitflip" not in kinds and kinds[0] == "device_loss"


def test_loglog_slope_and_cold_lost_work():
    assert scaling.loglog_slope([1e4, 1e5, 1e6], [2.0, 20.0, 200.0]) == pytest.approx(1.0)
    assert scaling.loglog_slope([1, 2, 4, 8], [3.0] * 4) == pytest.approx(0.0, abs=1e-12)
    events = [
        {"kind": "fault_injected", "step": 85, "time": 10.0},
        {"kind": "resumed", "step": 50, "time": 12.5},
    ]
    assert recovery.cold_lost_work(events) == (35, 2.5)


def test_settings_overrides_take_the_type_of_the_field():
    s = common.with_overrides(
        common.QUICK,
        ["models_repeats=5", "models_only=gbdt,svm", "ckpt_sizes_mb=1,2", "overhead_breakdown=1"],
    )
    assert (s.models_repeats, s.models_only, s.ckpt_sizes_mb) == (5, ("gbdt", "svm"), (1, 2))
    assert s.overhead_breakdown is True and s.goodput_seconds == common.QUICK.goodput_seconds
    for bad in (["no_such_field=1"], ["models_repeats"], ["overhead_problems=a"]):
        with pytest.raises(ValueError):
            common.with_overrides(common.QUICK, bad)


def test_goodput_config_and_logreg_row_are_valid_runs():
    from jaxdml.config import validate
    from jaxdml.data import load_dataset

    s = common.with_overrides(
        common.QUICK, ["goodput_config=wide_mlp", "goodput_local_every_steps=0"]
    )
    command = goodput._goodput_command(100, s.goodput_config, s.goodput_local_every_steps)
    assert "--config=wide_mlp" in command and "--config.train.num_steps=100" in command
    assert not [a for a in command if "local_every_steps" in a]  # the config's own: 3
    seed = goodput._goodput_command(100, "seed_logreg", common.QUICK.goodput_local_every_steps)
    assert "--config.checkpoint.local_every_steps=100" in seed
    fast = goodput._goodput_command(100, "seed_logreg", 100, watchdog_secs=1.5, steps_per_call=10)
    assert "--config.supervisor.watchdog_secs=1.5" in fast
    assert "--config.train.steps_per_call=10" in fast
    # the hang floor: 2 x the fault-free calibration's longest wait between steps, >= 1 s;
    # a hang is max(floor, 4 x the median step) without progress
    assert goodput.watchdog_floor({"watchdog_longest_quiet_s": 0.02}) == 1.0
    assert goodput.watchdog_floor({"watchdog_longest_quiet_s": 2.4}) == pytest.approx(4.8)
    assert "--config.supervisor.watchdog_step_factor=4" in fast
    data = {"source": "synthetic", "n_samples": 500, "n_features": 5, "n_informative": 2}
    config = models._config(common.config_module("seed_logreg"), "", data)
    ds = load_dataset(config.data)
    label, config, refs = models._logreg_jobs(ds, data)
    validate(config)  # raises ConfigError for a combination the trainer refuses
    assert config.train.optimizer == "lbfgs" and config.model.l2 == 1.0 / len(ds.y_train)
    assert list(refs) == ["LogisticRegression lbfgs"] and "L-BFGS" in label


def test_gpu_figures_exit_cleanly_without_a_gpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/bench.py", "--gpu", f"--out={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no GPU or TPU available" in proc.stdout and not os.listdir(tmp_path)


# Below --quick's sizes: every section and plot is written, through the same code, with
# the fewest runs that still exercise it (the suite's time budget is 15 minutes).
SMOKE = (
    "--set=ckpt_sizes_mb=1", "--set=ckpt_repeats=1", "--set=recovery_kinds=device_loss,sigkill",
    "--set=goodput_seconds=12", "--set=goodput_every=5", "--set=goodput_calibration_steps=1000",
    "--set=scaling_rows=10000,100000", "--set=scaling_devices=1,2", "--set=scaling_seconds=0.2",
    "--set=scaling_device_rows=50000", "--set=models_only=mlp", "--set=models_data=digits",
)  # fmt: skip


@pytest.mark.slow
def test_a_run_of_some_sections_keeps_the_others_of_the_results_file(tmp_path):
    """`bench.py --only=goodput` replaces that section of results/ and keeps the rest,
    each section naming the commit it was measured at."""
    machine = dict(
        date="D1",
        commit="old",
        cpus=2,
        platform="P",
        python="3",
        jax="J",
        backend="cpu",
        load_average_at_start=(1.0, 1.0, 1.0),
    )
    first = [
        common.Section(n, body=f"{n} table v1", data={"seconds": 1.0, "v": 1})
        for n in common.SECTIONS
    ]
    (tmp_path / "benchmarks.md").write_text(common._report(first, machine, False, 6.0))
    raw = {"quick": False, "sections": {s.name: {"failed": False, **s.data} for s in first}}
    (tmp_path / "benchmarks.json").write_text(json.dumps(raw))

    md, numbers = common.previous_sections(str(tmp_path), False, {"goodput"})
    assert sorted(md) == sorted(set(common.SECTIONS) - {"goodput"})
    assert numbers["models"]["v"] == 1 and "goodput" not in numbers
    assert common.previous_sections(str(tmp_path), True, {"goodput"}) == ({}, {})  # --quick

    again = [common.Section("goodput", body="goodput table v2", data={"seconds": 2.0})]
    report = common._report(again, {**machine, "commit": "new"}, False, 2.0, md)
    assert [line for line in report.splitlines() if line.startswith("## ")] == [
        f"## {common.TITLES[n]}" for n in common.SECTIONS
    ]
    assert "goodput table v2" in report and "goodput table v1" not in report
    assert "models table v1" in report and report.count("(commit old, D1)") == 5
    assert "(commit new, D1)" in report and "Kept from an earlier run" in report


def test_quick_benchmark_writes_every_section_and_valid_plots(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "scripts/bench.py", "--quick", f"--out={out}", *SMOKE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = (out / "benchmarks.md").read_text()
    for title in common.TITLES.values():
        assert f"\n## {title}\n" in report
    assert "This section failed" not in report
    images = [line for line in report.splitlines() if line.startswith("![")]
    linked = [line[line.index("(") + 1 : -1] for line in images]
    assert sorted(linked) == sorted(p.name for p in out.glob("*.png"))
    assert len(linked) == 6
    for name in linked:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000
    raw = json.loads((out / "benchmarks.json").read_text())["sections"]
    assert not any(s["failed"] for s in raw.values())
    [overhead] = raw["overhead"]["problems"]
    losses = overhead["final_loss"]
    assert losses["bare"] == pytest.approx(losses["protected"], rel=1e-4)  # same model and data
    assert losses["bare"] == pytest.approx(losses["protected_memory_fused"], rel=1e-4)
    # Timings are the benchmark's to report, not this test's to judge (the suite runs on
    # two workers of a shared machine): only that each ratio and slope was measured.
    assert math.isfinite(overhead["protected_over_bare"]) and overhead["protected_over_bare"] > 0
    assert all(o["completed"] for o in raw["recovery"]["outcomes"].values())
    assert raw["recovery"]["outcomes"]["device_loss"]["lost_steps"] == 0
    assert [m for m, _ in recovery.HOST_LOSS_MODES] == list(raw["recovery"]["host_loss"])
    assert raw["models"]["returncode"] == 0 and "| digits (1437 x 64) | mlp" in report
    assert all(r["completed"] for r in raw["goodput"]["runs"].values())
    assert raw["goodput"]["runs"]["with faults"]["faults"] >= 2
    assert raw["goodput"]["watchdog_secs"] == goodput.watchdog_floor(raw["goodput"]["calibration"])
    faulty = raw["goodput"]["runs"]["with faults"]["job"]
    # The kill restarted it. Its redone steps may be 0: the memory tier saves every 100
    # steps and at its default 5 s, so the kill can land right after a save
    # (tests/test_goodput.py checks the redone-step accounting against metrics.jsonl).
    assert faulty["lives"] >= 2
    assert 0 < raw["goodput"]["goodput"]["job_records"] < 1
    assert all(math.isfinite(v) for v in raw["scaling"]["slopes"].values())


@pytest.mark.parametrize("launched", [False, True], ids=["1x4", "2x2"])
def test_multiprocess_bench_psum_worker_runs_on_both_layouts(launched):
    """scripts/bench_multiprocess.py's bare psum loop, in one process of 4 devices and
    under the launcher as 2 processes of 2 (the timings are the script's to report)."""
    launch = [sys.executable, "-m", "jaxdml.launch", "--num_processes=2",
              "--devices_per_process=2", "--max_restarts=0", "--"]  # fmt: skip
    cmd = [sys.executable, "scripts/bench_multiprocess.py", "--worker_iters=20"]
    proc = subprocess.run(
        (launch if launched else []) + cmd, cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "JAXDML_NUM_CPU_DEVICES": "4"}, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if "psum_seconds" in x]
    seconds = json.loads(line[line.index("{") :])["psum_seconds"]
    assert math.isfinite(seconds) and seconds > 0


def test_loop_bench_times_the_loop_alone_and_with_the_trainers_hooks():
    """scripts/bench_loop.py runs the real Loop (and the plain trainer's hooks) around a
    no-op step and reports each variant (the timings are the script's to report)."""
    cmd = [sys.executable, "scripts/bench_loop.py", "--steps=300", "--repeats=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2] for line in proc.stdout.splitlines()
            if line.startswith("| ") and "us per step" not in line}  # fmt: skip
    assert set(rows) == {"bare Python loop", "Loop, no hooks", "Loop, plain Trainer.fit() hooks"}
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in rows.values())
