"""ServingNode-v0: one LLM inference node (a region's serving cluster) as a gymnax 1.x env.

One env instance is one node: replicas of one model on one GPU type, CPU cores and host
memory, a request queue, a peer link for rebalancing, and a smaller model for a degraded
quality tier. Each step is one decision tick (30 s by default) of the fluid serving model
(`fluid.py`); what the policy observes and may do is `aro_jax.contract`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import environment, spaces

from aro_jax import contract
from aro_jax.contract import (  # noqa: F401  (the env's contract, also importable from here)
    ACTION_SETS, DEC_CPU, DEC_GPU, DEC_MEM, DEGRADE, ENV_VERSION, EXTENDED_ACTIONS, INC_CPU, INC_GPU, INC_MEM,
    DESCRIPTOR_NAMES, MAINTAIN, OBS_FIELDS, PAPER_ACTIONS, POLICY_INPUT_DIM, PULL_BACK, REBALANCE, RESTORE,
)
from aro_jax.envs import fluid, scenarios, sizing
from aro_jax.envs.autoreset import StateObservedEnv
from aro_jax.envs import forecast as fc
from aro_jax.envs.params import EnvParams, e2e_budget
from aro_jax.envs.traffic import arrivals_ar, at_tick, expected_rate_rps, rejected_share

# What `info="slim"` keeps of a step's metrics: what the training log's KPIs and the
# constrained objective's costs read (training.trainers), 9 floats.
SLIM_METRICS = ("arrivals", "served", "forwarded", "dropped", "rejected", "e2e_mean_s", "slo_attainment", "cost_usd", "quality")
PENDING_SLOTS = 16  # cold-start pipeline length in ticks: 16 x 30 s covers N(240 s, 30 s) + 3 sd


@struct.dataclass
class EnvState(environment.EnvState):
    time: int
    clock_s: jax.Array  # UTC seconds since Monday 00:00 of week 0
    replicas_ready: jax.Array
    replicas_pending: jax.Array  # (PENDING_SLOTS,) replicas ready after i+1 more ticks
    replicas_draining: jax.Array
    cpu_cores: jax.Array
    host_memory_gb: jax.Array
    weights_cache_gb: jax.Array  # the model weights' copy in host memory (begin_tick)
    forward_fraction: jax.Array
    small_model_fraction: jax.Array  # the tier's target share of requests
    small_active_fraction: jax.Array  # the share the GPUs are split for now
    tier_switch_left_s: jax.Array  # time until the GPUs moving to the target share serve
    burst_z: jax.Array  # log-AR(1) burst state of the arrivals
    surge: jax.Array  # (start s, end s, demand multiplier) of the episode's surge; multiplier 1: none
    token_shift: jax.Array  # (input, output) log-mean offsets of the episode's token lengths; 0: none
    token_shift_onset_s: jax.Array  # seconds into the episode at which the shift sets in; 0: from the start
    burst_shift: jax.Array  # 1: the episode's arrivals follow the other workload's burst process (with_burst_shift); 0: the region's own
    demand_phase_s: jax.Array  # how far the episode's demand runs ahead of its daily shape; 0: none
    demand_scale: jax.Array  # the episode's demand over the region's planned demand; 1: as planned
    queue_requests: jax.Array
    forecast: fc.ForecastState
    last: dict[str, jax.Array]  # the previous tick's metrics (what an operator observes)



class ServingNodeEnv(StateObservedEnv):
    """One LLM inference node. `action_set` is "extended" (11 actions) or "paper" (5)."""

    def __init__(self, action_set: str = "extended", info: str = "full", stagger: bool = False):
        """`info="slim"`: step's info carries only SLIM_METRICS (trainers that store the
        whole info tree every step); `stagger`: `reset` starts the episode's tick counter at
        a random point of the episode, so a batch's first episodes end at different steps
        and later ones (auto-reset, full length) stay staggered."""
        super().__init__()
        if action_set not in ACTION_SETS:
            raise ValueError(f"action_set must be one of {sorted(ACTION_SETS)}, got {action_set!r}")
        if info not in ("full", "slim"):
            raise ValueError(f"info must be 'full' or 'slim', got {info!r}")
        self.action_set = action_set
        self.action_names = ACTION_SETS[action_set]
        self.info = info
        self.stagger = stagger

    @partial(jax.jit, static_argnames=("self",))
    def reset(self, key: jax.Array, params: EnvParams | None = None) -> tuple[jax.Array, EnvState]:
        params = self.default_params if params is None else params
        k_reset, k_time = jax.random.split(key) if self.stagger else (key, None)
        obs, state = self.reset_env(k_reset, params)
        if self.stagger:  # the auto-reset starts full episodes: only first episodes are cut
            state = state.replace(time=jax.random.randint(k_time, (), 0, params.max_steps_in_episode))
        return obs, state

    @property
    def name(self) -> str:
        return "ServingNode-v0"

    @property
    def num_actions(self) -> int:
        return len(self.action_names)

    @property
    def default_params(self) -> EnvParams:
        return scenarios.default_node_params()

    def action_space(self, params: EnvParams | None = None) -> spaces.Discrete:
        return spaces.Discrete(self.num_actions)

    def observation_space(self, params: EnvParams) -> spaces.Box:
        return spaces.Box(-jnp.inf, jnp.inf, (POLICY_INPUT_DIM,), jnp.float32)

    def reset_state(self, key: jax.Array, params: EnvParams) -> EnvState:
        """The state an episode starts in (the forecaster's prior is the node's mean rate)."""
        week_s = 7 * 86_400.0
        tick = params.tick_s
        random_start = jnp.floor(jax.random.uniform(key, (), maxval=week_s) / tick) * tick
        clock_s = jnp.where(params.random_start > 0.5, random_start, params.start_time_s)
        demand_phase_s = draw_demand_phase(jax.random.fold_in(key, 4), params)
        demand_scale = draw_demand_scale(jax.random.fold_in(key, 5), params)
        rate = expected_rate_rps(clock_s, episode_demand(params.traffic, demand_phase_s, demand_scale))
        # Strong float32 (not weakly typed Python floats from params), so a reset state and
        # a stepped state have the same types and a jitted step does not retrace.
        replicas, cpu_cores, host_memory_gb = draw_start_fleet(jax.random.fold_in(key, 3), params)
        zeros = jnp.zeros(())
        # A reset state is computed on every step (auto-reset under vmap is a select), so
        # the first tick's metrics are cheap: the expected load against the initial
        # capacity, no latency yet.
        token_shift = draw_token_shift(jax.random.fold_in(key, 2), params)
        token_shift_onset_s = draw_token_shift_onset(jax.random.fold_in(key, 7), params)
        shift_prob = jnp.where(is_bursty(params.traffic), params.smooth_shift_prob, params.burst_shift_prob)
        burst_shift = (jax.random.uniform(jax.random.fold_in(key, 6)) < shift_prob).astype(jnp.float32)
        capacity = replicas * fluid.replica_capacity_rps(with_token_shift(params, token_shift_at(0.0, token_shift, token_shift_onset_s)))
        last = {
            "arrivals": rate * tick,
            "e2e_mean_s": zeros,
            "cpu_util": zeros,
            "gpu_util": jnp.minimum(rate / jnp.maximum(capacity, 1e-9), 1.0),
            "memory_util": zeros,
            "capacity_rps": capacity,
            "drop_fraction": zeros,
            "slo_attainment": jnp.ones(()),
        }
        state = EnvState(
            time=0,
            clock_s=clock_s,
            replicas_ready=replicas,
            replicas_pending=jnp.zeros((PENDING_SLOTS,)),
            replicas_draining=zeros,
            cpu_cores=cpu_cores,
            host_memory_gb=host_memory_gb,
            # A running fleet has had time to cache the weights wherever memory has room.
            weights_cache_gb=weights_room_gb(params, host_memory_gb, replicas),
            forward_fraction=zeros,
            small_model_fraction=zeros,
            small_active_fraction=zeros,
            tier_switch_left_s=zeros,
            burst_z=zeros,  # the burst process starts at its median level
            # Its own stream, so the start time's draw is what it was without surges.
            surge=draw_surge(jax.random.fold_in(key, 1), clock_s, params),
            token_shift=token_shift,
            token_shift_onset_s=token_shift_onset_s,
            burst_shift=burst_shift,
            demand_phase_s=demand_phase_s,
            demand_scale=demand_scale,
            queue_requests=zeros,
            forecast=fc.init(params.traffic.mean_rate_rps),
            last=last,
        )
        return state

    def advance(self, key, state: EnvState, action, params: EnvParams):
        state, metrics, reward = self.transition(key, state, action, params)
        return state, reward, {"metrics": metrics if self.info == "full" else {k: metrics[k] for k in SLIM_METRICS}}

    def transition(self, key, state: EnvState, action, params: EnvParams):
        """(state, metrics, reward) after one tick; step_env without the observation."""
        plan = begin_tick(key, state, action, params)
        peer_load = fluid.peer_load_rps(params, state.clock_s)
        forwarded = jnp.minimum(plan["fwd"] * plan["admitted"], fluid.peer_spare_rps(params, peer_load) * params.tick_s)
        core, queue = serve_planned(plan, state, params, forwarded)
        peer = fluid.modelled_peer(plan["params_tick"], core, forwarded, peer_load)
        return end_tick(state, plan, core, queue, forwarded, peer, params)

    def get_obs(self, state: EnvState, params: EnvParams, key=None) -> jax.Array:
        return policy_input(raw_observation(state, params), params)

    def is_terminated(self, state: EnvState, params: EnvParams) -> jax.Array:
        return jnp.array(False)

    def action_mask(self, state: EnvState, params: EnvParams) -> jax.Array:
        """Feasible actions (bool, one per action) in this state."""
        return feasible_actions(raw_observation(state, params), params)[: self.num_actions]

    def action_mask_from_obs(self, obs: jax.Array, params: EnvParams) -> jax.Array:
        """Feasible actions from (a batch of) this env's observations."""
        return feasible_actions(obs[..., : len(OBS_FIELDS)] * observation_scale(params), params)[..., : self.num_actions]



