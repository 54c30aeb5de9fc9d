"""Differential privacy: clipping, Gaussian noise, sampling and accounting, at two units.

What is protected, and what is not. The simulator's parameters (hardware profiles, mean
rates, time zones, prices) are public configuration; nothing here hides them. What a
guarantee covers is what a region's real traffic would reveal, at one of two units:

- **region** (node-level DP): everything one region contributes to the federation, i.e.
  its parameter update and its observation statistics in every round. Neighbouring
  runs differ by adding or removing one region. Mechanisms:
  * ``local``: every region clips its update to C and adds N(0, (sigma C)^2) per
    coordinate before sending (`add_noise`); whatever the server computes from the rows
    (any robust aggregator) is post-processing, so the server need not be trusted.
  * ``central`` (DP-FedAvg, McMahan et al. 2018): regions take part in a round with
    probability q (Poisson, `poisson_participation`); the trusted server clips each
    participant's update to C, sums them, adds N(0, (sigma C)^2) once and divides by the
    fixed expected count q n (`central_mean`). Adding or removing one region moves the
    sum by at most C, so the released mean has sensitivity C / (q n). Only aggregators
    with a bounded sensitivity are allowed (`CENTRAL_SENSITIVITY`); the others are
    refused with the reason (`CENTRAL_REFUSED`, `check_central`).
- **segment** (record-level DP inside each region, DP-SGD): one simulated cluster-day of
  a region's traffic, i.e. one of the learner's ``num_envs`` parallel clusters over one
  episode. Every PPO gradient step Poisson-samples the region's segments with rate q,
  clips each sampled segment's gradient (the gradient of its rollout's loss) to C, adds
  N(0, (sigma C)^2) to the sum and divides by the expected count (`ppo.dp_gradient`;
  the learner computes gradients only for the sampled segments, gathered in chunks for
  as many chunks as the realised count needs, `ppo.sampled_clipped_sum`, so the sample
  size stays unbounded). The step count a cluster-day takes part in is bounded by the
  updates whose rollouts it spans (`segment_steps`): epochs x minibatches steps after
  each of its E / R rollouts. A longer run adds new cluster-days, not steps on old
  ones, so past the first day training length does not change a unit's epsilon. The running observation normaliser is fed only by
  privatised per-segment statistics (`ppo.private_statistics`, one more Gaussian release
  per rollout, composed in the accounting) or switched off; the constrained objective's
  multipliers pool every segment without noise, so DP-SGD refuses it (config validation
  says so). Training-log metrics (rollout means)
  are not privatised: they stay with whoever runs the training; the guarantee covers
  the released policy and, in federated mode, every update a region sends.

Neighbouring relation for the Gaussian analysis: add or remove one unit (dp-accounting's
ADD_OR_REMOVE_ONE). For local noise, the zero-out view (Kairouz et al. 2021) gives the
same sensitivity C per row; for replacement of a unit (sensitivity 2C) account with
`epsilon(noise_multiplier / 2, ...)`.

The observation statistics a region sends each round are a second release at the region
level: they get the same mechanism as the update (`privatise_statistics`, or
`central_statistics` under the central mechanism) with their own clip norm and the same
sigma, and both releases of a round are one Gaussian mechanism on their concatenation:
`combined_noise_multiplier(sigma, sigma)`.

Accounting (`epsilon`): compositions of the Poisson-sampled Gaussian mechanism
(dp-accounting's RDP or PLD accountant). Sampling amplification holds only while who
took part stays hidden; under the local mechanism the server sees who sent, so region
sampling is allowed only with the central mechanism. Delta must be below 1/N for the
unit's N (regions in the federation, or segments in the learner's pool).
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


# Central noise: the L2 sensitivity of each allowed aggregator's output to adding or
# removing one region, with every update clipped to C, q the region sampling rate, n the
# regions (the server divides by the fixed expected count q n).
CENTRAL_SENSITIVITY = {
    "mean": "C / (q n): the sum of the participants' clipped updates moves by at most C",
}

# Why the others are refused: noise calibrated to C / (q n) would give them no guarantee,
# and the bounds that do hold make central noise no better than local noise.
CENTRAL_REFUSED = {
    "krum": "a selection rule: one region can switch the selected row, moving the output by up to 2C",
    "multi_krum": "a selection rule: one region can change which rows are averaged, a jump not bounded by C / (q n)",
    "bulyan": "a selection rule (iterated Krum then trimming): one region can change the selected set",
    "median": "an order statistic per coordinate: one region can move every coordinate by the gap between "
              "neighbouring values, up to 2C each, so the L2 bound grows like 2C sqrt(d)",
    "trimmed_mean": "an order statistic per coordinate: which values are trimmed depends on every region, "
                    "so the L2 bound grows like 2C sqrt(d) / (n - 2f)",
    "geometric_median": "an iterative, data-dependent weighting: no sensitivity bound below the clipped set's diameter 2C",
    "centered_clipping": "its centre and radius tau are computed from the updates (median start, median distance), "
                         "so one region moves them; no bound below 2C",
}


def check_central(aggregator: str, pre_aggregators=()) -> None:
    """Raise ValueError unless central noise can be calibrated to `aggregator`'s
    sensitivity (`CENTRAL_SENSITIVITY`); pre-aggregators mix or regroup the rows, which
    changes how far one region reaches, so none is allowed."""
    if aggregator not in CENTRAL_SENSITIVITY:
        why = CENTRAL_REFUSED.get(aggregator, "its sensitivity is not bounded here")
        raise ValueError(f"central DP noise needs an aggregator of bounded sensitivity ({sorted(CENTRAL_SENSITIVITY)}: "
                         f"{CENTRAL_SENSITIVITY['mean']}); {aggregator!r} is refused: {why}")
    if pre_aggregators:
        raise ValueError(f"central DP noise takes no pre-aggregators (got {list(pre_aggregators)}): they let one region "
                         "reach several rows, so the clipped mean's sensitivity C / (q n) no longer holds")


def central_sensitivity(clip_norm: float, num_nodes: int, sampling_rate: float = 1.0) -> float:
    """L2 sensitivity C / (q n) of the DP-FedAvg clipped mean (see CENTRAL_SENSITIVITY)."""
    return clip_norm / (sampling_rate * num_nodes)


def poisson_participation(key: Array, num: int, rate: float | Array) -> Array:
    """(num,) bool: each unit takes part independently with probability `rate`
    (Poisson sampling: the batch size varies; not a fixed-size shuffle)."""
    return jax.random.uniform(key, (num,)) < rate


def _masked_clipped_sum(rows: Array, participate: Array, clip_norm) -> tuple[Array, Array]:
    """Sum of the participating finite rows, each clipped to `clip_norm`; a non-finite row
    counts as absent (it contributes zero, so the sensitivity bound still holds)."""
    valid = participate & jnp.all(jnp.isfinite(rows), axis=1)
    clipped = clip_updates(jnp.where(valid[:, None], rows, 0.0), clip_norm)
    return clipped.sum(0), valid


def central_mean(
    updates: Array, participate: Array, key: Array, noise_multiplier, clip_norm, expected_count
) -> tuple[Array, Array]:
    """DP-FedAvg server step: (sum of the participants' updates clipped to C
    + N(0, (sigma C)^2)) / expected_count, expected_count = q n fixed (not the realised
    count, which would depend on who took part). Returns (aggregate, number of rows left
    out as non-finite among the participants)."""
    total, valid = _masked_clipped_sum(updates, participate, clip_norm)
    std = jnp.asarray(noise_multiplier * clip_norm, updates.dtype)
    noisy = total + std * jax.random.normal(key, total.shape, updates.dtype)
    return noisy / expected_count, jnp.sum(participate & ~valid)


def central_statistics(
    means: Array, variances: Array, participate: Array, key: Array, noise_multiplier, clip_norm, expected_count
) -> tuple[Array, Array]:
    """The observation statistics under the central mechanism: each participant's
    message [mean, std] clipped to `clip_norm`, summed, N(0, (sigma clip_norm)^2) added
    once, divided by expected_count. Returns (mean, variance = square of the mean std)."""
    dim = means.shape[1]
    message = jnp.concatenate([means, jnp.sqrt(jnp.maximum(variances, 0.0))], axis=1)
    total, _ = _masked_clipped_sum(message, participate, clip_norm)
    std = jnp.asarray(noise_multiplier * clip_norm, message.dtype)
    noisy = (total + std * jax.random.normal(key, total.shape, message.dtype)) / expected_count
    return noisy[:dim], jnp.square(noisy[dim:])


def segment_steps(total_updates: int, episode_ticks: int, rollout_steps: int, epochs: int, minibatches: int) -> tuple[int, float]:
    """(gradient steps one cluster-day takes part in, its L2 sensitivity in units of C).

    Every cluster starts its day at tick 0 and no day ends early (the serving env never
    terminates), so when R = rollout_steps divides E = episode_ticks each rollout column
    holds one day: the day spans E / R rollouts and removing it removes its clipped
    gradient (sensitivity C). Otherwise a column can hold the end of one day and the start
    of the next; removing one of them changes the column's clipped gradient by up to 2C,
    over at most ceil(E / R) + 1 rollouts. Each rollout is followed by epochs x
    minibatches Poisson-sampled steps; never more than the run has."""
    if episode_ticks % rollout_steps == 0:
        updates, sensitivity = episode_ticks // rollout_steps, 1.0
    else:
        updates, sensitivity = -(-episode_ticks // rollout_steps) + 1, 2.0
    return min(total_updates, updates) * epochs * minibatches, sensitivity


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
    noise_multiplier: float, sampling_rate: float, rounds: int, delta: float, accountant: str = "rdp",
    also: tuple[float, int] | None = None,
) -> float:
    """(epsilon, delta)-DP epsilon per node after `rounds` rounds.

    Args:
      noise_multiplier: sigma, the noise std divided by clip_norm.
      sampling_rate: probability that a node takes part in a round (1.0: every round).
      rounds: rounds run.
      delta: target delta (e.g. 1e-5).
      accountant: "rdp" (Renyi DP, Mironov 2017; dp-accounting's default orders) or "pld"
        (privacy loss distributions; tighter).
      also: (noise multiplier, count) of a second, unsampled Gaussian release composed
        with them (DP-SGD's private normaliser statistics).

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
    if also is not None and also[1] > 0:
        import dp_accounting

        if also[0] <= 0:
            return float("inf")
        event = dp_accounting.ComposedDpEvent([event, dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(also[0]), also[1])])
    # dp-accounting logs a warning per fractional RDP order it skips; the result is unaffected.
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)
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
    "CENTRAL_REFUSED",
    "CENTRAL_SENSITIVITY",
    "add_noise",
    "central_mean",
    "central_sensitivity",
    "central_statistics",
    "check_central",
    "poisson_participation",
    "segment_steps",
    "central_noise_for_mean",
    "clip_updates",
    "combined_noise_multiplier",
    "dp_event",
    "epsilon",
    "privatise_statistics",
    "update_norms",
]
