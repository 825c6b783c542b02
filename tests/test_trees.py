"""Histogram GBDT: binning, exact histogram aggregation, device-count invariance, accuracy."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gbdt
from jaxdml.batcher import GlobalBatcher
from jaxdml.data import load_dataset, make_classification
from jaxdml.mesh import data_sharded, make_mesh, replicated
from jaxdml.models.trees import GBDTModel, bin_features, quantile_bin_edges
from jaxdml.training.state import to_host
from jaxdml.training.trainer import Trainer
from jaxdml.training.tree_step import aggregated_histogram, make_tree_step
from tests.conftest import run_cli


def test_bins_are_quantiles_and_few_valued_features_get_a_bin_per_value():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(size=4000), rng.integers(0, 5, 4000)], axis=1).astype(np.float32)
    edges = quantile_bin_edges(x, num_bins=16)
    xb = bin_features(x, edges)
    assert xb.dtype == np.uint8 and xb.max() <= 15
    np.testing.assert_array_equal(np.bincount(xb[:, 0], minlength=16), np.full(16, 250))
    np.testing.assert_array_equal(edges[1, :4], [0.5, 1.5, 2.5, 3.5])
    assert np.all(np.isinf(edges[1, 4:]))
    np.testing.assert_array_equal(xb[:, 1], x[:, 1].astype(np.uint8))


@pytest.mark.parametrize("num_devices", [1, 2, 3, 4, 8])
def test_histograms_summed_over_devices_equal_the_single_device_histogram(num_devices):
    # 1001 rows: every D > 1 here pads; padding rows carry zero gradients.
    x, y = make_classification(1001, 6, 3, 2, seed=1)
    edges = quantile_bin_edges(x, 32)
    model = GBDTModel(6, 2, edges, num_trees=1, max_depth=3)
    rng = np.random.default_rng(num_devices)
    xb = bin_features(x, edges)
    pos = rng.integers(-1, 4, size=(1001, 1)).astype(np.int32)  # -1: a row left out
    gh = rng.integers(-1000, 1000, size=(1001, 1, 2)).astype(np.int32)
    want = model.histogram(jnp.asarray(xb), jnp.asarray(pos), jnp.asarray(gh), 4)

    mesh = make_mesh(jax.devices()[:num_devices])
    idx, w = GlobalBatcher(xb, y, None, seed=0).shard_layout(np.arange(1001), num_devices)
    sharded = [
        jax.device_put(a, data_sharded(mesh))
        for a in (xb[idx], pos[idx], gh[idx] * (w > 0)[:, None, None].astype(np.int32))
    ]
    got = jax.jit(aggregated_histogram(model, mesh, 4))(*sharded)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("packed", [False, True])
def test_histogram_sums_are_exact_integers_up_to_the_quantization_bound(packed):
    # Gradients and hessians of either sign, as large as `quantize` makes them: each sum
    # over rows fits an int32 (|sum| < 2^31), so the histogram must hold it exactly.
    rng = np.random.default_rng(3)
    n, f, bins, nodes = 4096, 3, 8, 2
    edges = np.tile(np.arange(bins - 1, dtype=np.float32), (f, 1))
    model = GBDTModel(f, 2, edges, num_trees=1, max_depth=2, packed_sums=packed)
    xb = rng.integers(0, bins, size=(n, f)).astype(np.uint8)
    pos = rng.integers(-1, nodes + 1, size=(n, 1)).astype(np.int32)  # -1, nodes: left out
    peak = 2**30 // n
    gh = rng.integers(-peak, peak + 1, size=(n, 1, 2)).astype(np.int32)
    # Half the rows in one node and bin with the largest g, the other half in another with
    # the most negative h: sums of +-2^29 there.
    xb[: n // 2, 0], pos[: n // 2], gh[: n // 2, 0, 0] = 0, 0, peak
    xb[n // 2 :, 1], pos[n // 2 :], gh[n // 2 :, 0, 1] = bins - 1, 1, -peak
    want = np.zeros((1, nodes, f, bins, 2), np.int64)
    for i in range(n):
        if 0 <= pos[i, 0] < nodes:
            for j in range(f):
                want[0, pos[i, 0], j, xb[i, j]] += gh[i, 0]
    got = model.histogram(jnp.asarray(xb), jnp.asarray(pos), jnp.asarray(gh), nodes)
    assert got.dtype == jnp.int32
    assert want.max() >= 2**29 and want.min() <= -(2**29)  # the test reaches large sums
    np.testing.assert_array_equal(np.asarray(got, np.int64), want)


def test_a_depth_one_tree_splits_where_the_labels_change():
    x = np.array([[0.0], [1.0], [2.0], [3.0]], np.float32)
    y = np.array([0, 0, 1, 1], np.int32)
    edges = quantile_bin_edges(x, 8)
    model = GBDTModel(1, 2, edges, num_trees=1, max_depth=1, learning_rate=1.0, l2=0.0,
                      min_child_weight=0.0)  # fmt: skip
    params, sums, _, _ = jax.jit(model.boost_round)(
        model.init(None), jnp.int32(0), bin_features(x, edges), y, np.ones(4, np.float32)
    )
    assert float(params["base"][0]) == 0.0  # balanced classes: log-odds 0
    assert float(params["threshold"][0, 0, 0]) == 1.5
    # p = 1/2 everywhere: g = -+1/2, h = 1/4 per row, leaf = -G/H = -+2.
    np.testing.assert_allclose(params["leaf"][0, 0], [-2.0, 2.0], rtol=1e-6)
    np.testing.assert_array_equal(model.predict(params, x), y)
    assert float(sums["weight"]) == 4.0


def _fit(config, workdir, num_devices, dataset=None):
    trainer = Trainer(config, str(workdir), devices=jax.devices()[:num_devices], dataset=dataset)
    return trainer, trainer.fit()


@pytest.mark.slow
def test_grown_trees_are_bitwise_identical_for_any_device_count(tmp_path):
    config = gbdt.get_config()
    config.model.num_trees = 8
    runs = {d: _fit(config, tmp_path / f"d{d}", d) for d in (1, 2, 3, 4)}  # 3: padded shards
    want = to_host(runs[1][0].state.params)
    for d in (2, 3, 4):
        got = to_host(runs[d][0].state.params)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name}, D={d}")
        assert runs[d][1]["params_sha256"] == runs[1][1]["params_sha256"]
    assert runs[1][1]["steps"] == 8
    assert np.count_nonzero(want["leaf"]) > 8 * 32  # the trees did grow

    # The model alone, on all rows at once (no devices, no padding), grows the same trees.
    trainer = runs[1][0]
    ds, model = trainer.dataset, trainer.model
    params = model.init(None)
    round_fn = jax.jit(model.boost_round)
    xb, w = model.encode(ds.x_train), np.ones(len(ds.y_train), np.float32)
    for t in range(8):
        params, *_ = round_fn(params, jnp.int32(t), xb, ds.y_train, w)
    for name in want:
        np.testing.assert_array_equal(np.asarray(params[name]), want[name], err_msg=name)


def test_raw_feature_prediction_equals_binned_traversal(tmp_path):
    config = gbdt.get_config("smoke")
    trainer, _ = _fit(config, tmp_path, 2)
    params, model, ds = to_host(trainer.state.params), trainer.model, trainer.dataset
    for x in (ds.x_train, ds.x_test):
        raw = jax.jit(model.margins)(params, x)
        binned = jax.jit(model.binned_margins)(params, model.encode(x), model.num_trees)
        np.testing.assert_array_equal(np.asarray(raw), np.asarray(binned))


def _sklearn_hgb_accuracy(config, ds) -> float:
    from sklearn.ensemble import HistGradientBoostingClassifier

    m = config.model
    clf = HistGradientBoostingClassifier(
        max_iter=m.num_trees,
        max_depth=m.max_depth,
        max_leaf_nodes=None,  # depth-wise to max_depth, as ours
        learning_rate=m.tree_learning_rate,
        max_bins=m.num_bins,
        l2_regularization=m.tree_l2,
        min_samples_leaf=1,  # ours has only the hessian bound (sklearn's is 1e-3)
        early_stopping=False,
    )
    return clf.fit(ds.x_train, ds.y_train).score(ds.x_test, ds.y_test)


@pytest.mark.slow
@pytest.mark.parametrize("variant,tolerance", [("", 0.005), ("digits", 0.01)])
def test_test_accuracy_matches_hist_gradient_boosting(tmp_path, variant, tolerance):
    config = gbdt.get_config(variant)
    ds = load_dataset(config.data)
    _, result = _fit(config, tmp_path, 4, dataset=ds)
    theirs = _sklearn_hgb_accuracy(config, ds)
    assert abs(result["test_accuracy"] - theirs) <= tolerance, (result["test_accuracy"], theirs)


@pytest.mark.slow
def test_multiclass_trees_are_identical_on_one_and_four_devices(tmp_path):
    config = gbdt.get_config("digits")
    config.model.num_trees = 3
    ds = load_dataset(config.data)
    (t1, r1), (t4, r4) = (_fit(config, tmp_path / f"d{d}", d, dataset=ds) for d in (1, 4))
    assert r1["params_sha256"] == r4["params_sha256"]
    assert to_host(t1.state.params)["leaf"].shape == (3, 10, 16)


def test_cli_trains_gbdt_one_step_per_tree(tmp_path):
    proc = run_cli("experiments.train", "--config=configs/gbdt.py:smoke", f"--workdir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["model"] == "gbdt" and result["steps"] == 5
    assert result["test_accuracy"] > 0.9
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["loss"] < rows[0]["loss"] and all(r["skipped"] == 0 for r in rows)


@pytest.mark.slow
def test_trees_continue_identically_from_a_host_copy_of_the_state_on_fewer_devices(tmp_path):
    # Nothing per-shard is carried between rounds: the TrainState alone, moved to another
    # device count halfway (as after a device loss), finishes with the same trees.
    from jaxdml.mesh import replicated

    config = gbdt.get_config("smoke")  # 5 rounds
    ds = load_dataset(config.data)
    whole, _ = _fit(config, tmp_path / "whole", 4, dataset=ds)
    first = Trainer(config, str(tmp_path / "a"), devices=jax.devices()[:4], dataset=ds)
    first.run_steps(2)
    second = Trainer(config, str(tmp_path / "b"), devices=jax.devices()[:3], dataset=ds)
    second.state = jax.device_put(to_host(first.state), replicated(second.mesh))
    second.run_steps(5)
    assert int(to_host(second.state.step)) == 5
    want, got = to_host(whole.state.params), to_host(second.state.params)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_every_tree_parameter_is_finite(tmp_path):
    # Non-splitting nodes have raw threshold 0 (their subtrees are constant), not inf, so
    # NaN/Inf guards, norms and checkpoint checks treat GBDT params like any other.
    trainer, _ = _fit(gbdt.get_config("smoke"), tmp_path, 2)
    params = to_host(trainer.state.params)
    assert all(np.all(np.isfinite(v)) for v in params.values())
    assert np.isfinite(sum(float(np.sum(np.square(v, dtype=np.float32))) for v in params.values()))
    assert np.any(params["threshold_bin"] == trainer.model.num_bins - 1)  # some nodes did not split


def test_a_corrupted_batch_skips_its_round(tmp_path):
    # faults.inject's 'nan' multiplies NaN into x: not bins any more. The round is skipped
    # (its slot stays empty) and later rounds go on, as a non-finite gradient step would.
    config = gbdt.get_config("smoke")
    config.faults = "nan@2"  # the batch of step 3
    trainer, result = _fit(config, tmp_path, 2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 0, 1, 0, 0]
    leaf = to_host(trainer.state.params)["leaf"]
    assert not leaf[2].any() and leaf[3].any() and result["test_accuracy"] > 0.9


def test_margins_kept_between_rounds_equal_the_recomputation_bitwise(tmp_path):
    # D=3 pads the shards with weight-0 copies of row 0: their margins stay finite and equal
    # to row 0's, and every kept margin is what the trees recompute, bit for bit.
    trainer, _ = _fit(gbdt.get_config("smoke"), tmp_path, 3)
    step, state, model = trainer.step_fn, trainer.state, trainer.model
    assert step.reused == 4  # rounds 2..5 continued from the kept margins
    batch, _ = trainer.batcher.next({"epoch": 0, "index": 0}, trainer.mesh)
    kept = np.asarray(step._kept.margins)
    xb = np.asarray(batch["x"])
    want = jax.jit(model.binned_margins)(to_host(state.params), xb, 5)
    np.testing.assert_array_equal(kept, np.asarray(want))
    padding = np.asarray(batch["w"]) == 0
    assert padding.any() and np.all(kept[padding] == kept[0])


def test_a_rebuilt_step_mid_training_grows_the_same_trees(tmp_path):
    # Rebuilding the step (as a restore or a device change does) drops the kept margins;
    # the next round recomputes them from the trees and the run ends bitwise the same.
    config = gbdt.get_config("smoke")
    ds = load_dataset(config.data)
    _, whole = _fit(config, tmp_path / "whole", 2, dataset=ds)
    trainer = Trainer(config, str(tmp_path / "rebuilt"), devices=jax.devices()[:2], dataset=ds)
    trainer.run_steps(2)
    trainer.set_devices(jax.devices()[:2])  # a new step object: nothing kept
    result = trainer.fit()
    assert trainer.step_fn.reused == 2  # round 3 recomputed, rounds 4 and 5 continued
    assert result["params_sha256"] == whole["params_sha256"]


def test_kept_margins_are_not_used_for_a_replaced_state(tmp_path):
    trainer = Trainer(gbdt.get_config("smoke"), str(tmp_path), devices=jax.devices()[:2])
    batch, _ = trainer.batcher.next({"epoch": 0, "index": 0}, trainer.mesh)
    step = make_tree_step(trainer.model, trainer.mesh, trainer.batcher.advance)
    s0 = trainer.state
    s1, _ = step(s0, batch)
    s2, _ = step(s1, batch)
    assert step.reused == 1
    # A rollback to s0 and a state equal to s1 but not s1 itself both recompute, and
    # give what continuing from them gave the first time.
    again1, _ = step(s0, batch)
    copy_of_s1 = jax.device_put(to_host(s1), replicated(trainer.mesh))
    again2, _ = step(copy_of_s1, batch)
    assert step.reused == 1
    for want, got in ((s1, again1), (s2, again2)):
        for name, leaf in to_host(want.params).items():
            np.testing.assert_array_equal(to_host(got.params)[name], leaf, err_msg=name)
    # Continuing from a state whose trees were changed in place of the kept one (as the
    # bitflip fault does) must not reuse margins computed from the old trees.
    flipped = again2.replace(params={**again2.params, "leaf": again2.params["leaf"] * 2.0})
    fresh = make_tree_step(trainer.model, trainer.mesh, trainer.batcher.advance)
    got, _ = step(flipped, batch)
    want, _ = fresh(flipped, batch)
    assert step.reused == 1
    for name, leaf in to_host(want.params).items():
        np.testing.assert_array_equal(to_host(got.params)[name], leaf, err_msg=name)


def test_trees_are_identical_when_devices_outnumber_features(tmp_path):
    # Each device scores a block of features; with 2 features on 3 or 4 devices some
    # devices hold only padding columns (repeats that never split). 3 classes: 3 trees
    # per round. 301 rows: the shards are padded too.
    from jaxdml.data import Dataset

    x, y = make_classification(401, 2, 2, 3, seed=3)
    ds = Dataset(x[:301], y[:301], x[301:], y[301:], num_classes=3, name="tiny")
    config = gbdt.get_config("smoke")
    config.model.max_depth = 3
    runs = {d: _fit(config, tmp_path / f"d{d}", d, dataset=ds) for d in (1, 3, 4)}
    shas = {d: result["params_sha256"] for d, (_, result) in runs.items()}
    assert len(set(shas.values())) == 1, shas
    params = to_host(runs[4][0].state.params)
    assert set(np.unique(params["feature"])) == {0, 1} and params["leaf"].any()


def test_a_fresh_run_compiles_its_round_in_the_warm_up_not_in_the_first_step(tmp_path):
    # The round compiles under the watchdog's allowance and counts as compilation (the
    # goodput record's "compile"), like the gradient steps; round 0 needs no margins
    # recomputation, so the loop lowers (hence compiles) nothing. Lowerings are counted,
    # not compilations: a persistent-cache hit compiles nothing but still lowers.
    from jax._src import dispatch, monitoring

    lowered = []

    def listen(event, seconds, **kwargs):
        del seconds, kwargs
        if event == dispatch.JAXPR_TO_MLIR_MODULE_EVENT:
            lowered.append(event)

    config = gbdt.get_config("smoke")
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:2])
    monitoring.register_event_duration_secs_listener(listen)
    try:
        trainer._warm_up()
        warm = len(lowered)
        trainer.run_steps(3)
        jax.block_until_ready(trainer.state)
    finally:
        monitoring.unregister_event_duration_listener(listen)
    assert warm >= 2  # the round and the skip step (the fingerprints may be cached)
    assert len(lowered) == warm and trainer.step_fn.reused == 2
    trainer.close()
