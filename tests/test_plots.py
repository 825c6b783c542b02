"""Run plots: loss/accuracy curves with every event of events.jsonl marked."""

import json
import subprocess
import sys

import jax
import pytest

from configs import seed_logreg
from jaxdml import plots
from jaxdml.training.trainer import Trainer
from tests.conftest import REPO

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("faulty")
    config = seed_logreg.get_config()
    config.train.num_steps = 120
    config.train.log_every = 1000
    config.train.eval_every = 20
    config.checkpoint.every_steps = 20
    config.supervisor.fingerprint_every = 10
    config.faults = "nan@30,device_loss@50:3,bitflip@80:1"
    Trainer(config, str(workdir), devices=jax.devices()[:4]).fit()
    return workdir


def test_plot_run_writes_a_png_with_every_event_marked_and_labelled(faulty_run, tmp_path):
    out = tmp_path / "sub" / "run.png"
    fig = plots.plot_run(str(faulty_run), out=str(out))
    assert out.read_bytes()[:8] == PNG_SIGNATURE and out.stat().st_size > 10_000
    events = [json.loads(x) for x in (faulty_run / "events.jsonl").read_text().splitlines()]
    loss_ax = fig.axes[0]
    marked = sorted({int(line.get_xdata()[0]) for line in loss_ax.lines[1:]})
    assert marked == sorted({e["step"] for e in events})  # a line at every event's step
    labels = [t.get_text() for t in loss_ax.texts]
    seconds = {e["kind"]: e["seconds_lost"] for e in events if "seconds_lost" in e}
    assert labels[0] == f"nan {seconds['nan']:.2f} s (injected)"  # nan@30 and its detection
    assert f"device_loss {seconds['device_loss']:.2f} s (injected)" in labels
    assert "injected bitflip" in labels  # the flip, then its detection at the next check
    assert any(label.startswith(f"sdc {seconds['sdc']:.2f} s") for label in labels)


def test_nearby_events_share_one_label_with_counts():
    events = [
        {"kind": "fault_injected", "fault_kind": "nan", "step": 10},
        {"kind": "nan", "step": 11, "seconds_lost": 0.25},
        {"kind": "nan", "step": 12, "seconds_lost": 0.5},
        {"kind": "rollback", "step": 12, "seconds_lost": 1.0},
        {"kind": "resumed", "step": 400},
    ]
    clusters = plots._clusters(events, gap=5)
    assert [len(c) for c in clusters] == [4, 1]
    assert plots.cluster_label(clusters[0]) == "nan x2 0.75 s (injected) / rollback 1.00 s"
    assert plots.cluster_label(clusters[1]) == "resumed"


def test_accuracy_panel_shows_the_evaluations(faulty_run):
    fig = plots.plot_run(str(faulty_run))
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend[:3] == ["batch accuracy", "train accuracy", "test accuracy"]
    test_line = next(line for line in fig.axes[1].lines if line.get_label() == "test accuracy")
    assert list(test_line.get_xdata()) == list(range(20, 121, 20))
    assert min(test_line.get_ydata()) > 0.85


def test_plot_run_script_writes_the_png(faulty_run, tmp_path):
    out = tmp_path / "cli.png"
    proc = subprocess.run(
        [sys.executable, "scripts/plot_run.py", str(faulty_run), f"--out={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_missing_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"jaxdml\[plots\]"):
        plots.plot_run(str(tmp_path))
