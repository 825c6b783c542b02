"""Trains the shipped logistic-regression configs and prints test accuracy vs scikit-learn.

python scripts/accuracy_table.py            # markdown table on stdout
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import time

import jax

jax.config.update("jax_num_cpu_devices", 4)

sys.path.insert(0, ".")

from jaxdml.training.trainer import Trainer  # noqa: E402

CONFIGS = ["seed_logreg", "sgd_logreg", "digits_logreg"]


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    header = ["config", "devices", "steps", "jaxdml test acc", "sklearn test acc", "gap (points)"]
    print("| " + " | ".join([*header, "time (s)"]) + " |")
    print("|---|---|---|---|---|---|---|")
    for name in CONFIGS:
        config = importlib.import_module(f"configs.{name}").get_config()
        with tempfile.TemporaryDirectory() as workdir:
            trainer = Trainer(config, workdir)
            t0 = time.perf_counter()
            result = trainer.fit()
            elapsed = time.perf_counter() - t0
        ds = trainer.dataset
        base = LogisticRegression(max_iter=5000).fit(ds.x_train, ds.y_train)
        sk = base.score(ds.x_test, ds.y_test)
        ours = result["test_accuracy"]
        print(
            f"| {name} | {result['num_devices']} | {result['steps']} | {ours:.4f} | {sk:.4f} "
            f"| {100 * (ours - sk):+.2f} | {elapsed:.2f} |"
        )


if __name__ == "__main__":
    main()
