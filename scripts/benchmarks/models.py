"""Models: accuracy and training time of jaxdml's SVM, GBDT and MLP against scikit-learn (and
XGBoost). A section of scripts/bench.py, run in a fresh process (`--worker=models`).

Every model is trained on the same split, side by side in one process (ours and the
references interleaved, repeat by repeat); times are medians of Settings.models_repeats runs.
"ours fit" is from the data in host memory to a trained model (model and batcher
set-up, binning, compilation, all steps); "ours steps" leaves out set-up and the first
step's compilation (the steady-state cost of the N steps, estimated from steps 2..N).
Ratios are ours / reference: above 1 is slower.

  python scripts/bench.py --only=models                 # medians of 3
  python scripts/bench.py --only=models --set=models_repeats=5 --set=models_devices=4 \
      --set=models_only=gbdt,svm --set=models_data=seed,digits
  python scripts/bench.py --only=models --quick         # one repeat
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import jax

from .common import BENCH, REPO, Context, Section, config_module

C = 1.0  # LinearSVC's C; ours: l2 = 1 / (C * n_train)
# Full-batch steps our SVM needs to come close to LinearSVC's objective (configs/svm.py: 500).
SVM_STEPS = {"breast_cancer": 1000, "digits": 2000}
LOGREG_STEPS = 15  # ours: reaches sklearn's accuracy on synthetic-200k (sklearn stops at its tol)
DATASETS = {
    "seed": {},  # the configs' own data: make_classification 10000 x 20 (8000 train)
    "breast_cancer": {"source": "sklearn", "name": "breast_cancer", "standardize": True},
    "digits": {"source": "sklearn", "name": "digits", "standardize": True},
    "synthetic-200k": {  # jaxdml.data.make_classification, 200k training rows; 2 informative
        # columns make it hard enough that every tree grows all its 64 leaves
        "source": "synthetic",
        "n_samples": 250_000,
        "n_features": 20,
        "n_informative": 2,
        "n_classes": 2,
        "test_size": 0.2,
        "standardize": True,  # for the SVM's step size; trees do not care
    },
}


def _config(module, variant: str, data: dict):
    config = module.get_config(variant)
    for key, value in data.items():
        config.data[key] = value
    config.train.log_every = 10**9
    return config


def _ours(config, ds, num_devices: int) -> dict:
    from jaxdml.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        trainer = Trainer(config, workdir, devices=jax.devices()[:num_devices], dataset=ds)
        trainer.run_steps(1)
        t1 = time.perf_counter()
        trainer.run_steps(trainer.num_steps)
        jax.block_until_ready(trainer.state)
        t2 = time.perf_counter()
        accuracy = trainer.evaluate()["test_accuracy"]
        trainer.close()
    n = trainer.num_steps
    return {"acc": accuracy, "fit": t2 - t0, "steps": (t2 - t1) * n / max(n - 1, 1)}


def _reference(make, ds) -> dict:
    t0 = time.perf_counter()
    model = make().fit(ds.x_train, ds.y_train)
    elapsed = time.perf_counter() - t0
    return {"acc": float(model.score(ds.x_test, ds.y_test)), "fit": elapsed}


def _svm_jobs(ds, data):
    from sklearn.svm import LinearSVC

    svm = config_module("svm")

    config = _config(svm, "", data)
    config.model.l2 = 1.0 / (C * len(ds.y_train))
    config.train.num_steps = SVM_STEPS.get(data.get("name", ""), config.train.num_steps)
    ref = {"LinearSVC": lambda: LinearSVC(C=C, loss=config.model.svm_loss, max_iter=10_000)}
    return f"svm (squared hinge, C=1, {config.train.num_steps} steps)", config, ref


def _logreg_jobs(ds, data):
    """Binary logistic regression by full-batch L-BFGS (optax.lbfgs with its zoom line
    search) against LogisticRegression(solver='lbfgs') on the same objective: mean log
    loss + l2/2 ||w||^2, intercept not penalized, l2 = 1 / (C n)."""
    from sklearn.linear_model import LogisticRegression

    config = _config(config_module("seed_logreg"), "", data)
    config.model.l2 = 1.0 / (C * len(ds.y_train))
    config.train.optimizer = "lbfgs"
    config.train.learning_rate = 1.0  # unused: the line search picks the step
    config.train.num_steps = LOGREG_STEPS
    ref = {"LogisticRegression lbfgs": lambda: LogisticRegression(C=C, max_iter=1000)}
    return f"logreg (L-BFGS, C=1, {LOGREG_STEPS} steps)", config, ref


def _gbdt_jobs(ds, data):
    from sklearn.ensemble import HistGradientBoostingClassifier

    gbdt = config_module("gbdt")

    config = _config(gbdt, "digits" if ds.num_classes > 2 else "", data)
    m = config.model
    refs = {
        "HistGradientBoosting": lambda: HistGradientBoostingClassifier(
            max_iter=m.num_trees,
            max_depth=m.max_depth,
            max_leaf_nodes=None,
            learning_rate=m.tree_learning_rate,
            max_bins=m.num_bins,
            l2_regularization=m.tree_l2,
            min_samples_leaf=1,
            early_stopping=False,
        )
    }
    try:
        import xgboost
    except ImportError:
        pass
    else:
        refs["XGBoost hist"] = lambda: xgboost.XGBClassifier(
            n_estimators=m.num_trees,
            max_depth=m.max_depth,
            learning_rate=m.tree_learning_rate,
            max_bin=m.num_bins,
            reg_lambda=m.tree_l2,
            gamma=m.gamma,
            min_child_weight=m.min_child_weight,
            tree_method="hist",
            grow_policy="depthwise",
        )
    label = f"gbdt ({m.num_trees} trees, depth {m.max_depth}, {m.num_bins} bins)"
    return label, config, refs


def _mlp_jobs(ds, data):
    from sklearn.neural_network import MLPClassifier

    mlp = config_module("mlp")

    config = _config(mlp, "", data)
    m, t = config.model, config.train
    # sklearn's loss is mean CE + alpha / (2 n) ||W||^2: alpha = l2 * n. Full-batch SGD with
    # the same momentum, step size and number of steps (epochs), no early stop.
    ref = {
        "MLPClassifier": lambda: MLPClassifier(
            hidden_layer_sizes=tuple(m.hidden_sizes),
            alpha=m.l2 * len(ds.y_train),
            solver="sgd",
            batch_size=len(ds.y_train),
            learning_rate_init=t.learning_rate,
            momentum=t.momentum,
            nesterovs_momentum=False,
            max_iter=t.num_steps,
            tol=0.0,
            n_iter_no_change=t.num_steps + 1,
            random_state=0,
        )
    }
    return f"mlp {tuple(m.hidden_sizes)}", config, ref


MODELS = {"logreg": _logreg_jobs, "svm": _svm_jobs, "gbdt": _gbdt_jobs, "mlp": _mlp_jobs}
MLP_DATA = ("digits",)  # the MLP is benchmarked where its config lives


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


@dataclasses.dataclass(frozen=True)
class Args:
    """What the worker measures: bench_models' former command-line flags."""

    repeats: int = 3
    devices: int = 4  # simulated CPU devices for ours
    only: list | None = None  # names of MODELS; None: all
    data: list | None = None  # names of DATASETS; None: all


