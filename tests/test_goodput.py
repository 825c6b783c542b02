"""Job-level goodput: one record across process lives; redone steps and lost seconds
equal what metrics.jsonl and the clock say, whatever the restart path."""

import json
import os
import shutil
import time

import jax
import pytest

from configs import seed_logreg
from jaxdml import goodput
from jaxdml.metrics import read_jsonl
from jaxdml.training.hooks import OnMetrics
from jaxdml.training.trainer import Trainer
from tests.conftest import run_cli


def test_summary_cuts_redone_steps_and_sums_to_the_wall_time():
    records = [
        {"kind": "life", "t": 100.0},
        {"kind": "span", "category": "startup", "seconds": 1.5, "t": 101.5},
        {"kind": "resume", "step": 0, "t": 101.5},
        {"kind": "span", "category": "compile", "seconds": 0.5, "t": 102.0},  # warm-up
        {"kind": "steps", "first": 1, "last": 10, "seconds": [1.0] * 10, "t": 112.0},
        {"kind": "steps", "first": 11, "last": 20, "seconds": [1.0] * 10, "t": 122.0},
        {"kind": "life", "t": 130.0},  # killed after step 20; 8 s down
        {"kind": "span", "category": "restore", "seconds": 0.75, "t": 130.75},
        {"kind": "resume", "step": 15, "t": 130.75},  # steps 16..20 are done again
        {"kind": "span", "category": "compile", "seconds": 0.25, "t": 131.0},
        {"kind": "steps", "first": 16, "last": 30, "seconds": [1.0] * 15, "t": 146.0},
    ]
    s = goodput.summarize(records)
    assert s["lives"] == 2 and s["job_wall_seconds"] == 46.0
    assert s["steps_redone"] == 5 and s["seconds"]["redone"] == pytest.approx(5.0)
    assert s["steps_kept"] == 30 and s["seconds"]["productive"] == pytest.approx(30.0)
    assert s["seconds"]["down"] == pytest.approx(8.0)
    assert sum(s["seconds"].values()) == pytest.approx(46.0)
    assert s["job_goodput"] == pytest.approx(30.0 / 46.0)
    # The faults' cost: redone 5 + down 8 + the second life's restore and compilation
    # (the first life's warm-up compilation a fault-free job pays too).
    assert s["fault_seconds"] == pytest.approx(5.0 + 8.0 + 0.75 + 0.25)
    assert s["fault_fraction"] == pytest.approx(14.0 / 46.0)


def test_host_work_hidden_behind_running_steps_is_productive_not_badput(tmp_path):
    """An in-loop span (a periodic save) is badput only where its row says the devices ran
    dry (`stall_seconds`); behind a running step it is recorded hidden, and its row's time
    stays productive. One no row claims (the loop died after it) is charged at close."""
    now = [100.0]
    log = goodput.GoodputLog(str(tmp_path), clock=lambda: now[0], started=100.0)

    def row(step, end, seconds, host, stall):
        return {"step": step, "time": end, "seconds": seconds, "host_seconds": host,
                "stall_seconds": stall}  # fmt: skip

    log.span("checkpoint", 0.5, in_loop=True, ended=100.8)  # during step 1: hidden
    log.span("checkpoint", 0.25, in_loop=True, ended=102.5)  # during step 3: stalled
    log.span("checkpoint", 0.125, in_loop=True, ended=103.5)  # after the rows so far
    now[0] = 103.0
    log.steps([row(1, 101.0, 1.0, 0.5, 0.0), row(2, 102.0, 1.0, 0.0, 0.0),
               row(3, 103.0, 1.0, 0.375, 0.375)])  # fmt: skip
    now[0] = 104.0
    log.close()
    s = goodput.summarize(goodput.read(str(tmp_path)))
    assert s["hidden_seconds"] == {"checkpoint": 0.5}
    assert s["seconds"]["checkpoint"] == pytest.approx(0.25 + 0.125)
    assert s["seconds"]["host"] == pytest.approx(0.125)  # row 3's stall less its save
    assert s["seconds"]["productive"] == pytest.approx(1.0 + 1.0 + 0.625)
    assert sum(s["seconds"].values()) == pytest.approx(s["job_wall_seconds"])


