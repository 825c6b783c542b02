"""Optimizers: the optax transformation a config asks for.

`build_optimizer` composes, in optax's own terms: a learning-rate schedule
(`train.lr_schedule`, with an optional linear warmup), global-norm clipping
(`train.clip_global_norm`) and the named optimizer. Every piece of its state (Adam's
moments, the schedule's step count, L-BFGS's memory) is the optax state, which lives in
`TrainState.opt_state` and is checkpointed and restored with the rest.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import optax

from jaxdml.models import is_boosted


def learning_rate(config: ml_collections.ConfigDict) -> optax.ScalarOrSchedule:
    """`train.learning_rate` shaped by `train.lr_schedule` (a float for a constant rate
    without warmup, else an optax schedule of the update count)."""
    t = config.train
    lr, warmup = t.learning_rate, t.warmup_steps
    if t.lr_schedule == "warmup_cosine":
        decay = t.decay_steps or max(t.num_steps, warmup + 1)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay, t.end_learning_rate)
    if t.lr_schedule == "exponential":
        after = optax.exponential_decay(lr, t.decay_steps, t.decay_rate)
    elif t.lr_schedule == "step":
        after = optax.exponential_decay(lr, t.decay_steps, t.decay_rate, staircase=True)
    else:
        after = optax.constant_schedule(lr) if warmup else lr
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def build_optimizer(config: ml_collections.ConfigDict, model: Any) -> optax.GradientTransformation:
    """The optax optimizer `config.train` describes (the identity for boosted models:
    their trees are grown by the boosting step, not by an optimizer)."""
    t = config.train
    if is_boosted(model):
        return optax.identity()
    if t.optimizer == "pegasos":  # eta_t = 1 / (lambda * t), t counted from 1
        lam = config.model.l2
        return optax.sgd(lambda count: 1.0 / (lam * (count + 1.0)))
    if t.optimizer == "lbfgs":
        # Its zoom line search evaluates the full-batch objective (the step passes it as
        # value_fn); the line search picks the step size, so no learning rate.
        return optax.lbfgs(memory_size=t.lbfgs_memory)
    lr = learning_rate(config)
    named = {
        "sgd": lambda: optax.sgd(lr),
        "momentum": lambda: optax.sgd(lr, momentum=t.momentum),
        "nesterov": lambda: optax.sgd(lr, momentum=t.momentum, nesterov=True),
        "adam": lambda: optax.adam(lr),
        "adamw": lambda: optax.adamw(lr, weight_decay=t.weight_decay),
    }
    opt = named[t.optimizer]()
    if t.clip_global_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(t.clip_global_norm), opt)
    return opt
