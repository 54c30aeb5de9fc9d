"""The impact forecaster against naive last-value forecasting on held-out diurnal traffic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aro_jax.envs import forecast, traffic
from aro_jax.envs.params import EnvParams
from aro_jax.envs.traffic import SECONDS_PER_DAY, TrafficParams

TICK_S = 30.0
TICKS_PER_DAY = int(SECONDS_PER_DAY / TICK_S)
NUM_DAYS = 3
HORIZON_S = EnvParams().forecast_horizon_s  # the env's horizon: covers a cold start
HORIZON_TICKS = int(HORIZON_S / TICK_S)


def diurnal_traffic(mean_rate_rps=5.0, tz_offset_h=0.0):
    return TrafficParams(mean_rate_rps=mean_rate_rps, diurnal_peak_to_trough=10.0, burst_cv=0.3, tz_offset_h=tz_offset_h)


@jax.jit
def forecast_errors(key, p: TrafficParams):
    """Simulate NUM_DAYS of ticks, run the forecaster online as the env does, and score the
    last day: absolute errors of the forecaster and of the last observed rate, at HORIZON_S.

    As in the env, after observing the tick that started at t_k the forecaster predicts the
    rate at t_{k+1} + horizon, i.e. of tick k + 1 + HORIZON_TICKS."""
    clock_s = jnp.arange(NUM_DAYS * TICKS_PER_DAY) * TICK_S
    arrivals = jax.vmap(lambda k, t: traffic.sample_arrivals(k, t, TICK_S, p))(jax.random.split(key, clock_s.shape[0]), clock_s)
    observed_rps = arrivals / TICK_S
    expected_rps = jax.vmap(lambda t: traffic.expected_rate_rps(t, p))(clock_s)
    local_s = clock_s + p.tz_offset_h * 3600.0

    def tick(state, inputs):
        t_local, rate = inputs
        state = forecast.update(state, t_local, rate)
        predicted = forecast.predict_rate_rps(state, t_local + TICK_S, HORIZON_S, TICK_S)
        return state, predicted

    _, predicted = jax.lax.scan(tick, forecast.init(p.mean_rate_rps), (local_s, observed_rps))
    lead = 1 + HORIZON_TICKS
    scored = slice((NUM_DAYS - 1) * TICKS_PER_DAY - lead, NUM_DAYS * TICKS_PER_DAY - lead)  # targets on the last day
    target_observed = observed_rps[lead:][scored]
    target_expected = expected_rps[lead:][scored]
    model, naive = predicted[scored], observed_rps[scored]
    return {
        "model_vs_observed": jnp.abs(model - target_observed).mean(),
        "naive_vs_observed": jnp.abs(naive - target_observed).mean(),
        "model_vs_expected": jnp.abs(model - target_expected).mean(),
        "naive_vs_expected": jnp.abs(naive - target_expected).mean(),
    }


def test_forecaster_beats_naive_last_value_on_held_out_day():
    errors = {k: float(v) for k, v in forecast_errors(jax.random.key(0), diurnal_traffic()).items()}
    print(
        f"\nMAE at {HORIZON_S:.0f} s on the held-out day (rate 5 req/s, 10x diurnal, burst CV 0.3): "
        f"forecaster {errors['model_vs_observed']:.3f} req/s vs naive {errors['naive_vs_observed']:.3f} req/s "
        f"(against the noise-free rate: {errors['model_vs_expected']:.3f} vs {errors['naive_vs_expected']:.3f})"
    )
    assert errors["model_vs_observed"] < errors["naive_vs_observed"]
    assert errors["model_vs_expected"] < errors["naive_vs_expected"]


def test_forecaster_vmaps_over_nodes():
    nodes = jax.tree.map(lambda *x: jnp.stack([jnp.asarray(v) for v in x]), diurnal_traffic(5.0, 0.0), diurnal_traffic(40.0, 9.0))
    keys = jax.random.split(jax.random.key(1), 2)
    errors = jax.vmap(forecast_errors)(keys, nodes)
    assert errors["model_vs_observed"].shape == (2,)
    assert np.isfinite(np.asarray(errors["model_vs_observed"])).all()
    assert (errors["model_vs_observed"] < errors["naive_vs_observed"]).all()
    single = forecast_errors(keys[1], diurnal_traffic(40.0, 9.0))
    np.testing.assert_allclose(errors["model_vs_observed"][1], single["model_vs_observed"], rtol=1e-4)
    print(f"\nper-node MAE forecaster {np.asarray(errors['model_vs_observed'])} vs naive {np.asarray(errors['naive_vs_observed'])}")


def test_forecast_ahead_turns_the_coefficients_exactly():
    """The forecast at t + horizon from the features at t (coefficients turned by the
    horizon's angles) equals the regression evaluated at t + horizon itself."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        state = forecast.init(5.0).replace(coef=jnp.asarray(rng.normal(0, 0.5, forecast.NUM_FEATURES), jnp.float32),
                                            residual_log=jnp.float32(0.1), residual_var=jnp.float32(0.02))
        t, horizon = float(rng.uniform(0, 14 * 86_400)), float(rng.uniform(30, 7200))
        direct = np.exp(float(state.coef @ forecast.time_features(t + horizon)) + 0.1 * 0.95 ** (horizon / 30.0) + 0.01)
        assert float(forecast.predict_rate_rps(state, t, horizon, 30.0)) == pytest.approx(direct, rel=1e-4)
