"""The serving-specific wiring of the generic learners: an ExperimentConfig becomes a PPO
learner on the serving env (centralized), or one learner per node composed by the
federated round (federated, local-only), seen by the driver as one `Trainer`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from aro_jax import config as config_lib
from aro_jax.algorithms import ppo
from aro_jax.contract import DESCRIPTOR_FIELDS
from aro_jax.envs import cluster
from aro_jax.envs.params import EnvParams, RewardWeights
from aro_jax.envs.scenarios import cluster_params
from aro_jax.envs.serving import ServingNodeEnv
from aro_jax.federated import fedppo
from aro_jax.training import learned_policy


# Constrained objective ("slo"): the constraints, in cost_limits order.
CONSTRAINTS = ("slo_miss_share", "drop_share", "quality_loss")


def reward_weights(cfg: config_lib.ExperimentConfig) -> RewardWeights:
    """The paper's reward as configured; under the "slo" objective only cost and quality
    loss remain in the reward (throughput, latency and SLO misses become constraints)."""
    w = cfg.env.reward
    if cfg.objective.kind == "slo":
        return RewardWeights(alpha=0.0, beta=0.0, cost_weight=w.cost_weight, slo_penalty=0.0, quality_penalty=w.quality_penalty)
    return dataclasses.replace(w)


def cost_limits(slo_target, max_drop, min_quality) -> jax.Array:
    """Limits of CONSTRAINTS: missed share <= 1 - target, dropped share <= max_drop,
    quality lost to the small tier <= 1 - min_quality."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return jnp.stack([1.0 - f32(slo_target), f32(max_drop), 1.0 - f32(min_quality)])


def hyperparams(cfg: config_lib.ExperimentConfig) -> ppo.Hyperparams:
    """The run's vmappable values: PPO's, the reward weights as the env part, and under
    the "slo" objective the constraints' limits."""
    p, o = cfg.ppo, cfg.objective
    return ppo.Hyperparams(
        lr=p.lr, clip_eps=p.clip_eps, ent_coef=p.ent_coef, vf_coef=p.vf_coef, gamma=p.gamma,
        gae_lambda=p.gae_lambda, max_grad_norm=p.max_grad_norm, env=reward_weights(cfg),
        cost_limits=cost_limits(o.slo_target + o.slo_margin, o.max_drop - o.drop_margin, o.min_quality) if o.kind == "slo" else None,
        lagrange_ki=p.lagrange_ki, lagrange_kp=p.lagrange_kp, lagrange_kd=p.lagrange_kd,
    )


# Evaluation score of the "slo" objective: reward minus this much per unit of violated
# share, so a checkpoint that breaks a constraint never ranks above one that keeps it at
# a similar cost (rewards are O(1) per tick).
CONSTRAINT_PENALTY = 10.0


def eval_score(cfg: config_lib.ExperimentConfig, metrics: dict) -> float:
    """The driver's score for "best checkpoint" from evaluation episodes (metrics of shape
    (nodes, seeds, ticks), rewards under the run's objective): the mean reward, and under
    the "slo" objective minus CONSTRAINT_PENALTY x each violated share (each region
    against its own target, weighted by its arrivals)."""
    score = float(np.mean(metrics["reward"]))
    if cfg.objective.kind == "slo":
        per_node = lambda x: np.asarray(x, np.float64).reshape(np.shape(x)[0], -1).sum(axis=1)  # noqa: E731
        arrivals = np.maximum(per_node(metrics["arrivals"]), 1e-9)
        attempted = sum(np.asarray(metrics[k]) for k in ("served", "forwarded", "dropped", "rejected"))
        missed = per_node((1.0 - np.asarray(metrics["slo_attainment"])) * attempted) / arrivals
        dropped = per_node(metrics["dropped"]) / arrivals
        done = np.asarray(metrics["served"]) + np.asarray(metrics["forwarded"])
        quality_loss = per_node((1.0 - np.asarray(metrics["quality"])) * done) / np.maximum(per_node(done), 1e-9)
        targets = np.array([cfg.objective.target(n.traffic_mix, n.slo_target) for n in cfg.cluster.nodes])
        weight = arrivals / arrivals.sum()
        violation = (np.maximum(missed - (1.0 - targets), 0.0) + np.maximum(dropped - cfg.objective.max_drop, 0.0)
                     + np.maximum(quality_loss - (1.0 - cfg.objective.min_quality), 0.0))
        score -= CONSTRAINT_PENALTY * float(np.sum(weight * violation))
    return score


