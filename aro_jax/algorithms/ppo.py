"""PPO on any gymnax environment, in one compiled program (PureJaxRL layout, gymnax 1.x).

`make_train(env, env_params, config)` returns a Learner of pure functions: `init(key, hp)`
builds the training state, `update(state, hp)` runs one PPO update (a rollout, GAE,
epochs of minibatch updates), `train_chunk(state, hp, n)` runs n of them as one
`lax.scan`, and `train(key, hp)` does everything. `Hyperparams` are pytree leaves and
`PPOConfig` holds what is static (shapes and counts), so `vmap` over seeds and over
hyperparameters gives one program.

The envs form a (param sets, envs) grid: with `stacked=True` the env params carry a
leading axis (one param set per node of a cluster, say) and every set runs
`config.num_envs` envs. Two hooks keep this module free of any particular env:
`env_params_fn(env_params, hp.env)` applies env-specific hyperparameters (reward weights,
for example) and `metrics_fn(info)` turns a step's info into scalars averaged into the
update's metrics. Action masking applies when the env has `action_mask_from_obs(obs, params)`.

Constrained PPO (PPO-Lagrangian with PID multipliers, Stooke, Achiam & Abbeel, ICML 2020):
with `config.num_costs` = C > 0 and `cost_fn(info)` giving C per-step costs, the learner
maximises return subject to each constraint's mean cost per step <= `hp.cost_limits[i]`.
Each constraint has its own cost critic and GAE; the policy's advantage is
(A_r - sum_i lambda_i A_ci) / (1 + sum_i lambda_i), and the multipliers lambda are updated
inside the compiled loop after every update from the rollout's mean costs (a PID rule on
the violation), so they are part of the training state: logged, checkpointed, resumed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from aro_jax.algorithms.networks import ActorCritic, RunningStats, masked_logits


@struct.dataclass
class Hyperparams:
    """Values a sweep may vmap over (float leaves). `env` is an optional pytree of
    env-specific values handed to `make_train`'s `env_params_fn`."""

    lr: float = 3e-4
    clip_eps: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    gamma: float = 0.99  # discount
    gae_lambda: float = 0.95
    max_grad_norm: float = 0.5
    env: Any = None
    # Constrained PPO only: (C,) limits on the mean cost per step, and the PID gains of
    # the multiplier update (integral gain = the multiplier's learning rate).
    cost_limits: Any = None
    lagrange_ki: float = 0.05
    lagrange_kp: float = 0.5
    lagrange_kd: float = 0.0


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Static settings: shapes, counts and switches (not vmappable)."""

    num_envs: int = 16  # envs per param set, stepped in parallel
    rollout_steps: int = 64  # env steps per env per update
    num_minibatches: int = 4
    update_epochs: int = 4
    total_updates: int = 100  # the run's length, for the learning-rate schedule
    hidden_sizes: tuple[int, ...] = (64, 64)
    anneal_lr: bool = True
    normalize_obs: bool = True
    # Trailing observation dims the normaliser leaves as they are: features already O(1)
    # and constant within an env (e.g. a node's descriptor), whose running variance of ~0
    # would blow their float rounding up into the input.
    obs_passthrough: int = 0
    action_masking: bool = True
    # Train the output layers only (actor, critic and cost-critic heads); the hidden layers
    # keep their starting values, e.g. a public pretraining's features. Under DP-SGD the
    # clip and the noise then cover the heads' few coordinates only.
    frozen_trunk: bool = False
    # With normalize_obs: the normaliser keeps its starting statistics (a pretraining's,
    # from public data); nothing updates it and a rollout reports none, so under DP-SGD it
    # needs no private statistics.
    frozen_normalizer: bool = False
    num_costs: int = 0  # constraints (constrained PPO when > 0; needs make_train's cost_fn)
    # DP-SGD over segments (one env's rollout column is one segment), on when dp_clip_norm > 0:
    # each of the epochs x minibatches steps Poisson-samples segments with dp_sampling_rate
    # (0: 1 / num_minibatches), clips each one's gradient to dp_clip_norm and adds Gaussian
    # noise of std dp_noise_multiplier x dp_clip_norm to their sum (`dp_gradient`).
    dp_clip_norm: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_sampling_rate: float = 0.0
    # Under DP-SGD the running normaliser may only fold in privatised statistics: each
    # segment's [mean obs, mean obs^2] clipped to dp_stats_clip_norm, summed, noised with
    # dp_stats_noise_multiplier x that (`private_statistics`); 0 with normalize_obs is refused.
    dp_stats_clip_norm: float = 10.0
    dp_stats_noise_multiplier: float = 0.0


@struct.dataclass
class ConstraintState:
    """PID-Lagrangian multipliers of constrained PPO, one per constraint."""

    multipliers: jax.Array  # (C,) lambda >= 0
    integral: jax.Array  # (C,) integral term (clipped at 0)
    previous_cost: jax.Array  # (C,) last rollout's mean cost (derivative term)

    @classmethod
    def create(cls, num_costs: int) -> "ConstraintState":
        zeros = jnp.zeros((num_costs,), jnp.float32)
        return cls(zeros, zeros, zeros)

    def update(self, mean_cost: jax.Array, hp: "Hyperparams") -> "ConstraintState":
        """One PID step on the violation (mean cost - limit); multipliers stay >= 0."""
        error = mean_cost - hp.cost_limits
        integral = jnp.maximum(self.integral + hp.lagrange_ki * error, 0.0)
        derivative = jnp.maximum(mean_cost - self.previous_cost, 0.0)
        multipliers = jnp.maximum(hp.lagrange_kp * error + integral + hp.lagrange_kd * derivative, 0.0)
        return ConstraintState(multipliers, integral, mean_cost)


@struct.dataclass
class TrainState:
    params: Any  # network parameters
    opt_state: Any
    obs_stats: RunningStats
    env_state: Any  # (param sets, envs) env states
    obs: jax.Array  # (param sets, envs, obs_dim) observations
    key: jax.Array
    update_step: jax.Array  # PPO updates done
    constraint: ConstraintState | None = None  # constrained PPO only


class Transition(NamedTuple):
    obs: jax.Array  # normalised
    mask: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    # The pre-reset next observation, normalised: its values bootstrap through truncation.
    # `learn` evaluates them for the whole rollout in one batched call (next_values): a
    # critic pass per tick inside the rollout's scan cost 12 % of the main job's round.
    next_obs: jax.Array
    reward: jax.Array
    terminated: jax.Array
    done: jax.Array
    cost: jax.Array | None = None  # (..., C) constrained PPO only
    cost_value: jax.Array | None = None


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


def segment_norms(grads) -> jax.Array:
    """(S,) L2 norm of each segment's gradient over every leaf (leading axis S)."""
    leaves = jax.tree.leaves(grads)
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1) for g in leaves))


