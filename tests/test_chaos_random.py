"""Random-moment chaos: the seeded schedule, the detectors the runner watches the job
with, the report from fabricated runs, and one real run with signals from outside."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

from jaxdml import chaos_random
from jaxdml.chaos_random import FaultRecord, Job, JsonlTail, RandomChaos
from jaxdml.chaos_report import recovery_path, summarize, table
from jaxdml.metrics import MetricsWriter
from tests.conftest import REPO, process_alive

KINDS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGSTOP+KILL", "SIGSTOP")


def test_the_same_seed_gives_the_same_faults_at_the_same_moments():
    a = chaos_random.schedule(7, 30, KINDS, ("any", "save", "restore"))
    b = chaos_random.schedule(7, 30, KINDS, ("any", "save", "restore"))
    c = chaos_random.schedule(8, 30, KINDS, ("any", "save", "restore"))
    assert a == b and a != c
    assert {f.kind for f in a} == set(KINDS) and {f.phase for f in a} == {"any", "save", "restore"}
    for f in a:
        low, high = (0.2, 3.0) if f.phase == "restore" else (0.5, 3.0)
        assert low <= f.delay <= high and 1.0 <= f.stop_secs <= 8.0
    with pytest.raises(ValueError, match="SIGHUP"):
        chaos_random.schedule(7, 1, ("SIGHUP",))


def _row(step, t):
    return {"step": step, "loss": 0.5, "time": t}


def test_the_tail_sees_appends_and_a_rewrite_by_a_resume(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    tail = JsonlTail(str(tmp_path / "metrics.jsonl"))
    assert tail.poll() == []
    for s in range(1, 11):
        writer.write(_row(s, 100.0 + s))
    writer.drain()  # the rows are written by the writer's thread
    assert [r["step"] for r in tail.poll()] == list(range(1, 11)) and tail.max_step == 10
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "ti')  # a torn line waits for the rest
    assert tail.poll() == []
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('me": 111.0}\n')
    assert [r["step"] for r in tail.poll()] == [11]
    # A resume from step 6 rewrites the file shorter, then steps 7.. run again, and the
    # file is past its old size by the time the tail looks.
    writer.truncate_after(6)
    for s in range(7, 14):
        writer.write(_row(s, 200.0 + s))
    writer.drain()
    assert [r["step"] for r in tail.poll()] == list(range(7, 14)) and tail.max_step == 13
    writer.truncate_after(9)
    assert tail.poll() == [] and tail.max_step == 9


def test_the_save_detector_sees_orbax_and_memory_tier_temporaries(tmp_path):
    ckpt, memory = tmp_path / "checkpoints", tmp_path / "process_0"
    (ckpt / "20").mkdir(parents=True)
    (memory / "15").mkdir(parents=True)
    folders = [str(ckpt), str(memory), str(tmp_path / "missing")]
    assert chaos_random.save_in_progress(folders) is None
    (memory / ".tmp-20").mkdir()
    assert chaos_random.save_in_progress(folders).endswith(".tmp-20")
    (memory / ".tmp-20").rmdir()
    (ckpt / "40.orbax-checkpoint-tmp-1714").mkdir()
    assert "orbax-checkpoint-tmp" in chaos_random.save_in_progress(folders)


def test_the_restore_detector_waits_for_the_first_row_of_the_newest_process(tmp_path):
    job = Job(["true"], str(tmp_path), str(tmp_path / "logs"), launcher=False)
    chaos = RandomChaos(job, [], [])
    job.started = 1000.0
    writer = MetricsWriter(str(tmp_path))
    writer.write(_row(1, 999.0))  # a row of the process before
    writer.drain()
    chaos._poll_rows()
    assert chaos._restarting() and not chaos._training()
    writer.write(_row(2, 1001.0))
    writer.drain()
    chaos._poll_rows()
    assert not chaos._restarting() and chaos._training()
    job.first_seen[4242] = 1002.0  # a worker of the launcher seen later
    assert chaos._restarting()


def _fabricated_run(tmp_path, params, steps):
    run, ref = tmp_path / "random", tmp_path / "ref"
    for d, p in [(run, params), (ref, {"w": np.array([1.0, 2.0], np.float32)})]:
        d.mkdir()
        np.savez(d / "params.npz", **p)
        (d / "result.json").write_text(json.dumps({"steps": 20}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(_row(s, 0.0)) + "\n" for s in steps))
    events = [
        {"time": 12.0, "kind": "host_loss", "step": 5, "resumed_at": 6},
        {"time": 25.0, "kind": "resumed", "step": 8, "source": "memory"},
        {"time": 35.0, "kind": "resumed", "step": 9, "source": "persistent"},
    ]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    records = [
        FaultRecord(0, "SIGKILL", "any", target="p1", fired=10.0, seen=12.0, reached=5,
                    resumed_from=5),
        FaultRecord(1, "SIGTERM", "save", "orbax tmp", "p0", fired=20.0, seen=26.0, reached=10,
                    resumed_from=8, restarted_at=21.0),
        FaultRecord(2, "SIGKILL", "restore", "before first row", "p0", fired=30.0, reached=10,
                    superseded_by=3, restarted_at=31.0),
        FaultRecord(3, "SIGKILL", "restore", "missed", "p1", fired=33.0, seen=37.0, reached=10,
                    resumed_from=9, restarted_at=34.0),
        FaultRecord(4, "SIGKILL", "any", target="single", fired=40.0, seen=47.0, reached=12,
                    resumed_from=0, restarted_at=41.0),
        FaultRecord(5, "SIGSTOP", "any", target="single", fired=50.0, seen=54.0, reached=12,
                    resumed_from=12, continued_at=53.0),
        FaultRecord(6, "SIGKILL", "any", target="p0", fired=60.0, hung=True),
        FaultRecord(7, "SIGINT", "any", target="p1", fired=70.0, seen=70.1, reached=20,
                    resumed_from=20),
    ]  # fmt: skip
    return records, str(run), str(ref)


def test_the_report_counts_paths_redone_steps_and_compares_params(tmp_path):
    same = {"w": np.array([1.0, 2.0], np.float32)}
    records, run, ref = _fabricated_run(tmp_path, same, range(1, 21))
    s = summarize(records, run, ref, mode="launcher", seed=3, done=True, starts=5)
    paths = ["hot", "warm", "-", "cold", "scratch", "continued", "-", "no effect"]
    assert [r.path for r in records] == paths
    assert s.paths == {"hot": 1, "warm": 1, "cold": 1, "scratch": 1, "continued": 1, "-": 2,
                       "no effect": 1}  # fmt: skip
    assert s.completed and s.exactly_once and s.params_bitwise and s.shrunk
    assert s.hung == 1 and s.faults_fired == 8
    # The superseded fault, the hung one and the one without effect are not measured.
    assert s.kill_to_training == [2.0, 6.0, 4.0, 7.0, 4.0]
    assert s.steps_redone == [0, 2, 1, 12, 0]
    text = table(records, s)
    assert "| 2 | SIGKILL | restore | before first row | p0 | (superseded by #3) |" in text
    assert "| kill->training median / max s | 4.0 / 7.0 |" in text
    assert "| steps redone median / max | 1 / 12 |" in text
    assert "| params vs fault-free | bitwise equal (after a shrink) |" in text
    assert "| 6 | SIGKILL | any | - | p0 | - | - | - | HUNG |" in text


def test_the_report_fails_a_run_with_a_step_twice_or_other_params(tmp_path):
    other = {"w": np.array([1.0, 2.0 + 1e-3], np.float32)}
    records, run, ref = _fabricated_run(tmp_path, other, [*range(1, 11), 10, *range(11, 21)])
    s = summarize(records, run, ref, mode="single", seed=3, done=True)
    assert not s.exactly_once and s.completed  # exit 0 at the last step, but a row twice
    assert s.params_bitwise is False and s.params_rel_diff == pytest.approx(5e-4, rel=1e-2)
    s = summarize(records, run, ref, mode="single", seed=3, done=False)
    assert not s.completed
    assert recovery_path(FaultRecord(9, "SIGKILL", "any", fired=100.0), [], float("inf")) == "-"


@pytest.mark.slow
def test_random_kills_of_one_process_complete_every_step_once_bitwise(tmp_path):
    """A real run: SIGKILL, SIGTERM and SIGINT at seeded random moments (any time or during
    a save) to one experiments.train process, rerun until it completes."""
    # Delays of at most 1.2 s after training is seen again: the three faults fall inside the
    # run's ~5 s of training (with the default 0.5-3 s the last one often came after the
    # last step, and the run finished with two).
    kinds = ("SIGKILL", "SIGTERM", "SIGINT")
    plan = chaos_random.schedule(1, 3, kinds, ("any", "save"), gap=(0.3, 1.2))
    assert sorted(f.kind for f in plan) == ["SIGINT", "SIGKILL", "SIGTERM"]
    command = [
        sys.executable, "-m", "experiments.train", "--config=configs/seed_logreg.py",
        "--config.train.num_steps=1500", "--config.checkpoint.every_steps=20",
        "--config.checkpoint.local_every_steps=5",
    ]  # fmt: skip
    try:
        records, s = chaos_random.run_random(
            command, str(tmp_path), plan, "single", 1, hang_secs=60, cwd=REPO
        )
    finally:
        for d in ("random", "fault_free"):
            shutil.rmtree(chaos_random.save_folders(str(tmp_path / d))[1], ignore_errors=True)
    assert s.faults_fired == 3 and s.completed and s.exactly_once and s.hung == 0
    assert s.params_bitwise is True and not s.shrunk
    assert s.leftovers == 0 and not any(process_alive(r.pid) for r in records)
    for r in records:
        assert r.seen is not None, r
        if r.reached == 1500:  # it found training over: a restart resumes at the last
            # step (warm or cold: the final save is persistent), or no effect (it finished)
            assert r.path in ("warm", "cold", "no effect") and r.resumed_from == 1500, r
            continue
        assert r.path == ("warm" if r.resumed_from else "scratch"), r
        assert r.steps_redone <= 20, r  # the memory tier saves every 5 steps
    assert records[0].kill_to_training < 60


def test_a_signal_the_job_ignored_is_no_effect_not_a_hang(tmp_path):
    job = Job(["true"], str(tmp_path), str(tmp_path / "logs"), launcher=False)
    chaos = RandomChaos(job, [], [], no_effect_secs=20.0)
    record = FaultRecord(0, "SIGINT", "any", target="single", pid=os.getpid(), fired=100.0,
                         reached=7)  # fmt: skip
    chaos.open = [record]
    chaos.recent.extend([(7, 99.9), (8, 100.5), (9, 110.0)])
    chaos._update(record)
    assert chaos.open == [record]  # 10 s after the signal: not yet
    chaos.recent.append((10, 120.5))
    chaos._update(record)
    assert chaos.open == [] and record.seen == 100.5 and record.steps_redone == 0
    assert recovery_path(record, [], float("inf")) == "no effect"


def test_a_fault_after_the_last_step_is_seen_by_the_resume_or_has_no_effect(tmp_path):
    # SIGTERM during the final save: the process exits, its restart resumes at the last
    # step and exits with nothing to run, so no metrics row follows the restart.
    job = Job(["true"], str(tmp_path), str(tmp_path / "logs"), launcher=False)
    chaos = RandomChaos(job, [], [])
    record = FaultRecord(2, "SIGTERM", "save", target="single", pid=1, fired=100.0,
                         reached=1500)  # fmt: skip
    record.restarted_at = 100.5
    chaos.open, chaos.done = [record], True
    chaos.recent.extend([(1499, 99.8), (1500, 99.9)])
    resumed = {"kind": "resumed", "source": "memory"}
    chaos.event_rows = [{**resumed, "time": 90.0, "step": 916},
                        {**resumed, "time": 101.2, "step": 1500}]  # fmt: skip
    chaos._update(record)
    assert chaos.open == [record]  # no row after the restart
    chaos._after_the_last_step(record)
    assert chaos.open == [] and record.seen == 101.2 and record.resumed_from == 1500
    assert record.steps_redone == 0
    assert recovery_path(record, chaos.event_rows, float("inf")) == "warm"
    # SIGTERM as the process finished: no restart (it exited 0 with its result).
    late = FaultRecord(3, "SIGTERM", "save", target="single", pid=1, fired=102.0,
                       reached=1500)  # fmt: skip
    chaos.open = [late]
    chaos._update(late)
    chaos._after_the_last_step(late)
    assert chaos.open == [] and late.seen == 102.0 and late.steps_redone == 0
    assert recovery_path(late, chaos.event_rows, float("inf")) == "no effect"


def test_a_restart_that_gets_a_pid_seen_before_counts_as_a_restart(tmp_path):
    job = Job([sys.executable, "-c", "import time; time.sleep(30)"], str(tmp_path),
              str(tmp_path / "logs"), launcher=False)  # fmt: skip
    try:
        job.start()
        pid = job.proc.pid
        job.first_seen[pid] = 10.0  # as if an earlier process of the job had this pid
        job.live = set()  # what start() does: the live set of the last look is forgotten
        job.workers()
        assert job.first_seen[pid] > 10.0
    finally:
        job.kill()
    assert not process_alive(pid)
