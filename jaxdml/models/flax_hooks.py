"""Linen's Dropout and BatchNorm made device-count invariant, by method interception.

Inside the step, a user's module runs on one device's shard of the global batch.
Left alone, linen's layers would make the result depend on how the batch is split:

- `nn.Dropout` draws one mask for the shard's shape from the layer's key, so row r's
  mask would depend on where r sits in its shard. Here each row's mask is drawn from
  `fold_in(layer key, global sample index)`: the mask of sample i at step s is the same
  for any device count, after a device loss, and on a resume (the layer key is flax's
  own `make_rng('dropout')` of the step's key, so it also differs between layers).
- `nn.BatchNorm` (with an `axis_name`) averages the shards' means, which is not the mean
  of the batch when shards hold different numbers of real rows (padding rows carry
  weight 0). Here the statistics are weighted sums psummed over the device axis:
  the batch's exact mean and variance, the same for any device count up to float order.
  Normalization, scale, bias and the running averages are flax's own.

Both fall back to the layers' own code where they do not apply (evaluation, init,
`deterministic=True`, a Dropout whose input is not one row per sample).
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import normalization

from jaxdml.models.base import StepContext


def _argument(args: tuple, kwargs: dict, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def _dropout(module: nn.Dropout, next_fun, args, kwargs, ctx: StepContext):
    x = args[0]
    deterministic = nn.merge_param(
        "deterministic", module.deterministic, _argument(args, kwargs, "deterministic", 1)
    )
    dims = [d % max(x.ndim, 1) for d in module.broadcast_dims]
    per_row = x.ndim >= 1 and x.shape[0] == ctx.rows.shape[0] and 0 not in dims
    if deterministic or module.rate == 0.0 or not per_row or kwargs.get("rng") is not None:
        return next_fun(*args, **kwargs)
    if module.rate == 1.0:
        return jnp.zeros_like(x)
    keep = 1.0 - module.rate
    key = module.make_rng(module.rng_collection)
    shape = [1 if d + 1 in dims else s for d, s in enumerate(x.shape[1:])]
    draw = lambda i: jax.random.bernoulli(jax.random.fold_in(key, i), keep, shape)  # noqa: E731
    mask = jnp.broadcast_to(jax.vmap(draw)(ctx.rows), x.shape)
    return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


def _batch_norm(module: nn.BatchNorm, next_fun, args, kwargs, ctx: StepContext):
    x = args[0]
    use_running = nn.merge_param(
        "use_running_average",
        module.use_running_average,
        _argument(args, kwargs, "use_running_average", 1),
    )
    if use_running or module.is_initializing() or x.shape[0] != ctx.weights.shape[0]:
        return next_fun(*args, **kwargs)
    feature_axes = tuple(a % x.ndim for a in normalization._canonicalize_axes(x.ndim, module.axis))
    reduction = tuple(a for a in range(x.ndim) if a not in feature_axes)
    w = ctx.weights.reshape((-1,) + (1,) * (x.ndim - 1)).astype(jnp.float32)
    if kwargs.get("mask") is not None:
        w = w * kwargs["mask"]
    w = jnp.broadcast_to(w, x.shape)
    xf = x.astype(jnp.float32)
    sums = jnp.stack([jnp.sum(w * v, reduction) for v in (jnp.ones_like(xf), xf, xf * xf)])
    if ctx.axis_name is not None:
        sums = jax.lax.psum(sums, ctx.axis_name)
    count = jnp.maximum(sums[0], 1.0)
    mean = sums[1] / count
    var = jnp.maximum(0.0, sums[2] / count - mean * mean)
    feature_shape = [x.shape[a] for a in feature_axes]
    ra_mean = module.variable("batch_stats", "mean", jnp.zeros, feature_shape, jnp.float32)
    ra_var = module.variable("batch_stats", "var", jnp.ones, feature_shape, jnp.float32)
    ra_mean.value = module.momentum * ra_mean.value + (1 - module.momentum) * mean
    ra_var.value = module.momentum * ra_var.value + (1 - module.momentum) * var
    return normalization._normalize(
        module, x, mean, var, reduction, feature_axes, module.dtype, module.param_dtype,
        module.epsilon, module.use_bias, module.use_scale, module.bias_init, module.scale_init,
        module.force_float32_reductions,
    )  # fmt: skip


@contextlib.contextmanager
def invariant_layers(ctx: StepContext):
    """Within it, linen Dropout and BatchNorm calls use `ctx`'s row indices, weights and
    device axis (see the module docstring)."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, nn.Dropout):
            return _dropout(module, next_fun, args, kwargs, ctx)
        if context.method_name == "__call__" and isinstance(module, nn.BatchNorm):
            return _batch_norm(module, next_fun, args, kwargs, ctx)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield
