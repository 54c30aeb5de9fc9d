"""Robust aggregators against plain numpy references, their invariants, non-finite and
huge finite rows, requirements, pre-aggregators, the attack models, robust pooling of
the observation statistics, and empirical robustness under attack (every bound one the
plain mean violates under the same attack)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aro_jax.federated import aggregators as agg
from aro_jax.federated.aggregators import AGGREGATORS, PRE_AGGREGATORS, ROBUST_AGGREGATORS, aggregate, make_aggregator
from aro_jax.algorithms.networks import RunningStats
from aro_jax.federated.attacks import ATTACKS, HUGE, alie_z_max, apply_attack, apply_statistics_attack

DIM = 64  # one width everywhere, so each (aggregator, n, f) compiles once per session
# (n, f) shapes for the reference comparison: f = 0, small, Bulyan's edge n = 4f + 3, and
# n = 51 > 32, where coordinate-wise order statistics switch from a sorting network to lax.sort.
SHAPES = [(5, 0), (7, 1), (12, 2), (51, 12)]


@functools.lru_cache(maxsize=None)
def _compiled(name, f, options):
    return jax.jit(make_aggregator(name, f, **dict(options)))


def run(name, updates, f, **options):
    result, info = _compiled(name, f, tuple(sorted(options.items())))(jnp.asarray(updates, jnp.float32))
    return np.asarray(result), jax.tree.map(np.asarray, info)


def allowed(name, n, f):
    try:
        agg.check_requirements(name, n, f)
    except ValueError:
        return False
    return True


def make_updates(seed, n, d=DIM):
    """Random float32 rows with exact ties: duplicated rows, and coordinates rounded to
    integers so that many values tie inside a column."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[1] = x[0]
    if n > 4:
        x[4] = x[2]
    x[:, :4] = np.round(x[:, :4])
    return x


# --- plain references (float64, loops) --------------------------------------------------


def sq_dist(a, b):
    return float(np.sum((a - b) ** 2))


def krum_order_ref(x, members, num_neighbours):
    """Sort key per member: (Krum score, total distance to the other members, index)."""
    keys = {}
    for i in members:
        dists = sorted(sq_dist(x[i], x[j]) for j in members if j != i)
        keys[i] = (sum(dists[:num_neighbours]), sum(dists), i)
    return keys


def ref_mean(x, f):
    return x.mean(axis=0)


def ref_median(x, f):
    return np.median(x, axis=0)


def ref_trimmed_mean(x, f):
    n = len(x)
    return np.sort(x, axis=0)[f : n - f].mean(axis=0)


def ref_krum(x, f):
    keys = krum_order_ref(x, list(range(len(x))), len(x) - f - 2)
    return x[min(keys, key=keys.get)]


def ref_multi_krum(x, f, m=None):
    n = len(x)
    m = n - f if m is None else m
    keys = krum_order_ref(x, list(range(n)), n - f - 2)
    best = sorted(keys, key=keys.get)[:m]
    return x[best].mean(axis=0)


def ref_geometric_median(x, f, iterations=8, nu=1e-6):
    z = np.median(x, axis=0)
    for _ in range(iterations):
        w = 1.0 / np.maximum(nu, np.linalg.norm(x - z, axis=1))
        z = w @ x / w.sum()
    return z


def ref_centered_clipping(x, f, tau=None, iterations=3):
    v = np.median(x, axis=0)
    if tau is None:
        tau = np.median(np.linalg.norm(x - v, axis=1))
    for _ in range(iterations):
        diffs = x - v
        norms = np.linalg.norm(diffs, axis=1)
        v = v + np.mean([d * min(1.0, tau / nrm) if nrm > 0 else d for d, nrm in zip(diffs, norms)], axis=0)
    return v


def ref_bulyan(x, f):
    n = len(x)
    remaining, selected = list(range(n)), []
    for _ in range(n - 2 * f):
        r = len(remaining)
        neighbours = 0 if r == 1 else min(max(r - f - 2, 1), r - 1)
        keys = krum_order_ref(x, remaining, neighbours)
        winner = min(keys, key=keys.get)
        selected.append(winner)
        remaining.remove(winner)
    chosen = x[sorted(selected)]
    beta = n - 4 * f
    median = np.median(chosen, axis=0)
    out = np.empty(x.shape[1])
    for c in range(x.shape[1]):
        closest = np.lexsort((chosen[:, c], np.abs(chosen[:, c] - median[c])))[:beta]  # ties: lower value
        out[c] = chosen[closest, c].mean()
    return out


