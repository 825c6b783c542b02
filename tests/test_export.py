"""Eval-only runs, exported parameters and jaxdml.load, a rerun of a finished run, and the
default checkpoint schedule."""

import json

import jax
import numpy as np
import pytest

import jaxdml
from configs import gbdt, mlp, seed_logreg, svm
from jaxdml.config import ConfigError, default_config
from jaxdml.training.hooks import Periodic
from jaxdml.training.state import flat_params
from jaxdml.training.tiers import Tiers
from jaxdml.training.trainer import Trainer


def _fit(config, workdir):
    trainer = Trainer(config, str(workdir), devices=jax.devices()[:4])
    return trainer, trainer.fit()


@pytest.mark.parametrize(
    "config",
    [svm.get_config("smoke"), gbdt.get_config("smoke"), mlp.get_config("smoke")],
    ids=["linear-svm", "gbdt", "mlp"],  # logistic regression: the eval test below
)
def test_load_predicts_exactly_what_the_trained_model_predicts(tmp_path, config):
    trainer, _ = _fit(config, tmp_path)
    x = trainer.dataset.x_test
    want = np.asarray(trainer.model.predict(trainer.state.params, x))
    loaded = jaxdml.load(str(tmp_path))
    np.testing.assert_array_equal(loaded.predict(x), want)
    names = np.load(tmp_path / "params.npz").files
    assert not any("[" in k for k in names)  # "Dense_0/kernel", not "['Dense_0']['kernel']"
    assert config.model.name != "mlp" or "Dense_0/kernel" in names


def test_eval_mode_scores_the_newest_checkpoint_and_exports_it(tmp_path):
    config = seed_logreg.get_config("smoke")
    trainer, result = _fit(config, tmp_path)
    (tmp_path / "params.npz").unlink()
    out = jaxdml.evaluate(config, str(tmp_path))
    assert out["step"] == 30 and out["accuracy"] == result["test_accuracy"]
    assert out["loss"] > 0 and out["rows"] == len(trainer.dataset.y_test)
    assert json.loads((tmp_path / "eval.json").read_text()) == out
    with np.load(tmp_path / "params.npz") as npz:  # the export equals the trained params
        for name, value in flat_params(trainer.state.params).items():
            np.testing.assert_array_equal(npz[name], value)
    ds = trainer.dataset
    np.savez(tmp_path / "rows.npz", X=ds.x_test[:100], y=ds.y_test[:100])
    on_file = jaxdml.evaluate(config, str(tmp_path), str(tmp_path / "rows.npz"))
    assert on_file["rows"] == 100
    predicted = jaxdml.load(str(tmp_path)).predict(ds.x_test[:100])
    assert on_file["accuracy"] == pytest.approx(np.mean(predicted == ds.y_test[:100]))


def test_eval_mode_without_a_checkpoint_is_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        jaxdml.evaluate(seed_logreg.get_config("smoke"), str(tmp_path))


def test_rerun_of_a_finished_run_reports_its_loss_and_goodput(tmp_path):
    config = seed_logreg.get_config("smoke")
    _, first = _fit(config, tmp_path)
    _, again = _fit(config, tmp_path)
    assert again["already_finished"] and again["loss"] == first["loss"] is not None
    assert again["goodput"] == first["goodput"] > 0
    assert again["params_sha256"] == first["params_sha256"]


def test_persistent_checkpoints_are_time_based_by_default(tmp_path):
    config = default_config()
    assert config.checkpoint.every_secs == 300.0 and config.checkpoint.every_steps == 0
    saved, now = [], [0.0]
    tiers = Tiers(config, str(tmp_path), lambda *a, **k: None)
    hooks = tiers.hooks(lambda tier, step, state: saved.append((tier, step)), lambda kind: None)
    persistent = [h for h in hooks if isinstance(h, Periodic) and h.every_secs == 300.0]
    assert len(persistent) == 1
    persistent[0].clock = lambda: now[0]
    for step in range(1, 11):  # 100 s per step: due at steps 4, 7, 10 (300 s after the last)
        persistent[0].after_step(jaxdml.training.hooks.StepInfo(step, None))
        now[0] += 100.0
    assert saved == [("persistent", 4), ("persistent", 7), ("persistent", 10)]
    tiers.close()
