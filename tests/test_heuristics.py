"""The baselines' quality-tier rule: it degrades under overload, restores when calm, pays
off where a fixed allocation is overloaded, and is a no-op when the tier is off."""

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
