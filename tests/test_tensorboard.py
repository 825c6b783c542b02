"""TensorBoard: metric scalars, and events (faults, recoveries) mirrored as scalars and text."""

import glob
import json
import struct

import jax
import pytest

from configs import seed_logreg
from jaxdml.training.trainer import Trainer

pytest.importorskip("tensorboardX")


def read_event_files(logdir) -> list:
    """Every Event proto in logdir's event files (TFRecord: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(glob.glob(f"{logdir}/events.out.tfevents.*")):
        data = open(path, "rb").read()  # noqa: SIM115
        i = 0
        while i + 8 <= len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            if i + 12 + n + 4 > len(data):  # a record still being written
                break
            events.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + n]))
            i += 12 + n + 4
    return events


def scalars(events) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for e in events:
        for v in e.summary.value:
            if v.HasField("simple_value"):
                out.setdefault(v.tag, []).append((e.step, v.simple_value))
    return out


def test_tensorboard_gets_metrics_and_every_event(tmp_path):
    config = seed_logreg.get_config()
    config.train.num_steps = 60
    config.train.log_every = 1000
    config.train.tensorboard = True
    config.faults = "nan@20,device_loss@40:3"
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:4])
    trainer.fit()
    events = read_event_files(tmp_path / "tb")
    tags = scalars(events)
    assert [s for s, _ in tags["loss"]] == list(range(1, 61))
    assert tags["faults/nan"] == [(20, 1.0)]
    assert tags["faults/device_loss"] == [(40, 1.0)]
    assert [s for s, _ in tags["events/nan"]] == [21]
    [(step, seconds)] = tags["events/device_loss"]
    assert step == 40 and seconds > 0
    texts = [
        json.loads(v.tensor.string_val[0])
        for e in events
        for v in e.summary.value
        if v.tag.startswith("events") and v.tensor.string_val
    ]
    logged = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [t["kind"] for t in texts] == [e["kind"] for e in logged]


def shown_scalars(logdir) -> dict[str, list[int]]:
    """{tag: steps} as TensorBoard shows them: files in name order, and a restart
    (SessionLog START at step S, tensorboardX's purge_step) hides every earlier event
    at step S or later."""
    from tensorboardX.proto import event_pb2

    shown: dict[str, list[int]] = {}
    for e in read_event_files(logdir):
        if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START:
            shown = {tag: [s for s in steps if s < e.step] for tag, steps in shown.items()}
        for v in e.summary.value:
            if v.HasField("simple_value"):
                shown.setdefault(v.tag, []).append(e.step)
    return shown


def test_tensorboard_shows_each_step_once_after_a_sigkill_and_resume(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO, run_cli, wait_until

    args = [
        "experiments.train", "--config=configs/seed_logreg.py:smoke", f"--workdir={tmp_path}",
        "--config.train.num_steps=40", "--config.train.tensorboard=True",
        "--config.train.fetch_every=1", "--config.checkpoint.every_steps=10",
        "--config.checkpoint.local_every_secs=0", "--config.faults=hang@25",
    ]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    # The injected hang's event flushes TensorBoard (after its events.jsonl line): once
    # its scalar is on disk, so are the steps past the checkpoint.
    try:
        assert wait_until(lambda: "faults/hang" in shown_scalars(tmp_path / "tb"), 120)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    before = shown_scalars(tmp_path / "tb")["loss"]
    assert max(before) > 20  # steps 21.. will run again after the resume from step 20
    done = run_cli(*args, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 41))
    assert shown_scalars(tmp_path / "tb")["loss"] == rows
