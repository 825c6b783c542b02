"""GBDT speed against scikit-learn's HistGradientBoostingClassifier, in one command.

On 200k x 20 synthetic rows (the 'synthetic-200k' data of scripts/bench_models.py),
depth 6, 255 bins, learning rate 0.1, ours on --devices simulated CPU devices:

  * per round: ours is the steady-state cost of a round (the fit after the first step,
    which compiles, divided by the remaining rounds); HGB's is (fit(T) - fit(1)) / (T - 1),
    so that neither side counts its set-up (HGB's binning, our compilation);
  * whole fit: from data in host memory to a trained model (binning and compilation
    included), ours / HGB at T trees, and where ours goes: set-up (the Trainer: bin
    edges, binning, data on the devices), the first round (its compilation), the rest;
  * linearity: the log-log slope of ours vs the number of trees (--trees, default
    50 100 200 400), for the whole fit and for the rounds after the first;
  * identity: params_sha256 of the same fit on D = 1 .. --devices devices.

Every repeat runs ours and HGB back to back (interleaved, so that load from other
processes falls on both alike); the numbers are medians over --repeats. HGB's OpenMP
threads wait actively: on a machine loaded by other processes HGB slows down far more
than ours (measured 5-70x), so compare numbers taken at a low load average (printed),
or pass --hgb-threads 1 (HGB single-threaded: its CPU time without the waiting).

  PYTHONPATH=$PWD python scripts/bench_gbdt.py                # 5 repeats
  PYTHONPATH=$PWD python scripts/bench_gbdt.py --repeats 1 --trees 50 100   # quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np

DATA = {  # jaxdml.data.make_classification: 250k rows, 200k for training
    "source": "synthetic",
    "n_samples": 250_000,
    "n_features": 20,
    "n_informative": 2,
    "n_classes": 2,
    "test_size": 0.2,
    "standardize": True,
}


def _config(num_trees: int):
    from configs import gbdt

    config = gbdt.get_config()
    for key, value in DATA.items():
        config.data[key] = value
    config.model.num_trees = num_trees
    config.train.log_every = 10**9
    return config


def ours(dataset, num_trees: int, num_devices: int) -> dict:
    """Whole-fit and per-round seconds of jaxdml's GBDT, and its params_sha256."""
    from jaxdml.training.state import params_sha256
    from jaxdml.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        trainer = Trainer(
            _config(num_trees), workdir, devices=jax.devices()[:num_devices], dataset=dataset
        )
        built = time.perf_counter()
        trainer.run_steps(1)
        jax.block_until_ready(trainer.state)
        t1, c1 = time.perf_counter(), time.process_time()
        trainer.run_steps(num_trees)
        jax.block_until_ready(trainer.state)
        t2, c2 = time.perf_counter(), time.process_time()
        sha = params_sha256(trainer.state.params)
        accuracy = trainer.evaluate()["test_accuracy"]
        trainer.close()
    rounds = num_trees - 1
    return {
        "fit": t2 - t0,
        "setup": built - t0,  # the Trainer: data on the devices, bin edges, binning
        "first": t1 - built,  # the first round: mostly lowering and compiling it
        "round": (t2 - t1) / rounds,
        "round_cpu": (c2 - c1) / rounds,  # CPU seconds of all threads: less load-dependent
        "sha": sha,
        "acc": accuracy,
    }


