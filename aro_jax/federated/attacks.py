"""Byzantine node models for testing the robust aggregators.

`apply_attack(name, updates, byzantine_mask, key, strength)` takes the honest stacked
updates (n_nodes, n_params), the nodes that misbehave this round, and returns the updates
the server receives: Byzantine rows replaced, honest rows untouched. Omniscient attackers
(ALIE, IPM, mimic) see every honest update of the round, the strongest standard threat
model. All functions are pure and jit-able with `name` static.

  none       the honest update
  sign_flip  -strength * u_i
  scaled     strength * u_i (a boosted update; strength > 1)
  gaussian   N(0, strength^2) per coordinate
  alie       mean_h - strength * std_h per coordinate ("A little is enough", Baruch et al.
             2019); `alie_z_max(n, f)` gives the paper's z
  ipm        -strength * mean_h (inner-product manipulation, Xie et al. 2020)
  mimic      a copy of one honest node's update, the same for all Byzantine nodes, chosen
             at random with `key` (Karimireddy et al. 2022)
  stale      the node's own update from the previous round (`previous_updates`)
  nan, inf   a failed node: every coordinate NaN, or +inf (its statistics too)
  huge       a huge finite update: every coordinate strength * 1e30 against the sign of
             the honest mean (finite in float32 up to strength ~3e8); at 1e30 the squared
             distance to any other row overflows float32, which once made Krum's tie-break
             return row 0
  normaliser_poisoning
             the update is honest; the node lies about its observation statistics
             instead: it reports the honest pooled mean shifted by strength pooled
             standard deviations, and the pooled variance times strength^2
             (`apply_statistics_attack`). Under a plain merge of the nodes' statistics one
             such node rescales every node's observations.

mean_h and std_h are the per-coordinate mean and (population) standard deviation of the
honest rows.

Each node also sends the mean and variance of the observations it saw in the round (the
shared normaliser's input). `apply_statistics_attack` replaces the Byzantine nodes' with
what the attack sends: a lie for normaliser_poisoning, NaN or inf for nan and inf, the
honest statistics for every other attack.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

Array = jax.Array


def _honest_moments(updates: Array, byzantine_mask: Array) -> tuple[Array, Array]:
    honest = ~byzantine_mask[:, None]
    count = jnp.maximum(jnp.sum(~byzantine_mask), 1).astype(updates.dtype)
    mean = jnp.sum(jnp.where(honest, updates, 0.0), axis=0) / count
    var = jnp.sum(jnp.where(honest, jnp.square(updates - mean), 0.0), axis=0) / count
    return mean, jnp.sqrt(var)


def _none(updates, byzantine_mask, key, strength, previous_updates):
    return updates


def _sign_flip(updates, byzantine_mask, key, strength, previous_updates):
    return -strength * updates


def _scaled(updates, byzantine_mask, key, strength, previous_updates):
    return strength * updates


def _gaussian(updates, byzantine_mask, key, strength, previous_updates):
    return strength * jax.random.normal(key, updates.shape, updates.dtype)


def _alie(updates, byzantine_mask, key, strength, previous_updates):
    mean, std = _honest_moments(updates, byzantine_mask)
    return jnp.broadcast_to(mean - strength * std, updates.shape)


def _ipm(updates, byzantine_mask, key, strength, previous_updates):
    mean, _ = _honest_moments(updates, byzantine_mask)
    return jnp.broadcast_to(-strength * mean, updates.shape)


def _mimic(updates, byzantine_mask, key, strength, previous_updates):
    # Uniform over honest nodes: Gumbel-max over logits that are -inf for Byzantine rows.
    logits = jnp.where(byzantine_mask, -jnp.inf, 0.0)
    target = jax.random.categorical(key, logits)
    return jnp.broadcast_to(updates[target], updates.shape)


def _stale(updates, byzantine_mask, key, strength, previous_updates):
    if previous_updates is None:
        raise ValueError("stale attack needs previous_updates (the previous round's updates)")
    return jnp.asarray(previous_updates, updates.dtype)


HUGE = 1e30


def _huge(updates, byzantine_mask, key, strength, previous_updates):
    mean, _ = _honest_moments(updates, byzantine_mask)
    direction = jnp.where(mean > 0, -1.0, 1.0).astype(updates.dtype)
    return jnp.broadcast_to(direction * (strength * HUGE), updates.shape)


def _nan(updates, byzantine_mask, key, strength, previous_updates):
    return jnp.full_like(updates, jnp.nan)


def _inf(updates, byzantine_mask, key, strength, previous_updates):
    return jnp.full_like(updates, jnp.inf)


ATTACKS: dict[str, Callable[..., Array]] = {
    "none": _none,
    "sign_flip": _sign_flip,
    "scaled": _scaled,
    "gaussian": _gaussian,
    "alie": _alie,
    "ipm": _ipm,
    "mimic": _mimic,
    "stale": _stale,
    "nan": _nan,
    "inf": _inf,
    "huge": _huge,
    "normaliser_poisoning": _none,
}


def apply_attack(
    name: str,
    updates: Array,
    byzantine_mask: Array,
    key: Array,
    strength: float | Array = 1.0,
    previous_updates: Array | None = None,
) -> Array:
    """Replace the Byzantine rows of `updates` by attack `name`.

    Args:
      name: a key of `ATTACKS`.
      updates: (n_nodes, n_params) honest updates of this round.
      byzantine_mask: (n_nodes,) bool, True for the nodes that attack.
      key: PRNG key (gaussian, mimic).
      strength: the attack's scale (see the module docstring); ignored by none, mimic,
        stale, nan, inf and (for the update) normaliser_poisoning.
      previous_updates: (n_nodes, n_params) updates of the previous round, for "stale".

    Returns the updates the server receives, (n_nodes, n_params); honest rows unchanged.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; valid names: {sorted(ATTACKS)}")
    updates = jnp.asarray(updates)
    byzantine_mask = jnp.asarray(byzantine_mask, bool)
    if byzantine_mask.shape != updates.shape[:1]:
        raise ValueError(f"byzantine_mask must have shape ({updates.shape[0]},), got {byzantine_mask.shape}")
    strength = jnp.asarray(strength, updates.dtype)
    attacked = ATTACKS[name](updates, byzantine_mask, key, strength, previous_updates)
    return jnp.where(byzantine_mask[:, None], attacked, updates)


