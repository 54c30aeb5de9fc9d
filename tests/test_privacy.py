"""Differential privacy at both units. Region level: clipping bound, noise scale (updates
and observation statistics, local and central), the central mechanism's refusals, and the
accountant against computations that do not go through it: the exact privacy curve of the
Gaussian mechanism (Balle & Wang 2018) and the Renyi DP of the sampled Gaussian at integer
orders (Mironov, Talwar & Zhang 2019). Segment level (DP-SGD): per-segment clipping, noise
scale, real Poisson sampling, and the reported epsilon against dp-accounting called
directly; epsilon in the training log, the run summary and the exported policy."""

import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, special, stats

from aro_jax import config as config_lib
from aro_jax.algorithms import ppo
from aro_jax.config import ConfigError, load_config
from aro_jax.federated import aggregators, fedppo, privacy
from aro_jax.training import trainers
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


# --- segment level (DP-SGD) and the central mechanism ------------------------------------

# The federated tests' five-region config, with FedAvg and the paper's reward.
TINY = f"""\
include: [{Path(__file__).parent / "workers" / "tiny5.yaml"}]
federated: {{aggregator: mean, num_byzantine: 0}}
objective: {{kind: paper}}
"""
N_NODES = 5
SEGMENT_DP = ["ppo.normalize_obs=false", "federated.segment_dp_clip_norm=0.5", "federated.segment_dp_noise_multiplier=1.3"]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("priv") / "tiny5.yaml"
    path.write_text(TINY)
    return path


