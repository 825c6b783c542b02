"""Histogram gradient-boosted trees on the seed data set, data-parallel over 4 devices.

One training step is one boosting round (one tree; one per class for multiclass), so
the run has model.num_trees steps and train.num_steps is not used. Every step sees
the whole training set (full batch), binned once on the host into model.num_bins
quantile bins of the whole training set.

  python -m experiments.train --config=configs/gbdt.py --workdir=runs/gbdt
  python -m experiments.train --config=configs/gbdt.py:smoke --workdir=/tmp/gbdt
  python -m experiments.train --config=configs/gbdt.py:digits --workdir=runs/gbdt-digits
"""

from jaxdml.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.seed = 0  # trees are deterministic; kept for the common schema
    c.num_cpu_devices = 4  # simulated devices
    c.data.source = "sklearn"  # the seed data set: scikit-learn's make_classification
    c.data.name = "make_classification"  # 10000 x 20, 2 classes
    c.data.n_samples = 10_000  # rows before the split
    c.data.n_features = 20  # columns
    c.data.n_classes = 2  # binary logistic objective: one tree per round
    c.data.random_state = 42  # generator seed, as in the seed example
    c.data.test_size = 0.2  # 2000 held-out rows
    c.data.split_seed = 42  # split seed, as in the seed example
    c.model.name = "gbdt"  # jaxdml.models.trees.GBDTModel
    c.model.num_trees = 50  # boosting rounds = training steps
    c.model.max_depth = 6  # depth-wise growth, 64 leaves per tree
    c.model.num_bins = 255  # quantile bins per feature (uint8 bins; scikit-learn's max)
    c.model.tree_learning_rate = 0.1  # shrinkage of every leaf value
    c.model.min_child_weight = 1e-3  # hessian sum per child (scikit-learn's min_hessian_to_split)
    c.model.gamma = 0.0  # minimum split gain
    c.model.tree_l2 = 1.0  # L2 on leaf values (scikit-learn's l2_regularization)
    c.train.mode = "full_batch"  # a round sees every training row, sharded over the devices
    c.train.log_every = 10  # progress logging period (rounds)
    if arg == "digits":
        c.data.name = "digits"  # 1797 8x8 images, 10 classes: softmax, 10 trees per round
        c.model.max_depth = 4  # 16 leaves per tree
    elif arg == "smoke":
        c.model.num_trees = 5  # a few rounds for tests
    return c
