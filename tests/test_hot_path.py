"""The hot path: the loop reads metrics back in bulk, and every step is logged once."""

import os
import time

import jax
import pytest

from configs import seed_logreg
from jaxdml.metrics import read_jsonl
from jaxdml.training import loop as loop_module
from jaxdml.training import state as state_module
from jaxdml.training.hooks import Hook
from jaxdml.training.loop import Loop
from jaxdml.training.trainer import Trainer

STEPS = 100


class Rows(Hook):
    def __init__(self):
        self.rows = []

    def on_metrics(self, rows):
        self.rows += rows


def counted_loop(trainer, monkeypatch, fetch_every):
    """A Loop over the trainer's step whose device-to-host reads are counted: every read
    goes through `fetch` (counted); the per-leaf `to_host` path raises if used."""
    reads = []
    real = loop_module.fetch

    def fetch(tree):
        reads.append(len(jax.tree.leaves(tree)))
        return real(tree)

    def forbidden(tree, device_index=0):
        raise AssertionError("the loop read a value back outside its bulk fetch")

    monkeypatch.setattr(loop_module, "fetch", fetch)
    monkeypatch.setattr(state_module, "to_host", forbidden)
    rows = Rows()
    loop = Loop(
        trainer.step_fn, trainer.batcher, trainer.mesh, STEPS, hooks=[rows],
        fetch_every=fetch_every,
    )  # fmt: skip
    return loop, rows, reads


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    config = seed_logreg.get_config()
    config.train.num_steps = STEPS
    return Trainer(config, str(tmp_path_factory.mktemp("run")), devices=jax.devices()[:4])


@pytest.mark.parametrize("fetch_every", [25, 1])
def test_the_loop_reads_metrics_back_once_per_fetch_period(trainer, monkeypatch, fetch_every):
    loop, rows, reads = counted_loop(trainer, monkeypatch, fetch_every)
    loop.run(trainer.state)
    # One read of the start (step, data position), one of the first finished step (it
    # tells the hooks training goes on), then one per fetch period: with the default
    # period 6 reads for 100 steps, not 101.
    sizes = reads[1:]
    assert sum(sizes) == STEPS and sizes[0] == 1
    assert len(sizes) == 1 + -(-(STEPS - 1) // fetch_every)
    assert max(sizes) == fetch_every
    assert {"loss", "batch_accuracy", "skipped", "epoch"} <= set(rows.rows[0])
    assert isinstance(rows.rows[0]["skipped"], int) and rows.rows[-1]["loss"] > 0


def test_a_fit_logs_every_step_exactly_once_with_bulk_fetching(tmp_path):
    config = seed_logreg.get_config()
    config.train.num_steps = 110  # not a multiple of the period: the tail is delivered too
    config.train.fetch_every = 25
    config.checkpoint.every_steps = 50
    Trainer(config, str(tmp_path), devices=jax.devices()[:4]).fit()
    steps = [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))]
    assert steps == list(range(1, 111))


def test_a_failed_span_keeps_the_rows_of_the_spans_committed_before_it(trainer):
    """Multi-process spans: a span that fails (a peer died) is dropped, and the rows of the
    spans committed before it, still waiting for their bulk fetch, are delivered: the
    recovery goes on after the last committed step, so nothing runs those steps again."""
    import contextlib

    class PeerDied(RuntimeError):
        pass

    @contextlib.contextmanager
    def transaction(end):
        yield
        if end == 40:  # the span 31..40 fails as it is committed
            raise PeerDied(end)

    rows = Rows()
    loop = Loop(
        trainer.step_fn, trainer.batcher, trainer.mesh, STEPS, hooks=[rows],
        fetch_every=25, transaction=transaction, span=10,
    )  # fmt: skip
    with pytest.raises(PeerDied):
        loop.run(trainer.state)
    assert loop.last_good[0] == 30
    assert [r["step"] for r in rows.rows] == list(range(1, 31))


