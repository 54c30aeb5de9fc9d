"""Correlated bursts: a log-AR(1) rate modulation per tick, fitted to a trace's counts.

The arrival count of tick t is Poisson(lambda_t * m_t), m_t = exp(sigma z_t - sigma^2/2),
z_t = phi z_{t-1} + sqrt(1 - phi^2) e_t (stationary N(0, 1)). For a mean count lam per
tick, the counts have Var = lam + lam^2 (exp(sigma^2) - 1) and lag-k autocovariance
lam^2 (exp(sigma^2 phi^k) - 1), so the count CV and lag-1 autocorrelation of a trace fix
(sigma, phi). Pure numpy (fits run outside the env).
"""

from __future__ import annotations

import numpy as np


def count_stats(arrival_s: np.ndarray, tick_s: float) -> dict[str, float]:
    """Mean, CV and lag-1 autocorrelation of per-tick counts of a trace's arrivals."""
    t = np.asarray(arrival_s, float) - float(np.min(arrival_s))
    n_ticks = int(np.floor(t.max() / tick_s))
    if n_ticks < 3:
        raise ValueError(f"need at least 3 whole ticks of {tick_s:g} s, the trace spans {t.max():.0f} s")
    counts = np.bincount((t // tick_s).astype(int), minlength=n_ticks + 1)[:n_ticks].astype(float)
    c = counts - counts.mean()
    ac1 = float(np.sum(c[1:] * c[:-1]) / np.sum(c * c))
    return {"mean": float(counts.mean()), "cv": float(counts.std() / counts.mean()), "ac1": ac1, "ticks": n_ticks}


def fit_log_ar1(mean_count: float, cv: float, ac1: float) -> tuple[float, float]:
    """(burst_cv, phi): the modulation's CV (exp(sigma^2) - 1 = burst_cv^2) and the AR(1)
    coefficient of its log that reproduce a count CV and lag-1 autocorrelation."""
    var = (cv * mean_count) ** 2
    mod_var = max(var - mean_count, 1e-9) / mean_count**2  # Var(m) = exp(sigma^2) - 1
    sigma2 = np.log1p(mod_var)
    cov1 = ac1 * var / mean_count**2
    phi = np.log1p(max(cov1, 0.0)) / sigma2 if cov1 > 0 else 0.0
    return float(np.sqrt(mod_var)), float(np.clip(phi, 0.0, 0.999))


def model_ac1(mean_count: float, burst_cv: float, phi: float) -> float:
    """Lag-1 autocorrelation of the counts under the model."""
    sigma2 = np.log1p(burst_cv**2)
    var = mean_count + mean_count**2 * burst_cv**2
    return float(mean_count**2 * (np.exp(sigma2 * phi) - 1.0) / var)


def fit_log_ar1_joint(mean_count: float, cv: float, ac1: float, cv_agg: float, agg_ticks: int) -> tuple[float, float]:
    """Like `fit_log_ar1` (the count CV is matched exactly), with phi the closest to the
    lag-1 autocorrelation among those that keep the CV of `agg_ticks`-tick sums within
    `AGG_TOLERANCE` of `cv_agg` (one AR(1) cannot always match both; if none does, the
    one nearest `cv_agg`)."""
    burst_cv, _ = fit_log_ar1(mean_count, cv, ac1)
    grid = np.linspace(0.0, 0.99, 991)
    agg_err = np.array([abs(aggregated_cv(mean_count, burst_cv, f, agg_ticks) / cv_agg - 1.0) for f in grid])
    ac_err = np.array([abs(model_ac1(mean_count, burst_cv, f) / ac1 - 1.0) for f in grid])
    ok = agg_err <= AGG_TOLERANCE
    best = int(np.argmin(np.where(ok, ac_err, np.inf))) if ok.any() else int(np.argmin(agg_err))
    return burst_cv, float(grid[best])


AGG_TOLERANCE = 0.15  # inside the 20 % aim, with room for sampling error


def aggregated_cv(mean_count: float, burst_cv: float, phi: float, ticks: int) -> float:
    """CV of the sum of `ticks` consecutive counts (e.g. 10 x 30 s = 5 min) under the model."""
    sigma2 = np.log1p(burst_cv**2)
    k = np.arange(1, ticks)
    cov = mean_count**2 * (np.exp(sigma2 * phi**k) - 1.0)
    var = ticks * (mean_count + mean_count**2 * (np.exp(sigma2) - 1.0)) + 2.0 * np.sum((ticks - k) * cov)
    return float(np.sqrt(var) / (ticks * mean_count))


def simulate_counts(rng: np.random.Generator, mean_count: float, burst_cv: float, phi: float, n: int) -> np.ndarray:
    """Counts of n ticks of the log-AR(1)-modulated Poisson process (for checks)."""
    sigma = np.sqrt(np.log1p(burst_cv**2))
    z = np.empty(n)
    z[0] = rng.standard_normal()
    e = rng.standard_normal(n)
    for i in range(1, n):
        z[i] = phi * z[i - 1] + np.sqrt(1.0 - phi**2) * e[i]
    return rng.poisson(mean_count * np.exp(sigma * z - 0.5 * sigma**2)).astype(float)
