"""What the control loop needs to know about a node beyond the policy: the tick, the step
sizes of the actions, the allocation it starts from, the forecaster's prior and horizon,
the SLOs and the time zone. `aro export` writes these per node under `nodes.NAME.controls`
in policy.json; `NodeControls.from_spec` reads them back (numpy only).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

# name -> how to read it from a node's EnvParams (simulator); all floats.
_FROM_PARAMS = {
    "tick_s": lambda p: p.tick_s,
    "forward_step": lambda p: p.forward_step,
    "quality_step": lambda p: p.quality_step,
    "initial_replicas": lambda p: p.initial_replicas,
    "initial_cpu_cores": lambda p: p.initial_cpu_cores,
    "initial_host_memory_gb": lambda p: p.initial_host_memory_gb,
    "tz_offset_h": lambda p: p.traffic.tz_offset_h,
    "forecast_prior_rps": lambda p: p.traffic.mean_rate_rps,
    "forecast_horizon_s": lambda p: p.forecast_horizon_s,
    "slo_ttft_s": lambda p: p.slo_ttft_s,
    "slo_tpot_s": lambda p: p.slo_tpot_s,
}


def node_controls(stacked_params, index: int) -> dict:
    """Controls of node `index` of a stack of EnvParams (export time; needs JAX), plus the
    per-replica capacity at the node's mean token mix (requests/s)."""
    import jax

    p = jax.tree.map(lambda x: np.asarray(x)[index], stacked_params)
    out = {name: float(np.asarray(get(p), np.float64)) for name, get in _FROM_PARAMS.items()}
    out["replica_capacity_rps"] = float(np.asarray(_replica_capacity_rps(p)))
    return out


def _replica_capacity_rps(params):
    try:  # the fluid model's home moved with the simulator's split
        from aro_jax.envs.fluid import replica_capacity_rps
    except ImportError:
        from aro_jax.envs.serving import replica_capacity_rps
    return replica_capacity_rps(params)


@dataclass(frozen=True)
class NodeControls:
    """One node's controls (units in the names). Defaults are the simulator's defaults."""

    tick_s: float = 30.0
    forward_step: float = 0.1
    quality_step: float = 0.1
    initial_replicas: float = 2.0
    initial_cpu_cores: float = 32.0
    initial_host_memory_gb: float = 256.0
    tz_offset_h: float = 0.0
    forecast_prior_rps: float = 1.0
    forecast_horizon_s: float = 300.0
    slo_ttft_s: float = 2.5
    slo_tpot_s: float = 0.15
    replica_capacity_rps: float = 1.0

    @classmethod
    def from_spec(cls, spec: dict, node: str) -> "NodeControls":
        """From policy.json; a missing `controls` section is a clear error (old export)."""
        raw = spec["nodes"][node].get("controls")
        if not isinstance(raw, dict):
            raise ValueError(f"node {node!r} of this export has no 'controls' section (tick, step sizes, SLOs); re-export the run with this version of aro")
        names = {f.name for f in fields(cls)}
        lacking = sorted(names - set(raw))
        if lacking:
            raise ValueError(f"node {node!r} controls lack {lacking}; re-export the run with this version of aro")
        values = {}
        for k in names:
            v = raw[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise ValueError(f"node {node!r} controls.{k} must be a finite number, got {v!r}")
            values[k] = float(v)
        return cls(**values)