# Training surges (EnvParams.surge_prob): from half again the demand to the configured
# maximum, which config validation keeps below the held-out flash crowd's 5x (so that
# scenario stays heavier than anything trained on); 10 to 60 minutes, the held-out crowd's
# 30 minutes inside.
SURGE_MIN_MULTIPLIER = 1.5
SURGE_DURATION_S = (600.0, 3600.0)


def draw_surge(key, clock_s, params: EnvParams) -> jax.Array:
    """(start s, end s, multiplier) of an episode's surge, starting at `clock_s`: one in
    `params.surge_prob` episodes has one (multiplier 1 otherwise), placed uniformly so it
    ends within the episode."""
    u_on, u_size, u_length, u_at = jax.random.uniform(key, (4,))
    duration = SURGE_DURATION_S[0] + u_length * (SURGE_DURATION_S[1] - SURGE_DURATION_S[0])
    start = clock_s + u_at * jnp.maximum(params.max_steps_in_episode * params.tick_s - duration, 0.0)
    size = SURGE_MIN_MULTIPLIER + u_size * (params.surge_max_multiplier - SURGE_MIN_MULTIPLIER)
    return jnp.stack([start, start + duration, jnp.where(u_on < params.surge_prob, size, 1.0)]).astype(jnp.float32)


