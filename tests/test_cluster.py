"""The cluster env: conservation with forwarding, work lands on real peers, a one-region
cluster is ServingNode-v0, one compile, finite under spikes, 1 vs 2 devices."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aro_jax.envs import cluster as cl
from aro_jax.envs import fluid, scenarios, serving
from aro_jax.envs.serving import MAINTAIN, REBALANCE, ServingNodeEnv

TICKS = 48


@pytest.fixture(scope="module")
def cenv():
    return cl.ServingCluster()


@pytest.fixture(scope="module")
def cparams(cenv):
    return cenv.default_params.replace(max_steps_in_episode=TICKS)


def rollout(env, params, key, num_clusters, num_steps, p_rebalance=0.5):
    """jit(vmap(scan(step))) from fresh resets, random actions with REBALANCE at
    `p_rebalance`; returns per tick the queue and in-flight before it and the metrics."""
    r = params.rtt_s.shape[0]

    def one(key):
        key, k0 = jax.random.split(key)
        _, state = env.reset(k0, params)

        def tick(carry, _):
            state, key = carry
            key, k_a, k_b, k_s = jax.random.split(key, 4)
            rand = jax.random.randint(k_a, (r,), 0, env.num_actions)
            action = jnp.where(jax.random.uniform(k_b, (r,)) < p_rebalance, REBALANCE, rand)
            obs, nxt, reward, _, _, info = env.step(k_s, state, action, params)
            out = dict(q0=state.nodes.queue_requests, f0=state.in_flight, obs=obs, reward=reward, m=info["metrics"])
            return (nxt, key), out

        return jax.lax.scan(tick, (state, key), None, num_steps)[1]

    return jax.jit(jax.vmap(one))(jax.random.split(key, num_clusters))


def test_requests_are_conserved_cluster_wide_every_tick(cenv, cparams):
    out = rollout(cenv, cparams, jax.random.key(0), 3, 2 * TICKS)
    m = out["m"]
    gap = np.asarray(cl.conservation_gap(m, out["q0"], out["f0"]))
    total = np.asarray(m["arrivals"]).sum(-1)
    assert np.all(np.abs(gap) <= 1e-4 * np.maximum(total, 1.0) + 1e-3)
    # Forwarding happened, and every forwarded request was received somewhere.
    assert np.asarray(m["forwarded"]).sum() > 0
    fwd, got = np.asarray(m["forwarded"]).sum(), np.asarray(m["received"]).sum()
    np.testing.assert_allclose(got + np.asarray(m["in_flight"])[:, -1].sum(), fwd, rtol=1e-4)
    # Per region: own arrivals + received = served + served for peers + dropped + forwarded + rejected + queue growth.
    lhs = m["arrivals"] + m["received"]
    rhs = m["served"] + m["served_for_peers"] + m["dropped"] + m["forwarded"] + m["rejected"] + m["queue_requests"] - out["q0"]
    np.testing.assert_allclose(np.asarray(lhs), np.asarray(rhs), rtol=1e-4, atol=1e-2)
    # Peers only serve requests of their own model.
    compat = np.asarray(cparams.compatible)
    assert np.all(compat.sum(1) > 0)


def _three_regions(forwarding: float):
    spec = dict(profile="llama2-70b-a100-tp4", traffic_mix="conversation", max_replicas=16)
    specs = [
        scenarios.NodeSpec(name="us-east", mean_rate_rps=8.0, tz_offset_h=-5.0, **spec),
        scenarios.NodeSpec(name="us-west", mean_rate_rps=3.0, tz_offset_h=-8.0, **spec),
        scenarios.NodeSpec(name="eu-west", mean_rate_rps=3.0, tz_offset_h=0.0, **spec),
    ]
    p = cl.specs_cluster_params(specs, episode_ticks=TICKS)
    nodes = p.nodes.replace(max_forward_fraction=jnp.array([1.0, 0.0, 0.0]), random_start=jnp.zeros(3), start_time_s=jnp.full(3, 14 * 3600.0))
    return p.replace(nodes=nodes, forwarding=forwarding)


def _fixed_rollout(env, params, steps, forward_fraction):
    _, state = env.reset(jax.random.key(3), params)
    state = state.replace(nodes=state.nodes.replace(forward_fraction=jnp.asarray(forward_fraction, jnp.float32)))

    def tick(state, k):
        _, nxt, _, _, _, info = env.step(k, state, jnp.full((3,), MAINTAIN), params)
        return nxt, info["metrics"]

    return jax.jit(lambda s: jax.lax.scan(tick, s, jax.random.split(jax.random.key(4), steps)))(state)[1]


def test_forwarding_everything_loads_the_peers(cenv):
    """Region 0 forwards all it can: its peers' load and latency rise, it keeps its own
    replicas busy less, and the cluster's work is the same (nothing disappears)."""
    steps = 20
    on = _fixed_rollout(cenv, _three_regions(1.0), steps, [1.0, 0.0, 0.0])
    off = _fixed_rollout(cenv, _three_regions(0.0), steps, [1.0, 0.0, 0.0])
    mean = lambda m, k: np.asarray(m[k]).mean(0)  # noqa: E731
    assert mean(on, "forwarded")[0] > 0.1 * mean(on, "arrivals")[0]
    assert mean(off, "forwarded")[0] == 0.0
    for j in (1, 2):
        assert mean(on, "served_for_peers")[j] > 0
        assert mean(on, "gpu_util")[j] > mean(off, "gpu_util")[j] + 0.05
        assert mean(on, "e2e_mean_s")[j] >= mean(off, "e2e_mean_s")[j]
        assert mean(on, "tpot_s")[j] > mean(off, "tpot_s")[j]
    assert mean(on, "gpu_util")[0] < mean(off, "gpu_util")[0]
    # What region 0 forwarded was served by the peers: the cluster's work is unchanged.
    work = lambda m: (np.asarray(m["served"]) + np.asarray(m["served_for_peers"])).sum()  # noqa: E731
    np.testing.assert_allclose(work(on), work(off), rtol=0.02)
    # The sender pays egress and the peers' price; the peers are credited what it paid.
    assert mean(on, "peer_paid_usd")[0] > 0 and mean(on, "egress_usd")[0] > 0
    np.testing.assert_allclose(np.asarray(on["peer_paid_usd"]).sum(), np.asarray(on["peer_credit_usd"]).sum(), rtol=1e-4)
    # Forwarded requests carry the round trip and the peer's load (in the ticks where the
    # peers had spare to take any).
    sent = np.asarray(on["forwarded"])[:, 0] > 0
    assert sent.mean() > 0.8
    assert np.all(np.asarray(on["fwd_ttft_s"])[sent, 0] > float(_three_regions(1.0).rtt_s[0, 1]))


