"""Arrival processes: pure functions of (key, time, params).

The request rate of a region is a smooth daily/weekly shape (in the region's local time)
times bursts, or a replayed trace's own timeline; arrivals per tick are a
Gamma-modulated Poisson count (a replayed trace's counts as they are).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.scipy.special import erf

SECONDS_PER_DAY = 86_400.0
SECONDS_PER_WEEK = 7 * SECONDS_PER_DAY
# Day 0 of simulated time is a Monday 00:00 UTC; days 5 and 6 are the weekend.
_PEAK_HOUR_LOCAL = 14.0  # afternoon peak of interactive traffic (Azure 2024 week-long trace)


@struct.dataclass
class TrafficParams:
    """Everything that shapes one region's demand. All fields may be vmapped."""

    mean_rate_rps: float = 5.0  # weekly mean arrival rate, requests/s
    diurnal_peak_to_trough: float = 2.0  # conversation ~2x, code ~10x (Azure 2024 trace)
    weekend_factor: float = 1.0  # weekend level / weekday level (code ~0.2, Azure 2024)
    tz_offset_h: float = 0.0  # local time = UTC + offset
    # CV of the per-tick Gamma rate modulation (ServeGen: per-client CV median 1.2-1.3 at
    # request level; a 30 s tick averages much of that away, so the default is smaller).
    burst_cv: float = 0.3
    # Lag-1 autocorrelation of the log modulation between ticks (log-AR(1); 0: independent
    # draws each tick). The mixes carry values fitted to the Azure traces (envs/bursts.py).
    burst_ac1: float = 0.0
    # Log-normal token lengths fitted to the Azure 2023 conversation trace (shared data README).
    input_log_mean: float = 6.63
    input_log_sd: float = 0.99
    output_log_mean: float = 5.02
    output_log_sd: float = 0.86
    max_context_tokens: float = 4096.0  # Llama 2 context window (Touvron et al. 2023)
    flash_start_s: float = -1.0  # negative: no flash crowd
    flash_duration_s: float = 0.0
    flash_multiplier: float = 1.0
    # Native trace replay (replay_weight = 1): the trace's own timeline drives the node.
    # Per replay tick (replay_tick_s, from simulated time 0): requests arriving (all of
    # them, already times the trace scale), the share of them longer than the context
    # (rejected), and the log-length moments of the admitted ones. No synthetic shape or
    # bursts on top; past the end the node gets no traffic unless replay_loop = 1.
    # Built by envs.scenarios.replay_traffic; every node of a stack has the same length.
    replay_arrivals: jax.Array = struct.field(default_factory=lambda: jnp.zeros((1,)))
    replay_rejected_share: jax.Array = struct.field(default_factory=lambda: jnp.zeros((1,)))
    replay_input_log_mean: jax.Array = struct.field(default_factory=lambda: jnp.zeros((1,)))
    replay_input_log_sd: jax.Array = struct.field(default_factory=lambda: jnp.ones((1,)))
    replay_output_log_mean: jax.Array = struct.field(default_factory=lambda: jnp.zeros((1,)))
    replay_output_log_sd: jax.Array = struct.field(default_factory=lambda: jnp.ones((1,)))
    replay_weight: float = 0.0
    replay_loop: float = 0.0
    replay_tick_s: float = 30.0


def daily_weekly_shape(t_s: jax.Array, p: TrafficParams) -> jax.Array:
    """Multiplicative rate shape at UTC time `t_s` (seconds); averages to 1 over a week."""
    local_s = t_s + p.tz_offset_h * 3600.0
    # Remainders by floor: jnp.mod is a libm fmod call per element on CPU, ~20x a floor.
    day_index = jnp.floor(local_s / SECONDS_PER_DAY)
    hour = (local_s - day_index * SECONDS_PER_DAY) / 3600.0
    day = day_index - 7.0 * jnp.floor(day_index / 7.0)
    amp = (p.diurnal_peak_to_trough - 1.0) / (p.diurnal_peak_to_trough + 1.0)
    diurnal = 1.0 + amp * jnp.cos(2.0 * jnp.pi * (hour - _PEAK_HOUR_LOCAL) / 24.0)
    weekly = jnp.where(day >= 5, p.weekend_factor, 1.0)
    weekly_mean = (5.0 + 2.0 * p.weekend_factor) / 7.0
    return diurnal * weekly / weekly_mean


