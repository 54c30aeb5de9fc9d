"""Evaluation metrics that are pure arithmetic: HyperScore."""

import math

import numpy as np
import pytest

from aro_jax.training.evaluation import hyperscore


def test_hyperscore_by_hand():
    # V = 1: sigmoid(-ln 2) = 1/3, so 100 (1 + 1/9).
    assert hyperscore(1.0) == pytest.approx(100 * (1 + 1 / 9))
    z = 5 * math.log(0.95) - math.log(2)
    assert hyperscore(0.95) == pytest.approx(100 * (1 + (1 / (1 + math.exp(-z))) ** 2))
    assert hyperscore(0.95) == pytest.approx(107.78, abs=0.01)


def test_hyperscore_is_increasing_and_bounded():
    v = np.linspace(0.2, 1.0, 50)
    h = hyperscore(v)
    assert np.all(np.diff(h) > 0) and np.all(h > 100) and h[-1] <= 100 * (1 + 1 / 9) + 1e-9


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_hyperscore_rejects_v_outside_unit_interval(bad):
    with pytest.raises(ValueError, match="V in"):
        hyperscore(bad)


# --------------------------------------------------------------------------------------
# Headline metrics that cannot be gamed by dropping; pooled percentiles
# --------------------------------------------------------------------------------------

from aro_jax.envs import scenarios  # noqa: E402
from aro_jax.training import evaluation as ev  # noqa: E402


def _ticks(n, **values):
    """Per-tick metrics of one node: every tick alike."""
    base = dict(arrivals=100.0, served=100.0, forwarded=0.0, dropped=0.0, rejected=0.0, tokens_per_s=10.0,
                ttft_mean_s=0.5, ttft_p95_s=1.0, e2e_mean_s=10.0, e2e_p95_s=20.0, fwd_ttft_s=0.0, fwd_e2e_s=0.0,
                slo_attainment=0.9, gpu_util=0.5, cpu_util=0.5, memory_util=0.5, cost_usd=1.0, quality=1.0, reward=0.0,
                replicas_billed=2.0, served_for_peers=0.0, egress_usd=0.0, peer_paid_usd=0.0, peer_credit_usd=0.0)
    base.update(values)
    return {k: np.full(n, v) for k, v in base.items()}


def test_dropping_does_not_look_better_on_the_headline_metrics():
    params = scenarios.default_node_params()
    serves_all = ev.kpis(_ticks(10), 30.0, params)
    # Half the arrivals dropped: the served half is faster and all within SLO.
    drops_half = ev.kpis(_ticks(10, served=50.0, dropped=50.0, e2e_mean_s=3.0, e2e_p95_s=6.0, slo_attainment=0.5), 30.0, params)
    assert drops_half["e2e_mean_ms"] < serves_all["e2e_mean_ms"]  # served-only latency flatters dropping
    assert drops_half["goodput_rps"] < serves_all["goodput_rps"]
    assert drops_half["goodput_per_usd"] < serves_all["goodput_per_usd"]
    assert drops_half["slo_attainment_pct"] < serves_all["slo_attainment_pct"]
    assert drops_half["e2e_mean_all_ms"] > serves_all["e2e_mean_all_ms"]
    assert drops_half["e2e_p95_all_ms"] > serves_all["e2e_p95_all_ms"]
    # The stated rule: a drop counts at the queue timeout.
    expected = 0.5 * 3.0 + 0.5 * float(params.queue_timeout_s)
    assert drops_half["e2e_mean_all_ms"] == pytest.approx(1e3 * expected, rel=1e-6)
    # Goodput: 100 x 0.9 requests within SLO per 30 s tick.
    assert serves_all["goodput_rps"] == pytest.approx(90.0 / 30.0, rel=1e-6)


def test_rejects_count_as_misses_and_at_the_slo_budget():
    params = scenarios.default_node_params()
    k = ev.kpis(_ticks(4, served=80.0, rejected=20.0, slo_attainment=0.8), 30.0, params)
    assert k["rejected_pct"] == pytest.approx(20.0)
    assert k["slo_attainment_pct"] == pytest.approx(80.0)
    budget = float(ev.e2e_budget(params))
    assert k["e2e_mean_all_ms"] == pytest.approx(1e3 * (0.8 * 10.0 + 0.2 * budget), rel=1e-6)


def test_pooled_percentiles_match_a_brute_force_quantile_over_requests():
    rng = np.random.default_rng(0)
    ticks = 200
    mean = rng.lognormal(0.0, 1.0, ticks)  # per-tick mean latency (s): loads vary over the day
    p95 = mean * rng.uniform(1.5, 3.5, ticks)
    served = rng.integers(50, 400, ticks).astype(float)
    forwarded = rng.integers(0, 40, ticks).astype(float)
    fwd_s = rng.uniform(0.2, 2.0, ticks)
    got = ev.mixture_quantiles(ev.QUANTILES, served, mean, p95, (forwarded,), (fwd_s,))
    # Brute force: draw each tick's requests from its log-normal, add the forwarded ones.
    sd = ev._lognormal_sd(mean, p95)
    draws = [rng.lognormal(np.log(m) - 0.5 * s**2, s, int(n) * 50) for m, s, n in zip(mean, sd, served)]
    draws += [np.full(int(n) * 50, f) for f, n in zip(fwd_s, forwarded)]
    want = np.quantile(np.concatenate(draws), ev.QUANTILES)
    np.testing.assert_allclose(got, want, rtol=0.02)
    # Each tick's log-normal has the tick's mean and p95.
    one = ev.mixture_quantiles((0.95,), [1.0], [2.0], [5.0])[0]
    assert one == pytest.approx(5.0, rel=1e-4)
    # The served-weighted mean of per-tick p95s (the old figure) is not the pooled p95.
    assert abs(np.average(p95, weights=served) - got[1]) / got[1] > 0.05
