"""Differential privacy of the nodes' updates: clipping, Gaussian noise, accounting.

Privacy unit: one node's update in one round (node-level DP, the unit the ARO paper's
privacy claim is about: a region's traffic never leaves the region, and the update it
sends should reveal little about it).

Neighbouring relation: "zero-out" adjacency (Kairouz et al. 2021) - two executions are
neighbours when one node's clipped update is replaced by the zero update (the node
contributes no data), everything else equal. The L2 sensitivity of that node's clipped
update is then C = clip_norm, and the Gaussian analysis is the one dp-accounting uses
for ADD_OR_REMOVE_ONE with noise multiplier sigma. For arbitrary replacement of the
node's update (sensitivity 2C) account with `epsilon(noise_multiplier / 2, ...)`.

Two ways to add the noise:

- `add_noise` (the default for the federated round): every node clips its update to C and
  adds N(0, (sigma C)^2) per coordinate before sending. Each sent row is then a Gaussian
  mechanism of its node's data, and whatever the server computes from the rows - mean,
  Krum, median, any robust aggregator - is post-processing, so the guarantee holds for
  every aggregator and does not trust the server.
- `central_noise_for_mean`: the server adds N(0, (sigma C / n)^2) to the mean of the n
  clipped updates. Valid for FedAvg only: with a fixed denominator n, zeroing one node's
  clipped update moves sum/n by at most C / n. We do not scale central noise to C / n for
  robust aggregators because their sensitivity is not C / n: Krum outputs one of the
  rows, so changing one node's update can switch the selected row and move the output by
  up to the diameter of the clipped set (2C); a coordinate-wise median moves, per
  coordinate, by a data-dependent gap between order statistics that is bounded only by
  the clipping range, and summed over coordinates can be of order C, not C / n. Noise
  calibrated to C / n would give no guarantee for them.

The observation statistics a node sends each round (the mean and variance of what it
observed, the shared normaliser's input) are a second release of its data. With DP on
they get the same mechanism (`privatise_statistics`): the message [mean, std] is clipped
to L2 norm `stats_clip_norm` and N(0, (sigma * stats_clip_norm)^2) is added per
coordinate, with the same sigma as the update. The two releases of a round together are
one Gaussian mechanism on the concatenation [update / C, stats / C_s], of L2 sensitivity
sqrt(2) and noise multiplier sigma, i.e. multiplier sigma / sqrt(2) at sensitivity 1:
account a round with `combined_noise_multiplier(sigma, sigma)` (both releases share the
round's sampling, so it is one sampled mechanism, not two).

Accounting (`epsilon`): `rounds` compositions of the Gaussian mechanism with noise
multiplier sigma, each amplified by Poisson sampling when a node takes part in a round
with probability `sampling_rate` < 1 - which holds only if whether a node took part stays
hidden (otherwise pass sampling_rate = 1 and the rounds it took part in).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def update_norms(updates: Array) -> Array:
    """(n,) L2 norm of each row, computed with a per-row scale so that finite rows whose
    squares overflow float32 still get a finite norm. Non-finite rows give NaN or inf."""
    largest = jnp.max(jnp.abs(updates), axis=1)
    scale = jnp.where(largest > 0, largest, 1.0)
    return scale * jnp.sqrt(jnp.sum(jnp.square(updates / scale[:, None]), axis=1))


def clip_updates(updates: Array, clip_norm: float | Array) -> Array:
    """Scale each row of `updates` (n, n_params) to L2 norm at most `clip_norm`.

    Rows already inside the ball are unchanged; rows with NaN/inf stay non-finite (the
    aggregators mask them).
    """
    norms = update_norms(updates)
    factor = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, jnp.finfo(updates.dtype).tiny))
    return updates * factor[:, None].astype(updates.dtype)


def add_noise(updates: Array, key: Array, noise_multiplier: float | Array, clip_norm: float | Array) -> Array:
    """Node-level Gaussian mechanism on every node: clip each row to `clip_norm`, then add
    independent N(0, (noise_multiplier * clip_norm)^2) to each coordinate of each row.

    updates: (n_nodes, n_params). Returns the privatised rows, same shape and dtype, ready
    for any aggregator (the guarantee survives aggregation by post-processing).
    """
    clipped = clip_updates(updates, clip_norm)
    std = jnp.asarray(noise_multiplier * clip_norm, updates.dtype)
    return clipped + std * jax.random.normal(key, updates.shape, updates.dtype)


def central_noise_for_mean(
    aggregate: Array, key: Array, noise_multiplier: float | Array, clip_norm: float | Array, n: int
) -> Array:
    """FedAvg only: add N(0, (noise_multiplier * clip_norm / n)^2) to `aggregate`, the mean
    (sum / n, fixed n) of n updates each clipped to `clip_norm` (zero-out adjacency:
    sensitivity C / n). Not valid for robust aggregators (see the module docstring)."""
    std = jnp.asarray(noise_multiplier * clip_norm / n, aggregate.dtype)
    return aggregate + std * jax.random.normal(key, aggregate.shape, aggregate.dtype)


def privatise_statistics(
    means: Array, variances: Array, key: Array, noise_multiplier: float | Array, clip_norm: float | Array
) -> tuple[Array, Array]:
    """Node-level Gaussian mechanism on every node's observation statistics.

    means, variances: (n_nodes, obs_dim). Each node's message [mean, sqrt(var)] is clipped
    to L2 norm `clip_norm` (zero-out adjacency: sensitivity clip_norm) and gets
    N(0, (noise_multiplier * clip_norm)^2) per coordinate. Returns the privatised
    (means, variances); the variance is the square of the noisy std (post-processing, so
    it stays >= 0). Non-finite rows stay non-finite (the aggregation masks them).
    """
    dim = means.shape[1]
    message = jnp.concatenate([means, jnp.sqrt(jnp.maximum(variances, 0.0))], axis=1)
    clipped = clip_updates(message, clip_norm)
    std = jnp.asarray(noise_multiplier * clip_norm, message.dtype)
    noisy = clipped + std * jax.random.normal(key, message.shape, message.dtype)
    return noisy[:, :dim], jnp.square(noisy[:, dim:])


def combined_noise_multiplier(*noise_multipliers: float) -> float:
    """The noise multiplier of one Gaussian mechanism equivalent to releasing, together,
    several Gaussian mechanisms of the same data, each at sensitivity 1 with its own
    multiplier: (sum_k sigma_k^-2)^-1/2 (their concatenation, rescaled per block)."""
    if any(s < 0 for s in noise_multipliers):
        raise ValueError(f"noise multipliers must be >= 0, got {noise_multipliers}")
    if not noise_multipliers or any(s == 0 for s in noise_multipliers):
        return 0.0
    return float(sum(s**-2 for s in noise_multipliers) ** -0.5)


def dp_event(noise_multiplier: float, sampling_rate: float, rounds: int):
    """The dp-accounting event for `rounds` rounds of the per-node Gaussian mechanism, each
    Poisson-sampled with `sampling_rate` (1.0 is the unsampled mechanism)."""
    import dp_accounting

    round_event = dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(round_event, rounds)


def epsilon(
    noise_multiplier: float, sampling_rate: float, rounds: int, delta: float, accountant: str = "rdp"
) -> float:
    """(epsilon, delta)-DP epsilon per node after `rounds` rounds.

    Args:
      noise_multiplier: sigma, the noise std divided by clip_norm.
      sampling_rate: probability that a node takes part in a round (1.0: every round).
      rounds: rounds run.
      delta: target delta (e.g. 1e-5).
      accountant: "rdp" (Renyi DP, Mironov 2017; dp-accounting's default orders) or "pld"
        (privacy loss distributions; tighter).

    Returns epsilon (inf with no noise; 0 after no rounds).
    """
    if not 0.0 < sampling_rate <= 1.0:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if rounds < 0 or noise_multiplier < 0:
        raise ValueError(f"rounds and noise_multiplier must be >= 0, got {rounds}, {noise_multiplier}")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return float("inf")
    event = dp_event(noise_multiplier, sampling_rate, rounds)
    if accountant == "rdp":
        from dp_accounting import rdp

        tracker = rdp.RdpAccountant()
    elif accountant == "pld":
        from dp_accounting.pld import pld_privacy_accountant

        tracker = pld_privacy_accountant.PLDAccountant()
    else:
        raise ValueError(f"unknown accountant {accountant!r}; valid: 'rdp', 'pld'")
    tracker.compose(event)
    return float(tracker.get_epsilon(delta))


__all__ = [
    "add_noise",
    "central_noise_for_mean",
    "clip_updates",
    "combined_noise_multiplier",
    "dp_event",
    "epsilon",
    "privatise_statistics",
    "update_norms",
]