def test_one_region_without_forwarding_is_serving_node(cenv, small_node_params):
    node = small_node_params.replace(max_forward_fraction=0.0)
    stacked = scenarios.stack_params([node])
    p = cl.make_cluster_params(stacked, ["tokyo"], ["m"], forwarding=False)
    env = ServingNodeEnv()
    keys = jax.random.split(jax.random.key(5), 60)
    actions = jax.random.randint(jax.random.key(6), (60,), 0, env.num_actions)

    def run_node(keys, actions):
        obs, s = env.reset_env(keys[0], node)

        def tick(s, ka):
            k, a = ka
            s, m, r = env.transition(k, s, a, node)
            return s, (env.get_obs(s, node), m, r)

        return jax.lax.scan(tick, s, (keys[1:], actions[1:]))[1]

    def run_cluster(keys, actions):
        _, s = cenv.reset_regions(keys[:1], p)

        def tick(s, ka):
            k, a = ka
            s, m, r = cenv.transition(k[None], s, a[None], p)
            return s, (cenv.get_obs(s, p)[0, :-1], jax.tree.map(lambda x: x[0], m), r[0])

        return jax.lax.scan(tick, s, (keys[1:], actions[1:]))[1]

    obs_n, m_n, r_n = jax.jit(run_node)(keys, actions)
    obs_c, m_c, r_c = jax.jit(run_cluster)(keys, actions)
    np.testing.assert_allclose(np.asarray(obs_c), np.asarray(obs_n), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(r_c), np.asarray(r_n), rtol=1e-5, atol=1e-6)
    for k in m_n:
        if k in ("fwd_ttft_s", "fwd_e2e_s"):  # the modelled peer's figures; nothing is forwarded
            continue
        np.testing.assert_allclose(np.asarray(m_c[k]), np.asarray(m_n[k]), rtol=1e-5, atol=1e-6, err_msg=k)


def test_step_compiles_once(cenv, cparams):
    step = jax.jit(cenv.step)
    _, state = cenv.reset(jax.random.key(0), cparams)
    for i in range(4):
        _, state, *_ = step(jax.random.key(i), state, jnp.full((10,), i % cenv.num_actions), cparams)
    assert step._cache_size() == 1


