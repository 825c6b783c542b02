"""Fault-tolerance overhead: steps/s of the supervised Trainer with every protection on vs a
bare hand-written jitted shard_map loop on the same model and data (and vs the unprotected
Trainer), one step per call and K steps per call (`train.steps_per_call`) alike; repeats
interleaved, median ratio."""

from __future__ import annotations

import collections
import functools
import os
import time

from .common import Context, Section, _median, _progress, _pyplot, _save, _table, config_module

# Overhead variants: (supervisor on, the tier checkpointed every 100 steps, fingerprints every
# 50 steps + watchdog). "bare" is the hand-written loop; the *_only variants split the
# protections' cost. "protected" saves to the persistent tier (Orbax) every 100 steps;
# "protected_memory" to the memory tier every 100 steps, and to the persistent tier by time
# (checkpoint.every_secs, the default for long runs). A "_fused" name runs
# K = overhead_steps_per_call steps per call, the others one.
OVERHEAD_VARIANTS = {
    "plain": (False, None, False),
    "checkpoint_only": (True, "persistent", False),
    "fingerprints_only": (True, None, True),
    "protected": (True, "persistent", True),
    "protected_memory": (True, "memory", True),
}


def _overhead_config(rows: int, steps: int, variant: str, steps_per_call: int = 1):
    supervised, tier, checks = OVERHEAD_VARIANTS[variant.removesuffix("_fused")]
    c = config_module("seed_logreg").get_config()
    if rows:  # a larger generated problem (the seed data is sklearn's, 10k rows)
        c.data.source, c.data.n_samples, c.data.n_informative = "synthetic", rows, 5
    c.train.num_steps = steps
    c.train.log_every = 10**9
    c.supervisor.enabled = supervised
    c.checkpoint.every_steps = 100 if tier == "persistent" else 0  # async Orbax save
    c.checkpoint.local_every_steps = 100 if tier == "memory" else 0  # memory-tier save
    c.supervisor.fingerprint_every = 50 if checks else 0  # replica fingerprints (SDC)
    c.supervisor.watchdog_secs = 60.0 if checks else 0.0  # step watchdog thread
    c.train.steps_per_call = steps_per_call if variant.endswith("_fused") else 1
    return c


def _time_trainer(config, dataset, devices, workdir: str, warm: int) -> tuple[float, float]:
    """(steps/s from step `warm` to the last, final loss) of one Trainer.fit."""
    from jaxdml.training.hooks import OnMetrics
    from jaxdml.training.trainer import Trainer

    n = config.train.num_steps
    marks: dict[int, float] = {}

    def mark(rows):  # rows arrive in bulk: their own finish time, not the delivery's
        for row in rows:  # (a fused call's rows: its finish, shared out evenly)
            if row["step"] in (warm, n):
                marks.setdefault(row["step"], row["time"])

    trainer = Trainer(config, workdir, devices=devices, dataset=dataset, hooks=[OnMetrics(mark)])
    result = trainer.fit()
    return (n - warm) / (marks[n] - marks[warm]), float(result["loss"])


