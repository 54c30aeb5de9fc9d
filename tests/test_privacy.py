"""Node-level DP: clipping bound, noise scale (updates and observation statistics), and
the accountant against computations that do not go through it: the exact privacy curve
of the Gaussian mechanism (Balle & Wang 2018) and the Renyi DP of the sampled Gaussian at
integer orders (Mironov, Talwar & Zhang 2019)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, special, stats

from aro_jax.federated import fedppo
from aro_jax.federated.aggregators import aggregate
from aro_jax.federated.privacy import (
    add_noise,
    central_noise_for_mean,
    clip_updates,
    combined_noise_multiplier,
    epsilon,
    privatise_statistics,
    update_norms,
)


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


def gaussian_epsilon_exact(noise_multiplier, rounds, delta):
    """Exact epsilon of `rounds` compositions of the Gaussian mechanism (sensitivity 1, std
    sigma): a Gaussian mechanism with mu = sqrt(rounds) / sigma, whose privacy curve is
    delta(eps) = Phi(-eps / mu + mu / 2) - e^eps Phi(-eps / mu - mu / 2) (Balle & Wang 2018,
    Theorem 8), solved for eps."""
    mu = math.sqrt(rounds) / noise_multiplier

    def excess(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return optimize.brentq(excess, 0.0, 500.0, xtol=1e-12)


def sampled_gaussian_rdp_epsilon(noise_multiplier, sampling_rate, rounds, delta, orders=range(2, 257)):
    """Upper bound on epsilon: Renyi DP of the Poisson-sampled Gaussian at integer orders,
    A_a = sum_k C(a, k) (1 - q)^(a - k) q^k exp((k^2 - k) / (2 sigma^2)) (Mironov, Talwar &
    Zhang 2019, Sec. 3.3), composed over rounds, converted with the classical
    eps = rdp(a) + log(1 / delta) / (a - 1) (Mironov 2017, Prop. 3). dp-accounting's
    conversion is tighter, so its epsilon must be at most this."""
    q, s = sampling_rate, noise_multiplier
    best = math.inf
    for a in orders:
        k = np.arange(a + 1)
        log_terms = (special.gammaln(a + 1) - special.gammaln(k + 1) - special.gammaln(a - k + 1)
                     + (a - k) * np.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * s * s))
        rdp = rounds * special.logsumexp(log_terms) / (a - 1)
        best = min(best, rdp + math.log(1 / delta) / (a - 1))
    return best


@pytest.mark.parametrize("noise_multiplier,rounds,delta", [(1.0, 10, 1e-5), (4.0, 500, 1e-6), (2.0, 1, 1e-5), (8.0, 2000, 1e-5)])
def test_unsampled_epsilon_matches_the_exact_gaussian_curve(noise_multiplier, rounds, delta):
    exact = gaussian_epsilon_exact(noise_multiplier, rounds, delta)
    # PLD accounting is exact up to its discretisation (pessimistic: never below).
    assert exact <= epsilon(noise_multiplier, 1.0, rounds, delta, accountant="pld") <= exact * 1.01 + 1e-3
    # RDP is an upper bound, loose by a few tens of percent at most at these settings.
    assert exact <= epsilon(noise_multiplier, 1.0, rounds, delta) <= exact * 1.4


@pytest.mark.parametrize(
    "noise_multiplier,sampling_rate,rounds,delta",
    [(1.1, 0.1, 200, 1e-5), (4.0, 0.5, 500, 1e-6), (0.8, 0.01, 1000, 1e-5), (2.0, 0.2, 100, 1e-5)],
)
def test_sampled_epsilon_is_within_independent_rdp_bound(noise_multiplier, sampling_rate, rounds, delta):
    bound = sampled_gaussian_rdp_epsilon(noise_multiplier, sampling_rate, rounds, delta)
    rdp = epsilon(noise_multiplier, sampling_rate, rounds, delta)
    pld = epsilon(noise_multiplier, sampling_rate, rounds, delta, accountant="pld")
    # The tighter RDP-to-DP conversion gains a little over the classical one, not more.
    assert 0.75 * bound <= rdp <= bound * (1 + 1e-6)
    assert pld <= rdp * 1.01


@pytest.mark.parametrize("sigma,rounds", [(1.0, 50), (3.0, 400)])
def test_federated_epsilon_counts_both_releases_of_a_round(sigma, rounds):
    """Each round releases a node's update and its observation statistics, both with
    multiplier sigma: the node's epsilon is that of 2 x rounds Gaussian releases, exactly
    the Gaussian curve with mu = sqrt(2 rounds) / sigma."""
    fed = fedppo.FederatedConfig(mode="federated", dp_clip_norm=1.0, dp_noise_multiplier=sigma, dp_delta=1e-5)
    exact = gaussian_epsilon_exact(sigma, 2 * rounds, 1e-5)
    assert exact <= fedppo.privacy_spent(fed, rounds, accountant="pld") <= exact * 1.01 + 1e-3
    assert fedppo.privacy_spent(fed, rounds) > epsilon(sigma, 1.0, rounds, 1e-5)  # more than the update alone
    assert combined_noise_multiplier(sigma, sigma) == pytest.approx(sigma / math.sqrt(2))
    assert combined_noise_multiplier(1.0, 2.0) == pytest.approx((1 + 0.25) ** -0.5)
    assert fedppo.privacy_spent(fedppo.FederatedConfig(), 10) == float("inf")
    assert fedppo.privacy_spent(fed, 0) == 0.0


def test_statistics_mechanism_clips_and_noises_the_message():
    """The statistics message [mean, std] of each node is clipped to C_s and gets noise of
    std sigma C_s; variances come back as squares (>= 0)."""
    rng = np.random.default_rng(2)
    means = rng.normal(size=(6, 20)).astype(np.float32) * 5
    variances = rng.uniform(0.1, 9.0, size=(6, 20)).astype(np.float32)
    clipped_m, clipped_v = privatise_statistics(jnp.asarray(means), jnp.asarray(variances), jax.random.key(0), 0.0, 2.0)
    message = np.concatenate([np.asarray(clipped_m), np.sqrt(np.asarray(clipped_v))], axis=1)
    np.testing.assert_allclose(np.linalg.norm(message, axis=1), 2.0, rtol=1e-5)  # every message was longer than 2
    original = np.concatenate([means, np.sqrt(variances)], axis=1)
    np.testing.assert_allclose(message / 2.0, original / np.linalg.norm(original, axis=1, keepdims=True), rtol=1e-4, atol=1e-6)
    zeros = jnp.zeros((64, 4096))
    noisy_m, noisy_v = privatise_statistics(zeros, zeros, jax.random.key(1), 1.5, 0.4)
    assert np.asarray(noisy_m).std() == pytest.approx(0.6, rel=0.01)
    assert np.sqrt(np.asarray(noisy_v)).mean() == pytest.approx(0.6 * math.sqrt(2 / math.pi), rel=0.01)  # |N(0, 0.6^2)|
    assert np.all(np.asarray(noisy_v) >= 0)


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
