"""Multinomial (softmax) logistic regression on scikit-learn's bundled digits.

python -m experiments.train --config=configs/digits_logreg.py --workdir=runs/digits
"""

from jaxdml.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.num_cpu_devices = 4  # simulated devices
    c.data.source = "sklearn"
    c.data.name = "digits"  # 1797 8x8 images, 10 classes, bundled with scikit-learn
    c.data.test_size = 0.2
    c.data.split_seed = 42
    c.data.standardize = True  # pixel scales differ; z-score with the train split's stats
    c.model.name = "logreg"
    c.model.multiclass = "multinomial"
    c.model.l2 = 1e-3
    c.train.mode = "full_batch"
    c.train.optimizer = "sgd"
    c.train.learning_rate = 0.5
    c.train.num_steps = 500
    c.train.log_every = 100
    if arg == "smoke":
        c.train.num_steps = 50
    return c