def ppo_config(cfg: config_lib.ExperimentConfig) -> ppo.PPOConfig:
    p = cfg.ppo
    return ppo.PPOConfig(
        num_envs=cfg.env.num_clusters, rollout_steps=p.rollout_steps, num_minibatches=p.num_minibatches,
        update_epochs=p.update_epochs, total_updates=max(config_lib.num_updates(cfg), 1), hidden_sizes=tuple(p.hidden_sizes),
        anneal_lr=p.anneal_lr, normalize_obs=p.normalize_obs, obs_passthrough=len(DESCRIPTOR_FIELDS),
        action_masking=p.action_masking, frozen_trunk=p.frozen_trunk,
        frozen_normalizer=p.frozen_normalizer, num_costs=len(CONSTRAINTS) if cfg.objective.kind == "slo" else 0,
        dp_clip_norm=cfg.federated.segment_dp_clip_norm, dp_noise_multiplier=cfg.federated.segment_dp_noise_multiplier,
        dp_sampling_rate=cfg.federated.segment_dp_sampling_rate,
        dp_stats_clip_norm=cfg.federated.segment_dp_stats_clip_norm,
        dp_stats_noise_multiplier=cfg.federated.segment_dp_stats_noise_multiplier,
    )


def with_reward_weights(node_params: EnvParams, weights: RewardWeights | None) -> EnvParams:
    """Every node's reward weights set to `weights` (scalars, or traced in a sweep)."""
    if weights is None:
        return node_params
    shape = jnp.shape(node_params.reward.alpha)
    return node_params.replace(reward=jax.tree.map(lambda w: jnp.broadcast_to(jnp.asarray(w, jnp.float32), shape), weights))


def serving_metrics(tick_s: float) -> Callable[[dict], dict]:
    """The training log's KPIs from one step's info (means over the step's envs)."""

    def metrics(info):
        m = info["metrics"]
        return {
            "e2e_mean_s": m["e2e_mean_s"].mean(),
            "slo_attainment": m["slo_attainment"].mean(),
            "cost_usd_per_h": m["cost_usd"].mean() * 3600.0 / tick_s,
            "dropped_pct": 100.0 * m["dropped"].sum() / jnp.maximum(m["arrivals"].sum(), 1e-9),
            "forwarded_pct": 100.0 * m["forwarded"].sum() / jnp.maximum(m["arrivals"].sum(), 1e-9),
        }

    return metrics


def serving_costs(info, node_params: EnvParams, slo_target: float) -> jax.Array:
    """CONSTRAINTS' per-step costs, (nodes, clusters, 3): requests missing their SLO,
    requests dropped and quality lost (1 - quality per served request), each per mean tick
    of the node's demand (rate_ref x tick), so a rollout's mean is the request-weighted
    share and a busy tick weighs what it serves.
    A region whose own target differs from the run's `slo_target` (the limit of the
    multipliers' update) has its miss cost shifted by the difference: missed <= 1 - own
    target is missed + (own - run target) <= 1 - run target, and a constant shift leaves
    the policy gradient alone."""
    m = info["metrics"]
    attempted = m["served"] + m["forwarded"] + m["dropped"] + m["rejected"]  # rejects count as misses
    demand_ref = (node_params.rate_ref_rps * node_params.tick_s)[:, None]
    missed = (1.0 - m["slo_attainment"]) * attempted / demand_ref + (node_params.slo_target - slo_target)[:, None]
    quality_loss = (1.0 - m["quality"]) * (m["served"] + m["forwarded"]) / demand_ref
    return jnp.stack([missed, m["dropped"] / demand_ref, quality_loss], axis=-1)


def region_grid(cfg: config_lib.ExperimentConfig, node_params: EnvParams) -> ppo.EnvGrid | None:
    """The (regions, clusters) grid of the run's cluster env (env.kind "cluster"): the
    regions of each simulated cluster step together; None for independent regions."""
    if cfg.env.kind != "cluster":
        return None
    grid = cluster.RegionGrid(cluster.ServingCluster(cfg.env.action_set), cluster.cluster_links(cfg, node_params))
    return ppo.EnvGrid(grid.reset, grid.step)


