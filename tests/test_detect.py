"""Detectors and fault plans, with injected clocks: exact outcomes."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdml.faults import detect, errors, inject
from jaxdml.mesh import make_mesh, replicated


def test_fault_plan_parses_every_kind_and_rejects_bad_entries():
    plan = inject.parse(
        "sigkill@450,device_loss@120:3,nan@50-54,bitflip@200:1,hang@300:2,"
        "slow@80-160:0,sigterm@400,device_loss@10:1+2,host_loss@500:1"
    )
    assert [f.spec for f in plan] == [
        "device_loss@10:1+2",
        "nan@50-54",
        "slow@80-160:0",
        "device_loss@120:3",
        "bitflip@200:1",
        "hang@300:2",
        "sigterm@400",
        "sigkill@450",
        "host_loss@500:1",
    ]
    for bad in ("nan", "nan@x", "melt@3", "bitflip@5", "nan@9-3"):
        with pytest.raises(inject.FaultPlanError, match="bad fault entry"):
            inject.parse(bad)


def test_injector_fires_each_fault_once_per_workdir():
    record = []
    injector = inject.Injector(
        inject.parse("nan@2,nan@4-5"),
        already_fired=["nan@2"],
        record=lambda kind, step, **f: record.append(f["fault"]),
    )
    batch = {"x": jnp.ones((2, 2))}
    out = [bool(jnp.isnan(injector.before_step(s, None, batch)[1]["x"]).any()) for s in range(7)]
    assert out == [False, False, False, False, True, True, False]
    assert record == ["nan@4-5#4", "nan@4-5#5"]


def test_replica_fingerprints_find_the_flipped_device():
    mesh = make_mesh(jax.devices()[:4])
    params = jax.device_put({"b": jnp.full((3,), 0.25), "w": jnp.ones((4, 2))}, replicated(mesh))
    fps = detect.replica_fingerprints(params, mesh)
    assert fps.shape == (4, 2) and len({tuple(r) for r in np.asarray(fps)}) == 1
    flipped = inject.flip_bit(params, device_id=2)
    fps = detect.replica_fingerprints(flipped, mesh)
    assert detect.majority(fps, [0, 1, 2, 3]) == ([0, 1, 3], [2])
    value = np.asarray(flipped["b"].addressable_shards[2].data)[0]
    assert value in (0.25 * 256, 0.25 / 256)


def test_replica_fingerprints_compile_once_per_mesh():
    mesh = make_mesh(jax.devices()[:4])
    params = jax.device_put({"w": jnp.ones((5, 3))}, replicated(mesh))
    fn = detect._replica_fingerprint_fn(mesh)
    before = fn._cache_size()
    for scale in (1.0, 2.0, 3.0):
        detect.replica_fingerprints(jax.tree.map(lambda x, s=scale: x * s, params), mesh)
    assert detect._replica_fingerprint_fn(mesh) is fn
    assert fn._cache_size() == before + 1  # compiled for this tree once, not per check


def test_majority_needs_more_than_half():
    fps = np.array([[1, 1], [2, 2]])
    assert detect.majority(fps, [0, 1]) == ([], [0, 1])


def test_fingerprint_sees_every_bit_and_ignores_layout():
    a = {"x": jnp.arange(6.0), "y": jnp.int32(7)}
    b = {"x": jnp.arange(6.0).at[5].set(jnp.nextafter(5.0, 6.0)), "y": jnp.int32(7)}
    assert detect.fingerprint_hex(a) != detect.fingerprint_hex(b)
    mesh = make_mesh(jax.devices()[:3])
    assert detect.fingerprint_hex(jax.device_put(a, replicated(mesh))) == detect.fingerprint_hex(a)


def test_fingerprint_values_stay_those_of_earlier_versions():
    """Checkpoints record their state's fingerprint: the one-pass hash must give the values
    the earlier two-pass form gave (pinned from it), for every kind of leaf."""
    rng = np.random.default_rng(1)
    tree = {
        "w": rng.standard_normal((300, 7)).astype(np.float32),
        "b": np.arange(5, dtype=np.int32),
        "h": np.ones(3, np.float16),
        "m": np.array([True, False]),
        "s": np.float32(2.5),
        "e": np.zeros((0,), np.float32),
    }
    assert detect.fingerprint_hex(tree) == "6a36d9712be33ce8"


def test_classify_separates_losses_from_bugs():
    assert detect.classify(errors.DeviceLost("UNAVAILABLE: x")) == detect.DEVICE_LOSS
    assert detect.classify(RuntimeError("Gloo all-reduce failed: Connection reset by peer")) == (
        detect.HOST_LOSS
    )
    assert detect.classify(TypeError("unsupported operand")) == detect.PROGRAMMING
    assert detect.classify(ValueError("UNAVAILABLE")) == detect.PROGRAMMING


def test_anomaly_guard_counts_within_the_window_and_spots_spikes():
    guard = detect.AnomalyGuard(max_anomalies=3, window=10, spike_zscore=4.0)
    for step in range(1, 30):
        assert guard.observe(step, 1.0 + 0.01 * (step % 3), skipped=False) is None
    assert guard.observe(30, 50.0, skipped=False) == "spike"
    assert guard.observe(41, float("nan"), skipped=True) == "nan"
    assert not guard.rollback_due  # 30 fell out of the window
    assert guard.observe(42, 1.0, skipped=True) == "nan"
    assert guard.observe(45, 1.0, skipped=True) == "nan"
    assert guard.rollback_due and guard.recent() == [41, 42, 45]


def test_the_watchdog_reports_its_longest_quiet_outside_allowed_work():
    now = [0.0]
    dog = detect.Watchdog(5.0, lambda idle: None, factor=10.0, clock=lambda: now[0])
    for gap in (0.1, 0.3, 0.2):
        now[0] += gap
        dog.pet()
    with dog.allow(60.0):  # a compilation: 30 s without a pet is allowed, and not counted
        now[0] += 30.0
        dog.pet()
    now[0] += 0.25
    dog.pet()
    assert dog.report() == pytest.approx(
        {"watchdog_deadline_s": 5.0, "watchdog_longest_quiet_s": 0.3}
    )
    for _ in range(5):  # the median interval is 0.8 s now: a deadline of 10 x 0.8 s
        now[0] += 0.8
        dog.pet()
    assert dog.report() == pytest.approx(
        {"watchdog_deadline_s": 8.0, "watchdog_longest_quiet_s": 0.8}
    )


def test_watchdog_fires_once_after_the_timeout_with_a_fake_clock():
    now = [0.0]
    fired = threading.Event()
    calls = []

    def on_hang(idle):
        calls.append(idle)
        fired.set()

    dog = detect.Watchdog(5.0, on_hang, clock=lambda: now[0], poll=0.01)
    with dog:
        now[0] = 4.0
        dog.pet()
        now[0] = 8.9
        assert not fired.wait(0.1)
        now[0] = 9.0
        assert fired.wait(2.0)
    assert calls == [5.0]
