"""The fluid model of continuous-batching LLM serving: one decision tick of one node.

Pure functions of a node's EnvParams and its allocation; `fluid_tick` is checked against
a request-level simulator in benchmarks/fluid_agreement.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aro_jax.contract import IDLE_CORES_PER_REPLICA
from aro_jax.envs.params import EnvParams, ServiceCurve
from aro_jax.envs.traffic import TrafficParams, daily_weekly_shape, token_stats, truncated_lognormal_moment

# Inter-region egress within a continent, GCP/AWS list price ($/GB, 2024).
EGRESS_USD_PER_GB = 0.02
BYTES_PER_TOKEN = 4.0  # ~4 characters of UTF-8 English per BPE token (OpenAI tokenizer guide)


def token_moments(traffic: TrafficParams) -> dict[str, jax.Array]:
    """`token_stats` plus raw moments E[L^k] of the admitted prompts (input k = 2..4,
    truncated at the context window) and of the clipped outputs (k = 2): service times
    are non-linear in the lengths (quadratic prefill, context growing with the output),
    so the fluid model needs means of powers."""
    stats = token_stats(traffic)
    log_cap = jnp.log(traffic.max_context_tokens)

    def clipped_moment(mu, sd, k):
        # E[min(X, cap)^k] for X ~ LogNormal(mu, sd).
        phi = lambda z: 0.5 * (1.0 + jax.scipy.special.erf(z / jnp.sqrt(2.0)))  # noqa: E731
        below = jnp.exp(k * mu + 0.5 * (k * sd) ** 2) * phi((log_cap - mu - k * sd**2) / sd)
        return below + jnp.exp(k * log_cap) * (1.0 - phi((log_cap - mu) / sd))

    for k in (2, 3, 4):
        stats[f"input_m{k}"] = truncated_lognormal_moment(traffic.input_log_mean, traffic.input_log_sd, traffic.max_context_tokens, k)
    stats["output_m2"] = clipped_moment(traffic.output_log_mean, traffic.output_log_sd, 2)
    return stats


# Gauss-Hermite nodes for expectations over a log-normal length: E[f(X)] = sum_i w_i f(X_i).
# Four nodes over prompt lengths (TTFT has a kink where the budget rule starts), three
# over output lengths (TPOT attainment is smooth in n).
_GH = {k: np.polynomial.hermite.hermgauss(k) for k in (2, 3, 4)}
_GH_Z = {k: jnp.asarray(np.sqrt(2.0) * x, jnp.float32) for k, (x, _) in _GH.items()}
_GH_P = {k: jnp.asarray(w / np.sqrt(np.pi), jnp.float32) for k, (_, w) in _GH.items()}


def _length_nodes(log_mean, log_sd, cap, k=4, truncate=False):
    """Quadrature nodes (lengths clipped to [1, cap]) and weights; `truncate`: nodes
    beyond cap are dropped and the rest reweighted (prompts over the window are rejected)."""
    raw = jnp.exp(log_mean + log_sd * _GH_Z[k])
    w = _GH_P[k]
    if truncate:
        w = jnp.where(raw <= cap, w, 0.0)
        w = jnp.where(w.sum() > 0, w / jnp.maximum(w.sum(), 1e-12), jax.nn.one_hot(0, k))
    return jnp.clip(raw, 1.0, cap), w


def decode_step_s(curve: ServiceCurve, batch, context_per_seq):
    """Decode step of `batch` sequences of mean context `context_per_seq`: the fit up to
    the calibrated batch, roofline increments beyond (hardware.ServiceProfile.decode_step_ms)."""
    base, p1, p2 = _decode_branches(curve, context_per_seq)
    bc = curve.decode_calibrated_seqs
    return base + p1 * jnp.minimum(batch, bc) + p2 * jnp.maximum(batch - bc, 0.0)


def _decode_branches(curve: ServiceCurve, ctx):
    p1 = curve.decode_s_per_seq + curve.decode_s_per_context_token * ctx
    p2 = jnp.minimum(p1, jnp.maximum(curve.roof_s_per_seq, curve.roof_s_per_context_token * ctx))
    return curve.decode_base_s, p1, p2


def isolated_prefill_s(curve: ServiceCurve, tokens):
    """A prompt alone on an idle instance: ceil(L / token budget) iterations."""
    iters = jnp.ceil(tokens / curve.token_budget)
    return iters * curve.prefill_base_s + curve.prefill_s_per_token * tokens + curve.prefill_s_per_token_sq * tokens**2


def ttft_budget_s(curve: ServiceCurve, tokens, slo_ttft_s, slack):
    """TTFT budget of a prompt of `tokens`: the workload's SLO, or `slack` times the
    prompt's own prefill on an idle instance where that is larger. A fixed SLO below the
    idle prefill time cannot be met by any allocation; the slack lets such a request
    wait as long again as its own prefill (slack 2)."""
    return jnp.maximum(slo_ttft_s, slack * isolated_prefill_s(curve, tokens))


def _instance_model(curve: ServiceCurve, tokens):
    """Per-instance quantities of chunked-prefill continuous batching at the token mix:
    prefill work per request (s, without the iteration base), decode iterations per
    request, mean context per decoding sequence, the batch bound and the max rate."""
    t_in, t_out = tokens["input_mean"], tokens["output_mean"]
    # Mean prefill work over the prompt distribution, E[b L + c L^2] (the reference
    # prefills each prompt at its own length, chunk by chunk); iterations carrying a
    # prefill pay the prefill base where it exceeds the decode base.
    extra_base = jnp.maximum(curve.prefill_base_s - curve.decode_base_s, 0.0)
    work_s = curve.prefill_s_per_token * t_in + curve.prefill_s_per_token_sq * tokens["input_m2"] + extra_base
    # The prefill emits the first token, so a request takes n - 1 decode iterations.
    decode_iters = jnp.maximum(t_out - 1.0, 1e-3)
    # At its j-th decode iteration a sequence attends over L + j tokens: summed over its
    # iterations that is (n-1) L + n(n-1)/2, so the mean context per iteration is:
    out_pairs = 0.5 * (tokens["output_m2"] - t_out)  # E[n(n-1)/2]
    context = t_in + out_pairs / decode_iters
    # Admission reserves prompt + output KV for the whole decode; sequences are in the
    # batch for n - 1 iterations, so the batch's mean footprint per sequence is
    # E[(n-1)(L+n)] / E[n-1] = E[L] + E[n(n-1)] / E[n-1].
    footprint = t_in + 2.0 * out_pairs / decode_iters
    batch_kv = jnp.maximum(jnp.minimum(curve.max_batch_seqs, curve.kv_capacity_tokens / footprint), 1.0)
    # Token budget: an iteration holds B decode tokens plus rate * T * E[L] prefill
    # tokens, and B = rate * (n-1) * T, so B <= budget * (n-1) / (n-1 + E[L]).
    batch_budget = curve.token_budget * decode_iters / (decode_iters + t_in)
    batch_max = jnp.maximum(jnp.minimum(batch_kv, batch_budget), 1.0)
    # At full batch B each iteration lasts T = step(B) / (1 - rate * work) and B = rate * (n-1) * T.
    step_full = decode_step_s(curve, batch_max, context)
    max_rate = batch_max / (decode_iters * step_full + batch_max * work_s)
    return work_s, decode_iters, context, batch_max, max_rate


def replica_capacity_rps(params: EnvParams, small_fraction=0.0, tokens=None):
    """Max requests/s one replica sustains at the node's mean token mix, with
    `small_fraction` of requests on small-model GPUs sized to the same load."""
    tokens = tokens or token_moments(params.traffic)
    big = _instance_model(params.model, tokens)[-1]
    small = _instance_model(params.small_model, tokens)[-1]
    big = big * params.model.instances_per_replica
    small = small * params.small_model.instances_per_replica
    return 1.0 / ((1.0 - small_fraction) / big + small_fraction / small)


TPOT_SPREAD = 2.3
SMALL_TIER_NODES = (2, 2)  # quadrature nodes (prompt, output lengths) for the small tier


# Squared CV of a busy instance's TTFT wait (the reference's is 1.4-2.0 at 0.3-0.9 load).
WAIT_CV2 = 1.8


def _wait_cdf(x, mean):
    """An atom at zero plus an exponential, with `mean` and CV^2 = WAIT_CV2 (one exp: the
    cheapest law with a CV above 1)."""
    x = jnp.maximum(x, 0.0)
    pi = 2.0 / (1.0 + WAIT_CV2)
    return 1.0 - pi * jnp.exp(-x * pi / jnp.maximum(mean, 1e-9))


def _lognormal_cdf(x, mean, cv2):
    sd2 = jnp.log1p(cv2)
    mu = jnp.log(jnp.maximum(mean, 1e-12)) - 0.5 * sd2
    z = (jnp.log(jnp.maximum(x, 1e-12)) - mu) / jnp.sqrt(jnp.maximum(sd2, 1e-12))
    return 0.5 * (1.0 + jax.scipy.special.erf(z / jnp.sqrt(2.0)))


def _latency_at_utilisation(curve: ServiceCurve, util, tokens, traffic: TrafficParams, arrival_scv=1.0, nodes=(4, 3)):
    """Per instance at `util` of its max rate (chunked prefill): TTFT and TPOT means, the
    pieces of the per-request distributions, and the batch bound. `arrival_scv`: squared
    CV of the instance's inter-arrival times (1: Poisson).

    Mechanics of the reference (benchmarks/reference_sim.py): every iteration carries the
    decode token of each running sequence and up to the remaining token budget of
    prefill chunks, FCFS. An iteration with B decoding sequences lasts step(B) plus the
    prefill work it carries; prefill work arrives at rate * E[work] per second, so the mean
    iteration a sequence sees is T = step(B + ca^2) / (1 - rho_p) with B = rate (n-1) T by
    Little's law (the sequence itself plus the size-biased others). A new prompt waits for
    the iteration in progress (residual E[T^2] / 2E[T]) and is prefilled in the next one(s)
    with the prompts that arrived meanwhile.
    """
    work_s, decode_iters, context, batch_max, max_rate = _instance_model(curve, tokens)
    footprint = tokens["input_mean"] + (tokens["output_m2"] - tokens["output_mean"]) / decode_iters
    rate = util * max_rate
    rho_p = jnp.minimum(rate * work_s, 0.95)
    scv = arrival_scv
    base, p1, p2 = _decode_branches(curve, context)
    bc = curve.decode_calibrated_seqs

    def tpot_branch(b0, slope):
        denom = 1.0 - rho_p - rate * decode_iters * slope
        return jnp.where(denom > 1e-6, (b0 + slope * scv) / jnp.maximum(denom, 1e-6), jnp.inf)

    t1 = tpot_branch(base, p1)
    t2 = tpot_branch(base + (p1 - p2) * bc, p2)
    tpot_s = jnp.where(rate * decode_iters * t1 + scv > bc, t2, t1)
    t_cap = decode_step_s(curve, batch_max, context) / (1.0 - rho_p)
    tpot_s = jnp.minimum(tpot_s, t_cap)
    b, c = curve.prefill_s_per_token, curve.prefill_s_per_token_sq
    m1, m2, m3, m4 = tokens["input_mean"], tokens["input_m2"], tokens["input_m3"], tokens["input_m4"]
    work_sq = b * b * m2 + 2 * b * c * m3 + c * c * m4  # E[W^2], W = b L + c L^2
    # The prefill share a sequence meets over its life varies (Poisson prefill work, variance
    # rate E[W^2] / life); TPOT is convex in it, 1 / (1 - rho_p - rho_d), so the mean TPOT
    # of the tokens rises by a factor that grows with x = Var / (1 - rho_p - rho_d)^2: the
    # form 1 + 0.4 x^2 / (1 + x^2) is fitted to the reference (benchmarks/fluid_agreement.md).
    life_s = decode_iters * tpot_s
    slack = jnp.maximum(1.0 - rho_p - rate * decode_iters * jnp.where(rate * decode_iters * t1 + scv > bc, p2, p1), 1e-3)
    x = rate * work_sq / jnp.maximum(life_s, 1e-9) / slack**2
    drift = 1.0 + 0.4 * x**2 / (1.0 + x**2)
    tpot_s = jnp.minimum(tpot_s * drift, t_cap)
    batch = rate * decode_iters * tpot_s  # time-average decoding sequences
    step_s = decode_step_s(curve, batch, context)

    free_tokens = jnp.maximum(curve.token_budget - batch, 1.0)
    # Prompts queue FCFS for the budget left after the decode tokens: a prefill server
    # (M/G/1, Kingman-scaled for smoother arrivals) whose service of a prompt of L tokens
    # is its own work plus its share of the iterations it spans, S = (step / free + b) L + c L^2.
    alpha = step_s / free_tokens + b
    extra_base = jnp.maximum(curve.prefill_base_s - curve.decode_base_s, 0.0)
    s1 = alpha * m1 + c * m2 + extra_base
    s2 = alpha * alpha * m2 + 2 * alpha * c * m3 + c * c * m4
    rho_s = jnp.minimum(rate * s1, 0.98)
    queue_wait_s = rate * jnp.maximum(s2 - (1.0 - scv) * s1**2, 0.0) / (2.0 * (1.0 - rho_s))
    residual_s = 0.5 * tpot_s  # the iteration in progress
    # Probability that an arrival finds the instance busy: some sequence decoding
    # (Poisson count with mean B) or a prefill running.
    busy = 1.0 - jnp.exp(-batch) * (1.0 - jnp.minimum(rate * (curve.prefill_base_s + work_s), 1.0))
    busy = jnp.clip(busy, 0.0, 1.0)

    def ttft_parts(L):
        """(idle TTFT, fixed part when busy, mean random wait when busy) for prompts of L."""
        own = jnp.maximum(L / free_tokens, 1.0) * step_s + b * L + c * L**2
        wait = (residual_s + queue_wait_s) * drift  # the same drift lengthens the queue
        return isolated_prefill_s(curve, L), own, wait

    idle_m, fixed_m, wait_m = ttft_parts(m1)
    L_nodes, L_w = _length_nodes(traffic.input_log_mean, traffic.input_log_sd, traffic.max_context_tokens, k=nodes[0], truncate=True)
    idle_n, fixed_n, wait_n = ttft_parts(L_nodes)
    ttft_mean_s = jnp.sum(L_w * ((1.0 - busy) * idle_n + busy * (fixed_n + wait_n)))
    # Per-request TPOT: the mean of its n - 1 iterations, whose lengths vary with the
    # prefill work they carry (variance / (n - 1)), around a batch that drifts slowly.
    # The prefill work done during a request's life is a Poisson sum, variance rate * (n-1)
    # T E[W^2]; consecutive iterations share the chunks of one prompt and the load drifts,
    # which TPOT_SPREAD (fitted to the reference, benchmarks/fluid_agreement.md) covers.
    cv2_iter = TPOT_SPREAD * rate * work_sq / jnp.maximum(tpot_s, 1e-9)
    return {
        "tpot_s": tpot_s, "ttft_mean_s": ttft_mean_s, "batch_max": batch_max, "busy": busy, "batch": batch,
        "batch_kv": jnp.maximum(jnp.minimum(curve.max_batch_seqs, curve.kv_capacity_tokens / footprint), 1.0),
        "L_nodes": L_nodes, "L_w": L_w, "ttft_idle_nodes": idle_n, "ttft_fixed_nodes": fixed_n, "ttft_wait_nodes": wait_n,
        "ttft_p95_fixed_s": fixed_m, "ttft_p95_wait_s": wait_m,
        "cv2_iter": cv2_iter, "prefill_share": rho_p, "out_nodes": nodes[1],
    }


def _attainment(curve: ServiceCurve, lat, traffic: TrafficParams, slo_ttft_s, slo_tpot_s, slack, extra_wait_s):
    """Share of an instance's requests meeting both SLOs, from per-request distributions:
    TTFT of each prompt length against its budget (idle: the own prefill; busy: a fixed
    part plus a wait with CV^2 WAIT_CV2 (atom + exponential), plus `extra_wait_s` of queueing), and each request's TPOT
    (log-normal around the mean, CV^2 = cv2_iter / (n - 1)) against the TPOT SLO."""
    budget = ttft_budget_s(curve, lat["L_nodes"], slo_ttft_s, slack)
    idle_ok = (lat["ttft_idle_nodes"] + extra_wait_s <= budget).astype(jnp.float32)
    busy_ok = _wait_cdf(budget - lat["ttft_fixed_nodes"] - extra_wait_s, lat["ttft_wait_nodes"])
    ttft_ok = jnp.sum(lat["L_w"] * ((1.0 - lat["busy"]) * idle_ok + lat["busy"] * busy_ok))
    n_nodes, n_w = _length_nodes(traffic.output_log_mean, traffic.output_log_sd, traffic.max_context_tokens, k=lat["out_nodes"])
    iters = jnp.maximum(jnp.round(n_nodes) - 1.0, 1.0)
    cv2 = lat["cv2_iter"] / iters
    tpot_ok = jnp.where(jnp.round(n_nodes) <= 1.0, 1.0, _lognormal_cdf(slo_tpot_s, lat["tpot_s"], cv2))
    tpot_ok = jnp.sum(n_w * tpot_ok)
    ttft_ok, tpot_ok = jnp.clip(ttft_ok, 0.0, 1.0), jnp.clip(tpot_ok, 0.0, 1.0)
    return ttft_ok * tpot_ok, ttft_ok, tpot_ok


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
    gpus_offline_fraction: jax.Array = 0.0,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Serve one tick of a node with a modelled peer: returns (metrics, queue at the end
    of the tick).

    `small_fraction`: share of requests served by the small model, on dedicated GPUs sized
    to it; `gpus_offline_fraction`: share of the GPUs restarting to change that split.

    Requests are conserved: arrivals = served + dropped + forwarded + (queue' - queue).
    `serve_tick` and `with_forwarded` are its two halves; the cluster env calls them with
    real peers in between.
    """
    # No clock here: the peer carries its mean load.
    peer_load = params.peer_mean_rate_rps
    forwarded = jnp.minimum(forward_fraction * arrivals, peer_spare_rps(params, peer_load) * params.tick_s)
    core, queue_after = serve_tick(
        params, arrivals - forwarded, queue_requests, replicas_serving, cpu_cores, host_memory_gb, replicas_billed,
        small_fraction, gpus_offline_fraction,
    )
    return with_forwarded(params, core, forwarded, modelled_peer(params, core, forwarded, peer_load)), queue_after