def surged(traffic, surge):
    """The node's traffic with the episode's surge as its flash crowd (where it has one)."""
    start, end, multiplier = surge[0], surge[1], surge[2]
    on = multiplier > 1.0
    return traffic.replace(
        flash_start_s=jnp.where(on, start, traffic.flash_start_s),
        flash_duration_s=jnp.where(on, end - start, traffic.flash_duration_s),
        flash_multiplier=jnp.where(on, multiplier, traffic.flash_multiplier),
    )


def draw_demand_phase(key, params: EnvParams) -> jax.Array:
    """Seconds an episode's demand runs ahead of its daily and weekly shape: uniform in
    [0, 24 h) in `params.demand_phase_prob` of the episodes, 0 otherwise. A held-out trace
    replayed from Monday 00:00 UTC puts its mean rate on 1-4 am local time in eu-central
    and me-central; trained only on demand that follows the clock, the policy held those
    regions' night-time fleets under it."""
    u_on, u_phase = jax.random.uniform(key, (2,))
    return jnp.where(u_on < params.demand_phase_prob, u_phase * 86_400.0, 0.0).astype(jnp.float32)


def draw_demand_scale(key, params: EnvParams) -> jax.Array:
    """An episode's demand over the region's planned demand: log-uniform in
    [1 / demand_scale_max, demand_scale_max] (exactly 1 when that is 1), so a policy sees
    loads off its region's plan while the descriptor still states the plan
    (benchmarks/unseen_region.md measures it on held-out regions)."""
    u = jax.random.uniform(key, ())
    return jnp.exp((2.0 * u - 1.0) * jnp.log(params.demand_scale_max)).astype(jnp.float32)


