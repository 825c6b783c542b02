"""train.steps_per_call: several steps in one XLA call train exactly as one step per call,
and every hook still sees the steps it acts on (saves, checks, evaluations, faults)."""

import jax
import numpy as np
import pytest

from configs import gbdt, seed_logreg, sgd_logreg
from jaxdml.config import ConfigError
from jaxdml.metrics import read_jsonl
from jaxdml.training.hooks import UNLIMITED, BeforeStep, Hook, Periodic
from jaxdml.training.loop import Loop
from jaxdml.training.trainer import Trainer

STEPS = 60


class Seen(Hook):
    """The steps after_step saw (one per call)."""

    def __init__(self):
        self.steps = []

    def after_step(self, info):
        self.steps.append(info.step)
        return False


def train(config_module, workdir, steps_per_call, faults=""):
    config = config_module.get_config()
    config.train.num_steps = STEPS
    config.train.steps_per_call = steps_per_call
    config.train.eval_every = 20
    config.checkpoint.every_steps = 25
    config.supervisor.fingerprint_every = 10
    config.faults = faults
    seen = Seen()
    trainer = Trainer(config, str(workdir), devices=jax.devices()[:4], hooks=[seen])
    trainer.fit()
    params = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trainer.state.params))]
    rows = [r for r in read_jsonl(str(workdir / "metrics.jsonl")) if "loss" in r]
    return params, rows, seen.steps, trainer


def seed_trainer(workdir, steps, steps_per_call):
    config = seed_logreg.get_config()
    config.train.num_steps = steps
    config.train.steps_per_call = steps_per_call
    return Trainer(config, str(workdir), devices=jax.devices()[:4])


@pytest.mark.parametrize("config_module", [seed_logreg, sgd_logreg], ids=["full", "minibatch"])
def test_fused_calls_train_bitwise_like_one_step_per_call(tmp_path, config_module):
    params1, rows1, seen1, _ = train(config_module, tmp_path / "one", 1)
    params7, rows7, seen7, trainer = train(config_module, tmp_path / "seven", 7)

    assert all(np.array_equal(a, b) for a, b in zip(params1, params7, strict=True))
    assert [r["step"] for r in rows7] == list(range(1, STEPS + 1))  # every step once
    for key in ("loss", "batch_accuracy", "samples", "epoch"):
        assert [r[key] for r in rows7] == [r[key] for r in rows1], key
    # The norms are reported, not trained on: XLA may order their sums differently inside
    # the fused program's loop (seen: the last bit of one step's gradient norm).
    for key in ("grad_norm", "param_norm"):
        assert [r[key] for r in rows7] == pytest.approx([r[key] for r in rows1], rel=1e-6)
    # evaluations land on their steps, with the same scores
    evals = lambda rows: {r["step"]: r["test_accuracy"] for r in rows if "test_accuracy" in r}  # noqa: E731
    assert evals(rows7) == evals(rows1) and set(evals(rows7)) >= {20, 40}
    # Calls of up to 7 steps that end at every save (25, 50) and replica check (10, 20, ..).
    assert seen1 == list(range(1, STEPS + 1))
    assert len(seen7) < STEPS // 3
    assert {10, 20, 25, 30, 40, 50, 60} <= set(seen7)
    assert max(b - a for a, b in zip([0, *seen7], seen7, strict=False)) == 7
    assert set(trainer.tiers.persistent.steps()) >= {25, 50}


def test_an_injected_fault_fires_alone_at_its_step_in_a_fused_run(tmp_path):
    # A NaN batch at step 13: the step runs alone, is skipped, and training goes on.
    params1, rows1, _, _ = train(seed_logreg, tmp_path / "one", 1, faults="nan@12")
    params7, rows7, seen7, _ = train(seed_logreg, tmp_path / "seven", 7, faults="nan@12")

    assert [r["step"] for r in rows7 if r["skipped"]] == [13]
    assert [r["step"] for r in rows1 if r["skipped"]] == [13]
    assert 12 in seen7 and 13 in seen7  # the call before it ends at 12; step 13 alone
    assert all(np.array_equal(a, b) for a, b in zip(params1, params7, strict=True))


def test_a_hook_that_acts_before_every_step_turns_fusing_off(tmp_path):
    trainer = seed_trainer(tmp_path, steps=20, steps_per_call=5)
    before = []

    def note(step, state, batch):
        before.append(step)
        return state, batch

    assert BeforeStep(note).max_fused(0) == 1  # may act at any step: sees every one
    assert BeforeStep(note, fusable=lambda step: 4).max_fused(0) == 4
    assert Hook().max_fused(3) == UNLIMITED
    assert Periodic(lambda s, st: None, every_steps=10).max_fused(7) == 3

    seen = Seen()
    loop = Loop(
        trainer.step_fn, trainer.batcher, trainer.mesh, 20, hooks=[BeforeStep(note), seen],
        fused_fn=trainer.fused_fn, steps_per_call=5,
    )  # fmt: skip
    loop.run(trainer.state)
    assert before == list(range(20)) and seen.steps == list(range(1, 21))

    seen = Seen()
    loop = Loop(
        trainer.step_fn, trainer.batcher, trainer.mesh, 20, hooks=[seen],
        fused_fn=trainer.fused_fn, steps_per_call=5,
    )  # fmt: skip
    loop.run(trainer.state)
    assert seen.steps == [5, 10, 15, 20]


def test_steps_per_call_is_refused_for_boosted_trees(tmp_path):
    config = gbdt.get_config()
    config.train.steps_per_call = 4
    with pytest.raises(ConfigError, match="steps_per_call"):
        Trainer(config, str(tmp_path), devices=jax.devices()[:4])


def test_fused_calls_stay_inside_multi_process_spans(tmp_path):
    """Spans of 10 steps (a live_devices transaction each) with up to 4 steps per call:
    calls of 4, 4 and 2 steps, and a failed span drops its rows as with one step per call."""
    import contextlib

    class PeerDied(RuntimeError):
        pass

    @contextlib.contextmanager
    def transaction(end):
        yield
        if end == 40:
            raise PeerDied(end)

    trainer = seed_trainer(tmp_path, steps=100, steps_per_call=4)
    calls = []

    def fused(state, batches, k):
        calls.append(int(k))
        return trainer.fused_fn(state, batches, k)

    rows = Seen()
    rows.on_metrics = lambda got: rows.steps.extend(r["step"] for r in got)
    loop = Loop(
        trainer.step_fn, trainer.batcher, trainer.mesh, 100, hooks=[rows], fetch_every=25,
        transaction=transaction, span=10, fused_fn=fused, steps_per_call=4,
    )  # fmt: skip
    with pytest.raises(PeerDied):
        loop.run(trainer.state)
    assert calls == [4, 4, 2] * 4
    assert loop.last_good[0] == 30
    # The first span's rows at once, after_step once per committed span (10, 20, 30),
    # the rows of 11..30 when the loop fails; none of the failed span's.
    assert rows.steps == [*range(1, 11), 10, 20, 30, *range(11, 31)]
