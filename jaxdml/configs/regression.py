"""Regression: a Flax MLP on a generated nonlinear problem, squared error, rmse and r2.

y = a smooth nonlinear function of 5 of 10 features plus noise (jaxdml.data.make_regression);
result.json reports train/test rmse and r2 and `baseline_rmse`, the mean predictor's.

  jaxdml train --config=regression --workdir=runs/regression
  jaxdml train --config=regression:smoke --workdir=/tmp/reg --config.model.loss=huber
"""

from jaxdml.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.num_cpu_devices = 4  # simulated where possible, else the devices JAX has
    c.data.source = "synthetic"  # jaxdml.data.make_regression
    c.data.task = "regression"  # float targets, one output, rmse / r2
    c.data.n_samples = 4000  # rows
    c.data.n_features = 10  # columns
    c.data.n_informative = 5  # columns y depends on
    c.data.standardize = True  # z-score the features (training split's statistics)
    c.model.name = "mlp"  # jaxdml.models.mlp.MLP with one output
    c.model.hidden_sizes = (64, 64)  # two hidden ReLU layers
    c.model.loss = "squared_error"  # or huber
    c.train.mode = "full_batch"  # every step sees all 3200 training rows
    c.train.optimizer = "adam"  # Adam with a warmup and a cosine decay
    c.train.learning_rate = 0.01  # peak rate
    c.train.lr_schedule = "warmup_cosine"
    c.train.warmup_steps = 20  # linear warmup
    c.train.num_steps = 400  # test r2 about 0.95 by then
    c.train.log_every = 100  # progress logging period
    if arg == "smoke":
        c.train.num_steps = 60  # a few steps for tests
    return c
