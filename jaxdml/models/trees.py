"""Histogram gradient-boosted decision trees: binning, histograms, split gain, growth, prediction.

Math only. One boosting round grows one tree per output (binary logistic: one;
multiclass softmax: one per class) depth-wise to `max_depth`:

  margins of the rows (kept by the caller, or recomputed from the trees so far)
  -> gradients g, hessians h
  -> fixed-point integers (a global scale: sums are exact, in any order)
  for each level: local gradient/hessian histograms [features, outputs, nodes, bins]
                  -> `reduce.sum_scatter` (a reduce-scatter across devices: each keeps
                     the global histograms of its block of features)
                  -> each device's best split per node among its features
                  -> `reduce.gather` of those few numbers: every caller picks the same
                  -> rows move down
  leaf values -lr * G / (H + l2) from the last level's children sums, and the new
  trees' addition to the rows' margins.

Because every split is chosen from summed integer histograms, every device grows
the same tree, bitwise, for any device count, and nothing is broadcast. A level
after the root builds histograms only for the smaller child of each parent and
derives the other as parent - smaller (histogram subtraction: half the reduction
volume). Scoring splits only for its own features divides that work by the device
count instead of repeating it on every device.

Trees are complete binary trees stored as fixed-size arrays (heap order: node i has
children 2i+1 and 2i+2); a node that does not split sends every row left (threshold
bin `num_bins - 1`) and every leaf below it holds the node's own value. Bin edges
are quantiles of the whole training set, computed once on the host
(jaxdml.models.binning); bin b of feature f holds edges[f, b-1] < x <= edges[f, b], so
"bin <= b" is "x <= edges[f, b]" and the trees predict from raw features too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdml.models.binning import bin_features, quantile_bin_edges

__all__ = ["Collectives", "GBDTModel", "bin_features", "quantile_bin_edges"]

Params = dict[str, jax.Array]


def _identity(tree: Any) -> Any:
    return tree


def _stack_one(x: jax.Array) -> jax.Array:
    return x[None]


def _first() -> int:
    return 0


@dataclasses.dataclass(frozen=True)
class Collectives:
    """How callers combine their shards (defaults: a single caller holding all rows).

    Attributes:
      sum, max: over a pytree (psum / pmax over the 'data' axis under shard_map).
      sum_scatter: sums an array over callers, each keeping its block of axis 0
        (psum_scatter); `size` must divide that axis.
      gather: every caller's integer array, stacked on a new axis 0 in caller order.
      index: this caller's position (axis_index); size: the number of callers.
      varying: marks a new value as per-caller (pcast to varying under shard_map, where
        loop carries must say whether they differ between callers).
    """

    sum: Callable[[Any], Any] = _identity
    max: Callable[[Any], Any] = _identity
    sum_scatter: Callable[[jax.Array], jax.Array] = _identity
    gather: Callable[[jax.Array], jax.Array] = _stack_one
    index: Callable[[], Any] = _first
    size: int = 1
    varying: Callable[[jax.Array], jax.Array] = _identity


_TINY = 1e-15  # keeps G^2 / (H + l2) finite when l2 = 0 and a child is empty


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True, eq=False)
class GBDTModel:
    """Gradient-boosted trees with fixed-size array storage.

    Attributes:
      num_features: input columns F.
      num_classes: label count K; K = 2 is binary logistic (one tree per round),
        K > 2 multiclass softmax (K trees per round).
      edges: bin edges [F, num_bins - 1] from `quantile_bin_edges`.
      num_trees: boosting rounds (the params hold this many rounds of trees).
      max_depth: depth of every tree (2^max_depth leaves).
      learning_rate: shrinkage applied to leaf values.
      min_child_weight: a split needs at least this hessian sum on each side.
      gamma: a split needs a gain above this.
      l2: L2 penalty on leaf values (lambda in G^2 / (H + lambda)).
      packed_sums: build each histogram as one scatter-add of int64 values packing
        g * 2^32 + h (~15% faster on CPU) instead of int32 pairs; the sums, hence the
        trees, are the same either way (`jaxdml.models.build_model`: on CPU only).
    """

    num_features: int
    num_classes: int
    edges: np.ndarray
    num_trees: int = 50
    max_depth: int = 6
    learning_rate: float = 0.3
    min_child_weight: float = 1.0
    gamma: float = 0.0
    l2: float = 1.0
    packed_sums: bool = False

    def __post_init__(self):
        if self.num_features >= 2**16 or self.edges.shape[1] >= 2**15:
            raise ValueError("GBDTModel packs a feature (< 2^16) and a bin (< 2^15) in an int32")

    @property
    def num_bins(self) -> int:
        return int(self.edges.shape[1]) + 1

    @property
    def num_outputs(self) -> int:
        return 1 if self.num_classes == 2 else self.num_classes

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Host-side binning of raw features [n, F] into the integer bins the step uses."""
        return bin_features(x, self.edges)

    def init(self, key: jax.Array) -> Params:
        """Empty trees: every leaf value is 0, so they add nothing until grown."""
        del key
        shape = (self.num_trees, self.num_outputs)
        internal, leaves = 2**self.max_depth - 1, 2**self.max_depth
        return {
            "feature": jnp.zeros((*shape, internal), jnp.int32),
            "threshold_bin": jnp.zeros((*shape, internal), jnp.int32),
            "threshold": jnp.zeros((*shape, internal), jnp.float32),
            "leaf": jnp.zeros((*shape, leaves), jnp.float32),
            "base": jnp.zeros((self.num_outputs,), jnp.float32),
        }

    # ------------------------------------------------------------------------- prediction

    def _leaf_index(self, feature: jax.Array, threshold: jax.Array, x: jax.Array) -> jax.Array:
        """Leaf reached by each row of raw features x [n, F] in one round's trees: [n, outputs].

        feature, threshold: [outputs, internal nodes].
        """
        node = jnp.zeros((x.shape[0], feature.shape[0]), jnp.int32)
        for _ in range(self.max_depth):
            value = _row_values(x, _per_output(feature, node))
            node = 2 * node + 1 + (value > _per_output(threshold, node))
        return node - feature.shape[1]

    def _binned_leaf_index(self, feature, threshold_bin, xb: jax.Array) -> jax.Array:
        """`_leaf_index` for binned rows; feature and bin packed into one int32 per node,
        so each level gathers once from the tree (1.4x faster, measured)."""
        code = (threshold_bin << 16) | feature  # bins < 2^15, features < 2^16
        node = jnp.zeros((xb.shape[0], feature.shape[0]), jnp.int32)
        for _ in range(self.max_depth):
            c = _per_output(code, node)
            value = _row_values(xb, c & 0xFFFF).astype(jnp.int32)
            node = 2 * node + 1 + (value > (c >> 16))
        return node - feature.shape[1]

    def margins(self, params: Params, x: jax.Array) -> jax.Array:
        """Raw scores [n, outputs] of float features x [n, F] from all trees."""
        params = jax.tree.map(jnp.asarray, params)

        def add_round(t, m):
            index = self._leaf_index(params["feature"][t], params["threshold"][t], x)
            return m + _per_output(params["leaf"][t], index)

        start = params["base"] + jnp.zeros_like(x[:, :1], jnp.float32)  # [n, outputs]
        return jax.lax.fori_loop(0, self.num_trees, add_round, start)

    def binned_margins(self, params: Params, xb: jax.Array, num_rounds: jax.Array) -> jax.Array:
        """Raw scores [n, outputs] of binned rows xb from the first `num_rounds` rounds.

        The rounds are added one at a time, base + tree_0 + tree_1 + ..., the same float
        adds in the same order as margins kept round by round (`grow_round`'s delta): the
        two are bitwise equal.
        """
        params = jax.tree.map(jnp.asarray, params)

        def add_round(t, m):
            index = self._binned_leaf_index(params["feature"][t], params["threshold_bin"][t], xb)
            return m + _per_output(params["leaf"][t], index)

        start = self.base_margins(params["base"], xb)
        return jax.lax.fori_loop(0, num_rounds, add_round, start)

    @staticmethod
    def base_margins(base: jax.Array, xb: jax.Array) -> jax.Array:
        """The base [outputs] as every row's margins [n, outputs] before any tree."""
        # zeros_like(xb): the rows' values are per-row (varying across devices under shard_map).
        return base + jnp.zeros_like(xb[:, :1], jnp.float32)

    def predict(self, params: Params, x: jax.Array) -> jax.Array:
        """Predicted labels [n] int32 of float features x [n, F]."""
        return _labels(self.margins(params, x))

    # ------------------------------------------------------------------------- objective

    def base_margin(self, class_weights: jax.Array) -> jax.Array:
        """The constant first guess [outputs] from the (global) class weight sums [K]."""
        p = jnp.clip(class_weights / jnp.sum(class_weights), 1e-7, 1 - 1e-7)
        if self.num_outputs == 1:
            return jnp.log(p[1:] / p[0])
        logp = jnp.log(p)
        return logp - jnp.mean(logp)

    def gradients(self, margins: jax.Array, y: jax.Array, w: jax.Array) -> tuple:
        """Weighted gradients, hessians [n, outputs, 2] of the log loss, and row losses [n]."""
        if self.num_outputs == 1:
            z = margins[:, 0]
            p = jax.nn.sigmoid(z)[:, None]
            target = y[:, None].astype(jnp.float32)
            loss = jax.nn.softplus(z) - y * z
        else:
            p = _row_softmax(margins)
            target = jax.nn.one_hot(y, self.num_outputs)
            picked = jnp.take_along_axis(margins, y[:, None], -1)[:, 0]
            loss = jax.nn.logsumexp(margins, -1) - picked
        gh = jnp.stack([p - target, p * (1.0 - p)], axis=-1) * w[:, None, None]
        return gh, loss

    def quantize(self, gh: jax.Array, reduce: Collectives) -> tuple[jax.Array, jax.Array]:
        """Fixed-point gradients and hessians: int32 [n, outputs, 2] and their scale [outputs, 2].

        Integer histograms sum exactly, in any order: the histograms, hence the splits and
        leaf values, are bitwise the same for any number of devices (XGBoost's GPU
        'deterministic histogram' idea). The scale is 2^30 / (rows * max |value|), from
        an exact global count and max, so no sum over rows can overflow int32.
        """
        rows = reduce.sum(jnp.sum(jnp.any(gh != 0, axis=(1, 2)).astype(jnp.int32)))
        # Rows last: XLA's CPU reductions over the leading axis of [n, 2] were ~8x slower.
        peak = reduce.max(jnp.max(jnp.abs(jnp.moveaxis(gh, 0, -1)), axis=-1))  # [outputs, 2]
        scale = 2.0**30 / (jnp.maximum(rows, 1).astype(jnp.float32) * jnp.maximum(peak, 1e-30))
        return jnp.round(gh * scale).astype(jnp.int32), scale

    # ------------------------------------------------------------------------- histograms, splits

    def histogram(self, xb: jax.Array, pos: jax.Array, gh: jax.Array, num_nodes: int):
        """Local gradient/hessian histograms [outputs, num_nodes, F, bins, 2] (dtype of gh).

        Args:
          xb: bins [n, F]; pos: node of each row in each output's tree, [n, outputs]
            (rows outside [0, num_nodes) are left out); gh: weighted gradients and
            hessians [n, outputs, 2]; num_nodes: nodes at this level.
        """
        return self._histograms(xb.T, pos, gh, num_nodes).transpose(1, 2, 0, 3, 4)

    def _histograms(self, xt: jax.Array, node: jax.Array, gh: jax.Array, num_nodes: int):
        """`histogram` of feature-major bins xt [F, n], laid out [F, outputs, nodes, bins, 2].

        A loop over features of one scatter-add over all rows, outputs and nodes. On CPU,
        one scatter over all features at once was ~2x slower (its histogram leaves the
        cache) and unrolling the features compiled ~3x slower. Rows outside
        [0, num_nodes) go to a spare node that is dropped (out-of-range indices with
        mode='drop' were 4x slower; gathering only the wanted rows first was slower than
        scattering all of them); weight-0 rows add 0.
        """
        k, b = self.num_outputs, self.num_bins
        size = k * num_nodes * b
        inside = (node >= 0) & (node < num_nodes)
        base = jnp.where(inside, jnp.arange(k) * num_nodes + node, k * num_nodes) * b
        updates = gh.reshape(-1, 2)
        if self.packed_sums and gh.dtype == jnp.int32:
            updates = _pack(updates)

        def one_feature(column):
            idx = (base + column[:, None].astype(jnp.int32)).reshape(-1)
            with jax.enable_x64(True):
                hist = jnp.zeros((size + b, *updates.shape[1:]), updates.dtype)
                hist = hist.at[idx].add(updates, mode="promise_in_bounds")
            return _unpack(hist[:size])

        return jax.lax.map(one_feature, xt).reshape(-1, k, num_nodes, b, 2)

    def best_splits(self, hist, unscale, valid, reduce: Collectives) -> dict[str, jax.Array]:
        """The best split of every node from this caller's features of the global histograms.

        Gain (XGBoost's): 1/2 [GL^2/(HL+l2) + GR^2/(HR+l2) - G^2/(H+l2)] - gamma over the
        splits "bin <= b goes left" with at least `min_child_weight` hessian on each side;
        ties go to the lowest (feature, bin). A node splits only when its best gain is > 0.
        Each caller scores only its block of features; the callers' bests are gathered
        (a few numbers per node) and all pick the same one, as one caller with every
        feature would: the gains are the same float ops on the same integers.

        Args:
          hist: int histograms [bins, features here, outputs, nodes, 2].
          unscale: 1 / quantization scale [outputs, 1, 2].
          valid: [bins, features here], whether "bin <= b" is a split of that feature.

        Returns:
          feature, bin [outputs, nodes] (bin = num_bins - 1 where the node does not split),
          and the children's integer sums left, right and the node's total [outputs, nodes, 2].
        """
        gain, feature, bin_, left, total = self._local_best(hist, unscale, valid)
        feature = feature + reduce.index() * hist.shape[1]
        mine = [jax.lax.bitcast_convert_type(gain, jnp.int32), feature, bin_]
        every = reduce.gather(jnp.concatenate([jnp.stack(mine, -1), left, total], -1))
        who = jnp.argmax(jax.lax.bitcast_convert_type(every[..., 0], jnp.float32), axis=0)
        best = jnp.take_along_axis(every, who[None, ..., None], axis=0)[0]  # [k, N, 7]
        split = jax.lax.bitcast_convert_type(best[..., 0], jnp.float32) > 0
        total = every[0, ..., 5:]  # the same on every caller
        left = jnp.where(split[..., None], best[..., 3:5], total)  # no split: all rows go left
        return {
            "feature": jnp.where(split, best[..., 1], 0),
            "bin": jnp.where(split, best[..., 2], self.num_bins - 1),
            "left": left,
            "right": total - left,
            "total": total,
        }

    def _local_best(self, hist, unscale, valid):
        """Best gain, feature, bin and left sums [outputs, nodes] among this caller's features.

        Cumulative sums over bins by a scan (XLA's CPU cumsum was ~10x slower); argmax
        takes the first maximum: the lowest bin, then the lowest feature.
        """

        def score(s):
            g, h = s[..., 0], s[..., 1]
            return g**2 / jnp.maximum(h + self.l2, _TINY)

        cum = _cumsum_major(hist)  # [b, F, k, N, 2]
        total = cum[-1]
        left, right, parent = cum * unscale, (total - cum) * unscale, total * unscale
        gain = 0.5 * (score(left) + score(right) - score(parent)) - self.gamma
        ok = (left[..., 1] >= self.min_child_weight) & (right[..., 1] >= self.min_child_weight)
        gain = jnp.where(ok & valid[:, :, None, None], gain, -jnp.inf)
        bin_ = jnp.argmax(gain, axis=0)  # [F, k, N]: each feature's best
        gain = jnp.take_along_axis(gain, bin_[None], 0)[0]
        left = jnp.take_along_axis(cum, bin_[None, ..., None], 0)[0]  # [F, k, N, 2]
        feature = jnp.argmax(gain, axis=0)  # [k, N]

        def pick(a):  # a[feature[k, N], k, N, ...]
            at = feature.reshape(1, *feature.shape, *[1] * (a.ndim - 3))
            return jnp.take_along_axis(a, at, 0)[0]

        return pick(gain), feature, pick(bin_), pick(left), total[0]

    def _valid_bins(self, num_columns: int) -> np.ndarray:
        """[bins, columns]: "bin <= b" splits column f (False for repeated padding columns)."""
        edges = np.zeros(num_columns, np.int64)
        edges[: self.num_features] = np.sum(np.isfinite(self.edges), axis=1)
        return np.arange(self.num_bins)[:, None] < edges[None, :]

    def _columns(self, xb: jax.Array, callers: int) -> jax.Array:
        """Feature-major bins [F', n], F' the multiple of `callers` at or above F.

        Each caller scores F' / callers features; the padding columns repeat real ones
        (so every caller's histograms hold the nodes' totals) and never split.
        """
        num = -(-self.num_features // callers) * callers
        xt = xb.T
        return xt if num == self.num_features else xt[np.arange(num) % self.num_features]

    # ------------------------------------------------------------------------- one round

    def grow_trees(self, xb, gh, scale, reduce: Collectives) -> tuple[dict, jax.Array]:
        """Grows one tree per output depth-wise from quantized gh [n, outputs, 2].

        One loop iteration per level, all levels with the deepest level's shapes (unused
        nodes stay empty), so the level compiles once: the padding costs little, since
        histograms cost per row and the split search is small next to them. A level
        builds the histograms of each parent's smaller child (by hessian sum; the root:
        all rows), sums them across callers, each caller keeping its block of features,
        and derives the other child as parent - smaller (exact: integers). Every caller
        then picks the same splits (`best_splits`) and moves its rows down.

        A node that does not split passes its own sums to both children (its rows all
        go left, by bin), so every leaf below it gets the node's value and the raw
        threshold does not matter there (it is 0: every parameter stays small).

        Returns:
          trees: feature, threshold_bin, threshold [outputs, internal nodes], leaf
          [outputs, leaves]; and the leaf each row reached [n, outputs].
        """
        k, depth = self.num_outputs, self.max_depth
        wide = 2 ** (depth - 1)  # nodes of the deepest level that splits
        half = max(wide // 2, 1)  # its parents: the smaller children histograms
        xt = self._columns(xb, reduce.size)
        mine = xt.shape[0] // reduce.size  # features this caller scores
        valid = jax.lax.dynamic_slice_in_dim(
            jnp.asarray(self._valid_bins(xt.shape[0])), reduce.index() * mine, mine, axis=1
        )
        unscale = 1.0 / scale[:, None, :]
        rows = jnp.zeros(gh.shape[:2], jnp.int32)

        def level(d, c):
            small = reduce.sum_scatter(self._histograms(xt, c["small"], gh, half))
            small = jnp.moveaxis(small, 3, 0)  # [b, features here, k, half, 2]
            hist = _children(c["hist"][..., :half, :], small, c["left_small"], d > 0)
            hist = hist[..., :wide, :]
            s = self.best_splits(hist, unscale, valid, reduce)
            value = jnp.where(d > 0, c["value"][:, :wide], s["total"])
            split = (s["bin"] < self.num_bins - 1)[..., None]
            children = [jnp.where(split, s[side], value) for side in ("left", "right")]
            node, code = c["pos"], _per_output((s["bin"] << 16) | s["feature"], c["pos"])
            right = _row_values(xb, code & 0xFFFF).astype(jnp.int32) > (code >> 16)
            left_small = s["left"][..., 1] <= s["right"][..., 1]  # [k, wide]
            in_small = right != _per_output(left_small, node)
            return {
                "pos": 2 * node + right,
                "small": jnp.where(in_small, node, -1),  # its parent: this level's node
                "left_small": left_small[:, :half],
                "hist": hist,
                "value": jnp.stack(children, axis=2).reshape(k, 2 * wide, 2),
                "feature": c["feature"].at[:, d].set(s["feature"]),
                "bin": c["bin"].at[:, d].set(s["bin"]),
            }

        start = {
            "pos": rows,
            "small": rows,  # the root: every row, "smaller child" 0 of no parent
            "left_small": jnp.ones((k, half), bool),
            "hist": jnp.zeros((self.num_bins, mine, k, wide, 2), gh.dtype),
            "value": jnp.zeros((k, 2 * wide, 2), gh.dtype),
            "feature": jnp.zeros((k, depth, wide), jnp.int32),
            "bin": jnp.zeros((k, depth, wide), jnp.int32),
        }
        per_caller = ("pos", "small", "hist")  # the others are the same on every caller
        start = {key: reduce.varying(v) if key in per_caller else v for key, v in start.items()}
        c = jax.lax.fori_loop(0, depth, level, start)
        return self._trees(c, scale), c["pos"]

    def _trees(self, grown: dict, scale: jax.Array) -> dict[str, jax.Array]:
        """Heap-ordered tree arrays from the levels' splits and the leaves' integer sums."""
        sums = grown["value"] / scale[:, None, :]
        leaf = -self.learning_rate * sums[..., 0] / jnp.maximum(sums[..., 1] + self.l2, _TINY)
        levels = range(self.max_depth)
        feature = jnp.concatenate([grown["feature"][:, d, : 2**d] for d in levels], axis=1)
        bin_ = jnp.concatenate([grown["bin"][:, d, : 2**d] for d in levels], axis=1)
        threshold = self._raw_threshold(feature, bin_)
        return {"feature": feature, "threshold_bin": bin_, "threshold": threshold, "leaf": leaf}

    def _raw_threshold(self, feature: jax.Array, bin_: jax.Array) -> jax.Array:
        """edges[feature, bin]: "bin <= b" is "x <= edges[f, b]"; 0 where nothing splits."""
        edges = np.where(np.isfinite(self.edges), self.edges, 0.0)
        padded = np.concatenate([edges, np.zeros((self.num_features, 1))], axis=1)
        return jnp.asarray(padded, jnp.float32)[feature, bin_]

    def grow_round(self, params, round_index, xb, y, w, reduce=Collectives(), margins=None):
        """One boosting round on this caller's rows, without placing it in the params.

        Args:
          params: the trees so far (rounds >= round_index are still empty).
          round_index: int32 scalar, the round to grow.
          xb, y, w: this caller's binned rows, labels and weights (0 for padding rows).
          reduce: how callers combine (`Collectives`; the defaults: one caller alone).
          margins: the rows' margins from rounds [0, round_index) if the caller kept them
            (not read at round 0: the base alone); None: computed here from the trees.

        Returns:
          (the round: its trees feature, threshold_bin, threshold, leaf [outputs, ...] and
          the base [outputs]; summed metrics loss, correct, weight, grad_sq; the rows'
          margins before this round [n, outputs]; and the new trees' addition to them
          [n, outputs]: margins + delta are bitwise what `binned_margins` recomputes).
        """
        classes = jnp.arange(self.num_classes)[:, None]
        counts = reduce.sum(jnp.sum(jnp.where(y == classes, w, 0.0), axis=1))  # rows last: fast
        base = jnp.where(round_index == 0, self.base_margin(counts), params["base"])
        if margins is None:
            margins = self.binned_margins({**params, "base": base}, xb, round_index)
        margins = jnp.where(round_index == 0, self.base_margins(base, xb), margins)
        gh, loss = self.gradients(margins, y, w)
        trees, leaf_index = self.grow_trees(xb, *self.quantize(gh, reduce), reduce)
        # One reduction over the stacked per-row terms, not four: fewer kernels to compile.
        terms = [w * loss, w * (_labels(margins) == y), w, jnp.sum(gh[..., 0] ** 2, axis=1)]
        total = reduce.sum(jnp.sum(jnp.stack(terms), axis=1))
        sums = {name: total[i] for i, name in enumerate(("loss", "correct", "weight", "grad_sq"))}
        delta = _per_output(trees["leaf"], leaf_index)
        return {**trees, "base": base}, sums, margins, delta

    def boost_round(self, params, round_index, xb, y, w, reduce=Collectives(), margins=None):
        """`grow_round`, with the round placed at `round_index` in the returned params."""
        grown, sums, margins, delta = self.grow_round(
            params, round_index, xb, y, w, reduce, margins
        )
        return self.place_round(params, round_index, grown), sums, margins, delta

    @staticmethod
    def place_round(params: Params, round_index, grown: dict) -> Params:
        """params with round `round_index`'s trees and the base from `grown`."""
        placed = {k: v.at[round_index].set(grown[k]) for k, v in params.items() if k != "base"}
        return {**placed, "base": grown["base"]}

    @staticmethod
    def round_of(params: Params, round_index) -> dict:
        """Round `round_index`'s trees and the base, as `grow_round` returns them."""
        return {k: v if k == "base" else v[round_index] for k, v in params.items()}


# Flat 1-D gathers: on CPU about 3x faster than take_along_axis on 2-D arrays (measured).


def _per_output(table: jax.Array, index: jax.Array) -> jax.Array:
    """table[k, index[i, k]] for tables [outputs, m] and indices [n, outputs]: [n, outputs]."""
    k, m = table.shape
    return jnp.asarray(table).reshape(-1)[jnp.arange(k) * m + index]


def _row_values(x: jax.Array, column: jax.Array) -> jax.Array:
    """x[i, column[i, k]] for x [n, F] and columns [n, outputs]: [n, outputs]."""
    n, num_f = x.shape
    return jnp.asarray(x).reshape(-1)[(jnp.arange(n) * num_f)[:, None] + column]


def _pack(gh: jax.Array) -> jax.Array:
    """int32 pairs [m, 2] as one int64 each, g * 2^32 + h: a sum of packed values is the
    packing of the sums while every sum fits an int32 (`quantize` bounds them by 2^30), so
    a histogram is one scalar scatter-add, not two-element windows (~15% faster on CPU)."""
    with jax.enable_x64(True):
        return (gh[:, 0].astype(jnp.int64) << 32) + gh[:, 1].astype(jnp.int64)


def _unpack(packed: jax.Array) -> jax.Array:
    """`_pack`'s inverse on sums: h is the low 32 bits read as a signed int32 (|h| < 2^31),
    g the exact rest shifted down."""
    if packed.ndim == 2:  # int32 pairs (not packed) or floats: the sums already
        return packed
    with jax.enable_x64(True):
        h = packed.astype(jnp.int32)  # the conversion keeps the low 32 bits
        g = ((packed - h.astype(jnp.int64)) >> 32).astype(jnp.int32)
    return jnp.stack([g, h], axis=-1)


def _cumsum_major(x: jax.Array) -> jax.Array:
    """Cumulative sums over axis 0 (integers: exact)."""
    return jax.lax.scan(lambda c, row: (c + row, c + row), jnp.zeros_like(x[0]), x)[1]


def _children(parent, small, left_small, has_parent):
    """Both children's histograms [b, F, k, 2 * parents, 2] from the parents' and their
    smaller children's; the other child is parent - smaller (0 for the root's "parent")."""
    big = jnp.where(has_parent, parent - small, 0)
    ls = left_small[None, None, :, :, None]
    pair = jnp.stack([jnp.where(ls, small, big), jnp.where(ls, big, small)], axis=4)
    return pair.reshape(*small.shape[:3], -1, 2)


def _row_softmax(z: jax.Array) -> jax.Array:
    """softmax over the last axis, each row computed the same way for any number of rows.

    XLA's CPU reduction over a short last axis is vectorized differently for different
    row counts (measured: jnp.sum over 10 columns of 360 vs 1440 rows differs in the
    last bit), which would make a shard's gradients depend on the shard size. An
    unrolled sum of columns is elementwise, hence the same for any shard.
    """
    e = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))  # max is exact in any order
    total = e[:, 0]
    for k in range(1, z.shape[-1]):
        total = total + e[:, k]
    return e / total[:, None]


def _labels(margins: jax.Array) -> jax.Array:
    if margins.shape[-1] == 1:
        return (margins[:, 0] > 0).astype(jnp.int32)
    return jnp.argmax(margins, axis=-1).astype(jnp.int32)
