"""The simulator's impact forecaster in numpy, for the deployment agent.

This mirrors `aro_jax/envs/forecast.py` (online harmonic regression of log rate on daily
and weekly harmonics of local time, recursive least squares with forgetting, plus a
smoothed residual) so the agent computes `forecast_rate_rps` exactly as the policy saw
it in training. Arithmetic is float32, as in the simulator. tests/test_control_loop.py
checks it against the JAX forecaster on the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SECONDS_PER_DAY = 86_400.0
SECONDS_PER_WEEK = 7 * SECONDS_PER_DAY
NUM_FEATURES = 7
# The constants of aro_jax/envs/forecast.py (same names, same values).
_FORGETTING = np.float32(0.9997)
_RESIDUAL_SMOOTHING = np.float32(0.3)
_RESIDUAL_PERSISTENCE_PER_TICK = np.float32(0.95)
_MIN_RATE_RPS = np.float32(1e-3)
_F32 = np.float32


# Feature k is cos(2 pi (FREQUENCY_HZ[k] t + PHASE_TURNS[k])), its argument reduced to
# [-pi, pi], as in the simulator.
FREQUENCY_HZ = np.array([0.0, 1 / SECONDS_PER_DAY, 1 / SECONDS_PER_DAY, 2 / SECONDS_PER_DAY, 2 / SECONDS_PER_DAY,
                         1 / SECONDS_PER_WEEK, 1 / SECONDS_PER_WEEK], np.float32)
PHASE_TURNS = np.array([0.0, 0.0, -0.25, 0.0, -0.25, 0.0, -0.25], np.float32)


def time_features(t_local_s: float) -> np.ndarray:
    """(7,) float32: bias, two daily harmonics, one weekly, of local time in seconds."""
    turns = _F32(t_local_s) * FREQUENCY_HZ + PHASE_TURNS
    return np.cos(_F32(2.0 * np.pi) * (turns - np.round(turns))).astype(np.float32)


@dataclass
class Forecaster:
    """Online request-rate forecaster; `update` once per tick, `predict_rate_rps` any time."""

    prior_rate_rps: float
    coef: np.ndarray = field(init=False)
    precision_inv: np.ndarray = field(init=False)
    residual_log: np.float32 = field(init=False)
    residual_var: np.float32 = field(init=False)

    def __post_init__(self):
        self.coef = np.zeros(NUM_FEATURES, np.float32)
        self.coef[0] = np.log(max(_F32(self.prior_rate_rps), _MIN_RATE_RPS))
        self.precision_inv = np.eye(NUM_FEATURES, dtype=np.float32)
        self.residual_log = _F32(0.0)
        self.residual_var = _F32(0.0)

    def update(self, t_local_s: float, observed_rate_rps: float) -> None:
        """One RLS step on the mean rate (requests/s) observed over the tick that started at
        local time `t_local_s` (seconds)."""
        y = np.log(max(_F32(observed_rate_rps), _MIN_RATE_RPS))
        phi = time_features(t_local_s)
        p_phi = self.precision_inv @ phi
        gain = p_phi / (_FORGETTING + phi @ p_phi)
        err_prior = y - self.coef @ phi
        self.coef = (self.coef + gain * err_prior).astype(np.float32)
        self.precision_inv = ((self.precision_inv - np.outer(gain, p_phi)) / _FORGETTING).astype(np.float32)
        err_post = y - self.coef @ phi
        a = _RESIDUAL_SMOOTHING
        self.residual_log = _F32((1 - a) * self.residual_log + a * err_post)
        self.residual_var = _F32((1 - a) * self.residual_var + a * err_post**2)

    def predict_rate_rps(self, t_local_s: float, horizon_s: float, tick_s: float) -> float:
        """Forecast mean request rate (requests/s) at local time `t_local_s + horizon_s`."""
        ticks_ahead = _F32(horizon_s) / _F32(tick_s)
        log_rate = self.coef @ time_features(_F32(t_local_s) + _F32(horizon_s))
        log_rate = log_rate + self.residual_log * _RESIDUAL_PERSISTENCE_PER_TICK**ticks_ahead
        return float(np.exp(_F32(log_rate + _F32(0.5) * self.residual_var)))
