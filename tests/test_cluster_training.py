"""Learning inside the cluster env (env.kind: cluster): each region's learner sees only its
own row of the coupled grid; centralized, local and federated runs train, checkpoint,
resume bit for bit and are evaluated in the same coupled env, where forwarded work is
served (and paid for) by the peers."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aro_jax.algorithms import ppo
from aro_jax.config import load_config
from aro_jax.envs import cluster
from aro_jax.envs.scenarios import cluster_params
from aro_jax.envs.serving import REBALANCE
from aro_jax.federated import fedppo
from aro_jax.training import driver, evaluation, trainers

TINY = Path(__file__).parent / "workers" / "tiny5.yaml"


def flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0], np.float64)


def test_each_region_learns_only_from_its_own_row():
    """Local mode, one round of one update: noise added to region 2's rewards (only what
    its learner is told, not the env) changes region 2's parameters and no other region's,
    bit for bit. A learner that pooled the regions' data (shared advantages, statistics or
    batches) would move every region."""
    cfg = load_config(TINY, ["env.kind=cluster", "federated.mode=local", "federated.local_updates=1"])
    node_params = cluster_params(cfg, "train")
    learner = trainers.make_learner(cfg, jax.tree.map(lambda x: x[:1], node_params))
    grid = trainers.region_grid(cfg, node_params)

    def noisy_step(keys, state, action, params):
        obs, state, reward, *rest = grid.step(keys, state, action, params)
        noise = 3.0 * jax.random.normal(jax.random.fold_in(keys[0, 0], 7), reward.shape[1:])
        return (obs, state, reward.at[2].add(noise), *rest)

    hp = trainers.hyperparams(cfg)
    ends = []
    for g in (grid, ppo.EnvGrid(grid.reset, noisy_step)):
        init, chunk, _ = fedppo.make_federated_train(learner, node_params, cfg.federated, coupled=g)
        state = jax.jit(lambda k: chunk(init(k, hp), hp, 1)[0])(jax.random.PRNGKey(0))
        ends.append(state.nodes.params)
    moved = [np.abs(flat(jax.tree.map(lambda x: x[i], ends[0])) - flat(jax.tree.map(lambda x: x[i], ends[1]))).max() for i in range(5)]
    assert moved[2] > 1e-4, moved
    assert all(m < 1e-8 for i, m in enumerate(moved) if i != 2), moved


def test_each_local_rollout_acts_with_the_latest_update():
    """Local mode in the cluster env: one round of two local updates equals two rounds of
    one (nothing happens between local-mode rounds), so the second rollout acts with the
    parameters and normaliser the first update left, as single-region PPO does. A round
    whose rollouts all acted with its starting policy would end elsewhere."""
    ends = []
    for local_updates, rounds in ((2, 1), (1, 2)):
        cfg = load_config(TINY, ["env.kind=cluster", "federated.mode=local", f"federated.local_updates={local_updates}"])
        node_params = cluster_params(cfg, "train")
        init, chunk, _ = trainers.make_federated(cfg, node_params)
        hp = trainers.hyperparams(cfg)
        state = jax.jit(lambda k: chunk(init(k, hp), hp, rounds)[0])(jax.random.PRNGKey(0))
        ends.append((flat(state.nodes.params), flat(state.nodes.obs_stats)))
    np.testing.assert_allclose(ends[0][0], ends[1][0], atol=1e-5)
    np.testing.assert_allclose(ends[0][1], ends[1][1], rtol=1e-5, atol=1e-6)


def test_coupled_grid_steps_every_region_of_a_cluster_together():
    """The grid layout round-trips, and a grid step is the cluster env's step of each
    cluster (region axis first): rewards, observations and the routed work agree (to float32
    rounding: the grid computes resets apart from the step)."""
    cfg = load_config(TINY, ["env.kind=cluster"])
    node_params = cluster_params(cfg, "train")
    env = cluster.ServingCluster()
    links = cluster.cluster_links(cfg, node_params)
    grid = cluster.RegionGrid(env, links)
    keys = jax.random.split(jax.random.PRNGKey(3), 5 * 2).reshape(5, 2, -1)
    obs, state = grid.reset(keys, node_params)
    assert obs.shape == (5, 2, cluster.POLICY_INPUT_DIM) and state.time.shape == (5, 2)
    action = jnp.full((5, 2), REBALANCE)
    obs1, state1, reward, *_, info = grid.step(keys, state, action, node_params)
    direct = jax.vmap(env.step, in_axes=(0, 0, 0, None))(keys[0], grid.from_grid(state), action.T, links)
    np.testing.assert_allclose(np.asarray(reward), np.asarray(direct[2]).T, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(obs1), np.swapaxes(np.asarray(direct[0])[..., :-1], 0, 1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(info["metrics"]["served_for_peers"]), np.asarray(direct[5]["metrics"]["served_for_peers"]).T, rtol=1e-5)
    assert float(info["metrics"]["served_for_peers"].sum()) > 0  # forwarded work landed on peers
    back = grid.from_grid(grid.to_grid(grid.from_grid(state1), 5))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(grid.from_grid(state1))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", ["centralized", "federated"])
def test_cluster_run_resumes_bit_for_bit_and_evaluates_in_the_cluster(mode, tmp_path):
    """A run in the cluster env, in 2 chunks; stopped after chunk 1 and resumed, it ends in
    the same state bit for bit (the coupled envs' states included). Its evaluation runs
    in the cluster env, where the episode's requests are conserved across the regions
    (served, served for peers, dropped, rejected, still queued or in flight), and the KPI
    tables carry the work served for peers."""
    cfg = load_config(TINY, ["env.kind=cluster", f"federated.mode={mode}", "objective.kind=slo", "eval.num_seeds=2"])
    run_a = tmp_path / "a"
    state_a, _ = driver.train(cfg, run_a, quiet=True)
    run_b = tmp_path / "b"
    shutil.copytree(run_a, run_b)
    latest = max(int(p.name) for p in (run_b / "checkpoints").iterdir() if p.name.isdigit())
    shutil.rmtree(run_b / "checkpoints" / str(latest))
    lines = (run_b / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_b / "metrics.jsonl").write_text(lines[0])
    state_b, _ = driver.train(None, run_b, resume=True, quiet=True)
    key_data = lambda x: np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)  # noqa: E731
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(key_data(x), key_data(y))

    trainer = trainers.make_trainer(cfg)
    from aro_jax.envs.heuristics import HEURISTICS
    from aro_jax.training import learned_policy

    policy = learned_policy.greedy_policy(trainer.network)
    params = cluster_params(cfg, "diurnal")
    env, eparams = evaluation.eval_env(cfg, params)
    assert isinstance(env, cluster.ServingCluster)
    m = evaluation.run_episodes(env, policy, eparams, jax.random.PRNGKey(0), 2, 96, trainer.weights(state_a), trainer.per_node)
    assert np.shape(m["served"]) == (5, 2, 96)
    total = lambda k: np.asarray(m[k], np.float64).sum(axis=(0, 2))  # per seed  # noqa: E731
    left = np.asarray(m["queue_requests"], np.float64)[:, :, -1].sum(0) + np.asarray(m["in_flight"], np.float64)[:, :, -1].sum(0)
    out = total("served") + total("served_for_peers") + total("dropped") + total("rejected") + left
    np.testing.assert_allclose(out, total("arrivals"), rtol=1e-4)
    rows = evaluation.evaluate_policies(cfg, {"reactive": (HEURISTICS["reactive"](cfg.env.tick_s), None, False)}, "diurnal",
                                        tmp_path / "eval", num_ticks=96)
    assert rows["reactive"]["forwarded_pct"] == 0.0 and rows["reactive"]["served_for_peers_rps"] == 0.0


_TWO_DEVICES = textwrap.dedent("""
    import sys, jax, numpy as np
    from jax.flatten_util import ravel_pytree
    from aro_jax.config import load_config
    from aro_jax.envs.scenarios import cluster_params
    from aro_jax.federated import fedppo
    from aro_jax.training import trainers
    assert len(jax.devices()) == 2
    ends = []
    for devices, split in ((1, "clusters"), (2, "clusters"), (2, "regions")):
        cfg = load_config(sys.argv[1], ["env.kind=cluster", f"federated.devices={devices}", "federated.local_updates=1"])
        node_params = cluster_params(cfg, "train")
        learner = trainers.make_learner(cfg, jax.tree.map(lambda x: x[:1], node_params))
        init, chunk, _ = fedppo.make_federated_train(learner, node_params, cfg.federated, coupled=trainers.region_grid(cfg, node_params),
                                                     coupled_split=split)
        hp = trainers.hyperparams(cfg)
        end = jax.jit(lambda k: chunk(init(k, hp), hp, 1)[0])(jax.random.PRNGKey(0))
        ends.append(np.asarray(ravel_pytree(end.nodes.params)[0]))
    assert np.abs(ends[0] - ends[1]).max() < 1e-4 and np.abs(ends[0] - ends[2]).max() < 1e-4, [np.abs(ends[0] - e).max() for e in ends]
    print("EQUAL")
""")


@pytest.mark.timeout(600)
def test_one_and_two_devices_train_the_same_in_the_cluster():
    """Federated PPO in the cluster env, one round, on 1 device and on 2 fake CPU devices
    (clusters split; regions split): the same parameters to float rounding."""
    flags = f"--xla_force_host_platform_device_count=2 {os.environ['XLA_FLAGS']}"  # conftest's flags
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES, str(TINY.with_name("cluster4.yaml"))], env=env, capture_output=True, text=True, timeout=550)
    assert proc.returncode == 0 and "EQUAL" in proc.stdout, proc.stderr[-3000:]


def test_no_negative_flows_under_random_actions_on_the_default_cluster():
    """The ten-region default cluster, 16 clusters, random actions for 64 ticks through the
    trainer's grid: no region forwards, receives or serves for peers a negative amount.
    (Conservation alone cannot catch this: a negative flow is subtracted at both ends.
    A routing round once met a peer's room rounded a hair below zero and sent -2.5k
    requests back at tick 52 of this rollout.)"""
    cfg = load_config(None, [])
    node_params = cluster_params(cfg, "train")
    grid = trainers.region_grid(cfg, node_params)
    learner = trainers.make_learner(cfg, jax.tree.map(lambda x: x[:1], node_params))
    hp = trainers.hyperparams(cfg)
    effective = jax.tree.map(lambda x: x[:, 0], jax.vmap(learner.env_params, in_axes=(0, None))(jax.tree.map(lambda x: x[:, None], node_params), hp))
    obs, state = grid.reset(jax.random.split(jax.random.PRNGKey(0), 160).reshape(10, 16, -1), effective)

    @jax.jit
    def run(state):
        def step(s, k):
            k_a, k_s = jax.random.split(k)
            a = jax.random.randint(k_a, (10, 16), 0, 11)
            _, s, *_, info = grid.step(jax.random.split(k_s, 160).reshape(10, 16, -1), s, a, effective)
            m = info["metrics"]
            return s, (m["forwarded"], m["received"], m["served_for_peers"], m["served"])
        return jax.lax.scan(step, state, jax.random.split(jax.random.PRNGKey(1), 64))[1]

    for name, x in zip(("forwarded", "received", "served_for_peers", "served"), run(state)):
        assert float(np.min(np.asarray(x))) >= -1e-3, name


@pytest.mark.parametrize("mode", ["federated", "local", "centralized"])
def test_a_run_starts_from_another_runs_policy(mode):
    """trainers.start_from: a fresh state set to start from one shared policy (a federation
    a region joins, a fine-tune) deploys exactly that policy before training, and one round
    later is still near it and far from the fresh initialisation. Under the shared
    federation the global is what every round broadcasts: setting only the nodes' copies
    would be overwritten in the first round and fail the second check."""
    cfg = load_config(TINY, ["env.kind=cluster", f"federated.mode={mode}", "federated.personal_mix=1.0", "federated.local_updates=1"])
    trainer = trainers.make_trainer(cfg)
    hp = trainers.hyperparams(cfg)
    fresh = trainer.init(jax.random.PRNGKey(0), hp)
    source = trainer.weights(trainer.init(jax.random.PRNGKey(1), hp))
    if trainer.per_node:
        source = jax.tree.map(lambda x: x[3], source)
    source = source.replace(obs_stats=source.obs_stats.replace(mean=source.obs_stats.mean + 0.5))
    region = lambda x, i: x[i] if trainer.per_node else x  # noqa: E731
    one = lambda w, i=0: flat(jax.tree.map(lambda x: region(x, i), w.params))  # noqa: E731
    started = trainers.start_from(trainer, fresh, source)
    for i in range(5):
        np.testing.assert_array_equal(one(trainer.weights(started), i), flat(source.params))
        np.testing.assert_array_equal(region(trainer.weights(started).obs_stats.mean, i), source.obs_stats.mean)
    trained, _ = jax.jit(lambda s: trainer.chunk(s, hp, 1))(started)
    after = one(trainer.weights(trained))
    to_source = np.linalg.norm(after - flat(source.params))
    to_fresh = np.linalg.norm(after - one(trainer.weights(fresh)))
    assert to_source < 0.2 * to_fresh, (to_source, to_fresh)


def test_train_seeds_fine_tunes_each_seed_from_its_own_start():
    """trainers.train_seeds(cfg, seeds, start): seed s starts from start's seed s (a public
    pretraining fine-tuned per seed), so after a short run it is near its own start, not
    the other seed's and not seed s's own fresh initialisation (where a run that ignored
    `start` would begin, and after so short a run still be)."""
    cfg = load_config(TINY, ["env.kind=cluster", "federated.mode=federated", "federated.personal_mix=1.0", "federated.local_updates=1"])
    trainer = trainers.make_trainer(cfg)
    hp = trainers.hyperparams(cfg)
    init_weights = jax.vmap(lambda k: trainer.weights(trainer.init(k, hp)))
    starts = init_weights(jnp.stack([jax.random.PRNGKey(10), jax.random.PRNGKey(11)]))
    fresh = init_weights(jnp.stack([jax.random.PRNGKey(0), jax.random.PRNGKey(1)]))  # train_seeds' own keys
    one = lambda w, s: flat(jax.tree.map(lambda x: x[s], w.params))  # noqa: E731
    _, tuned = trainers.train_seeds(cfg, 2, starts)
    for s in (0, 1):
        to_start = np.linalg.norm(one(tuned, s) - one(starts, s))
        assert to_start < 0.2 * np.linalg.norm(one(tuned, s) - one(starts, 1 - s)), s
        assert to_start < 0.2 * np.linalg.norm(one(tuned, s) - one(fresh, s)), s