def bare_loop(
    x,
    y,
    devices,
    learning_rate: float,
    steps: int,
    warm: int,
    steps_per_call: int = 1,
    depth: int = 2,
) -> tuple[float, float]:
    """A hand-written data-parallel logistic-regression GD loop, nothing else.

    jax.shard_map computes each device's loss and gradient sums; one psum of them raveled
    into one vector adds them (as the trainer's step does: on CPU each collective is a
    rendezvous of the device threads, and one psum per leaf made this loop 1.8x slower
    at 8k x 20); optax applies SGD. At most `depth` calls are in flight (the trainer's
    `train.dispatch_depth`; docs/architecture.md: unbounded dispatch of collectives
    deadlocks on CPU), each of `steps_per_call` steps (a `lax.fori_loop`). No metrics,
    checkpoints, guards or hooks.

    Returns:
      (steps/s from the first call's end at or after step `warm` to the last, final loss).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.flatten_util import ravel_pytree
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(devices), ("data",))
    n = len(x) // len(devices) * len(devices)
    xs = jax.device_put(x[:n], NamedSharding(mesh, P("data")))
    ys = jax.device_put(y[:n].astype(np.float32), NamedSharding(mesh, P("data")))
    params = {"w": jnp.zeros((x.shape[1],)), "b": jnp.zeros(())}
    params = jax.device_put(params, NamedSharding(mesh, P()))
    opt = optax.sgd(learning_rate)
    opt_state = opt.init(params)

    def local(p, xb, yb):
        def loss_sum(q):
            z = xb @ q["w"] + q["b"]
            return jnp.sum(jax.nn.softplus(z) - yb * z)

        p = jax.lax.pcast(p, "data", to="varying")  # per-device grads; psum aggregates
        flat, unravel = ravel_pytree(jax.value_and_grad(loss_sum)(p))
        return unravel(jax.lax.psum(flat, "data"))

    sums = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P())

    def one(p, s, xb, yb):
        loss, grads = sums(p, xb, yb)
        updates, s = opt.update(jax.tree.map(lambda g: g / n, grads), s, p)
        return optax.apply_updates(p, updates), s, loss / n

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def call(p, s, xb, yb):
        if steps_per_call == 1:
            return one(p, s, xb, yb)
        body = lambda _, c: one(c[0], c[1], xb, yb)  # noqa: E731
        return jax.lax.fori_loop(0, steps_per_call, body, (p, s, jnp.zeros(())))

    k = steps_per_call
    inflight: collections.deque = collections.deque()
    marks, done = {}, 0
    for _ in range(steps // k):
        if len(inflight) >= depth:
            inflight.popleft().block_until_ready()
            done += k
            marks.setdefault(done, time.perf_counter())
        params, opt_state, loss = call(params, opt_state, xs, ys)
        inflight.append(loss)
    while inflight:
        last = float(inflight.popleft())
        done += k
        marks.setdefault(done, time.perf_counter())
    start = min(m for m in marks if m >= warm)
    return (done - start) / (marks[done] - marks[start]), last


def _overhead_problem(ctx: Context, name: str, rows: int, steps: int) -> dict:
    import jax

    from jaxdml.data import load_dataset

    devices = jax.devices()[:4]
    k = ctx.settings.overhead_steps_per_call
    kinds = ["bare", "plain", "protected", "protected_memory", "bare_fused", "plain_fused"]
    kinds += ["protected_fused", "protected_memory_fused"]
    if ctx.settings.overhead_breakdown:
        kinds += ["checkpoint_only_fused", "fingerprints_only_fused"]
    configs = {v: _overhead_config(rows, steps, v, k) for v in kinds if not v.startswith("bare")}
    ds = load_dataset(configs["plain"].data)
    lr, depth = configs["plain"].train.learning_rate, configs["plain"].train.dispatch_depth
    warm = max(110, steps // 10)  # past compiling the step, the first save and the first check
    rates, losses = collections.defaultdict(list), {}
    for r in _progress(range(ctx.settings.overhead_repeats), f"overhead {name}"):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:  # interleaved: drift hits all alike
            if kind.startswith("bare"):
                per_call = k if kind == "bare_fused" else 1
                rate, losses[kind] = bare_loop(
                    ds.x_train, ds.y_train, devices, lr, steps, warm, per_call, depth
                )
            else:
                workdir = os.path.join(ctx.work, "overhead", f"{name}-{kind}-{r}".replace(" ", ""))
                rate, losses[kind] = _time_trainer(configs[kind], ds, devices, workdir, warm)
            rates[kind].append(rate)

    def ratio(a: str, b: str) -> float:  # median of the per-repeat ratios
        return _median([x / y for x, y in zip(rates[a], rates[b], strict=True)])

    return {
        "problem": name,
        "rows": len(ds.x_train),
        "steps": steps,
        "warm": warm,
        "devices": 4,
        "rates": dict(rates),
        "median_rate": {k: _median(v) for k, v in rates.items()},
        "steps_per_call": k,
        "dispatch_depth": depth,
        "protected_over_bare": ratio("protected", "bare"),
        "plain_over_bare": ratio("plain", "bare"),
        "fused_protected_over_bare": ratio("protected_fused", "bare_fused"),
        "fused_plain_over_bare": ratio("plain_fused", "bare_fused"),
        "fused_protected_over_one_step_bare": ratio("protected_fused", "bare"),
        "protected_memory_over_bare": ratio("protected_memory", "bare"),
        "fused_protected_memory_over_bare": ratio("protected_memory_fused", "bare_fused"),
        "over_plain": {
            v: ratio(v, "plain_fused" if v.endswith("_fused") else "plain")
            for v in kinds
            if not v.startswith(("bare", "plain"))
        },
        "final_loss": losses,
    }


def run(ctx: Context) -> Section:
    """The overhead section: every problem of ctx.settings, a table and a bar plot."""
    results = [_overhead_problem(ctx, *p) for p in ctx.settings.overhead_problems]
    split = ctx.settings.overhead_breakdown
    header = ["problem", "steps per call", "steps", "bare steps/s", "plain steps/s",
              "protected steps/s", "plain/bare", "protected/bare", "protected/plain",
              "protected (memory tier)/bare"]  # fmt: skip
    if split:
        header += ["checkpoint only/plain", "fingerprints+watchdog only/plain"]
    rows = []
    for r in results:
        m, over = r["median_rate"], r["over_plain"]
        for fused in ("", "_fused"):
            plain_bare = r["fused_plain_over_bare" if fused else "plain_over_bare"]
            prot_bare = r["fused_protected_over_bare" if fused else "protected_over_bare"]
            memory_bare = r[
                "fused_protected_memory_over_bare" if fused else "protected_memory_over_bare"
            ]
            row = [r["problem"], r["steps_per_call"] if fused else 1, r["steps"],
                   f"{m['bare' + fused]:.0f}", f"{m['plain' + fused]:.0f}",
                   f"{m['protected' + fused]:.0f}", f"{plain_bare:.2f}",
                   f"**{prot_bare:.2f}**", f"{over['protected' + fused]:.2f}",
                   f"**{memory_bare:.2f}**"]  # fmt: skip
            if split:
                row += [f"{over[k + fused]:.2f}" if k + fused in over else "-"
                        for k in ("checkpoint_only", "fingerprints_only")]  # fmt: skip
            rows.append(row)
    losses = "; ".join(
        f"{r['problem']}: bare {r['final_loss']['bare']:.6f}, "
        f"protected {r['final_loss']['protected']:.6f}, "
        f"protected fused {r['final_loss']['protected_fused']:.6f}"
        for r in results
    )
    against_one = ", ".join(
        f"{r['problem']} {r['fused_protected_over_one_step_bare']:.2f}" for r in results
    )
    body = OVERHEAD_TEXT.format(
        repeats=ctx.settings.overhead_repeats,
        k=ctx.settings.overhead_steps_per_call,
        depth=results[0]["dispatch_depth"],
    )
    body += _table(header, rows)
    body += f"\n\nFinal losses (the same model and data in every loop): {losses}."
    body += (
        f"\n\nThe protected Trainer at {ctx.settings.overhead_steps_per_call} steps per call "
        f"against the bare loop at one step per call: {against_one}."
    )
    return Section("overhead", body, {"problems": results}, [_plot_overhead(ctx, results)])


OVERHEAD_TEXT = (
    "Full-batch logistic-regression GD on 4 simulated CPU devices, {repeats} repeats "
    "interleaved (the order of the variants alternates), steps/s from step `warm` (past "
    "step 110: the compilation of the step, the first checkpoint and the first fingerprint "
    "check are excluded) to the last step, median per variant; ratios are medians of "
    "the per-repeat ratios.\n\n"
    "- **bare**: a hand-written jitted `jax.shard_map` + `psum` + optax loop, dispatch "
    "depth {depth} (the trainer's), nothing else (`bare_loop` in "
    "scripts/benchmarks/overhead.py); at {k} steps "
    "per call its jitted function runs a `lax.fori_loop` of {k} steps.\n"
    "- **plain**: `jaxdml.Trainer.fit()` without the supervisor: batcher, NaN guard (always "
    "on in the step), the step's metrics (batch accuracy from the loss's forward pass, "
    "gradient and parameter norms) kept on the devices and fetched every "
    "`train.fetch_every` steps, metrics.jsonl, goodput record.\n"
    "- **protected**: the `jaxdml.train` path, supervisor and every protection: async "
    "checkpoint every 100 steps, NaN guard, replica fingerprints every 50 steps, step "
    "watchdog. The full run also times the checkpoints alone and the fingerprints and "
    "watchdog alone, each under the supervisor (at {k} steps per call).\n"
    "- **protected (memory tier)**: the same protections with the checkpoint every 100 "
    "steps in the memory tier (`checkpoint.local_every_steps=100`: each process's own copy "
    "in /dev/shm, written by a thread that also waits for the step) and the persistent "
    "Orbax checkpoint by time (`checkpoint.every_secs`, 300 s by default; none falls inside "
    "the timed steps). An Orbax save blocks the loop about 12 ms "
    "even for a tiny state, and a save issued while the previous one is still committing "
    "waits for it (about 55 ms in all), so a persistent save every 100 steps of a 0.3 ms "
    "step cannot be nearly free; the two tiers are how a run checkpoints often.\n"
    "- The rows at {k} steps per call run plain and protected with "
    "`train.steps_per_call={k}`: one XLA call runs up to {k} steps, ending at every save, "
    "replica check and evaluation step; each row is compared with the bare loop at the same "
    "number of steps per call.\n\n"
)


def _plot_overhead(ctx: Context, results: list[dict]) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 3.8), squeeze=False)
    names = {"checkpoint_only": "ckpt\nonly", "fingerprints_only": "fp+wd\nonly",
             "protected_memory": "protected\nmemory"}  # fmt: skip
    colors = {"bare": "#7f7f7f", "plain": "#1f77b4", "protected": "#d62728"}
    order = ["bare", "plain", "protected", "protected_memory", "checkpoint_only",
             "fingerprints_only"]  # fmt: skip
    for ax, r in zip(axes[0], results, strict=True):
        kinds = sorted(
            r["rates"],
            key=lambda v: (
                v.endswith("_fused"),
                order.index(v[:-6] if v.endswith("_fused") else v),
            ),
        )
        base = [k.removesuffix("_fused") for k in kinds]
        labels = [names.get(b, b) + (f"\n×{r['steps_per_call']}" if k != b else "")
                  for k, b in zip(kinds, base, strict=True)]  # fmt: skip
        heights = [r["median_rate"][k] for k in kinds]
        ax.bar(labels, heights, color=[colors.get(b, "#ff7f0e") for b in base])
        for i, k in enumerate(kinds):
            ax.scatter([i] * len(r["rates"][k]), r["rates"][k], color="k", s=8, zorder=3)
        ax.set_title(
            f"{r['problem']}: protected/bare = {r['protected_over_bare']:.2f} (1 step per call), "
            f"{r['fused_protected_over_bare']:.2f} (×{r['steps_per_call']})",
            fontsize=8,
        )
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel("steps/s")
    return _save(fig, ctx.plot_path("overhead.png"))
