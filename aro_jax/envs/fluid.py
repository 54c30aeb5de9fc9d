"""The fluid model of continuous-batching LLM serving: one decision tick of one node.

Pure functions of a node's EnvParams and its allocation; `fluid_tick` is checked against
a request-level simulator in benchmarks/fluid_agreement.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aro_jax.envs.params import EnvParams, ServiceCurve
from aro_jax.envs.traffic import TrafficParams, token_stats

# Cost of the CPU side, GCP N2 predefined on-demand list price (us-central1, 2024).
CPU_USD_PER_CORE_H = 0.031611
MEMORY_USD_PER_GB_H = 0.004237
# Inter-region egress within a continent, GCP/AWS list price ($/GB, 2024).
EGRESS_USD_PER_GB = 0.02
BYTES_PER_TOKEN = 4.0  # ~4 characters of UTF-8 English per BPE token (OpenAI tokenizer guide)


def token_moments(traffic: TrafficParams) -> dict[str, jax.Array]:
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
    tokens = tokens or token_moments(params.traffic)
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
    tokens = token_moments(params.traffic)
    t_in, t_out = tokens["input_mean"], tokens["output_mean"]

    forwarded = jnp.minimum(forward_fraction * arrivals, params.peer_spare_rps * tick)
    local = arrivals - forwarded

    # Capacity: GPUs, throttled by host-memory pressure and by CPU cores.
    per_replica_rps = replica_capacity_rps(params, small_fraction, tokens)
    host_mem_per_replica = host_memory_per_replica_gb(params)
    mem_factor = jnp.minimum(host_memory_gb / jnp.maximum(replicas_billed * host_mem_per_replica, 1e-6), 1.0)
    gpu_capacity_rps = replicas_serving * per_replica_rps * mem_factor
    idle_cores, busy_cores = cpu_cores_per_replica(params)
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



def cpu_cores_per_replica(params: EnvParams):
    """(idle, busy-at-full-load) cores per replica. vLLM V1 runs an API-server and an
    engine-core process plus one worker per GPU, each driving one core when busy
    (vLLM V1 architecture, 2025); idle processes keep about one core busy in total."""
    return 1.0, 2.0 + params.tensor_parallel


def host_memory_per_replica_gb(params: EnvParams):
    """vLLM's default 4 GiB KV swap space per GPU plus ~10 GB for the process, tokenizer
    and pinned buffers (assumption)."""
    return 10.0 + 4.0 * params.tensor_parallel


def cached_cold_start_s(params: EnvParams):
    """Weights in host memory load over PCIe Gen4 x16 (~25 GB/s per GPU) plus ~20 s of
    engine start-up and CUDA-graph capture (vLLM)."""
    return 20.0 + params.weights_gb / (25.0 * params.tensor_parallel)

