"""The research API: jaxdml.train, jaxdml.Trainer step by step, jaxdml.faults.parse."""

import json

import jax
import pytest

import jaxdml
import jaxdml.faults
from configs import seed_logreg
from jaxdml.metrics import EventLog


def small_config(steps=60):
    config = seed_logreg.get_config()
    config.train.num_steps = steps
    config.train.log_every = 1000
    return config


def test_faults_parse_is_reexported():
    faults = jaxdml.faults.parse("nan@60-62,device_loss@100:1+3")
    assert [(f.kind, f.start, f.end, f.devices) for f in faults] == [
        ("nan", 60, 62, ()),
        ("device_loss", 100, 100, (1, 3)),
    ]
    with pytest.raises(jaxdml.faults.FaultPlanError, match="needs :device"):
        jaxdml.faults.parse("bitflip@5")


def test_trainer_step_by_step_then_fit_matches_one_fit(tmp_path):
    config = small_config()
    whole = jaxdml.Trainer(config, str(tmp_path / "whole"), devices=jax.devices()[:4]).fit()
    trainer = jaxdml.Trainer(config, str(tmp_path / "steps"), devices=jax.devices()[:4])
    row = trainer.run_steps(25)
    assert row["step"] == 25 and int(trainer.state.step) == 25
    early = trainer.evaluate()
    assert set(early) == {"train_accuracy", "test_accuracy"} and early["test_accuracy"] > 0.8
    assert trainer.run_steps(1000)["step"] == 60  # stops at num_steps
    result = trainer.fit()
    assert result["params_sha256"] == whole["params_sha256"]


def test_eval_every_evaluates_the_parameters_of_that_step(tmp_path):
    config = small_config(40)
    config.train.eval_every = 10
    trainer = jaxdml.Trainer(config, str(tmp_path), devices=jax.devices()[:4])
    result = trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if "test_accuracy" in r]
    assert [r["step"] for r in evaluated] == [10, 20, 30, 40]
    # Zero-initialized weights predict one class (about 0.5); step 10 is already trained.
    assert evaluated[0]["test_accuracy"] > 0.8
    assert evaluated[-1]["test_accuracy"] == result["test_accuracy"]


def test_train_with_faults_records_events_and_recovers(tmp_path):
    config = small_config(80)
    config.num_cpu_devices = 4
    config.checkpoint.every_steps = 20
    config.faults = "nan@30,device_loss@50:3"
    result = jaxdml.train(config, str(tmp_path))
    assert result["steps"] == 80 and result["num_devices"] == 3
    assert result["faults"] == {"nan": 1, "device_loss": 1}
    kinds = [e["kind"] for e in EventLog.read(str(tmp_path))]
    assert kinds.count("fault_injected") == 2 and "device_loss" in kinds
