"""Arrival processes: the fast sampler against the exact one, rate shapes, token statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aro_jax.envs import traffic
from aro_jax.envs.traffic import SECONDS_PER_DAY, SECONDS_PER_WEEK, TrafficParams

NUM_DRAWS = 100_000
TICK_S = 30.0


@jax.jit
def _moments(key, mean_rate_rps, burst_cv):
    """Mean and variance of NUM_DRAWS ticks from the fast and the exact sampler."""
    p = TrafficParams(mean_rate_rps=mean_rate_rps, burst_cv=burst_cv, diurnal_peak_to_trough=1.0)
    k_fast, k_exact = jax.random.split(key)
    fast = jax.vmap(lambda k: traffic.sample_arrivals(k, 0.0, TICK_S, p))(jax.random.split(k_fast, NUM_DRAWS))
    exact = jax.vmap(lambda k: traffic.sample_arrivals_exact(k, 0.0, TICK_S, p))(jax.random.split(k_exact, NUM_DRAWS))
    return jnp.stack([fast.mean(), exact.mean(), fast.var(), exact.var()])


# Tolerances: the mean's standard error is ~cv/sqrt(1e5) <= 0.6%, so 1.5% on means. The
# sample variance's relative error is sqrt((kurtosis - 1) / n): ~2% at burst_cv = 1
# (log-normal kurtosis 41) but ~10% at burst_cv = 2 (kurtosis ~950), so 6% and 15%.
@pytest.mark.parametrize("mean_rate_rps", [0.5, 5.0, 50.0])
@pytest.mark.parametrize("burst_cv,var_rtol", [(0.0, 0.06), (0.3, 0.06), (1.0, 0.06), (2.0, 0.15)])
def test_fast_sampler_matches_exact_mean_and_variance(mean_rate_rps, burst_cv, var_rtol):
    fast_mean, exact_mean, fast_var, exact_var = np.asarray(_moments(jax.random.key(0), mean_rate_rps, burst_cv))
    lam = mean_rate_rps * TICK_S
    # Gamma-modulated Poisson: E = lam, Var = lam + (lam * cv)^2.
    theory_var = lam + (lam * burst_cv) ** 2
    np.testing.assert_allclose(fast_mean, exact_mean, rtol=0.015)
    np.testing.assert_allclose([fast_mean, exact_mean], lam, rtol=0.015)
    np.testing.assert_allclose(fast_var, exact_var, rtol=var_rtol)
    np.testing.assert_allclose([fast_var, exact_var], theory_var, rtol=var_rtol)


def test_fast_sampler_is_nonnegative_and_finite():
    p = TrafficParams(mean_rate_rps=0.01, burst_cv=3.5)
    draws = jax.vmap(lambda k: traffic.sample_arrivals(k, 0.0, TICK_S, p))(jax.random.split(jax.random.key(1), 10_000))
    assert np.isfinite(np.asarray(draws)).all() and (draws >= 0).all()


WEEK_GRID_S = jnp.arange(0.0, SECONDS_PER_WEEK, 60.0)


@pytest.mark.parametrize(
    "peak_to_trough,weekend_factor,tz_offset_h", [(2.0, 1.0, 0.0), (2.0, 0.8, -5.0), (10.0, 0.2, 9.0), (1.0, 0.5, 5.5)]
)
def test_daily_weekly_shape_averages_to_one_over_a_week(peak_to_trough, weekend_factor, tz_offset_h):
    p = TrafficParams(diurnal_peak_to_trough=peak_to_trough, weekend_factor=weekend_factor, tz_offset_h=tz_offset_h)
    shape = jax.vmap(lambda t: traffic.daily_weekly_shape(t, p))(WEEK_GRID_S)
    np.testing.assert_allclose(float(shape.mean()), 1.0, atol=1e-4)
    assert (shape > 0).all()
    # The daily swing is the configured peak-to-trough ratio on a weekday (a UTC
    # Wednesday is a weekday in every offset used here).
    per_day = int(SECONDS_PER_DAY // 60)
    weekday = shape[2 * per_day : 3 * per_day]
    np.testing.assert_allclose(float(weekday.max() / weekday.min()), peak_to_trough, rtol=1e-3)


@pytest.mark.parametrize("tz_offset_h", [-8.0, 1.0, 5.5, 9.0])
def test_time_zone_offset_shifts_the_peak(tz_offset_h):
    # A Wednesday, weekend factor 1, so the weekly step cannot move the peak.
    wednesday = 2 * SECONDS_PER_DAY + jnp.arange(0.0, SECONDS_PER_DAY, 60.0)
    base = TrafficParams(diurnal_peak_to_trough=3.0, weekend_factor=1.0)
    shifted = base.replace(tz_offset_h=tz_offset_h)
    peak_utc_h = lambda p: float(wednesday[jnp.argmax(jax.vmap(lambda t: traffic.daily_weekly_shape(t, p))(wednesday))] % SECONDS_PER_DAY) / 3600.0  # noqa: E731
    # Local = UTC + offset, so the same local-time peak comes `offset` hours earlier in UTC.
    shift_h = (peak_utc_h(base) - peak_utc_h(shifted)) % 24.0
    np.testing.assert_allclose(shift_h, tz_offset_h % 24.0, atol=1.0 / 60.0)
    # And exactly: the shifted region's rate at UTC t is the base region's at t + offset.
    t = wednesday[::37]
    np.testing.assert_allclose(
        jax.vmap(lambda s: traffic.daily_weekly_shape(s, shifted))(t),
        jax.vmap(lambda s: traffic.daily_weekly_shape(s + tz_offset_h * 3600.0, base))(t),
        rtol=1e-5,
    )


def test_flash_crowd_multiplies_rate_only_inside_its_window():
    start_s, duration_s, multiplier = 10 * 3600.0, 1800.0, 5.0
    base = TrafficParams(mean_rate_rps=4.0, diurnal_peak_to_trough=2.0)
    flash = base.replace(flash_start_s=start_s, flash_duration_s=duration_s, flash_multiplier=multiplier)
    t = jnp.concatenate([jnp.arange(0.0, SECONDS_PER_DAY, 30.0), jnp.array([start_s, start_s + duration_s - 1.0, start_s + duration_s])])
    ratio = np.asarray(jax.vmap(lambda s: traffic.expected_rate_rps(s, flash) / traffic.expected_rate_rps(s, base))(t))
    inside = np.asarray((t >= start_s) & (t < start_s + duration_s))
    np.testing.assert_allclose(ratio[inside], multiplier, rtol=1e-5)
    np.testing.assert_allclose(ratio[~inside], 1.0, rtol=1e-5)
    assert inside.sum() == duration_s / 30.0 + 2  # the grid's 60 ticks plus the two probes inside
    # A negative start means no flash crowd at all.
    off = flash.replace(flash_start_s=-1.0)
    np.testing.assert_allclose(jax.vmap(lambda s: traffic.expected_rate_rps(s, off))(t), jax.vmap(lambda s: traffic.expected_rate_rps(s, base))(t), rtol=1e-6)


@pytest.mark.parametrize(
    "log_params,cap",
    [
        ((6.63, 0.99, 5.02, 0.86), 4096.0),  # Azure 2023 conversation (default)
        ((7.00, 1.36, 2.79, 0.85), 4096.0),  # Azure 2023 code: ~17% of prompts beyond the window
        ((6.63, 0.99, 5.02, 0.86), 512.0),  # a short context window caps most prompts
    ],
)
def test_token_stats_match_monte_carlo_admitted_means(log_params, cap):
    """Prompts over the window are rejected, so the admitted prompts are the log-normal
    truncated at it (capping them instead would put a mass at the window); outputs stop
    at the window (clipped). The rejected share is the tail beyond it."""
    in_mu, in_sd, out_mu, out_sd = log_params
    p = TrafficParams(input_log_mean=in_mu, input_log_sd=in_sd, output_log_mean=out_mu, output_log_sd=out_sd, max_context_tokens=cap)
    stats = {k: float(v) for k, v in traffic.token_stats(p).items()}
    rng = np.random.default_rng(0)
    drawn = rng.lognormal(in_mu, in_sd, 1_000_000)
    tokens_in = drawn[drawn <= cap]
    tokens_out = np.minimum(rng.lognormal(out_mu, out_sd, 1_000_000), cap)
    assert float(traffic.rejected_share(0.0, p)) == pytest.approx(np.mean(drawn > cap), abs=2e-3)
    capped_mean = np.minimum(drawn, cap).mean()
    if np.mean(drawn > cap) > 0.01:  # truncation is not capping: the capped mean is visibly higher
        assert stats["input_mean"] < 0.97 * capped_mean
    # Monte-Carlo standard error of the mean is < 0.2% here; 1% tolerance.
    np.testing.assert_allclose(stats["input_mean"], tokens_in.mean(), rtol=0.01)
    np.testing.assert_allclose(stats["output_mean"], tokens_out.mean(), rtol=0.01)
    np.testing.assert_allclose(stats["input_p95"], np.quantile(tokens_in, 0.95), rtol=0.01)
    np.testing.assert_allclose(stats["output_p95"], np.quantile(tokens_out, 0.95), rtol=0.01)