def clip_per_segment(grads, clip_norm):
    """Scale each segment's gradient (leading axis) to L2 norm at most `clip_norm`."""
    factor = jnp.minimum(1.0, clip_norm / jnp.maximum(segment_norms(grads), 1e-12))
    return jax.tree.map(lambda g: g * factor.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), grads)


def output_layers_only(grads):
    """`grads` with every leaf outside the networks' output layers (`*_out`) zeroed: a
    frozen trunk's coordinates get no update, and under DP-SGD no clip share or noise."""
    def keep(path, g):
        return g if any(str(getattr(k, "key", "")).endswith("_out") for k in path) else jnp.zeros_like(g)
    return jax.tree_util.tree_map_with_path(keep, grads)


def dp_gradient(per_segment_grads, mask, key, noise_multiplier, clip_norm, expected_count):
    """The DP-SGD gradient: (sum over the sampled segments (`mask`) of their gradients,
    each clipped to C, + N(0, (sigma C)^2) per coordinate) / expected_count. The fixed
    denominator (q S, not the realised count) keeps the sensitivity of the released mean
    at C / (q S) when one segment is added or removed."""
    clipped = clip_per_segment(per_segment_grads, clip_norm)
    total = jax.tree.map(lambda g: jnp.tensordot(mask.astype(g.dtype), g, axes=1), clipped)
    return noisy_mean(total, key, noise_multiplier, clip_norm, expected_count)


