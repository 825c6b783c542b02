"""Linear SVM on the seed data set by distributed full-batch (sub)gradient descent.

The objective is mean loss + l2/2 ||w||^2 (bias not regularized), which is
scikit-learn's LinearSVC objective C * sum(loss) + 1/2 ||w||^2 divided by C * n:
l2 = 1 / (C * n_train). Here C = 1 and n_train = 8000. The loss is LinearSVC's
default, the squared hinge (smooth, so the result is device-count invariant to
float rounding); --config.model.svm_loss=hinge gives the classic hinge, whose
subgradient is discontinuous at margin 1 (see tests/test_svm.py).

  python -m experiments.train --config=configs/svm.py --workdir=runs/svm
  python -m experiments.train --config=configs/svm.py:smoke --workdir=/tmp/svm
  python -m experiments.train --config=configs/svm.py:pegasos --workdir=runs/pegasos

Variants: "smoke" (few steps, for tests), "pegasos" (minibatch Pegasos steps with
eta_t = 1 / (l2 * t); Pegasos needs a larger l2 to converge in few steps, so it
optimizes a different, more regularized objective than the default).
"""

from jaxdml.config import default_config

C = 1.0  # LinearSVC's C; l2 below is 1 / (C * n_train)
N_TRAIN = 8000  # training rows of the seed data set (10000 rows, test_size 0.2)


def get_config(arg: str = ""):
    c = default_config()
    c.seed = 0  # parameter init is zero; seeds the minibatch order of the pegasos variant
    c.num_cpu_devices = 4  # simulated devices
    c.data.source = "sklearn"  # the seed data set: scikit-learn's make_classification
    c.data.name = "make_classification"  # 10000 x 20, 2 classes
    c.data.n_samples = 10_000  # rows before the split
    c.data.n_features = 20  # columns
    c.data.n_classes = 2  # binary: one output, labels mapped to -1/+1 in the loss
    c.data.random_state = 42  # generator seed, as in the seed example
    c.data.test_size = 0.2  # 2000 held-out rows
    c.data.split_seed = 42  # split seed, as in the seed example
    c.model.name = "svm"  # linear SVM (jaxdml.models.linear.LinearModel)
    c.model.svm_loss = "squared_hinge"  # squared_hinge | hinge (LinearSVC's loss=)
    c.model.l2 = 1.0 / (C * N_TRAIN)  # matches LinearSVC(C=1) on 8000 training rows
    c.train.mode = "full_batch"  # every step sees all 8000 rows, sharded over the devices
    c.train.optimizer = "momentum"  # heavy-ball (sub)gradient descent
    c.train.learning_rate = 0.05  # step size of the momentum optimizer
    c.train.momentum = 0.9  # heavy-ball coefficient
    c.train.num_steps = 500  # reaches LinearSVC's objective value to about 1e-7
    c.train.log_every = 100  # progress logging period
    if arg == "pegasos":
        c.model.svm_loss = "hinge"  # Pegasos is a hinge-loss subgradient method
        c.model.l2 = 1e-2  # Pegasos' lambda; its step size is 1 / (lambda * t)
        c.train.mode = "minibatch"  # stochastic subgradient steps
        c.train.batch_size = 256  # global batch, split across the devices
        c.train.optimizer = "pegasos"  # eta_t = 1 / (l2 * t); learning_rate is unused
        c.train.num_steps = 2000  # 64 epochs of 8000 rows
    elif arg == "smoke":
        c.train.num_steps = 30  # a few steps for tests
    return c