def peak_rate_rps(p: TrafficParams) -> jax.Array:
    """Highest expected rate of the daily/weekly shape (times the trace's highest burst)."""
    amp = (p.diurnal_peak_to_trough - 1.0) / (p.diurnal_peak_to_trough + 1.0)
    weekly_mean = (5.0 + 2.0 * p.weekend_factor) / 7.0
    shaped = p.mean_rate_rps * (1.0 + amp) * jnp.maximum(1.0, p.weekend_factor) / weekly_mean
    return jnp.where(p.replay_weight > 0.5, jnp.max(p.replay_arrivals) / p.replay_tick_s, shaped)


def _replay_index(t_s, p: TrafficParams):
    """(index into the replay arrays, whether the trace covers `t_s`)."""
    n = p.replay_arrivals.shape[0]
    i = jnp.floor(t_s / p.replay_tick_s)  # a whole number in float32 (exact below 2^24 ticks)
    covered = (i >= 0) & ((i < n) | (p.replay_loop > 0.5))
    return (i - n * jnp.floor(i / n)).astype(jnp.int32), covered  # i mod n, without an integer division per element


def expected_rate_rps(t_s: jax.Array, p: TrafficParams) -> jax.Array:
    """Mean arrival rate (requests/s) at time `t_s`, before bursts."""
    i, covered = _replay_index(t_s, p)
    replayed = jnp.where(covered, p.replay_arrivals[i], 0.0) / p.replay_tick_s
    rate = jnp.where(p.replay_weight > 0.5, replayed, p.mean_rate_rps * daily_weekly_shape(t_s, p))
    in_flash = (t_s >= p.flash_start_s) & (t_s < p.flash_start_s + p.flash_duration_s)
    in_flash = in_flash & (p.flash_start_s >= 0.0)
    return rate * jnp.where(in_flash, p.flash_multiplier, 1.0)


def sample_arrivals(key: jax.Array, t_s: jax.Array, tick_s: float, p: TrafficParams) -> jax.Array:
    """Requests arriving in [t_s, t_s + tick_s): a Gamma-modulated Poisson count (float).

    Sampled by moment matching, because gamma and Poisson draws cost 20x a normal draw
    on CPU (DESIGN "Speed"): the modulation is log-normal with the Gamma's mean 1 and CV,
    and the Poisson count is its normal approximation (mean = variance = lambda, lambda is
    in the tens to thousands per 30 s tick). Mean and variance equal the exact process's
    (tests/test_traffic.py checks both against `sample_arrivals_exact`).
    """
    sigma2 = jnp.log1p(p.burst_cv**2)
    z_mod, z_cnt = jax.random.normal(key, (2,))
    modulation = jnp.exp(jnp.sqrt(sigma2) * z_mod - 0.5 * sigma2)
    lam = expected_rate_rps(t_s, p) * tick_s * modulation
    return jnp.maximum(lam + jnp.sqrt(lam) * z_cnt, 0.0)


def sample_arrivals_ar(key: jax.Array, t_s: jax.Array, tick_s: float, p: TrafficParams, burst_z: jax.Array):
    """Like `sample_arrivals` with a log-AR(1) modulation: `burst_z` is the previous tick's
    standard-normal burst state; returns (arrivals, new state)."""
    e_burst, z_count = jax.random.normal(key, (2,))
    return arrivals_ar(e_burst, z_count, t_s, tick_s, p, burst_z)


def arrivals_ar(e_burst, z_count, t_s, tick_s: float, p: TrafficParams, burst_z):
    """`sample_arrivals_ar` from its standard-normal draws (the burst innovation and the
    count's noise). z' = phi z + sqrt(1 - phi^2) e is stationary N(0, 1), so each tick's
    modulation has the Gamma's mean 1 and CV."""
    sigma2 = jnp.log1p(p.burst_cv**2)
    phi = p.burst_ac1
    z = phi * burst_z + jnp.sqrt(1.0 - phi**2) * e_burst
    modulation = jnp.exp(jnp.sqrt(sigma2) * z - 0.5 * sigma2)
    rate = expected_rate_rps(t_s, p)
    lam = rate * tick_s * modulation
    sampled = jnp.maximum(lam + jnp.sqrt(lam) * z_count, 0.0)
    # A replayed trace's counts are the arrivals themselves (times any flash multiplier).
    return jnp.where(p.replay_weight > 0.5, rate * tick_s, sampled), z


