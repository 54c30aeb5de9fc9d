"""Capacity sizing from the fluid model: replicas, cores and host memory for a rate."""

from __future__ import annotations

import jax.numpy as jnp

from aro_jax.envs.fluid import cpu_cores_per_replica, host_memory_per_replica_gb, replica_capacity_rps
from aro_jax.envs.params import EnvParams


TARGET_UTILISATION = 0.8  # sizing headroom for static allocations, as in HPA targets


def replicas_for_rate(params: EnvParams, rate_rps, utilisation=TARGET_UTILISATION):
    """Replicas needed to serve `rate_rps` at `utilisation` of capacity (float, in limits)."""
    per_replica = replica_capacity_rps(params)
    return jnp.clip(jnp.ceil(rate_rps / (per_replica * utilisation)), params.min_replicas, params.max_replicas)


def cores_for(params: EnvParams, replicas):
    """CPU cores that keep `replicas` from being CPU-bound, in whole allocation steps."""
    idle, busy = cpu_cores_per_replica(params)
    return jnp.ceil(replicas * (idle + busy) / params.cpu_step_cores) * params.cpu_step_cores


def memory_for(params: EnvParams, replicas, cache_weights=False):
    """Host memory (GB) for `replicas`, plus one copy of the weights if cached, in steps."""
    need = replicas * host_memory_per_replica_gb(params) + jnp.where(cache_weights, params.weights_gb, 0.0)
    return jnp.ceil(need / params.memory_step_gb) * params.memory_step_gb