def worker(args: Args) -> None:
    """Prints the models table (markdown) on stdout; call in a fresh process (`bench.py
    --worker=models`): the device count is fixed when JAX starts."""
    jax.config.update("jax_num_cpu_devices", args.devices)

    import sklearn
    from sklearn.exceptions import ConvergenceWarning

    warnings.filterwarnings("ignore", category=ConvergenceWarning)  # the MLP reference
    try:
        import xgboost

        xgb = f", xgboost {xgboost.__version__}"
    except ImportError:
        xgb = ", xgboost not installed"
    print(
        f"jax {jax.__version__}, {args.devices} simulated CPU devices on {os.cpu_count()} cores, "
        f"scikit-learn {sklearn.__version__}{xgb}, medians of {args.repeats}, "
        f"load average at start {os.getloadavg()[0]:.1f}\n"
    )
    _table(args)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


def _table(args) -> None:
    from jaxdml.data import load_dataset

    seed_logreg = config_module("seed_logreg")

    print(
        "| data (train rows x features) | model | ours acc | reference | ref acc "
        "| ours fit (s) | ours steps (s) | ref fit (s) | fit ratio | steps ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for data_name in args.data or list(DATASETS):
        data = DATASETS[data_name]
        ds = load_dataset(_config(seed_logreg, "", data).data)
        shape = f"{data_name} ({len(ds.y_train)} x {ds.num_features})"
        for model_name in args.only or list(MODELS):
            if model_name == "mlp" and data_name not in MLP_DATA:
                continue
            if model_name == "logreg" and ds.num_classes > 2:
                continue
            label, config, refs = MODELS[model_name](ds, data)
            # Interleaved (ours, then each reference, per repeat) so that load from other
            # processes falls on both sides alike.
            ours, theirs = [], {name: [] for name in refs}
            for _ in range(args.repeats):
                ours.append(_ours(config, ds, args.devices))
                for ref_name, make in refs.items():
                    theirs[ref_name].append(_reference(make, ds))
            for ref_name, runs in theirs.items():
                o_fit, o_steps = _median(ours, "fit"), _median(ours, "steps")
                r_fit = _median(runs, "fit")
                print(
                    f"| {shape} | {label} | {_median(ours, 'acc'):.4f} | {ref_name} "
                    f"| {_median(runs, 'acc'):.4f} | {o_fit:.2f} | {o_steps:.2f} | {r_fit:.2f} "
                    f"| {o_fit / r_fit:.2f} | {o_steps / r_fit:.2f} |",
                    flush=True,
                )


def run(ctx: Context) -> Section:
    """The models section: the worker's table, or its failure, as the section's body."""
    s = ctx.settings
    cmd = [sys.executable, BENCH, "--worker=models", f"--worker_devices={s.models_devices}",
           f"--worker_repeats={s.models_repeats}"]  # fmt: skip
    cmd += [f"--worker_models={','.join(s.models_only)}"] if s.models_only else []
    cmd += [f"--worker_data={','.join(s.models_data)}"] if s.models_data else []
    text, data, ok = _run_worker(cmd, s.script_timeout)
    return Section("models", text, data, failed=not ok)


def _run_worker(cmd: list[str], timeout: float) -> tuple[str, dict, bool]:
    """Runs `cmd` (the worker: a fresh process, so that JAX starts with its device count).

    Returns:
      (markdown: the command and its stdout, or a failure with its stderr; raw data: the
      command and its exit code; whether it did not fail).
    """
    shown = f"`python {' '.join([os.path.relpath(cmd[1], REPO), *cmd[2:]])}`"
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"{shown} **timed out** after {timeout:.0f} s.", {}, False
    data = {"command": cmd[1:], "returncode": proc.returncode}
    if proc.returncode != 0:
        tail = proc.stderr[-3000:]
        return f"{shown} **failed** (exit {proc.returncode}):\n\n```\n{tail}\n```", data, False
    return f"{shown}:\n\n{proc.stdout.strip()}", data, True