def per_segment_grads(num_segments=40, seed=0):
    """A two-leaf gradient pytree per segment, norms spread over 1e-4 .. 1e4."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(-4, 4, num_segments).astype(np.float32)
    return {"w": jnp.asarray(rng.normal(size=(num_segments, 7, 5)).astype(np.float32) * scales[:, None, None]),
            "b": jnp.asarray(rng.normal(size=(num_segments, 5)).astype(np.float32) * scales[:, None])}


def tree_norms(tree):
    return np.sqrt(sum(np.sum(np.asarray(x, np.float64).reshape(x.shape[0], -1) ** 2, axis=1) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("clip_norm", [0.01, 1.0, 30.0])
def test_per_segment_clipping_bounds_every_segment_gradient(clip_norm):
    grads = per_segment_grads()
    clipped = ppo.clip_per_segment(grads, clip_norm)
    norms, raw = tree_norms(clipped), tree_norms(grads)
    assert np.all(norms <= clip_norm * (1 + 1e-5))  # every segment, not the batch as a whole
    inside = raw <= clip_norm
    assert inside.any() and (~inside).any()
    for k in grads:  # inside the ball: untouched; outside: on the sphere, same direction
        np.testing.assert_array_equal(np.asarray(clipped[k])[inside], np.asarray(grads[k])[inside])
    np.testing.assert_allclose(norms[~inside], clip_norm, rtol=1e-5)
    # The released gradient moves by at most C / expected_count when one segment is replaced
    # by an arbitrary (here 1e6 x larger) one: the bound DP-SGD's sensitivity rests on.
    # Without per-segment clipping (or with the batch clipped as a whole) it moves ~1e6 x more.
    mask = jnp.ones(40, bool)
    expected = 40 * 0.5
    g0 = ppo.dp_gradient(grads, mask, jax.random.key(0), 0.0, clip_norm, expected)
    changed = jax.tree.map(lambda x: x.at[3].multiply(1e6), grads)
    g1 = ppo.dp_gradient(changed, mask, jax.random.key(0), 0.0, clip_norm, expected)
    moved = np.sqrt(sum(np.sum((np.asarray(g1[k], np.float64) - np.asarray(g0[k], np.float64)) ** 2) for k in grads))
    assert moved <= 2 * clip_norm / expected * (1 + 1e-4)  # replace one = remove one + add one
    removed = ppo.dp_gradient(grads, mask.at[3].set(False), jax.random.key(0), 0.0, clip_norm, expected)
    moved_remove = np.sqrt(sum(np.sum((np.asarray(removed[k], np.float64) - np.asarray(g0[k], np.float64)) ** 2) for k in grads))
    assert moved_remove <= clip_norm / expected * (1 + 1e-4)


def test_segment_and_central_noise_std_match_the_configuration():
    sigma, clip, segments, rate = 1.3, 0.5, 64, 0.25
    zeros = {"w": jnp.zeros((segments, 300, 400))}
    for mask in (jnp.zeros(segments, bool), jnp.ones(segments, bool)):  # the count must not enter the scale
        g = np.asarray(ppo.dp_gradient(zeros, mask, jax.random.key(1), sigma, clip, rate * segments)["w"])
        assert g.std() == pytest.approx(sigma * clip / (rate * segments), rel=0.01)  # 120k samples: ~0.2 % error
    n, q = 10, 0.5
    agg, _ = privacy.central_mean(jnp.zeros((n, 200_000)), jnp.ones(n, bool), jax.random.key(2), sigma, clip, q * n)
    assert np.asarray(agg).std() == pytest.approx(sigma * clip / (q * n), rel=0.01)
    m, v = privacy.central_statistics(jnp.zeros((n, 100_000)), jnp.zeros((n, 100_000)), jnp.zeros(n, bool), jax.random.key(3), sigma, 4.0, q * n)
    assert np.asarray(m).std() == pytest.approx(sigma * 4.0 / (q * n), rel=0.02)
    assert privacy.central_sensitivity(clip, n, q) == pytest.approx(clip / (q * n))


def test_central_mean_is_the_clipped_sum_over_the_expected_count():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 30)).astype(np.float32) * np.array([0.01, 1, 10, 100, 1, 1], np.float32)[:, None]
    x[5, 0] = np.nan  # a faulty participant counts as absent
    part = jnp.asarray([True, True, True, False, True, True])
    agg, invalid = privacy.central_mean(jnp.asarray(x), part, jax.random.key(0), 0.0, 1.0, 3.0)
    ok = np.array([1, 1, 1, 0, 1, 0], bool)
    expected = (np.asarray(clip_updates(jnp.asarray(np.nan_to_num(x)), 1.0)) * ok[:, None]).sum(0) / 3.0
    np.testing.assert_allclose(np.asarray(agg), expected, rtol=1e-5, atol=1e-7)
    assert int(invalid) == 1


def test_poisson_sampling_is_real_sampling():
    """Each unit in independently with probability q: the empirical rate is q, batch sizes
    have the binomial variance, and one 'epoch' of 1/q steps leaves some units out and
    takes others twice - none of which a shuffle into fixed minibatches does."""
    n, q, draws = 64, 0.25, 4000
    keys = jax.random.split(jax.random.key(5), draws)
    masks = np.asarray(jax.vmap(lambda k: privacy.poisson_participation(k, n, q))(keys))
    se = math.sqrt(q * (1 - q) / masks.size)
    assert abs(masks.mean() - q) < 5 * se
    sizes = masks.sum(1)
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.15)  # a shuffle: variance 0
    epoch = masks[:4].sum(0)
    assert (epoch == 0).any() and (epoch >= 2).any()


@pytest.mark.parametrize("chunk", [7, 40])
def test_sampled_clipped_sum_computes_every_sampled_segment_and_only_those(chunk):
    """The learner computes gradients only for the sampled segments, `chunk` at a time:
    the result must be the masked sum of every segment's clipped gradient, whatever the
    realised count (none, fewer than a chunk, several chunks, all)."""
    grads = per_segment_grads()
    ident = lambda d: (d, {"seen": jnp.ones(d["b"].shape[0])})  # noqa: E731  the data are the gradients
    clipped = ppo.clip_per_segment(grads, 0.5)
    pre = np.asarray(tree_norms(grads))
    for mask in (np.zeros(40, bool), np.arange(40) % 9 == 0, np.asarray(jax.random.uniform(jax.random.key(3), (40,)) < 0.6), np.ones(40, bool)):
        total, info, count = ppo.sampled_clipped_sum(ident, grads, jnp.asarray(mask), 0.5, chunk)
        assert int(count) == mask.sum() and float(info["seen"]) == mask.sum()
        for name in grads:
            want = np.tensordot(mask.astype(np.float32), np.asarray(clipped[name]), axes=1)
            np.testing.assert_allclose(np.asarray(total[name]), want, rtol=1e-5, atol=1e-6)
        assert float(info["dp_segment_grad_norm"]) == pytest.approx(pre[mask].sum(), rel=1e-5)
    assert ppo.dp_chunk_size(128, 0.25) == 53 and ppo.dp_chunk_size(128, 1.0) == 128


@pytest.mark.timeout(300)
def test_learner_samples_segments_at_the_configured_rate(tiny_config):
    """Inside DP-SGD PPO: per-step batches drawn at the configured rate, their size varies."""
    cfg = load_config(tiny_config, SEGMENT_DP + ["env.num_clusters=32", "federated.segment_dp_sampling_rate=0.3",
                                                 "train.total_env_steps=10240", "federated.mode=local"])
    trainer = trainers.make_trainer(cfg)
    hp = trainers.hyperparams(cfg)
    state = jax.jit(trainer.init)(jax.random.PRNGKey(0), hp)
    _, metrics = jax.jit(trainer.chunk, static_argnums=2)(state, hp, trainer.units_total)
    rate, spread = np.asarray(metrics["dp_sample_rate"]), np.asarray(metrics["dp_batch_std"])
    draws = rate.size * N_NODES * cfg.federated.local_updates * 2 * 32  # rounds x nodes x updates x steps x segments
    assert abs(rate.mean() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / draws)
    assert np.all(spread > 0)
    assert np.all(np.isfinite(np.asarray(metrics["reward"])))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("private", [False, True])
def test_a_frozen_trunk_trains_the_output_layers_only(tiny_config, private):
    """ppo.frozen_trunk: the hidden layers end where they started (under DP-SGD too, so no
    noise reached them) while every output layer moves; without it the hidden layers move."""
    base = ["env.num_clusters=8", "train.total_env_steps=10240", "federated.mode=local", *(SEGMENT_DP if private else [])]

    def moved(extra):
        cfg = load_config(tiny_config, base + extra)
        trainer = trainers.make_trainer(cfg)
        hp = trainers.hyperparams(cfg)
        state = jax.jit(trainer.init)(jax.random.PRNGKey(0), hp)
        start = trainer.weights(state).params
        end = trainer.weights(jax.jit(trainer.chunk, static_argnums=2)(state, hp, trainer.units_total)[0]).params
        diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), start, end)["params"]
        return {layer: max(jax.tree.leaves(d)) for layer, d in diff.items()}

    frozen = moved(["ppo.frozen_trunk=true"])
    assert {layer for layer, d in frozen.items() if d > 0} == {layer for layer in frozen if layer.endswith("_out")}, frozen
    assert all(d > 1e-6 for layer, d in moved([]).items()), "without frozen_trunk every layer trains"


def rdp_epsilon_directly(sigma, q, steps, delta):
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("rounds", [1, 3, 40])
@pytest.mark.parametrize("rollout,epochs,minibatches,rate", [(8, 1, 2, 0.0), (8, 3, 4, 0.1), (12, 2, 2, 0.4)])
def test_reported_segment_epsilon_equals_dp_accounting(tiny_config, rounds, rollout, epochs, minibatches, rate):
    """(noise, sampling rate, steps) accounted as dp-accounting does it directly: a day of
    32 ticks spans 32 / R rollouts (R | 32), or at most ceil(32 / R) + 1 at sensitivity 2C
    (R = 12); each rollout is followed by epochs x minibatches sampled steps."""
    cfg = load_config(tiny_config, SEGMENT_DP + [f"ppo.rollout_steps={rollout}", f"ppo.update_epochs={epochs}",
                                                 f"ppo.num_minibatches={minibatches}", f"federated.segment_dp_sampling_rate={rate}",
                                                 "env.num_clusters=4", "train.total_env_steps=100000"])
    (report,) = trainers.privacy_report(cfg, rounds, episode_ticks=32)
    updates = rounds * cfg.federated.local_updates
    day = 32 // rollout if 32 % rollout == 0 else math.ceil(32 / rollout) + 1
    sigma = 1.3 if 32 % rollout == 0 else 1.3 / 2
    q = rate or 1 / minibatches
    steps = min(updates, day) * epochs * minibatches
    assert report["steps"] == steps and report["sampling_rate"] == q and report["unit"] == "segment"
    assert report["epsilon"] == pytest.approx(rdp_epsilon_directly(sigma, q, steps, 1e-5), rel=1e-9)
    assert report["delta"] == 1e-5 and report["N"] == 4


def test_segment_epsilon_at_the_benchmark_settings_and_longer_training(tiny_config):
    """A day of 2880 ticks in rollouts of 64 spans 45 rollouts; 1 epoch x 4 Poisson steps
    at q = 0.25 after each: 180 accounted steps, whatever the training length (each day
    is a new unit). Accounting every step of the run instead would give a larger epsilon."""
    over = SEGMENT_DP[:2] + ["federated.segment_dp_noise_multiplier=2.5", "ppo.rollout_steps=64", "ppo.update_epochs=1",
                             "ppo.num_minibatches=4", "federated.segment_dp_sampling_rate=0.25", "env.num_clusters=128",
                             "federated.local_updates=4", "train.total_env_steps=100000000"]
    cfg = load_config(tiny_config, over)
    direct = rdp_epsilon_directly(2.5, 0.25, 180, 1e-5)
    for rounds in (12, 61, 500):  # 48 updates already span the day; 244 and 2000 do not add to it
        (report,) = trainers.privacy_report(cfg, rounds, episode_ticks=2880)
        assert report["steps"] == 180 and report["sampling_rate"] == 0.25
        assert report["epsilon"] == pytest.approx(direct, rel=1e-9)
    assert direct < 8.0 < rdp_epsilon_directly(2.5, 0.25, 61 * 4 * 4, 1e-5)
    (short,) = trainers.privacy_report(cfg, 5, episode_ticks=2880)  # 20 updates: the day is not over yet
    assert short["steps"] == 80 and short["epsilon"] == pytest.approx(rdp_epsilon_directly(2.5, 0.25, 80, 1e-5), rel=1e-9)


def test_reported_region_epsilon_equals_dp_accounting(tiny_config):
    """Central mechanism, regions sampled at q: rounds x one Poisson-sampled Gaussian over
    both releases (update and statistics, multiplier sigma / sqrt 2); local: q = 1."""
    base = ["federated.dp_clip_norm=0.1", "federated.dp_noise_multiplier=2.0"]
    cfg = load_config(tiny_config, base + ["federated.dp_mechanism=central", "federated.dp_node_sampling=0.4"])
    (report,) = trainers.privacy_report(cfg, 25)
    assert report["unit"] == "region" and "central" in report["mechanism"]
    assert report["epsilon"] == pytest.approx(rdp_epsilon_directly(2.0 / math.sqrt(2), 0.4, 25, 1e-5), rel=1e-9)
    (local,) = trainers.privacy_report(load_config(tiny_config, base), 25)
    assert local["epsilon"] == pytest.approx(rdp_epsilon_directly(2.0 / math.sqrt(2), 1.0, 25, 1e-5), rel=1e-9)
    assert trainers.privacy_report(load_config(tiny_config), 25) == []  # no noise: no guarantee claimed


@pytest.mark.parametrize("name", sorted(set(aggregators.AGGREGATORS) - set(privacy.CENTRAL_SENSITIVITY)))
def test_central_noise_refuses_aggregators_of_unbounded_sensitivity(tiny_config, name, capsys):
    assert name in privacy.CENTRAL_REFUSED  # every refusal has its reason
    with pytest.raises(ValueError, match=name):
        privacy.check_central(name)
    f = 0  # every aggregator's (n, f) requirement holds: the refusal is the sensitivity's
    overrides = ["federated.dp_mechanism=central", "federated.dp_clip_norm=0.1", "federated.dp_noise_multiplier=1.0",
                 f"federated.aggregator={name}", f"federated.num_byzantine={f}"]
    with pytest.raises(ConfigError, match="federated.aggregator"):
        load_config(tiny_config, overrides)
    fed = fedppo.FederatedConfig(mode="federated", aggregator=name, num_byzantine=f, dp_mechanism="central", dp_clip_norm=0.1)
    with pytest.raises(ValueError, match="refused"):
        fedppo.make_federated_train(None, {"w": jnp.zeros((N_NODES, 3))}, fed)
    from aro_jax import cli

    assert cli.main(["train", str(tiny_config), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: config key 'federated.aggregator'") and name in err[0]


def test_central_noise_refuses_pre_aggregators_and_accepts_the_mean(tiny_config):
    with pytest.raises(ValueError, match="pre-aggregators"):
        privacy.check_central("mean", ["nnm"])
    with pytest.raises(ConfigError, match="federated.pre_aggregators"):
        load_config(tiny_config, ["federated.dp_mechanism=central", "federated.dp_clip_norm=0.1",
                                  "federated.dp_noise_multiplier=1.0", "federated.pre_aggregators=[nnm]"])
    privacy.check_central("mean")


@pytest.mark.parametrize("overrides,key", [
    (["federated.dp_clip_norm=0.1", "federated.dp_noise_multiplier=1.0", "federated.dp_delta=0.25"], "federated.dp_delta"),  # >= 1/5 regions
    (SEGMENT_DP + ["env.num_clusters=8", "federated.dp_delta=0.2"], "federated.dp_delta"),  # >= 1/8 segments
    (["federated.dp_clip_norm=0.1", "federated.dp_noise_multiplier=1.0", "federated.dp_node_sampling=0.5"], "federated.dp_node_sampling"),
    (["federated.segment_dp_clip_norm=0.5", "federated.segment_dp_noise_multiplier=1.0"], "ppo.normalize_obs"),
    (SEGMENT_DP + ["objective.kind=slo"], "objective.kind"),
    (SEGMENT_DP[:2] + ["federated.segment_dp_sampling_rate=1.5"], "federated.segment_dp_sampling_rate"),
    (["federated.dp_mechanism=server"], "federated.dp_mechanism"),
])
def test_privacy_config_errors_name_their_key(tiny_config, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(tiny_config, overrides)


def test_delta_is_below_one_over_n_by_default(tiny_config):
    cfg = load_config(tiny_config, SEGMENT_DP)
    assert cfg.federated.dp_delta < 1 / config_lib.segment_pool(cfg) and cfg.federated.dp_delta < 1 / N_NODES
    assert load_config(None).federated.dp_delta < 1 / (10 * 2048)


@pytest.mark.timeout(300)
def test_central_round_adds_noise_once_to_the_clipped_mean(tiny_config):
    """Every region in (q = 1): the global step is the mean of the clipped deltas plus noise
    of std sigma C / n per coordinate - sqrt(n) less than local noise gives the mean."""
    sigma, clip = 1.0, 1e-4
    cfg = load_config(tiny_config, ["federated.dp_mechanism=central", f"federated.dp_clip_norm={clip}",
                                    f"federated.dp_noise_multiplier={sigma}", "federated.dp_stats_clip_norm=1000"])
    from aro_jax.envs.scenarios import cluster_params

    init, chunk, _ = trainers.make_federated(cfg, cluster_params(cfg, "train"))
    hp = trainers.hyperparams(cfg)
    state0 = jax.jit(init)(jax.random.PRNGKey(0), hp)
    state, metrics = jax.jit(lambda s: chunk(s, hp, 1))(state0)
    flat = lambda p: np.asarray(jax.flatten_util.ravel_pytree(p)[0], np.float64)  # noqa: E731
    deltas = np.asarray(state.previous_deltas, np.float64)
    norms = np.linalg.norm(deltas, axis=1)
    assert norms.min() > 100 * clip
    residual = flat(state.global_params) - flat(state0.global_params) - (deltas * (clip / norms)[:, None]).mean(0)
    assert residual.std() == pytest.approx(sigma * clip / N_NODES, rel=0.1)
    assert float(metrics["participants"][0]) == N_NODES


@pytest.mark.timeout(600)
def test_epsilon_in_the_log_the_summary_and_the_export(tiny_config, tmp_path):
    from aro_jax.deploy.export import SPEC_FILE, export_policy
    from aro_jax.training import driver

    cfg = load_config(tiny_config, SEGMENT_DP + ["env.num_clusters=4"])
    run_dir = tmp_path / "run"
    driver.train(cfg, run_dir, quiet=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        (entry,) = r["privacy"]
        assert entry == trainers.privacy_report(cfg, r["unit"], episode_ticks=32)[0]
        assert {"epsilon", "delta", "unit", "mechanism"} <= set(entry) and 0 < entry["epsilon"] < float("inf")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["privacy"] == records[-1]["privacy"] and "per segment" in summary["privacy_line"]
    spec = json.loads((export_policy(run_dir, tmp_path / "export") / SPEC_FILE).read_text())
    assert spec["privacy"]["guarantees"] == records[-1]["privacy"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["federated", "local"])
def test_a_frozen_normaliser_keeps_its_statistics_and_releases_none(tiny_config, mode):
    """ppo.frozen_normalizer under DP-SGD: the normaliser a run starts from (a pretraining's)
    is what it ends with, in every node and the federation's global, and epsilon counts no
    statistics release (the same as with the normaliser off). Without the freeze the same
    run is refused (its running statistics would pool every segment without noise)."""
    over = [*SEGMENT_DP[1:], "env.num_clusters=4", "train.total_env_steps=5120", f"federated.mode={mode}"]
    with pytest.raises(config_lib.ConfigError, match="ppo.normalize_obs"):
        load_config(tiny_config, over)
    cfg = load_config(tiny_config, [*over, "ppo.frozen_normalizer=true"])
    trainer = trainers.make_trainer(cfg)
    hp = trainers.hyperparams(cfg)
    state = trainer.init(jax.random.PRNGKey(0), hp)
    source = trainer.weights(state)
    source = jax.tree.map(lambda x: x[0], source) if trainer.per_node else source
    public = source.obs_stats.replace(mean=source.obs_stats.mean + 0.5, var=source.obs_stats.var * 3.0, count=jnp.asarray(5e4, jnp.float32))
    state = trainers.start_from(trainer, state, source.replace(obs_stats=public))
    end, _ = jax.jit(trainer.chunk, static_argnums=2)(state, hp, trainer.units_total)
    stats = [end.global_stats, end.nodes.obs_stats] if mode == "federated" else [end.nodes.obs_stats]
    for got in stats:
        for field in ("mean", "var", "count"):
            np.testing.assert_array_equal(np.broadcast_to(getattr(public, field), np.shape(getattr(got, field))), getattr(got, field))
    (frozen,) = trainers.privacy_report(cfg, trainer.units_total, episode_ticks=32)
    (off,) = trainers.privacy_report(load_config(tiny_config, [*over, "ppo.normalize_obs=false"]), trainer.units_total, episode_ticks=32)
    assert frozen == off and "normaliser" not in frozen["mechanism"]


def test_private_normaliser_statistics_bound_each_segment_and_noise_as_configured():
    rng = np.random.default_rng(6)
    obs = jnp.asarray(rng.normal(size=(32, 16, 5)).astype(np.float32))
    base = ppo.private_statistics(obs, jax.random.key(0), 0.0, 2.0)
    wild = ppo.private_statistics(obs.at[7].set(1e6), jax.random.key(0), 0.0, 2.0)
    released = lambda st: np.concatenate([np.asarray(st.mean), np.asarray(st.var) + np.asarray(st.mean) ** 2])  # noqa: E731
    # The released [mean, mean square] moves by at most 2 C_s / S when one segment is replaced;
    # unclipped, a 1e6-valued segment would move it by ~1e12 / S.
    assert np.linalg.norm(released(wild) - released(base)) <= 2 * 2.0 / 32 * (1 + 1e-3)
    zeros = jnp.zeros((64, 4, 20_000))
    noisy = ppo.private_statistics(zeros, jax.random.key(1), 1.5, 3.0)
    assert np.asarray(noisy.mean).std() == pytest.approx(1.5 * 3.0 / 64, rel=0.02)
    assert float(noisy.count) == 64 * 4


def test_reported_epsilon_with_the_private_normaliser_equals_dp_accounting(tiny_config):
    """DP-SGD steps and the normaliser's per-rollout release composed, as dp-accounting
    composes them directly."""
    import dp_accounting
    from dp_accounting import rdp

    cfg = load_config(tiny_config, SEGMENT_DP[1:] + ["federated.segment_dp_stats_noise_multiplier=4.0", "env.num_clusters=4",
                                                     "train.total_env_steps=100000"])
    (report,) = trainers.privacy_report(cfg, 1, episode_ticks=32)  # 2 updates, 2 steps each
    sgd = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.3)), 4)
    stats = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(4.0), 2)
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.ComposedDpEvent([sgd, stats]))
    assert report["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert report["epsilon"] > rdp_epsilon_directly(1.3, 0.5, 4, 1e-5)  # the normaliser costs privacy
    assert "normaliser" in report["mechanism"]


@pytest.mark.timeout(300)
def test_deployed_policy_is_the_average_of_the_released_globals(tiny_config):
    """federated.global_ema: the deployed weights are the exponential moving average, over
    rounds, of the global parameters every round released (post-processing only), and
    not the last global."""
    decay = 0.6
    cfg = load_config(tiny_config, [*SEGMENT_DP, f"federated.global_ema={decay}"])
    trainer = trainers.make_trainer(cfg)
    hp = trainers.hyperparams(cfg)
    flat = lambda p: np.asarray(jax.flatten_util.ravel_pytree(p)[0], np.float64)  # noqa: E731
    state = jax.jit(trainer.init)(jax.random.PRNGKey(0), hp)
    one_round = jax.jit(lambda s: trainer.chunk(s, hp, 1)[0])
    average = flat(state.global_params)
    for _ in range(3):
        state = one_round(state)
        average = decay * average + (1 - decay) * flat(state.global_params)
    deployed = flat(trainer.weights(state).params)
    np.testing.assert_allclose(deployed, average, rtol=1e-5, atol=1e-6)
    assert np.abs(deployed - flat(state.global_params)).max() > 1e-4  # not the last global


@pytest.mark.parametrize("overrides", [["federated.global_ema=1.0"], ["federated.global_ema=0.9", "federated.personal_mix=0.5"],
                                       ["federated.global_ema=0.9", "federated.mode=local"]],
                         ids=["decay-one", "personal", "local"])
def test_global_average_config_errors_name_their_key(tiny_config, overrides):
    with pytest.raises(ConfigError, match=r"federated\.global_ema"):
        load_config(tiny_config, overrides)


def test_the_privacy_aim_counts_a_row_only_above_the_public_only_policy():
    """privacy_utility.verdict: a private row that reaches the share is 'met' only if it
    beats the group's policy pretrained on public data alone (else the share is the public
    data's); without such a reference, reaching the share within epsilon is enough."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import privacy_utility as pu

    aim = {"share": 0.9, "epsilon": 8.0, "delta": 1e-5}
    row = lambda reward, eps=5.0: {"reward_seeds": [reward], "epsilon": eps, "delta": 1e-5}  # noqa: E731
    public = {"references": {"public only": {"overrides": [pu.PRETRAINED, pu.ZERO_SHOT], "reward_seeds": [-0.3]}}}
    untrained, best = -3.0, -0.1  # share 0.9 at reward -0.39
    assert pu.verdict(public, row(-0.35), untrained, best, aim) == "below public"
    assert pu.verdict(public, row(-0.25), untrained, best, aim) == "met"
    assert pu.verdict(public, row(-0.25, eps=9.0), untrained, best, aim) == "not met"
    assert pu.verdict({"references": {}}, row(-0.35), untrained, best, aim) == "met"
    assert pu.verdict({"references": {}}, row(-0.5), untrained, best, aim) == "not met"