def episode_demand(traffic, demand_phase_s, demand_scale):
    """The node's traffic as this episode runs it: its daily and weekly shape
    `demand_phase_s` ahead and its mean rate times `demand_scale` (exact at 0 and 1; a
    trace replay follows its own timeline and counts whatever the phase and scale)."""
    return traffic.replace(tz_offset_h=traffic.tz_offset_h + demand_phase_s / 3600.0,
                           mean_rate_rps=traffic.mean_rate_rps * demand_scale)


def draw_start_fleet(key, params: EnvParams) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(replicas, CPU cores, host memory GB) an episode starts with: the node's initial
    allocation, or in `params.random_fleet_prob` of the episodes a whole number of replicas
    uniform in [min_replicas, max_replicas] with the CPU and memory that size it."""
    u_on, u_size = jax.random.uniform(key, (2,))
    on = u_on < params.random_fleet_prob
    # floor over max - min + 1 equal bins: every whole fleet size equally likely
    drawn = jnp.minimum(params.min_replicas + jnp.floor(u_size * (params.max_replicas - params.min_replicas + 1.0)), params.max_replicas)
    f32 = lambda initial, sized: jnp.where(on, sized, initial).astype(jnp.float32)  # noqa: E731
    return (f32(params.initial_replicas, drawn), f32(params.initial_cpu_cores, sizing.cores_for(params, drawn)),
            f32(params.initial_host_memory_gb, sizing.memory_for(params, drawn)))


# Training token lengths (EnvParams.token_shift_prob): offsets of the log-normal means, up
# to the gap between the two traffic mixes measured on the Azure 2023 traces
# (scenarios.TRAFFIC_MIXES: output log-mean 5.02 chat against 2.79 code, a 2.23 gap; input
# 6.63 against 7.00, widened to 0.75 for the traces' hour-to-hour swings), so that a
# region meets prompts and answers of the other workload's lengths in training.
TOKEN_SHIFT_MAX_LOG = (0.75, 2.3)  # (input, output)


def draw_token_shift(key, params: EnvParams) -> jax.Array:
    """(input, output) log-mean offsets of an episode's token lengths: uniform within
    TOKEN_SHIFT_MAX_LOG of a centre `params.token_shift_toward` of the way to the other
    mix's lengths, in `params.token_shift_prob` of the episodes; zero otherwise."""
    u_on, u_in, u_out = jax.random.uniform(key, (3,))
    centre = params.token_shift_toward * jnp.stack([params.other_mix_input_log_offset, params.other_mix_output_log_offset])
    offsets = centre + (2.0 * jnp.stack([u_in, u_out]) - 1.0) * jnp.asarray(TOKEN_SHIFT_MAX_LOG)
    return jnp.where(u_on < params.token_shift_prob, offsets, 0.0).astype(jnp.float32)


def draw_token_shift_onset(key, params: EnvParams) -> jax.Array:
    """Seconds into the episode at which its token shift sets in: uniform over the episode
    in `params.token_shift_onset_prob` of the episodes, 0 (from the start) otherwise."""
    u_on, u_at = jax.random.uniform(key, (2,))
    onset = u_at * params.max_steps_in_episode * params.tick_s
    return jnp.where(u_on < params.token_shift_onset_prob, onset, 0.0).astype(jnp.float32)