def noisy_mean(total, key, noise_multiplier, clip_norm, expected_count):
    """(total + N(0, (sigma C)^2) per coordinate) / expected_count: `total` is a sum of
    gradients each clipped to C."""
    leaves, treedef = jax.tree.flatten(total)
    keys = jax.random.split(key, len(leaves))
    std = noise_multiplier * clip_norm
    return jax.tree.unflatten(treedef, [(g + std * jax.random.normal(k, g.shape, g.dtype)) / expected_count for g, k in zip(leaves, keys)])


def dp_chunk_size(segments: int, rate: float) -> int:
    """Slots per chunk of sampled segments: the mean Poisson count plus 4 sd (a realised
    count above it only costs one more chunk)."""
    mean = rate * segments
    return int(min(segments, math.ceil(mean + 4.0 * math.sqrt(mean * (1.0 - rate))) + 1))


def sampled_clipped_sum(segment_grad, data, mask, clip_norm, chunk: int):
    """Sum over the sampled segments (`mask`, (S,)) of their gradients clipped to C, with
    the per-segment gradients computed only for sampled segments: they are gathered
    `chunk` at a time, for as many chunks as the realised count needs (a while loop; the
    count stays unbounded, so the Poisson sampling is exact). Static shapes throughout.

    segment_grad: per-segment data (chunk, ...) -> (grads (chunk, ...), info {name: (chunk,)}).
    Returns (sum of clipped grads, {name: sum over sampled of info, dp_segment_grad_norm:
    sum of pre-clip norms}, realised count)."""
    num = mask.shape[0]
    order = jnp.argsort(~mask, stable=True)  # sampled segments first
    count = mask.sum()
    probe = jax.tree.map(lambda x: x[:chunk], data)
    grad_shape, info_shape = jax.eval_shape(segment_grad, probe)
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype), t)  # noqa: E731
    init = (jnp.zeros((), jnp.int32), zeros(grad_shape), {**zeros(info_shape), "dp_segment_grad_norm": jnp.zeros((), jnp.float32)})

    def body(carry):
        i, total, info_sum = carry
        slots = i * chunk + jnp.arange(chunk)
        valid = slots < count
        grads, info = segment_grad(jax.tree.map(lambda x: x[order[jnp.minimum(slots, num - 1)]], data))
        info = {**info, "dp_segment_grad_norm": segment_norms(grads)}  # before clipping: to choose the clip norm
        clipped = clip_per_segment(grads, clip_norm)
        total = jax.tree.map(lambda t, g: t + jnp.tensordot(valid.astype(g.dtype), g, axes=1), total, clipped)
        info_sum = {k: info_sum[k] + jnp.sum(jnp.where(valid, v, 0.0)) for k, v in info.items()}
        return i + 1, total, info_sum

    _, total, info_sum = jax.lax.while_loop(lambda c: c[0] * chunk < count, body, init)
    return total, info_sum, count


def private_statistics(seg_obs: jax.Array, key, noise_multiplier, clip_norm) -> RunningStats:
    """Observation statistics as a Gaussian mechanism over segments. seg_obs: (S, T, dim).
    Each segment's message [mean, mean of squares] (2 dim) is clipped to `clip_norm`; the
    sum gets N(0, (sigma clip_norm)^2) per coordinate and is divided by S (public), so one
    segment moves the release by at most clip_norm / S. Variance = mean square - mean^2,
    floored at 1e-4 (post-processing); count S x T."""
    num, steps, dim = seg_obs.shape
    message = jnp.concatenate([seg_obs.mean(1), jnp.square(seg_obs).mean(1)], axis=-1)
    clipped = clip_per_segment(message, clip_norm)
    noisy = (clipped.sum(0) + noise_multiplier * clip_norm * jax.random.normal(key, (2 * dim,), seg_obs.dtype)) / num
    mean, square = noisy[:dim], noisy[dim:]
    return RunningStats(mean, jnp.maximum(square - jnp.square(mean), 1e-4), jnp.asarray(num * steps, jnp.float32))