def test_per_process_records_keep_each_process_detection_and_recovery(tmp_path):
    """A multi-process job: process 0's record is the job's; each process's own summary
    and in-process recoveries (from its events) are listed apart, where they differ."""

    def write(folder, records, events):
        folder.mkdir(exist_ok=True)
        (folder / goodput.FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
        (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))

    life = [{"kind": "life", "t": 0.0}, {"kind": "resume", "step": 0, "t": 1.0}]
    steps = {"kind": "steps", "first": 1, "last": 4, "seconds": [1.0] * 4, "t": 5.0}
    survivor = {"kind": "host_loss", "step": 4, "detect_seconds": 3.1, "recover_seconds": 0.7}
    write(tmp_path, [*life, steps], [survivor, {"kind": "resumed", "step": 2}])
    write(tmp_path / "process_1", [*life, steps, {"kind": "life", "t": 9.0}], [])
    (tmp_path / "process_2").mkdir()  # no record (yet): not listed

    processes = goodput.per_process(str(tmp_path))
    assert [p["process"] for p in processes] == [0, 1]
    assert processes[0]["recoveries"] == [survivor] and processes[1]["recoveries"] == []
    assert processes[1]["lives"] == 2 and processes[1]["seconds"]["down"] == pytest.approx(4.0)
    text = goodput.process_table(processes)
    assert "| 0 | 1 | 0.800 | 0 | 0.00 | 0.00 | host_loss@4: 3.10 + 0.70 |" in text
    assert "| 1 | 2 | 0.444 | 0 | 4.00 | 0.00 | - |" in text


def _device_seconds(rows):
    return sum(max(0.0, r["seconds"] - r["stall_seconds"]) for r in rows)


ARGS = (
    "experiments.train", "--config=configs/seed_logreg.py",
    "--config.train.num_steps=160", "--config.checkpoint.local_every_secs=0",
    "--config.train.fetch_every=10",
)  # fmt: skip


@pytest.mark.parametrize(("kill_at", "every"), [(80, 100), (140, 50)])
def test_a_killed_and_restarted_job_counts_the_steps_it_redid(tmp_path, kill_at, every):
    """Killed before its first checkpoint (the restart starts over, with no `resumed`
    event) or after it: one job record, with the killed life's recorded steps past the
    restart point counted as redone, and the time it was dead as `down`."""
    workdir = str(tmp_path / "run")
    t_start = time.time()
    args = (*ARGS, f"--workdir={workdir}", f"--config.faults=sigkill@{kill_at}",
            f"--config.checkpoint.every_steps={every}")  # fmt: skip
    first = run_cli(*args)
    assert first.returncode != 0
    life1 = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    shutil.copy(os.path.join(workdir, "metrics.jsonl"), tmp_path / "life1.jsonl")
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr[-2000:]
    t_end = time.time()

    summary = goodput.summarize(goodput.read(workdir))
    # Where the restart went on from: its `resumed` event, none when it started over
    # (the newest checkpoint may not have committed before the kill: then an older one).
    events = read_jsonl(os.path.join(workdir, "events.jsonl"))
    resumed = next((e["step"] for e in events if e["kind"] == "resumed"), 0)
    assert resumed == 0 if every > kill_at else resumed in (50, 100)
    lost = [r for r in life1 if r["step"] > resumed]
    assert summary["lives"] == 2
    assert summary["steps_redone"] == len(lost) > 0
    assert summary["seconds"]["redone"] == pytest.approx(_device_seconds(lost), abs=1e-4)
    assert summary["steps_kept"] == 160
    assert summary["seconds"]["down"] > 0
    # The categories cover the job's wall time, which is the clock's from the first
    # process's start to the last record (within the test's own bracket).
    assert sum(summary["seconds"].values()) == pytest.approx(summary["job_wall_seconds"], rel=0.01)
    # (Outside the records: process spawn and interpreter exit, ~1 s each when loaded.)
    assert 0.7 * (t_end - t_start) < summary["job_wall_seconds"] <= t_end - t_start
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["job_goodput"] == pytest.approx(summary["job_goodput"], rel=0.05)
    assert set(result["badput"]) == {"productive", *goodput.CATEGORIES}


