"""Host-side binning for the histogram trees (jaxdml.models.trees): quantile bin edges
from the whole training set, and the integer bins of raw features.

Bin b of feature f holds edges[f, b-1] < x <= edges[f, b], so "bin <= b" is
"x <= edges[f, b]" and the trees predict from raw features too.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable

import numpy as np


def quantile_bin_edges(x: np.ndarray, num_bins: int) -> np.ndarray:
    """Per-feature bin edges from the whole training set, as scikit-learn's binning does them.

    An exact global computation on the host, which holds the whole data set here:
    a feature with at most `num_bins` distinct values gets the midpoints between
    them; otherwise the (midpoint-interpolated) quantiles at k / num_bins, k = 1..num_bins-1.

    Args:
      x: training features [n, F].
      num_bins: bins per feature (at most num_bins - 1 edges).

    Returns:
      float32 [F, E], each row increasing, padded with +inf, where E <= num_bins - 1 is
      the most edges any feature has (fewer columns: smaller histograms, same trees).
    """
    edges = np.full((x.shape[1], num_bins - 1), np.inf, np.float32)
    percentiles = np.linspace(0, 100, num_bins + 1)[1:-1]

    def one(f):
        col = np.sort(np.asarray(x[:, f], np.float64))  # percentile on sorted data: 4x faster
        distinct = np.unique(col)
        if len(distinct) <= num_bins:
            cuts = 0.5 * (distinct[:-1] + distinct[1:])
        else:
            cuts = np.percentile(col, percentiles, method="midpoint")
        cuts = np.unique(cuts.astype(np.float32))
        edges[f, : len(cuts)] = cuts

    _per_feature(one, x.shape[1])
    used = max(int(np.isfinite(edges).sum(axis=1).max()), 1)
    return edges[:, :used]


def bin_features(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin indices [n, F]: the number of feature f's edges below x (uint8 up to 256 bins)."""
    dtype = np.uint8 if edges.shape[1] < 256 else np.uint16
    out = np.empty(x.shape, dtype)

    def one(f):
        out[:, f] = np.searchsorted(edges[f], np.asarray(x[:, f], np.float32), side="left")

    _per_feature(one, x.shape[1])
    return out


def _per_feature(fn: Callable[[int], None], num_features: int) -> None:
    """fn(f) for every feature, on a thread per core: numpy's sort and searchsorted release
    the GIL (binning 200k x 20 on 2 cores: 0.27 -> 0.14 s, as scikit-learn's OpenMP
    binning). Each fn writes only its own feature's column."""
    workers = max(min(os.cpu_count() or 1, num_features), 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(fn, range(num_features)))  # list(): re-raises a worker's error