def make_learner(cfg: config_lib.ExperimentConfig, node_params: EnvParams, env_grid: ppo.EnvGrid | None = None) -> ppo.Learner:
    """PPO on the serving env over a stack of node params, cfg.env.num_clusters each
    (constrained PPO under the "slo" objective); `env_grid` steps them (default: each
    node alone)."""
    return ppo.make_train(
        ServingNodeEnv(cfg.env.action_set), node_params, ppo_config(cfg), stacked=True,
        env_params_fn=with_reward_weights, metrics_fn=serving_metrics(cfg.env.tick_s),
        cost_fn=functools.partial(serving_costs, slo_target=cfg.objective.slo_target) if cfg.objective.kind == "slo" else None,
        env_grid=env_grid,
    )


def make_federated(
    cfg: config_lib.ExperimentConfig,
    node_params: EnvParams,
    attack_options: Sequence[str] | None = None,
    defence_options: Sequence[tuple] | None = None,
):
    """(init, train_chunk, learner) of federated or local-only PPO: one learner per node
    (in the cluster env, the nodes' envs step together)."""
    learner = make_learner(cfg, jax.tree.map(lambda x: x[:1], node_params))
    return fedppo.make_federated_train(learner, node_params, cfg.federated, attack_options, defence_options,
                                       coupled=region_grid(cfg, node_params))


def num_rounds(cfg: config_lib.ExperimentConfig) -> int:
    """Federated rounds of a run, in whole chunks."""
    per_chunk = config_lib.num_updates(cfg) // cfg.federated.local_updates // cfg.train.num_chunks
    return per_chunk * cfg.train.num_chunks


PRIVACY_UNITS = {
    "region": "one region: its parameter updates and observation statistics in every round",
    "segment": "one simulated cluster-day of a region's traffic (one of its env.num_clusters clusters over one episode)",
}


