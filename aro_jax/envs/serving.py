"""The LLM-serving node environment: a gymnax 1.x Environment.

One env instance is one inference node (a region's serving cluster): replicas of one
model on one GPU type, CPU cores and host memory, a request queue, a peer link for
rebalancing, and a smaller model for a degraded quality tier. Each step is one decision
tick (30 s by default) of a fluid model of continuous-batching serving; `fluid_tick` is
that model, checked against a request-level simulator in benchmarks/fluid_agreement.py.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import environment, spaces

from aro_jax.envs import forecast as fc
from aro_jax.envs.hardware import ServiceProfile
from aro_jax.envs.traffic import TrafficParams, expected_rate_rps, sample_arrivals, token_stats

ENV_VERSION = "aro-serving-v1"
PAPER_ACTIONS = ("IncreaseCPU", "IncreaseGPU", "IncreaseMemory", "RebalanceWorkload", "MaintainCurrent")
EXTENDED_ACTIONS = PAPER_ACTIONS + (
    "DecreaseCPU",
    "DecreaseGPU",
    "DecreaseMemory",
    "PullBackWorkload",
    "DegradeQuality",  # route a larger share of requests to the small model
    "RestoreQuality",
)
ACTION_SETS = {"paper": PAPER_ACTIONS, "extended": EXTENDED_ACTIONS}
(INC_CPU, INC_GPU, INC_MEM, REBALANCE, MAINTAIN, DEC_CPU, DEC_GPU, DEC_MEM, PULL_BACK, DEGRADE, RESTORE) = range(11)

# Raw observation fields, in order; `observation_scale` divides them into O(1) values.
OBS_FIELDS = (
    "request_rate_rps",
    "latency_e2e_mean_s",
    "cpu_util",
    "gpu_util",
    "memory_util",
    "queue_requests",
    "replicas_ready",
    "replicas_pending",
    "cpu_cores",
    "host_memory_gb",
    "forward_fraction",
    "small_model_fraction",
    "capacity_rps",
    "time_of_day_sin",
    "time_of_day_cos",
    "day_of_week_sin",
    "day_of_week_cos",
    "forecast_rate_rps",
    "drop_fraction",
    "slo_attainment",
)
PENDING_SLOTS = 16  # cold-start pipeline length in ticks: 16 x 30 s covers N(240 s, 30 s) + 3 sd

# Cost of the CPU side, GCP N2 predefined on-demand list price (us-central1, 2024).
CPU_USD_PER_CORE_H = 0.031611
MEMORY_USD_PER_GB_H = 0.004237
# Inter-region egress within a continent, GCP/AWS list price ($/GB, 2024).
EGRESS_USD_PER_GB = 0.02
BYTES_PER_TOKEN = 4.0  # ~4 characters of UTF-8 English per BPE token (OpenAI tokenizer guide)


@struct.dataclass
class ServiceCurve:
    """Service-time model of one serving instance, in seconds (from a ServiceProfile)."""

    prefill_base_s: float
    prefill_s_per_token: float
    prefill_s_per_token_sq: float
    decode_base_s: float
    decode_s_per_context_token: float
    decode_s_per_seq: float
    kv_capacity_tokens: float
    max_batch_seqs: float
    instances_per_replica: float  # parallel copies one replica's GPUs hold (small model)
    quality: float

    @classmethod
    def from_profile(cls, profile: ServiceProfile, replica_gpus: int | None = None) -> "ServiceCurve":
        gpus = replica_gpus or profile.tensor_parallel
        return cls(
            prefill_base_s=profile.prefill_base_ms / 1e3,
            prefill_s_per_token=profile.prefill_ms_per_token / 1e3,
            prefill_s_per_token_sq=profile.prefill_ms_per_token_sq / 1e3,
            decode_base_s=profile.decode_base_ms / 1e3,
            decode_s_per_context_token=profile.decode_ms_per_context_token / 1e3,
            decode_s_per_seq=profile.decode_ms_per_seq / 1e3,
            kv_capacity_tokens=float(profile.kv_capacity_tokens),
            max_batch_seqs=float(profile.max_batch_seqs),
            instances_per_replica=float(max(gpus // profile.tensor_parallel, 1)),
            quality=float(profile.quality),
        )

    def prefill_s(self, tokens):
        return self.prefill_base_s + self.prefill_s_per_token * tokens + self.prefill_s_per_token_sq * tokens**2


@struct.dataclass
class EnvParams(environment.EnvParams):
    """One node's scenario. Every field is a pytree leaf, so stacks of params vmap."""

    max_steps_in_episode: int = 2880  # one day of 30 s ticks
    tick_s: float = 30.0  # BLIS autoscaler decision interval
    traffic: TrafficParams = struct.field(default_factory=TrafficParams)
    model: ServiceCurve = None  # filled by make_params
    small_model: ServiceCurve = None
    replica_price_usd_per_h: float = 0.0
    weights_gb: float = 0.0
    tensor_parallel: float = 1.0
    min_replicas: float = 1.0
    max_replicas: float = 16.0
    initial_replicas: float = 2.0
    cpu_step_cores: float = 8.0
    max_cpu_cores: float = 256.0
    initial_cpu_cores: float = 32.0
    memory_step_gb: float = 64.0
    max_host_memory_gb: float = 2048.0
    initial_host_memory_gb: float = 256.0
    # Cold start from remote storage, BLIS autoscaler config: N(240 s, 30 s).
    cold_start_mean_s: float = 240.0
    cold_start_sd_s: float = 30.0
    queue_timeout_s: float = 60.0
    max_queue_requests: float = 1e5
    peer_rtt_s: float = 0.05
    peer_spare_rps: float = 2.0
    max_forward_fraction: float = 0.5
    forward_step: float = 0.1
    quality_step: float = 0.1
    max_small_model_fraction: float = 0.8
    # DistServe (OSDI'24) chatbot SLOs, per model size (set per node by make_params).
    slo_ttft_s: float = 2.5
    slo_tpot_s: float = 0.15
    # Reward: alpha * served share + beta * (1 - latency) - gamma * cost - slo_penalty * misses
    # - quality_penalty * quality loss (without it, the small model would be a free lunch).
    alpha: float = 1.0
    beta: float = 0.5
    gamma: float = 1.0
    slo_penalty: float = 3.0
    quality_penalty: float = 2.0
    cost_ref_usd_per_h: float = 1.0  # normalises cost: static allocation for peak load
    rate_ref_rps: float = 1.0  # normalises rates: the node's mean load
    outage_start_s: float = -1.0
    outage_duration_s: float = 0.0
    outage_capacity_loss: float = 0.0  # fraction of ready replicas lost during the outage
    start_time_s: float = 0.0
    random_start: float = 1.0  # 1: each episode starts at a random time of the week
    forecast_horizon_s: float = 300.0  # covers the cold start plus one tick