# A peer lends capacity up to this utilisation of its own: the scale-out threshold of a
# typical HPA target (80 %), so lending never pushes it past the point where it would
# scale up for its own traffic.
PEER_SPARE_UTIL = 0.8


def peer_load_rps(params: EnvParams, clock_s) -> jax.Array:
    """The modelled peer's own expected load at UTC `clock_s`: its mean rate on this node's
    daily/weekly shape, in the peer's time zone."""
    t = params.traffic.replace(tz_offset_h=params.peer_tz_offset_h)
    return params.peer_mean_rate_rps * daily_weekly_shape(clock_s, t)


def peer_spare_rps(params: EnvParams, peer_load) -> jax.Array:
    """What the modelled peer can take: its headroom below PEER_SPARE_UTIL, at most the
    agreed `peer_spare_rps`."""
    return jnp.clip(PEER_SPARE_UTIL * params.peer_capacity_rps - peer_load, 0.0, params.peer_spare_rps)


def modelled_peer(params: EnvParams, core: dict[str, jax.Array], forwarded, peer_load_rps) -> dict[str, jax.Array]:
    """What a forwarded request meets at the single-region env's peer: one RTT (the
    request's way out, the first token's way back, on a kept-alive connection) plus the
    peer's service at its load (its own `peer_load_rps` and the forwarded requests),
    judged on TTFT (the round trip included) and TPOT, at the large model's cost per
    request at the peer's target load. The peer runs this node's model; its latency curve is this node's at the
    same utilisation (the same model on the cluster's GPUs)."""
    tokens = token_moments(params.traffic)
    t_out = tokens["output_mean"]
    instance_rps = _instance_model(params.model, tokens)[-1]
    capacity = jnp.maximum(params.peer_capacity_rps, 1e-6)
    util = jnp.clip((peer_load_rps + forwarded / params.tick_s) / capacity, 0.0, 0.99)
    scv = 1.0 / jnp.maximum(capacity / jnp.maximum(instance_rps, 1e-9), 1.0)  # dispatch over its instances
    lat = _latency_at_utilisation(params.model, util, tokens, params.traffic, scv, SMALL_TIER_NODES)
    rtt = params.peer_rtt_s
    ok = _attainment(params.model, lat, params.traffic, params.slo_ttft_s, params.slo_tpot_s, params.ttft_prefill_slack, rtt)[0]
    ttft_s = lat["ttft_mean_s"] + rtt
    e2e_s = ttft_s + (t_out - 1.0) * lat["tpot_s"]
    # Its price: the large model's cost per request at its target load.
    usd = core["big_usd_per_request"] / PEER_SPARE_UTIL
    return {"ttft_s": ttft_s, "e2e_s": e2e_s, "ok": ok, "usd_per_request": usd, "quality": jnp.ones(())}


