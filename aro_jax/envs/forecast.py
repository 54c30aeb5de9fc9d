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


def time_features(t_local_s: jax.Array) -> jax.Array:
    """Harmonic features of local time: bias, 2 daily harmonics, 1 weekly."""
    d = 2.0 * jnp.pi * t_local_s / SECONDS_PER_DAY
    w = 2.0 * jnp.pi * t_local_s / SECONDS_PER_WEEK
    cos_d, sin_d = jnp.cos(d), jnp.sin(d)
    # Second harmonic by the double-angle identities: two fewer transcendental calls.
    return jnp.stack([jnp.ones_like(d), cos_d, sin_d, 2.0 * cos_d**2 - 1.0, 2.0 * sin_d * cos_d, jnp.cos(w), jnp.sin(w)])


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
    ticks_ahead = horizon_s / tick_s
    log_rate = fs.coef @ time_features(t_local_s + horizon_s)
    log_rate = log_rate + fs.residual_log * _RESIDUAL_PERSISTENCE_PER_TICK**ticks_ahead
    return jnp.exp(log_rate + 0.5 * fs.residual_var)


def predict_rate_rps_from_trig(fs: ForecastState, cos_d, sin_d, cos_w, sin_w, horizon_s, tick_s: float) -> jax.Array:
    """`predict_rate_rps` from the daily and weekly cos/sin of the current local time (which
    the observation computes anyway): the features at t + horizon by angle addition, no
    further transcendental calls."""
    a = 2.0 * jnp.pi * horizon_s / SECONDS_PER_DAY
    b = 2.0 * jnp.pi * horizon_s / SECONDS_PER_WEEK
    ca, sa, cb, sb = jnp.cos(a), jnp.sin(a), jnp.cos(b), jnp.sin(b)  # constants of the node
    cd, sd = cos_d * ca - sin_d * sa, sin_d * ca + cos_d * sa
    cw, sw = cos_w * cb - sin_w * sb, sin_w * cb + cos_w * sb
    phi = jnp.stack([jnp.ones_like(cd), cd, sd, 2.0 * cd**2 - 1.0, 2.0 * sd * cd, cw, sw])
    log_rate = fs.coef @ phi + fs.residual_log * _RESIDUAL_PERSISTENCE_PER_TICK ** (horizon_s / tick_s)
    return jnp.exp(log_rate + 0.5 * fs.residual_var)
