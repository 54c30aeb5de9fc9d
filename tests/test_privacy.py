"""Node-level DP: clipping bound, noise scale, and the accountant against dp-accounting."""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import rdp
from dp_accounting.pld import pld_privacy_accountant

from aro_jax.federated.aggregators import aggregate
from aro_jax.federated.privacy import add_noise, central_noise_for_mean, clip_updates, epsilon, update_norms


def rows_of_many_norms():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 300)).astype(np.float32)
    scales = np.array([0.0, 1e-30, 1e-3, 0.1, 1.0, 10.0, 1e6, 1e20, 1e30], np.float32)
    return x * scales[:, None]


@pytest.mark.parametrize("clip_norm", [1e-3, 0.5, 1.0, 7.0])
def test_clipped_norms_are_bounded(clip_norm):
    x = rows_of_many_norms()
    clipped = np.asarray(clip_updates(jnp.asarray(x), clip_norm))
    norms = np.linalg.norm(clipped.astype(np.float64), axis=1)
    assert np.all(norms <= clip_norm * (1 + 1e-5))
    inside = np.linalg.norm(x.astype(np.float64), axis=1) <= clip_norm
    np.testing.assert_array_equal(clipped[inside], x[inside])  # untouched inside the ball
    # Rows outside land on the sphere, pointing the same way (even 1e30-scaled rows, whose
    # squared norm overflows float32).
    np.testing.assert_allclose(norms[~inside], clip_norm, rtol=1e-5)
    outside = x[~inside].astype(np.float64)
    cos = np.sum(clipped[~inside] * outside / np.linalg.norm(outside, axis=1, keepdims=True), axis=1)
    np.testing.assert_allclose(cos, clip_norm, rtol=1e-4)


def test_norms_and_non_finite_rows():
    x = rows_of_many_norms()
    np.testing.assert_allclose(np.asarray(update_norms(jnp.asarray(x))), np.linalg.norm(x.astype(np.float64), axis=1), rtol=1e-5)
    bad = np.ones((3, 4), np.float32)
    bad[1, 2] = np.nan
    bad[2, 0] = np.inf
    clipped = np.asarray(clip_updates(jnp.asarray(bad), 1.0))
    assert np.all(np.isfinite(clipped[0])) and not np.all(np.isfinite(clipped[1])) and not np.all(np.isfinite(clipped[2]))


def test_local_noise_std_matches_configuration():
    noise_multiplier, clip_norm = 1.3, 0.7
    noisy = np.asarray(add_noise(jnp.zeros((64, 8192)), jax.random.key(0), noise_multiplier, clip_norm))
    # 524k samples: the std estimate's relative standard error is ~0.1%.
    assert noisy.std() == pytest.approx(noise_multiplier * clip_norm, rel=0.01)
    assert abs(noisy.mean()) < 0.01 * noise_multiplier * clip_norm
    per_row = noisy.std(axis=1)  # every node gets its own noise of the same scale
    assert np.all(np.abs(per_row / (noise_multiplier * clip_norm) - 1) < 0.05)
    assert not np.allclose(noisy[0], noisy[1])


def test_add_noise_clips_first():
    x = jnp.asarray(rows_of_many_norms())
    clipped = clip_updates(x, 1.0)
    noisy = add_noise(x, jax.random.key(1), 0.0, 1.0)
    np.testing.assert_allclose(np.asarray(noisy), np.asarray(clipped))
    jitted = jax.jit(add_noise)(x, jax.random.key(1), 0.5, 1.0)
    assert np.all(np.linalg.norm(np.asarray(jitted - clip_updates(x, 1.0)), axis=1) > 0)


def test_central_noise_std_is_scaled_by_one_over_n():
    n, noise_multiplier, clip_norm = 10, 1.1, 2.0
    noisy = np.asarray(central_noise_for_mean(jnp.zeros(400_000), jax.random.key(2), noise_multiplier, clip_norm, n))
    assert noisy.std() == pytest.approx(noise_multiplier * clip_norm / n, rel=0.01)


def test_noised_updates_go_through_a_robust_aggregator():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(10, 50)), jnp.float32)
    private = add_noise(x, jax.random.key(3), 1.0, 1.0)
    result, info = aggregate(private, "krum", 3)
    assert np.all(np.isfinite(np.asarray(result))) and not bool(info["skipped"])


def library_epsilon(noise_multiplier, sampling_rate, rounds, delta, accountant):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), rounds
    )
    tracker = rdp.RdpAccountant() if accountant == "rdp" else pld_privacy_accountant.PLDAccountant()
    tracker.compose(event)
    return tracker.get_epsilon(delta)


@pytest.mark.parametrize(
    "noise_multiplier,sampling_rate,rounds,delta",
    [(1.0, 1.0, 10, 1e-5), (1.1, 0.1, 200, 1e-5), (4.0, 0.5, 500, 1e-6), (0.8, 0.01, 1000, 1e-5)],
)
@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_matches_dp_accounting(noise_multiplier, sampling_rate, rounds, delta, accountant):
    expected = library_epsilon(noise_multiplier, sampling_rate, rounds, delta, accountant)
    assert epsilon(noise_multiplier, sampling_rate, rounds, delta, accountant=accountant) == pytest.approx(expected, rel=1e-9)


def test_epsilon_monotonicity_and_edges():
    noises = [0.6, 0.9, 1.5, 3.0, 8.0]
    eps = [epsilon(s, 0.2, 100, 1e-5) for s in noises]
    assert all(a > b for a, b in zip(eps, eps[1:])), eps  # more noise -> smaller epsilon
    assert epsilon(1.0, 0.2, 200, 1e-5) > epsilon(1.0, 0.2, 100, 1e-5)  # more rounds -> larger
    assert epsilon(1.0, 0.1, 100, 1e-5) < epsilon(1.0, 0.5, 100, 1e-5)  # sampling amplifies
    assert epsilon(1.2, 0.3, 50, 1e-5, accountant="pld") <= epsilon(1.2, 0.3, 50, 1e-5) * 1.01  # PLD is tighter
    assert epsilon(1.0, 1.0, 0, 1e-5) == 0.0
    assert epsilon(0.0, 1.0, 5, 1e-5) == float("inf")
    with pytest.raises(ValueError, match="sampling_rate"):
        epsilon(1.0, 0.0, 5, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        epsilon(1.0, 0.5, 5, 1.0)
    with pytest.raises(ValueError, match="accountant"):
        epsilon(1.0, 0.5, 5, 1e-5, accountant="moments")
