"""The worked example behind jaxdml: logistic regression by distributed full-batch GD.

make_classification(n_samples=10000, n_features=20, n_classes=2, random_state=42),
an 80/20 split with random_state=42, 4 simulated devices, theta <- theta - eta * grad.

  python -m experiments.train --config=configs/seed_logreg.py --workdir=runs/seed
  python -m experiments.train --config=configs/seed_logreg.py:smoke --workdir=/tmp/s
"""

from jaxdml.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.seed = 0
    c.num_cpu_devices = 4  # 4 simulated devices, as in the worked example
    c.data.source = "sklearn"  # scikit-learn's make_classification, as in the example
    c.data.name = "make_classification"
    c.data.n_samples = 10_000
    c.data.n_features = 20
    c.data.n_classes = 2
    c.data.random_state = 42
    c.data.test_size = 0.2
    c.data.split_seed = 42
    c.model.name = "logreg"
    c.model.l2 = 0.0  # the example is unregularized
    c.train.mode = "full_batch"
    c.train.optimizer = "sgd"  # plain gradient descent on the full batch
    c.train.learning_rate = 0.5
    c.train.num_steps = 300
    c.train.log_every = 50
    # A step takes ~0.45 ms: 4 calls in flight (default 2) hide more of the host's own work
    # between steps (fault-free goodput run, 60000 steps: 31.0-31.5 s at depth 2, 27.8-28.8 s
    # at 4); the CPU rendezvous deadlock began between depth 32 and 64 (docs/architecture.md)
    c.train.dispatch_depth = 4
    if arg == "smoke":
        c.train.num_steps = 30
    return c
