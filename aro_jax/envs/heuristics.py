"""Heuristic baselines as pure policies: (policy_state, raw_obs, params) -> (action, policy_state).

They read only what an operator's dashboard shows (the raw observation, OBS_FIELDS) and
the node's static description (EnvParams), so they run inside jit next to the learned
policies and could run in the deployment agent too. One action per tick, like the agent.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax.numpy as jnp

from aro_jax import contract as ct
from aro_jax.envs import sizing
from aro_jax.envs.params import EnvParams, e2e_budget
from aro_jax.envs.traffic import peak_rate_rps

_F = ct.FIELD_INDEX
# Kubernetes HPA defaults: 10% tolerance, scale up at once, scale down on the highest
# recommendation of the stabilisation window (BLIS autoscaler config: 240 s).
HPA_TOLERANCE = 0.1
HPA_TARGET_LOAD = 0.7
HPA_SCALE_DOWN_WINDOW_S = 240.0
PREDICTIVE_HEADROOM = 1.0 / HPA_TARGET_LOAD - 1.0  # plan for the same target load as the HPA


class Policy(NamedTuple):
    """A pure policy. `init(params)` gives its state; `act(state, raw_obs, params)`."""

    init: Callable[[EnvParams], Any]
    act: Callable[[Any, Any, EnvParams], tuple[Any, Any]]


def _allocation_actions(obs, params, target_replicas, target_cores, target_memory_gb):
    """Move one step toward a target allocation: GPUs first, then CPU, then memory."""
    total = obs[_F["replicas_ready"]] + obs[_F["replicas_pending"]]
    ready = obs[_F["replicas_ready"]]
    cores, mem = obs[_F["cpu_cores"]], obs[_F["host_memory_gb"]]
    return jnp.select(
        [
            total < target_replicas,
            ready > target_replicas,
            cores < target_cores,
            cores - params.cpu_step_cores >= target_cores,
            mem < target_memory_gb,
            mem - params.memory_step_gb >= target_memory_gb,
        ],
        [ct.INC_GPU, ct.DEC_GPU, ct.INC_CPU, ct.DEC_CPU, ct.INC_MEM, ct.DEC_MEM],
        ct.MAINTAIN,
    )


def static_policy(sized_for: str, utilisation: float = sizing.TARGET_UTILISATION) -> Policy:
    """A fixed allocation sized for the mean or the peak rate at `utilisation` of capacity."""

    def act(pstate, obs, params):
        rate = params.traffic.mean_rate_rps if sized_for == "mean" else peak_rate_rps(params.traffic)
        replicas = sizing.replicas_for_rate(params, rate, utilisation)
        action = _allocation_actions(obs, params, replicas, sizing.cores_for(params, replicas), sizing.memory_for(params, replicas))
        return action, pstate

    return Policy(init=lambda params: jnp.zeros(()), act=act)


def _overflow_actions(obs, params, load, action, calm_load=HPA_TARGET_LOAD):
    """At the replica limit and overloaded: forward to the peer; pull back once calm."""
    at_limit = obs[_F["replicas_ready"]] + obs[_F["replicas_pending"]] >= params.max_replicas
    fwd = obs[_F["forward_fraction"]]
    action = jnp.where((action == ct.MAINTAIN) & at_limit & (load > 1.0), ct.REBALANCE, action)
    return jnp.where((action == ct.MAINTAIN) & (fwd > 0) & (load < calm_load), ct.PULL_BACK, action)


def reactive_policy(tick_s: float = 30.0, target_load: float = HPA_TARGET_LOAD) -> Policy:
    """Kubernetes HPA on load = request rate / capacity: desired = ceil(current * load /
    target_load), no change within the tolerance, scale-down on the window's highest
    recommendation; plus thresholds on latency (SLO) and dropped requests that force a
    scale-up, and CPU/memory scaled on their utilisation."""
    window = max(int(round(HPA_SCALE_DOWN_WINDOW_S / tick_s)), 1)

    def init(params):
        return jnp.full((window,), params.initial_replicas)

    def act(recent_desired, obs, params):
        ready = obs[_F["replicas_ready"]]
        total = ready + obs[_F["replicas_pending"]]
        capacity = jnp.maximum(obs[_F["capacity_rps"]], 1e-6)
        load = obs[_F["request_rate_rps"]] / capacity
        ratio = load / target_load
        desired = jnp.where(jnp.abs(ratio - 1.0) <= HPA_TOLERANCE, ready, jnp.ceil(ready * ratio))
        # Latency counts as a breach only when load-induced (busy GPUs), else adding
        # replicas cannot fix it and HPA would scale to the limit for nothing.
        slow = (obs[_F["latency_e2e_mean_s"]] > e2e_budget(params)) & (obs[_F["gpu_util"]] > target_load)
        breach = slow | (obs[_F["drop_fraction"]] > 0.01)
        desired = jnp.where(breach, jnp.maximum(desired, ready + 1), desired)
        desired = jnp.clip(desired, params.min_replicas, params.max_replicas)
        recent_desired = jnp.concatenate([recent_desired[1:], desired[None]])
        scale_down_to = jnp.max(recent_desired)
        cpu_util, mem_util = obs[_F["cpu_util"]], obs[_F["memory_util"]]
        action = jnp.select(
            # A CPU-bound node shows high load too: relieve the CPU before adding GPUs.
            [cpu_util > 0.8, desired > total, scale_down_to < ready, mem_util > 0.9, cpu_util < 0.4, mem_util < 0.4],
            [ct.INC_CPU, ct.INC_GPU, ct.DEC_GPU, ct.INC_MEM, ct.DEC_CPU, ct.DEC_MEM],
            ct.MAINTAIN,
        )
        return _overflow_actions(obs, params, load, action, target_load), recent_desired

    return Policy(init=init, act=act)


def predictive_policy(tick_s: float = 30.0, headroom: float = PREDICTIVE_HEADROOM) -> Policy:
    """Capacity planning on the forecast at the cold-start horizon plus headroom, with CPU
    and memory planned for that many replicas and the weights cached in host memory so
    scale-ups start fast; scale-down waits out the same stabilisation window as the HPA."""
    window = max(int(round(HPA_SCALE_DOWN_WINDOW_S / tick_s)), 1)

    def init(params):
        return jnp.full((window,), params.initial_replicas)

    def act(recent_targets, obs, params):
        rate = obs[_F["forecast_rate_rps"]]
        target = sizing.replicas_for_rate(params, rate * (1.0 + headroom), 1.0)
        recent_targets = jnp.concatenate([recent_targets[1:], target[None]])
        replicas = jnp.max(recent_targets)
        action = _allocation_actions(obs, params, replicas, sizing.cores_for(params, replicas), sizing.memory_for(params, replicas, True))
        load = obs[_F["request_rate_rps"]] / jnp.maximum(obs[_F["capacity_rps"]], 1e-6)
        return _overflow_actions(obs, params, load, action), recent_targets

    return Policy(init=init, act=act)


# The tier rule's thresholds, tuned once on the training scenario (diurnal) for the best
# goodput per dollar of Reactive + tier and frozen: benchmarks/tier_thresholds.md.
TIER_DEGRADE_LOAD = 0.9
TIER_RESTORE_LOAD = 0.4


def with_quality_tier(base: Policy, degrade_load: float = TIER_DEGRADE_LOAD, restore_load: float = TIER_RESTORE_LOAD) -> Policy:
    """`base` plus a best-effort degrade rule on load, latency and drop thresholds (the rules
    Jha et al. compare against): when the base policy keeps its allocation and the node is
    overloaded (load above `degrade_load`, latency over the SLO budget, or drops), move a
    step of requests to the small model; restore a step once load is below `restore_load`
    with no drops and latency within budget. Scaling decisions of the base come first.
    The thresholds live in the policy state, so a sweep over them compiles once."""

    def init(params):
        return base.init(params), jnp.array([degrade_load, restore_load], jnp.float32)

    def act(pstate, obs, params):
        base_state, thresholds = pstate
        action, base_state = base.act(base_state, obs, params)
        load = obs[_F["request_rate_rps"]] / jnp.maximum(obs[_F["capacity_rps"]], 1e-6)
        slow = obs[_F["latency_e2e_mean_s"]] > e2e_budget(params)
        dropping = obs[_F["drop_fraction"]] > 0.0
        small = obs[_F["small_model_fraction"]]
        overloaded = (load > thresholds[0]) | slow | dropping
        calm = (load < thresholds[1]) & ~slow & ~dropping
        idle = (action == ct.MAINTAIN) | (action == ct.PULL_BACK)
        action = jnp.where(idle & overloaded & (small < params.max_small_model_fraction), ct.DEGRADE, action)
        action = jnp.where((action == ct.MAINTAIN) & calm & (small > 0), ct.RESTORE, action)
        return action, (base_state, thresholds)

    return Policy(init=init, act=act)


# The spill-over rule's threshold, tuned once on the training scenario like the tier's and
# frozen: benchmarks/spill_threshold.md.
SPILL_LOAD = 1.0


def with_spillover(base: Policy, spill_load: float = SPILL_LOAD) -> Policy:
    """`base` plus capacity-based spill-over routing, the rule of a global load balancer
    that fills the nearest region up to a capacity share and sends the excess to the next
    (Google Cloud's WATERFALL_BY_REGION): serve up to `spill_load` of the region's capacity
    locally and forward the excess to peers of the same model, one forward step per tick
    toward that share. `base` sizes the region for what it serves (its observed and
    forecast rates scaled by the share kept), so below its own target load forwarding
    replaces replicas, paid at the peer's price plus egress. It replaces base's at-limit
    overflow rule, so forwarding starts below the replica limit. The threshold lives in
    the policy state, so a sweep over it compiles once."""
    rates = jnp.array([_F["request_rate_rps"], _F["forecast_rate_rps"]])

    def init(params):
        return base.init(params), jnp.array([spill_load], jnp.float32)

    def act(pstate, obs, params):
        base_state, threshold = pstate
        fwd = obs[_F["forward_fraction"]]
        action, base_state = base.act(base_state, jnp.asarray(obs).at[rates].multiply(1.0 - fwd), params)
        load = obs[_F["request_rate_rps"]] / jnp.maximum(obs[_F["capacity_rps"]], 1e-6)
        share = jnp.clip(1.0 - threshold[0] / jnp.maximum(load, 1e-6), 0.0, params.max_forward_fraction)
        half_step = 0.5 * params.forward_step
        keeps = (action == ct.MAINTAIN) | (action == ct.REBALANCE) | (action == ct.PULL_BACK)
        action = jnp.where(keeps, ct.MAINTAIN, action)  # base's overflow rule is replaced
        # Spilling comes before scaling (it relieves the region this tick, a replica only
        # after its cold start); pulling back waits until base keeps its allocation.
        action = jnp.where(fwd < share - half_step, ct.REBALANCE, action)
        action = jnp.where((action == ct.MAINTAIN) & (fwd > share + half_step), ct.PULL_BACK, action)
        return action, (base_state, threshold)

    return Policy(init=init, act=act)


_BASES: dict[str, Callable[..., Policy]] = {
    "static-mean": lambda tick_s=30.0: static_policy("mean"),
    "static-peak": lambda tick_s=30.0: static_policy("peak"),
    "reactive": reactive_policy,
    "predictive": predictive_policy,
}
# The autoscalers also with spill-over routing ("<name>+spill"), so a learned policy that
# forwards below the replica limit is compared with heuristics that do too.
_BASES |= {f"{name}+spill": (lambda make: lambda tick_s=30.0: with_spillover(make(tick_s)))(_BASES[name]) for name in ("reactive", "predictive")}
# Every baseline also with the tier rule ("<name>+tier"), so a learned policy that may
# degrade quality is compared with heuristics that may too.
HEURISTICS: dict[str, Callable[..., Policy]] = {
    **_BASES,
    **{f"{name}+tier": (lambda make: lambda tick_s=30.0: with_quality_tier(make(tick_s)))(make) for name, make in _BASES.items()},
}