class EnvGrid(NamedTuple):
    """How a learner resets and steps its (param sets, envs) grid of envs, every array
    with those two leading axes (keys (S, E, 2), actions (S, E), params (S, ...))."""

    reset: Callable  # (keys, params) -> (obs, env state)
    step: Callable  # (keys, env state, actions, params) -> gymnax's (obs, state, reward, terminated, truncated, info)


def independent_grid(env) -> EnvGrid:
    """Every cell its own env: gymnax's reset and step mapped over param sets, then envs."""
    return EnvGrid(
        reset=jax.vmap(jax.vmap(env.reset, in_axes=(0, None)), in_axes=(0, 0)),
        step=jax.vmap(jax.vmap(env.step, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, 0)),
    )


class Learner(NamedTuple):
    """What make_train builds. `init` and `update` also take env params explicitly (in the
    form make_train got them), so a federated trainer can map them over a node axis.
    `update` is `learn` after `rollout`; `act` and `record` are a rollout's two halves
    around the env step, for a trainer that steps several learners' envs together."""

    init: Callable  # (key, hp[, env_params]) -> TrainState
    update: Callable  # (state, hp[, env_params]) -> (state, metrics, observation stats of the rollout)
    train_chunk: Callable  # (state, hp, num_updates: static) -> (state, metrics stacked per update)
    train: Callable  # (key, hp) -> (state, metrics): the whole run
    network: ActorCritic
    rollout: Callable  # (state, hp[, env_params]) -> (state, collected)
    learn: Callable  # (state, collected, hp) -> as update
    act: Callable  # (state, obs, effective params, key) -> (actions, record)
    record: Callable  # (state, act's record, actions, env step outputs, effective params) -> (Transition, step metrics)
    env_params: Callable  # (env_params, hp) -> the effective params of the grid (env_params_fn applied)
    config: PPOConfig


