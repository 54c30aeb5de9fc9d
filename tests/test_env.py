"""The node environment: gymnax conformance, finite rollouts, invariants, action masks."""

import chex
import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnax.wrappers.purerl import LogWrapper
from hypothesis import given, settings
from hypothesis import strategies as st

import aro_jax.envs  # noqa: F401  (registers ServingNode-v0)
from aro_jax.envs import fluid, scenarios, serving, sizing
from aro_jax.envs.serving import (
    DEC_CPU,
    DEC_GPU,
    DEGRADE,
    INC_CPU,
    INC_GPU,
    MAINTAIN,
    OBS_FIELDS,
    POLICY_INPUT_DIM,
    PULL_BACK,
    REBALANCE,
    RESTORE,
    ServingNodeEnv,
)
from aro_jax.contract import DESCRIPTOR_FIELDS, FIELD_INDEX, IDLE_CORES_PER_REPLICA
from aro_jax.envs.params import EnvParams

ALLOCATION_FIELDS = ("replicas_ready", "cpu_cores", "host_memory_gb", "forward_fraction", "small_model_fraction")


def random_rollout(env, params, key, num_envs, num_steps, policy=None):
    """jit(scan(vmap(step))) from fresh resets; returns (states before each step, actions, step outputs).

    `policy(key, state) -> action` defaults to uniform random actions."""
    if policy is None:
        policy = lambda k, s: env.action_space(params).sample(k)  # noqa: E731

    def one_env(key):
        key, k_reset = jax.random.split(key)
        obs, state = env.reset(k_reset, params)

        def tick(carry, _):
            state, key = carry
            key, k_act, k_step = jax.random.split(key, 3)
            action = policy(k_act, state)
            obs, next_state, reward, terminated, truncated, info = env.step(k_step, state, action, params)
            out = dict(obs=obs, reward=reward, terminated=terminated, truncated=truncated, metrics=info["metrics"])
            return (next_state, key), (state, action, out)

        _, trajectory = jax.lax.scan(tick, (state, key), None, num_steps)
        return trajectory

    return jax.jit(jax.vmap(one_env))(jax.random.split(key, num_envs))


# --------------------------------------------------------------------------------------
# gymnax conformance
# --------------------------------------------------------------------------------------


def test_registered_and_made_by_gymnax():
    assert "ServingNode-v0" in gymnax.registered_envs
    env, params = gymnax.make("ServingNode-v0")
    assert isinstance(env, ServingNodeEnv) and isinstance(params, EnvParams)
    assert env.name == "ServingNode-v0"
    assert env.action_space(params).n == env.num_actions == 11
    assert env.observation_space(params).shape == (POLICY_INPUT_DIM,) == (len(OBS_FIELDS) + len(DESCRIPTOR_FIELDS),)
    paper_env, _ = gymnax.make("ServingNode-v0", action_set="paper")
    assert paper_env.num_actions == 5
    with pytest.raises(ValueError, match="action_set"):
        ServingNodeEnv("nope")


def test_jit_reset_and_step_return_six_values(env, params):
    obs, state = jax.jit(env.reset)(jax.random.key(0), params)
    assert obs.shape == env.observation_space(params).shape and obs.dtype == jnp.float32
    out = jax.jit(env.step)(jax.random.key(1), state, jnp.int32(INC_GPU), params)
    assert len(out) == 6
    obs, state, reward, terminated, truncated, info = out
    assert obs.shape == (POLICY_INPUT_DIM,)
    assert reward.shape == () and terminated.shape == () and truncated.shape == ()
    assert terminated.dtype == jnp.bool_ and truncated.dtype == jnp.bool_
    assert {"final_observation", "metrics"} <= set(info)
    assert int(state.time) == 1


def test_vmap_over_keys(env, params):
    keys = jax.random.split(jax.random.key(0), 8)
    obs, state = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
    assert obs.shape == (8, POLICY_INPUT_DIM)
    # Random start times: the batch does not all start at the same clock.
    assert len(np.unique(np.asarray(state.clock_s))) > 1
    actions = jnp.arange(8) % env.num_actions
    obs, state, reward, terminated, truncated, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(keys, state, actions, params)
    assert obs.shape == (8, POLICY_INPUT_DIM) and reward.shape == (8,) and truncated.shape == (8,)


def test_observation_ends_with_the_node_descriptor(env, params, small_node_params):
    """The policy input is the scaled live fields, then the node's descriptor features:
    constant over a node's episode, different between a 70B and a 7B node."""
    from aro_jax.contract import descriptor_features
    from aro_jax.envs.serving import node_descriptor, observation_scale, raw_observation

    tails = []
    for p in (params, small_node_params):
        obs, state = env.reset(jax.random.key(0), p)
        obs2, state, *_ = env.step(jax.random.key(1), state, jnp.int32(INC_GPU), p)
        want = np.asarray(descriptor_features(np.asarray(node_descriptor(p)), xp=np))
        np.testing.assert_allclose(obs[len(OBS_FIELDS):], want, rtol=1e-6)
        np.testing.assert_allclose(obs2[len(OBS_FIELDS):], want, rtol=1e-6)
        np.testing.assert_allclose(obs2[: len(OBS_FIELDS)], raw_observation(state, p) / observation_scale(p), rtol=1e-5, atol=1e-6)
        tails.append(want)
    assert float(params.weights_gb) != float(small_node_params.weights_gb)
    assert not np.allclose(tails[0], tails[1])


