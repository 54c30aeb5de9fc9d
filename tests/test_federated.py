"""Federated PPO: the node axis on 1 device, on 4 devices and across 2 processes gives the
same training; Byzantine faults (NaN, huge finite updates, lying normaliser statistics)
never reach the global parameters or the shared normaliser; the round's DP clipping and
noise, server momentum and pre-aggregators do what the config says; local-only equals
independent single-node runs; a resumed federated run equals the uninterrupted one."""

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aro_jax.training import trainers
from aro_jax.config import load_config, num_updates
from aro_jax.envs.scenarios import cluster_params
from aro_jax.federated import aggregators, fedppo

WORKERS = Path(__file__).parent / "workers"
CLUSTER = WORKERS / "cluster4.yaml"
# Sharding reorders float reductions (e.g. the coordinate-wise median's inputs arrive
# gathered from devices): agreement is to float32 rounding, not bitwise.
ATOL = 1e-5


def _run_worker(out, devices, *extra, timeout=400):
    cmd = [sys.executable, str(WORKERS / "fed_worker.py"), str(out), str(devices), *map(str, extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=400):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_device_equals_four_devices_and_two_processes(tmp_path):
    _finish(_run_worker(tmp_path / "one.npy", 1))
    _finish(_run_worker(tmp_path / "four.npy", 4))
    port = _free_port()
    procs = [_run_worker(tmp_path / "dist.npy", 2, pid, 2, port) for pid in (0, 1)]
    for p in procs:
        _finish(p)
    one, four, dist = (np.load(tmp_path / f) for f in ("one.npy", "four.npy", "dist.npy"))
    assert np.isfinite(one).all() and np.abs(one).max() > 0
    np.testing.assert_allclose(four, one, atol=ATOL)
    np.testing.assert_allclose(dist, one, atol=ATOL)


def _train(overrides):
    cfg = load_config(CLUSTER, overrides)
    init, chunk, _ = trainers.make_federated(cfg, cluster_params(cfg, "train"))
    hp = trainers.hyperparams(cfg)
    state0 = jax.jit(init)(jax.random.PRNGKey(0), hp)
    state, metrics = jax.jit(chunk, static_argnums=2)(state0, hp, trainers.num_rounds(cfg))
    return state0, state, metrics


@pytest.mark.parametrize("configured, defence", [
    (["federated.aggregator=median"], 1),
    (["federated.aggregator=trimmed_mean", "federated.pre_aggregators=[nnm]"], 3),  # a defence's own pre-aggregators
])
def test_threat_picked_at_run_time_equals_the_configured_program(configured, defence):
    # One program over several attacks and defences, its threat set at run time, trains
    # exactly like the program built for that single attack and defence from the config.
    byz = ["federated.attack=sign_flip", "federated.byzantine_nodes=[1]", "federated.attack_strength=3.0"]
    _, expected, _ = _train([*byz, *configured, "federated.num_byzantine=1"])

    cfg = load_config(CLUSTER, ["federated.aggregator=mean"])
    attack_names = ["none", "nan", "sign_flip"]
    defences = [("mean", 0), ("median", 1), ("trimmed_mean", 1), ("trimmed_mean", 1, ("nnm",))]
    init, chunk, _ = trainers.make_federated(cfg, cluster_params(cfg, "train"), attack_names, defences)
    hp = trainers.hyperparams(cfg)
    state = jax.jit(init)(jax.random.PRNGKey(0), hp)
    threat = fedppo.Threat(attack=jnp.int32(2), strength=jnp.float32(3.0),
                           byzantine=jnp.arange(4) == 1, defence=jnp.int32(defence))
    state, _ = jax.jit(chunk, static_argnums=2)(state.replace(threat=threat), hp, trainers.num_rounds(cfg))
    got = jax.flatten_util.ravel_pytree(state.global_params)[0]
    want = jax.flatten_util.ravel_pytree(expected.global_params)[0]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_unsatisfiable_defence_option_is_refused():
    cfg = load_config(CLUSTER, [])
    with pytest.raises(ValueError, match="krum"):
        trainers.make_federated(cfg, cluster_params(cfg, "train"), None, [("median", 1), ("krum", 1)])


# --- one small program for the threat tests -----------------------------------------------
# tests/workers/tiny5.yaml: five nodes (Krum tolerates f = 1), two clusters each, a 16-unit
# network: one round is 2 local updates x 8 steps x 2 clusters per node. Attacks and
# defences are picked at run time from one compiled program (FedState.threat), so these
# tests compile it once.

N_NODES = 5
ATTACK_OPTIONS = ["none", "nan", "huge", "normaliser_poisoning"]
DEFENCES = [("mean", 0), ("median", 1), ("krum", 1), ("krum", 0)]


@pytest.fixture(scope="module")
def tiny_config():
    return WORKERS / "tiny5.yaml"


def flat(params):
    return np.asarray(jax.flatten_util.ravel_pytree(params)[0], np.float64)


def flat_nodes(params):
    """(nodes, n_params) of a node-stacked parameter tree."""
    return np.asarray(jax.vmap(lambda p: jax.flatten_util.ravel_pytree(p)[0])(params), np.float64)


@pytest.fixture(scope="module")
def threat_program(tiny_config):
    """run(attack, (aggregator, f), byzantine, strength) -> (state0, state after one round,
    metrics), all from one compiled program."""
    cfg = load_config(tiny_config)
    init, chunk, _ = trainers.make_federated(cfg, cluster_params(cfg, "train"), ATTACK_OPTIONS, DEFENCES)
    hp = trainers.hyperparams(cfg)
    state0 = jax.jit(init)(jax.random.PRNGKey(0), hp)
    one_round = jax.jit(lambda s: chunk(s, hp, 1))

    def run(attack, defence, byzantine=(0,), strength=1.0):
        threat = fedppo.Threat(
            attack=jnp.int32(ATTACK_OPTIONS.index(attack)), strength=jnp.float32(strength),
            byzantine=jnp.isin(jnp.arange(N_NODES), jnp.asarray(byzantine)), defence=jnp.int32(DEFENCES.index(defence)),
        )
        state, metrics = one_round(state0.replace(threat=threat))
        return state0, state, jax.tree.map(np.asarray, metrics)

    return run


@pytest.mark.timeout(300)
def test_nan_node_never_reaches_global_parameters(threat_program):
    # Median with f = 1 masks the NaN node and applies the round; Krum with f = 0 cannot
    # tolerate it, so the round is skipped rather than poisoned.
    for defence, applied in ((("median", 1), True), (("krum", 0), False)):
        state0, state, metrics = threat_program("nan", defence, byzantine=(2,))
        g = flat(state.global_params)
        assert np.isfinite(g).all() and np.all(metrics["num_invalid"] == 1)
        assert (not np.allclose(g, flat(state0.global_params))) == applied, defence
        assert np.all(metrics["skipped"] == (0 if applied else 1))
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.global_stats))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("defence", [("krum", 1), ("krum", 0), ("median", 1)])
def test_huge_update_from_node_zero_never_reaches_global_parameters(threat_program, defence):
    """Node 0 sends 1e30 in every coordinate. Krum (even with f = 0: every honest row has
    enough honest neighbours) and the median apply an honest-sized step, not skipped;
    FedAvg applies the 1e30 update (the contrast)."""
    state0, clean, _ = threat_program("none", defence)
    _, state, metrics = threat_program("huge", defence)
    g0 = flat(state0.global_params)
    honest_step = np.abs(flat(clean.global_params) - g0).max()
    step = np.abs(flat(state.global_params) - g0).max()
    assert np.all(metrics["skipped"] == 0) and step <= 10 * honest_step, (step, honest_step)
    _, fedavg, _ = threat_program("huge", ("mean", 0))
    assert np.abs(flat(fedavg.global_params) - g0).max() > 1e28


