"""The config schema: one ConfigDict with every field, and `validate`.

Every experiment config starts from `default_config()` and overrides fields.
`validate(config)` runs before any device work; a bad value is a single
`ConfigError` whose message names the field (dotted path) and what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

from jaxdml.faults import inject

MODELS = ("logreg", "svm", "gbdt", "mlp")
DATA_SOURCES = ("synthetic", "sklearn", "file")
SKLEARN_DATASETS = ("make_classification", "digits", "breast_cancer", "iris", "wine", "diabetes")
TASKS = ("classification", "regression")
MODEL_LOSSES = ("auto", "cross_entropy", "squared_error", "huber")
TRAIN_MODES = ("full_batch", "minibatch")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "lbfgs", "pegasos")
LR_SCHEDULES = ("constant", "warmup_cosine", "exponential", "step")
RESUME_MODES = ("auto", "false", "auto_or_scratch", "required")
CPU_COLLECTIVES = ("gloo", "mpi")
SVM_LOSSES = ("hinge", "squared_hinge")
IMPUTE_METHODS = ("none", "mean", "median", "zero")


class ConfigError(ValueError):
    """A config value (or the data it names) is invalid. Exit status 2."""


def default_config() -> ml_collections.ConfigDict:
    """Returns the full schema with default values; experiment configs override fields."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seeds parameter init, data order and per-step randomness.
    # >0: simulate this many CPU devices (per process) when JAX's CPU backend has not started
    # yet; else the devices JAX has (a GPU box, a notebook whose JAX already runs)
    c.num_cpu_devices = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # synthetic | sklearn | file
    c.data.task = "classification"  # classification (integer labels) | regression (float y)
    c.data.name = "make_classification"  # sklearn: make_classification|digits|breast_cancer|...
    c.data.path = ""  # file: .npz (X, y), .csv, .parquet, or a directory of X.npy, y.npy (mmap)
    c.data.label_column = "label"  # .csv/.parquet: the label column, exactly as in the header
    c.data.n_samples = 10_000  # synthetic / make_classification: rows
    c.data.n_features = 20  # synthetic / make_classification: columns
    c.data.n_informative = 2  # synthetic / make_classification: informative columns
    c.data.n_classes = 2  # synthetic / make_classification: classes
    c.data.random_state = 42  # generator seed of synthetic data
    c.data.test_size = 0.2  # held-out fraction
    c.data.split_seed = 42  # seed of the train/test split
    c.data.standardize = False  # z-score features with the training split's mean/std
    c.data.classes = ()  # declared labels (ints or strings, class k = k-th); () = sorted distinct
    c.data.impute = "none"  # NaN features: none (error) | mean | median | zero (train split)

    c.model = ml_collections.ConfigDict()
    c.model.name = "logreg"  # logreg | svm | gbdt | mlp
    c.model.l2 = 0.0  # L2 regularization strength (lambda * 0.5 * ||w||^2)
    c.model.multiclass = "auto"  # auto | binary | multinomial (svm: one-vs-rest)
    c.model.svm_loss = "hinge"  # svm: hinge | squared_hinge
    c.model.hidden_sizes = (64,)  # mlp: hidden layer widths
    c.model.dropout = 0.0  # mlp: dropout rate after each hidden layer (training only)
    c.model.loss = "auto"  # mlp: auto | cross_entropy | squared_error | huber (auto: by data.task)
    c.model.num_trees = 50  # gbdt: boosting rounds (one step each)
    c.model.max_depth = 6  # gbdt: depth of each tree
    c.model.num_bins = 64  # gbdt: histogram bins per feature
    c.model.tree_learning_rate = 0.3  # gbdt: shrinkage
    c.model.min_child_weight = 1.0  # gbdt: minimum hessian sum per child
    c.model.gamma = 0.0  # gbdt: minimum split gain
    c.model.tree_l2 = 1.0  # gbdt: L2 on leaf values

    c.train = ml_collections.ConfigDict()
    c.train.mode = "full_batch"  # full_batch | minibatch
    c.train.batch_size = 256  # minibatch: global batch size (split over devices)
    c.train.num_steps = 200  # optimizer steps (gbdt: ignored, num_trees rounds)
    c.train.optimizer = "sgd"  # sgd | momentum | nesterov | adam | adamw | lbfgs | pegasos
    c.train.learning_rate = 0.1  # optimizer learning rate (the peak of a schedule)
    c.train.momentum = 0.9  # momentum / nesterov coefficient
    c.train.lr_schedule = "constant"  # constant | warmup_cosine | exponential | step
    c.train.warmup_steps = (
        0  # linear warmup from 0 to learning_rate over these steps (any schedule)
    )
    # warmup_cosine: length of warmup + cosine (0: num_steps); exponential / step: the rate
    # is multiplied by decay_rate every decay_steps (smoothly / at once)
    c.train.decay_steps = 0
    c.train.decay_rate = 0.1  # exponential / step: factor per decay_steps
    c.train.end_learning_rate = 0.0  # warmup_cosine: the rate at the end of the cosine
    c.train.clip_global_norm = 0.0  # clip the gradient to this global norm first (0: off)
    c.train.weight_decay = 1e-4  # adamw: decoupled weight decay (optax's default)
    c.train.lbfgs_memory = 10  # lbfgs: past updates kept (full batch only; line search)
    c.train.eval_every = 0  # evaluate on the test split every k steps (0: only at the end)
    c.train.log_every = 50  # log progress (steps/s, loss) every k steps
    # metrics stay on the devices and are fetched in one transfer every k finished steps
    # (and when the loop ends or fails): the loop never waits for the host at each step
    c.train.fetch_every = 25
    c.train.dispatch_depth = 2  # calls in flight at most (unbounded depth deadlocks on CPU)
    # up to k steps in one XLA call (a while loop on the device): for steps of under a
    # few ms, the host's cost of a call is the step's own; saves, checks, evaluations and
    # injected faults still happen at their exact steps (a call ends there)
    c.train.steps_per_call = 1
    # JAX's persistent compilation cache in WORKDIR/xla_cache (unless one is set already):
    # a restarted process loads its step instead of compiling it again
    c.train.compilation_cache = True
    # XLA options for the step programs (jax.jit's compiler_options): "auto" is jaxdml's
    # measured choice per platform and step (today: on CPU the L-BFGS step, a large
    # program run for few steps, compiles without XLA's fusion emitters, ~1.7x faster;
    # other steps run faster with them), "" is XLA's defaults, "key=value,..." sets those
    # options (e.g. "xla_cpu_use_fusion_emitters=false")
    c.train.compiler_options = "auto"
    c.train.donate = False  # donate the state buffers (False keeps the input alive for recovery)
    c.train.tensorboard = False  # also write TensorBoard events (needs the tensorboard extra)
    # a tqdm progress bar with ETA on process 0 when stderr is a terminal or a notebook
    # (never in a log file or a pipe); False: none. The log lines stay either way.
    c.train.progress = True

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 0  # save every k steps (0: off)
    # save every t seconds (0: off). On by default, so a long run never loses more than
    # this; a run shorter than it saves only at its end. Several processes agree on the
    # step (jaxdml.liveness.Agreement), as for the memory tier's local_every_secs.
    c.checkpoint.every_secs = 300.0
    c.checkpoint.max_to_keep = 3  # newest checkpoints kept
    c.checkpoint.keep_period = 0  # also keep every N-th step forever (0: off)
    c.checkpoint.async_save = True  # save in the background
    # auto | false | auto_or_scratch | required (no checkpoint: exit 2; eval-only runs)
    c.checkpoint.resume = "auto"
    # The memory tier: each process also keeps its state in fast local storage, for warm
    # restarts that redo few steps; a restart takes its newest valid state before the
    # persistent tier's (docs/architecture.md, "Checkpoint tiers").
    c.checkpoint.local_every_secs = 5.0  # memory-tier save every t seconds (0: off)
    c.checkpoint.local_every_steps = 0  # also every k steps (0: by time only)
    c.checkpoint.local_max_to_keep = 2  # newest memory-tier checkpoints kept
    c.checkpoint.local_dir = ""  # '': /dev/shm/jaxdml-<user>/<hash of workdir>, else workdir/local

    c.faults = ""  # injected fault plan, e.g. "device_loss@120:3,nan@50" (tests, demos, chaos)

    c.supervisor = ml_collections.ConfigDict()
    c.supervisor.enabled = True  # recover from failures (False: a failure ends the run)
    c.supervisor.min_devices = 1  # stop with a report below this many healthy devices
    c.supervisor.max_recoveries = 10  # recovery budget for the whole run
    c.supervisor.backoff_secs = 0.0  # wait before the n-th recovery: backoff * 2^(n-1), max 30 s
    c.supervisor.nan_max_skips = 3  # skipped (non-finite) updates within the window before rollback
    c.supervisor.nan_window = 10  # steps in that window
    c.supervisor.spike_zscore = 0.0  # loss spike threshold in rolling z-score (0: off)
    c.supervisor.fingerprint_every = 0  # compare replica fingerprints every k steps (0: off)
    c.supervisor.watchdog_secs = 120.0  # hang: no progress for max(this, factor x median step) s
    c.supervisor.watchdog_step_factor = 50.0  # ... with factor this (0: a fixed watchdog_secs)

    # Multi-process (jaxdml/distributed.py). Unset fields fall back to the JAXDML_* environment
    # that jaxdml.launch sets; one process and no auto_detect means a plain single-process run.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.auto_detect = False  # cluster (TPU VM, SLURM, MPI): jax finds what is unset
    c.distributed.coordinator_address = ""  # host:port of process 0 ('': $JAXDML_COORDINATOR)
    c.distributed.num_processes = 0  # processes in the job (0: $JAXDML_NUM_PROCESSES, else 1)
    c.distributed.process_id = -1  # this process, 0..num_processes-1 (-1: $JAXDML_PROCESS_ID)
    c.distributed.heartbeat_timeout_secs = 10  # a process silent this long is declared dead
    c.distributed.initialization_timeout_secs = 120  # wait this long for every process to join
    c.distributed.shutdown_timeout_secs = 60  # at exit, wait this long for the others to finish
    c.distributed.cpu_collectives = "gloo"  # CPU cross-process collectives: gloo | mpi
    # CPU (gloo): a collective waiting this long for a peer fails instead of blocking forever
    # (XLA's --xla_cpu_collective_timeout_seconds; 0: never). Below the slowest peer's
    # lag it is a false alarm that restarts the group; compilation is done before it counts.
    c.distributed.collective_timeout_secs = 10
    c.distributed.steps_per_transaction = 1  # steps per live_devices transaction (lost on a loss)
    return c


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {list(choices)}, got {v!r}"


