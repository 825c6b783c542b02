"""Full-batch GD and SGD: device-count invariance, determinism, accuracy vs scikit-learn."""

import jax
import numpy as np
import pytest

from configs import digits_logreg, seed_logreg, sgd_logreg
from jaxdml.training.state import to_host
from jaxdml.training.trainer import Trainer


def _fit(config, workdir, num_devices):
    trainer = Trainer(config, str(workdir), devices=jax.devices()[:num_devices])
    result = trainer.fit()
    return result, to_host(trainer.state.params)


def test_full_batch_gd_is_device_count_invariant_and_deterministic(tmp_path):
    config = seed_logreg.get_config()
    config.train.num_steps = 100
    results = {}
    for d in (1, 4, 8):
        results[d] = _fit(config, tmp_path / f"d{d}", d)
    for d in (4, 8):
        leaves = zip(jax.tree.leaves(results[d][1]), jax.tree.leaves(results[1][1]), strict=True)
        for a, b in leaves:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    again, _ = _fit(config, tmp_path / "d4-again", 4)
    assert again["params_sha256"] == results[4][0]["params_sha256"]
    assert again["steps"] == 100


def test_sgd_is_device_count_invariant(tmp_path):
    config = sgd_logreg.get_config()
    config.train.num_steps = 80  # crosses an epoch boundary (8000 / 256 = 31.25 steps)
    r1 = _fit(config, tmp_path / "d1", 1)[1]
    r3 = _fit(config, tmp_path / "d3", 3)[1]
    for a, b in zip(jax.tree.leaves(r1), jax.tree.leaves(r3), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _sklearn_accuracy(trainer: Trainer, C: float = 1.0) -> float:
    from sklearn.linear_model import LogisticRegression

    ds = trainer.dataset
    clf = LogisticRegression(C=C, max_iter=5000).fit(ds.x_train, ds.y_train)
    return clf.score(ds.x_test, ds.y_test)


@pytest.mark.parametrize(
    "config_module,tolerance",
    [(seed_logreg, 0.01), (sgd_logreg, 0.015), (digits_logreg, 0.02)],
    ids=["seed-gd", "seed-sgd", "digits-multinomial"],
)
def test_test_accuracy_matches_scikit_learn(tmp_path, config_module, tolerance):
    config = config_module.get_config()
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:4])
    result = trainer.fit()
    baseline = _sklearn_accuracy(trainer)
    assert result["test_accuracy"] >= baseline - tolerance, (result["test_accuracy"], baseline)


def test_result_json_records_the_run(tmp_path):
    import json

    config = seed_logreg.get_config("smoke")
    Trainer(config, str(tmp_path), devices=jax.devices()[:4]).fit()
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == 30 and result["num_devices"] == 4
    assert len(result["params_sha256"]) == 64
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[-1]["loss"] < rows[0]["loss"]
