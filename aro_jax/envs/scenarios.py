"""Named scenarios: node descriptions -> EnvParams, and the held-out variations.

Scenario generators are kept apart from the dynamics (serving.py, fluid.py): a scenario only
chooses EnvParams. `TRAINING_SCENARIOS` may be used to train and tune;
`HELD_OUT_SCENARIOS` are for evaluation only (config validation refuses them in training).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from aro_jax.envs import hardware, sizing
from aro_jax.envs.fluid import replica_capacity_rps
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


# Region sites (latitude, longitude in degrees) of the cluster files' region names: the
# cities of the AWS regions of the same names (us-east-1 N. Virginia, us-west-2 Oregon,
# eu-west-1 Dublin, eu-central-1 Frankfurt, ap-northeast-1 Tokyo, ap-south-1 Mumbai,
# ap-southeast-1 Singapore, sa-east-1 Sao Paulo, ap-southeast-2 Sydney, me-central-1 UAE).
REGION_SITES = {
    "us-east": (38.9, -77.5), "us-west": (45.6, -121.2), "eu-west": (53.3, -6.3), "eu-central": (50.1, 8.7),
    "asia-ne": (35.7, 139.7), "asia-south": (19.1, 72.9), "asia-se": (1.35, 103.8), "sa-east": (-23.5, -46.6),
    "au-east": (-33.9, 151.2), "me-central": (25.2, 55.3),
}
# Round trip from distance: RTT ~ 2.1 x great-circle distance / speed of light in fibre
# (~200 km/ms), the rule of thumb of Bozkurt et al., "Dissecting Latency in the Internet's
# Fiber Infrastructure" (2018), from earlier measurement campaigns. Against published
# AWS inter-region pings (cloudping.co averages) it gives 57 ms for N. Virginia-Dublin
# (measured ~80), 11 ms for Dublin-Frankfurt (~20), 82 ms for Oregon-Tokyo (~89): a lower
# bound within ~1.5x, so FIBRE_RTT_FLOOR_MS adds the in-region hops (load balancer,
# gateway) that make the short pairs' gap.
RTT_PATH_STRETCH = 2.1
FIBRE_KM_PER_MS = 200.0
FIBRE_RTT_FLOOR_MS = 8.0
EARTH_RADIUS_KM = 6371.0


def site_of(name: str, tz_offset_h: float) -> tuple[float, float]:
    """A region's site: its named city, else the time zone's central meridian at 30 N
    (a region with no known site is placed by its clock, roughly)."""
    return REGION_SITES.get(name, (30.0, 15.0 * tz_offset_h))


def rtt_matrix_s(sites: list[tuple[float, float]]) -> np.ndarray:
    """(R, R) round trips in seconds between sites (zero on the diagonal)."""
    lat = np.radians([s[0] for s in sites])[:, None]
    lon = np.radians([s[1] for s in sites])[:, None]
    hav = np.sin((lat - lat.T) / 2) ** 2 + np.cos(lat) * np.cos(lat.T) * np.sin((lon - lon.T) / 2) ** 2
    km = 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(hav, 0.0, 1.0)))
    rtt_ms = RTT_PATH_STRETCH * km / FIBRE_KM_PER_MS + FIBRE_RTT_FLOOR_MS
    return np.where(np.eye(len(sites), dtype=bool), 0.0, rtt_ms / 1e3)


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
    slo_target: float | None = None  # the deployment's own attainment target (config.NodeConfig)


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
    small = hardware.get_profile(hardware.quality_tier_of(profile))
    if spec.traffic_mix not in TRAFFIC_MIXES:
        raise ValueError(f"traffic_mix must be one of {sorted(TRAFFIC_MIXES)}, got {spec.traffic_mix!r}")
    traffic = TrafficParams(mean_rate_rps=spec.mean_rate_rps, tz_offset_h=spec.tz_offset_h, **TRAFFIC_MIXES[spec.traffic_mix])
    (other,) = [mix for name, mix in TRAFFIC_MIXES.items() if name != spec.traffic_mix]  # the token-shift scenario's lengths
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
        peer_rtt_s=spec.peer_rtt_ms / 1e3,
        peer_spare_rps=spec.peer_spare_rps,
        slo_ttft_s=slo_ttft_s,
        slo_tpot_s=slo_tpot_s,
        small_slo_ttft_s=small_slo_ttft_s,
        small_slo_tpot_s=small_slo_tpot_s,
        rate_ref_rps=spec.mean_rate_rps,
        other_mix_input_log_offset=other["input_log_mean"] - traffic.input_log_mean,
        other_mix_output_log_offset=other["output_log_mean"] - traffic.output_log_mean,
    )
    if spec.slo_target is not None:  # a cluster file's own target (cluster_params applies the objective's over it)
        params = params.replace(slo_target=float(spec.slo_target))
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
    # Alone, the node's peer is its twin in the same time zone: the same mean load on a
    # fleet sized for the peak (cluster_params puts the nearest same-model region there).
    peer_capacity = peak_replicas * replica_capacity_rps(params)
    return params.replace(
        peer_tz_offset_h=params.traffic.tz_offset_h,
        peer_mean_rate_rps=params.traffic.mean_rate_rps,
        peer_capacity_rps=float(peer_capacity),
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
    reward weights; `scenario="train"` is the training distribution (random start times).
    A trace scenario lasts its trace's length, not env.episode_ticks: scenario_plan gives
    its params with that length."""
    if scenario.startswith("trace-"):
        raise ValueError(f"scenario {scenario!r} replays a trace for the trace's own length; "
                         "build it with scenarios.scenario_plan(cfg, scenario), which returns the episode length with the params")
    nodes = []
    for n in cfg.cluster.nodes:
        prices = getattr(cfg.env, "prices", hardware.DEFAULT_PRICE_SET)
        p = node_params(NodeSpec(**dataclasses.asdict(n)), cfg.env.episode_ticks, cfg.env.tick_s, prices)
        p = p.replace(reward=RewardWeights(**dataclasses.asdict(cfg.env.reward)))
        if not cfg.env.quality_tier:  # the tier off for every policy: nothing may degrade quality
            p = p.replace(max_small_model_fraction=0.0)
        if hasattr(cfg, "objective"):
            p = p.replace(slo_target=float(cfg.objective.target(n.traffic_mix, n.slo_target)))
        if scenario == "train":
            p = p.replace(surge_prob=float(getattr(cfg.env, "surge_prob", 0.0)),
                          surge_max_multiplier=float(getattr(cfg.env, "surge_max_multiplier", 3.0)),
                          surge_shared_prob=float(getattr(cfg.env, "surge_shared_prob", 0.0)),
                          token_shift_prob=float(getattr(cfg.env, "token_shift_prob", 0.0)),
                          token_shift_toward=float(getattr(cfg.env, "token_shift_toward", 0.0)),
                          token_shift_onset_prob=float(getattr(cfg.env, "token_shift_onset_prob", 0.0)),
                          burst_shift_prob=float(getattr(cfg.env, "burst_shift_prob", 0.0)),
                          smooth_shift_prob=float(getattr(cfg.env, "smooth_shift_prob", 0.0)),
                          random_fleet_prob=float(getattr(cfg.env, "random_fleet_prob", 0.0)),
                          demand_phase_prob=float(getattr(cfg.env, "demand_phase_prob", 0.0)),
                          demand_scale_max=float(getattr(cfg.env, "demand_scale_max", 1.0)))
        nodes.append(p if scenario == "train" else apply_scenario(p, scenario, cfg.env.data_dir))
    models = [hardware.get_profile(n.profile).model for n in cfg.cluster.nodes]
    return stack_params(with_cluster_peers(nodes, [n.name for n in cfg.cluster.nodes], models))


