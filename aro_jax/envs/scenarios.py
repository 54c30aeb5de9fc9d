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
# Bursts: log-AR(1) modulation fitted to the traces' 30 s counts (CV exact; lag-1
# autocorrelation as close as keeps the 5 min CV within 15 %): benchmarks/fidelity.py
# publishes the fit (aro_jax.envs.bursts.fit_log_ar1_joint); tests/test_traffic.py refits.
TRAFFIC_MIXES = {
    "conversation": dict(
        input_log_mean=6.63, input_log_sd=0.99, output_log_mean=5.02, output_log_sd=0.86,
        diurnal_peak_to_trough=2.0, weekend_factor=0.8, burst_cv=0.2174, burst_ac1=0.896,
    ),
    "code": dict(
        input_log_mean=7.00, input_log_sd=1.36, output_log_mean=2.79, output_log_sd=0.85,
        diurnal_peak_to_trough=10.0, weekend_factor=0.2, burst_cv=1.274, burst_ac1=0.282,
    ),
}
# SLOs per workload class, DistServe (Zhong et al., OSDI'24), Table 1 (TTFT s, TPOT s):
# chatbot (ShareGPT) OPT-13B 0.25 / 0.1, OPT-66B 2.5 / 0.15; code completion (HumanEval)
# OPT-66B 0.125 / 0.2; summarization (LongBench) OPT-66B 15 / 0.15. Llama-2-7B takes the
# 13B row and Llama-2-70B the 66B row; code and summarization have only the 66B row,
# used for both sizes. A prompt whose idle prefill exceeds half the TTFT SLO gets a
# budget of twice that prefill instead (fluid.ttft_budget_s; EnvParams.ttft_prefill_slack).
SLO_TABLE = {
    ("chatbot", "llama2-7b"): (0.25, 0.1),
    ("chatbot", "llama2-70b"): (2.5, 0.15),
    ("code", "llama2-7b"): (0.125, 0.2),
    ("code", "llama2-70b"): (0.125, 0.2),
    ("summarization", "llama2-7b"): (15.0, 0.15),
    ("summarization", "llama2-70b"): (15.0, 0.15),
}
WORKLOAD_OF_MIX = {"conversation": "chatbot", "code": "code"}


def slo_for(mix: str, model: str) -> tuple[float, float]:
    """(TTFT SLO s, TPOT SLO s) of a traffic mix's workload class on a model."""
    return SLO_TABLE[(WORKLOAD_OF_MIX[mix], model)]


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


def node_params(
    spec: NodeSpec, episode_ticks: int = 2880, tick_s: float = 30.0, prices: str = hardware.DEFAULT_PRICE_SET,
) -> EnvParams:
    """EnvParams for one node: hardware, traffic, sizes, SLOs and cost/rate references.
    `prices`: one of hardware.PRICE_SETS."""
    profile = hardware.get_profile(spec.profile)
    gpu_price = hardware.gpu_price_usd_per_h(profile.gpu, prices)  # validates `prices`
    if prices == "gpu-cloud":
        gpu_price = profile.gpu_price_usd_per_h  # a calibrated profile file may set its own
    instance = hardware.INSTANCES[profile.gpu]
    covered = prices == "hyperscaler"  # the instance price covers the pod's CPU and memory
    small = hardware.get_profile(hardware.quality_tier_of(profile))
    if spec.traffic_mix not in TRAFFIC_MIXES:
        raise ValueError(f"traffic_mix must be one of {sorted(TRAFFIC_MIXES)}, got {spec.traffic_mix!r}")
    traffic = TrafficParams(mean_rate_rps=spec.mean_rate_rps, tz_offset_h=spec.tz_offset_h, **TRAFFIC_MIXES[spec.traffic_mix])
    slo_ttft_s, slo_tpot_s = slo_for(spec.traffic_mix, profile.model)
    small_slo_ttft_s, small_slo_tpot_s = slo_for(spec.traffic_mix, small.model)
    params = EnvParams(
        max_steps_in_episode=episode_ticks,
        tick_s=tick_s,
        traffic=traffic,
        model=ServiceCurve.from_profile(profile),
        small_model=ServiceCurve.from_profile(small, replica_gpus=profile.tensor_parallel),
        replica_price_usd_per_h=gpu_price * profile.tensor_parallel,
        weights_gb=profile.weights_gb,
        tensor_parallel=float(profile.tensor_parallel),
        max_replicas=float(spec.max_replicas),
        vcpus_per_gpu=instance.vcpus_per_gpu,
        host_memory_gb_per_gpu=instance.memory_gb_per_gpu,
        max_cpu_cores=float(spec.max_replicas * profile.tensor_parallel * instance.vcpus_per_gpu),
        max_host_memory_gb=float(spec.max_replicas * profile.tensor_parallel * instance.memory_gb_per_gpu),
        cpu_usd_per_core_h=0.0 if covered else CPU_USD_PER_CORE_H,
        memory_usd_per_gb_h=0.0 if covered else MEMORY_USD_PER_GB_H,
        peer_rtt_s=spec.peer_rtt_ms / 1e3,
        peer_spare_rps=spec.peer_spare_rps,
        slo_ttft_s=slo_ttft_s,
        slo_tpot_s=slo_tpot_s,
        small_slo_ttft_s=small_slo_ttft_s,
        small_slo_tpot_s=small_slo_tpot_s,
        rate_ref_rps=spec.mean_rate_rps,
    )
    return _with_static_sizing(params)