def hgb(dataset, num_trees: int, threads: int | None = None) -> dict:
    """Fit seconds and test accuracy of HistGradientBoostingClassifier, set up as ours."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits

    m = _config(num_trees).model
    model = HistGradientBoostingClassifier(
        max_iter=num_trees,
        max_depth=m.max_depth,
        max_leaf_nodes=None,  # depth-wise to max_depth, as ours
        learning_rate=m.tree_learning_rate,
        max_bins=m.num_bins,
        l2_regularization=m.tree_l2,
        min_samples_leaf=1,
        early_stopping=False,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    with threadpool_limits(threads):  # None: scikit-learn's default (every core)
        model.fit(dataset.x_train, dataset.y_train)
    fit, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"fit": fit, "cpu": cpu, "acc": float(model.score(dataset.x_test, dataset.y_test))}


def slope(xs, ys) -> float:
    """Least-squares slope of log(y) on log(x)."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--devices", type=int, default=4, help="simulated CPU devices")
    parser.add_argument("--trees", type=int, nargs="+", default=[50, 100, 200, 400])
    parser.add_argument("--identity-trees", type=int, default=10)
    parser.add_argument("--hgb-threads", type=int, default=None, help="OpenMP threads for HGB")
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.devices)

    import sklearn

    from jaxdml.data import load_dataset

    dataset = load_dataset(_config(args.trees[0]).data)
    print(
        f"jax {jax.__version__}, scikit-learn {sklearn.__version__}, {args.devices} simulated "
        f"CPU devices on {os.cpu_count()} cores, {len(dataset.y_train)} x "
        f"{dataset.num_features} training rows, medians of {args.repeats}, "
        f"HGB threads {args.hgb_threads or 'default'}, "
        f"load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    first = args.trees[0]
    runs = {t: [] for t in args.trees}
    refs = {t: [] for t in (1, first)}
    for repeat in range(args.repeats):
        for t in args.trees:  # interleaved: ours, then HGB where it is measured
            runs[t].append(ours(dataset, t, args.devices))
            if t == first:
                refs[1].append(hgb(dataset, 1, args.hgb_threads))
                refs[first].append(hgb(dataset, first, args.hgb_threads))
        print(f"  repeat {repeat + 1}: load average {os.getloadavg()[0]:.1f}", flush=True)
    _report(args, runs, refs, first)
    _identity(dataset, args)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def _report(args, runs: dict, refs: dict, first: int) -> None:
    def per_round(key):  # HGB's fit less its set-up (the fit of 1 tree), per further tree
        pairs = zip(refs[1], refs[first], strict=True)
        return statistics.median((b[key] - a[key]) / (first - 1) for a, b in pairs)

    hgb_round, hgb_cpu = per_round("fit"), per_round("cpu")
    our_round, our_cpu = _median(runs[first], "round"), _median(runs[first], "round_cpu")
    print("\n| trees | ours fit (s) | ours per round (ms) | HGB fit (s) | fit ratio |")
    print("|---|---|---|---|---|")
    for t in args.trees:
        ref = f"{_median(refs[t], 'fit'):.2f}" if t == first else "-"
        ratio = f"{_median(runs[t], 'fit') / _median(refs[t], 'fit'):.2f}" if t == first else "-"
        print(
            f"| {t} | {_median(runs[t], 'fit'):.2f} | {_median(runs[t], 'round') * 1e3:.1f} "
            f"| {ref} | {ratio} |"
        )
    print(
        f"\nper round at {first} trees: ours {our_round * 1e3:.1f} ms, HGB {hgb_round * 1e3:.1f} ms"
        f" (fit less its 1-tree fit): ratio {our_round / hgb_round:.2f}; CPU time"
        f" per round (all threads) ours {our_cpu * 1e3:.1f} ms, HGB {hgb_cpu * 1e3:.1f} ms"
    )
    setup, one = _median(runs[first], "setup"), _median(runs[first], "first")
    print(
        f"our whole fit at {first} trees: set-up {setup:.2f} s, the first round (its"
        f" compilation) {one:.2f} s, the other rounds {our_round * (first - 1):.2f} s; the"
        f" first two alone are {(setup + one) / _median(refs[first], 'fit'):.2f}x HGB's fit"
    )
    print(
        f"test accuracy at {first} trees: ours {_median(runs[first], 'acc'):.4f}, "
        f"HGB {_median(refs[first], 'acc'):.4f}"
    )
    if len(args.trees) > 1:
        fits = [_median(runs[t], "fit") for t in args.trees]
        rounds = [_median(runs[t], "round") * (t - 1) for t in args.trees]
        print(
            f"log-log slope over {args.trees} trees: whole fit {slope(args.trees, fits):.3f}, "
            f"rounds after the first {slope(args.trees, rounds):.3f}"
        )


def _identity(dataset, args) -> None:
    """params_sha256 of the same fit on 1 .. --devices devices (3: padded shards)."""
    shas = {d: ours(dataset, args.identity_trees, d)["sha"] for d in range(1, args.devices + 1)}
    same = len(set(shas.values())) == 1
    print(
        f"\n{args.identity_trees} trees on D = 1..{args.devices}: "
        + ("identical" if same else "DIFFERENT")
        + f" params_sha256 {shas[1][:16]}..."
        + ("" if same else f" {shas}")
    )


if __name__ == "__main__":
    main()
