"""Constrained PPO (PPO-Lagrangian with PID multipliers): on a probe with a known optimum
the constrained learner settles on the constraint boundary where the unconstrained one
does not; multipliers stay finite and non-negative; a sweep over limits is one compiled
program; a checkpointed constrained state resumes bitwise; the serving objective "slo"
wires two request-weighted constraints."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import struct
from gymnax.environments import environment, spaces

from aro_jax.algorithms import ppo


@struct.dataclass
class BanditState(environment.EnvState):
    time: jax.Array


@struct.dataclass
class BanditParams(environment.EnvParams):
    max_steps_in_episode: int = 100


class RiskyBanditProbe(environment.Environment):
    """One-step episodes. Action 0 pays reward 1 and cost 1, action 1 pays nothing. With
    the mean cost limited to d, the best policy plays action 0 with probability exactly d:
    the optimum lies on the constraint boundary (an unconstrained learner plays it always)."""

    @property
    def num_actions(self) -> int:
        return 2

    @property
    def default_params(self) -> BanditParams:
        return BanditParams()

    def reset_env(self, key, params):
        return jnp.ones((1,)), BanditState(time=jnp.zeros((), jnp.int32))

    def step_env(self, key, state, action, params):
        risky = (action == 0).astype(jnp.float32)
        return jnp.ones((1,)), BanditState(time=state.time + 1), risky, jnp.array(True), {"cost": risky[None]}

    def observation_space(self, params):
        return spaces.Box(0.0, 2.0, (1,), jnp.float32)

    def action_space(self, params=None):
        return spaces.Discrete(2)


UPDATES = 300
LIMIT = 0.3


def bandit_learner(num_costs: int):
    config = ppo.PPOConfig(num_envs=64, rollout_steps=8, num_minibatches=4, update_epochs=4, total_updates=UPDATES,
                           hidden_sizes=(16,), anneal_lr=False, normalize_obs=False, num_costs=num_costs)
    cost_fn = (lambda info, params: info["cost"]) if num_costs else None
    return ppo.make_train(RiskyBanditProbe(), RiskyBanditProbe().default_params, config, cost_fn=cost_fn)


def hyperparams(limit=None):
    # A little entropy keeps both actions explored (a collapsed policy never sees the
    # risky action again), too little to move the boundary. At 0.003 the policy at limit
    # 0.5 collapsed to the safe action and cycled between 0 and 1 with its multiplier in
    # one of two float roundings of the same program (LLVM -O0 against -O2); at 0.01 both
    # settle on every boundary.
    return ppo.Hyperparams(lr=3e-3, ent_coef=0.01, gamma=0.5, cost_limits=None if limit is None else jnp.array([limit], jnp.float32))


def risky_share(metrics) -> np.ndarray:
    """Share of the risky action per update = the mean reward (and the mean cost)."""
    return np.asarray(metrics["reward"])


@pytest.fixture(scope="module")
def constrained_run():
    return jax.jit(bandit_learner(1).train)(jax.random.PRNGKey(0), hyperparams(LIMIT))


@pytest.mark.timeout(300)
def test_constrained_learner_settles_on_the_boundary_unconstrained_does_not(constrained_run):
    _, metrics = constrained_run
    _, free = jax.jit(bandit_learner(0).train)(jax.random.PRNGKey(0), hyperparams())
    tail = slice(-UPDATES // 4, None)  # the average iterate of the last quarter
    assert abs(risky_share(metrics)[tail].mean() - LIMIT) < 0.01
    np.testing.assert_allclose(np.asarray(metrics["cost_0"]), risky_share(metrics), atol=1e-6)
    assert risky_share(free)[tail].mean() > 0.95  # far past the limit: the constraint is what binds


@pytest.mark.timeout(300)
def test_multipliers_finite_non_negative_and_near_the_trade_off(constrained_run):
    state, metrics = constrained_run
    lam = np.asarray(metrics["multiplier_0"])
    assert np.isfinite(lam).all() and (lam >= 0).all()
    # At the boundary both actions must look alike: reward 1 - lambda x cost 1 = 0, so lambda -> 1.
    assert abs(lam[-UPDATES // 4:].mean() - 1.0) < 0.2
    assert float(state.constraint.multipliers[0]) == pytest.approx(float(lam[-1]))


@pytest.mark.timeout(300)
def test_sweep_over_limits_is_one_compilation():
    learner = bandit_learner(1)
    traces = []

    def train(key, hp):
        traces.append(1)
        return learner.train(key, hp)

    limits = jnp.array([[0.15], [0.5]], jnp.float32)
    hp = jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), (2,)), hyperparams()).replace(cost_limits=limits)
    _, metrics = jax.jit(jax.vmap(train))(jnp.stack([jax.random.PRNGKey(0)] * 2), hp)
    assert len(traces) == 1
    share = risky_share(metrics)[:, -UPDATES // 4:].mean(1)
    np.testing.assert_allclose(share, [0.15, 0.5], atol=0.03)


@pytest.mark.timeout(300)
def test_constrained_state_resumes_bitwise_after_a_checkpoint(tmp_path):
    learner = bandit_learner(1)
    hp = hyperparams(LIMIT)
    chunk = jax.jit(learner.train_chunk, static_argnums=2)
    start = jax.jit(learner.init)(jax.random.PRNGKey(3), hp)
    half, _ = chunk(start, hp, 20)
    straight, _ = chunk(half, hp, 20)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "state", half)
    ckptr.wait_until_finished()
    restored = ckptr.restore(tmp_path / "state", jax.eval_shape(lambda: half))
    resumed, _ = chunk(restored, hp, 20)
    assert float(half.constraint.multipliers[0]) > 0  # the multiplier is live state, not zero
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_constrained_ppo_needs_costs_and_a_cost_fn():
    with pytest.raises(ValueError, match="num_costs"):
        ppo.make_train(RiskyBanditProbe(), RiskyBanditProbe().default_params, ppo.PPOConfig(num_costs=1))


@pytest.mark.timeout(300)
def test_slo_objective_wires_request_weighted_constraints():
    from aro_jax.config import load_config
    from aro_jax.envs.scenarios import cluster_params
    from aro_jax.training import trainers

    cfg = load_config(None, ["cluster.nodes=[{name: node-0}]", "federated.mode=centralized", "objective.kind=slo",
                             "objective.slo_target=0.95", "objective.slo_margin=0.01", "objective.max_drop=0.02", "objective.drop_margin=0.005", "env.num_clusters=2",
                             "ppo.rollout_steps=8", "ppo.num_minibatches=2", "train.total_env_steps=32", "train.num_chunks=1"])
    hp = trainers.hyperparams(cfg)
    np.testing.assert_allclose(np.asarray(hp.cost_limits), [0.04, 0.015, 0.02], rtol=1e-5)  # 1 - (target + margin), max_drop - margin
    assert (hp.env.alpha, hp.env.beta, hp.env.slo_penalty) == (0.0, 0.0, 0.0)  # only cost and quality loss remain
    learner = trainers.make_learner(cfg, cluster_params(cfg, "train"))
    state, metrics = jax.jit(learner.train)(jax.random.PRNGKey(0), hp)
    assert state.constraint.multipliers.shape == (3,)
    # Missed share: the KPI's drops-count-as-misses attainment, weighted by demand.
    assert 0.0 <= float(metrics["cost_0"][-1]) <= 1.5 and 0.0 <= float(metrics["cost_1"][-1]) <= float(metrics["cost_0"][-1]) + 1e-6


@pytest.mark.timeout(300)
def test_federated_run_logs_each_regions_constraints(tmp_path):
    """A mean over regions hides the region that violates its constraint: the log keeps
    each region's cost and multiplier, and they are the regions' own learner state."""
    from aro_jax.config import load_config
    from aro_jax.training import driver

    cfg = load_config(None, ["cluster.nodes=[{name: chat}, {name: code, traffic_mix: code}]", "federated.mode=local",
                             "env.num_clusters=1", "ppo.rollout_steps=8", "ppo.num_minibatches=2", "federated.local_updates=1",
                             "train.total_env_steps=48", "train.num_chunks=1"])
    state, _ = driver.train(cfg, tmp_path / "run", quiet=True)
    record = driver.read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]  # one unit per quarter chunk: the last round
    multipliers = np.asarray(state.nodes.constraint.multipliers)  # (regions, constraints)
    for i in range(3):
        np.testing.assert_allclose(record[f"multiplier_{i}_by_region"], multipliers[:, i], rtol=1e-6)
        assert record[f"multiplier_{i}"] == pytest.approx(float(multipliers[:, i].mean()), rel=1e-6)
        assert record[f"cost_{i}"] == pytest.approx(float(np.mean(record[f"cost_{i}_by_region"])), rel=1e-5, abs=1e-7)
    # The regions' own targets shift their miss costs apart (code 0.6 against the run's 0.9).
    assert record["cost_0_by_region"][0] != record["cost_0_by_region"][1]


def test_margins_tighten_the_training_limits_only():
    """The margins move the attainment and drop constraints' limits (training aims inside
    the bounds); the per-region shift of the miss cost, and so what evaluation judges,
    stays the target."""
    from aro_jax.config import load_config
    from aro_jax.envs.scenarios import cluster_params
    from aro_jax.training import trainers

    base = ["objective.kind=slo", "objective.slo_targets={code: 0.6}", "objective.max_drop=0.01"]
    plain, margin = (load_config(None, base + [f"objective.slo_margin={m}", f"objective.drop_margin={d}"]) for m, d in ((0, 0), (0.03, 0.004)))
    np.testing.assert_allclose(np.asarray(trainers.hyperparams(plain).cost_limits), [0.1, 0.01, 0.02], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(trainers.hyperparams(margin).cost_limits), [0.07, 0.006, 0.02], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(cluster_params(plain).slo_target), np.asarray(cluster_params(margin).slo_target))
    # Evaluation judges the bound: 0.8 % dropped (over the 0.6 % training limit) costs no score.
    n = len(plain.cluster.nodes)
    full = lambda x: np.full((n, 1, 1), x, np.float32)  # noqa: E731
    metrics = {"reward": full(0.0), "arrivals": full(100.0), "served": full(99.2), "forwarded": full(0.0), "dropped": full(0.8),
               "rejected": full(0.0), "slo_attainment": full(1.0), "quality": full(1.0)}
    assert trainers.eval_score(plain, metrics) == trainers.eval_score(margin, metrics) == 0.0


def test_a_deployments_own_target_wins_over_its_workloads():
    """A node's slo_target sets that region's target over its traffic mix's, in the env
    params training and evaluation read (the main job's 7B code regions); one out of (0, 1)
    is one error naming the node."""
    from aro_jax.config import ConfigError, load_config
    from aro_jax.envs.scenarios import cluster_params

    cfg = load_config(None, ["objective.kind=slo"])
    want = [0.75 if n.name in ("eu-central", "me-central") else 0.6 if n.traffic_mix == "code" else 0.9 for n in cfg.cluster.nodes]
    assert sorted(set(want)) == [0.6, 0.75, 0.9]
    np.testing.assert_allclose(np.asarray(cluster_params(cfg).slo_target), want, rtol=1e-6)
    from aro_jax.envs.cluster import DEFAULT_CLUSTER_FILE, file_cluster_params
    np.testing.assert_allclose(np.asarray(file_cluster_params(DEFAULT_CLUSTER_FILE).nodes.slo_target)[[3, 9]], [0.75, 0.75], rtol=1e-6)
    with pytest.raises(ConfigError, match=r"config key 'cluster.nodes.3.slo_target': must be a share in \(0, 1\)"):
        load_config(None, ["cluster.nodes.3.slo_target=1.5"])