def with_cluster_peers(nodes: list[EnvParams], names: list[str], models: list[str]) -> list[EnvParams]:
    """Each node's modelled peer is the nearest region of its cluster that serves the same
    model (by rtt_matrix_s): that region's time zone, mean load and peak-sized capacity.
    A node with no such region keeps its twin."""
    tz = [float(p.traffic.tz_offset_h) for p in nodes]
    rtt = rtt_matrix_s([site_of(n, z) for n, z in zip(names, tz)])
    out = []
    for i, p in enumerate(nodes):
        peers = [j for j in range(len(nodes)) if j != i and models[j] == models[i]]
        if peers:
            q = nodes[min(peers, key=lambda j: (rtt[i, j], j))]
            p = p.replace(peer_tz_offset_h=q.peer_tz_offset_h, peer_mean_rate_rps=q.peer_mean_rate_rps, peer_capacity_rps=q.peer_capacity_rps)
        out.append(p)
    return out


def evaluated_day(params: EnvParams) -> EnvParams:
    """A node's params as every evaluation runs them: from Monday 00:00 UTC, without the
    training distribution's random start, surges (own or cluster-wide), token-length and
    burst shifts, starting fleets, demand phases or demand levels."""
    return params.replace(random_start=0.0, start_time_s=0.0, surge_prob=0.0, surge_shared_prob=0.0, token_shift_prob=0.0,
                          burst_shift_prob=0.0, smooth_shift_prob=0.0, random_fleet_prob=0.0, demand_phase_prob=0.0, demand_scale_max=1.0)


