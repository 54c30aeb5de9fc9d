"""Shared fixtures for the simulator tests."""

import os

# XLA's concurrency-optimised CPU scheduler can hang large programs on this host
# (DESIGN.md "Speed"). The tests' small programs spend more time compiling than running:
# LLVM at -O0 halves compile time (a cluster-env fine-tune test 62 -> 31 s on 2 cores) and
# costs the one long run, the learning test, 108 -> 154 s at 3M steps (it trains 1.5M now:
# 109 s, learned 0.284 against Reactive's -0.070 per tick). Set before jax is imported;
# the subprocess tests pass it on.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false --xla_backend_optimization_level=0")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from aro_jax.envs import scenarios  # noqa: E402
from aro_jax.envs.serving import ServingNodeEnv  # noqa: E402

SHORT_EPISODE_TICKS = 64

# Many tests train the same small configs again (a resume against the uninterrupted run,
# one run per test module): a persistent compilation cache, shared by the xdist workers
# and kept between sessions, compiles each program once (twice where both workers meet it
# at the same moment). A hit needs the same program,
# compile options and jax version; an unreadable entry only warns and compiles again.
jax.config.update("jax_compilation_cache_dir", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
