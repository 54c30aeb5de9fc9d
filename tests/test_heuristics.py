"""The baselines' quality-tier rule: it degrades under overload, restores when calm, pays
off where a fixed allocation is overloaded, and is a no-op when the tier is off. The
spill-over rule: it forwards below the replica limit, and its autoscaler sizes the region
for what it serves."""

import jax
import numpy as np
import pytest

from aro_jax.envs import heuristics, scenarios
from aro_jax.envs.serving import ServingNodeEnv
from aro_jax.training import evaluation as ev

TICKS = 240  # two hours


@pytest.fixture(scope="module")
def flash_node():
    """The default node with a 3x flash crowd in its first hour, then normal traffic."""
    p = scenarios.default_node_params().replace(random_start=0.0, start_time_s=12 * 3600.0)
    t = p.traffic.replace(flash_start_s=12 * 3600.0, flash_duration_s=3600.0, flash_multiplier=3.0)
    return p.replace(traffic=t)


def _run(policy, params):
    env = ServingNodeEnv()
    run = jax.jit(lambda k: ev.rollout(env, policy, params, k, TICKS))
    return {k: np.asarray(v) for k, v in run(jax.random.PRNGKey(3)).items()}


def test_tier_rule_degrades_under_overload_and_restores_when_calm(flash_node):
    m = _run(heuristics.HEURISTICS["static-mean+tier"](), flash_node)
    hour = TICKS // 2
    assert (m["action"][:hour] == heuristics.ct.DEGRADE).any()
    assert m["quality"][:hour].min() < 0.99  # the small model served part of the crowd
    assert (m["action"][hour:] == heuristics.ct.RESTORE).any()
    assert m["quality"][hour:].max() == pytest.approx(1.0)  # back on the large model once calm


def test_tier_rule_raises_goodput_of_an_overloaded_fixed_allocation(flash_node):
    plain = ev.kpis(_run(heuristics.HEURISTICS["static-mean"](), flash_node), 30.0, flash_node)
    tiered = ev.kpis(_run(heuristics.HEURISTICS["static-mean+tier"](), flash_node), 30.0, flash_node)
    assert tiered["goodput_rps"] > 1.05 * plain["goodput_rps"]


def test_tier_rule_is_a_no_op_with_the_tier_off(flash_node):
    off = flash_node.replace(max_small_model_fraction=0.0)
    for name in ("reactive", "static-mean"):
        plain = _run(heuristics.HEURISTICS[name](), off)
        tiered = _run(heuristics.HEURISTICS[f"{name}+tier"](), off)
        np.testing.assert_array_equal(plain["action"], tiered["action"])


def test_spill_rule_forwards_below_the_replica_limit(flash_node):
    """Under the crowd, Reactive forwards only at its replica limit (never here); with
    spill-over it forwards while below the limit."""
    roomy = flash_node.replace(max_replicas=64, peer_spare_rps=50.0, peer_capacity_rps=200.0)  # a peer that can take the excess
    plain = _run(heuristics.HEURISTICS["reactive"](), roomy)
    spilled = _run(heuristics.HEURISTICS["reactive+spill"](), roomy)
    assert plain["forwarded"].sum() == 0.0
    hour = TICKS // 2
    assert (spilled["forwarded"][:hour] / spilled["arrivals"][:hour]).max() > 0.02
    assert spilled["replicas_billed"].max() < roomy.max_replicas


def test_spill_rule_steps_toward_the_excess_share():
    """Forward a step while under the share above SPILL_LOAD (before scaling), pull back a
    step when over it and the base keeps its allocation."""
    from aro_jax import contract as ct

    node = scenarios.default_node_params()
    policy = heuristics.with_spillover(heuristics.static_policy("mean"))
    state = policy.init(node)
    obs = np.zeros(len(ct.OBS_FIELDS), np.float32)
    f = ct.FIELD_INDEX
    sized = heuristics.sizing.replicas_for_rate(node, node.traffic.mean_rate_rps, heuristics.sizing.TARGET_UTILISATION)
    obs[f["replicas_ready"]], obs[f["capacity_rps"]] = float(sized), 10.0
    obs[f["cpu_cores"]] = float(heuristics.sizing.cores_for(node, sized))
    obs[f["host_memory_gb"]] = float(heuristics.sizing.memory_for(node, sized))
    act = lambda rate, fwd: int(policy.act(state, _with(obs, rate, fwd), node)[0])  # noqa: E731
    assert act(rate=20.0, fwd=0.0) == ct.REBALANCE  # load 2: forward toward 1 - 0.7 / 2
    assert act(rate=20.0, fwd=0.3) == ct.REBALANCE
    assert act(rate=20.0, fwd=0.5) == ct.MAINTAIN  # at max_forward_fraction
    assert act(rate=2.0, fwd=0.3) == ct.PULL_BACK  # load 0.2: nothing to spill
    assert act(rate=2.0, fwd=0.0) == ct.MAINTAIN


def _with(obs, rate, fwd):
    from aro_jax import contract as ct

    out = obs.copy()
    out[ct.FIELD_INDEX["request_rate_rps"]], out[ct.FIELD_INDEX["forward_fraction"]] = rate, fwd
    return out


def test_spill_rule_sizes_for_the_served_rate():
    """At a spill load far below the autoscaler's target, forwarding replaces replicas (the
    autoscaler sees the rate the region keeps): fewer replicas than plain Reactive."""
    node = scenarios.default_node_params().replace(random_start=0.0, start_time_s=12 * 3600.0, peer_spare_rps=50.0, peer_capacity_rps=200.0)
    policy = heuristics.with_spillover(heuristics.reactive_policy(), spill_load=0.3)
    plain = _run(heuristics.HEURISTICS["reactive"](), node)
    spilled = _run(policy, node)
    assert spilled["forwarded"].sum() > 0.2 * spilled["arrivals"].sum()
    assert spilled["replicas_billed"][-60:].mean() < 0.8 * plain["replicas_billed"][-60:].mean()