@struct.dataclass
class EnvState(environment.EnvState):
    time: int
    clock_s: jax.Array  # UTC seconds since Monday 00:00 of week 0
    replicas_ready: jax.Array
    replicas_pending: jax.Array  # (PENDING_SLOTS,) replicas ready after i+1 more ticks
    replicas_draining: jax.Array
    cpu_cores: jax.Array
    host_memory_gb: jax.Array
    forward_fraction: jax.Array
    small_model_fraction: jax.Array
    queue_requests: jax.Array
    forecast: fc.ForecastState
    last: dict[str, jax.Array]  # the previous tick's metrics (what an operator observes)


# --------------------------------------------------------------------------------------
# The fluid serving model
# --------------------------------------------------------------------------------------


def _token_moments(traffic: TrafficParams) -> dict[str, jax.Array]:
    """`token_stats` plus raw moments E[L^k] of the clipped lengths (input k = 2..4,
    output k = 2): service times are non-linear in the lengths (quadratic prefill,
    context growing with the output), so the fluid model needs means of powers."""
    stats = token_stats(traffic)
    log_cap = jnp.log(traffic.max_context_tokens)

    def clipped_moment(mu, sd, k):
        # E[min(X, cap)^k] for X ~ LogNormal(mu, sd).
        phi = lambda z: 0.5 * (1.0 + jax.scipy.special.erf(z / jnp.sqrt(2.0)))  # noqa: E731
        below = jnp.exp(k * mu + 0.5 * (k * sd) ** 2) * phi((log_cap - mu - k * sd**2) / sd)
        return below + jnp.exp(k * log_cap) * (1.0 - phi((log_cap - mu) / sd))

    for k in (2, 3, 4):
        stats[f"input_m{k}"] = clipped_moment(traffic.input_log_mean, traffic.input_log_sd, k)
    stats["output_m2"] = clipped_moment(traffic.output_log_mean, traffic.output_log_sd, 2)
    return stats