def normalised_shift(stats, clean):
    """How far the clean normaliser's mean sits from `stats`'s, in `stats`'s stds, and the
    ratio of their variances: what a node's normalised observations would see."""
    mean, var = np.asarray(stats.mean, np.float64), np.asarray(stats.var, np.float64)
    clean_mean, clean_var = np.asarray(clean.mean, np.float64), np.asarray(clean.var, np.float64)
    return np.abs(mean - clean_mean) / np.sqrt(clean_var + 1e-8), (var + 1e-8) / (clean_var + 1e-8)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strength", [1e3, -1e3])
def test_lying_node_cannot_move_the_normaliser(threat_program, strength):
    """Node 0 reports its observations' mean 1000 pooled stds away and a variance 1e6
    times too large. The bound is what the robust pooling guarantees, expressed against the
    no-attack normaliser of the same round (n = 5 equally weighted nodes, pooled mean m and
    variance v): every honest node's mean is within sqrt(n v) of m (its squared distance
    is at most n times the between-node variance), and the robust mean stays inside the
    honest means, so it moves by at most sqrt(n) clean stds; the robust variance is at
    most the largest honest variance (<= n v) plus the squared range of the honest means
    (<= 4 n v): at most 5 n times v. The plain merge (what every defence did before:
    FedAvg's pooling) moves the mean by hundreds of stds and the variance ~1e5-fold."""
    _, clean, _ = threat_program("none", ("median", 1))
    for defence in (("median", 1), ("krum", 1)):
        _, state, metrics = threat_program("normaliser_poisoning", defence, strength=strength)
        shift, ratio = normalised_shift(state.global_stats, clean.global_stats)
        assert np.all(metrics["stats_skipped"] == 0)
        assert shift.max() <= np.sqrt(N_NODES) and ratio.max() <= 5 * N_NODES, (defence, shift.max(), ratio.max())
    _, plain, _ = threat_program("normaliser_poisoning", ("mean", 0), strength=strength)
    _, plain_clean, _ = threat_program("none", ("mean", 0))
    shift, ratio = normalised_shift(plain.global_stats, plain_clean.global_stats)
    assert shift.max() > 100 and ratio.max() > 1e4, (shift.max(), ratio.max())


