"""Byzantine-robust aggregation of the nodes' stacked, flattened updates.

Every aggregator takes `updates: (n_nodes, n_params)` float32 and the number of Byzantine
nodes it must tolerate, `num_byzantine` (f, a static Python int), and returns the
aggregate `(n_params,)` and an info dict. All are pure JAX and jit-able with `f`, the
aggregator name, the pre-aggregators and integer options static.

Non-finite rows. A row with any NaN or inf is a failed node: it is masked out before
anything is computed and never influences the result. It counts against f: with k
invalid rows, the aggregator runs as the plain algorithm on the n - k valid rows with
f - k Byzantine nodes left to tolerate. For Krum, multi-Krum and Bulyan this keeps
every neighbour and selection count of the plain algorithm with n and f (e.g. Krum's
(n - k) - (f - k) - 2 = n - f - 2), which is why those counts are static. If k > f the
round is skipped: the aggregate is zeros and `info["skipped"]` is True. The round is
also skipped when the aggregate itself is not finite (finite rows whose values overflow
float32), or when a selection rule has no candidate with a finite score, so a non-finite
update never reaches the global parameters.

Huge finite rows. A finite row can be so large that its squared distance to the others
exceeds float32's range (about |x| sqrt(d) > 1.8e19). Distances are sums of non-negative
terms, so they overflow only when the true value is past float32's largest: such an entry
saturates at +inf, every finite entry is exact to rounding, and +inf is ordered after
every finite distance, which is the ordering Krum needs. (Scaling all rows by the largest
norm would avoid the +inf, but then the honest rows' distances, ~1e-60 of the scale,
underflow to 0 and Krum could no longer tell honest rows apart.) The selection rules
(Krum, multi-Krum, Bulyan) choose only among rows with a finite score, break ties without
adding +inf terms (first the number of saturated distances, then the sum of the finite
ones), and reject the round when no row has a finite score. Norms (geometric median,
centered clipping) are computed with a per-row scale and stay finite for any finite row.

Requirements on n and f (`check_requirements`), each from its source paper:

  mean               any f (FedAvg; not robust: one Byzantine node moves it arbitrarily)
  median             n > 2f
  trimmed_mean       n - 2f >= 1
  geometric_median   n > 2f   (breakdown point 1/2)
  centered_clipping  n > 2f
  krum, multi_krum   n >= 2f + 3   (Blanchard et al. 2017)
  bulyan             n >= 4f + 3   (El Mhamdi et al. 2018)

Pre-aggregators (`PRE_AGGREGATORS`) transform the stacked updates before the aggregator
and compose: `aggregate(updates, "krum", f, pre=("nnm",))`, or with options
`pre=(("bucketing", {"bucket_size": 2}), ("clip", {"tau": 1.0}))`. "arc" is adaptive robust
clipping (Allouah et al. 2025), "nnm" nearest-neighbour mixing (Allouah et al. 2023): both
are for heterogeneous honest nodes, where a rule that drops outlying rows drops signal.

Memory stays bounded for large n_params: pairwise distances are accumulated over blocks
of coordinates, and coordinate-wise order statistics run a sorting network over blocks of
coordinates (n <= 32; much faster than XLA's CPU sort) or sort each coordinate (larger n).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from aro_jax.federated.privacy import clip_updates, update_norms

Array = jax.Array
Info = dict[str, Array]

# Elements of the (n, n, block) distance temporary: 2^22 float32 (16 MiB) was fastest on the
# 2-core CPU (n = 10..100, d = 1e5..1e6).
_DISTANCE_BLOCK_ELEMENTS = 1 << 22
# Coordinate-wise order statistics: a sorting network on blocks of columns beats XLA's CPU
# sort along the node axis by ~10x (median, n = 32, d = 1e5: 4 ms vs 0.6 s), but its
# compile time grows fast with n (n = 32: ~1 s; n = 100: over a minute). Block of n x 1024
# columns at n = 32.
_NETWORK_MAX_ROWS = 32
_NETWORK_BLOCK_ELEMENTS = 1 << 15


# --- requirements ----------------------------------------------------------------------

_REQUIREMENTS: dict[str, tuple[Callable[[int, int], bool], str]] = {
    "mean": (lambda n, f: True, "any f (FedAvg has no robustness)"),
    "median": (lambda n, f: n > 2 * f, "n > 2f"),
    "trimmed_mean": (lambda n, f: n - 2 * f >= 1, "n - 2f >= 1"),
    "krum": (lambda n, f: n >= 2 * f + 3, "n >= 2f + 3"),
    "multi_krum": (lambda n, f: n >= 2 * f + 3, "n >= 2f + 3"),
    "geometric_median": (lambda n, f: n > 2 * f, "n > 2f"),
    "centered_clipping": (lambda n, f: n > 2 * f, "n > 2f"),
    "bulyan": (lambda n, f: n >= 4 * f + 3, "n >= 4f + 3"),
}


def requirement(name: str) -> str:
    """The rule on (n, f) that aggregator `name` needs, as text (e.g. "n >= 2f + 3")."""
    _check_name(name)
    return _REQUIREMENTS[name][1]


def check_requirements(name: str, n: int, f: int) -> None:
    """Raise ValueError unless aggregator `name` can tolerate f Byzantine nodes out of n.

    The message names the aggregator and its rule; an unknown name lists the valid ones.
    """
    _check_name(name)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{name}: need at least one node, got n = {n!r}")
    if not isinstance(f, int) or f < 0:
        raise ValueError(f"{name}: num_byzantine must be a non-negative int, got {f!r}")
    holds, rule = _REQUIREMENTS[name]
    if not holds(n, f):
        raise ValueError(f"{name} requires {rule}; got n = {n}, f = {f}")


def _check_name(name: str) -> None:
    if name not in _REQUIREMENTS:
        raise ValueError(f"unknown aggregator {name!r}; valid names: {sorted(_REQUIREMENTS)}")


# --- shared building blocks ------------------------------------------------------------


def finite_rows(updates: Array) -> Array:
    """(n,) bool: True where a row has no NaN and no inf."""
    return jnp.all(jnp.isfinite(updates), axis=1)


def pairwise_sq_distances(updates: Array) -> Array:
    """(n, n) squared Euclidean distances between rows, from direct differences.

    The ||a||^2 + ||b||^2 - 2<a, b> form cancels catastrophically in float32 when rows
    are close relative to their norm (exactly the honest cluster Krum must resolve), so
    differences are formed explicitly, over blocks of coordinates to bound memory to an
    (n, n, block) temporary. Rows must be finite.
    """
    n, d = updates.shape
    block = max(1, min(d, _DISTANCE_BLOCK_ELEMENTS // (n * n)))

    def block_distances(cols: Array) -> Array:
        diff = cols[:, None, :] - cols[None, :, :]
        return jnp.sum(diff * diff, axis=-1)

    num_blocks, rest = divmod(d, block)
    total = jnp.zeros((n, n), updates.dtype)
    total = lax.fori_loop(
        0,
        num_blocks,
        lambda b, acc: acc + block_distances(lax.dynamic_slice_in_dim(updates, b * block, block, axis=1)),
        total,
    )
    if rest:
        total = total + block_distances(updates[:, num_blocks * block :])
    return total


def _masked_distances(updates: Array, valid: Array) -> Array:
    """Pairwise squared distances with +inf wherever either row is invalid."""
    dist = pairwise_sq_distances(updates)
    return jnp.where(valid[:, None] & valid[None, :], dist, jnp.inf)


def _row_weighted_sum(weights: Array, updates: Array) -> Array:
    """sum_i weights[i] * updates[i] as a matrix-vector product: XLA's CPU reduction over
    the leading axis of an (n, d) array was ~100x slower (0.19 s vs 1.2 ms, n = 10, d = 1e6).
    HIGHEST keeps float32 accumulation on accelerators (no TF32)."""
    return jnp.dot(weights.astype(updates.dtype), updates, precision=lax.Precision.HIGHEST)


def _masked_mean(updates: Array, valid: Array) -> Array:
    count = jnp.maximum(jnp.sum(valid), 1)
    return _row_weighted_sum(valid / count, updates)


@functools.lru_cache(maxsize=None)
def _sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort on n wires as (low, high) compare-exchange pairs.

    Built for the next power of two and truncated: padding wires hold +inf at the top, so
    every comparator that touches one is a no-op. 63 comparators for n = 16, 191 for 32.
    """
    pairs = []
    width = 1
    while width < n:
        step = width
        while step >= 1:
            for start in range(step % width, n - step, 2 * step):
                for offset in range(min(step, n - start - step)):
                    low, high = start + offset, start + offset + step
                    if low // (2 * width) == high // (2 * width):
                        pairs.append((low, high))
            step //= 2
        width *= 2
    return tuple(pairs)