def token_shift_at(elapsed_s, token_shift, onset_s) -> jax.Array:
    """The episode's token shift once `elapsed_s` into it has reached its onset; zero before."""
    return jnp.where(elapsed_s >= onset_s, token_shift, 0.0)


def with_token_shift(params: EnvParams, token_shift) -> EnvParams:
    """The node's params with the episode's token lengths (exact when the shift is zero)."""
    t = params.traffic
    return params.replace(traffic=t.replace(
        input_log_mean=t.input_log_mean + token_shift[0], output_log_mean=t.output_log_mean + token_shift[1],
        replay_input_log_mean=t.replay_input_log_mean + token_shift[0],
        replay_output_log_mean=t.replay_output_log_mean + token_shift[1],
    ))


# Training burstiness (EnvParams.burst_shift_prob, smooth_shift_prob): the two mixes'
# log-AR(1) burst processes, fitted to the Azure 2023 traces' 30 s counts
# (scenarios.TRAFFIC_MIXES: code CV 1.274, lag-1 0.282; conversation 0.217, 0.896).
BURSTY = {k: scenarios.TRAFFIC_MIXES["code"][k] for k in ("burst_cv", "burst_ac1")}
SMOOTH = {k: scenarios.TRAFFIC_MIXES["conversation"][k] for k in ("burst_cv", "burst_ac1")}


def is_bursty(traffic) -> jax.Array:
    """Whether a region's own arrivals are at least as bursty as the code trace's."""
    return traffic.burst_cv >= BURSTY["burst_cv"]


def with_burst_shift(traffic, burst_shift):
    """`traffic` with the other workload's burst process where the episode has a burst
    shift: a chat region meets the code trace's bursts, a code region the conversation
    trace's smooth arrivals (whose sustained load is no burst to wait out)."""
    on = burst_shift > 0.5
    other = {k: jnp.where(is_bursty(traffic), SMOOTH[k], BURSTY[k]) for k in BURSTY}
    return traffic.replace(burst_cv=jnp.where(on, other["burst_cv"], traffic.burst_cv),
                           burst_ac1=jnp.where(on, other["burst_ac1"], traffic.burst_ac1))


def weights_room_gb(params: EnvParams, host_memory_gb, replicas):
    """Host memory (GB) left for the weights' copy beside `replicas` pods, at most the weights."""
    return jnp.clip(host_memory_gb - replicas * fluid.host_memory_per_replica_gb(params), 0.0, params.weights_gb)