# --- DP, server momentum and pre-aggregators inside the round ----------------------------


def _program(tiny_config, overrides):
    cfg = load_config(tiny_config, overrides)
    init, chunk, _ = trainers.make_federated(cfg, cluster_params(cfg, "train"))
    hp = trainers.hyperparams(cfg)
    return cfg, jax.jit(init)(jax.random.PRNGKey(0), hp), jax.jit(lambda s: chunk(s, hp, 1))


@pytest.mark.timeout(300)
def test_dp_clipping_and_noise_inside_the_round(tiny_config, threat_program):
    """FedAvg with DP: the global step is the mean of the clipped deltas plus Gaussian
    noise of std sigma C / sqrt(n) per coordinate, and the normaliser's mean moves by
    noise of std sigma C_s / sqrt(n), both as configured. Without the clipping the
    residual would carry the unclipped deltas (~10x the noise here)."""
    sigma, clip, stats_clip = 1.0, 1e-4, 1e3  # stats clip far above any message: it never binds
    _, state0, one_round = _program(tiny_config, [
        "federated.aggregator=mean", "federated.num_byzantine=0", f"federated.dp_clip_norm={clip}",
        f"federated.dp_noise_multiplier={sigma}", f"federated.dp_stats_clip_norm={stats_clip}",
    ])
    state, _ = one_round(state0)
    deltas = np.asarray(state.previous_deltas, np.float64)  # what the nodes computed, before DP
    norms = np.linalg.norm(deltas, axis=1)
    assert norms.min() > 100 * clip  # the clip binds for every node
    clipped = deltas * (clip / norms)[:, None]
    residual = flat(state.global_params) - flat(state0.global_params) - clipped.mean(0)
    expected = sigma * clip / np.sqrt(N_NODES)
    assert residual.std() == pytest.approx(expected, rel=0.1)
    assert abs(residual.mean()) < 4 * expected / np.sqrt(residual.size)
    unclipped = flat(state.global_params) - flat(state0.global_params) - deltas.mean(0)
    assert unclipped.std() > 5 * expected
    # The statistics: same rollouts as the no-DP program (round 1 starts from the same state).
    _, clean, _ = threat_program("none", ("mean", 0))
    stats_noise = np.asarray(state.global_stats.mean, np.float64) - np.asarray(clean.global_stats.mean, np.float64)
    expected_stats = sigma * stats_clip / np.sqrt(N_NODES)
    assert 0.6 * expected_stats < stats_noise.std() < 1.5 * expected_stats


