"""Learning threshold: a short PPO run on one node beats the Reactive (HPA) baseline's
reward on the same scenario and seeds, while the untrained policy does not."""

from pathlib import Path

import jax
import numpy as np
import pytest

from aro_jax.training import driver, evaluation, learned_policy, trainers
from aro_jax.training.checkpointing import load_trained_policy
from aro_jax.config import load_config
from aro_jax.envs.heuristics import reactive_policy
from aro_jax.envs.scenarios import cluster_params
from aro_jax.envs.serving import ServingNodeEnv

ONE_NODE = """
cluster:
  name: one
  nodes:
    - {name: us-east, profile: llama2-70b-h100-tp4, traffic_mix: conversation, mean_rate_rps: 18.0, tz_offset_h: -5.0}
env: {num_clusters: 64}
train: {total_env_steps: 1500000, num_chunks: 2}
"""
SEEDS, TICKS = 4, 2880  # four full simulated days


def _mean_reward(env, policy, params, weights=None):
    m = evaluation.run_episodes(env, policy, params, jax.random.PRNGKey(123), SEEDS, TICKS, weights)
    return float(np.mean(m["reward"]))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ppo_beats_reactive_on_one_node(tmp_path: Path):
    (tmp_path / "one.yaml").write_text(ONE_NODE)
    cfg = load_config(tmp_path / "one.yaml")
    env = ServingNodeEnv(cfg.env.action_set)
    params = cluster_params(cfg, "diurnal")
    reactive = _mean_reward(env, reactive_policy(cfg.env.tick_s), params)

    trainer = trainers.make_trainer(cfg)
    untrained = trainer.weights(jax.jit(trainer.init)(jax.random.PRNGKey(0), trainers.hyperparams(cfg)))
    greedy = learned_policy.greedy_policy(trainer.network)
    untrained_reward = _mean_reward(env, greedy, params, untrained)

    driver.train(cfg, tmp_path / "run", quiet=True)
    _, policy, weights, _ = load_trained_policy(tmp_path / "run")
    learned = _mean_reward(env, policy, params, weights)

    print(f"reward per tick: untrained {untrained_reward:.3f}, reactive {reactive:.3f}, learned {learned:.3f}")
    assert untrained_reward < reactive, "the threshold must not be reachable without learning"
    assert learned > reactive + 0.05