def _with_static_sizing(params: EnvParams) -> EnvParams:
    """Initial allocation sized for the mean; cost reference = allocation for the peak."""
    mean_replicas = sizing.replicas_for_rate(params, params.traffic.mean_rate_rps)
    peak_replicas = sizing.replicas_for_rate(params, peak_rate_rps(params.traffic))
    peak_cost = (
        peak_replicas * params.replica_price_usd_per_h
        + sizing.cores_for(params, peak_replicas) * params.cpu_usd_per_core_h
        + sizing.memory_for(params, peak_replicas) * params.memory_usd_per_gb_h
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
        prices = getattr(cfg.env, "prices", hardware.DEFAULT_PRICE_SET)
        p = node_params(NodeSpec(**dataclasses.asdict(n)), cfg.env.episode_ticks, cfg.env.tick_s, prices)
        p = p.replace(reward=RewardWeights(**dataclasses.asdict(cfg.env.reward)))
        if not cfg.env.quality_tier:  # the tier off for every policy: nothing may degrade quality
            p = p.replace(max_small_model_fraction=0.0)
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


def trace_path(data_dir: str | Path, scenario: str) -> Path:
    """The request trace a trace-replay scenario (`trace-conv`, `trace-code`) replays."""
    return Path(data_dir) / "traces" / f"AzureLLMInferenceTrace_{scenario.removeprefix('trace-')}.csv"


def _trace_traffic(t: TrafficParams, kind: str, tick_s: float, data_dir) -> TrafficParams:
    from aro_jax.envs.trace import load_trace_csv

    if data_dir is None:
        raise ValueError("trace scenarios need the data directory: pass --data-dir (holding traces/AzureLLMInferenceTrace_*.csv)")
    return replay_traffic(t, load_trace_csv(trace_path(data_dir, f"trace-{kind}")), tick_s, scale="fit")


def replay_traffic(t: TrafficParams, trace, tick_s: float, scale: float | str = 1.0, loop: bool = False) -> TrafficParams:
    """`t` driven by a request trace's own timeline from simulated time 0: absolute
    per-tick counts times `scale` ("fit": the trace's mean rate scaled to the node's
    configured `mean_rate_rps`), per-tick token moments, context-window rejects."""
    from aro_jax.envs.trace import replay_series

    series = replay_series(trace, tick_s, float(t.max_context_tokens))
    trace_mean_rps = series["arrivals"].sum() / (len(series["arrivals"]) * tick_s)
    if scale == "fit":
        scale = float(t.mean_rate_rps) / trace_mean_rps
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return t.replace(
        replay_arrivals=f32(series["arrivals"] * scale),
        replay_rejected_share=f32(series["rejected_share"]),
        replay_input_log_mean=f32(series["input_log_mean"]),
        replay_input_log_sd=f32(series["input_log_sd"]),
        replay_output_log_mean=f32(series["output_log_mean"]),
        replay_output_log_sd=f32(series["output_log_sd"]),
        replay_weight=1.0, replay_loop=float(loop), replay_tick_s=tick_s,
        mean_rate_rps=float(trace_mean_rps * scale),
        burst_cv=0.0,
    )