def _sorted_weighted_sum(keys: Array, weight_at: Callable[[Array], Array], values: Array | None = None) -> Array:
    """Per column, sort and return sum_p weight_at(p) * sorted[p] over positions p.

    keys: (n, d), no NaN; +inf sorts last (how invalid rows are pushed out of the way).
    values: optional (n, d) finite values sorted along with keys, ties in the key broken by
    the value (so fully tied pairs are identical and the result is order-free); without
    values the sorted keys themselves are summed. weight_at maps an int32 position to a
    float weight, zero where a position is ignored (weight 0 times +inf counts as 0).
    Returns (d,). Every coordinate-wise order statistic here is one of these.

    Up to _NETWORK_MAX_ROWS rows the columns go through a sorting network, elementwise
    min/max on blocks of columns that XLA fuses into one loop; beyond that through
    lax.sort along the node axis.
    """
    n, d = keys.shape
    weights = [weight_at(jnp.int32(p)).astype(keys.dtype) for p in range(n)]

    def weighted(sorted_rows) -> Array:
        return sum(jnp.where(w != 0, row * w, 0.0) for w, row in zip(weights, sorted_rows))

    if n > _NETWORK_MAX_ROWS:
        if values is None:
            sorted_rows = jnp.sort(keys, axis=0)
        else:
            sorted_rows = lax.sort((keys, values), dimension=0, num_keys=2)[1]
        w = jnp.stack(weights)
        return _row_weighted_sum(w, jnp.where(w[:, None] != 0, sorted_rows, 0.0))

    network = _sorting_network(n)

    def block_sum(key_cols: Array, value_cols: Array | None) -> Array:
        k = [key_cols[i] for i in range(n)]
        if value_cols is None:
            for low, high in network:
                k[low], k[high] = jnp.minimum(k[low], k[high]), jnp.maximum(k[low], k[high])
            return weighted(k)
        v = [value_cols[i] for i in range(n)]
        for low, high in network:
            swap = (k[high] < k[low]) | ((k[high] == k[low]) & (v[high] < v[low]))
            k[low], k[high] = jnp.where(swap, k[high], k[low]), jnp.where(swap, k[low], k[high])
            v[low], v[high] = jnp.where(swap, v[high], v[low]), jnp.where(swap, v[low], v[high])
        return weighted(v)

    block = max(1, min(d, _NETWORK_BLOCK_ELEMENTS // n))
    num_blocks, rest = divmod(d, block)
    out = jnp.zeros((d,), keys.dtype)

    def columns(array: Array | None, start) -> Array | None:
        return None if array is None else lax.dynamic_slice_in_dim(array, start, block, axis=1)

    def body(b: Array, acc: Array) -> Array:
        start = b * block
        return lax.dynamic_update_slice_in_dim(acc, block_sum(columns(keys, start), columns(values, start)), start, axis=0)

    out = lax.fori_loop(0, num_blocks, body, out)
    if rest:
        tail = num_blocks * block
        out = out.at[tail:].set(block_sum(keys[:, tail:], None if values is None else values[:, tail:]))
    return out


def _masked_median(updates: Array, valid: Array) -> Array:
    """Coordinate-wise median of the valid rows (mean of the two middle values if even)."""
    count = jnp.sum(valid)
    lo, hi = (count - 1) // 2, count // 2
    keys = jnp.where(valid[:, None], updates, jnp.inf)
    return _sorted_weighted_sum(keys, lambda p: 0.5 * ((p == lo).astype(updates.dtype) + (p == hi)))


def _krum_scores(dist: Array, members: Array, num_neighbours: Array | int) -> tuple[Array, Array, Array]:
    """Krum score of each member: sum of squared distances to its num_neighbours nearest
    other members. Non-members score +inf and are never anyone's neighbour; a member whose
    neighbours include a saturated (+inf) distance scores +inf as well.

    Also returns the tie-breakers: the number of saturated distances to the other members,
    and the sum of the finite ones. Distinct rows tie on the score structurally, not by
    chance - with one neighbour, two mutual nearest neighbours always do - and breaking
    those ties by index would make the choice depend on the nodes' order; the total
    distance is order-free and generically distinct (rows that tie on every key are
    duplicates, and either gives the same vector). Counting the saturated distances first
    keeps the total finite: a plain sum would be +inf for every row as soon as one row is
    huge, and every row would tie.
    """
    n = dist.shape[0]
    pair = members[:, None] & members[None, :] & ~jnp.eye(n, dtype=bool)
    nearest_first = jnp.sort(jnp.where(pair, dist, jnp.inf), axis=1)
    counted = jnp.arange(n) < num_neighbours
    scores = jnp.sum(jnp.where(counted[None, :], nearest_first, 0.0), axis=1)
    finite = pair & jnp.isfinite(dist)
    saturated = jnp.sum(pair & ~finite, axis=1).astype(dist.dtype)
    totals = jnp.sum(jnp.where(finite, dist, 0.0), axis=1)
    inf = jnp.asarray(jnp.inf, dist.dtype)
    return jnp.where(members, scores, inf), jnp.where(members, saturated, inf), jnp.where(members, totals, inf)


def _krum_ranking(scores: Array, saturated: Array, totals: Array) -> Array:
    """Row indices from best to worst: lowest score, then fewest saturated distances, then
    lowest finite total distance, then lowest index."""
    n = scores.shape[0]
    return lax.sort((scores, saturated, totals, jnp.arange(n)), num_keys=4)[3]


def _krum_winner(scores: Array, saturated: Array, totals: Array) -> tuple[Array, Array]:
    """(index of the best row, whether its score is finite). A row with an infinite score
    is never a valid choice: the caller rejects the round instead."""
    winner = _krum_ranking(scores, saturated, totals)[0]
    return winner, jnp.isfinite(scores[winner])


# --- aggregators -----------------------------------------------------------------------
# Each core takes (updates with invalid rows zeroed, valid mask, f, **options) and runs the
# plain algorithm on the valid rows with f - (number invalid) Byzantine nodes left.


def _mean(updates: Array, valid: Array, f: int) -> tuple[Array, Info]:
    """FedAvg: the mean of the valid rows. No robustness."""
    return _masked_mean(updates, valid), {}


def _median(updates: Array, valid: Array, f: int) -> tuple[Array, Info]:
    """Coordinate-wise median (Yin et al. 2018); mean of the two middle values when the
    valid count is even, as numpy does."""
    return _masked_median(updates, valid), {}


def _trimmed_mean(updates: Array, valid: Array, f: int) -> tuple[Array, Info]:
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate drop the f largest
    and f smallest values, average the n - 2f left.

    With k invalid rows: the valid values trimmed by f - k on each side, i.e. sorted
    positions [f - k, n - f) of the valid values, n - 2f + k of them.
    """
    n = updates.shape[0]
    num_invalid = n - jnp.sum(valid)
    lo, hi = f - num_invalid, n - f
    count = (hi - lo).astype(updates.dtype)
    keys = jnp.where(valid[:, None], updates, jnp.inf)
    return _sorted_weighted_sum(keys, lambda p: ((p >= lo) & (p < hi)) / count), {}


def _krum(updates: Array, valid: Array, f: int) -> tuple[Array, Info]:
    """Krum (Blanchard et al. 2017): the row whose n - f - 2 nearest other rows (the
    paper's neighbour count) are closest in summed squared distance. Equal scores go to the
    row with fewer saturated distances, then the lower finite total distance to all rows
    (order-free), then the lower index. Invalid rows score +inf and are nobody's
    neighbour; only a row with a finite score can be selected (none: the round is
    rejected)."""
    n = updates.shape[0]
    scores, saturated, totals = _krum_scores(_masked_distances(updates, valid), valid, n - f - 2)
    selected, found = _krum_winner(scores, saturated, totals)
    return jnp.where(found, updates[selected], 0.0), {"selected": selected, "scores": scores, "rejected": ~found}


def _multi_krum(updates: Array, valid: Array, f: int, m: int | None = None) -> tuple[Array, Info]:
    """Multi-Krum (Blanchard et al. 2017): the mean of the m rows with the lowest Krum
    scores (n - f - 2 neighbours; ties ordered as in Krum), default m = n - f. m = 1 is
    Krum. Rows with an infinite score are never averaged: with fewer than m finite scores
    the mean is over those (none: the round is rejected)."""
    n = updates.shape[0]
    m = n - f if m is None else int(m)
    if not 1 <= m <= n - f:
        raise ValueError(f"multi_krum requires 1 <= m <= n - f = {n - f}; got m = {m}")
    scores, saturated, totals = _krum_scores(_masked_distances(updates, valid), valid, n - f - 2)
    selected = _krum_ranking(scores, saturated, totals)[:m]
    usable = jnp.isfinite(scores[selected])
    count = jnp.sum(usable)
    weights = jnp.zeros((n,), updates.dtype).at[selected].set(jnp.where(usable, 1.0, 0.0) / jnp.maximum(count, 1))
    return _row_weighted_sum(weights, updates), {"selected": selected, "scores": scores, "rejected": count == 0}


def _geometric_median(
    updates: Array, valid: Array, f: int, iterations: int = 8, nu: float = 1e-6
) -> tuple[Array, Info]:
    """Geometric median by smoothed Weiszfeld iterations (Pillutla et al. 2022, RFA).

    z <- sum_i w_i x_i / sum_i w_i with w_i = 1 / max(nu, ||z - x_i||), for a fixed number
    of iterations (RFA uses a handful; 8 here). nu (same units as the updates) smooths the
    objective where z meets a row.

    The start is the coordinate-wise median of the valid rows, not their mean: Weiszfeld
    moves a far start toward the honest cluster only geometrically (by about f / (n - f)
    per iteration for f coinciding outliers), so from the mean a 1e30 row would still
    dominate after 8 iterations, while the median starts inside the honest range. Distances
    use a per-row scale, so a huge finite row gets a tiny finite weight instead of
    overflowing.
    """
    rows_valid = valid.astype(updates.dtype)

    def weights_at(z: Array) -> Array:
        dist = update_norms(updates - z)
        return rows_valid / jnp.maximum(nu, dist)

    def weiszfeld_step(_, z: Array) -> Array:
        w = weights_at(z)
        return jnp.dot(w, updates, precision=lax.Precision.HIGHEST) / jnp.sum(w)

    z = lax.fori_loop(0, iterations, weiszfeld_step, _masked_median(updates, valid))
    w = weights_at(z)
    return z, {"weights": w / jnp.sum(w)}


def _centered_clipping(
    updates: Array,
    valid: Array,
    f: int,
    tau: float | Array | None = None,
    iterations: int = 3,
    center: Array | None = None,
) -> tuple[Array, Info]:
    """Centered clipping (Karimireddy et al. 2021): v <- v + mean_i clip(x_i - v, tau),
    L = `iterations` times, where clip scales a vector to L2 norm at most tau.

    The paper starts from the previous round's aggregate (momentum); pass it as `center`.
    Default start: the coordinate-wise median of the valid rows. Default tau: the median
    distance of the valid rows from the start, so the honest half is barely clipped while
    an outlier moves v by at most tau / n_valid per iteration.
    """
    v0 = _masked_median(updates, valid) if center is None else jnp.asarray(center, updates.dtype)
    if tau is None:
        dist0 = update_norms(updates - v0)
        tau = _masked_median(jnp.where(valid, dist0, 0.0)[:, None], valid)[0]
    tau = jnp.asarray(tau, updates.dtype)
    count = jnp.maximum(jnp.sum(valid), 1).astype(updates.dtype)

    def clip_step(_, v: Array) -> Array:
        norm = update_norms(updates - v)
        scale = jnp.where(valid, jnp.minimum(1.0, tau / jnp.maximum(norm, jnp.finfo(updates.dtype).tiny)), 0.0)
        # sum_i scale_i (x_i - v) = scale @ x - sum(scale) v: the cancellation is relative to
        # |v|, the scale at which v itself is rounded.
        return v + (_row_weighted_sum(scale, updates) - jnp.sum(scale) * v) / count

    return lax.fori_loop(0, iterations, clip_step, v0), {"tau": tau}


def _bulyan(updates: Array, valid: Array, f: int) -> tuple[Array, Info]:
    """Bulyan (El Mhamdi et al. 2018) over Krum.

    1. Select theta = n - 2f rows by iterated Krum: repeatedly take the Krum winner among
       the r rows not yet selected, scored with r - f - 2 neighbours (floored at one; the
       last of r = 1 rows is taken as is), and remove it. Only a row with a finite score is
       taken; a step with none rejects the round.
    2. Per coordinate, average the beta = theta - 2f selected values closest to the
       selected values' median (the paper's rule, not the plain trimmed mean of the middle
       beta). Equal distances on both sides of the median go to the lower value, so the
       result does not depend on the nodes' order.
    Krum ties are broken as in `krum`.

    With k invalid rows, theta and beta are taken for the n - k valid rows and f - k
    Byzantine: theta = n - 2f + k, beta = n - 4f + 3k.
    """
    n = updates.shape[0]
    num_valid = jnp.sum(valid)
    f_left = f - (n - num_valid)
    theta = num_valid - 2 * f_left
    beta = theta - 2 * f_left
    dist = _masked_distances(updates, valid)

    def select(remaining: Array, step: Array) -> tuple[Array, tuple[Array, Array]]:
        left = num_valid - step
        neighbours = jnp.where(left <= 1, 0, jnp.clip(left - f_left - 2, 1, left - 1))
        winner, found = _krum_winner(*_krum_scores(dist, remaining, neighbours))
        active = step < theta
        remaining = remaining.at[winner].set(remaining[winner] & ~active)
        return remaining, (jnp.where(active, winner, n), active & ~found)

    # theta <= n - f whenever the round is not skipped, so n - f steps cover every case.
    max_selected = n - f
    _, (chosen, missed) = lax.scan(select, valid, jnp.arange(max_selected))
    chosen = jnp.sort(chosen)  # unused steps hold n: they sort last, after the theta chosen
    in_set = jnp.arange(max_selected) < theta
    rows = updates[jnp.minimum(chosen, n - 1)]
    median = _masked_median(rows, in_set)
    closeness = jnp.where(in_set[:, None], jnp.abs(rows - median), jnp.inf)
    beta_f = beta.astype(updates.dtype)
    aggregate = _sorted_weighted_sum(closeness, lambda p: (p < beta) / beta_f, values=rows)
    selected = jnp.zeros((n,), bool).at[chosen].set(True, mode="drop")
    return aggregate, {"selected": selected, "rejected": jnp.any(missed)}


_CORES: dict[str, Callable[..., tuple[Array, Info]]] = {
    "mean": _mean,
    "median": _median,
    "trimmed_mean": _trimmed_mean,
    "krum": _krum,
    "multi_krum": _multi_krum,
    "geometric_median": _geometric_median,
    "centered_clipping": _centered_clipping,
    "bulyan": _bulyan,
}


# --- pre-aggregators -------------------------------------------------------------------
# Each takes (updates with invalid rows zeroed, valid, f, key, **options) and returns new
# (updates, valid); invalid rows stay invalid (zeroed) and never influence valid ones.


def _nearest_neighbour_mixing(updates: Array, valid: Array, f: int, key: Array | None = None) -> tuple[Array, Array]:
    """NNM (Allouah et al. 2023): each row becomes the mean of its n - f nearest valid rows,
    itself included (with k invalid rows that is (n - k) - (f - k), the same count)."""
    n = updates.shape[0]
    dist = _masked_distances(updates, valid)
    dist = jnp.where(jnp.eye(n, dtype=bool) & valid[:, None], 0.0, dist)  # self first
    _, nearest = lax.top_k(-dist, n - f)
    mixing = jnp.zeros((n, n), updates.dtype).at[jnp.arange(n)[:, None], nearest].set(1.0 / (n - f))
    mixing = jnp.where(valid[:, None], mixing, 0.0)
    return jnp.dot(mixing, updates, precision=lax.Precision.HIGHEST), valid


def _bucketing(
    updates: Array, valid: Array, f: int, key: Array | None = None, bucket_size: int = 2
) -> tuple[Array, Array]:
    """Bucketing (Karimireddy et al. 2022): shuffle the rows with `key`, split them into
    ceil(n / s) buckets of s = bucket_size, and return each bucket's mean of its valid rows.

    A Byzantine row spoils at most its own bucket, so the aggregator that follows still
    tolerates f, now out of ceil(n / s) rows: its requirement is checked on that count. A
    bucket with no valid row is invalid.
    """
    if key is None:
        raise ValueError("bucketing needs a PRNG key: aggregate(..., key=...)")
    n = updates.shape[0]
    size = int(bucket_size)
    if size < 1:
        raise ValueError(f"bucketing requires bucket_size >= 1, got {bucket_size}")
    num_buckets = -(-n // size)
    bucket_of_row = jnp.zeros((n,), jnp.int32).at[jax.random.permutation(key, n)].set(jnp.arange(n) // size)
    membership = (bucket_of_row[None, :] == jnp.arange(num_buckets)[:, None]) & valid[None, :]
    counts = jnp.sum(membership, axis=1)
    weights = membership / jnp.maximum(counts, 1)[:, None]
    return jnp.dot(weights.astype(updates.dtype), updates, precision=lax.Precision.HIGHEST), counts > 0


def _clip(updates: Array, valid: Array, f: int, key: Array | None = None, tau: float | None = None) -> tuple[Array, Array]:
    """Clip each row to L2 norm at most tau (required)."""
    if tau is None:
        raise ValueError("clip pre-aggregator needs tau (the L2 norm bound)")
    return clip_updates(updates, tau), valid


def _adaptive_robust_clipping(updates: Array, valid: Array, f: int, key: Array | None = None) -> tuple[Array, Array]:
    """ARC (Allouah et al., ICLR 2025): clip the k = floor(2 (f / n) (n - f)) largest-norm
    valid rows to the norm of the (k + 1)-th largest, leaving the rest unchanged. The
    threshold adapts to the honest rows' own scale, so no tau is tuned, and a huge row
    reaches the aggregator with at most an honest row's norm (norms use a per-row scale,
    finite for any finite row). Invalid rows are zero and count among the smallest."""
    n = updates.shape[0]
    k = min(int(2 * f * (n - f) / n), n - 1)
    if k == 0:
        return updates, valid
    norms = jnp.where(valid, update_norms(updates), 0.0)
    threshold = jnp.sort(norms)[n - 1 - k]  # the (k + 1)-th largest
    return clip_updates(updates, threshold), valid


PRE_AGGREGATORS: dict[str, Callable[..., tuple[Array, Array]]] = {
    "nnm": _nearest_neighbour_mixing,
    "bucketing": _bucketing,
    "clip": _clip,
    "arc": _adaptive_robust_clipping,
}

PreSpec = str | tuple[str, Mapping[str, Any]]


def _parse_pre(pre: PreSpec | Sequence[PreSpec]) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(pre, str) or (isinstance(pre, tuple) and len(pre) == 2 and isinstance(pre[1], Mapping)):
        pre = (pre,)
    steps = []
    for spec in pre:
        name, options = (spec, {}) if isinstance(spec, str) else (spec[0], dict(spec[1]))
        if name not in PRE_AGGREGATORS:
            raise ValueError(f"unknown pre-aggregator {name!r}; valid names: {sorted(PRE_AGGREGATORS)}")
        steps.append((name, options))
    return steps


# --- entry points ----------------------------------------------------------------------


def aggregate(
    updates: Array,
    name: str,
    num_byzantine: int,
    *,
    pre: PreSpec | Sequence[PreSpec] = (),
    key: Array | None = None,
    **options: Any,
) -> tuple[Array, Info]:
    """Robustly aggregate stacked node updates.

    Args:
      updates: (n_nodes, n_params) float array, one flattened update per node.
      name: an aggregator in `AGGREGATORS`.
      num_byzantine: f, how many nodes may be Byzantine (static Python int).
      pre: pre-aggregators applied in order: names, or (name, options) pairs.
      key: PRNG key, needed by "bucketing".
      **options: the aggregator's own options (multi_krum: m; geometric_median:
        iterations, nu; centered_clipping: tau, iterations, center).

    Returns:
      (aggregate (n_params,), info) with info["num_invalid"] (rows with NaN/inf),
      info["skipped"] (True when the aggregate was replaced by zeros: more invalid rows
      than f, no selectable row with a finite score, or a non-finite result) and the aggregator's own diagnostics.

    Raises:
      ValueError: unknown name, or (n, f) violating the aggregator's requirement.
    """
    _check_name(name)
    f = operator.index(num_byzantine)
    updates = jnp.asarray(updates)
    if updates.ndim != 2:
        raise ValueError(f"{name}: updates must be (n_nodes, n_params), got shape {updates.shape}")
    if not jnp.issubdtype(updates.dtype, jnp.floating):
        updates = updates.astype(jnp.float32)
    check_requirements(name, updates.shape[0], f)

    valid = finite_rows(updates)
    num_invalid = jnp.sum(~valid).astype(jnp.int32)
    rows = jnp.where(valid[:, None], updates, 0.0)
    for step, (pre_name, pre_options) in enumerate(_parse_pre(pre)):
        step_key = None if key is None else jax.random.fold_in(key, step)
        rows, valid = PRE_AGGREGATORS[pre_name](rows, valid, f, key=step_key, **pre_options)
    if rows.shape[0] != updates.shape[0]:
        try:
            check_requirements(name, rows.shape[0], f)
        except ValueError as err:
            raise ValueError(f"{err} (after pre-aggregation to {rows.shape[0]} rows)") from None

    result, info = _CORES[name](rows, valid, f, **options)
    rejected = info.pop("rejected", jnp.zeros((), bool))
    skipped = (num_invalid > f) | rejected | ~jnp.all(jnp.isfinite(result))
    result = jnp.where(skipped, jnp.zeros_like(result), result)
    return result, {**info, "num_invalid": num_invalid, "skipped": skipped}


def aggregate_statistics(
    means: Array, variances: Array, name: str, num_byzantine: int
) -> tuple[Array, Array, Info]:
    """Robustly pool the nodes' observation statistics (the shared normaliser's input).

    means, variances: (n_nodes, dim), each node's mean and variance of its observations,
    every node weighing the same. Under aggregator `name` = "mean" (FedAvg) this is the
    plain pooled estimate: mean m = avg_i mean_i, variance avg_i var_i + avg_i (mean_i - m)^2.
    Under every robust aggregator both averages become coordinate-wise trimmed means with
    f = num_byzantine (Yin et al. 2018), whatever the parameter aggregator is: statistics
    are per-coordinate quantities on their own scales, where a row-selection rule such as
    Krum would let one coordinate's scale decide. With at most f lying nodes and n - 2f >= 1
    (which every robust aggregator's requirement implies), per coordinate:

      min_h mean_h <= m <= max_h mean_h
      min_h var_h  <= var - between <= max_h var_h,   0 <= between <= max_h (mean_h - m)^2

    over the honest nodes h, whatever the liars send. Reported variances below 0 are
    impossible and raised to 0. Rows with NaN/inf count against f as in `aggregate`.

    Returns (mean, variance, info) with info["skipped"] (the statistics are not usable:
    more invalid rows than f) and info["num_invalid"].
    """
    rule = "mean" if name == "mean" else "trimmed_mean"
    means, variances = jnp.asarray(means), jnp.asarray(variances)
    dim = means.shape[1]
    rows = jnp.concatenate([means, jnp.maximum(variances, 0.0)], axis=1)
    valid = finite_rows(rows)
    pooled, info = aggregate(rows, rule, num_byzantine)
    mean, within = pooled[:dim], pooled[dim:]
    spread = jnp.where(valid[:, None], jnp.square(means - mean), jnp.nan)
    between, spread_info = aggregate(spread, rule, num_byzantine)
    skipped = info["skipped"] | spread_info["skipped"]
    return mean, within + between, {"skipped": skipped, "num_invalid": info["num_invalid"]}


def make_aggregator(
    name: str, num_byzantine: int, *, pre: PreSpec | Sequence[PreSpec] = (), **options: Any
) -> Callable[..., tuple[Array, Info]]:
    """A pure `fn(updates, key=None) -> (aggregate, info)` with the configuration closed
    over, for use inside a compiled training loop. Name and pre-aggregators are checked
    now; the (n, f) requirement when `fn` is first traced."""
    _check_name(name)
    _parse_pre(pre)

    def aggregate_updates(updates: Array, key: Array | None = None) -> tuple[Array, Info]:
        return aggregate(updates, name, num_byzantine, pre=pre, key=key, **options)

    return aggregate_updates


def _registry_entry(name: str) -> Callable[..., tuple[Array, Info]]:
    def aggregate_with(updates: Array, num_byzantine: int, **options: Any) -> tuple[Array, Info]:
        return aggregate(updates, name, num_byzantine, **options)

    aggregate_with.__name__ = name
    aggregate_with.__doc__ = f"{_CORES[name].__doc__}\n\nRequires {_REQUIREMENTS[name][1]}. See `aggregate`."
    return aggregate_with


AGGREGATORS: dict[str, Callable[..., tuple[Array, Info]]] = {name: _registry_entry(name) for name in _CORES}

ROBUST_AGGREGATORS: tuple[str, ...] = tuple(name for name in AGGREGATORS if name != "mean")

__all__ = [
    "AGGREGATORS",
    "PRE_AGGREGATORS",
    "ROBUST_AGGREGATORS",
    "aggregate",
    "aggregate_statistics",
    "check_requirements",
    "finite_rows",
    "make_aggregator",
    "pairwise_sq_distances",
    "requirement",
]