@pytest.mark.timeout(300)
def test_server_momentum_and_pre_aggregator_inside_the_round(tiny_config):
    """Two rounds with NNM before the median, server momentum beta and server lr eta:
    v_r = beta v_(r-1) + aggregate(deltas_r) and g_r = g_(r-1) + eta v_r, where the
    aggregate is recomputed here from the round's deltas with NNM. Neither the momentum
    term nor NNM is negligible, so ignoring either fails the check."""
    beta, eta = 0.5, 0.7
    _, state0, one_round = _program(tiny_config, [
        "federated.aggregator=median", "federated.num_byzantine=1", "federated.pre_aggregators=[nnm]",
        f"federated.server_momentum={beta}", f"federated.server_lr={eta}",
    ])
    state1, _ = one_round(state0)
    state2, _ = one_round(state1)
    velocity = np.zeros_like(flat(state0.global_params))
    previous = state0
    for state in (state1, state2):
        deltas = jnp.asarray(state.previous_deltas)
        with_nnm = np.asarray(aggregators.aggregate(deltas, "median", 1, pre=("nnm",))[0], np.float64)
        without = np.asarray(aggregators.aggregate(deltas, "median", 1)[0], np.float64)
        assert np.linalg.norm(with_nnm - without) > 0.05 * np.linalg.norm(with_nnm)
        momentum_term = beta * velocity
        velocity = momentum_term + with_nnm
        np.testing.assert_allclose(np.asarray(state.server_velocity), velocity, rtol=1e-4, atol=1e-7)
        step = flat(state.global_params) - flat(previous.global_params)
        np.testing.assert_allclose(step, eta * velocity, rtol=1e-3, atol=1e-6)
        previous = state
    assert np.linalg.norm(momentum_term) > 0.1 * np.linalg.norm(with_nnm)


@pytest.mark.timeout(300)
def test_worker_momentum_is_what_the_nodes_send(tiny_config):
    """Worker momentum beta: each node sends m_r = beta m_(r-1) + (1 - beta) delta_r and the
    median of those messages is the global step. The median does not commute with the
    average over rounds, so momentum applied after aggregation (the server's) fails the
    check, as does sending the round's delta."""
    beta = 0.6
    _, state0, one_round = _program(tiny_config, [
        "federated.aggregator=median", "federated.num_byzantine=1", f"federated.worker_momentum={beta}",
    ])
    state1, _ = one_round(state0)
    state2, _ = one_round(state1)
    # The shared policy: every node starts from the global, and ends the round at start + delta.
    d1, d2 = (flat_nodes(s.nodes.params) - flat(prev.global_params) for s, prev in ((state1, state0), (state2, state1)))
    m1 = (1 - beta) * d1
    m2 = beta * m1 + (1 - beta) * d2
    np.testing.assert_allclose(np.asarray(state2.previous_deltas), m2, rtol=1e-3, atol=1e-7)
    median = lambda m: np.asarray(aggregators.aggregate(jnp.asarray(m, jnp.float32), "median", 1)[0], np.float64)  # noqa: E731
    step1 = flat(state1.global_params) - flat(state0.global_params)
    step2 = flat(state2.global_params) - flat(state1.global_params)
    np.testing.assert_allclose(step1, median(m1), rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(step2, median(m2), rtol=1e-3, atol=1e-7)
    server_side = beta * step1 + (1 - beta) * median(d2)
    assert np.linalg.norm(server_side - step2) > 0.05 * np.linalg.norm(step2)
    assert np.linalg.norm(median(d2) - step2) > 0.05 * np.linalg.norm(step2)


# --- local-only equals independent runs ----------------------------------------------------


@pytest.mark.timeout(300)
def test_local_only_equals_independent_single_node_runs(tiny_config):
    """Local mode, 2 rounds of K = 2 updates: each node's parameters and normaliser equal
    a single-node PPO learner run for 4 updates on that node alone from the same start.
    The nodes start from the same parameters and end 100x the tolerance apart, so any
    averaging across them would break the equality."""
    cfg = load_config(tiny_config, ["federated.mode=local"])
    node_params = cluster_params(cfg, "train")
    init, chunk, _ = trainers.make_federated(cfg, node_params)
    hp = trainers.hyperparams(cfg)
    state0 = jax.jit(init)(jax.random.PRNGKey(0), hp)
    state, _ = jax.jit(lambda s: chunk(s, hp, 2))(state0)

    single = trainers.make_learner(cfg, jax.tree.map(lambda x: x[:1], node_params))

    @jax.jit
    def alone(node_state, params):
        return jax.lax.scan(lambda s, _: (single.update(s, hp, params)[0], None), node_state, None, 4)[0]

    ends = []
    for i in (0, 3):
        start = jax.tree.map(lambda x: x[i], state0.nodes)
        end = alone(start, jax.tree.map(lambda x: x[i : i + 1], node_params))
        np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[i], state.nodes.params)), flat(end.params), atol=1e-5)
        np.testing.assert_allclose(np.asarray(state.nodes.obs_stats.mean[i]), np.asarray(end.obs_stats.mean), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(state.nodes.obs_stats.var[i]), np.asarray(end.obs_stats.var), rtol=1e-4, atol=1e-6)
        ends.append(flat(end.params))
    assert np.abs(ends[0] - ends[1]).max() > 100 * 1e-5  # averaging would move each by half of this
    np.testing.assert_array_equal(flat(state.global_params), flat(state0.global_params))  # nothing shared