def apply_scenario(params: EnvParams, scenario: str, data_dir: str | Path | None = None) -> EnvParams:
    """Turn a node's training-distribution params into a named scenario (one day from
    Monday 00:00 UTC, deterministic start so every policy sees the same day)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {list(SCENARIOS)}")
    params = evaluated_day(params)
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
    elif isinstance(scale, str) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"trace scale must be a positive number or 'fit', got {scale!r}")
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


ALL_REGIONS = "*"  # a trace for every region without its own (a bare `--trace FILE`)


@dataclasses.dataclass(frozen=True)
class TraceReplay:
    """One region's trace: the file, its format (None: detected), `scale` (a number, or
    "fit": the trace's mean rate scaled to the region's configured mean) and `loop`
    (repeat the trace to fill env.episode_ticks when it is shorter)."""

    path: str
    format: str | None = None
    scale: float | str = 1.0
    loop: bool = False
    origin: str = ""  # where it was given (a config key, a flag): prefixes a file's errors


class ReplayPlan(NamedTuple):
    params: EnvParams  # stacked over the cluster's nodes
    num_ticks: int  # the episode: as long as the longest trace (or looped to the configured episode)
    notes: tuple[str, ...]  # what was replayed, padded, looped, rejected: for the output


def _fit_length(x, n: int, loop: bool, pad: str) -> jax.Array:
    """A per-tick replay array brought to `n` ticks: tiled when looping, else cut or padded
    (`pad`: "zero" for counts and shares, "edge" for length moments, which are unused
    where nothing arrives but must stay finite)."""
    import numpy as np

    x = np.asarray(x)
    if loop:
        x = np.resize(x, n)
    elif len(x) >= n:
        x = x[:n]
    else:
        x = np.pad(x, (0, n - len(x)), mode="constant" if pad == "zero" else "edge")
    return jnp.asarray(x, jnp.float32)


def replay_cluster_params(cfg, traces: dict, scenario: str | None = None) -> ReplayPlan:
    """Stacked EnvParams for `cfg`'s cluster with regions driven by request traces
    (`traces`: region name or ALL_REGIONS -> TraceReplay), from simulated time 0, and the
    episode length in ticks. Every region of a stack shares one replay length: a trace
    shorter than the episode gets zero arrivals after its end (unless it loops); a region
    without a trace runs `scenario` (default eval.scenario) for the episode. A traced
    region starts with the allocation sized for its replayed mean rate; its reward
    references (rate, cost) stay the region's configured ones."""
    from aro_jax.envs.trace import TraceFormatError, load_trace

    names = [n.name for n in cfg.cluster.nodes]
    unknown = [k for k in traces if k != ALL_REGIONS and k not in names]
    if unknown:
        raise ValueError(f"a trace is given for region {unknown[0]!r}, which the cluster {cfg.cluster.name!r} does not have; its regions are {', '.join(names)}")
    if not traces:
        raise ValueError("no trace given: pass a trace file for every region or REGION=FILE pairs")
    base = cluster_params(cfg, "train")
    tick_s = float(cfg.env.tick_s)
    scenario = scenario or cfg.eval.scenario
    loaded, nodes, notes = {}, [], {}
    for i, name in enumerate(names):
        p = jax.tree.map(lambda x, i=i: x[i], base)
        spec = traces.get(name, traces.get(ALL_REGIONS))
        if spec is None:
            nodes.append((name, None, 0, apply_scenario(p, scenario, cfg.env.data_dir)))
            continue
        key = (str(Path(spec.path).absolute()), spec.format)
        if key not in loaded:
            try:
                loaded[key] = load_trace(spec.path, spec.format)
            except (TraceFormatError, FileNotFoundError) as e:
                if not spec.origin:
                    raise
                raise type(e)(f"{spec.origin}: {e}") from None
        trace = loaded[key]
        p = evaluated_day(p)
        t = replay_traffic(p.traffic, trace, tick_s, spec.scale, spec.loop)
        sized = _with_static_sizing(p.replace(traffic=t))
        p = sized.replace(cost_ref_usd_per_h=p.cost_ref_usd_per_h, rate_ref_rps=p.rate_ref_rps)
        n = int(t.replay_arrivals.shape[0])
        nodes.append((name, spec, n, p))
        over = int((trace.input_tokens > float(t.max_context_tokens)).sum())
        scale = "fit" if spec.scale == "fit" else f"{float(spec.scale):g}"
        notes[name] = (
            f"{trace.format} trace {os.path.normpath(trace.source)}, {trace.num_requests} requests over "
            f"{trace.duration_s:.0f} s = {n} ticks; scale {scale}: mean {float(t.mean_rate_rps):.3g} req/s"
            + (" (the region's configured mean)" if spec.scale == "fit" else "")
            + f"; {over} ({100.0 * over / trace.num_requests:.1f} %) longer than the "
            f"{float(t.max_context_tokens):.0f}-token context, rejected"
        )
    traced = [(n, s) for _, s, n, _ in nodes if s is not None]
    num_ticks = max(max(n, cfg.env.episode_ticks) if s.loop else n for n, s in traced)
    stacked = []
    for name, spec, n, p in nodes:
        loop = spec is not None and spec.loop
        t = p.traffic
        if spec is None:
            notes[name] = f"no trace; runs scenario {scenario} from Monday 00:00 UTC"
        elif loop and num_ticks > n:
            notes[name] += f"; looped {num_ticks / n:.2f} times to fill env.episode_ticks"
        elif loop:
            notes[name] += f"; not looped: the trace covers env.episode_ticks ({cfg.env.episode_ticks})"
        elif num_ticks > n:
            notes[name] += f"; padded with {num_ticks - n} ticks of zero arrivals to the stack's {num_ticks} ticks"
        t = t.replace(
            replay_arrivals=_fit_length(t.replay_arrivals, num_ticks, loop, "zero"),
            replay_rejected_share=_fit_length(t.replay_rejected_share, num_ticks, loop, "zero"),
            **{f: _fit_length(getattr(t, f), num_ticks, loop, "edge") for f in (
                "replay_input_log_mean", "replay_input_log_sd", "replay_output_log_mean", "replay_output_log_sd")},
        )
        stacked.append(p.replace(traffic=t, max_steps_in_episode=num_ticks))
    grouped = {}  # regions with the same trace and treatment share one line
    for name in names:
        grouped.setdefault(notes[name], []).append(name)
    lines = tuple(f"region{'s' if len(rs) > 1 else ''} {', '.join(rs)}: {text}" for text, rs in grouped.items())
    return ReplayPlan(stack_params(stacked), int(num_ticks), lines)



def scenario_plan(cfg, scenario: str) -> ReplayPlan:
    """What an evaluation of `scenario` runs: the stacked params and the episode length.
    The trace scenarios replay their Azure trace natively in every region (scaled to the
    region's mean rate), for the trace's own length; the others run env.episode_ticks."""
    if scenario.startswith("trace-"):
        path = trace_path(cfg.env.data_dir, scenario)
        return replay_cluster_params(cfg, {ALL_REGIONS: TraceReplay(str(path), "azure", "fit", False)})
    return ReplayPlan(cluster_params(cfg, scenario), cfg.env.episode_ticks, ())