def _instance_model(curve: ServiceCurve, tokens):
    """Per-instance mean prefill time, decode iterations per request, per-seq decode
    cost, KV-capped batch and max rate, for lengths L (input) and n (output)."""
    t_in, t_out = tokens["input_mean"], tokens["output_mean"]
    # Mean of the quadratic prefill time over the prompt distribution, E[c L^2] > c E[L]^2
    # (the reference sim prefills each prompt at its own length).
    prefill_s = (
        curve.prefill_base_s + curve.prefill_s_per_token * t_in + curve.prefill_s_per_token_sq * tokens["input_m2"]
    )
    # The prefill emits the first token, so a request takes n - 1 decode iterations.
    decode_iters = jnp.maximum(t_out - 1.0, 1e-3)
    # At its j-th decode iteration a sequence attends over L + j tokens: summed over its
    # iterations that is (n-1) L + n(n-1)/2, so the mean context per iteration is:
    out_pairs = 0.5 * (tokens["output_m2"] - t_out)  # E[n(n-1)/2]
    context = t_in + out_pairs / decode_iters
    per_seq_s = curve.decode_s_per_seq + curve.decode_s_per_context_token * context
    # Admission reserves prompt + output KV for the whole decode; sequences are in the
    # batch for n - 1 iterations, so the batch's mean footprint per sequence is
    # E[(n-1)(L+n)] / E[n-1] = E[L] + E[n(n-1)] / E[n-1].
    footprint = t_in + 2.0 * out_pairs / decode_iters
    batch_max = jnp.maximum(jnp.minimum(curve.max_batch_seqs, curve.kv_capacity_tokens / footprint), 1.0)
    # At full batch each second holds: rate * prefill + (rate * (n-1) / batch) iterations.
    max_rate = batch_max / (batch_max * prefill_s + decode_iters * (curve.decode_base_s + per_seq_s * batch_max))
    return prefill_s, decode_iters, per_seq_s, batch_max, max_rate


def replica_capacity_rps(params: EnvParams, small_fraction=0.0, tokens=None):
    """Max requests/s one replica sustains at the node's mean token mix."""
    tokens = tokens or _token_moments(params.traffic)
    big = _instance_model(params.model, tokens)[-1]
    small = _instance_model(params.small_model, tokens)[-1]
    big = big * params.model.instances_per_replica
    small = small * params.small_model.instances_per_replica
    return 1.0 / ((1.0 - small_fraction) / big + small_fraction / small)


def _latency_at_utilisation(curve: ServiceCurve, util, tokens, arrival_scv=1.0):
    """Per instance at `util`: mean and p95 prefill time, time per output token (as users
    measure it, (e2e - TTFT) / (n - 1)), prefill share, KV-capped batch, and the mean TTFT
    wait beyond the own prefill (s). `arrival_scv`: squared CV of the instance's
    inter-arrival times (1: Poisson).

    Mechanics of the reference (benchmarks/reference_sim.py): at each iteration boundary
    all waiting requests are admitted and prefilled in one iteration, before any decode.
    Terms that count arrivals just after the request's own arrival (its batch-mates, the
    prefills before its first decode, the others in its batch) are scaled by
    `arrival_scv`: a Poisson stream brings rate * t in a short t, a deterministic one none.
    """
    prefill_s, decode_iters, per_seq_s, batch_max, max_rate = _instance_model(curve, tokens)
    rate = util * max_rate
    prefill_share = jnp.minimum(rate * prefill_s, 0.95)
    decode_tokens_rps = rate * decode_iters

    # Little's law on the decode batch B (time average): B = rate * (n-1) * tpot, where a
    # sequence decodes in a batch of B others plus itself (size-biased: + ca^2, 1 for
    # Poisson-like batch sizes), stretched by the prefills that interrupt it: 1 / (1 - rho_p).
    def batch_for(extra_wait_s):
        # `extra_wait_s`: time per request in the batch besides its decode iterations.
        denom = 1.0 - prefill_share - decode_tokens_rps * per_seq_s
        numer = decode_tokens_rps * (curve.decode_base_s + per_seq_s * arrival_scv) + rate * extra_wait_s * (1.0 - prefill_share)
        return jnp.where(denom > 0, jnp.minimum(numer / jnp.maximum(denom, 1e-6), batch_max), batch_max)

    # TTFT: prefill work is a non-preemptive priority M/G/1 with decode iterations as the
    # low class, so the work ahead of an arrival is W = (rate E[P^2] + f_d D) / (2 (1 -
    # rho_p)), f_d the time share of decode iterations of length D (below 1 - rho_p when
    # the engine idles). W is the residual R of the iteration in progress plus the
    # prefills that arrived in its elapsed part (rho_p R); the request's own prefill
    # iteration also takes those arriving in the residual (rho_p R more).
    # Smoother than Poisson arrivals (a dispatcher spreading them over replicas) scale the
    # arrival part of E[P^2] as Kingman's G/G/1 does: (ca^2 + cs^2) for (1 + cs^2).
    a, b, c = curve.prefill_base_s, curve.prefill_s_per_token, curve.prefill_s_per_token_sq
    m1, m2, m3, m4 = tokens["input_mean"], tokens["input_m2"], tokens["input_m3"], tokens["input_m4"]
    prefill_sq_s2 = a * a + 2 * a * b * m1 + (b * b + 2 * a * c) * m2 + 2 * b * c * m3 + c * c * m4  # E[P^2]
    prefill_sq_s2 = prefill_sq_s2 - (1.0 - arrival_scv) * prefill_s**2
    busy_batch = jnp.maximum(batch_for(0.0), 1.0)
    step_s = curve.decode_base_s + per_seq_s * busy_batch
    decode_share = jnp.minimum(1.0 - prefill_share, decode_tokens_rps * step_s / busy_batch)
    work_ahead_s = (rate * prefill_sq_s2 + decode_share * step_s) / (2.0 * (1.0 - prefill_share))
    residual_s = work_ahead_s / (1.0 + prefill_share)
    wait_s = work_ahead_s + arrival_scv * prefill_share * residual_s
    # Before its first decode a request also waits for the chain of prefills of requests
    # that arrived during its own prefill iteration I: I rho_p / (1 - rho_p). It holds its
    # batch slot meanwhile (counts in B) and users see it in the time per output token.
    own_iteration_s = prefill_s + (1.0 + arrival_scv) * prefill_share * residual_s
    chain_s = arrival_scv * own_iteration_s * prefill_share / (1.0 - prefill_share)
    batch = batch_for(chain_s)
    tpot_s = (curve.decode_base_s + per_seq_s * jnp.minimum(batch + arrival_scv, batch_max)) / (1.0 - prefill_share)
    tpot_s = tpot_s + chain_s / decode_iters
    return prefill_s, curve.prefill_s(tokens["input_p95"]), tpot_s, prefill_share, batch_max, wait_s