# --- resume ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_federated_resume_equals_uninterrupted_run(tiny_config, tmp_path):
    """A federated run with an attacker, DP noise and server momentum, trained in 2 chunks;
    the same run stopped after chunk 1 and resumed from its checkpoint ends in the same
    state, bit for bit (parameters, normaliser, velocity, previous deltas, every node's
    optimiser and envs, keys)."""
    from aro_jax.training import driver

    cfg = load_config(tiny_config, [
        "federated.attack=sign_flip", "federated.byzantine_nodes=[1]", "federated.server_momentum=0.5",
        "federated.dp_clip_norm=1.0", "federated.dp_noise_multiplier=0.1",
    ])
    run_a = tmp_path / "a"
    state_a, _ = driver.train(cfg, run_a, quiet=True)
    run_b = tmp_path / "b"
    shutil.copytree(run_a, run_b)
    shutil.rmtree(run_b / "checkpoints" / "4")
    lines = (run_b / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_b / "metrics.jsonl").write_text(lines[0])
    state_b, _ = driver.train(None, run_b, resume=True, quiet=True)
    assert int(state_b.round) == 4
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x),
                                      np.asarray(jax.random.key_data(y) if jnp.issubdtype(y.dtype, jax.dtypes.prng_key) else y))
    rows_a, rows_b = driver.read_metrics(run_a / "metrics.jsonl"), driver.read_metrics(run_b / "metrics.jsonl")
    strip = lambda r: {k: v for k, v in r.items() if k != "steps_per_s"}  # noqa: E731
    assert [strip(r) for r in rows_b] == [strip(r) for r in rows_a]


# --- personalisation ------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_personal_policies_move_a_share_of_the_way_to_the_robust_global(tiny_config):
    """personal_mix m < 1, two rounds: every node sends its own round's delta (from where it
    started) and then stands at local + m (global' - local); with the plain mean the nodes'
    average equals the global after round one (they all started from it), and the nodes
    end apart from each other (a global-only program would make them equal). A huge update
    from node 0 under Krum stays out of the honest nodes' personal policies."""
    mix = 0.5
    _, state0, one_round = _program(tiny_config, ["federated.aggregator=mean", "federated.num_byzantine=0", f"federated.personal_mix={mix}"])
    state1, _ = one_round(state0)
    nodes1 = np.stack([flat(jax.tree.map(lambda x: x[i], state1.nodes.params)) for i in range(N_NODES)])
    g1 = flat(state1.global_params)
    np.testing.assert_allclose(nodes1.mean(0), g1, atol=1e-6)
    spread = np.abs(nodes1 - g1).max()
    assert spread > 1e-4
    state2, _ = one_round(state1)
    local = nodes1 + np.asarray(state2.previous_deltas, np.float64)  # each node's own round-two result
    expected = local + mix * (flat(state2.global_params) - local)
    got = np.stack([flat(jax.tree.map(lambda x: x[i], state2.nodes.params)) for i in range(N_NODES)])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(flat(state2.global_params) - g1, np.asarray(state2.previous_deltas).mean(0), atol=1e-6)

    cfg = load_config(tiny_config, [f"federated.personal_mix={mix}"])
    init, chunk, _ = trainers.make_federated(cfg, cluster_params(cfg, "train"), ["huge"], [("krum", 1), ("mean", 0)])
    hp = trainers.hyperparams(cfg)
    s0 = jax.jit(init)(jax.random.PRNGKey(0), hp)
    byz = jnp.arange(N_NODES) == 0
    after = {}
    for d in (0, 1):
        threat = fedppo.Threat(attack=jnp.int32(0), strength=jnp.float32(1.0), byzantine=byz, defence=jnp.int32(d))
        s, _ = jax.jit(lambda s: chunk(s, hp, 1))(s0.replace(threat=threat))
        after[d] = np.stack([flat(jax.tree.map(lambda x: x[i], s.nodes.params)) for i in range(1, N_NODES)])
    assert np.isfinite(after[0]).all() and np.abs(after[0]).max() < 1e3  # Krum: honest nodes unharmed
    assert np.abs(after[1]).max() > 1e28  # the plain mean carries the attack into them