def make_train(
    env,
    env_params,
    config: PPOConfig = PPOConfig(),
    *,
    stacked: bool = False,
    env_params_fn: Callable[[Any, Any], Any] | None = None,
    metrics_fn: Callable[[dict], dict[str, jax.Array]] | None = None,
    cost_fn: Callable[[dict, Any], jax.Array] | None = None,
    env_grid: EnvGrid | None = None,
) -> Learner:
    """Build a PPO learner for a gymnax `env`.

    env_params: the env's params, or (`stacked=True`) a stack of them along a leading axis.
    env_params_fn: (env_params, hp.env) -> env_params, applied before every rollout.
    metrics_fn: info dict of one step -> named arrays; their means over the rollout join
        the update's metrics (next to reward and the losses).
    cost_fn: (info dict of one step, env params of the (param sets,) grid) -> (param sets,
        envs, config.num_costs) costs of the step (constrained PPO).
    env_grid: how the (param sets, envs) grid is reset and stepped (default: independent envs;
        coupled ones, such as the regions of one cluster, step together).
    """
    num_costs = config.num_costs
    if (cost_fn is None) != (num_costs == 0):
        raise ValueError(f"constrained PPO needs both config.num_costs > 0 and a cost_fn (got num_costs={num_costs}, cost_fn={cost_fn})")
    network = ActorCritic(env.num_actions, tuple(config.hidden_sizes), num_costs)
    grid = lambda p: p if stacked else jax.tree.map(lambda x: jnp.asarray(x)[None], p)  # noqa: E731
    num_sets = jax.tree.leaves(grid(env_params))[0].shape[0]
    num_envs, steps = config.num_envs, config.rollout_steps
    batch = steps * num_sets * num_envs
    minibatches, epochs = config.num_minibatches, config.update_epochs
    if batch % minibatches:
        raise ValueError(f"num_minibatches={minibatches} does not divide the batch of {batch} transitions "
                         f"(rollout_steps {steps} x param sets {num_sets} x num_envs {num_envs})")
    total_updates = max(config.total_updates, 1)
    obs_dim = env.observation_space(jax.tree.map(lambda x: x[0], grid(env_params))).shape[0]
    stats_dim = obs_dim - config.obs_passthrough  # the normaliser's statistics cover these leading dims
    use_mask = config.action_masking and hasattr(env, "action_mask_from_obs")
    dp_sgd = config.dp_clip_norm > 0
    segments = num_sets * num_envs
    dp_rate = config.dp_sampling_rate or 1.0 / minibatches
    if dp_sgd:
        # Statistics pooled over every segment without noise would bypass the guarantee.
        if (config.normalize_obs and not config.frozen_normalizer and not config.dp_stats_noise_multiplier > 0) or num_costs:
            raise ValueError("DP-SGD needs no constraints, and normalize_obs only with dp_stats_noise_multiplier > 0: the Lagrange "
                             "multipliers and an unprivatised normaliser would pool every segment without noise")
        if not 0 < dp_rate <= 1:
            raise ValueError(f"dp_sampling_rate must be in (0, 1], got {config.dp_sampling_rate}")
        dp_chunk = dp_chunk_size(segments, dp_rate)

    env_grid = env_grid or independent_grid(env)

    def effective(params, hp):
        params = grid(params)
        return env_params_fn(params, hp.env) if env_params_fn is not None else params

    def mask_of(obs, params):
        if not use_mask:
            return jnp.ones(obs.shape[:-1] + (env.num_actions,), bool)
        return jax.vmap(env.action_mask_from_obs)(obs, params)

    def env_keys(key):
        return jax.random.split(key, num_sets * num_envs).reshape(num_sets, num_envs, -1)

    def tx_of(hp):
        return optimizer(hp, total_updates, minibatches * epochs, config.anneal_lr)

    def init(key: jax.Array, hp: Hyperparams, env_params=env_params) -> TrainState:
        k_net, k_env, key = jax.random.split(key, 3)
        params = network.init(k_net, jnp.zeros((obs_dim,)))
        obs, env_state = env_grid.reset(env_keys(k_env), effective(env_params, hp))
        constraint = ConstraintState.create(num_costs) if num_costs else None
        return TrainState(params, tx_of(hp).init(params), RunningStats.create(stats_dim), env_state, obs, key, jnp.zeros((), jnp.int32), constraint)

    def act(state: TrainState, obs, nparams, key):
        """The policy's sampled actions on a grid of observations, with what the transition
        records of them: (actions, (normalised obs, mask, log-prob, value, cost value))."""
        mask = mask_of(obs, nparams)
        nobs = state.obs_stats.normalize(obs) if config.normalize_obs else obs
        logits, value, *cost_value = network.apply(state.params, nobs)
        logits = masked_logits(logits, mask)
        action = jax.random.categorical(key, logits)
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[..., None], -1)[..., 0]
        return action, (nobs, mask, log_prob, value, cost_value[0] if num_costs else None)

    def record(state: TrainState, acted, action, stepped, nparams):
        """One step's Transition and logged metrics from `act`'s record and the env's step."""
        nobs, mask, log_prob, value, cost_value = acted
        _, _, reward, terminated, truncated, info = stepped
        final = state.obs_stats.normalize(info["final_observation"]) if config.normalize_obs else info["final_observation"]
        done = jnp.logical_or(terminated, truncated)
        costs = (cost_fn(info, nparams), cost_value) if num_costs else (None, None)
        tr = Transition(nobs, mask, action, log_prob, value, final, reward, terminated.astype(jnp.float32), done.astype(jnp.float32), *costs)
        return tr, (metrics_fn(info) if metrics_fn is not None else {})

    def rollout(state: TrainState, hp: Hyperparams, env_params=env_params):
        """`config.rollout_steps` steps of every env: (state with the envs advanced, what learn takes)."""
        nparams = effective(env_params, hp)

        def env_step(carry, _):
            env_state, obs, key = carry
            key, k_act, k_env = jax.random.split(key, 3)
            action, acted = act(state, obs, nparams, k_act)
            stepped = env_grid.step(env_keys(k_env), env_state, action, nparams)
            tr, step_metrics = record(state, acted, action, stepped, nparams)
            return (stepped[1], stepped[0], key), (tr, obs, step_metrics)

        (env_state, obs, key), collected = jax.lax.scan(env_step, (state.env_state, state.obs, state.key), None, steps)
        return state.replace(env_state=env_state, obs=obs, key=key), collected

    def update(state: TrainState, hp: Hyperparams, env_params=env_params):
        """One PPO update: a rollout on every env, GAE, epochs of minibatches."""
        return learn(*rollout(state, hp, env_params), hp)

    def learn(state: TrainState, collected, hp: Hyperparams):
        """GAE and the epochs of minibatch updates on a rollout's `collected` (trajectories,
        raw observations, step metrics, each with leading axes (steps, param sets, envs))."""
        traj, env_obs, step_metrics = collected
        env_state, obs, key = state.env_state, state.obs, state.key
        tx = tx_of(hp)
        stats = state.obs_stats
        # Values are learned on rewards scaled by (1 - gamma), i.e. in units of mean reward
        # per tick, so they stay O(1) whatever the horizon (and value clipping stays sane).
        scaled_reward = traj.reward * (1.0 - hp.gamma)
        # The rollout's parameters are still state.params: nothing has updated them yet.
        _, next_value, *next_cost_value = network.apply(state.params, traj.next_obs)
        traj = traj._replace(next_obs=None)  # not shuffled into the minibatches
        adv, targets = gae(scaled_reward, traj.value, next_value, traj.terminated, traj.done, hp.gamma, hp.gae_lambda)
        constraint = state.constraint
        if num_costs:
            # One GAE per constraint (the cost axis last, mapped), in the same units.
            cost_gae = jax.vmap(gae, in_axes=(-1, -1, -1, None, None, None, None), out_axes=-1)
            cost_adv, cost_targets = cost_gae(traj.cost * (1.0 - hp.gamma), traj.cost_value, next_cost_value[0],
                                              traj.terminated, traj.done, hp.gamma, hp.gae_lambda)
            lam = constraint.multipliers
            adv = (adv - (cost_adv * lam).sum(-1)) / (1.0 + lam.sum())
            targets = (targets, cost_targets)

        def loss_fn(params, mb, mb_adv, mb_targets):
            logits, value, *cost_value = network.apply(params, mb.obs)
            if num_costs:
                mb_targets, cost_targets = mb_targets
            logp_all = jax.nn.log_softmax(masked_logits(logits, mb.mask))
            log_prob = jnp.take_along_axis(logp_all, mb.action[..., None], -1)[..., 0]
            ratio = jnp.exp(log_prob - mb.log_prob)
            mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
            pg = -jnp.minimum(ratio * mb_adv, jnp.clip(ratio, 1 - hp.clip_eps, 1 + hp.clip_eps) * mb_adv).mean()
            v_clipped = mb.value + jnp.clip(value - mb.value, -hp.clip_eps, hp.clip_eps)
            v_loss = 0.5 * jnp.maximum((value - mb_targets) ** 2, (v_clipped - mb_targets) ** 2).mean()
            if num_costs:  # the cost critics, clipped the same way, share the value coefficient
                c_clipped = mb.cost_value + jnp.clip(cost_value[0] - mb.cost_value, -hp.clip_eps, hp.clip_eps)
                v_loss = v_loss + 0.5 * jnp.maximum((cost_value[0] - cost_targets) ** 2, (c_clipped - cost_targets) ** 2).mean(0).sum()
            probs = jnp.exp(logp_all)
            entropy = -(probs * jnp.where(probs > 0, logp_all, 0.0)).sum(-1).mean()
            total = pg + hp.vf_coef * v_loss - hp.ent_coef * entropy
            return total, {"policy_loss": pg, "value_loss": v_loss, "entropy": entropy, "approx_kl": ((ratio - 1) - jnp.log(ratio)).mean()}

        flat = lambda x: x.reshape((batch,) + x.shape[3:])  # noqa: E731
        trainable = output_layers_only if config.frozen_trunk else (lambda grads: grads)

        def epoch(carry, _):
            params, opt_state, key = carry
            key, k_perm = jax.random.split(key)
            perm = jax.random.permutation(k_perm, batch)
            shuffled = jax.tree.map(lambda x: flat(x)[perm].reshape((minibatches, -1) + x.shape[3:]), (traj, adv, targets))

            def minibatch(carry, mb):
                params, opt_state = carry
                grads, info = jax.grad(loss_fn, has_aux=True)(params, *mb)
                grads = trainable(grads)
                updates, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), info

            (params, opt_state), info = jax.lax.scan(minibatch, (params, opt_state), shuffled)
            return (params, opt_state, key), info

        def dp_step(carry, _):
            """One DP-SGD step: Poisson-sample segments, per-segment gradients of the
            sampled ones (gathered in chunks: static shapes), clip, noise."""
            params, opt_state, key = carry
            key, k_mask, k_noise = jax.random.split(key, 3)
            mask = jax.random.uniform(k_mask, (segments,)) < dp_rate
            per_segment = jax.vmap(jax.grad(loss_fn, has_aux=True), in_axes=(None, 0, 0, 0))

            def segment_grad(d):
                grads, info = per_segment(params, *d)
                return trainable(grads), info

            total, info_sum, count = sampled_clipped_sum(segment_grad, by_segment, mask, config.dp_clip_norm, dp_chunk)
            # A frozen coordinate's release is its starting value whatever the data: no noise.
            grads = trainable(noisy_mean(total, k_noise, config.dp_noise_multiplier, config.dp_clip_norm, dp_rate * segments))
            updates, opt_state = tx.update(grads, opt_state, params)
            info = {k: v / jnp.maximum(count, 1) for k, v in info_sum.items()}  # means over the sampled segments
            info["dp_sampled"] = count.astype(jnp.float32)
            return (optax.apply_updates(params, updates), opt_state, key), info

        if dp_sgd:
            # (steps, sets, envs, ...) -> (segments, steps, ...): one loss per segment, whose
            # advantages loss_fn normalises within the segment (no other segment's data).
            seg = lambda x: jnp.swapaxes(x.reshape((steps, segments) + x.shape[3:]), 0, 1)  # noqa: E731
            by_segment = jax.tree.map(seg, (traj, adv, targets))
            (params, opt_state, key), losses = jax.lax.scan(dp_step, (state.params, state.opt_state, key), None, epochs * minibatches)
            sampled = losses.pop("dp_sampled")
            losses["dp_sample_rate"] = sampled.mean() / segments  # empirical Poisson rate
            losses["dp_batch_std"] = sampled.std()  # > 0: the batch size varies (no shuffle)
        else:
            (params, opt_state, key), losses = jax.lax.scan(epoch, (state.params, state.opt_state, key), None, epochs)
        empty = RunningStats(jnp.zeros(stats_dim), jnp.zeros(stats_dim), jnp.zeros((), jnp.float32))
        updating = config.normalize_obs and not config.frozen_normalizer
        if dp_sgd:  # nothing of the observations leaves the update unprotected
            if updating:
                seg_obs = jnp.swapaxes(env_obs[..., :stats_dim].reshape((steps, segments, stats_dim)), 0, 1)
                rollout_stats = private_statistics(seg_obs, jax.random.fold_in(key, 1), config.dp_stats_noise_multiplier,
                                                   config.dp_stats_clip_norm)
            else:
                rollout_stats = empty
        else:
            rollout_stats = empty if config.frozen_normalizer else RunningStats.from_batch(env_obs[..., :stats_dim])
        new_stats = stats.merge(rollout_stats) if updating else stats
        metrics = {"reward": traj.reward.mean(), **jax.tree.map(jnp.mean, losses), **jax.tree.map(jnp.mean, step_metrics)}
        if num_costs:
            mean_cost = traj.cost.reshape(-1, num_costs).mean(0)
            constraint = constraint.update(mean_cost, hp)
            for i in range(num_costs):
                metrics[f"cost_{i}"] = mean_cost[i]
                metrics[f"multiplier_{i}"] = constraint.multipliers[i]
        new_state = TrainState(params, opt_state, new_stats, env_state, obs, key, state.update_step + 1, constraint)
        return new_state, metrics, rollout_stats

    def train_chunk(state: TrainState, hp: Hyperparams, num: int):
        """`num` PPO updates (static) as one scan; metrics stacked per update."""
        return jax.lax.scan(lambda s, _: update(s, hp)[:2], state, None, num)

    def train(key: jax.Array, hp: Hyperparams):
        return train_chunk(init(key, hp), hp, total_updates)

    return Learner(init, update, train_chunk, train, network, rollout, learn, act, record, effective, config)