def _fit_in_process(workdir, faults: str):
    """seed_logreg for 80 steps on 4 devices with `faults`: (result, every row delivered
    to a hook in order, events.jsonl, the goodput records)."""
    config = seed_logreg.get_config()
    config.train.num_steps = 80
    config.checkpoint.every_steps = 20
    config.checkpoint.local_every_secs = 0.0
    config.faults = faults
    delivered = []
    trainer = Trainer(
        config, str(workdir), devices=jax.devices()[:4], hooks=[OnMetrics(delivered.extend)]
    )
    result = trainer.fit()
    events = read_jsonl(str(workdir / "events.jsonl"))
    return result, delivered, events, goodput.read(str(workdir))


def test_a_rollback_counts_every_step_it_threw_away(tmp_path):
    result, delivered, events, records = _fit_in_process(tmp_path, "nan@45-49")
    rollback = next(e for e in events if e["kind"] == "rollback")
    # The rows delivered before the replay began (steps go back down at the replay).
    replay = next(
        i for i in range(1, len(delivered)) if delivered[i]["step"] <= delivered[i - 1]["step"]
    )
    first_pass = delivered[:replay]
    summary = goodput.summarize(records)
    lost = [r for r in first_pass if r["step"] > rollback["restored_step"]]
    assert summary["steps_redone"] == len(lost) == result["lost_steps"]
    assert summary["seconds"]["redone"] == pytest.approx(_device_seconds(lost), abs=1e-4)
    assert summary["steps_kept"] == 80 and summary["seconds"]["recovery"] > 0


def test_a_hot_device_loss_counts_its_recovery_and_redone_steps(tmp_path):
    """A device lost in-process: the survivors re-form the mesh from the state they hold.
    The steps done twice are those delivered twice; the recovery's seconds are its
    event's; the categories still cover the wall time."""
    result, delivered, events, records = _fit_in_process(tmp_path, "device_loss@45:3")
    assert result["num_devices"] == 3
    (loss,) = [e for e in events if e["kind"] == "device_loss"]
    seen: dict[int, list[dict]] = {}
    for row in delivered:
        seen.setdefault(row["step"], []).append(row)
    twice = [rows[0] for rows in seen.values() if len(rows) > 1]  # the first pass's rows
    summary = goodput.summarize(records)
    assert summary["steps_redone"] == len(twice) == loss["steps_redone"] == result["lost_steps"]
    assert summary["seconds"]["redone"] == pytest.approx(_device_seconds(twice), abs=1e-4)
    assert summary["steps_kept"] == 80
    # The recovery's seconds are its event's, less the spans of other categories inside
    # it (the new mesh's compilation): each second is counted once.
    began = next(r["t"] for r in records if r["kind"] == "resume" and r["step"] == 45)
    window = (began - loss["detect_seconds"], began + loss["recover_seconds"])
    spans = [
        r for r in records
        if r["kind"] == "span" and r["category"] != "recovery" and window[0] <= r["t"] <= window[1]
    ]  # fmt: skip
    assert "compile" in {r["category"] for r in spans}  # the new mesh's step compiled
    # Its seconds (0.09-0.3 s: less when the session's compilation cache holds the
    # 3-device step from an earlier test) exceed the tolerance below twice over.
    inside = sum(r["seconds"] for r in spans)
    assert inside > 0.04
    assert summary["seconds"]["recovery"] == pytest.approx(loss["seconds_lost"] - inside, abs=0.02)
    assert sum(summary["seconds"].values()) == pytest.approx(summary["job_wall_seconds"], rel=0.01)