@pytest.mark.timeout(300)
def test_offset_messages_make_the_global_the_robust_centre_of_the_models(tiny_config):
    """personal_sends=offset: each round a node sends its model minus the global, so the
    global becomes the coordinate-wise median of that round's models, whatever it was
    before (a Byzantine bias is measured from the honest models again each round, and does
    not add up); sending deltas, the global keeps its history (the median of the deltas
    added to it), which is not the median of the models. Either way each node then moves
    half of the way to the new global."""
    common = ["federated.aggregator=median", "federated.num_byzantine=1", "federated.personal_mix=0.5", "ppo.anneal_lr=false", "ppo.lr=3e-3"]
    centre_error = {}
    for sends in ("offset", "delta"):
        _, s0, one_round = _program(tiny_config, [*common, f"federated.personal_sends={sends}"])
        s1, _ = one_round(s0)
        s2, _ = one_round(s1)
        start = flat(s1.global_params) if sends == "offset" else flat_nodes(s1.nodes.params)
        models = start + np.asarray(s2.previous_deltas, np.float64)  # each node's model after round two's local training
        g2 = flat(s2.global_params)
        np.testing.assert_allclose(flat_nodes(s2.nodes.params), models + 0.5 * (g2 - models), atol=1e-5)
        centre_error[sends] = np.abs(g2 - np.median(models, axis=0)).max()
    assert centre_error["offset"] < 1e-6 < 1e-3 < centre_error["delta"], centre_error


@pytest.mark.timeout(300)
def test_annealed_pull_follows_the_learning_rate(tiny_config):
    """personal_mix_anneal: after round r a node moves m (1 - (r + 1) K / total updates) of
    the way to the global, the share of the learning rate left, so in the last round it
    keeps its own model (a constant pull would still move it m of the way)."""
    mix = 0.5
    cfg, s, one_round = _program(tiny_config, ["federated.aggregator=median", "federated.num_byzantine=1", f"federated.personal_mix={mix}",
                                               "federated.personal_sends=offset", "federated.personal_mix_anneal=true"])
    rounds = trainers.num_rounds(cfg)
    total = num_updates(cfg)
    assert rounds >= 2
    for r in range(rounds):
        before = flat(s.global_params)
        s, _ = one_round(s)
        models = before + np.asarray(s.previous_deltas, np.float64)  # offsets: each node's model before the pull
        pull = mix * (1 - (r + 1) * cfg.federated.local_updates / total)
        moved = flat_nodes(s.nodes.params) - models
        np.testing.assert_allclose(moved, pull * (flat(s.global_params) - models), atol=1e-5)
        assert np.abs(flat(s.global_params) - models).max() > 1e-3  # the nodes stand apart from the global: the pull is visible
    assert pull == 0.0


@pytest.mark.timeout(300)
def test_networks_a_region_keeps_its_own_are_never_pulled(tiny_config):
    """personal_own=[critic, cost_critic]: after the round the actor has moved half of the
    way to the global, as without the option, and both critics are the region's own
    trained ones, untouched by the pull; an output layer can be named alone."""
    cfg, s0, one_round = _program(tiny_config, ["federated.aggregator=median", "federated.num_byzantine=1", "federated.personal_mix=0.5",
                                                "federated.personal_sends=offset", "federated.personal_own=[critic,cost_critic]"])
    s1, _ = one_round(s0)
    models = flat(s0.global_params) + np.asarray(s1.previous_deltas, np.float64)  # each node's model before the pull
    kept = np.asarray(fedppo.pulled_mask(s0.global_params, ())) - np.asarray(fedppo.pulled_mask(s0.global_params, cfg.federated.personal_own))
    actor = np.asarray(fedppo.pulled_mask(s0.global_params, ("critic", "cost_critic")), bool)
    assert actor.sum() > 0 and kept.sum() > 0 and (actor ^ kept.astype(bool)).all()  # the two parts cover every parameter once
    moved = flat_nodes(s1.nodes.params) - models
    assert np.abs(flat(s1.global_params) - models)[:, actor].max() > 1e-3  # the pull is visible on the actor
    np.testing.assert_allclose(moved[:, actor], 0.5 * (flat(s1.global_params) - models)[:, actor], atol=1e-5)
    np.testing.assert_allclose(moved[:, ~actor], 0.0, atol=1e-6)
    # A layer may be kept too: the actor's output layer alone on top of the critics.
    head = np.asarray(fedppo.pulled_mask(s0.global_params, ("critic", "cost_critic", "actor_out")), bool)
    out_size = sum(x.size for x in jax.tree.leaves(s0.global_params["params"]["actor_out"]))
    assert (head <= actor).all() and actor.sum() - head.sum() == out_size