def serve_tick(
    params: EnvParams,
    local: jax.Array,
    queue_requests: jax.Array,
    replicas_serving: jax.Array,
    cpu_cores: jax.Array,
    host_memory_gb: jax.Array,
    replicas_billed: jax.Array,
    small_fraction: jax.Array,
    gpus_offline_fraction: jax.Array = 0.0,
    incoming_requests: jax.Array | None = None,
    incoming_rtt_s: jax.Array = 0.0,
    weights_cache_gb: jax.Array = 0.0,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """The node's own half of a tick: serves its `local` (kept) arrivals and, given
    `incoming_requests`, requests forwarded in from peers (they join the same FCFS queue
    and are served at this node's load; their SLO check adds `incoming_rtt_s`, the mean
    round trip they travelled); `weights_cache_gb` of host memory hold the weights' copy.
    Returns (core metrics, queue'): local latency, the allocation's bill, and what a
    request served here for a peer meets (`peer_*`)."""
    tick = params.tick_s
    tokens = token_moments(params.traffic)
    t_out = tokens["output_mean"]
    has_incoming = incoming_requests is not None
    incoming = incoming_requests if has_incoming else jnp.zeros(())

    # Capacity: GPUs, throttled by host-memory pressure and by CPU cores.
    per_replica_rps = replica_capacity_rps(params, small_fraction, tokens)
    host_mem_per_replica = host_memory_per_replica_gb(params)
    mem_factor = jnp.minimum(host_memory_gb / jnp.maximum(replicas_billed * host_mem_per_replica, 1e-6), 1.0)
    gpu_capacity_rps = replicas_serving * per_replica_rps * mem_factor * (1.0 - gpus_offline_fraction)
    idle_cores, busy_cores = cpu_cores_per_replica(params)
    cpu_capacity_rps = jnp.maximum(cpu_cores - idle_cores * replicas_serving, 0.0) / busy_cores * per_replica_rps
    capacity_rps = jnp.minimum(gpu_capacity_rps, cpu_capacity_rps)

    backlog = queue_requests + local + incoming
    served = jnp.minimum(backlog, capacity_rps * tick)
    queue_after = backlog - served
    # Requests that cannot start within the timeout, then those past the queue bound.
    dropped_timeout = jnp.maximum(queue_after - capacity_rps * params.queue_timeout_s, 0.0)
    queue_after = queue_after - dropped_timeout
    dropped_overflow = jnp.maximum(queue_after - params.max_queue_requests, 0.0)
    queue_after = queue_after - dropped_overflow
    dropped = dropped_timeout + dropped_overflow
    # The queue holds one mix: peers' requests take the backlog's fate in proportion
    # (a fluid FCFS queue keeps no classes).
    peer_share = incoming / jnp.maximum(backlog, 1e-9)
    served_for_peers = served * peer_share
    dropped_own = dropped * (1.0 - peer_share)

    util = jnp.where(capacity_rps > 0, served / jnp.maximum(capacity_rps * tick, 1e-9), 0.0)
    util = jnp.clip(util, 0.0, 1.0)

    # Latency of the requests served this tick, per model (each pool at the same load).
    # Dispatch spreads arrivals over the instances, so each sees a smoother stream than
    # Poisson: squared CV 1/N for round-robin over N (Erlang-N gaps); least-outstanding
    # dispatch is at least as smooth (benchmarks/fluid_agreement.md).
    arrival_scv = lambda curve: 1.0 / jnp.maximum(replicas_serving * curve.instances_per_replica, 1.0)  # noqa: E731
    wait_backlog_s = 0.5 * (queue_requests + queue_after) / jnp.maximum(capacity_rps, 1e-6)
    wait_backlog_s = jnp.minimum(wait_backlog_s, params.queue_timeout_s)

    def model_latency(curve, slo_ttft_s, slo_tpot_s, nodes=(4, 3)):
        lat = _latency_at_utilisation(curve, util, tokens, params.traffic, arrival_scv(curve), nodes)
        # Admission wait for a batch slot: Allen-Cunneen / Sakasegawa M/G/c with c = the
        # pool's slots; a standing backlog is served FCFS and replaces it.
        # Slots are KV/max_num_seqs-bound; their occupancy is the decode batch over its bound.
        slots = jnp.maximum(replicas_serving * curve.instances_per_replica * lat["batch_kv"], 1.0)
        occupancy = jnp.minimum(lat["batch"] / lat["batch_kv"], 0.99)
        service_s = lat["ttft_mean_s"] + (t_out - 1.0) * lat["tpot_s"]
        wait_slot_s = occupancy ** (jnp.sqrt(2.0 * (slots + 1.0)) - 1.0) / (slots * (1.0 - occupancy)) * service_s
        queue_wait_s = jnp.maximum(wait_backlog_s, wait_slot_s)
        # A standing backlog delays every request alike; the slot wait is random.
        lat = {**lat, "ttft_wait_nodes": lat["ttft_wait_nodes"] + jnp.where(wait_backlog_s >= wait_slot_s, 0.0, wait_slot_s)}
        fixed_wait_s = jnp.where(wait_backlog_s >= wait_slot_s, wait_backlog_s, 0.0)
        judge = lambda extra_s: _attainment(  # noqa: E731
            curve, lat, params.traffic, slo_ttft_s, slo_tpot_s, params.ttft_prefill_slack, fixed_wait_s + extra_s,
        )[0]
        ok = judge(0.0)
        # A peer's request: the same TTFT distribution shifted by its round trip (the
        # request's way in and the first token's way back), TPOT at this node's load.
        ok_in = judge(incoming_rtt_s) if has_incoming else ok
        ttft_mean = lat["ttft_mean_s"] + queue_wait_s
        ttft_p95 = lat["ttft_p95_fixed_s"] + 3.0 * lat["ttft_p95_wait_s"] + jnp.maximum(wait_backlog_s, 3.0 * wait_slot_s)
        cv2 = lat["cv2_iter"] / jnp.maximum(t_out - 1.0, 1.0)
        sd = jnp.sqrt(jnp.log1p(cv2))
        tpot_p95 = lat["tpot_s"] * jnp.exp(1.645 * sd - 0.5 * sd**2)
        return dict(ttft=ttft_mean, ttft_p95=ttft_p95, tpot=lat["tpot_s"], tpot_p95=tpot_p95, ok=ok, ok_in=ok_in, prefill=lat["ttft_p95_fixed_s"])

    big = model_latency(params.model, params.slo_ttft_s, params.slo_tpot_s)
    # The small tier serves a share of the requests: fewer quadrature nodes suffice there.
    small = model_latency(params.small_model, params.small_slo_ttft_s, params.small_slo_tpot_s, SMALL_TIER_NODES)
    q = small_fraction
    mix = lambda k: (1.0 - q) * big[k] + q * small[k]  # noqa: E731
    ttft_mean_s, ttft_p95_s, tpot_s, tpot_p95_s = mix("ttft"), mix("ttft_p95"), mix("tpot"), mix("tpot_p95")
    e2e_mean_s = ttft_mean_s + (t_out - 1.0) * tpot_s  # the prefill emitted the first token
    e2e_p95_s = ttft_p95_s + (tokens["output_p95"] - 1.0) * tpot_s

    cpu_needed = idle_cores * replicas_serving + busy_cores * served / tick / jnp.maximum(per_replica_rps, 1e-9)
    mem_used = jnp.minimum(replicas_billed * host_mem_per_replica, host_memory_gb) + weights_cache_gb

    hours = tick / 3600.0
    bill_usd = (
        replicas_billed * params.replica_price_usd_per_h * hours
        + cpu_cores * params.cpu_usd_per_core_h * hours
        + host_memory_gb * params.memory_usd_per_gb_h * hours
    )
    # The price of one request here: this tick's bill over the requests it served, or
    # over what it would serve at PEER_SPARE_UTIL of its capacity (at least one replica's)
    # where it served fewer: a lender below its target load charges its cost at that
    # load (not its idle cost), a busier one its actual cost per request.
    floor = PEER_SPARE_UTIL * jnp.maximum(capacity_rps, per_replica_rps) * tick
    usd_per_request = bill_usd / jnp.maximum(jnp.maximum(served, floor), 1e-9)
    # Quality relative to the node's own model (1.0).
    small_quality = params.small_model.quality / params.model.quality
    quality_local = (1.0 - q) + q * small_quality
    core = {
        "arrivals": local,
        "served": served - served_for_peers,
        "served_for_peers": served_for_peers,
        "received": incoming,
        "dropped": dropped,
        "dropped_own": dropped_own,
        "queue_requests": queue_after,
        "ttft_mean_s": ttft_mean_s,
        "ttft_p95_s": ttft_p95_s,
        "e2e_mean_s": e2e_mean_s,
        "e2e_p95_s": e2e_p95_s,
        "tpot_s": tpot_s,
        "tpot_p95_s": tpot_p95_s,
        "local_ok": mix("ok"),
        "gpu_util": util,
        "cpu_util": jnp.clip(cpu_needed / jnp.maximum(cpu_cores, 1e-6), 0.0, 1.0),
        "memory_util": jnp.clip(mem_used / jnp.maximum(host_memory_gb, 1e-6), 0.0, 1.0),
        "bill_usd": bill_usd,
        "capacity_rps": capacity_rps,
        "quality_local": quality_local,
        # What a peer's request meets here (its round trip not yet added to the latencies).
        "peer_ttft_s": ttft_mean_s,
        "peer_e2e_s": e2e_mean_s,
        "peer_ok": mix("ok_in") * (1.0 - dropped / jnp.maximum(backlog, 1e-9)),
        "peer_usd_per_request": usd_per_request,
        "peer_quality": quality_local,
        "peer_prefill_s": big["prefill"],
        # The large model's price per request (a peer serves forwarded requests on it).
        "big_usd_per_request": params.replica_price_usd_per_h / 3600.0 / jnp.maximum(replica_capacity_rps(params, 0.0, tokens), 1e-9),
    }
    return core, queue_after


def with_forwarded(params: EnvParams, core: dict[str, jax.Array], forwarded: jax.Array, peer: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """A tick's metrics from `serve_tick`'s core and the outcome of the requests the node
    forwarded: `peer` holds their TTFT and end-to-end latency (round trip included), SLO
    attainment, quality and price per request where they were served. The sender pays
    the egress and the peer's price (a transfer: `peer_credit_usd` is what this node was
    paid for serving peers, netted out of its cost so a cluster's costs sum to its bill)."""
    tick = params.tick_s
    tokens = token_moments(params.traffic)
    t_in, t_out = tokens["input_mean"], tokens["output_mean"]
    served = core["served"]
    done = served + forwarded
    w_local = served / jnp.maximum(done, 1e-9)
    lat_mean_s = w_local * core["e2e_mean_s"] + (1.0 - w_local) * peer["e2e_s"]
    ttft_all_s = w_local * core["ttft_mean_s"] + (1.0 - w_local) * peer["ttft_s"]
    # Each model's requests are judged by that model's SLOs, forwarded ones where served.
    attempted = done + core["dropped_own"]
    slo_attainment = jnp.where(attempted > 0, (served * core["local_ok"] + forwarded * peer["ok"]) / jnp.maximum(attempted, 1e-9), 1.0)
    slo_attainment = jnp.clip(slo_attainment, 0.0, 1.0)
    egress_usd = forwarded * (t_in + t_out) * BYTES_PER_TOKEN / 1e9 * EGRESS_USD_PER_GB
    peer_paid_usd = forwarded * peer["usd_per_request"]
    peer_credit_usd = core["served_for_peers"] * core["peer_usd_per_request"]
    quality = (served * core["quality_local"] + forwarded * peer["quality"]) / jnp.maximum(done, 1e-9)
    keep = ("served", "served_for_peers", "received", "dropped", "queue_requests", "ttft_p95_s", "e2e_p95_s", "tpot_s",
            "tpot_p95_s", "gpu_util", "cpu_util", "memory_util", "capacity_rps")
    return {
        **{k: core[k] for k in keep},
        "arrivals": core["arrivals"] + forwarded,
        "forwarded": forwarded,
        "throughput_rps": done / tick,
        "tokens_per_s": done * (t_in + t_out) / tick,
        "ttft_mean_s": ttft_all_s,
        "fwd_ttft_s": peer["ttft_s"],  # latency of the forwarded requests (pooled percentiles)
        "fwd_e2e_s": peer["e2e_s"],
        "e2e_mean_s": lat_mean_s,
        "slo_attainment": slo_attainment,
        "cost_usd": core["bill_usd"] + egress_usd + peer_paid_usd - peer_credit_usd,
        "egress_usd": egress_usd,
        "peer_paid_usd": peer_paid_usd,
        "peer_credit_usd": peer_credit_usd,
        "quality": jnp.where(done > 0, quality, 1.0),
    }



def cpu_cores_per_replica(params: EnvParams):
    """(idle, busy-at-full-load) cores per replica. vLLM V1 runs an API-server and an
    engine-core process plus one worker per GPU, each driving one core when busy
    (vLLM V1 architecture, 2025); idle processes keep about one core busy in total."""
    return IDLE_CORES_PER_REPLICA, 2.0 + params.tensor_parallel


def host_memory_per_replica_gb(params: EnvParams):
    """vLLM's default 4 GiB KV swap space per GPU plus ~10 GB for the process, tokenizer
    and pinned buffers (assumption)."""
    return 10.0 + 4.0 * params.tensor_parallel


def cached_cold_start_s(params: EnvParams):
    """Weights in host memory load over PCIe Gen4 x16 (~25 GB/s per GPU) plus ~20 s of
    engine start-up and CUDA-graph capture (vLLM)."""
    return 20.0 + params.weights_gb / (25.0 * params.tensor_parallel)


def weights_cache_fill_gb_per_s(params: EnvParams):
    """The weights' copy in host memory fills from the remote storage a cold start
    loads from, at its pace: the weights over the cold start's mean (BLIS) less what a
    start from host memory still takes."""
    return params.weights_gb / jnp.maximum(params.cold_start_mean_s - cached_cold_start_s(params), 1.0)

