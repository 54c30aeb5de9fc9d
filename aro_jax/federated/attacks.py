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
  nan, inf   a failed node: every coordinate NaN, or +inf

mean_h and std_h are the per-coordinate mean and (population) standard deviation of the
honest rows.
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
        stale, nan, inf.
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


def alie_z_max(n: int, f: int) -> float:
    """The ALIE paper's z: the largest shift (in honest stds) that still lets the attackers
    win a majority, z = Phi^-1((n - s) / n) with s = floor(n / 2 + 1) - f supporters."""
    supporters = n // 2 + 1 - f
    return float(norm.ppf((n - supporters) / n))


__all__ = ["ATTACKS", "alie_z_max", "apply_attack"]
