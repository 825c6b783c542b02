"""The installed `jaxdml` command and the config loader work outside the repository."""

import json
import os
import subprocess
import sys

import pytest

import jaxdml
from jaxdml.config import ConfigError
from tests.conftest import REPO

# What the console script `jaxdml` (pyproject [project.scripts]) runs.
ENTRY = "import sys; from jaxdml.commands import main; sys.argv[0] = 'jaxdml'; main()"


def test_the_command_trains_a_shipped_config_by_name_from_another_folder(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}  # the package, as an install provides it
    proc = subprocess.run(
        [sys.executable, "-c", ENTRY, "train", "--config=seed_logreg:smoke", "--workdir=run",
         "--config.train.log_every=1000"],  # fmt: skip
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["steps"] == 30 and result["test_accuracy"] > 0.8
    assert "test_accuracy" in proc.stdout


def test_load_config_by_name_or_path(tmp_path):
    assert jaxdml.load_config("mlp:smoke").train.num_steps == 30
    path = os.path.join(REPO, "configs", "seed_logreg.py")
    assert jaxdml.load_config(path).train.learning_rate == 0.5
    with pytest.raises(ConfigError, match="neither a file nor a shipped config"):
        jaxdml.load_config("no_such_config")