def at_tick(t_s, p: TrafficParams) -> TrafficParams:
    """The traffic of the tick starting at `t_s`: under replay, that tick's token-length
    moments replace the node's fitted ones (token_stats and the fluid model read these)."""
    i, _ = _replay_index(t_s, p)
    on = p.replay_weight > 0.5
    pick = lambda per_tick, fitted: jnp.where(on, per_tick[i], fitted)  # noqa: E731
    return p.replace(
        input_log_mean=pick(p.replay_input_log_mean, p.input_log_mean),
        input_log_sd=pick(p.replay_input_log_sd, p.input_log_sd),
        output_log_mean=pick(p.replay_output_log_mean, p.output_log_mean),
        output_log_sd=pick(p.replay_output_log_sd, p.output_log_sd),
    )


def rejected_share(t_s, p: TrafficParams) -> jax.Array:
    """Share of the tick's requests whose prompt exceeds the model's context window: the
    server rejects them (vLLM returns HTTP 400 for a prompt over max_model_len). Under
    replay, the share counted in the trace's requests; otherwise the log-normal's tail."""
    i, _ = _replay_index(t_s, p)
    tail = 1.0 - _norm_cdf((jnp.log(p.max_context_tokens) - p.input_log_mean) / p.input_log_sd)
    return jnp.where(p.replay_weight > 0.5, p.replay_rejected_share[i], tail)


def sample_arrivals_exact(key: jax.Array, t_s: jax.Array, tick_s: float, p: TrafficParams) -> jax.Array:
    """Reference sampler: Gamma(shape 1/cv^2, mean 1) modulation, exact Poisson count."""
    k_mod, k_cnt = jax.random.split(key)
    shape = 1.0 / jnp.maximum(p.burst_cv**2, 1e-6)
    modulation = jax.random.gamma(k_mod, shape) / shape
    lam = expected_rate_rps(t_s, p) * tick_s * modulation
    return jax.random.poisson(k_cnt, lam).astype(jnp.float32)


def _norm_cdf(x: jax.Array) -> jax.Array:
    return 0.5 * (1.0 + erf(x / jnp.sqrt(2.0)))


def clipped_lognormal_mean(log_mean, log_sd, cap):
    """E[min(X, cap)] for X ~ LogNormal(log_mean, log_sd): outputs stop at the window."""
    log_cap = jnp.log(cap)
    below = jnp.exp(log_mean + 0.5 * log_sd**2) * _norm_cdf((log_cap - log_mean - log_sd**2) / log_sd)
    above = cap * (1.0 - _norm_cdf((log_cap - log_mean) / log_sd))
    return below + above


def truncated_lognormal_moment(log_mean, log_sd, cap, k=1):
    """E[X^k | X <= cap] for X ~ LogNormal(log_mean, log_sd): the prompts the server
    admits (longer ones are rejected, `rejected_share`)."""
    log_cap = jnp.log(cap)
    below = jnp.exp(k * log_mean + 0.5 * (k * log_sd) ** 2) * _norm_cdf((log_cap - log_mean - k * log_sd**2) / log_sd)
    return below / jnp.maximum(_norm_cdf((log_cap - log_mean) / log_sd), 1e-9)


def lognormal_quantile(log_mean, log_sd, z, cap):
    """Quantile at standard-normal score `z` (1.645 = p95), capped at the context window."""
    return jnp.minimum(jnp.exp(log_mean + z * log_sd), cap)


def truncated_lognormal_quantile(log_mean, log_sd, q, cap):
    """Quantile `q` of LogNormal(log_mean, log_sd) conditioned on X <= cap."""
    from jax.scipy.special import ndtri

    p = q * _norm_cdf((jnp.log(cap) - log_mean) / log_sd)
    return jnp.exp(log_mean + log_sd * ndtri(p))


def token_stats(p: TrafficParams) -> dict[str, jax.Array]:
    """Mean and p95 input/output tokens per admitted request (prompts within the context
    window; outputs stop at it)."""
    cap_in = p.max_context_tokens
    mean_in = truncated_lognormal_moment(p.input_log_mean, p.input_log_sd, cap_in)
    mean_out = clipped_lognormal_mean(p.output_log_mean, p.output_log_sd, p.max_context_tokens)
    return {
        "input_mean": mean_in,
        "output_mean": mean_out,
        "input_p95": truncated_lognormal_quantile(p.input_log_mean, p.input_log_sd, 0.95, cap_in),
        "output_p95": lognormal_quantile(p.output_log_mean, p.output_log_sd, 1.645, p.max_context_tokens),
    }
