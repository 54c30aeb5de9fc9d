"""Impact forecasting: an online harmonic-regression forecaster of the request rate.

log(rate) is regressed on daily and weekly harmonics of local time by recursive least
squares with forgetting, plus an exponentially smoothed residual that captures
departures from the usual shape (a flash crowd, a trace that runs hot). Because the
features are known functions of time, the forecast at any horizon is one dot product:
no history buffer, a few dozen floats of state, vmappable over clusters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from aro_jax.envs.traffic import SECONDS_PER_DAY, SECONDS_PER_WEEK

NUM_FEATURES = 7
_FORGETTING = 0.9997  # memory ~3,300 ticks (~28 h at 30 s): at least one full day
_RESIDUAL_SMOOTHING = 0.3
_RESIDUAL_PERSISTENCE_PER_TICK = 0.95  # a departure from the shape decays over ~20 ticks
_MIN_RATE_RPS = 1e-3


@struct.dataclass
class ForecastState:
    coef: jax.Array  # (NUM_FEATURES,) regression coefficients on log rate
    precision_inv: jax.Array  # (NUM_FEATURES, NUM_FEATURES) RLS inverse information matrix
    residual_log: jax.Array  # smoothed residual of log rate
    residual_var: jax.Array  # smoothed squared residual (log-normal bias correction)


# Feature k of local time t (s) is cos(2 pi (FREQUENCY_HZ[k] t + PHASE_TURNS[k])): bias, daily
# cos/sin, twice-daily cos/sin, weekly cos/sin (sin x = cos(x - pi/2)). One vectorised cos
# over the 7 features costs less under vmap than stacking separately computed sin/cos, and
# its argument reduced to [-pi, pi] first halves the cos's cost.
FREQUENCY_HZ = (0.0, 1 / SECONDS_PER_DAY, 1 / SECONDS_PER_DAY, 2 / SECONDS_PER_DAY, 2 / SECONDS_PER_DAY,
                1 / SECONDS_PER_WEEK, 1 / SECONDS_PER_WEEK)
PHASE_TURNS = (0.0, 0.0, -0.25, 0.0, -0.25, 0.0, -0.25)
COS_DAY, SIN_DAY, COS_WEEK, SIN_WEEK = 1, 2, 5, 6  # the features that are the clock's daily and weekly angle


def time_features(t_local_s: jax.Array) -> jax.Array:
    """(..., NUM_FEATURES) harmonic features of local time (seconds)."""
    turns = jnp.asarray(t_local_s, jnp.float32)[..., None] * jnp.asarray(FREQUENCY_HZ, jnp.float32)
    turns = turns + jnp.asarray(PHASE_TURNS, jnp.float32)
    return jnp.cos(2.0 * jnp.pi * (turns - jnp.round(turns)))


def init(prior_rate_rps: jax.Array) -> ForecastState:
    """Start from the operator's known mean rate; other coefficients learned online."""
    coef = jnp.zeros(NUM_FEATURES).at[0].set(jnp.log(jnp.maximum(prior_rate_rps, _MIN_RATE_RPS)))
    return ForecastState(
        coef=coef,
        precision_inv=jnp.eye(NUM_FEATURES),
        residual_log=jnp.zeros(()),
        residual_var=jnp.zeros(()),
    )


def update(fs: ForecastState, t_local_s: jax.Array, observed_rate_rps: jax.Array) -> ForecastState:
    """One RLS step on the rate observed over the tick that started at `t_local_s`."""
    y = jnp.log(jnp.maximum(observed_rate_rps, _MIN_RATE_RPS))
    phi = time_features(t_local_s)
    p_phi = fs.precision_inv @ phi
    gain = p_phi / (_FORGETTING + phi @ p_phi)
    err_prior = y - fs.coef @ phi
    coef = fs.coef + gain * err_prior
    precision_inv = (fs.precision_inv - jnp.outer(gain, p_phi)) / _FORGETTING
    err_post = y - coef @ phi
    a = _RESIDUAL_SMOOTHING
    return ForecastState(
        coef=coef,
        precision_inv=precision_inv,
        residual_log=(1 - a) * fs.residual_log + a * err_post,
        residual_var=(1 - a) * fs.residual_var + a * err_post**2,
    )


def predict_rate_rps(fs: ForecastState, t_local_s: jax.Array, horizon_s: jax.Array, tick_s: float) -> jax.Array:
    """Forecast mean request rate (requests/s) at `t_local_s + horizon_s`."""
    return predict_from_features(fs, time_features(t_local_s), horizon_s, tick_s)


# Each feature's partner in its (cos, sin) pair, and the sign of the partner's term when the
# pair turns by an angle a: cos(x + a) = cos x cos a - sin x sin a, sin(x + a) = sin x cos a + cos x sin a.
_PARTNER = (0, 2, 1, 4, 3, 6, 5)
_PARTNER_SIGN = (0.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0)


def _partners(x):
    return jnp.concatenate([x[..., k:k + 1] for k in _PARTNER], axis=-1)  # slices: no gather


def predict_from_features(fs: ForecastState, phi: jax.Array, horizon_s: jax.Array, tick_s: float) -> jax.Array:
    """`predict_rate_rps` from the features of the current local time (which the
    observation computes anyway). The features at t + horizon are those at t with each
    (cos, sin) pair turned by its angle over the horizon, R phi; the forecast's coef . R phi
    is turned into (R^T coef) . phi, so the turn applies to the coefficients (state) and no
    trigonometry or feature shuffle runs per env."""
    angle = 2.0 * jnp.pi * horizon_s * jnp.asarray(FREQUENCY_HZ, jnp.float32)  # a constant of the node
    turned = fs.coef * jnp.cos(angle) - _partners(fs.coef) * (jnp.asarray(_PARTNER_SIGN, jnp.float32) * jnp.sin(angle))
    log_rate = turned @ phi + fs.residual_log * _RESIDUAL_PERSISTENCE_PER_TICK ** (horizon_s / tick_s)
    return jnp.exp(log_rate + 0.5 * fs.residual_var)
