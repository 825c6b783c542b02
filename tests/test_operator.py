"""What an operator sees: the progress bar, the log and warning lines, --help, --dry_run."""

import io
import logging
import os
import pty
import subprocess
import sys

import jax

from configs import seed_logreg
from jaxdml.training.progress import Progress
from jaxdml.training.trainer import Trainer
from tests.conftest import REPO, run_cli


def _rows(first: int, last: int, t0: float = 100.0, dt: float = 0.01) -> list[dict]:
    return [{"step": s, "loss": 0.5, "time": t0 + s * dt} for s in range(first, last + 1)]


def test_progress_bar_draws_on_a_forced_stream_and_not_on_a_plain_one():
    forced, plain = io.StringIO(), io.StringIO()
    for stream, force in ((forced, True), (plain, False)):
        progress = Progress(30, 10, stream=stream, force=force)
        progress.begin(0)
        progress.on_metrics(_rows(1, 10, t0=90.0))  # step 1 finished late: compilation
        progress.on_metrics(_rows(11, 30))
        progress.close()
    assert "30/30" in forced.getvalue() and "100%|" in forced.getvalue()
    assert forced.getvalue().count("step 20/30  loss 0.50000") == 1
    assert plain.getvalue() == ""  # not a terminal: no bar (log lines go to absl)


def test_rate_and_eta_leave_out_the_compiling_first_step():
    progress = Progress(100, 10, stream=io.StringIO(), force=True)
    progress.begin(0)
    rows = _rows(1, 20)  # step 1 finishes whenever compilation is done; then 0.01 s each
    progress.on_metrics(rows)
    assert abs(progress.bar.steady_rate - 100.0) < 1e-6  # from step 1's finish on, not 0
    assert "100.0 steps/s" in progress.line(rows[-1], 100.0)
    assert progress.bar.format_dict["rate"] == progress.bar.steady_rate
    progress.close()


def test_one_log_line_per_period_with_test_accuracy_and_warnings(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    config = seed_logreg.get_config()
    config.train.num_steps = 60
    config.train.log_every = 20
    config.train.eval_every = 40
    config.faults = "nan@10,device_loss@30:3"
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:4])
    trainer.fit()
    lines = [f"{r.levelname[0]} {r.getMessage()}" for r in caplog.records]
    period = [x for x in lines if "/60  loss" in x]
    assert [x.split("step ")[1].split("/")[0] for x in period] == ["20", "40", "60"]
    assert "test_accuracy" in period[1] and "test_accuracy" not in period[0]
    warnings = [x for x in lines if x.startswith("W")]
    assert len([w for w in warnings if "non-finite update skipped" in w]) == 1
    assert len([w for w in warnings if "device_loss" in w]) == 1
    assert not any("recovering from" in x for x in lines)


def test_cli_shows_a_bar_on_a_terminal_and_no_backend_probe_noise(tmp_path):
    leader, follower = pty.openpty()
    command = [sys.executable, "-m", "experiments.train", "--config=configs/seed_logreg.py:smoke"]
    proc = subprocess.Popen(
        [*command, f"--workdir={tmp_path}", "--config.train.log_every=10"],
        cwd=REPO,
        stdout=follower,
        stderr=follower,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=120) == 0
    os.close(leader)
    text = out.decode(errors="replace")
    assert "30/30 [" in text and "step/s" in text  # the bar, with its rate and ETA
    assert "Unable to initialize backend" not in text
    assert text.count("step 10/30  loss") == 1


def test_help_lists_every_shipped_config_with_its_variants_and_the_schema():
    proc = run_cli("experiments.train", "--help", timeout=120)
    assert proc.returncode in (0, 1)  # absl's --help exits 1 after printing
    out = proc.stdout + proc.stderr
    for line in ("configs/svm.py :pegasos :smoke", "configs/gbdt.py :digits :smoke",
                 "configs/mlp.py :smoke", "configs/seed_logreg.py :smoke"):  # fmt: skip
        assert line in out
    assert "jaxdml/config.py" in out and "--dry_run" in out


def test_dry_run_prints_the_resolved_config_and_a_bad_one_exits_2(tmp_path):
    base = ["experiments.train", "--config=configs/svm.py:pegasos", "--dry_run"]
    proc = run_cli(*base, "--config.train.num_steps=7", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "num_steps: 7" in proc.stdout and "optimizer: pegasos" in proc.stdout
    bad = run_cli(*base, "--config.train.num_steps=0", timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: config.train.num_steps")
    assert not list(tmp_path.iterdir())  # nothing was written anywhere we gave it
