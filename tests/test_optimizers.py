"""Any optax optimizer, schedules and clipping from the config, L-BFGS on the full batch;
all optimizer state is in TrainState.opt_state and resumes exactly."""

import jax
import optax
import pytest

import jaxdml
from configs import seed_logreg
from jaxdml.config import ConfigError, validate
from jaxdml.training.trainer import Trainer


def _config(steps=40):
    config = seed_logreg.get_config()
    config.train.num_steps = steps
    config.train.log_every = 1000
    return config


def _chain():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.2, 5, 40, end_value=0.01)
    return optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(schedule, weight_decay=1e-3))


def test_an_optax_chain_killed_and_resumed_is_bitwise_identical(tmp_path):
    devices = jax.devices()[:4]
    whole = Trainer(_config(), str(tmp_path / "whole"), devices=devices, optimizer=_chain()).fit()
    first = Trainer(_config(), str(tmp_path / "run"), devices=devices, optimizer=_chain())
    first.run_steps(17)
    assert first.checkpoint_now() == 17
    first.close()  # the process "dies" here; a new Trainer resumes from step 17
    again = Trainer(_config(), str(tmp_path / "run"), devices=devices, optimizer=_chain())
    assert int(again.state.step) == 17
    # The schedule's count and Adam's moments came back with the params.
    counts = optax.tree_utils.tree_get_all_with_path(again.state.opt_state, "count")
    assert [int(c) for _, c in counts] == [17, 17]
    result = again.fit()
    assert result["params_sha256"] == whole["params_sha256"]
    assert whole["test_accuracy"] > 0.8


@pytest.mark.parametrize(
    "fields",
    [
        {"optimizer": "nesterov", "lr_schedule": "step", "decay_steps": 10, "decay_rate": 0.5},
        {
            "optimizer": "adamw",
            "lr_schedule": "warmup_cosine",
            "warmup_steps": 5,
            "clip_global_norm": 1.0,
            "weight_decay": 1e-2,
        },  # fmt: skip
        {
            "optimizer": "momentum",
            "lr_schedule": "exponential",
            "decay_steps": 20,
            "warmup_steps": 3,
        },  # fmt: skip
        {"optimizer": "lbfgs", "num_steps": 5},
    ],
    ids=lambda f: f["optimizer"],
)
def test_configured_optimizers_train(tmp_path, fields):  # lbfgs: ~40 s, mostly compiling
    config = _config(20)
    config.train.update(fields)
    result = jaxdml.train(config, str(tmp_path))
    assert result["steps"] == config.train.num_steps and result["test_accuracy"] > 0.8, result


def test_lbfgs_compiles_its_step_once(tmp_path):
    # optax.lbfgs's initial line-search state holds weakly typed Python scalars; the
    # step returns them strongly typed. The initial TrainState is strongly typed, so the
    # second step reuses the first one's compilation (it compiled again, 3 s at 200k rows).
    config = _config(5)
    config.train.optimizer = "lbfgs"
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:4])
    weak = [x for x in jax.tree.leaves(trainer.state) if jax.typeof(x).weak_type]
    assert not weak
    trainer.run_steps(1)
    compiled = trainer.step_fn._cache_size()
    trainer.run_steps(3)
    assert trainer.step_fn._cache_size() == compiled == 1
    trainer.close()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"lr_schedule": "cosine"}, "config.train.lr_schedule must be one of"),
        ({"lr_schedule": "step"}, "config.train.decay_steps must be >= 1"),
        ({"lr_schedule": "warmup_cosine", "warmup_steps": 40}, "warmup_steps (40) must be below"),
        ({"optimizer": "lbfgs", "mode": "minibatch"}, "needs config.train.mode='full_batch'"),
        ({"optimizer": "lbfgs", "clip_global_norm": 1.0}, "clip_global_norm must be 0"),
        ({"clip_global_norm": -1.0}, "config.train.clip_global_norm must be >= 0"),
    ],
)
def test_bad_optimizer_fields_are_one_line_errors(fields, message):
    config = _config()
    config.train.update(fields)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        validate(config)
    assert "\n" not in str(e.value)