def _lognormal_cdf_from_mean_p95(x, mean, p95):
    """P(X <= x) for a log-normal matched to a mean and a 95th percentile."""
    ratio = jnp.log(jnp.maximum(p95, mean * 1.0001) / mean)
    disc = jnp.maximum(1.645**2 - 2.0 * ratio, 0.0)
    sd = jnp.maximum(1.645 - jnp.sqrt(disc), 1e-3)
    mu = jnp.log(mean) - 0.5 * sd**2
    z = (jnp.log(jnp.maximum(x, 1e-9)) - mu) / sd
    return 0.5 * (1.0 + jax.scipy.special.erf(z / jnp.sqrt(2.0)))


def fluid_tick(
    params: EnvParams,
    arrivals: jax.Array,
    queue_requests: jax.Array,
    replicas_serving: jax.Array,
    cpu_cores: jax.Array,
    host_memory_gb: jax.Array,
    replicas_billed: jax.Array,
    forward_fraction: jax.Array,
    small_fraction: jax.Array,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Serve one tick: returns (metrics, queue at the end of the tick).

    Requests are conserved: arrivals = served + dropped + forwarded + (queue' - queue).
    """
    tick = params.tick_s
    tokens = _token_moments(params.traffic)
    t_in, t_out = tokens["input_mean"], tokens["output_mean"]

    forwarded = jnp.minimum(forward_fraction * arrivals, params.peer_spare_rps * tick)
    local = arrivals - forwarded

    # Capacity: GPUs, throttled by host-memory pressure and by CPU cores.
    per_replica_rps = replica_capacity_rps(params, small_fraction, tokens)
    host_mem_per_replica = _host_memory_per_replica_gb(params)
    mem_factor = jnp.minimum(host_memory_gb / jnp.maximum(replicas_billed * host_mem_per_replica, 1e-6), 1.0)
    gpu_capacity_rps = replicas_serving * per_replica_rps * mem_factor
    idle_cores, busy_cores = _cpu_cores_per_replica(params)
    cpu_capacity_rps = jnp.maximum(cpu_cores - idle_cores * replicas_serving, 0.0) / busy_cores * per_replica_rps
    capacity_rps = jnp.minimum(gpu_capacity_rps, cpu_capacity_rps)

    backlog = queue_requests + local
    served = jnp.minimum(backlog, capacity_rps * tick)
    queue_after = backlog - served
    # Requests that cannot start within the timeout, then those past the queue bound.
    dropped_timeout = jnp.maximum(queue_after - capacity_rps * params.queue_timeout_s, 0.0)
    queue_after = queue_after - dropped_timeout
    dropped_overflow = jnp.maximum(queue_after - params.max_queue_requests, 0.0)
    queue_after = queue_after - dropped_overflow
    dropped = dropped_timeout + dropped_overflow

    util = jnp.where(capacity_rps > 0, served / jnp.maximum(capacity_rps * tick, 1e-9), 0.0)
    util = jnp.clip(util, 0.0, 1.0)

    # Latency of the requests served this tick.
    # Dispatch spreads arrivals over the instances, so each sees a smoother stream than
    # Poisson: squared CV 1/N for round-robin over N (Erlang-N gaps); least-outstanding
    # dispatch is at least as smooth (benchmarks/fluid_agreement.md).
    arrival_scv = lambda curve: 1.0 / jnp.maximum(replicas_serving * curve.instances_per_replica, 1.0)  # noqa: E731
    big = _latency_at_utilisation(params.model, util, tokens, arrival_scv(params.model))
    small = _latency_at_utilisation(params.small_model, util, tokens, arrival_scv(params.small_model))
    q = small_fraction
    mix = lambda b, s: (1.0 - q) * b + q * s  # noqa: E731
    prefill_s, prefill_p95_s, tpot_s = mix(big[0], small[0]), mix(big[1], small[1]), mix(big[2], small[2])
    wait_iteration_s = mix(big[5], small[5])
    # Admission wait for a batch slot: Allen-Cunneen / Sakasegawa M/G/c with c = KV-capped slots.
    slots = jnp.maximum(replicas_serving * mix(big[4], small[4]), 1.0)
    rho = jnp.minimum(util, 0.99)
    service_s = prefill_s + (t_out - 1.0) * tpot_s
    wait_slot_s = rho ** (jnp.sqrt(2.0 * (slots + 1.0)) - 1.0) / (slots * (1.0 - rho)) * service_s
    wait_backlog_s = 0.5 * (queue_requests + queue_after) / jnp.maximum(capacity_rps, 1e-6)
    wait_backlog_s = jnp.minimum(wait_backlog_s, params.queue_timeout_s)
    random_wait_s = wait_iteration_s + wait_slot_s
    # A standing backlog is served FCFS: its wait replaces the stationary queueing wait
    # (the reference sim's requests wait ~the backlog, not the backlog plus an M/G/c wait).
    ttft_mean_s = jnp.maximum(wait_backlog_s, random_wait_s) + prefill_s
    ttft_p95_s = jnp.maximum(wait_backlog_s, 3.0 * random_wait_s) + prefill_p95_s  # Exp p95 = ln 20 * mean
    e2e_mean_s = ttft_mean_s + (t_out - 1.0) * tpot_s  # the prefill emitted the first token
    e2e_p95_s = ttft_p95_s + (tokens["output_p95"] - 1.0) * tpot_s

    # Forwarded requests: two RTTs plus the peer's unloaded service.
    fwd_ttft_s = 2.0 * params.peer_rtt_s + big[0] + 0.5 * params.model.decode_base_s
    fwd_e2e_s = fwd_ttft_s + t_out * (params.model.decode_base_s + 1e-9)
    done = served + forwarded
    w_local = served / jnp.maximum(done, 1e-9)
    lat_mean_s = w_local * e2e_mean_s + (1.0 - w_local) * fwd_e2e_s
    ttft_all_s = w_local * ttft_mean_s + (1.0 - w_local) * fwd_ttft_s

    meets_tpot = (tpot_s <= params.slo_tpot_s).astype(jnp.float32)
    local_ok = _lognormal_cdf_from_mean_p95(params.slo_ttft_s, ttft_mean_s, ttft_p95_s) * meets_tpot
    fwd_ok = (fwd_ttft_s <= params.slo_ttft_s).astype(jnp.float32)
    attempted = done + dropped
    slo_attainment = jnp.where(attempted > 0, (served * local_ok + forwarded * fwd_ok) / jnp.maximum(attempted, 1e-9), 1.0)

    cpu_needed = idle_cores * replicas_serving + busy_cores * served / tick / jnp.maximum(per_replica_rps, 1e-9)
    mem_used = jnp.minimum(replicas_billed * host_mem_per_replica, host_memory_gb)
    weights_cached = host_memory_gb >= replicas_billed * host_mem_per_replica + params.weights_gb
    mem_used = mem_used + jnp.where(weights_cached, params.weights_gb, 0.0)

    hours = tick / 3600.0
    peer_usd_per_request = params.replica_price_usd_per_h / 3600.0 / jnp.maximum(per_replica_rps, 1e-9)
    cost_usd = (
        replicas_billed * params.replica_price_usd_per_h * hours
        + cpu_cores * CPU_USD_PER_CORE_H * hours
        + host_memory_gb * MEMORY_USD_PER_GB_H * hours
        + forwarded * ((t_in + t_out) * BYTES_PER_TOKEN / 1e9 * EGRESS_USD_PER_GB + peer_usd_per_request)
    )
    # Quality relative to the node's own model (1.0); the peer serves the same model.
    small_quality = params.small_model.quality / params.model.quality
    quality = (served * mix(1.0, small_quality) + forwarded) / jnp.maximum(done, 1e-9)

    metrics = {
        "arrivals": arrivals,
        "served": served,
        "forwarded": forwarded,
        "dropped": dropped,
        "queue_requests": queue_after,
        "throughput_rps": done / tick,
        "tokens_per_s": done * (t_in + t_out) / tick,
        "ttft_mean_s": ttft_all_s,
        "ttft_p95_s": ttft_p95_s,
        "e2e_mean_s": lat_mean_s,
        "e2e_p95_s": e2e_p95_s,
        "tpot_s": tpot_s,
        "slo_attainment": slo_attainment,
        "gpu_util": util,
        "cpu_util": jnp.clip(cpu_needed / jnp.maximum(cpu_cores, 1e-6), 0.0, 1.0),
        "memory_util": jnp.clip(mem_used / jnp.maximum(host_memory_gb, 1e-6), 0.0, 1.0),
        "cost_usd": cost_usd,
        "capacity_rps": capacity_rps,
        "quality": jnp.where(done > 0, quality, 1.0),
    }
    return metrics, queue_after


TARGET_UTILISATION = 0.8  # sizing headroom for static allocations, as in HPA targets


def replicas_for_rate(params: EnvParams, rate_rps, utilisation=TARGET_UTILISATION):
    """Replicas needed to serve `rate_rps` at `utilisation` of capacity (float, in limits)."""
    per_replica = replica_capacity_rps(params)
    return jnp.clip(jnp.ceil(rate_rps / (per_replica * utilisation)), params.min_replicas, params.max_replicas)


def cores_for(params: EnvParams, replicas):
    """CPU cores that keep `replicas` from being CPU-bound, in whole allocation steps."""
    idle, busy = _cpu_cores_per_replica(params)
    return jnp.ceil(replicas * (idle + busy) / params.cpu_step_cores) * params.cpu_step_cores


def memory_for(params: EnvParams, replicas, cache_weights=False):
    """Host memory (GB) for `replicas`, plus one copy of the weights if cached, in steps."""
    need = replicas * _host_memory_per_replica_gb(params) + jnp.where(cache_weights, params.weights_gb, 0.0)
    return jnp.ceil(need / params.memory_step_gb) * params.memory_step_gb


def _cpu_cores_per_replica(params: EnvParams):
    """(idle, busy-at-full-load) cores per replica. vLLM V1 runs an API-server and an
    engine-core process plus one worker per GPU, each driving one core when busy
    (vLLM V1 architecture, 2025); idle processes keep about one core busy in total."""
    return 1.0, 2.0 + params.tensor_parallel


def _host_memory_per_replica_gb(params: EnvParams):
    """vLLM's default 4 GiB KV swap space per GPU plus ~10 GB for the process, tokenizer
    and pinned buffers (assumption)."""
    return 10.0 + 4.0 * params.tensor_parallel


def _cached_cold_start_s(params: EnvParams):
    """Weights in host memory load over PCIe Gen4 x16 (~25 GB/s per GPU) plus ~20 s of
    engine start-up and CUDA-graph capture (vLLM)."""
    return 20.0 + params.weights_gb / (25.0 * params.tensor_parallel)


# --------------------------------------------------------------------------------------
# The gymnax environment
# --------------------------------------------------------------------------------------


class ServingNodeEnv(environment.Environment[EnvState, EnvParams]):
    """One LLM inference node. `action_set` is "extended" (11 actions) or "paper" (5)."""

    def __init__(self, action_set: str = "extended"):
        super().__init__()
        if action_set not in ACTION_SETS:
            raise ValueError(f"action_set must be one of {sorted(ACTION_SETS)}, got {action_set!r}")
        self.action_set = action_set
        self.action_names = ACTION_SETS[action_set]

    @property
    def name(self) -> str:
        return "ServingNode-v0"

    @property
    def num_actions(self) -> int:
        return len(self.action_names)

    @property
    def default_params(self) -> EnvParams:
        from aro_jax.envs.scenarios import default_node_params

        return default_node_params()

    def action_space(self, params: EnvParams | None = None) -> spaces.Discrete:
        return spaces.Discrete(self.num_actions)

    def observation_space(self, params: EnvParams) -> spaces.Box:
        return spaces.Box(-jnp.inf, jnp.inf, (len(OBS_FIELDS),), jnp.float32)

    def reset_env(self, key: jax.Array, params: EnvParams) -> tuple[jax.Array, EnvState]:
        week_s = 7 * 86_400.0
        tick = params.tick_s
        random_start = jnp.floor(jax.random.uniform(key, (), maxval=week_s) / tick) * tick
        clock_s = jnp.where(params.random_start > 0.5, random_start, params.start_time_s)
        rate = expected_rate_rps(clock_s, params.traffic)
        # Strong float32 (not weakly typed Python floats from params), so a reset state and
        # a stepped state have the same types and a jitted step does not retrace.
        replicas = jnp.asarray(params.initial_replicas, jnp.float32)
        cpu_cores = jnp.asarray(params.initial_cpu_cores, jnp.float32)
        host_memory_gb = jnp.asarray(params.initial_host_memory_gb, jnp.float32)
        zeros = jnp.zeros(())
        # gymnax computes a reset on every step (auto-reset under vmap is a select), so the
        # first observation is cheap: the expected load against the initial capacity, no
        # latency yet; the forecaster's prior is the node's mean rate.
        capacity = replicas * replica_capacity_rps(params)
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
            forward_fraction=zeros,
            small_model_fraction=zeros,
            queue_requests=zeros,
            forecast=fc.init(params.traffic.mean_rate_rps),
            last=last,
        )
        obs = raw_observation(state, params, forecast_rps=params.traffic.mean_rate_rps) / observation_scale(params)
        return obs, state

    def step_env(self, key, state: EnvState, action, params: EnvParams):
        state, metrics, reward = self.transition(key, state, action, params)
        info = {"metrics": metrics}
        return self.get_obs(state, params), state, reward, jnp.array(False), info

    def transition(self, key, state: EnvState, action, params: EnvParams):
        """(state, metrics, reward) after one tick; step_env without the observation."""
        k_arrivals, k_cold = jax.random.split(key)
        tick = params.tick_s
        a = jnp.asarray(action, jnp.int32)

        # 1. Apply the decision.
        replicas_total = state.replicas_ready + state.replicas_pending.sum()
        scale_up = (a == INC_GPU) & (replicas_total < params.max_replicas)
        scale_down = (a == DEC_GPU) & (state.replicas_ready > params.min_replicas)
        host_mem_per_replica = _host_memory_per_replica_gb(params)
        cached = state.host_memory_gb >= (replicas_total + 1) * host_mem_per_replica + params.weights_gb
        cold_s = params.cold_start_mean_s + params.cold_start_sd_s * jax.random.normal(k_cold)
        cold_s = jnp.where(cached, _cached_cold_start_s(params), cold_s)
        delay_ticks = jnp.clip(jnp.ceil(cold_s / tick), 1, PENDING_SLOTS).astype(jnp.int32)
        slot = jnp.arange(PENDING_SLOTS) == delay_ticks - 1
        pending = state.replicas_pending + jnp.where(scale_up & slot, 1.0, 0.0)
        ready = state.replicas_ready - scale_down.astype(jnp.float32)
        draining = scale_down.astype(jnp.float32)  # a drained replica is billed for one more tick

        step = lambda x, up, down, size, lo, hi: jnp.clip(x + size * ((a == up).astype(jnp.float32) - (a == down)), lo, hi)  # noqa: E731
        min_cores = ready * _cpu_cores_per_replica(params)[0]
        cpu = step(state.cpu_cores, INC_CPU, DEC_CPU, params.cpu_step_cores, params.cpu_step_cores, params.max_cpu_cores)
        cpu = jnp.where(a == DEC_CPU, jnp.maximum(cpu, jnp.minimum(state.cpu_cores, min_cores)), cpu)
        mem = step(state.host_memory_gb, INC_MEM, DEC_MEM, params.memory_step_gb, params.memory_step_gb, params.max_host_memory_gb)
        fwd = step(state.forward_fraction, REBALANCE, PULL_BACK, params.forward_step, 0.0, params.max_forward_fraction)
        small = step(state.small_model_fraction, DEGRADE, RESTORE, params.quality_step, 0.0, params.max_small_model_fraction)

        # 2. Serve this tick's traffic.
        arrivals = sample_arrivals(k_arrivals, state.clock_s, tick, params.traffic)
        in_outage = (state.clock_s >= params.outage_start_s) & (state.clock_s < params.outage_start_s + params.outage_duration_s)
        serving = ready * jnp.where(in_outage & (params.outage_start_s >= 0), 1.0 - params.outage_capacity_loss, 1.0)
        billed = ready + pending.sum() + draining
        metrics, queue = fluid_tick(params, arrivals, state.queue_requests, serving, cpu, mem, billed, fwd, small)

        # 3. Replicas finishing their cold start serve from the next tick.
        ready = ready + pending[0]
        pending = jnp.concatenate([pending[1:], jnp.zeros((1,))])

        local_clock = state.clock_s + params.traffic.tz_offset_h * 3600.0
        forecast = fc.update(state.forecast, local_clock, arrivals / tick)
        reward = reward_fn(metrics, params)
        metrics = {**metrics, "reward": reward, "replicas_ready": ready, "replicas_billed": billed}
        new_state = EnvState(
            time=state.time + 1,
            clock_s=state.clock_s + tick,
            replicas_ready=ready,
            replicas_pending=pending,
            replicas_draining=draining,
            cpu_cores=cpu,
            host_memory_gb=mem,
            forward_fraction=fwd,
            small_model_fraction=small,
            queue_requests=queue,
            forecast=forecast,
            last=_observed(metrics),
        )
        return new_state, metrics, reward

    def get_obs(self, state: EnvState, params: EnvParams, key=None) -> jax.Array:
        return raw_observation(state, params) / observation_scale(params)

    def is_terminated(self, state: EnvState, params: EnvParams) -> jax.Array:
        return jnp.array(False)

    def action_mask(self, state: EnvState, params: EnvParams) -> jax.Array:
        """Feasible actions (bool, one per action) in this state."""
        return feasible_actions(raw_observation(state, params), params)[: self.num_actions]

    def action_mask_from_obs(self, obs: jax.Array, params: EnvParams) -> jax.Array:
        """Feasible actions from (a batch of) this env's observations."""
        return feasible_actions(obs * observation_scale(params), params)[..., : self.num_actions]


def feasible_actions(raw_obs: jax.Array, params: EnvParams) -> jax.Array:
    """Which of the 11 extended actions can change anything, from the raw observation
    alone (so a deployed policy can mask too). MaintainCurrent is always feasible."""
    f = {name: raw_obs[..., i] for i, name in enumerate(OBS_FIELDS)}
    total = f["replicas_ready"] + f["replicas_pending"]
    true = jnp.ones_like(total, dtype=bool)
    return jnp.stack([
        f["cpu_cores"] < params.max_cpu_cores,
        total < params.max_replicas,
        f["host_memory_gb"] < params.max_host_memory_gb,
        f["forward_fraction"] < params.max_forward_fraction,
        true,
        f["cpu_cores"] > params.cpu_step_cores,
        f["replicas_ready"] > params.min_replicas,
        f["host_memory_gb"] > params.memory_step_gb,
        f["forward_fraction"] > 0,
        f["small_model_fraction"] < params.max_small_model_fraction,
        f["small_model_fraction"] > 0,
    ], axis=-1)


def reward_fn(metrics: dict[str, jax.Array], params: EnvParams) -> jax.Array:
    """ARO reward: alpha * throughput + beta * (1 - latency) - gamma * cost, each in [0, ~1],
    minus penalties for SLO misses and for quality lost to the small model. Throughput is the share of demand served (locally or by a
    peer); latency is mean end-to-end latency over the SLO-implied end-to-end budget; cost
    is $/h over the node's static-for-peak cost."""
    demand = jnp.maximum(metrics["arrivals"], 1e-9)
    served_share = jnp.where(metrics["arrivals"] > 0, (metrics["served"] + metrics["forwarded"]) / demand, 1.0)
    e2e_budget_s = params.slo_ttft_s + token_stats(params.traffic)["output_mean"] * params.slo_tpot_s
    latency = jnp.clip(metrics["e2e_mean_s"] / e2e_budget_s, 0.0, 1.0)
    cost = metrics["cost_usd"] * 3600.0 / params.tick_s / params.cost_ref_usd_per_h
    misses = 1.0 - metrics["slo_attainment"]
    quality_loss = 1.0 - metrics["quality"]
    return (
        params.alpha * served_share + params.beta * (1.0 - latency) - params.gamma * cost
        - params.slo_penalty * misses - params.quality_penalty * quality_loss
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
        "drop_fraction": jnp.where(metrics["arrivals"] > 0, metrics["dropped"] / arrivals, 0.0),
        "slo_attainment": metrics["slo_attainment"],
    }


def raw_observation(state: EnvState, params: EnvParams, forecast_rps=None) -> jax.Array:
    """The live metrics an operator sees, in OBS_FIELDS order and natural units
    (`forecast_rps` given: skip the forecaster)."""
    last = state.last
    local = state.clock_s + params.traffic.tz_offset_h * 3600.0
    day = 2 * jnp.pi * local / 86_400.0
    week = 2 * jnp.pi * local / (7 * 86_400.0)
    fcast = fc.predict_rate_rps(state.forecast, local, params.forecast_horizon_s, params.tick_s) if forecast_rps is None else forecast_rps
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
        jnp.sin(day),
        jnp.cos(day),
        jnp.sin(week),
        jnp.cos(week),
        fcast,
        last["drop_fraction"],
        last["slo_attainment"],
    ]).astype(jnp.float32)


def observation_scale(params: EnvParams) -> jax.Array:
    """Divisors that make each raw field O(1) for this node (exported with policies)."""
    rate = params.rate_ref_rps
    e2e_budget_s = params.slo_ttft_s + token_stats(params.traffic)["output_mean"] * params.slo_tpot_s
    one = jnp.ones(())
    return jnp.stack([
        rate, e2e_budget_s, one, one, one, rate * params.tick_s, params.max_replicas, params.max_replicas,
        params.max_cpu_cores, params.max_host_memory_gb, one, one, rate, one, one, one, one, rate, one, one,
    ]).astype(jnp.float32)
