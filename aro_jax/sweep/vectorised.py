"""One compiled program over the points x seeds of a sweep: `jit(vmap(train))` over stacked
Hyperparams and keys, then each run's greedy policy on one compiled evaluation harness."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from aro_jax.config import ExperimentConfig
from aro_jax.envs.params import RewardWeights
from aro_jax.envs.scenarios import cluster_params, scenario_plan
from aro_jax.training import learned_policy, trainers
from aro_jax.training.evaluation import cluster_kpis, eval_env, run_episodes


class SweepTrainer:
    """One compiled program training P points x S seeds: `jit(vmap(train))` over stacked
    Hyperparams and keys. `traces` counts how often the Python train function was traced
    (compiled); calls with the same number of runs reuse the program."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.learner = trainers.make_learner(cfg, cluster_params(cfg, "train"))
        self.traces = 0

        def traced_train(key, hp):
            self.traces += 1
            return self.learner.train(key, hp)

        self._train = jax.jit(jax.vmap(traced_train))
        self._policy = learned_policy.greedy_policy(self.learner.network, cfg.ppo.normalize_obs, cfg.ppo.action_masking)
        # A trace scenario runs for the trace's own length, the others for the configured day.
        self._eval_params, self._eval_ticks, _ = scenario_plan(cfg, cfg.eval.scenario)

    def hyperparams(self, points: list[dict[str, float]], seeds: int):
        """Stack Hyperparams for every (point, seed) pair, point-major: leaves of shape (P*S,).
        A point names PPO values and reward weights by their field names (SWEEPABLE)."""
        base = trainers.hyperparams(self.cfg)
        rows = [p for p in points for _ in range(seeds)]
        stack = lambda obj, name: jnp.asarray([r.get(name, getattr(obj, name)) for r in rows], jnp.float32)  # noqa: E731
        ppo_values = {f.name: stack(base, f.name) for f in dataclasses.fields(base) if f.name not in ("env", "cost_limits")}
        weights = RewardWeights(**{f.name: stack(base.env, f.name) for f in dataclasses.fields(RewardWeights)})
        limits = None
        if base.cost_limits is not None:  # the "slo" objective: targets per row -> (runs, constraints)
            o = self.cfg.objective
            limits = jax.vmap(trainers.cost_limits)(stack(o, "slo_target") + o.slo_margin, stack(o, "max_drop") - o.drop_margin, stack(o, "min_quality"))
        return base.replace(**ppo_values, env=weights, cost_limits=limits)

    def train(self, points: list[dict[str, float]], seeds: int, seed: int = 0):
        """Train every point with seeds `seed..`: the same S keys for every point (common
        random numbers). Returns (final states, metrics), leading axis P*S."""
        keys = jax.random.split(jax.random.PRNGKey(seed), seeds)
        keys = jnp.tile(keys, (len(points), 1))
        states, metrics = self._train(keys, self.hyperparams(points, seeds))
        jax.block_until_ready(states.params)
        return states, metrics

    def evaluate(self, states, hps, seed: int = 0) -> list[dict[str, float]]:
        """Cluster KPIs of each run's greedy policy on the eval scenario, under that run's
        reward weights; one compiled harness for all runs."""
        rows = []
        runs = jax.tree.leaves(hps)[0].shape[0]
        for i in range(runs):
            pick = lambda x: x[i]  # noqa: E731
            hp = jax.tree.map(pick, hps)
            weights = learned_policy.PolicyWeights(jax.tree.map(pick, states.params), jax.tree.map(pick, states.obs_stats))
            env, params = eval_env(self.cfg, trainers.with_reward_weights(self._eval_params, hp.env))
            metrics = run_episodes(
                env, self._policy, params, jax.random.PRNGKey(seed),
                self.cfg.eval.num_seeds, self._eval_ticks, weights, False)
            rows.append(cluster_kpis(metrics, self.cfg.env.tick_s, self._eval_params))
        return rows


def mean_over_seeds(rows: list[dict[str, float]], points: int, seeds: int) -> list[dict[str, float]]:
    """Per point: the mean of each KPI over its seeds, and its std as `<kpi>_std`."""
    out = []
    for p in range(points):
        group = rows[p * seeds:(p + 1) * seeds]
        out.append({k: float(np.mean([r[k] for r in group])) for k in group[0]} | {
            f"{k}_std": float(np.std([r[k] for r in group])) for k in group[0]})
    return out