def test_vmap_over_stacked_node_params(env, params, small_node_params):
    stacked = scenarios.stack_params([params, small_node_params])
    keys = jax.random.split(jax.random.key(3), 2)
    actions = jnp.array([INC_GPU, DEGRADE])
    obs_b, state_b = jax.jit(jax.vmap(env.reset))(keys, stacked)
    step_b = jax.jit(jax.vmap(env.step))(keys, state_b, actions, stacked)
    for i, node in enumerate([params, small_node_params]):
        obs_i, state_i = env.reset(keys[i], node)
        np.testing.assert_allclose(obs_b[i], obs_i, rtol=1e-5, atol=1e-6)
        step_i = env.step(keys[i], state_i, actions[i], node)
        np.testing.assert_allclose(step_b[0][i], step_i[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(step_b[2][i], step_i[2], rtol=1e-5, atol=1e-6)
    # Two different nodes really are different: replica counts and rates differ.
    assert not np.allclose(obs_b[0], obs_b[1])


def test_step_compiles_once(env, params):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(key, state, action, p):
        return env.step(key, state, action, p)

    short = params.replace(max_steps_in_episode=5)
    _, state = env.reset(jax.random.key(0), short)
    for i in range(12):  # crosses two episode ends (auto-reset)
        _, state, *_ = step(jax.random.key(i), state, jnp.int32(i % env.num_actions), short)
    # Neither a state straight from reset nor other values of the params retrace.
    step(jax.random.key(99), env.reset(jax.random.key(1), params)[1], jnp.int32(MAINTAIN), params)


def test_truncation_at_time_limit(env, params):
    p = params.replace(max_steps_in_episode=5)
    _, state = env.reset(jax.random.key(0), p)
    for t in range(1, 6):
        obs, state, reward, terminated, truncated, info = env.step(jax.random.key(t), state, jnp.int32(MAINTAIN), p)
        assert not bool(terminated)
        if t < 5:
            assert not bool(truncated) and int(state.time) == t
            np.testing.assert_array_equal(info["final_observation"], obs)
        else:
            assert bool(truncated)
            assert int(state.time) == 0
            assert not np.allclose(info["final_observation"], obs)
            # The pre-reset observation reflects the ended episode (5 ticks later), not a fresh one.
            assert np.isfinite(np.asarray(info["final_observation"])).all()


def test_log_wrapper_reports_episode_returns(env, params):
    p = params.replace(max_steps_in_episode=5)
    wrapped = LogWrapper(env)
    _, state = wrapped.reset(jax.random.key(0), p)

    def tick(state, key):
        k_act, k_step = jax.random.split(key)
        action = env.action_space(p).sample(k_act)
        _, state, reward, _, truncated, info = wrapped.step(k_step, state, action, p)
        return state, (reward, truncated, info["returned_episode"], info["returned_episode_returns"], info["returned_episode_lengths"])

    _, (rewards, truncated, returned, returns, lengths) = jax.lax.scan(tick, state, jax.random.split(jax.random.key(1), 12))
    np.testing.assert_array_equal(np.asarray(returned), np.asarray(truncated))
    assert np.flatnonzero(np.asarray(returned)).tolist() == [4, 9]
    for end in (4, 9):
        np.testing.assert_allclose(returns[end], rewards[end - 4 : end + 1].sum(), rtol=1e-5)
        assert int(lengths[end]) == 5


# --------------------------------------------------------------------------------------
# Finite rollouts
# --------------------------------------------------------------------------------------


def test_random_rollout_is_finite(env, params, small_node_params):
    stacked = scenarios.stack_params([params, small_node_params])
    states, actions, out = jax.vmap(lambda p, k: random_rollout(env, p, k, num_envs=32, num_steps=300))(
        stacked, jax.random.split(jax.random.key(0), 2)
    )
    chex.assert_tree_all_finite((states, out))
    assert out["obs"].shape == (2, 32, 300, POLICY_INPUT_DIM)
    assert int(out["truncated"].sum()) == 2 * 32 * (300 // params.max_steps_in_episode)
    assert not bool(out["terminated"].any())


@pytest.fixture(scope="module")
def constant_action_rollouts(env, default_params):
    """400 ticks (no episode end) of always the same action, for each extreme action."""
    extreme = jnp.array([INC_GPU, DEC_GPU, DEC_CPU, DEGRADE, REBALANCE])

    def run(action, key):
        return random_rollout(env, default_params, key, num_envs=4, num_steps=400, policy=lambda k, s: action)

    batched = jax.jit(jax.vmap(run))(extreme, jax.random.split(jax.random.key(7), len(extreme)))
    return {a: jax.tree.map(lambda x, i=i: x[i], batched) for i, a in enumerate(extreme.tolist())}


@pytest.mark.parametrize(
    "action", [INC_GPU, DEC_GPU, DEC_CPU, DEGRADE, REBALANCE], ids=["IncreaseGPU", "DecreaseGPU", "DecreaseCPU", "DegradeQuality", "Rebalance"]
)
def test_extreme_action_sequences_stay_finite_and_bounded(constant_action_rollouts, default_params, action):
    states, _, out = constant_action_rollouts[action]
    chex.assert_tree_all_finite((states, out))
    p = default_params
    final = jax.tree.map(lambda x: x[:, -1], states)
    replicas_total = final.replicas_ready + final.replicas_pending.sum(-1)
    assert (replicas_total <= p.max_replicas).all() and (final.replicas_ready >= p.min_replicas).all()
    assert (final.cpu_cores >= p.cpu_step_cores).all() and (final.cpu_cores <= p.max_cpu_cores).all()
    if action == INC_GPU:
        np.testing.assert_allclose(final.replicas_ready, p.max_replicas)
    elif action == DEC_GPU:
        np.testing.assert_allclose(final.replicas_ready, p.min_replicas)
    elif action == DEC_CPU:
        # Decreasing CPU stops at one idle core per ready replica (or the minimum step).
        assert (final.cpu_cores >= jnp.minimum(final.replicas_ready, p.cpu_step_cores) - 1e-6).all()
        assert (final.cpu_cores < p.initial_cpu_cores).all()
    elif action == DEGRADE:
        np.testing.assert_allclose(final.small_model_fraction, p.max_small_model_fraction, rtol=1e-5)
    elif action == REBALANCE:
        np.testing.assert_allclose(final.forward_fraction, p.max_forward_fraction, rtol=1e-5)
        m = out["metrics"]
        assert (m["forwarded"] <= p.peer_spare_rps * p.tick_s * (1 + 1e-5)).all()


def test_hundredfold_traffic_spike_stays_finite(env, params):
    week_s = 7 * 86_400.0
    spike = params.replace(
        traffic=params.traffic.replace(flash_start_s=0.0, flash_duration_s=2 * week_s, flash_multiplier=100.0)
    )
    states, _, out = random_rollout(env, spike, jax.random.key(5), num_envs=8, num_steps=200)
    chex.assert_tree_all_finite((states, out))
    m = out["metrics"]
    assert float(m["dropped"].sum()) > 0.0  # 100x the mean load cannot all be served
    assert (m["queue_requests"] <= spike.max_queue_requests * (1 + 1e-6)).all()
    assert (m["gpu_util"] <= 1.0).all() and (m["slo_attainment"] >= 0.0).all()


# --------------------------------------------------------------------------------------
# Invariants every tick
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def invariant_rollout(env, params, small_node_params):
    """Random actions on three nodes: default, a small bursty node, and the default under a 20x spike."""
    spiky = params.replace(traffic=params.traffic.replace(flash_start_s=0.0, flash_duration_s=1e7, flash_multiplier=20.0))
    stacked = scenarios.stack_params([params, small_node_params, spiky])
    return jax.vmap(lambda p, k: random_rollout(env, p, k, num_envs=16, num_steps=200))(
        stacked, jax.random.split(jax.random.key(11), 3)
    )


def test_requests_are_conserved_every_tick(invariant_rollout):
    states, _, out = invariant_rollout
    m = out["metrics"]
    queue_before = states.queue_requests
    balance = m["served"] + m["dropped"] + m["forwarded"] + m["rejected"] + (m["queue_requests"] - queue_before)
    # float32 sums of terms up to ~1e5 requests: relative tolerance 1e-5 of the backlog.
    scale = m["arrivals"] + queue_before + 1.0
    np.testing.assert_array_less(np.abs(np.asarray(m["arrivals"] - balance)), np.asarray(1e-5 * scale + 1e-3))
    for name in ("arrivals", "served", "dropped", "forwarded", "rejected", "queue_requests"):
        assert (m[name] >= 0.0).all(), name
    assert float(m["rejected"].sum()) > 0.0  # prompts over the 4k window exist in both mixes


def test_metrics_are_in_range_every_tick(invariant_rollout):
    _, _, out = invariant_rollout
    m = out["metrics"]
    for name in ("gpu_util", "cpu_util", "memory_util", "slo_attainment", "quality"):
        values = np.asarray(m[name])
        assert values.min() >= 0.0 and values.max() <= 1.0, (name, values.min(), values.max())
    assert (m["cost_usd"] >= 0.0).all()
    assert (m["capacity_rps"] >= 0.0).all()
    for name in ("ttft_mean_s", "ttft_p95_s", "e2e_mean_s", "e2e_p95_s", "tpot_s"):
        assert (m[name] > 0.0).all(), name
    assert (m["ttft_p95_s"] >= 0.0).all()


def _fluid_capacity_pair(params, arrivals, queue, replicas, small_fraction, forward_fraction):
    """fluid_tick at r and r + 1 replicas with CPU and host memory ample for r + 1."""
    idle, busy = fluid.cpu_cores_per_replica(params)
    cores = (replicas + 1.0) * (idle + busy)
    memory = (replicas + 1.0) * fluid.host_memory_per_replica_gb(params) + params.weights_gb

    def tick(r):
        metrics, _ = fluid.fluid_tick(params, arrivals, queue, r, cores, memory, r, forward_fraction, small_fraction)
        return metrics

    return tick(replicas), tick(replicas + 1.0)


_capacity_pair = jax.jit(_fluid_capacity_pair)


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.floats(0.0, 1e5),
    queue=st.floats(0.0, 1e4),
    replicas=st.integers(1, 31),
    small_fraction=st.floats(0.0, 0.8),
    forward_fraction=st.floats(0.0, 0.5),
    small_node=st.booleans(),
)
def test_adding_a_replica_never_lowers_capacity(arrivals, queue, replicas, small_fraction, forward_fraction, small_node):
    spec = scenarios.NodeSpec(profile="llama2-7b-h100-tp1") if small_node else scenarios.NodeSpec()
    p = _node_params_cached(spec)
    before, after = _capacity_pair(
        p, jnp.float32(arrivals), jnp.float32(queue), jnp.float32(replicas), jnp.float32(small_fraction), jnp.float32(forward_fraction)
    )
    assert float(after["capacity_rps"]) >= float(before["capacity_rps"]) * (1 - 1e-6)
    assert float(after["capacity_rps"]) > 0.0
    # More capacity serves at least as much and drops no more.
    assert float(after["served"]) >= float(before["served"]) * (1 - 1e-5) - 1e-3
    assert float(after["dropped"]) <= float(before["dropped"]) * (1 + 1e-5) + 1e-3


_PARAMS_CACHE = {}


def _node_params_cached(spec):
    if spec not in _PARAMS_CACHE:
        _PARAMS_CACHE[spec] = scenarios.node_params(spec)
    return _PARAMS_CACHE[spec]


# --------------------------------------------------------------------------------------
# Action mask
# --------------------------------------------------------------------------------------


def test_action_mask_at_the_limits(env, params):
    _, state = env.reset(jax.random.key(0), params)
    mask = env.action_mask(state, params)
    assert mask.shape == (env.num_actions,) and mask.dtype == jnp.bool_
    # Fresh state: nothing forwarded, no small-model share.
    assert not mask[PULL_BACK] and not mask[RESTORE] and mask[MAINTAIN]

    at_max = state.replace(
        replicas_ready=jnp.float32(params.max_replicas),
        cpu_cores=jnp.float32(params.max_cpu_cores),
        host_memory_gb=jnp.float32(params.max_host_memory_gb),
        forward_fraction=jnp.float32(params.max_forward_fraction),
        small_model_fraction=jnp.float32(params.max_small_model_fraction),
    )
    mask = env.action_mask(at_max, params)
    assert not mask[INC_GPU] and not mask[INC_CPU] and not mask[serving.INC_MEM]
    assert not mask[REBALANCE] and not mask[DEGRADE]
    assert mask[DEC_GPU] and mask[DEC_CPU] and mask[PULL_BACK] and mask[RESTORE] and mask[MAINTAIN]
    # IncreaseGPU at the limit changes nothing.
    next_state, *_ = env.transition(jax.random.key(1), at_max, INC_GPU, params)
    assert float(next_state.replicas_ready + next_state.replicas_pending.sum()) == params.max_replicas

    # Pending replicas count towards the limit.
    pending_full = state.replace(
        replicas_ready=jnp.float32(params.max_replicas - 1), replicas_pending=state.replicas_pending.at[3].set(1.0)
    )
    assert not env.action_mask(pending_full, params)[INC_GPU]

    at_min = state.replace(
        replicas_ready=jnp.float32(params.min_replicas),
        cpu_cores=jnp.float32(params.cpu_step_cores),
        host_memory_gb=jnp.float32(params.memory_step_gb),
    )
    mask = env.action_mask(at_min, params)
    assert not mask[DEC_GPU] and not mask[DEC_CPU] and not mask[serving.DEC_MEM]
    assert mask[INC_GPU] and mask[INC_CPU]

    # At the pods' share of one replica's instance, far below the node-wide maxima, more
    # CPU or memory cannot be had; with cores at the replicas' idle demand, fewer cannot.
    gpus = float(params.tensor_parallel)
    at_pod_share = state.replace(
        replicas_ready=jnp.float32(1.0), replicas_pending=jnp.zeros_like(state.replicas_pending),
        cpu_cores=jnp.float32(gpus * params.vcpus_per_gpu), host_memory_gb=jnp.float32(gpus * params.host_memory_gb_per_gpu),
    )
    assert gpus * params.vcpus_per_gpu < params.max_cpu_cores and gpus * params.host_memory_gb_per_gpu < params.max_host_memory_gb
    mask = env.action_mask(at_pod_share, params)
    assert not mask[INC_CPU] and not mask[serving.INC_MEM] and mask[INC_GPU] and mask[DEC_CPU]
    idle = state.replace(replicas_ready=jnp.float32(4.0), cpu_cores=jnp.float32(4.0 * IDLE_CORES_PER_REPLICA))
    assert not env.action_mask(idle, params)[DEC_CPU]

    paper = ServingNodeEnv("paper")
    assert paper.action_mask(at_max, params).shape == (5,)


def test_the_weights_cache_fills_over_a_load_time_and_a_resize_evicts_it(env, params):
    """A scale-out loads from host memory only once the weights' copy there has filled
    from remote storage; memory raised the tick before buys nothing, and a decrease that
    squeezes the copy out costs a refill (it used to be whole the moment memory had room)."""
    per_replica = fluid.host_memory_per_replica_gb(params)
    fill_ticks = int(np.ceil(params.weights_gb / fluid.weights_cache_fill_gb_per_s(params) / params.tick_s))
    cached_ticks = int(np.ceil(fluid.cached_cold_start_s(params) / params.tick_s))
    assert fill_ticks >= 4 and cached_ticks == 1
    _, state = env.reset(jax.random.key(0), params)
    no_room = float(sizing.memory_for(params, 3.0))  # three pods, no room for the weights beside them
    state = state.replace(
        replicas_ready=jnp.float32(2.0), replicas_pending=jnp.zeros_like(state.replicas_pending),
        host_memory_gb=jnp.float32(no_room), weights_cache_gb=jnp.float32(0.0),
    )
    assert no_room - 3 * per_replica < params.weights_gb

    def run(state, actions):
        for i, a in enumerate(actions):
            state, *_ = env.transition(jax.random.key(i), state, a, params)
        return state

    def start_ticks(state):
        """Ticks until a replica ordered now serves."""
        after = run(state, [INC_GPU])
        if after.replicas_pending.sum():  # the pipeline shifted once at the tick's end
            return int(np.flatnonzero(np.asarray(after.replicas_pending))[0]) + 2
        assert after.replicas_ready == state.replicas_ready + 1
        return 1

    assert start_ticks(state) > cached_ticks + 2  # from remote storage
    raised = run(state, [serving.INC_MEM] * 3)
    assert serving.weights_room_gb(params, raised.host_memory_gb, 3.0) == params.weights_gb
    assert float(raised.weights_cache_gb) < params.weights_gb
    assert start_ticks(raised) > cached_ticks + 2  # room alone is not a cache
    warm = run(raised, [MAINTAIN] * fill_ticks)
    assert float(warm.weights_cache_gb) == params.weights_gb
    # The copy is resident memory an operator sees.
    expected_util = (2 * per_replica + params.weights_gb) / float(warm.host_memory_gb)
    np.testing.assert_allclose(float(warm.last["memory_util"]), expected_util, rtol=1e-5)
    assert start_ticks(warm) == cached_ticks
    squeezed = run(warm, [serving.DEC_MEM] * 3 + [serving.INC_MEM] * 3)
    assert float(squeezed.weights_cache_gb) < params.weights_gb
    assert start_ticks(squeezed) > cached_ticks + 2


def test_masked_actions_change_no_allocation(env, invariant_rollout, params, small_node_params):
    """Along random trajectories, an action the mask forbids acts exactly like MaintainCurrent,
    and one it allows changes the allocation (no no-op passes as a move: IncreaseCPU at the
    pods' share of their instances' cores, DecreaseCPU at the replicas' idle demand)."""
    states, _, _ = invariant_rollout
    node_params = [params, small_node_params]
    for node in range(2):
        p = node_params[node]
        flat = jax.tree.map(lambda x: x[node].reshape((-1,) + x.shape[3:])[::7], states)

        def check(state, key):
            mask = env.action_mask(state, p)
            after = jax.vmap(lambda a: env.transition(key, state, a, p)[0])(jnp.arange(env.num_actions))
            base = env.transition(key, state, MAINTAIN, p)[0]
            same = jnp.isclose(after.replicas_pending.sum(-1), base.replicas_pending.sum())
            for f in ALLOCATION_FIELDS:
                same = same & jnp.isclose(getattr(after, f), getattr(base, f))
            return mask, same

        n = flat.time.shape[0]
        masks, same = jax.jit(jax.vmap(check))(flat, jax.random.split(jax.random.key(node), n))
        masks, same = np.asarray(masks), np.asarray(same)
        assert (~masks).any()  # the trajectories did hit some limits
        assert same[~masks].all()
        moves = masks & (np.arange(env.num_actions) != MAINTAIN)
        assert not same[moves].any(), [serving.EXTENDED_ACTIONS[a] for a in np.unique(np.nonzero(moves & same)[1])]


# --------------------------------------------------------------------------------------
# Training surges
# --------------------------------------------------------------------------------------


def test_surges_are_drawn_per_episode_within_their_bounds(params):
    """One episode in surge_prob carries a surge of 1.5x to the configured maximum, 10-60
    minutes long, ending within the episode; the others carry none."""
    surging = params.replace(surge_prob=0.3, surge_max_multiplier=2.5, random_start=1.0, max_steps_in_episode=2880)
    env = serving.ServingNodeEnv()
    states = jax.vmap(lambda k: env.reset_state(k, surging))(jax.random.split(jax.random.key(3), 4000))
    start, end, size = (np.asarray(states.surge[:, i], np.float64) for i in range(3))
    on = size > 1.0
    assert on.mean() == pytest.approx(0.3, abs=0.03)
    assert size[on].min() >= serving.SURGE_MIN_MULTIPLIER and size[on].max() <= 2.5 and (size[~on] == 1.0).all()
    assert size[on].max() > 2.4 and size[on].min() < 1.6  # the whole range is drawn
    length = end - start
    assert length.min() >= serving.SURGE_DURATION_S[0] - 1 and length.max() <= serving.SURGE_DURATION_S[1] + 1
    clock = np.asarray(states.clock_s, np.float64)
    assert (start >= clock).all() and (end <= clock + surging.max_steps_in_episode * surging.tick_s + 1).all()
    # Without surges the episode's start is drawn as it always was.
    plain = jax.vmap(lambda k: env.reset_state(k, params.replace(random_start=1.0)))(jax.random.split(jax.random.key(3), 4000))
    np.testing.assert_array_equal(np.asarray(plain.clock_s), clock)
    assert (np.asarray(plain.surge[:, 2]) == 1.0).all()


def test_a_surge_multiplies_the_demand_of_its_ticks_only(env, params):
    """The same episode and keys with and without a 2.5x surge: arrivals inside the surge
    are 2.5 times as many in expectation, outside it the same draws."""
    base = params.replace(random_start=0.0, start_time_s=10 * 3600.0, traffic=params.traffic.replace(burst_cv=0.0))
    _, state = env.reset(jax.random.key(0), base)
    tick = float(base.tick_s)
    window = (state.clock_s + 20 * tick, state.clock_s + 40 * tick)
    with_surge = state.replace(surge=jnp.asarray([window[0], window[1], 2.5], jnp.float32))

    def arrivals(s):
        def tick_fn(s, k):
            _, s, _, _, _, info = env.step(k, s, 0, base)
            return s, info["metrics"]["arrivals"]
        return np.asarray(jax.lax.scan(tick_fn, s, jax.random.split(jax.random.key(1), 60))[1], np.float64)

    plain, surged = arrivals(state), arrivals(with_surge)
    np.testing.assert_allclose(surged[:20], plain[:20], rtol=1e-5)
    np.testing.assert_allclose(surged[40:], plain[40:], rtol=1e-5)
    assert surged[20:40].sum() / plain[20:40].sum() == pytest.approx(2.5, rel=0.05)


def test_evaluated_scenarios_carry_no_surge_and_no_token_shift():
    from aro_jax.config import load_config

    cfg = load_config(None, ["env.surge_prob=0.5", "env.surge_max_multiplier=4", "env.token_shift_prob=0.4", "env.random_fleet_prob=0.3",
                             "env.demand_phase_prob=0.2", "env.demand_scale_max=2", "env.burst_shift_prob=0.3", "env.surge_shared_prob=0.2"])
    train = scenarios.cluster_params(cfg, "train")
    assert (np.asarray(train.burst_shift_prob) == 0.3).all() and (np.asarray(train.surge_shared_prob) == 0.2).all()
    assert (np.asarray(train.demand_scale_max) == 2.0).all()
    assert (np.asarray(train.surge_prob) == 0.5).all() and (np.asarray(train.token_shift_prob) == 0.4).all()
    assert (np.asarray(train.random_fleet_prob) == 0.3).all() and (np.asarray(train.demand_phase_prob) == 0.2).all()
    for scenario in scenarios.SCENARIOS:
        if not scenario.startswith("trace-"):
            p = scenarios.cluster_params(cfg, scenario)
            assert (np.asarray(p.surge_prob) == 0.0).all() and (np.asarray(p.token_shift_prob) == 0.0).all(), scenario
            assert (np.asarray(p.random_fleet_prob) == 0.0).all() and (np.asarray(p.demand_phase_prob) == 0.0).all(), scenario
            assert (np.asarray(p.demand_scale_max) == 1.0).all(), scenario
            assert (np.asarray(p.burst_shift_prob) == 0.0).all() and (np.asarray(p.surge_shared_prob) == 0.0).all(), scenario


# --------------------------------------------------------------------------------------
# Training demand phases
# --------------------------------------------------------------------------------------


def test_demand_phases_are_drawn_per_episode_over_the_whole_day(params):
    """One episode in demand_phase_prob runs its demand a uniform 0-24 h ahead; the others
    not at all, and the episode's start is drawn as it was without phases."""
    env = serving.ServingNodeEnv()
    keys = jax.random.split(jax.random.key(5), 4000)
    states = jax.vmap(lambda k: env.reset_state(k, params.replace(demand_phase_prob=0.4, random_start=1.0)))(keys)
    phase = np.asarray(states.demand_phase_s, np.float64)
    on = phase > 0
    assert on.mean() == pytest.approx(0.4, abs=0.03)
    assert phase.max() < 86_400.0 and phase[on].max() > 0.95 * 86_400.0 and phase[on].min() < 0.05 * 86_400.0
    plain = jax.vmap(lambda k: env.reset_state(k, params.replace(random_start=1.0)))(keys)
    np.testing.assert_array_equal(np.asarray(plain.clock_s), np.asarray(states.clock_s))
    assert (np.asarray(plain.demand_phase_s) == 0.0).all()


def arrivals_and_obs(env, p, ticks: int = 30, **episode):
    """(arrivals, observations) of `ticks` ticks holding the fleet, from a reset state
    whose episode draws (e.g. demand_phase_s) are replaced by `episode`."""
    _, state = env.reset(jax.random.key(0), p)
    state = state.replace(**{k: jnp.asarray(v, jnp.float32) for k, v in episode.items()})

    def tick_fn(s, k):
        o, s, _, _, _, info = env.step(k, s, 0, p)
        return s, (info["metrics"]["arrivals"], o)
    _, (arrivals, o) = jax.lax.scan(tick_fn, state, jax.random.split(jax.random.key(1), ticks))
    return np.asarray(arrivals, np.float64), np.asarray(o, np.float64)


def test_a_demand_phase_moves_the_load_and_not_the_clock(env, params):
    """At 03:00 local with the demand 12 h ahead the node gets the afternoon's load (as
    many arrivals as the same node at 15:00 without a phase), while its observed clock
    still reads 03:00."""
    base = params.replace(random_start=0.0, traffic=params.traffic.replace(burst_cv=0.0, tz_offset_h=0.0))
    night, afternoon = base.replace(start_time_s=3 * 3600.0), base.replace(start_time_s=15 * 3600.0)

    plain, plain_obs = arrivals_and_obs(env, night, demand_phase_s=0.0)
    ahead, ahead_obs = arrivals_and_obs(env, night, demand_phase_s=12 * 3600.0)
    day, day_obs = arrivals_and_obs(env, afternoon, demand_phase_s=0.0)
    assert ahead.sum() / plain.sum() > 1.5  # the diurnal peak against the trough
    np.testing.assert_allclose(ahead.sum(), day.sum(), rtol=0.05)
    clock = [FIELD_INDEX[f] for f in ("time_of_day_sin", "time_of_day_cos", "day_of_week_sin", "day_of_week_cos")]
    np.testing.assert_array_equal(ahead_obs[:, clock], plain_obs[:, clock])
    assert np.abs(day_obs[:, clock] - plain_obs[:, clock]).max() > 1.0


# --------------------------------------------------------------------------------------
# Training demand levels
# --------------------------------------------------------------------------------------


def test_demand_scales_are_log_uniform_per_episode_and_off_by_default(params):
    """Each episode's demand factor is log-uniform in [1/2, 2] at demand_scale_max = 2
    (its log symmetric about 0, reaching both ends); exactly 1 at the default, and the
    start is drawn as it was without it."""
    env = serving.ServingNodeEnv()
    keys = jax.random.split(jax.random.key(6), 4000)
    states = jax.vmap(lambda k: env.reset_state(k, params.replace(demand_scale_max=2.0, random_start=1.0)))(keys)
    log_scale = np.log(np.asarray(states.demand_scale, np.float64))
    assert np.abs(log_scale).max() <= np.log(2.0) + 1e-6
    assert log_scale.min() < -0.95 * np.log(2.0) and log_scale.max() > 0.95 * np.log(2.0)
    assert np.mean(log_scale) == pytest.approx(0.0, abs=0.03)
    assert np.mean(np.abs(log_scale) < 0.5 * np.log(2.0)) == pytest.approx(0.5, abs=0.03)  # uniform in log
    plain = jax.vmap(lambda k: env.reset_state(k, params.replace(random_start=1.0)))(keys)
    np.testing.assert_array_equal(np.asarray(plain.clock_s), np.asarray(states.clock_s))
    assert (np.asarray(plain.demand_scale) == 1.0).all()


def test_a_demand_scale_multiplies_the_arrivals_and_not_the_descriptor(env, params):
    """Twice the demand is twice the arrivals, while the observation's descriptor (the
    planned rate the rates are scaled by) stays the region's."""
    base = params.replace(random_start=0.0, traffic=params.traffic.replace(burst_cv=0.0))

    plain, plain_obs = arrivals_and_obs(env, base, demand_scale=1.0)
    double, double_obs = arrivals_and_obs(env, base, demand_scale=2.0)
    assert double.sum() / plain.sum() == pytest.approx(2.0, rel=0.02)
    descriptor = slice(len(OBS_FIELDS), None)
    np.testing.assert_array_equal(double_obs[:, descriptor], plain_obs[:, descriptor])


# --------------------------------------------------------------------------------------
# Training token lengths
# --------------------------------------------------------------------------------------


def test_token_shifts_are_drawn_per_episode_within_their_bounds(params):
    """One episode in token_shift_prob moves its prompt and answer log-means by uniform
    offsets across the whole TOKEN_SHIFT_MAX_LOG range; the others keep them (zero), and
    the episode's start is drawn as it was without shifts."""
    env = serving.ServingNodeEnv()
    keys = jax.random.split(jax.random.key(5), 4000)
    shifting = jax.vmap(lambda k: env.reset_state(k, params.replace(token_shift_prob=0.4, random_start=1.0)))(keys)
    plain = jax.vmap(lambda k: env.reset_state(k, params.replace(random_start=1.0)))(keys)
    shift = np.asarray(shifting.token_shift, np.float64)
    on = (shift != 0).any(axis=1)
    assert on.mean() == pytest.approx(0.4, abs=0.03)
    for j, bound in enumerate(serving.TOKEN_SHIFT_MAX_LOG):
        assert np.abs(shift[:, j]).max() <= bound + 1e-6
        assert shift[on, j].max() > 0.95 * bound and shift[on, j].min() < -0.95 * bound  # the whole range is drawn
    assert (np.asarray(plain.token_shift) == 0).all()
    np.testing.assert_array_equal(np.asarray(plain.clock_s), np.asarray(shifting.clock_s))


def test_token_shifts_toward_the_other_mix_centre_their_range_between_the_two():
    """With token_shift_toward 0.5, a code region's answers shift around half the gap to the
    chat mix's lengths (a symmetric draw centres on zero), so the chat mix's lengths lie
    inside the range and not at its edge; a chat region's shift the other way."""
    env = serving.ServingNodeEnv()
    keys = jax.random.split(jax.random.key(6), 4000)
    for mix, other in (("code", "conversation"), ("conversation", "code")):
        p = scenarios.node_params(scenarios.NodeSpec(traffic_mix=mix)).replace(token_shift_prob=1.0, token_shift_toward=0.5, random_start=1.0)
        shift = np.asarray(jax.vmap(lambda k, p=p: env.reset_state(k, p).token_shift)(keys), np.float64)
        gap = np.asarray([scenarios.TRAFFIC_MIXES[other][k] - scenarios.TRAFFIC_MIXES[mix][k] for k in ("input_log_mean", "output_log_mean")])
        np.testing.assert_allclose(shift.mean(axis=0), 0.5 * gap, atol=0.06)
        for j, bound in enumerate(serving.TOKEN_SHIFT_MAX_LOG):
            assert np.abs(shift[:, j] - 0.5 * gap[j]).max() <= bound + 1e-5
        # the other mix's answers lie well inside the range: a fifth of the episodes beyond them
        beyond = np.sign(gap[1]) * (shift[:, 1] - gap[1]) > 0
        assert beyond.mean() == pytest.approx((serving.TOKEN_SHIFT_MAX_LOG[1] - 0.5 * abs(gap[1])) / (2 * serving.TOKEN_SHIFT_MAX_LOG[1]), abs=0.03)


def test_a_token_shift_changes_the_service_and_nothing_else_when_zero(env, params):
    """Longer answers (a +1.5 output log-mean shift) cut a replica's capacity and raise
    latency at the same arrivals; a zero shift gives exactly the unshifted episode."""
    base = params.replace(random_start=0.0, start_time_s=10 * 3600.0)
    _, state = env.reset(jax.random.key(0), base)

    def run(s):
        def tick_fn(s, k):
            _, s, _, _, _, info = env.step(k, s, 0, base)
            m = info["metrics"]
            return s, jnp.stack([m["arrivals"], m["capacity_rps"], m["e2e_mean_s"], m["reward"]])
        return np.asarray(jax.lax.scan(tick_fn, s, jax.random.split(jax.random.key(1), 40))[1], np.float64)

    plain = run(state)
    np.testing.assert_array_equal(run(state.replace(token_shift=jnp.zeros((2,), jnp.float32))), plain)
    longer = run(state.replace(token_shift=jnp.asarray([0.0, 1.5], jnp.float32)))
    np.testing.assert_allclose(longer[:, 0], plain[:, 0], rtol=1e-6)  # the same arrivals
    assert (longer[:, 1] < 0.6 * plain[:, 1]).all()  # e^1.5 = 4.5x the answer tokens
    assert longer[:, 2].mean() > plain[:, 2].mean()


def test_a_token_shift_with_an_onset_sets_in_midway(env, params):
    """A shift whose onset is 20 ticks into the episode: the first 20 ticks are the
    unshifted episode's exactly, and from then on capacity falls as with the shift from
    the start; onsets drawn in token_shift_onset_prob of the episodes lie inside it."""
    base = params.replace(random_start=0.0, start_time_s=10 * 3600.0)
    _, state = env.reset(jax.random.key(0), base)
    shift = jnp.asarray([0.0, 1.5], jnp.float32)

    def run(s):
        def tick_fn(s, k):
            _, s, _, _, _, info = env.step(k, s, 0, base)
            return s, info["metrics"]["capacity_rps"]
        return np.asarray(jax.lax.scan(tick_fn, s, jax.random.split(jax.random.key(1), 40))[1], np.float64)

    plain, shifted = run(state), run(state.replace(token_shift=shift))
    midway = run(state.replace(token_shift=shift, token_shift_onset_s=jnp.float32(20 * base.tick_s)))
    np.testing.assert_array_equal(midway[:20], plain[:20])
    assert (midway[21:] < 0.6 * plain[21:]).all() and (shifted[:20] < 0.6 * plain[:20]).all()

    keys = jax.random.split(jax.random.key(7), 2000)
    onsets = np.asarray(jax.vmap(lambda k: env.reset_state(k, params.replace(token_shift_prob=1.0, token_shift_onset_prob=0.5)).token_shift_onset_s)(keys))
    episode_s = float(params.max_steps_in_episode * params.tick_s)
    assert (onsets > 0).mean() == pytest.approx(0.5, abs=0.04)
    assert onsets.max() <= episode_s and np.median(onsets[onsets > 0]) == pytest.approx(episode_s / 2, rel=0.1)


def steady_counts(env, params, burst_shift):
    """3,000 ticks' arrival counts of a node at a steady 200 req/s (no daily shape), its
    episode's burst shift set to `burst_shift` (None: as reset drew it)."""
    base = params.replace(random_start=0.0, start_time_s=10 * 3600.0, max_steps_in_episode=100_000,
                          traffic=params.traffic.replace(mean_rate_rps=200.0, diurnal_peak_to_trough=1.0, weekend_factor=1.0))
    _, state = env.reset(jax.random.key(0), base)
    if burst_shift is not None:
        state = state.replace(burst_shift=jnp.asarray(burst_shift, jnp.float32))

    def tick_fn(s, k):
        _, s, _, _, _, info = env.step(k, s, 0, base)
        return s, info["metrics"]["arrivals"]
    return np.asarray(jax.lax.scan(tick_fn, state, jax.random.split(jax.random.key(1), 3000))[1], np.float64)


def cv(x: np.ndarray) -> float:
    return float(x.std() / x.mean())


def test_burst_shifts_give_a_chat_node_the_code_traces_bursts(env, params):
    """One episode in burst_shift_prob carries the code trace's burst process: a
    conversation node's 30 s counts then swing with CV about 1.27 instead of 0.22 around
    the same expected rate; without it the episode is exactly as before."""
    keys = jax.random.split(jax.random.key(5), 4000)
    drawn = jax.vmap(lambda k: env.reset_state(k, params.replace(burst_shift_prob=0.3)))(keys)
    assert np.asarray(drawn.burst_shift).mean() == pytest.approx(0.3, abs=0.03)
    assert set(np.unique(np.asarray(drawn.burst_shift))) == {0.0, 1.0}

    plain, bursty = steady_counts(env, params, 0.0), steady_counts(env, params, 1.0)
    np.testing.assert_array_equal(steady_counts(env, params, None), plain)
    assert cv(plain) == pytest.approx(0.22, abs=0.05)
    assert cv(bursty) == pytest.approx(1.27, rel=0.25)
    assert bursty.mean() == pytest.approx(plain.mean(), rel=0.15)


def test_smooth_shifts_give_a_code_node_the_conversation_traces_arrivals(env, params):
    """A code node's shift is drawn with smooth_shift_prob (burst_shift_prob is a chat
    node's) and carries the conversation trace's smooth process: its 30 s counts swing with
    CV about 0.22 instead of 1.27 around the same expected rate."""
    code = params.replace(traffic=params.traffic.replace(**{k: jnp.float32(v) for k, v in serving.BURSTY.items()}))
    keys = jax.random.split(jax.random.key(5), 4000)
    draw = lambda p: np.asarray(jax.vmap(lambda k: env.reset_state(k, p))(keys).burst_shift).mean()  # noqa: E731
    assert draw(code.replace(burst_shift_prob=0.9)) == 0.0
    assert draw(code.replace(smooth_shift_prob=0.3)) == pytest.approx(0.3, abs=0.03)
    assert draw(params.replace(smooth_shift_prob=0.9)) == 0.0

    own, smooth = steady_counts(env, code, 0.0), steady_counts(env, code, 1.0)
    assert cv(own) == pytest.approx(1.27, rel=0.25)
    assert cv(smooth) == pytest.approx(0.22, abs=0.05)
    assert smooth.mean() == pytest.approx(own.mean(), rel=0.15)


# --------------------------------------------------------------------------------------
# Training starting fleets
# --------------------------------------------------------------------------------------


def test_starting_fleets_are_drawn_across_the_replica_limits_and_sized(params):
    """In random_fleet_prob of the episodes the fleet starts at a whole number of replicas,
    every size from min_replicas to max_replicas about equally often, with the CPU and memory
    that size it; the other episodes start from the node's initial allocation, and at 0 every
    episode does, with the start time drawn as before."""
    env = serving.ServingNodeEnv()
    p = params.replace(min_replicas=1.0, max_replicas=12.0, random_start=1.0)
    keys = jax.random.split(jax.random.key(7), 6000)
    drawn = jax.vmap(lambda k: env.reset_state(k, p.replace(random_fleet_prob=0.5)))(keys)
    plain = jax.vmap(lambda k: env.reset_state(k, p))(keys)
    replicas = np.asarray(drawn.replicas_ready)
    changed = (replicas != np.asarray(plain.replicas_ready)) | (np.asarray(drawn.cpu_cores) != np.asarray(plain.cpu_cores))
    assert changed.mean() == pytest.approx(0.5 * (1 - 1 / 12), abs=0.03)  # a draw of the initial size changes nothing
    sizes, counts = np.unique(replicas[changed], return_counts=True)
    assert sizes.tolist() == [float(n) for n in range(1, 13) if n != float(p.initial_replicas)]
    assert counts.min() > 0.6 * counts.mean()
    np.testing.assert_array_equal(np.asarray(drawn.cpu_cores)[changed], np.asarray(sizing.cores_for(p, replicas[changed])))
    np.testing.assert_array_equal(np.asarray(drawn.host_memory_gb)[changed], np.asarray(sizing.memory_for(p, replicas[changed])))
    assert (np.asarray(plain.replicas_ready) == float(p.initial_replicas)).all()
    assert (np.asarray(plain.cpu_cores) == float(p.initial_cpu_cores)).all()
    np.testing.assert_array_equal(np.asarray(drawn.clock_s), np.asarray(plain.clock_s))