def test_each_run_caches_compilations_in_its_own_workdir(tmp_path, recwarn):
    import shutil

    import jax.numpy as jnp
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    from jaxdml import distributed

    session = jax.config.jax_compilation_cache_dir  # the test session's own folder
    assert distributed.compilation_cache(str(tmp_path / "x")) == session  # a user's: kept
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        first = distributed.compilation_cache(str(tmp_path / "first" / "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.jit(lambda x: jnp.sin(x) * 3.0)(jnp.ones(7)).block_until_ready()
        assert os.listdir(first)
        shutil.rmtree(tmp_path / "first")  # the first run's folder is gone
        second = distributed.compilation_cache(str(tmp_path / "second" / "xla_cache"))
        assert second != first
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.jit(lambda x: jnp.cos(x) * 5.0)(jnp.ones(9)).block_until_ready()
        assert os.listdir(second) and not (tmp_path / "first").exists()
        assert not [w for w in recwarn if "compilation cache" in str(w.message)]
    finally:
        jax.config.update("jax_compilation_cache_dir", session)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
        jax_cache.reset_cache()


def test_metrics_rows_are_written_by_their_own_thread_and_drained_on_read(tmp_path, monkeypatch):
    """The loop's thread encodes the rows (encoding in another Python thread made the loop
    wait for the GIL); the file is written by the writer's thread."""
    import threading

    from jaxdml.metrics import MetricsWriter

    writers = []
    real = MetricsWriter._write_now

    def write_now(self, queued):
        writers.append(threading.current_thread().name)
        return real(self, queued)

    monkeypatch.setattr(MetricsWriter, "_write_now", write_now)
    metrics = MetricsWriter(str(tmp_path))
    metrics.write_rows([{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}])
    metrics.write_rows([{"step": 3, "loss": 0.3}])
    assert [r["step"] for r in metrics.rows()] == [1, 2, 3]  # reading drains the queue
    assert metrics.durable_step == 3 and set(writers) == {"jaxdml-metrics"}
    # A seal waits until the loop says every hook took the rows (the guard did not raise).
    assert metrics.through == 0
    metrics.accept(2)
    assert metrics.through == 2
    metrics.truncate_after(2)
    assert metrics.durable_step == 2 and [r["step"] for r in read_jsonl(metrics.path)] == [1, 2]
    metrics.write_rows([{"step": 3, "loss": 0.25}])
    metrics.close()  # drains
    assert [r["loss"] for r in read_jsonl(metrics.path)] == [0.5, 0.4, 0.25]


def test_a_resume_cuts_metrics_jsonl_from_its_end(tmp_path, monkeypatch):
    """A resume drops the rows past its step by reading back only as far as it must, not
    the whole run's rows; a torn last line (a killed writer) goes too, kept rows stay."""
    import json

    from jaxdml import metrics as metrics_lib

    metrics = metrics_lib.MetricsWriter(str(tmp_path))
    metrics.write_rows([{"step": s, "loss": 1.0 / s} for s in range(1, 5001)])
    metrics.close()
    with open(metrics.path, "a") as f:
        f.write('{"step": 5001, "lo')  # torn by a kill
    parsed, real = [], json.loads

    def loads(text, *a, **k):
        parsed.append(text)
        return real(text, *a, **k)

    monkeypatch.setattr(metrics_lib.json, "loads", loads)
    metrics = metrics_lib.MetricsWriter(str(tmp_path))
    metrics.truncate_after(4990)
    assert len(parsed) == 11  # rows 5000..4990, read from the end
    monkeypatch.undo()
    metrics.write_rows([{"step": 4991, "loss": 0.5}])
    metrics.close()
    rows = read_jsonl(metrics.path)
    assert [r["step"] for r in rows] == list(range(1, 4992))
    assert rows[-1]["loss"] == 0.5 and rows[-2]["loss"] == 1.0 / 4990
    assert metrics_lib.last_row_through(metrics.path, 10)[1] == rows[9]
    assert metrics_lib.last_row_through(metrics.path, 0) == (0, None)
    assert metrics_lib.last_row_through(str(tmp_path / "none.jsonl")) == (0, None)


@pytest.mark.parametrize("donated", [False, True])
def test_a_memory_tier_save_reads_the_state_on_its_writer_thread(tmp_path, monkeypatch, donated):
    """The loop hands the arrays over and goes on; reading them back (which waits for the
    step that makes them) is the writer thread's job, unless the state will be donated."""
    import threading

    import jax.numpy as jnp
    import numpy as np

    from jaxdml import memory_tier

    readers = []
    real = memory_tier._replica

    def replica(x):
        readers.append(threading.current_thread().name)
        return real(x)

    monkeypatch.setattr(memory_tier, "_replica", replica)
    tier = memory_tier.MemoryTier(str(tmp_path / "memory"), donated=donated)
    state = {"b": jnp.ones(()), "w": jax.jit(lambda w: w + 1.0)(jnp.arange(4.0))}
    assert tier.save(7, state, {}) is True
    tier.wait()
    loop_thread = threading.current_thread().name
    assert len(readers) == 2 and all((r == loop_thread) == donated for r in readers)
    assert tier.steps() == [7] and tier.failed_saves == 0
    saved = np.load(os.path.join(tier.directory, "7", "1.npy"))
    np.testing.assert_array_equal(saved, [1.0, 2.0, 3.0, 4.0])
    tier.close()


class Sleeps(Hook):
    """Host work after the given steps (a stand-in for a save's blocking part)."""

    def __init__(self, seconds, at):
        self.seconds, self.at = seconds, set(at)

    def after_step(self, info):
        if info.step in self.at:
            time.sleep(self.seconds)
        return False


class SlowRows(Hook):
    """Host work in a delivery: the rows that hold the given step take that long."""

    def __init__(self, seconds, at):
        self.seconds, self.at = seconds, at

    def on_metrics(self, rows):
        if any(r["step"] == self.at for r in rows):
            time.sleep(self.seconds)


def _slow(step_fn, iterations):
    """step_fn followed by `iterations` dependent 256x256 matmuls: the metrics are ready
    only when they are done."""
    import jax.numpy as jnp

    step_fn = step_fn.__wrapped__  # a jit with compiler options cannot be nested in another

    def slow(state, batch):
        state, metrics = step_fn(state, batch)

        def body(_, x):
            return jnp.tanh(x @ x)

        x = jax.lax.fori_loop(0, iterations, body, jnp.full((256, 256), 1e-3) + metrics[0])
        return state, metrics + 0.0 * x[0, 0]

    return jax.jit(slow)


def test_the_loop_calls_the_step_hooks_a_hook_has_and_only_those(trainer):
    """Per-step calls go only to hooks with their own before_step/after_step: a class
    override, one given to the instance, or a duck-typed hook's; a hook without one is
    not called at each step (and a duck-typed hook without one does not fail)."""
    seen = []

    class Counts(Hook):
        def after_step(self, info):
            seen.append(("class", info.step))
            return False

    given = Hook()
    given.after_step = lambda info: seen.append(("instance", info.step)) or False

    class Duck:
        def on_metrics(self, rows):
            seen.append(("duck rows", len(rows)))

    loop = Loop(trainer.step_fn, trainer.batcher, trainer.mesh, 3,
                hooks=[Counts(), given, Duck(), Rows()])  # fmt: skip
    assert len(loop._after) == 2 and loop._before == []
    loop.run(trainer.state)
    assert [s for k, s in seen if k == "class"] == [1, 2, 3]
    assert [s for k, s in seen if k == "instance"] == [1, 2, 3]
    assert sum(n for k, n in seen if k == "duck rows") == 3


def test_host_work_counts_as_stall_only_when_the_devices_ran_dry(trainer):
    """A row's `stall_seconds` is the host work after which the newest dispatched step had
    finished (the devices idled); host work while a step still runs is hidden behind it."""
    rows = Rows()
    loop = Loop(
        trainer.step_fn, trainer.batcher, trainer.mesh, 12, hooks=[Sleeps(0.2, {4, 8}), rows]
    )
    loop.run(trainer.state)  # steps of ~1 ms: a 0.2-s pause leaves the devices idle
    paused = [r for r in rows.rows if r["host_seconds"] >= 0.2]
    assert len(paused) == 2  # (the row of the step finished next: s - 1 at depth 2)
    # The pause stalled; a delivery in the same interval may have been hidden.
    assert all(0.2 <= r["stall_seconds"] <= r["host_seconds"] for r in paused)

    # A slow delivery (the rows' hooks) stalls the devices as a slow after_step does: its
    # time is the next finished step's host work.
    rows = Rows()
    loop = Loop(trainer.step_fn, trainer.batcher, trainer.mesh, 12, fetch_every=4,
                hooks=[rows, SlowRows(0.2, 8)])  # fmt: skip
    loop.run(trainer.state)
    stalled = [r["step"] for r in rows.rows if r["stall_seconds"] >= 0.2]
    assert len(stalled) == 1 and stalled[0] > 8

    rows = Rows()
    slow = _slow(trainer.step_fn, 400)  # each step ~0.5 s on 4 CPU devices on 2 cores
    loop = Loop(slow, trainer.batcher, trainer.mesh, 6, hooks=[Sleeps(0.05, {2, 3}), rows])
    loop.run(trainer.state)
    assert [r["step"] for r in rows.rows] == list(range(1, 7))
    assert sum(r["host_seconds"] for r in rows.rows) >= 0.1
    assert all(r["stall_seconds"] == 0.0 for r in rows.rows)


def test_the_steps_compile_with_the_configured_xla_options(tmp_path):
    from jaxdml.config import ConfigError, parse_compiler_options
    from jaxdml.training import step_common

    assert parse_compiler_options("a=true, b=3,c=1.5,d=x,") == {
        "a": True,
        "b": 3,
        "c": 1.5,
        "d": "x",
    }
    # auto: a compile-bound step (L-BFGS) on CPU without the fusion emitters; others as XLA's
    off = {"xla_cpu_use_fusion_emitters": False}
    assert step_common.compiler_options("auto", "cpu", compile_bound=True) == off
    assert step_common.compiler_options("auto", "cpu", compile_bound=False) is None
    assert step_common.compiler_options("auto", "gpu", compile_bound=True) is None
    assert step_common.compiler_options("", "cpu", compile_bound=True) is None

    def first_loss(options):
        config = seed_logreg.get_config()
        config.train.num_steps = 5
        config.train.compiler_options = options
        trainer = Trainer(config, str(tmp_path / f"run{len(options)}"), devices=jax.devices()[:4])
        try:
            return trainer.run_steps(5)["loss"]
        finally:
            trainer.close()

    # The options reach XLA: one it does not know is a config error naming it.
    with pytest.raises(ConfigError, match="compiler_options.*xla_cpu_no_such_option"):
        first_loss("xla_cpu_no_such_option=true")
    # Without the fusion emitters the step computes what XLA's defaults compute.
    off = "xla_cpu_use_fusion_emitters=false"
    assert first_loss(off) == pytest.approx(first_loss(""), rel=1e-5)


def test_rows_asked_for_early_go_out_as_soon_as_their_step_is_done(trainer):
    """A hook that expedites a step (a save's seal waits for its rows) gets them before
    the next dispatch once the step is done, not when the depth bound next waits for it."""
    order = []

    class Expedites(Hook):
        def after_step(self, info):
            order.append(("after_step", info.step))
            if info.step == 3:
                info.expedite()
                jax.block_until_ready(info.state)  # done (a save that waited for it)
            return False

        def on_metrics(self, rows):
            order.append(("rows through", rows[-1]["step"]))

    loop = Loop(trainer.step_fn, trainer.batcher, trainer.mesh, 8, hooks=[Expedites()],
                dispatch_depth=2, fetch_every=25)  # fmt: skip
    start = int(jax.device_get(trainer.state.step))
    loop.run(trainer.state)
    order = [(kind, step - start) for kind, step in order]
    first = order.index(("rows through", 1))  # the first finished step goes out at once
    early = order.index(("rows through", 3))
    assert early == order.index(("after_step", 3)) + 1 > first
    assert order[-1] == ("rows through", 8)