REFERENCES = {
    "mean": ref_mean,
    "median": ref_median,
    "trimmed_mean": ref_trimmed_mean,
    "krum": ref_krum,
    "multi_krum": ref_multi_krum,
    "geometric_median": ref_geometric_median,
    "centered_clipping": ref_centered_clipping,
    "bulyan": ref_bulyan,
}
# Iterative methods accumulate float32 rounding over iterations; the others are exact
# selections or one rounded sum.
TOLERANCE = {"geometric_median": 1e-4, "centered_clipping": 1e-4}


def test_registry_is_complete():
    assert set(AGGREGATORS) == set(REFERENCES)
    assert set(PRE_AGGREGATORS) == {"nnm", "bucketing", "clip", "arc"}


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("n,f", SHAPES)
def test_matches_reference(name, n, f):
    if not allowed(name, n, f):
        pytest.skip(f"{name} does not allow n={n}, f={f}")
    tol = TOLERANCE.get(name, 2e-6)
    for seed in range(2):
        x = make_updates(seed, n)
        result, info = run(name, x, f)
        expected = REFERENCES[name](x.astype(np.float64), f)
        np.testing.assert_allclose(result, expected, rtol=tol, atol=tol)
        assert int(info["num_invalid"]) == 0 and not bool(info["skipped"])


@pytest.mark.parametrize("m", [1, 3, 8])
def test_multi_krum_m(m):
    x = make_updates(3, 12)
    np.testing.assert_allclose(run("multi_krum", x, 2, m=m)[0], ref_multi_krum(x.astype(np.float64), 2, m), rtol=2e-6, atol=2e-6)
    if m == 1:
        np.testing.assert_array_equal(run("multi_krum", x, 2, m=1)[0], run("krum", x, 2)[0])


def test_options_match_reference():
    x = make_updates(4, 12)
    np.testing.assert_allclose(
        run("centered_clipping", x, 2, tau=0.5, iterations=5)[0],
        ref_centered_clipping(x.astype(np.float64), 2, tau=0.5, iterations=5),
        rtol=1e-4,
        atol=1e-4,
    )
    np.testing.assert_allclose(
        run("geometric_median", x, 2, iterations=20, nu=1e-3)[0],
        ref_geometric_median(x.astype(np.float64), 2, iterations=20, nu=1e-3),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_blocked_computation_matches_unblocked(name, monkeypatch):
    """Distances and ranks accumulated over many small blocks of coordinates (plus a
    remainder block) equal the single-block result."""
    x = make_updates(5, 12)
    whole, _ = aggregate(x, name, 2)
    monkeypatch.setattr(agg, "_DISTANCE_BLOCK_ELEMENTS", 12 * 12 * 5)  # 64 = 12 blocks of 5 + 4
    monkeypatch.setattr(agg, "_NETWORK_BLOCK_ELEMENTS", 12 * 7)  # 9 blocks of 7 + 1
    blocked, _ = aggregate(x, name, 2)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), rtol=1e-6, atol=1e-6)


