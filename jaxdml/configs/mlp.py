"""A Flax MLP classifier on scikit-learn's bundled digits, by distributed full-batch momentum GD.

python -m experiments.train --config=configs/mlp.py --workdir=runs/mlp
python -m experiments.train --config=configs/mlp.py:smoke --workdir=/tmp/mlp
"""

from jaxdml.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.seed = 0  # seeds the parameter init (the only randomness: no dropout)
    c.num_cpu_devices = 4  # simulated devices
    c.data.source = "sklearn"  # scikit-learn's bundled data sets
    c.data.name = "digits"  # 1797 8x8 images, 10 classes
    c.data.test_size = 0.2  # 360 held-out images
    c.data.split_seed = 42  # split seed
    c.data.standardize = True  # z-score pixels with the training split's mean/std
    c.model.name = "mlp"  # jaxdml.models.mlp.MLP wrapped in FlaxModel
    c.model.hidden_sizes = (64,)  # one hidden ReLU layer of 64 units
    c.model.l2 = 1e-4  # on the weight matrices (not the biases)
    c.train.mode = "full_batch"  # every step sees all 1437 training images
    # Heavy-ball GD, not Adam: near convergence Adam divides tiny, rounding-dominated
    # gradients by their own scale, so D = 1 and D = 4 drifted apart (1.7e-4 relative
    # after 300 steps, measured) while momentum contracts such differences (1e-5).
    c.train.optimizer = "momentum"
    c.train.learning_rate = 0.3  # step size
    c.train.momentum = 0.9  # heavy-ball coefficient
    c.train.num_steps = 300  # training loss about 0.012 by then
    c.train.log_every = 100  # progress logging period
    if arg == "smoke":
        c.train.num_steps = 30  # a few steps for tests
    return c
