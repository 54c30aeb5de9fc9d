"""Shared fixtures for the simulator tests."""

import os

# XLA's concurrency-optimised CPU scheduler can hang large programs on this host
# (DESIGN.md "Speed"); must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import pytest  # noqa: E402

from aro_jax.envs import scenarios  # noqa: E402
from aro_jax.envs.serving import ServingNodeEnv  # noqa: E402

SHORT_EPISODE_TICKS = 64


@pytest.fixture(scope="session")
def env():
    return ServingNodeEnv()


@pytest.fixture(scope="session")
def default_params():
    """The default node (Llama-2-70B on A100 TP4, conversation traffic), full-day episodes."""
    return scenarios.default_node_params()


@pytest.fixture(scope="session")
def params(default_params):
    """Default node with short episodes, so rollouts cross episode boundaries quickly."""
    return default_params.replace(max_steps_in_episode=SHORT_EPISODE_TICKS)


@pytest.fixture(scope="session")
def small_node_params():
    """A second, different node: Llama-2-7B on one H100, bursty code traffic, UTC+9."""
    spec = scenarios.NodeSpec(
        name="tokyo", profile="llama2-7b-h100-tp1", traffic_mix="code", mean_rate_rps=20.0, tz_offset_h=9.0, max_replicas=8
    )
    return scenarios.node_params(spec, episode_ticks=SHORT_EPISODE_TICKS)
