"""A realistic workload for the whole stack: a 17M-parameter Flax MLP (two hidden layers
of 4096, dropout) on digits, by minibatch AdamW with warmup + cosine and clipping. Its
train state (params + Adam's two moments) is about 205 MB, so checkpoint cost, restore
time and recovery are measured on a state of a real model's size.

python -m experiments.train --config=configs/wide_mlp.py --workdir=runs/wide
python -m experiments.train --config=configs/wide_mlp.py:smoke --workdir=/tmp/wide
"""

from jaxdml.config import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.seed = 0  # seeds the init and the dropout keys
    c.num_cpu_devices = 4  # simulated devices
    c.data.source = "sklearn"  # scikit-learn's bundled data sets
    c.data.name = "digits"  # 1797 8x8 images, 10 classes
    c.data.test_size = 0.2  # 360 held-out images
    c.data.split_seed = 42  # split seed
    c.data.standardize = True  # z-score pixels with the training split's mean/std
    c.model.name = "mlp"  # jaxdml.models.mlp.MLP wrapped in FlaxModel
    c.model.hidden_sizes = (4096, 4096)  # 64*4096 + 4096*4096 + 4096*10 weights: 17.1M
    c.model.dropout = 0.1  # after each hidden layer, keys per global sample
    c.model.l2 = 0.0  # AdamW's decoupled decay instead
    c.train.mode = "minibatch"  # 128 images a step
    c.train.batch_size = 128  # global batch (32 per device)
    c.train.optimizer = "adamw"  # Adam with decoupled weight decay
    c.train.learning_rate = 1e-3  # peak rate
    c.train.weight_decay = 1e-4  # decoupled decay
    c.train.lr_schedule = "warmup_cosine"  # linear warmup, then cosine to end_learning_rate
    c.train.warmup_steps = 20  # warmup steps
    c.train.end_learning_rate = 1e-5  # the rate at the end
    c.train.clip_global_norm = 1.0  # gradient clipped to this global norm
    c.train.num_steps = 300  # about 27 epochs of 1437 images
    c.train.log_every = 50  # progress logging period
    c.checkpoint.every_steps = 100  # persistent (Orbax) saves
    # Memory tier: at most 3 steps redone on a restart or rollback. Measured fault-free (40
    # steps, 2 interleaved repeats): 0.61 steps/s saving every 3 steps, 0.60 every 10.
    c.checkpoint.local_every_steps = 3
    c.checkpoint.local_every_secs = 0.0  # (steps, not seconds: a restart redoes <= 3)
    if arg == "smoke":
        c.train.num_steps = 20  # a few steps for tests
        c.train.warmup_steps = 5  # below the cosine's length
    return c