def begin_tick(key, state: EnvState, action, params: EnvParams) -> dict:
    """First half of a tick: apply the decision and draw the tick's arrivals. Returns the
    plan `serve_planned` and `end_tick` read (the cluster env routes forwarded requests
    between the halves)."""
    params = with_token_shift(params, token_shift_at(state.time * params.tick_s, state.token_shift, state.token_shift_onset_s))
    # One draw for the tick: the burst innovation, the count's noise, the cold start.
    e_burst, z_count, z_cold = jax.random.normal(key, (3,))
    tick = params.tick_s
    a = jnp.asarray(action, jnp.int32)

    # 1. Apply the decision.
    replicas_total = state.replicas_ready + state.replicas_pending.sum()
    scale_up = (a == INC_GPU) & (replicas_total < params.max_replicas)
    scale_down = (a == DEC_GPU) & (state.replicas_ready > params.min_replicas)
    # A new replica loads from host memory when the weights' copy there is whole and
    # fits beside the pods, its own included; otherwise from remote storage.
    cached = jnp.minimum(state.weights_cache_gb, weights_room_gb(params, state.host_memory_gb, replicas_total + 1)) >= params.weights_gb
    cold_s = params.cold_start_mean_s + params.cold_start_sd_s * z_cold
    cold_s = jnp.where(cached, fluid.cached_cold_start_s(params), cold_s)
    delay_ticks = jnp.clip(jnp.ceil(cold_s / tick), 1, PENDING_SLOTS).astype(jnp.int32)
    slot = jnp.arange(PENDING_SLOTS) == delay_ticks - 1
    pending = state.replicas_pending + jnp.where(scale_up & slot, 1.0, 0.0)
    ready = state.replicas_ready - scale_down.astype(jnp.float32)
    draining = scale_down.astype(jnp.float32)  # a drained replica is billed for one more tick

    step = lambda x, up, down, size, lo, hi: jnp.clip(x + size * ((a == up).astype(jnp.float32) - (a == down)), lo, hi)  # noqa: E731
    min_cores = ready * fluid.cpu_cores_per_replica(params)[0]
    cpu = step(state.cpu_cores, INC_CPU, DEC_CPU, params.cpu_step_cores, params.cpu_step_cores, params.max_cpu_cores)
    cpu = jnp.where(a == DEC_CPU, jnp.maximum(cpu, jnp.minimum(state.cpu_cores, min_cores)), cpu)
    mem = step(state.host_memory_gb, INC_MEM, DEC_MEM, params.memory_step_gb, params.memory_step_gb, params.max_host_memory_gb)
    fwd = step(state.forward_fraction, REBALANCE, PULL_BACK, params.forward_step, 0.0, params.max_forward_fraction)
    small = step(state.small_model_fraction, DEGRADE, RESTORE, params.quality_step, 0.0, params.max_small_model_fraction)

    # Pods: a replica's CPU and memory requests stay within its instance's share
    # (vertical scaling inside the GPU instance; the pods of removed replicas go).
    pod_gpus = (ready + pending.sum()) * params.tensor_parallel
    cpu = jnp.clip(cpu, params.cpu_step_cores, jnp.maximum(pod_gpus * params.vcpus_per_gpu, params.cpu_step_cores))
    mem = jnp.clip(mem, params.memory_step_gb, jnp.maximum(pod_gpus * params.host_memory_gb_per_gpu, params.memory_step_gb))
    billed = ready + pending.sum() + draining
    # The weights' copy is page cache: a resize that leaves it no room beside the pods
    # evicts what does not fit, and it refills from remote storage over a cold start's
    # load time, so memory raised just before a scale-out does not make it fast.
    room = weights_room_gb(params, mem, billed)
    cache = jnp.minimum(jnp.minimum(state.weights_cache_gb, room) + fluid.weights_cache_fill_gb_per_s(params) * tick, room)

    # Quality tier on dedicated small-model GPUs: a new target share restarts the GPUs
    # that change model; until they serve, the old split holds and they serve nothing.
    retarget = small != state.small_model_fraction
    left = jnp.where(retarget, params.tier_switch_s, state.tier_switch_left_s)
    switching = left > 0
    offline = jnp.where(switching, jnp.abs(small_gpu_share(params, small) - small_gpu_share(params, state.small_active_fraction)), 0.0)

    # 2. This tick's traffic.
    demand = with_burst_shift(surged(episode_demand(params.traffic, state.demand_phase_s, state.demand_scale), state.surge), state.burst_shift)
    arrivals, burst_z = arrivals_ar(e_burst, z_count, state.clock_s, tick, demand, state.burst_z)
    # Prompts over the context window are rejected at admission (counted, never capped);
    # the fluid model serves the admitted ones with this tick's token mix.
    rejected = arrivals * rejected_share(state.clock_s, params.traffic)
    params_tick = params.replace(traffic=at_tick(state.clock_s, params.traffic))
    in_outage = (state.clock_s >= params.outage_start_s) & (state.clock_s < params.outage_start_s + params.outage_duration_s)
    serving = ready * jnp.where(in_outage & (params.outage_start_s >= 0), 1.0 - params.outage_capacity_loss, 1.0)
    return dict(
        ready=ready, pending=pending, draining=draining, cpu=cpu, mem=mem, cache=cache, fwd=fwd, small=small, left=left, offline=offline,
        arrivals=arrivals, admitted=arrivals - rejected, rejected=rejected, burst_z=burst_z, params_tick=params_tick,
        serving=serving, billed=billed,
    )


def serve_planned(plan: dict, state: EnvState, params: EnvParams, forwarded, incoming=None, incoming_rtt_s=0.0):
    """The node serves its kept arrivals (and `incoming` requests from peers): fluid.serve_tick."""
    return fluid.serve_tick(
        plan["params_tick"], plan["admitted"] - forwarded, state.queue_requests, plan["serving"], plan["cpu"], plan["mem"],
        plan["billed"], state.small_active_fraction, plan["offline"], incoming, incoming_rtt_s, plan["cache"],
    )