def test_lazy_resets_step_as_the_mapped_env_step(cenv, cparams):
    """autoreset.batched_step (resets computed only on ticks where some cluster's episode
    ends) against vmap(env.step), from the same states every tick, across staggered
    episode ends: the same next states, observations and final observations. A step that
    skipped the reset would keep the finished episode's clock."""
    from aro_jax.envs.autoreset import batched_step

    clusters, regions = 3, cparams.rtt_s.shape[0]
    p = cparams.replace(max_steps_in_episode=5)
    plain = jax.jit(jax.vmap(cenv.step, in_axes=(0, 0, 0, None)))
    lazy = jax.jit(batched_step(cenv, lambda f: jax.vmap(f, in_axes=(0, 0, 0, None))))
    _, state = jax.vmap(cenv.reset, in_axes=(0, None))(jax.random.split(jax.random.key(0), clusters), p)
    # Stagger the clusters' episodes so some ticks end one episode and not the others.
    state = state.replace(time=jnp.arange(clusters))
    ends = partial = 0
    for t in range(12):
        keys = jax.random.split(jax.random.key(t + 1), clusters)
        action = jax.random.randint(jax.random.key(100 + t), (clusters, regions), 0, cenv.num_actions)
        want, got = plain(keys, state, action, p), lazy(keys, state, action, p)
        ended = int(np.asarray(want[4]).sum())
        ends, partial = ends + ended, partial + (0 < ended < clusters)
        for w, g in zip(jax.tree.leaves((want[0], want[1], want[2], want[5]["final_observation"])),
                        jax.tree.leaves((got[0], got[1], got[2], got[5]["final_observation"]))):
            np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=2e-5, atol=1e-5)
        state = want[1]
    assert ends >= 6 and partial >= 6  # several episodes ended, on ticks where other clusters' did not


def test_long_rollout_with_hundredfold_spikes_is_finite(cenv, cparams):
    t = cparams.nodes.traffic
    spiky = t.replace(flash_start_s=jnp.full_like(t.flash_start_s, 0.0), flash_duration_s=jnp.full_like(t.flash_duration_s, 7 * 86_400.0),
                      flash_multiplier=jnp.where(jnp.arange(10) % 3 == 0, 100.0, 1.0))
    p = cparams.replace(nodes=cparams.nodes.replace(traffic=spiky), max_steps_in_episode=200)
    out = rollout(cenv, p, jax.random.key(1), 2, 500)
    for leaf in jax.tree.leaves(out):
        assert np.all(np.isfinite(np.asarray(leaf)))
    gap = np.asarray(cl.conservation_gap(out["m"], out["q0"], out["f0"]))
    assert np.all(np.abs(gap) <= 1e-4 * np.asarray(out["m"]["arrivals"]).sum(-1) + 1e-2)