def _int_at_least(lo: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            return f"must be an integer >= {lo}, got {v!r}"
        return None

    return check


def _float_at_least(lo: float, strict: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return f"must be a number, got {v!r}"
        if v < lo or (strict and v == lo):
            return f"must be {'>' if strict else '>='} {lo}, got {v!r}"
        return None

    return check


def _fraction(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 < v < 1.0:
        return f"must be a number in (0, 1), got {v!r}"
    return None


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def _nonempty_str(v: Any) -> str | None:
    return None if isinstance(v, str) and v else f"must be a non-empty string, got {v!r}"


def _labels(v: Any) -> str | None:
    """Declared classes: distinct, and all integers or all strings."""
    values = tuple(v) if isinstance(v, tuple | list) else None
    ints = values is not None and all(isinstance(c, int) and not isinstance(c, bool) for c in v)
    strs = values is not None and all(isinstance(c, str) for c in v)
    if not (ints or strs) or len(set(values)) != len(values):
        return f"must be distinct integers or distinct strings, got {v!r}"
    return None


def _string(v: Any) -> str | None:
    return None if isinstance(v, str) else f"must be a string, got {v!r}"


def parse_compiler_options(text: str) -> dict[str, bool | int | float | str]:
    """'key=value,...' as a dict for jax.jit's compiler_options: true/false are bools,
    numbers are ints or floats, anything else a string. Raises ValueError."""
    options: dict[str, bool | int | float | str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise ValueError(f"{item!r} is not key=value")
        low = value.lower()
        if low in ("true", "false"):
            options[key] = low == "true"
            continue
        for kind in (int, float):
            try:
                options[key] = kind(value)
                break
            except ValueError:
                pass
        else:
            options[key] = value
    return options


def _compiler_options(v: Any) -> str | None:
    if not isinstance(v, str):
        return f"must be 'auto', '' or 'key=value,...', got {v!r}"
    if v == "auto":
        return None
    try:
        parse_compiler_options(v)
    except ValueError as e:
        return f"must be 'auto', '' or 'key=value,...': {e}"
    return None


def _host_port(v: Any) -> str | None:
    if not isinstance(v, str):
        return f"must be a string 'host:port', got {v!r}"
    if not v:
        return None
    host, _, port = v.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"must be 'host:port' with a port in 1..65535, got {v!r}"
    return None


_RULES: dict[str, Callable[[Any], str | None]] = {
    "seed": _int_at_least(0),
    "num_cpu_devices": _int_at_least(0),
    "data.source": _one_of(DATA_SOURCES),
    "data.task": _one_of(TASKS),
    "data.n_samples": _int_at_least(2),
    "data.n_features": _int_at_least(1),
    "data.n_informative": _int_at_least(1),
    "data.n_classes": _int_at_least(2),
    "data.random_state": _int_at_least(0),
    "data.test_size": _fraction,
    "data.split_seed": _int_at_least(0),
    "data.standardize": _bool,
    "data.impute": _one_of(IMPUTE_METHODS),
    "data.label_column": _nonempty_str,
    "data.classes": _labels,
    "model.name": _one_of(MODELS),
    "model.l2": _float_at_least(0.0),
    "model.multiclass": _one_of(("auto", "binary", "multinomial")),
    "model.svm_loss": _one_of(SVM_LOSSES),
    "model.dropout": _float_at_least(0.0),
    "model.loss": _one_of(MODEL_LOSSES),
    "model.num_trees": _int_at_least(1),
    "model.max_depth": _int_at_least(1),
    "model.num_bins": _int_at_least(2),
    "model.tree_learning_rate": _float_at_least(0.0, strict=True),
    "model.min_child_weight": _float_at_least(0.0),
    "model.gamma": _float_at_least(0.0),
    "model.tree_l2": _float_at_least(0.0),
    "train.mode": _one_of(TRAIN_MODES),
    "train.batch_size": _int_at_least(1),
    "train.num_steps": _int_at_least(1),
    "train.optimizer": _one_of(OPTIMIZERS),
    "train.learning_rate": _float_at_least(0.0, strict=True),
    "train.momentum": _float_at_least(0.0),
    "train.lr_schedule": _one_of(LR_SCHEDULES),
    "train.warmup_steps": _int_at_least(0),
    "train.decay_steps": _int_at_least(0),
    "train.decay_rate": _float_at_least(0.0, strict=True),
    "train.end_learning_rate": _float_at_least(0.0),
    "train.clip_global_norm": _float_at_least(0.0),
    "train.weight_decay": _float_at_least(0.0),
    "train.lbfgs_memory": _int_at_least(1),
    "train.eval_every": _int_at_least(0),
    "train.log_every": _int_at_least(1),
    "train.dispatch_depth": _int_at_least(1),
    "train.steps_per_call": _int_at_least(1),
    "train.fetch_every": _int_at_least(1),
    "train.compilation_cache": _bool,
    "train.compiler_options": _compiler_options,
    "train.donate": _bool,
    "train.tensorboard": _bool,
    "train.progress": _bool,
    "checkpoint.every_steps": _int_at_least(0),
    "checkpoint.every_secs": _float_at_least(0.0),
    "checkpoint.max_to_keep": _int_at_least(1),
    "checkpoint.keep_period": _int_at_least(0),
    "checkpoint.async_save": _bool,
    "checkpoint.resume": _one_of(RESUME_MODES),
    "checkpoint.local_every_secs": _float_at_least(0.0),
    "checkpoint.local_every_steps": _int_at_least(0),
    "checkpoint.local_max_to_keep": _int_at_least(1),
    "checkpoint.local_dir": _string,
    "supervisor.enabled": _bool,
    "supervisor.min_devices": _int_at_least(1),
    "supervisor.max_recoveries": _int_at_least(0),
    "supervisor.backoff_secs": _float_at_least(0.0),
    "supervisor.nan_max_skips": _int_at_least(1),
    "supervisor.nan_window": _int_at_least(1),
    "supervisor.spike_zscore": _float_at_least(0.0),
    "supervisor.fingerprint_every": _int_at_least(0),
    "supervisor.watchdog_secs": _float_at_least(0.0),
    "supervisor.watchdog_step_factor": _float_at_least(0.0),
    "distributed.auto_detect": _bool,
    "distributed.coordinator_address": _host_port,
    "distributed.num_processes": _int_at_least(0),
    "distributed.process_id": _int_at_least(-1),
    "distributed.heartbeat_timeout_secs": _int_at_least(1),
    "distributed.initialization_timeout_secs": _int_at_least(1),
    "distributed.shutdown_timeout_secs": _int_at_least(1),
    "distributed.cpu_collectives": _one_of(CPU_COLLECTIVES),
    "distributed.collective_timeout_secs": _int_at_least(0),
    "distributed.steps_per_transaction": _int_at_least(1),
}


def _validate_optimizer(config: ml_collections.ConfigDict) -> None:
    """The optimizer fields that only make sense together."""
    t = config.train
    if t.lr_schedule in ("exponential", "step") and t.decay_steps < 1:
        raise ConfigError(
            f"config.train.decay_steps must be >= 1 with config.train.lr_schedule={t.lr_schedule!r}"
        )
    if t.lr_schedule == "warmup_cosine" and t.warmup_steps >= (t.decay_steps or t.num_steps):
        raise ConfigError(
            f"config.train.warmup_steps ({t.warmup_steps}) must be below the cosine's length "
            f"(config.train.decay_steps, or num_steps when 0: {t.decay_steps or t.num_steps})"
        )
    if t.optimizer == "pegasos" and config.model.l2 <= 0:
        raise ConfigError("config.model.l2 must be > 0 with config.train.optimizer='pegasos'")
    fixed = {"pegasos": "its own 1/(l2 t) rate", "lbfgs": "its line search"}
    if t.optimizer in fixed:
        why = fixed[t.optimizer]
        if t.lr_schedule != "constant" or t.warmup_steps:
            raise ConfigError(
                f"config.train.lr_schedule must be 'constant' without warmup with "
                f"config.train.optimizer={t.optimizer!r} (the step size comes from {why})"
            )
        if t.clip_global_norm:
            raise ConfigError(
                f"config.train.clip_global_norm must be 0 with "
                f"config.train.optimizer={t.optimizer!r} (the step size comes from {why})"
            )
    if t.optimizer == "lbfgs" and t.mode != "full_batch":
        raise ConfigError(
            "config.train.optimizer='lbfgs' needs config.train.mode='full_batch' "
            "(its line search compares values of one objective)"
        )


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if part not in node:
            raise ConfigError(f"config.{dotted}: missing field")
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every field of `config`; raises ConfigError naming the first bad field.

    Args:
      config: a ConfigDict built on `default_config()`.

    Returns:
      The same config, for chaining.
    """
    for field, rule in _RULES.items():
        problem = rule(_get(config, field))
        if problem:
            raise ConfigError(f"config.{field} {problem}")
    d = config.data
    if d.source == "sklearn" and d.name not in SKLEARN_DATASETS:
        raise ConfigError(f"config.data.name must be one of {list(SKLEARN_DATASETS)} for source")
    if d.source == "file" and not d.path:
        raise ConfigError("config.data.path is required when config.data.source='file'")
    if d.source == "synthetic" and d.n_informative > d.n_features:
        raise ConfigError(
            f"config.data.n_informative ({d.n_informative}) must not exceed "
            f"config.data.n_features ({d.n_features})"
        )
    try:
        inject.parse(config.faults)
    except inject.FaultPlanError as e:
        raise ConfigError(f"config.faults: {e}") from e
    if config.model.dropout >= 1.0:
        raise ConfigError(f"config.model.dropout must be < 1, got {config.model.dropout!r}")
    regression = config.data.task == "regression"
    if regression and config.model.name != "mlp":
        raise ConfigError(
            "config.data.task='regression' needs config.model.name='mlp', "
            f"got {config.model.name!r}"
        )
    if (
        config.model.loss in ("squared_error", "huber")
    ) != regression and config.model.loss != "auto":
        raise ConfigError(
            f"config.model.loss={config.model.loss!r} does not fit "
            f"config.data.task={config.data.task!r}"
        )
    hidden = tuple(config.model.hidden_sizes)
    if not all(isinstance(h, int) and h > 0 for h in hidden):
        raise ConfigError(f"config.model.hidden_sizes must be positive integers, got {hidden}")
    _validate_optimizer(config)
    if config.num_cpu_devices and config.supervisor.min_devices > config.num_cpu_devices:
        raise ConfigError(
            f"config.supervisor.min_devices ({config.supervisor.min_devices}) exceeds "
            f"config.num_cpu_devices ({config.num_cpu_devices})"
        )
    dist = config.distributed
    if dist.num_processes and dist.process_id >= dist.num_processes:
        raise ConfigError(
            f"config.distributed.process_id ({dist.process_id}) must be < "
            f"config.distributed.num_processes ({dist.num_processes})"
        )
    return config