def end_tick(state: EnvState, plan: dict, core: dict, queue, forwarded, peer: dict, params: EnvParams):
    """Second half of a tick: the forwarded requests' outcome (`peer`, fluid.with_forwarded),
    rejects, the forecaster and the reward. Returns (state, metrics, reward)."""
    tick = params.tick_s
    params_tick = plan["params_tick"]
    rejected = plan["rejected"]
    metrics = fluid.with_forwarded(params_tick, core, forwarded, peer)
    # Rejected prompts miss their SLO: attainment over all of the node's own attempts.
    attempted = metrics["served"] + metrics["forwarded"] + core["dropped_own"] + rejected
    met = metrics["slo_attainment"] * (attempted - rejected)
    metrics = {
        **metrics, "arrivals": plan["arrivals"], "rejected": rejected,
        "slo_attainment": jnp.where(attempted > 0, met / jnp.maximum(attempted, 1e-9), 1.0),
    }
    left = jnp.maximum(plan["left"] - tick, 0.0)
    small_active = jnp.where(left <= 0, plan["small"], state.small_active_fraction)

    # 3. Replicas finishing their cold start serve from the next tick.
    pending = plan["pending"]
    ready = plan["ready"] + pending[0]
    pending = jnp.concatenate([pending[1:], jnp.zeros((1,))])

    local_clock = state.clock_s + params.traffic.tz_offset_h * 3600.0
    forecast = fc.update(state.forecast, local_clock, plan["arrivals"] / tick)
    reward = reward_fn(metrics, params_tick)
    metrics = {**metrics, "reward": reward, "replicas_ready": ready, "replicas_billed": plan["billed"]}
    new_state = EnvState(
        time=state.time + 1,
        clock_s=state.clock_s + tick,
        replicas_ready=ready,
        replicas_pending=pending,
        replicas_draining=plan["draining"],
        cpu_cores=plan["cpu"],
        host_memory_gb=plan["mem"],
        weights_cache_gb=plan["cache"],
        forward_fraction=plan["fwd"],
        small_model_fraction=plan["small"],
        small_active_fraction=small_active,
        tier_switch_left_s=left,
        burst_z=plan["burst_z"],
        surge=state.surge,
        token_shift=state.token_shift,
        token_shift_onset_s=state.token_shift_onset_s,
        burst_shift=state.burst_shift,
        demand_phase_s=state.demand_phase_s,
        demand_scale=state.demand_scale,
        queue_requests=queue,
        forecast=forecast,
        last=_observed(metrics),
    )
    return new_state, metrics, reward


def small_gpu_share(params: EnvParams, small_fraction):
    """Share of a node's GPUs that run the small model when `small_fraction` of the
    requests go to it and both pools run at the same load."""
    tokens = fluid.token_moments(params.traffic)
    big = fluid._instance_model(params.model, tokens)[-1] * params.model.instances_per_replica
    small = fluid._instance_model(params.small_model, tokens)[-1] * params.small_model.instances_per_replica
    need_small = small_fraction / small
    return need_small / jnp.maximum((1.0 - small_fraction) / big + need_small, 1e-12)


def feasible_actions(raw_obs: jax.Array, params: EnvParams) -> jax.Array:
    """`contract.feasible_actions` on a node's EnvParams (its limits)."""
    return contract.feasible_actions(raw_obs, params, xp=jnp)


def reward_fn(metrics: dict[str, jax.Array], params: EnvParams) -> jax.Array:
    """ARO reward: alpha * throughput + beta * (1 - latency) - cost_weight * cost (the paper's
    gamma), each in [0, ~1], minus penalties for SLO misses and for quality lost to the small
    model (weights in params.reward). Throughput is the share of demand served (locally or by a
    peer); latency is mean end-to-end latency over the SLO-implied end-to-end budget; cost
    is $/h over the node's static-for-peak cost."""
    demand = jnp.maximum(metrics["arrivals"], 1e-9)
    served_share = jnp.where(metrics["arrivals"] > 0, (metrics["served"] + metrics["forwarded"]) / demand, 1.0)
    e2e_budget_s = e2e_budget(params)
    latency = jnp.clip(metrics["e2e_mean_s"] / e2e_budget_s, 0.0, 1.0)
    cost = metrics["cost_usd"] * 3600.0 / params.tick_s / params.cost_ref_usd_per_h
    misses = 1.0 - metrics["slo_attainment"]
    quality_loss = 1.0 - metrics["quality"]
    w = params.reward
    return (
        w.alpha * served_share + w.beta * (1.0 - latency) - w.cost_weight * cost
        - w.slo_penalty * misses - w.quality_penalty * quality_loss
    )