def test_sort_and_network_paths_agree(monkeypatch):
    x = make_updates(6, 12)
    x[3] = np.nan  # invalid rows sort last in both
    for name in ("median", "trimmed_mean", "bulyan"):
        by_network, _ = aggregate(x, name, 2)
        monkeypatch.setattr(agg, "_NETWORK_MAX_ROWS", 0)
        by_sort, _ = aggregate(x, name, 2)
        monkeypatch.undo()
        np.testing.assert_allclose(np.asarray(by_sort), np.asarray(by_network), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", range(1, 33))
def test_sorting_network_sorts(n):
    """0-1 principle: a comparator network sorts everything iff it sorts every 0/1 input
    (exhaustive up to 14 wires; 4096 random 0/1 inputs beyond)."""
    rng = np.random.default_rng(n)
    if n <= 14:
        inputs = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1
    else:
        inputs = rng.integers(0, 2, size=(4096, n))
    wires = inputs.T.copy()
    for low, high in agg._sorting_network(n):
        wires[low], wires[high] = np.minimum(wires[low], wires[high]), np.maximum(wires[low], wires[high])
    np.testing.assert_array_equal(wires.T, np.sort(inputs, axis=1))


def test_distances_are_stable_far_from_origin():
    """Rows 1e-3 apart at norm ~1e4: the Gram-matrix form would lose every digit."""
    rng = np.random.default_rng(0)
    offset = rng.normal(size=DIM).astype(np.float32) * 1e4
    x = offset + rng.normal(size=(6, DIM)).astype(np.float32) * 1e-3
    expected = np.array([[sq_dist(a.astype(np.float64), b.astype(np.float64)) for b in x] for a in x])
    got = np.asarray(agg.pairwise_sq_distances(jnp.asarray(x)))
    np.testing.assert_allclose(got, expected, rtol=1e-2)


# --- invariants ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_permutation_invariance(name):
    x = make_updates(7, 12)
    perm = np.random.default_rng(1).permutation(12)
    # Selections (Krum) must pick the same vector; ties may differ only in index.
    exact = name in ("median", "krum")
    a, b = run(name, x, 2)[0], run(name, x[perm], 2)[0]
    if exact:
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_identical_inputs_return_that_input(name):
    row = np.random.default_rng(2).normal(size=DIM).astype(np.float32)
    x = np.tile(row, (7, 1))
    result = run(name, x, 1)[0]
    if name in ("median", "krum"):  # selections; the rest average with float rounding
        np.testing.assert_array_equal(result, row)
    else:
        np.testing.assert_allclose(result, row, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["median", "krum", "bulyan"])
def test_vmap_over_rounds_matches_single_calls(name):
    rounds = np.stack([make_updates(20, 12), make_updates(21, 12)])
    rounds[1, 4] = np.nan
    batched, info = jax.jit(jax.vmap(make_aggregator(name, 2)))(jnp.asarray(rounds))
    for r in range(2):
        np.testing.assert_allclose(np.asarray(batched[r]), run(name, rounds[r], 2)[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(info["num_invalid"]), [0, 1])


# --- requirements -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,n,f,rule",
    [
        ("krum", 6, 2, "n >= 2f + 3"),
        ("multi_krum", 4, 1, "n >= 2f + 3"),
        ("bulyan", 10, 2, "n >= 4f + 3"),
        ("median", 4, 2, "n > 2f"),
        ("trimmed_mean", 4, 2, "n - 2f >= 1"),
        ("geometric_median", 6, 3, "n > 2f"),
        ("centered_clipping", 6, 3, "n > 2f"),
    ],
)
def test_requirement_violations_raise(name, n, f, rule):
    with pytest.raises(ValueError, match=name) as err:
        agg.check_requirements(name, n, f)
    assert rule in str(err.value)
    with pytest.raises(ValueError, match=name):
        aggregate(np.zeros((n, 3), np.float32), name, f)
    agg.check_requirements(name, n + 2 * f + 3, f)  # enough nodes: no error


def test_mean_allows_any_f_and_bad_inputs_raise():
    agg.check_requirements("mean", 3, 5)
    with pytest.raises(ValueError, match="valid names"):
        agg.check_requirements("krumm", 10, 1)
    with pytest.raises(ValueError, match="valid names"):
        aggregate(np.zeros((5, 3)), "nope", 1)
    with pytest.raises(ValueError, match="non-negative"):
        agg.check_requirements("median", 5, -1)
    with pytest.raises(ValueError, match="multi_krum requires 1 <= m"):
        aggregate(np.zeros((7, 3)), "multi_krum", 1, m=7)
    with pytest.raises(ValueError, match=r"\(n_nodes, n_params\)"):
        aggregate(np.zeros(5), "median", 1)


# --- non-finite rows ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_nan_and_inf_rows_never_affect_the_aggregate(name):
    """With f = 2, an all-NaN row, an all-inf row: the result equals the plain algorithm on
    the 10 finite rows with f = 0 (both failed rows count against f)."""
    x = make_updates(8, 12)
    honest = np.delete(x, [3, 9], axis=0)
    x[3] = np.nan
    x[9] = np.inf
    result, info = run(name, x, 2)
    assert np.all(np.isfinite(result))
    assert int(info["num_invalid"]) == 2 and not bool(info["skipped"])
    expected = run(name, honest, 0)[0]
    if name in ("median", "trimmed_mean", "krum"):
        np.testing.assert_array_equal(result, expected)
    else:
        np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_one_failed_row_uses_remaining_budget(name):
    """A single NaN coordinate fails the whole row; the rest run with f - 1."""
    x = make_updates(9, 12)
    honest = np.delete(x, 5, axis=0)
    x[5, 17] = np.nan
    result, info = run(name, x, 2)
    assert int(info["num_invalid"]) == 1
    expected = REFERENCES[name](honest.astype(np.float64), 1)
    np.testing.assert_allclose(result, expected, rtol=TOLERANCE.get(name, 2e-6), atol=TOLERANCE.get(name, 2e-6))


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_more_invalid_rows_than_f_skips_the_round(name):
    x = make_updates(10, 12)
    x[[0, 5]] = np.nan
    x[7, 0] = -np.inf
    result, info = run(name, x, 2)
    np.testing.assert_array_equal(result, np.zeros(DIM, np.float32))
    assert bool(info["skipped"]) and int(info["num_invalid"]) == 3


def test_non_finite_result_is_skipped(monkeypatch):
    """The last guard: a core that produced inf from finite rows (e.g. float32 overflow)."""
    x = np.full((5, 3), 3e38, np.float32)
    mean, info = aggregate(x, "mean", 0)  # weights are applied before summing: no overflow
    np.testing.assert_allclose(np.asarray(mean), 3e38, rtol=1e-6)
    monkeypatch.setitem(agg._CORES, "mean", lambda updates, valid, f: (jnp.sum(updates, axis=0), {}))
    result, info = aggregate(x, "mean", 0)
    assert bool(info["skipped"]) and np.all(np.asarray(result) == 0)


# --- pre-aggregators ----------------------------------------------------------------------


def test_nnm_matches_reference_and_ignores_invalid_rows():
    x = make_updates(11, 12)
    n, f = 12, 2
    mixed, valid = PRE_AGGREGATORS["nnm"](jnp.asarray(x), jnp.ones(n, bool), f)
    for i in range(n):
        order = sorted(range(n), key=lambda j: (sq_dist(x[i].astype(np.float64), x[j].astype(np.float64)), j))
        np.testing.assert_allclose(np.asarray(mixed[i]), x[order[: n - f]].astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    # Two invalid rows: valid rows mix their n - f = 10 nearest valid rows, as NNM with f = 0 on the 10.
    valid_mask = np.ones(n, bool)
    valid_mask[[2, 6]] = False
    zeroed = np.where(valid_mask[:, None], x, 0.0)
    mixed, valid_out = PRE_AGGREGATORS["nnm"](jnp.asarray(zeroed), jnp.asarray(valid_mask), f)
    alone, _ = PRE_AGGREGATORS["nnm"](jnp.asarray(x[valid_mask]), jnp.ones(10, bool), 0)
    np.testing.assert_allclose(np.asarray(mixed)[valid_mask], np.asarray(alone), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(valid_out), valid_mask)


def test_arc_clips_the_largest_rows_to_the_next_norm():
    """ARC with n = 10, f = 3 clips the k = floor(2 f (n - f) / n) = 4 largest rows to the
    5th largest norm and leaves the others as they are; three 1e30 rows then move the mean
    by at most an honest row's norm, where the plain mean moves by 3e29 per coordinate."""
    n, f = 10, 3
    x = np.random.default_rng(5).normal(size=(n, DIM)).astype(np.float32)
    x[:3] = 1e30
    norms = np.linalg.norm(x[3:].astype(np.float64), axis=1)
    clipped, valid = PRE_AGGREGATORS["arc"](jnp.asarray(x), jnp.ones(n, bool), f)
    out = np.linalg.norm(np.asarray(clipped, np.float64), axis=1)
    threshold = np.sort(norms)[-2]  # the 5th largest of all ten: the honest second largest
    np.testing.assert_allclose(out[:3], threshold, rtol=1e-5)
    largest = 3 + int(np.argmax(norms))
    np.testing.assert_allclose(out[largest], threshold, rtol=1e-5)
    keep = [i for i in range(3, n) if i != largest]
    np.testing.assert_allclose(np.asarray(clipped)[keep], x[keep], rtol=1e-6)
    assert bool(np.all(np.asarray(valid)))
    robust, _ = aggregate(x, "mean", f, pre=("arc",))
    plain, _ = aggregate(x, "mean", f)
    assert np.linalg.norm(np.asarray(robust, np.float64)) <= norms.max() + 1e-6
    assert not np.isfinite(np.linalg.norm(np.asarray(plain, np.float64))) or np.abs(np.asarray(plain)).max() > 1e28
    same, _ = PRE_AGGREGATORS["arc"](jnp.asarray(x), jnp.ones(n, bool), 0)  # f = 0: k = 0, nothing clipped
    np.testing.assert_array_equal(np.asarray(same), x)


@pytest.mark.parametrize("n,size", [(12, 2), (10, 3)])
def test_bucketing_partitions_the_rows(n, size):
    """One-hot rows make each bucket's members readable from its mean."""
    x = np.eye(n, dtype=np.float32)
    buckets, valid = PRE_AGGREGATORS["bucketing"](jnp.asarray(x), jnp.ones(n, bool), 1, key=jax.random.key(3), bucket_size=size)
    buckets = np.asarray(buckets)
    assert buckets.shape == (-(-n // size), n) and np.all(np.asarray(valid))
    members = [np.flatnonzero(b) for b in buckets]
    assert sorted(np.concatenate(members).tolist()) == list(range(n))
    for b, m in zip(buckets, members):
        np.testing.assert_allclose(b[m], 1.0 / len(m), rtol=1e-6)
    assert all(len(m) == size for m in members[:-1])


def test_pre_aggregator_composition_and_errors():
    x = make_updates(12, 12)
    key = jax.random.key(0)
    result, info = aggregate(x, "median", 2, pre=("nnm", ("bucketing", {"bucket_size": 2}), ("clip", {"tau": 1.0})), key=key)
    assert np.linalg.norm(np.asarray(result)) <= 1.0 + 1e-5  # median of rows in the unit ball
    assert not bool(info["skipped"])
    clipped, _ = aggregate(x, "mean", 2, pre=(("clip", {"tau": 0.5}),))
    assert np.linalg.norm(np.asarray(clipped)) <= 0.5 + 1e-5
    with pytest.raises(ValueError, match="after pre-aggregation to 6 rows"):
        aggregate(x, "krum", 2, pre=(("bucketing", {"bucket_size": 2}),), key=key)
    with pytest.raises(ValueError, match="PRNG key"):
        aggregate(x, "median", 2, pre="bucketing")
    with pytest.raises(ValueError, match="valid names"):
        aggregate(x, "median", 2, pre="shuffle")
    with pytest.raises(ValueError, match="tau"):
        aggregate(x, "median", 2, pre="clip")


def test_bucketing_keeps_failed_rows_out():
    x = make_updates(13, 12)
    x[4] = np.nan
    result, info = aggregate(x, "median", 2, pre=(("bucketing", {"bucket_size": 2}),), key=jax.random.key(1))
    assert np.all(np.isfinite(np.asarray(result))) and int(info["num_invalid"]) == 1


# --- attacks ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_leave_honest_rows_unchanged(name):
    x = make_updates(14, 10)
    mask = np.zeros(10, bool)
    mask[[1, 6, 8]] = True
    previous = make_updates(15, 10)
    out = np.asarray(apply_attack(name, x, mask, jax.random.key(0), 2.0, previous_updates=previous))
    np.testing.assert_array_equal(out[~mask], x[~mask])
    honest = x[~mask].astype(np.float64)
    expected = {
        "none": x[mask],
        "sign_flip": -2.0 * x[mask],
        "scaled": 2.0 * x[mask],
        "alie": np.tile(honest.mean(0) - 2.0 * honest.std(0), (3, 1)),
        "ipm": np.tile(-2.0 * honest.mean(0), (3, 1)),
        "stale": previous[mask],
    }
    expected["normaliser_poisoning"] = x[mask]  # it lies about the statistics, not the update
    expected["huge"] = np.tile(np.where(honest.mean(0) > 0, -2.0 * HUGE, 2.0 * HUGE), (3, 1))
    if name in expected:
        np.testing.assert_allclose(out[mask], expected[name], rtol=1e-5, atol=1e-5)
    elif name == "mimic":
        assert any(np.array_equal(out[mask][0], h) for h in x[~mask]) and np.all(out[mask] == out[mask][0])
    elif name == "nan":
        assert np.all(np.isnan(out[mask]))
    elif name == "inf":
        assert np.all(np.isinf(out[mask]))


def test_attack_errors_and_helpers():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="valid names"):
        apply_attack("flip", x, np.zeros(4, bool), jax.random.key(0))
    with pytest.raises(ValueError, match="previous_updates"):
        apply_attack("stale", x, np.ones(4, bool), jax.random.key(0))
    # Baruch et al. 2019: n = 50, f = 12 -> s = 14, z = Phi^-1(36/50) ~ 0.58.
    assert alie_z_max(50, 12) == pytest.approx(0.5828, abs=1e-3)
    noise = np.asarray(apply_attack("gaussian", np.zeros((4, 20000), np.float32), np.ones(4, bool), jax.random.key(1), 3.0))
    assert noise.std() == pytest.approx(3.0, rel=0.02)


# --- huge finite rows ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ROBUST_AGGREGATORS)
@pytest.mark.parametrize("d,magnitude", [(DIM, 1e30), (1000, 1e18)])
def test_huge_finite_row_at_index_zero_is_never_chosen(name, d, magnitude):
    """Node 0 sends a finite row whose squared distances overflow float32 (1e18 at d = 1000
    is just past the threshold |x| sqrt(d) ~ 1.8e19). The aggregate is finite, near the
    honest mean, the round is not skipped, and Krum/multi-Krum never select row 0. (Before
    the fix every Krum total was inf and the tie-break returned row 0: Krum applied the
    1e30 row with skipped=False, and Bulyan returned inf.)"""
    n, f = (15, 3) if name == "bulyan" else (10, 1)
    rng = np.random.default_rng(1)
    honest = (rng.normal(size=d) + NOISE_STD * rng.normal(size=(n, d))).astype(np.float32)
    mask = np.arange(n) == 0
    sent = np.asarray(apply_attack("huge", honest, mask, jax.random.key(0), magnitude / HUGE))
    with np.errstate(over="ignore"):
        assert np.all(np.isfinite(sent)) and np.isinf(np.sum(np.square(sent[0])))
    result, info = aggregate(sent, name, f)
    result = np.asarray(result)
    assert not bool(info["skipped"]) and np.all(np.isfinite(result))
    assert np.linalg.norm(result - honest[1:].mean(0)) <= 3 * NOISE_STD * np.sqrt(d)
    if name in ("krum", "multi_krum"):
        assert 0 not in np.atleast_1d(np.asarray(info["selected"])).tolist()


def test_colluding_huge_rows_at_the_front():
    """f identical huge rows at indices 0..f-1, at distance 0 from each other: their Krum
    scores still include a saturated distance to an honest row, so Krum picks an honest
    row."""
    n, f = 10, 3
    rng = np.random.default_rng(2)
    honest = (rng.normal(size=DIM) + NOISE_STD * rng.normal(size=(n, DIM))).astype(np.float32)
    mask = np.arange(n) < f
    sent = np.asarray(apply_attack("huge", honest, mask, jax.random.key(0), 1.0))
    result, info = aggregate(sent, "krum", f)
    assert int(info["selected"]) >= f and not bool(info["skipped"])
    np.testing.assert_array_equal(np.asarray(result), sent[int(info["selected"])])


def test_no_finite_score_rejects_the_round():
    """Every row huge and far from every other: no Krum score is finite, so nothing is
    selected and the round is skipped rather than applying a huge row."""
    x = np.zeros((5, 8), np.float32)
    for i in range(5):
        x[i, i] = (-1) ** i * 1e30 * (i + 1)
    for name in ("krum", "multi_krum"):
        result, info = aggregate(x, name, 1)
        assert bool(info["skipped"]) and np.all(np.asarray(result) == 0), name


# --- observation statistics ---------------------------------------------------------------


def node_statistics(seed, n, d=20, samples=50):
    """Per-node sample statistics of raw observations, and the samples themselves."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n, 1, d)) * 0.5
    scales = rng.uniform(0.5, 2.0, size=(n, 1, d))
    x = (centers + scales * rng.normal(size=(n, samples, d))).astype(np.float32)
    return x.mean(1), x.var(1), x


def test_pooled_statistics_equal_the_pooled_sample():
    """FedAvg's statistics (equal counts) are the mean and variance of all the nodes'
    observations together, computed here by numpy on the concatenated samples."""
    means, variances, x = node_statistics(0, 7)
    mean, var, info = agg.aggregate_statistics(means, variances, "mean", 0)
    pooled = x.reshape(-1, x.shape[-1]).astype(np.float64)
    np.testing.assert_allclose(np.asarray(mean), pooled.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(var), pooled.var(0), rtol=1e-5, atol=1e-5)
    assert not bool(info["skipped"])


def honest_statistics_bounds(means, variances, honest):
    """The per-coordinate bounds a robust pooling must keep whatever the liars send."""
    m, v = means[honest], variances[honest]
    return m.min(0), m.max(0), v.max(0) + (m.max(0) - m.min(0)) ** 2


def plain_merge(means, variances, count=100.0):
    """The old round's normaliser: every node's statistics merged with its count."""
    stats = RunningStats(jnp.asarray(means[0]), jnp.asarray(variances[0]), jnp.float32(count))
    for i in range(1, len(means)):
        stats = stats.merge(RunningStats(jnp.asarray(means[i]), jnp.asarray(variances[i]), jnp.float32(count)))
    return np.asarray(stats.mean), np.asarray(stats.var)


@pytest.mark.parametrize("strength", [-1e3, 30.0, 1e3, 1e15])
@pytest.mark.parametrize("liars", [[0], [0, 4, 7]])
def test_lying_nodes_cannot_move_the_statistics(strength, liars):
    """Normaliser poisoning from f nodes: under a robust defence the pooled mean stays
    inside the honest means and the variance under the honest bound, per coordinate; the
    plain merge (and FedAvg's pooling) leaves both bounds."""
    n, f = 10, len(liars)
    means, variances, _ = node_statistics(3, n)
    mask = np.isin(np.arange(n), liars)
    sent_means, sent_vars = map(np.asarray, apply_statistics_attack("normaliser_poisoning", means, variances, mask, strength))
    lo, hi, var_hi = honest_statistics_bounds(means, variances, ~mask)
    slack = 1e-5 * (1 + np.abs(hi))
    for name in ("median", "trimmed_mean", "krum", "bulyan" if n >= 4 * f + 3 else "geometric_median"):
        mean, var, info = agg.aggregate_statistics(sent_means, sent_vars, name, f)
        mean, var = np.asarray(mean), np.asarray(var)
        assert not bool(info["skipped"])
        assert np.all(mean >= lo - slack) and np.all(mean <= hi + slack), name
        assert np.all(var >= 0) and np.all(var <= var_hi * (1 + 1e-5)), name
    for mean, var in (plain_merge(sent_means, sent_vars), agg.aggregate_statistics(sent_means, sent_vars, "mean", f)[:2]):
        mean, var = np.asarray(mean), np.asarray(var)
        outside = np.any(mean > hi + slack) or np.any(mean < lo - slack) or np.any(var > var_hi)
        assert outside, "the plain merge must leave the honest bounds under this attack"


def test_non_finite_statistics_count_against_f():
    means, variances, _ = node_statistics(4, 10)
    mask = np.arange(10) < 2
    bad_means, bad_vars = map(np.asarray, apply_statistics_attack("nan", means, variances, mask))
    assert np.all(np.isnan(bad_means[:2])) and np.array_equal(bad_means[2:], means[2:])
    mean, var, info = agg.aggregate_statistics(bad_means, bad_vars, "median", 2)
    expected_mean, expected_var, _ = agg.aggregate_statistics(means[2:], variances[2:], "median", 0)
    np.testing.assert_allclose(np.asarray(mean), np.asarray(expected_mean), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(var), np.asarray(expected_var), rtol=1e-6)
    assert not bool(info["skipped"]) and int(info["num_invalid"]) == 2
    assert bool(agg.aggregate_statistics(bad_means, bad_vars, "median", 1)[2]["skipped"])


def test_statistics_attack_definitions():
    means, variances, _ = node_statistics(5, 6)
    mask = np.array([True, False, False, True, False, False])
    lie_m, lie_v = map(np.asarray, apply_statistics_attack("normaliser_poisoning", means, variances, mask, 4.0))
    h = ~mask
    pooled_mean = means[h].mean(0)
    pooled_var = variances[h].mean(0) + means[h].var(0)
    np.testing.assert_allclose(lie_m[mask], np.tile(pooled_mean + 4.0 * np.sqrt(pooled_var), (2, 1)), rtol=1e-5)
    np.testing.assert_allclose(lie_v[mask], np.tile(16.0 * pooled_var, (2, 1)), rtol=1e-5)
    np.testing.assert_array_equal(lie_m[h], means[h])
    for name in sorted(set(ATTACKS) - {"normaliser_poisoning", "nan", "inf"}):
        same = apply_statistics_attack(name, means, variances, mask, 4.0)
        np.testing.assert_array_equal(np.asarray(same[0]), means)
        np.testing.assert_array_equal(np.asarray(same[1]), variances)


# --- empirical robustness -----------------------------------------------------------------

NOISE_STD = 0.1
# Bound on ||aggregate - honest mean||: 3x one honest row's noise norm, NOISE_STD * sqrt(DIM)
# = 0.8, so 2.4; for scale, ||true mean|| ~ sqrt(DIM) = 8. Each attack's strength is set so
# that the plain mean leaves this bound (checked in the same round): ALIE at z = 20 (at the
# paper's z ~ 1 it is inside every aggregator's noise, the mean's too), IPM at 1 (at 0.5 the
# mean's error is 2.2 with n = 15, f = 3), stale updates from a
# round whose mean was ~16 away. Mimic is not here: in one round of i.i.d. honest updates
# a copy of an honest update is indistinguishable from one, for the mean as for any rule.
ROBUST_BOUND = 3 * NOISE_STD * np.sqrt(DIM)
ATTACK_SETTINGS = {
    "sign_flip": 1.0,
    "scaled": 10.0,
    "gaussian": 10.0,
    "alie": 20.0,
    "ipm": 1.0,
    "stale": 0.0,
    "nan": 0.0,
    "inf": 0.0,
    "huge": 1.0,
}
SEEDS = range(3)


def attacked_round(attack, n, f, seed=0):
    rng = np.random.default_rng(seed)
    true_mean = rng.normal(size=DIM).astype(np.float32)
    honest = (true_mean + NOISE_STD * rng.normal(size=(n, DIM))).astype(np.float32)
    earlier = true_mean + 2.0 * rng.normal(size=DIM)
    previous = (earlier + NOISE_STD * rng.normal(size=(n, DIM))).astype(np.float32)
    mask = np.zeros(n, bool)
    mask[rng.choice(n, f, replace=False)] = True
    sent = apply_attack(attack, honest, mask, jax.random.key(seed), ATTACK_SETTINGS[attack], previous_updates=previous)
    return np.asarray(sent), honest[~mask].mean(axis=0)


def naive_mean_error(sent, honest_mean):
    """FedAvg as written in a textbook: the average of the rows, no masking."""
    with np.errstate(invalid="ignore", over="ignore"):
        return float(np.linalg.norm(sent.astype(np.float64).mean(0) - honest_mean))


@pytest.mark.parametrize("name", ROBUST_AGGREGATORS)
@pytest.mark.parametrize("attack", sorted(ATTACK_SETTINGS))
def test_robust_aggregators_resist_attacks(name, attack):
    """n = 10, f = 3 (Bulyan needs n >= 4f + 3: n = 15, f = 3). In the same rounds the
    plain mean is outside the bound."""
    n, f = (15, 3) if name == "bulyan" else (10, 3)
    for seed in SEEDS:
        sent, honest_mean = attacked_round(attack, n, f, seed)
        assert not naive_mean_error(sent, honest_mean) <= ROBUST_BOUND, (attack, seed)
        result, info = run(name, sent, f)
        assert not bool(info["skipped"])
        assert np.linalg.norm(result - honest_mean) <= ROBUST_BOUND, (name, attack, seed)


@pytest.mark.parametrize("attack", sorted(ATTACK_SETTINGS))
def test_mean_fails_every_robustness_bound(attack):
    """The contrast, attack by attack: the plain mean leaves the bound, and so does the
    registered "mean" aggregator except under NaN/inf, where it survives only because
    masking failed rows is part of every aggregator (then the naive mean is NaN/inf)."""
    for seed in SEEDS:
        sent, honest_mean = attacked_round(attack, 10, 3, seed)
        naive = naive_mean_error(sent, honest_mean)
        assert not naive <= ROBUST_BOUND, (attack, seed, naive)
        registered = float(np.linalg.norm(run("mean", sent, 3)[0].astype(np.float64) - honest_mean))
        if attack in ("nan", "inf"):
            assert not np.isfinite(naive) and registered < ROBUST_BOUND
        else:
            assert not registered <= ROBUST_BOUND, (attack, seed, registered)
