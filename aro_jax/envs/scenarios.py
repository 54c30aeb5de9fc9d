"""Named scenarios: node descriptions -> EnvParams, and the held-out variations.

Scenario generators are kept apart from the dynamics (serving.py, fluid.py): a scenario only
chooses EnvParams. `TRAINING_SCENARIOS` may be used to train and tune;
`HELD_OUT_SCENARIOS` are for evaluation only (config validation refuses them in training).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from aro_jax.envs import hardware, sizing
from aro_jax.envs.fluid import CPU_USD_PER_CORE_H, MEMORY_USD_PER_GB_H
from aro_jax.envs.params import EnvParams, RewardWeights, ServiceCurve
from aro_jax.envs.traffic import TrafficParams, peak_rate_rps

# Traffic mixes measured on the Azure 2023 traces (shared data README) and the published
# Azure 2024 week-long shape: code is bursty with a 10x daily swing and quiet weekends;
# conversation is smooth with a 2x swing.
TRAFFIC_MIXES = {
    "conversation": dict(
        input_log_mean=6.63, input_log_sd=0.99, output_log_mean=5.02, output_log_sd=0.86,
        diurnal_peak_to_trough=2.0, weekend_factor=0.8, burst_cv=0.2,
    ),
    "code": dict(
        input_log_mean=7.00, input_log_sd=1.36, output_log_mean=2.79, output_log_sd=0.85,
        diurnal_peak_to_trough=10.0, weekend_factor=0.2, burst_cv=0.6,
    ),
}
# DistServe (OSDI'24) chatbot SLOs by model size: OPT-13B 0.25 s / 0.1 s, OPT-66B 2.5 s /
# 0.15 s; we use the nearest size for Llama-2-7B and Llama-2-70B.
SLO_BY_MODEL = {"llama2-7b": (0.25, 0.10), "llama2-70b": (2.5, 0.15)}

TRAINING_SCENARIOS = ("diurnal",)
HELD_OUT_SCENARIOS = ("flash-crowd", "outage", "token-shift", "trace-conv", "trace-code")
SCENARIOS = TRAINING_SCENARIOS + HELD_OUT_SCENARIOS


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """One region of a cluster, as written in a cluster YAML file."""

    name: str = "node"
    profile: str = "llama2-70b-a100-tp4"
    traffic_mix: str = "conversation"
    mean_rate_rps: float = 4.0
    tz_offset_h: float = 0.0
    max_replicas: int = 16
    peer_rtt_ms: float = 50.0
    peer_spare_rps: float = 2.0


def node_params(spec: NodeSpec, episode_ticks: int = 2880, tick_s: float = 30.0) -> EnvParams:
    """EnvParams for one node: hardware, traffic, sizes, SLOs and cost/rate references."""
    profile = hardware.get_profile(spec.profile)
    small = hardware.get_profile(hardware.QUALITY_TIER[spec.profile])
    if spec.traffic_mix not in TRAFFIC_MIXES:
        raise ValueError(f"traffic_mix must be one of {sorted(TRAFFIC_MIXES)}, got {spec.traffic_mix!r}")
    traffic = TrafficParams(mean_rate_rps=spec.mean_rate_rps, tz_offset_h=spec.tz_offset_h, **TRAFFIC_MIXES[spec.traffic_mix])
    slo_ttft_s, slo_tpot_s = SLO_BY_MODEL[profile.model]
    params = EnvParams(
        max_steps_in_episode=episode_ticks,
        tick_s=tick_s,
        traffic=traffic,
        model=ServiceCurve.from_profile(profile),
        small_model=ServiceCurve.from_profile(small, replica_gpus=profile.tensor_parallel),
        replica_price_usd_per_h=profile.price_usd_per_h,
        weights_gb=profile.weights_gb,
        tensor_parallel=float(profile.tensor_parallel),
        max_replicas=float(spec.max_replicas),
        peer_rtt_s=spec.peer_rtt_ms / 1e3,
        peer_spare_rps=spec.peer_spare_rps,
        slo_ttft_s=slo_ttft_s,
        slo_tpot_s=slo_tpot_s,
        rate_ref_rps=spec.mean_rate_rps,
    )
    return _with_static_sizing(params)


def _with_static_sizing(params: EnvParams) -> EnvParams:
    """Initial allocation sized for the mean; cost reference = allocation for the peak."""
    mean_replicas = sizing.replicas_for_rate(params, params.traffic.mean_rate_rps)
    peak_replicas = sizing.replicas_for_rate(params, peak_rate_rps(params.traffic))
    peak_cost = (
        peak_replicas * params.replica_price_usd_per_h
        + sizing.cores_for(params, peak_replicas) * CPU_USD_PER_CORE_H
        + sizing.memory_for(params, peak_replicas) * MEMORY_USD_PER_GB_H
    )
    return params.replace(
        initial_replicas=float(mean_replicas),
        initial_cpu_cores=float(sizing.cores_for(params, mean_replicas)),
        initial_host_memory_gb=float(sizing.memory_for(params, mean_replicas)),
        cost_ref_usd_per_h=float(peak_cost),
    )


def default_node_params() -> EnvParams:
    return node_params(NodeSpec())


def stack_params(params_list: list[EnvParams]) -> EnvParams:
    """Stack per-node params along a leading node axis (for vmap over nodes)."""
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *params_list)


def cluster_params(cfg, scenario: str = "train") -> EnvParams:
    """Stacked EnvParams (leading node axis) for an ExperimentConfig's cluster, with its
    reward weights; `scenario="train"` is the training distribution (random start times)."""
    nodes = []
    for n in cfg.cluster.nodes:
        p = node_params(NodeSpec(**dataclasses.asdict(n)), cfg.env.episode_ticks, cfg.env.tick_s)
        p = p.replace(reward=RewardWeights(**dataclasses.asdict(cfg.env.reward)))
        nodes.append(p if scenario == "train" else apply_scenario(p, scenario, cfg.env.data_dir))
    return stack_params(nodes)


def apply_scenario(params: EnvParams, scenario: str, data_dir: str | Path | None = None) -> EnvParams:
    """Turn a node's training-distribution params into a named scenario (one day from
    Monday 00:00 UTC, deterministic start so every policy sees the same day)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {list(SCENARIOS)}")
    params = params.replace(random_start=0.0, start_time_s=0.0)
    t = params.traffic
    if scenario == "flash-crowd":
        # 5x demand for 30 minutes at 10:00 UTC.
        t = t.replace(flash_start_s=10 * 3600.0, flash_duration_s=1800.0, flash_multiplier=5.0)
    elif scenario == "outage":
        # Half the region's ready replicas lost for two hours from 13:00 UTC.
        params = params.replace(outage_start_s=13 * 3600.0, outage_duration_s=7200.0, outage_capacity_loss=0.5)
    elif scenario == "token-shift":
        # The other traffic mix's token lengths: long prompts/short answers <-> chat.
        is_code = bool(t.output_log_mean < 4.0)
        mix = TRAFFIC_MIXES["conversation" if is_code else "code"]
        t = t.replace(**{k: mix[k] for k in ("input_log_mean", "input_log_sd", "output_log_mean", "output_log_sd")})
    elif scenario.startswith("trace-"):
        t = _trace_traffic(t, scenario.removeprefix("trace-"), params.tick_s, data_dir)
    return params.replace(traffic=t)


def _trace_traffic(t: TrafficParams, kind: str, tick_s: float, data_dir) -> TrafficParams:
    from aro_jax.envs.trace import fit_lognormal, load_trace_csv, resample_rates

    if data_dir is None:
        raise ValueError("trace scenarios need the data directory: pass --data-dir (holding traces/AzureLLMInferenceTrace_*.csv)")
    path = Path(data_dir) / "traces" / f"AzureLLMInferenceTrace_{kind}.csv"
    trace = load_trace_csv(path)
    multiplier = resample_rates(trace, tick_s, target_mean_rps=1.0)
    in_mu, in_sd = fit_lognormal(trace.input_tokens)
    out_mu, out_sd = fit_lognormal(trace.output_tokens)
    return t.replace(
        trace_multiplier=jnp.asarray(multiplier, jnp.float32),
        trace_weight=1.0,
        trace_tick_s=tick_s,
        input_log_mean=in_mu, input_log_sd=in_sd, output_log_mean=out_mu, output_log_sd=out_sd,
        burst_cv=0.0,  # the trace's own minute-scale bursts replace the synthetic modulation
    )
