"""The seed data set trained by distributed minibatch SGD.

python -m experiments.train --config=configs/sgd_logreg.py --workdir=runs/sgd
"""

from jaxdml.configs import seed_logreg


def get_config(arg: str = ""):
    c = seed_logreg.get_config()
    c.train.mode = "minibatch"
    c.train.batch_size = 256  # global batch, split across the 4 devices
    c.train.optimizer = "sgd"
    c.train.learning_rate = 0.1
    c.train.num_steps = 1000  # about 32 epochs of 8000 rows
    c.train.log_every = 100
    if arg == "smoke":
        c.train.num_steps = 60
    return c
