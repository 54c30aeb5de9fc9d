"""A trained actor-critic as a harness Policy: raw observation -> greedy action."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import struct

from aro_jax.algorithms.networks import ActorCritic, RunningStats, masked_logits
from aro_jax.envs import serving as sv
from aro_jax.envs.heuristics import Policy


@struct.dataclass
class PolicyWeights:
    params: Any
    obs_stats: RunningStats


def greedy_policy(network: ActorCritic, normalize_obs: bool = True, action_masking: bool = True) -> Policy:
    """The highest-scoring feasible action. The weights travel as the policy state, so
    one compiled harness evaluates any checkpoint of the same network."""

    def act(weights: PolicyWeights, raw_obs, params):
        obs = sv.policy_input(raw_obs, params)
        if normalize_obs:
            obs = weights.obs_stats.normalize(obs)
        logits = network.apply(weights.params, obs)[0]
        if action_masking:
            logits = masked_logits(logits, sv.feasible_actions(raw_obs, params)[: network.num_actions])
        return jnp.argmax(logits, -1), weights

    def init(params):
        raise ValueError("a learned policy starts from its trained weights: pass them as policy_state to run_episodes")

    return Policy(init=init, act=act)

