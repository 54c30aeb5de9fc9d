"""PPO in one compiled program (PureJaxRL layout, gymnax 1.x semantics).

`make_train(config, node_params)` returns a Learner of pure functions: `init(key, hp)` builds the
training state, `train_chunk(state, hp, n)` runs n PPO updates as one `lax.scan`, and
`train(key, hp)` does everything under one jit. Sweepable hyperparameters (`Hyperparams`)
are pytree leaves, so `vmap` over seeds and over hyperparameters gives one program.

A learner sees every node in `node_params` (a stack along a leading node axis) with
`num_clusters` simulated clusters each: with the whole cluster this is the paper's
"Centralized RL" baseline; the federated trainer gives each node its own learner.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from aro_jax.algorithms.networks import ActorCritic, RunningStats, masked_logits
from aro_jax.config import ExperimentConfig, num_updates
from aro_jax.envs import serving as sv


@struct.dataclass
class Hyperparams:
    """Values a sweep may vmap over (all float leaves)."""

    lr: float = 3e-4
    clip_eps: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    gamma: float = 0.99
    gae_lambda: float = 0.95
    max_grad_norm: float = 0.5
    alpha: float = 1.0  # reward weights, applied to every node's EnvParams
    beta: float = 0.5
    cost_weight: float = 1.0  # the paper's gamma (named apart from the discount)
    slo_penalty: float = 3.0
    quality_penalty: float = 2.0

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> "Hyperparams":
        p, r = cfg.ppo, cfg.env.reward
        return cls(
            lr=p.lr, clip_eps=p.clip_eps, ent_coef=p.ent_coef, vf_coef=p.vf_coef, gamma=p.gamma,
            gae_lambda=p.gae_lambda, max_grad_norm=p.max_grad_norm,
            alpha=r.alpha, beta=r.beta, cost_weight=r.gamma, slo_penalty=r.slo_penalty, quality_penalty=r.quality_penalty,
        )


@struct.dataclass
class TrainState:
    params: Any  # network parameters
    opt_state: Any
    obs_stats: RunningStats
    env_state: Any  # (nodes, clusters) env states
    obs: jax.Array  # (nodes, clusters, obs_dim) raw observations
    key: jax.Array
    update_step: jax.Array  # PPO updates done


KPI_KEYS = ("e2e_mean_s", "slo_attainment", "cost_usd", "dropped", "arrivals")


class Transition(NamedTuple):
    obs: jax.Array  # normalised
    mask: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    next_value: jax.Array  # V(final observation): bootstraps through truncation
    reward: jax.Array
    terminated: jax.Array
    done: jax.Array


def gae(rewards, values, next_values, terminated, dones, gamma, lam):
    """Generalised advantage estimation over time axis 0 (reverse scan).

    `next_values` are values of the pre-reset next observations, cut only by natural
    termination; the recursion restarts at every episode end (terminated or truncated).
    Returns (advantages, value targets).
    """

    def step(next_adv, x):
        r, v, nv, term, done = x
        delta = r + gamma * nv * (1.0 - term) - v
        adv = delta + gamma * lam * (1.0 - done) * next_adv
        return adv, adv

    _, adv = jax.lax.scan(step, jnp.zeros_like(values[0]), (rewards, values, next_values, terminated, dones), reverse=True)
    return adv, adv + values


def optimizer(hp: Hyperparams, total_updates: int, steps_per_update: int, anneal_lr: bool):
    """Adam with global-norm clipping; the learning rate optionally anneals linearly to 0
    over the run. `steps_per_update` = optimiser steps per PPO update (epochs x minibatches)."""

    def lr_schedule(count):
        frac = 1.0 - jnp.minimum(count // steps_per_update, total_updates) / total_updates
        return hp.lr * (frac if anneal_lr else 1.0)

    return optax.chain(optax.clip_by_global_norm(hp.max_grad_norm), optax.adam(lr_schedule, eps=1e-5))


def with_reward_weights(node_params: sv.EnvParams, hp: Hyperparams) -> sv.EnvParams:
    if not hasattr(node_params, "alpha"):
        return node_params  # another gymnax env (e.g. a probe): no reward weights to set
    shape = jnp.shape(node_params.alpha)
    full = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.float32), shape)  # noqa: E731
    return node_params.replace(
        alpha=full(hp.alpha), beta=full(hp.beta), gamma=full(hp.cost_weight),
        slo_penalty=full(hp.slo_penalty), quality_penalty=full(hp.quality_penalty),
    )


class Learner(NamedTuple):
    """What make_train builds. `init` and `update` also take node params explicitly, so
    the federated trainer can map them over a node axis."""

    init: Any  # (key, hp[, node_params]) -> TrainState
    update: Any  # (state, hp[, node_params]) -> (state, metrics, observation stats of the rollout)
    train_chunk: Any  # (state, hp, num_updates: static) -> (state, metrics stacked per update)
    train: Any  # (key, hp) -> (state, metrics): the whole run under one jit
    network: Any


def make_train(cfg: ExperimentConfig, node_params, env=None) -> Learner:
    """Build a learner over a stack of node params (leading node axis).

    `env` is any gymnax environment (default: the serving node with cfg's action set);
    action masking applies when it has `action_mask_from_obs(obs, params)`.
    """
    env = env or sv.ServingNodeEnv(cfg.env.action_set)
    network = ActorCritic(env.num_actions, tuple(cfg.ppo.hidden_sizes))
    num_nodes = jax.tree.leaves(node_params)[0].shape[0]
    clusters = cfg.env.num_clusters
    steps = cfg.ppo.rollout_steps
    batch = steps * num_nodes * clusters
    minibatches, epochs = cfg.ppo.num_minibatches, cfg.ppo.update_epochs
    total_updates = max(num_updates(cfg), 1)
    obs_dim = env.observation_space(jax.tree.map(lambda x: x[0], node_params)).shape[0]
    use_mask = cfg.ppo.action_masking and hasattr(env, "action_mask_from_obs")

    # Envs form a (nodes, clusters) grid: vmap over node params, then cluster keys.
    reset_all = jax.vmap(jax.vmap(env.reset, in_axes=(0, None)), in_axes=(0, 0))
    step_all = jax.vmap(jax.vmap(env.step, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, 0))

    def mask_of(obs, params):
        if not use_mask:
            return jnp.ones(obs.shape[:-1] + (env.num_actions,), bool)
        return jax.vmap(env.action_mask_from_obs)(obs, params)

    def env_keys(key):
        return jax.random.split(key, num_nodes * clusters).reshape(num_nodes, clusters, -1)

    def init(key: jax.Array, hp: Hyperparams, node_params=node_params) -> TrainState:
        k_net, k_env, key = jax.random.split(key, 3)
        params = network.init(k_net, jnp.zeros((obs_dim,)))
        tx = optimizer(hp, total_updates, minibatches * epochs, cfg.ppo.anneal_lr)
        obs, env_state = reset_all(env_keys(k_env), with_reward_weights(node_params, hp))
        return TrainState(params, tx.init(params), RunningStats.create(obs_dim), env_state, obs, key, jnp.zeros((), jnp.int32))

    def update(state: TrainState, hp: Hyperparams, node_params=node_params):
        """One PPO update: a rollout on every (node, cluster) env, GAE, epochs of minibatches."""
        nparams = with_reward_weights(node_params, hp)
        tx = optimizer(hp, total_updates, minibatches * epochs, cfg.ppo.anneal_lr)
        stats = state.obs_stats

        def env_step(carry, _):
            env_state, obs, key = carry
            key, k_act, k_env = jax.random.split(key, 3)
            mask = mask_of(obs, nparams)
            nobs = stats.normalize(obs) if cfg.ppo.normalize_obs else obs
            logits, value = network.apply(state.params, nobs)
            logits = masked_logits(logits, mask)
            action = jax.random.categorical(k_act, logits)
            log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[..., None], -1)[..., 0]
            next_obs, env_state, reward, terminated, truncated, info = step_all(env_keys(k_env), env_state, action, nparams)
            final = info["final_observation"]
            nfinal = stats.normalize(final) if cfg.ppo.normalize_obs else final
            _, next_value = network.apply(state.params, nfinal)
            done = jnp.logical_or(terminated, truncated)
            tr = Transition(nobs, mask, action, log_prob, value, next_value, reward, terminated.astype(jnp.float32), done.astype(jnp.float32))
            kpi = {k: info["metrics"][k].mean() for k in KPI_KEYS if k in info.get("metrics", {})}
            return (env_state, next_obs, key), (tr, obs, kpi)

        (env_state, obs, key), (traj, env_obs, kpi) = jax.lax.scan(env_step, (state.env_state, state.obs, state.key), None, steps)
        # Values are learned on rewards scaled by (1 - gamma), i.e. in units of mean reward
        # per tick, so they stay O(1) whatever the horizon (and value clipping stays sane).
        scaled_reward = traj.reward * (1.0 - hp.gamma)
        adv, targets = gae(scaled_reward, traj.value, traj.next_value, traj.terminated, traj.done, hp.gamma, hp.gae_lambda)

        def loss_fn(params, mb, mb_adv, mb_targets):
            logits, value = network.apply(params, mb.obs)
            logp_all = jax.nn.log_softmax(masked_logits(logits, mb.mask))
            log_prob = jnp.take_along_axis(logp_all, mb.action[..., None], -1)[..., 0]
            ratio = jnp.exp(log_prob - mb.log_prob)
            mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
            pg = -jnp.minimum(ratio * mb_adv, jnp.clip(ratio, 1 - hp.clip_eps, 1 + hp.clip_eps) * mb_adv).mean()
            v_clipped = mb.value + jnp.clip(value - mb.value, -hp.clip_eps, hp.clip_eps)
            v_loss = 0.5 * jnp.maximum((value - mb_targets) ** 2, (v_clipped - mb_targets) ** 2).mean()
            probs = jnp.exp(logp_all)
            entropy = -(probs * jnp.where(probs > 0, logp_all, 0.0)).sum(-1).mean()
            total = pg + hp.vf_coef * v_loss - hp.ent_coef * entropy
            return total, {"policy_loss": pg, "value_loss": v_loss, "entropy": entropy, "approx_kl": ((ratio - 1) - jnp.log(ratio)).mean()}

        flat = lambda x: x.reshape((batch,) + x.shape[3:])  # noqa: E731

        def epoch(carry, _):
            params, opt_state, key = carry
            key, k_perm = jax.random.split(key)
            perm = jax.random.permutation(k_perm, batch)
            shuffled = jax.tree.map(lambda x: flat(x)[perm].reshape((minibatches, -1) + x.shape[3:]), (traj, adv, targets))

            def minibatch(carry, mb):
                params, opt_state = carry
                grads, info = jax.grad(loss_fn, has_aux=True)(params, *mb)
                updates, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), info

            (params, opt_state), info = jax.lax.scan(minibatch, (params, opt_state), shuffled)
            return (params, opt_state, key), info

        (params, opt_state, key), losses = jax.lax.scan(epoch, (state.params, state.opt_state, key), None, epochs)
        new_stats = stats.update(env_obs) if cfg.ppo.normalize_obs else stats
        metrics = {"reward": traj.reward.mean(), **jax.tree.map(jnp.mean, losses)}
        if kpi:
            metrics.update(
                e2e_mean_s=kpi["e2e_mean_s"].mean(),
                slo_attainment=kpi["slo_attainment"].mean(),
                cost_usd_per_h=kpi["cost_usd"].mean() * 3600.0 / cfg.env.tick_s,
                dropped_pct=100.0 * kpi["dropped"].sum() / jnp.maximum(kpi["arrivals"].sum(), 1e-9),
            )
        new_state = TrainState(params, opt_state, new_stats, env_state, obs, key, state.update_step + 1)
        return new_state, metrics, RunningStats.from_batch(env_obs)

    def train_chunk(state: TrainState, hp: Hyperparams, num: int):
        """`num` PPO updates (static) as one scan; metrics stacked per update."""
        return jax.lax.scan(lambda s, _: update(s, hp)[:2], state, None, num)

    def train(key: jax.Array, hp: Hyperparams):
        return train_chunk(init(key, hp), hp, total_updates)

    return Learner(init, update, train_chunk, train, network)