def privacy_report(cfg: config_lib.ExperimentConfig, units_done: int, episode_ticks: int | None = None) -> list[dict]:
    """The run's differential-privacy guarantees after `units_done` driver units (PPO
    updates, or rounds): one entry per unit with noise on, {unit, covers, mechanism,
    epsilon, delta, noise_multiplier, sampling_rate, steps, N}. Empty: no guarantee.
    `episode_ticks`: the training episodes' length (default: from the training params)."""
    from aro_jax.federated import privacy

    fed, out = cfg.federated, []
    if fed.mode == "federated" and fed.dp_clip_norm > 0 and fed.dp_noise_multiplier > 0:
        rate = fed.dp_node_sampling if fed.dp_mechanism == "central" else 1.0
        out.append({
            "unit": "region", "covers": PRIVACY_UNITS["region"] + (
                "; not each region's own personalised policy (personal_mix < 1), which is trained on its traffic and exported without region-level noise"
                if getattr(fed, "personal_mix", 1.0) < 1.0 else ""),
            "mechanism": f"{fed.dp_mechanism} Gaussian"
            + (" (DP-FedAvg, server-side)" if fed.dp_mechanism == "central" else " (each region noises its update)"),
            "epsilon": fedppo.privacy_spent(fed, units_done), "delta": fed.dp_delta,
            "noise_multiplier": fed.dp_noise_multiplier, "sampling_rate": rate, "steps": units_done, "N": len(cfg.cluster.nodes),
        })
    if fed.segment_dp_clip_norm > 0 and fed.segment_dp_noise_multiplier > 0:
        if episode_ticks is None:
            episode_ticks = int(np.max(cluster_params(cfg, "train").max_steps_in_episode))
        updates = units_done * (1 if fed.mode == "centralized" else fed.local_updates)
        p = cfg.ppo
        steps, sensitivity = privacy.segment_steps(updates, episode_ticks, p.rollout_steps, p.update_epochs, p.num_minibatches)
        rate = fed.segment_dp_sampling_rate or 1.0 / p.num_minibatches
        # With the normaliser on, every rollout of the day also releases its statistics.
        stats = ((fed.segment_dp_stats_noise_multiplier / sensitivity, steps // (p.update_epochs * p.num_minibatches))
                 if p.normalize_obs and not p.frozen_normalizer else None)
        out.append({
            "unit": "segment", "covers": PRIVACY_UNITS["segment"],
            "mechanism": "DP-SGD (per-segment clipping, Poisson-sampled segments" + (", private normaliser)" if stats else ")"),
            "epsilon": privacy.epsilon(fed.segment_dp_noise_multiplier / sensitivity, rate, steps, fed.dp_delta, also=stats),
            "delta": fed.dp_delta, "noise_multiplier": fed.segment_dp_noise_multiplier, "sampling_rate": rate, "steps": steps,
            "N": config_lib.segment_pool(cfg),
        })
    return out


def privacy_line(report: list[dict]) -> str:
    """One line for people: 'epsilon 3.2 at delta 1e-05 per segment (DP-SGD ...)' per unit."""
    if not report:
        return "no differential-privacy guarantee (no noise configured)"
    return "; ".join(f"epsilon {r['epsilon']:.3g} at delta {r['delta']:g} per {r['unit']} ({r['mechanism']})" for r in report)


class Trainer(NamedTuple):
    """A compiled learner seen by the driver: centralized PPO (unit = one PPO update) or
    federated/local PPO (unit = one round of K local updates per node)."""

    init: Callable  # (key, hp) -> state
    chunk: Callable  # (state, hp, units: static) -> (state, metrics per unit)
    units_total: int
    env_steps_per_unit: int
    units_done: Callable  # state -> int
    weights: Callable  # state -> PolicyWeights (leading node axis when per_node)
    per_node: bool  # one policy per node (local-only) instead of one shared policy
    network: Any


def make_trainer(cfg: config_lib.ExperimentConfig) -> Trainer:
    node_params = cluster_params(cfg, "train")
    nodes = len(cfg.cluster.nodes)
    steps_per_update = cfg.ppo.rollout_steps * cfg.env.num_clusters * nodes
    if cfg.federated.mode == "centralized":
        learner = make_learner(cfg, node_params, region_grid(cfg, node_params))
        return Trainer(
            init=learner.init, chunk=learner.train_chunk, units_total=config_lib.num_updates(cfg),
            env_steps_per_unit=steps_per_update, units_done=lambda s: int(s.update_step),
            weights=lambda s: learned_policy.PolicyWeights(s.params, s.obs_stats), per_node=False, network=learner.network,
        )
    init, chunk, learner = make_federated(cfg, node_params)
    per_node = cfg.federated.mode == "local" or (cfg.federated.mode == "federated" and cfg.federated.personal_mix < 1.0)
    return Trainer(
        init=init, chunk=chunk, units_total=num_rounds(cfg),
        env_steps_per_unit=steps_per_update * cfg.federated.local_updates, units_done=lambda s: int(s.round),
        weights=(lambda s: learned_policy.PolicyWeights(s.nodes.params, s.nodes.obs_stats)) if per_node
        else (lambda s: learned_policy.PolicyWeights(s.global_params if s.global_average is None else s.global_average, s.global_stats)),
        per_node=per_node, network=learner.network,
    )


def start_from(trainer: Trainer, state, weights: learned_policy.PolicyWeights):
    """`state` (from trainer.init) set to start from one shared policy and normaliser,
    another run's: a federation before a region joined, a policy to fine-tune. Every
    region's own copy under per-region learners and the global of a federation (which each
    round broadcasts, or pulls personal policies toward); the learner's under centralized
    PPO. Optimiser state and Lagrange multipliers start fresh."""
    if not isinstance(state, fedppo.FedState):
        return state.replace(params=weights.params, obs_stats=weights.obs_stats)
    state = state.replace(global_params=weights.params, global_stats=weights.obs_stats,
                          global_average=None if state.global_average is None else weights.params)
    if not trainer.per_node:
        return state
    regions = jax.tree.leaves(state.nodes.params)[0].shape[0]
    per_region = lambda x: jnp.broadcast_to(x, (regions,) + jnp.shape(x))  # noqa: E731
    return state.replace(nodes=state.nodes.replace(params=jax.tree.map(per_region, weights.params),
                                                   obs_stats=jax.tree.map(per_region, weights.obs_stats)))


def train_seeds(cfg: config_lib.ExperimentConfig, seeds: int, start: learned_policy.PolicyWeights | None = None):
    """Train seeds 0..seeds-1 of `cfg` in one vmapped program, with no logging; returns
    (trainer, final policy weights stacked over seeds). With `start` (weights stacked over
    the same seeds) seed s fine-tunes start's seed s (`start_from`). For benchmarks and
    studies."""
    trainer = make_trainer(cfg)
    hp = hyperparams(cfg)

    def one(key, start):
        state = trainer.init(key, hp)
        state = state if start is None else start_from(trainer, state, start)
        state, _ = trainer.chunk(state, hp, trainer.units_total)
        return trainer.weights(state)

    keys = jnp.stack([jax.random.PRNGKey(s) for s in range(seeds)])
    return trainer, jax.jit(jax.vmap(one))(keys, start)