_TWO_DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from aro_jax.envs import cluster as cl
    assert len(jax.devices()) == 2
    env = cl.ServingCluster()
    p = env.default_params.replace(max_steps_in_episode=16)
    n, steps = 4, 24
    def one(key):
        _, s = env.reset(key, p)
        def tick(s, k):
            k_a, k_s = jax.random.split(k)
            a = jax.random.randint(k_a, (10,), 0, env.num_actions)
            obs, s, r, *_ , info = env.step(k_s, s, a, p)
            return s, (r, info["metrics"]["served_for_peers"], obs.sum(-1))
        return jax.lax.scan(tick, s, jax.random.split(key, steps))[1]
    keys = jax.random.split(jax.random.key(0), n)
    f = jax.jit(jax.vmap(one))
    one_dev = jax.device_get(f(jax.device_put(keys, jax.devices()[0])))
    mesh = Mesh(np.array(jax.devices()), ("d",))  # automatic sharding propagation
    out = f(jax.device_put(keys, NamedSharding(mesh, P("d"))))
    assert len(jax.tree.leaves(out)[0].sharding.device_set) == 2
    two_dev = jax.device_get(out)
    for a, b in zip(jax.tree.leaves(one_dev), jax.tree.leaves(two_dev)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # float rounding of two compilations
    print("EQUAL")
""")


def test_one_and_two_devices_agree():
    """The cluster batch axis sharded over 2 fake CPU devices gives the same results as
    one device (a fresh process: the device count is fixed at import)."""
    flags = f"--xla_force_host_platform_device_count=2 {os.environ['XLA_FLAGS']}"  # conftest's flags
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0 and "EQUAL" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------------------
# ServingNode-v0's modelled peer, slim info, staggered episodes
# --------------------------------------------------------------------------------------


def test_modelled_peer_follows_its_time_zone_and_load(default_params):
    p = default_params.replace(peer_tz_offset_h=9.0, peer_spare_rps=1e3)
    local_peak, local_trough = 14 * 3600.0 - 9 * 3600.0, 2 * 3600.0 - 9 * 3600.0 + 86_400.0  # Monday, peer's local time
    load = lambda t: fluid.peer_load_rps(p, jnp.float32(t))  # noqa: E731
    assert float(load(local_peak)) > float(load(local_trough))
    assert float(fluid.peer_spare_rps(p, load(local_peak))) < float(fluid.peer_spare_rps(p, load(local_trough)))
    assert float(fluid.peer_spare_rps(p, load(local_trough))) <= fluid.PEER_SPARE_UTIL * float(p.peer_capacity_rps)
    # Its latency rises with the load forwarded to it, and TPOT is judged.
    core = {"big_usd_per_request": jnp.float32(1e-3)}
    light = fluid.modelled_peer(p, core, jnp.float32(1.0), load(local_trough))
    heavy = fluid.modelled_peer(p, core, jnp.float32(0.75 * float(p.peer_capacity_rps) * p.tick_s), load(local_trough))
    assert float(heavy["e2e_s"]) > float(light["e2e_s"]) and float(heavy["ttft_s"]) >= float(light["ttft_s"])
    assert float(heavy["ok"]) <= float(light["ok"])
    strict = fluid.modelled_peer(p.replace(slo_tpot_s=1e-3), core, jnp.float32(1.0), load(local_trough))
    assert float(strict["ok"]) < 0.05  # a TPOT no decode step meets fails the forwarded requests


def test_slim_info_and_staggered_episode_ends(params):
    slim = ServingNodeEnv(info="slim", stagger=True)
    keys = jax.random.split(jax.random.key(0), 64)
    obs, state = jax.vmap(slim.reset, in_axes=(0, None))(keys, params)
    assert len(np.unique(np.asarray(state.time))) > 10
    assert np.all(np.asarray(state.time) < params.max_steps_in_episode)
    *_, info = jax.vmap(slim.step, in_axes=(0, 0, None, None))(keys, state, MAINTAIN, params)
    assert set(info["metrics"]) == set(serving.SLIM_METRICS)
    with pytest.raises(ValueError, match="info"):
        ServingNodeEnv(info="nope")


def test_cluster_registered_and_made_by_gymnax():
    import gymnax

    import aro_jax.envs  # noqa: F401  (registers the envs)

    env, params = gymnax.make("ServingCluster-v0")
    assert isinstance(env, cl.ServingCluster) and env.name == "ServingCluster-v0"
    obs, _ = env.reset(jax.random.PRNGKey(0), params)
    assert obs.shape == (params.rtt_s.shape[0], len(cl.CLUSTER_OBS_FIELDS)) == (10, serving.POLICY_INPUT_DIM + 1)


def test_cluster_wide_surges_hit_every_region_at_once(cenv, cparams):
    """In surge_shared_prob of the episodes every region carries the same surge (start,
    end, multiplier); in the others each region draws its own, exactly as without the
    option (the same keys give the same surges)."""
    nodes = cparams.nodes.replace(surge_prob=jnp.full_like(cparams.nodes.surge_prob, 0.25), max_steps_in_episode=jnp.full_like(cparams.nodes.max_steps_in_episode, 2880))
    own = cparams.replace(nodes=nodes)
    shared = cparams.replace(nodes=nodes.replace(surge_shared_prob=jnp.full_like(nodes.surge_prob, 0.4)))
    keys = jax.random.split(jax.random.key(5), 2000)
    draw = lambda p: np.asarray(jax.vmap(lambda k: cenv.reset_state(k, p).nodes.surge)(keys), np.float64)  # noqa: E731
    s_own, s_shared = draw(own), draw(shared)
    same = (s_shared == s_shared[:, :1]).all(axis=(1, 2))
    assert same.mean() == pytest.approx(0.4, abs=0.04)
    assert (s_shared[same, 0, 2] > 1.0).all()  # a shared episode always surges
    np.testing.assert_array_equal(s_shared[~same], s_own[~same])
    # Independent draws almost never surge in every region at once.
    assert not (s_own[..., 2] > 1.0).all(axis=1).any()
    assert (s_shared[same, 0, 1] - s_shared[same, 0, 0]).min() >= serving.SURGE_DURATION_S[0] - 1