def apply_statistics_attack(
    name: str, means: Array, variances: Array, byzantine_mask: Array, strength: float | Array = 1.0
) -> tuple[Array, Array]:
    """Replace the Byzantine nodes' observation statistics by what attack `name` sends.

    means, variances: (n_nodes, obs_dim), each node's statistics of its round's
    observations. Returns (means, variances) as the server receives them; honest rows
    unchanged. normaliser_poisoning reports m_h + strength * s_h and strength^2 * s_h^2,
    where m_h and s_h^2 are the pooled mean and variance of the honest nodes (equal
    counts: the mean of their means, and the mean of their variances plus the variance of
    their means); nan and inf send non-finite statistics; every other attack leaves the
    statistics honest.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; valid names: {sorted(ATTACKS)}")
    means, variances = jnp.asarray(means), jnp.asarray(variances)
    mask = jnp.asarray(byzantine_mask, bool)
    if name == "normaliser_poisoning":
        strength = jnp.asarray(strength, means.dtype)
        pooled_mean, spread = _honest_moments(means, mask)
        within, _ = _honest_moments(variances, mask)
        pooled_var = within + jnp.square(spread)
        lie_mean = jnp.broadcast_to(pooled_mean + strength * jnp.sqrt(pooled_var), means.shape)
        lie_var = jnp.broadcast_to(jnp.square(strength) * pooled_var, variances.shape)
    elif name in ("nan", "inf"):
        bad = jnp.nan if name == "nan" else jnp.inf
        lie_mean, lie_var = jnp.full_like(means, bad), jnp.full_like(variances, bad)
    else:
        return means, variances
    return jnp.where(mask[:, None], lie_mean, means), jnp.where(mask[:, None], lie_var, variances)


def alie_z_max(n: int, f: int) -> float:
    """The ALIE paper's z: the largest shift (in honest stds) that still lets the attackers
    win a majority, z = Phi^-1((n - s) / n) with s = floor(n / 2 + 1) - f supporters."""
    supporters = n // 2 + 1 - f
    return float(norm.ppf((n - supporters) / n))


__all__ = ["ATTACKS", "HUGE", "alie_z_max", "apply_attack", "apply_statistics_attack"]