def _observed(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
    arrivals = jnp.maximum(metrics["arrivals"], 1e-9)
    return {
        "arrivals": metrics["arrivals"],
        "e2e_mean_s": metrics["e2e_mean_s"],
        "cpu_util": metrics["cpu_util"],
        "gpu_util": metrics["gpu_util"],
        "memory_util": metrics["memory_util"],
        "capacity_rps": metrics["capacity_rps"],
        # Timeouts of earlier ticks' requests can outnumber this tick's arrivals; the share is
        # capped at 1, as the deployment's control loop caps its estimate (the field's domain).
        "drop_fraction": jnp.where(metrics["arrivals"] > 0, jnp.minimum(metrics["dropped"] / arrivals, 1.0), 0.0),
        "slo_attainment": metrics["slo_attainment"],
    }


def raw_observation(state: EnvState, params: EnvParams) -> jax.Array:
    """The live metrics an operator sees, in OBS_FIELDS order and natural units."""
    last = state.last
    local = state.clock_s + params.traffic.tz_offset_h * 3600.0
    phi = fc.time_features(local)
    cos_d, sin_d, cos_w, sin_w = phi[fc.COS_DAY], phi[fc.SIN_DAY], phi[fc.COS_WEEK], phi[fc.SIN_WEEK]
    fcast = fc.predict_from_features(state.forecast, phi, params.forecast_horizon_s, params.tick_s)
    return jnp.stack([
        last["arrivals"] / params.tick_s,
        last["e2e_mean_s"],
        last["cpu_util"],
        last["gpu_util"],
        last["memory_util"],
        state.queue_requests,
        state.replicas_ready,
        state.replicas_pending.sum(),
        state.cpu_cores,
        state.host_memory_gb,
        state.forward_fraction,
        state.small_model_fraction,
        last["capacity_rps"],
        sin_d,
        cos_d,
        sin_w,
        cos_w,
        fcast,
        last["drop_fraction"],
        last["slo_attainment"],
    ]).astype(jnp.float32)


def node_descriptor(params: EnvParams) -> jax.Array:
    """The node's contract.DESCRIPTOR_FIELDS, natural units (exported with policies)."""
    return jnp.stack([
        params.weights_gb, params.tensor_parallel, params.replica_price_usd_per_h / params.tensor_parallel,
        params.model.kv_capacity_tokens, params.slo_ttft_s, params.slo_target, params.rate_ref_rps,
        params.max_replicas,
    ]).astype(jnp.float32)


def policy_input(raw_obs: jax.Array, params: EnvParams) -> jax.Array:
    """What the policy sees: raw observations (..., OBS_FIELDS) over the node's scale,
    then its descriptor's features (contract.POLICY_INPUT_DIM)."""
    features = contract.descriptor_features(node_descriptor(params), xp=jnp)
    features = jnp.broadcast_to(features, raw_obs.shape[:-1] + features.shape)
    return jnp.concatenate([raw_obs / observation_scale(params), features], axis=-1).astype(jnp.float32)


def observation_scale(params: EnvParams) -> jax.Array:
    """Divisors that make each raw field O(1) for this node (exported with policies)."""
    rate = params.rate_ref_rps
    e2e_budget_s = e2e_budget(params)
    one = jnp.ones(())
    return jnp.stack([
        rate, e2e_budget_s, one, one, one, rate * params.tick_s, params.max_replicas, params.max_replicas,
        params.max_cpu_cores, params.max_host_memory_gb, one, one, rate, one, one, one, one, rate, one, one,
    ]).astype(jnp.float32)
