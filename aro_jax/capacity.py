"""Capacity planning from the simulator's serving model (`aro capacity`).

For a profile (a name in aro_jax.envs.hardware.PROFILES or a profile YAML file) and a
token mix (fixed lengths, a named traffic mix, or a trace file whose lengths are fitted
log-normally), report per replica the max sustainable request rate, decode tokens/s,
TTFT and TPOT (mean, p95) and per-request SLO attainment at a set of loads, and the
replicas needed for a target rate at a target attainment. Everything comes from
`aro_jax.envs.fluid.fluid_tick` at steady state, the model the policies are trained on.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from aro_jax.envs import fluid, hardware, scenarios
from aro_jax.envs.scenarios import NodeSpec

LOADS = (0.3, 0.5, 0.8, 0.95)
# A fixed length is a log-normal this narrow: +-0.1% around the given length.
FIXED_LOG_SD = 1e-3
WORKLOADS = sorted({w for w, _ in scenarios.SLO_TABLE})


class CapacityError(ValueError):
    """Bad input to `aro capacity`; the message says what and how to fix it."""


@dataclasses.dataclass(frozen=True)
class TokenMix:
    label: str
    input_log_mean: float
    input_log_sd: float
    output_log_mean: float
    output_log_sd: float
    max_context_tokens: float = 4096.0


def fixed_mix(input_tokens: int, output_tokens: int, max_context_tokens: float = 4096.0) -> TokenMix:
    if input_tokens < 1 or output_tokens < 1:
        raise CapacityError(f"--input-tokens and --output-tokens must be >= 1, got {input_tokens} and {output_tokens}")
    cap = max(max_context_tokens, float(input_tokens), float(output_tokens))
    return TokenMix(f"fixed {input_tokens} in / {output_tokens} out", math.log(input_tokens), FIXED_LOG_SD,
                    math.log(output_tokens), FIXED_LOG_SD, cap)


def named_mix(name: str) -> TokenMix:
    if name not in scenarios.TRAFFIC_MIXES:
        raise CapacityError(f"--mix must be one of {sorted(scenarios.TRAFFIC_MIXES)}, got {name!r}")
    m = scenarios.TRAFFIC_MIXES[name]
    return TokenMix(f"mix {name}", m["input_log_mean"], m["input_log_sd"], m["output_log_mean"], m["output_log_sd"])


def trace_mix(path) -> TokenMix:
    from aro_jax.envs.trace import fit_lognormal, load_trace_csv

    trace = load_trace_csv(path)
    in_mu, in_sd = fit_lognormal(trace.input_tokens)
    out_mu, out_sd = fit_lognormal(trace.output_tokens)
    return TokenMix(f"trace {path}", in_mu, in_sd, out_mu, out_sd)


def _params(profile: str, mix: TokenMix, workload: str, prices: str):
    if workload not in WORKLOADS:
        raise CapacityError(f"--workload must be one of {WORKLOADS}, got {workload!r}")
    try:
        prof = hardware.get_profile(profile)
    except ValueError as e:
        raise CapacityError(str(e)) from None
    p = scenarios.node_params(NodeSpec(profile=profile, max_replicas=4096), prices=prices)
    t = p.traffic.replace(
        input_log_mean=mix.input_log_mean, input_log_sd=mix.input_log_sd,
        output_log_mean=mix.output_log_mean, output_log_sd=mix.output_log_sd, max_context_tokens=mix.max_context_tokens,
    )
    small = hardware.get_profile(hardware.quality_tier_of(prof))
    ttft, tpot = scenarios.SLO_TABLE[(workload, prof.model)] if (workload, prof.model) in scenarios.SLO_TABLE else scenarios.SLO_TABLE[(workload, "llama2-70b")]
    s_ttft, s_tpot = scenarios.SLO_TABLE.get((workload, small.model), (ttft, tpot))
    return prof, p.replace(traffic=t, slo_ttft_s=ttft, slo_tpot_s=tpot, small_slo_ttft_s=s_ttft, small_slo_tpot_s=s_tpot)


def _steady_metrics(params, replicas, rate_rps):
    """fluid_tick with an empty queue at `rate_rps` over `replicas`, CPU/memory to spare."""
    tick = params.tick_s
    idle, busy = fluid.cpu_cores_per_replica(params)
    cores = 2.0 * replicas * (idle + busy)
    mem = 2.0 * replicas * (fluid.host_memory_per_replica_gb(params) + params.weights_gb)
    m, _ = fluid.fluid_tick(params, rate_rps * tick, jnp.zeros(()), replicas, cores, mem, replicas, 0.0, 0.0)
    return m


def report(profile: str, mix: TokenMix, loads=LOADS, target_rps: float | None = None, target_attainment: float = 0.95,
           workload: str = "chatbot", prices: str = hardware.DEFAULT_PRICE_SET) -> dict:
    """The capacity report as a JSON-able dict."""
    if not 0.0 < target_attainment <= 1.0:
        raise CapacityError(f"--target-attainment must be in (0, 1], got {target_attainment}")
    if any(not 0.0 < x < 1.0 for x in loads):
        raise CapacityError(f"--loads must be in (0, 1), got {list(loads)}")
    prof, params = _params(profile, mix, workload, prices)
    tokens = fluid.token_moments(params.traffic)
    cap = float(fluid.replica_capacity_rps(params, 0.0, tokens))
    out_mean = float(tokens["output_mean"])
    one = jnp.float32(1.0)
    rows = []
    metrics = jax.jit(jax.vmap(lambda r: _steady_metrics(params, one, r)))(jnp.asarray([x * cap for x in loads], jnp.float32))
    for i, load in enumerate(loads):
        g = lambda k: float(metrics[k][i])  # noqa: E731
        rows.append({
            "load": load, "rate_rps": load * cap, "decode_tokens_per_s": load * cap * out_mean,
            "ttft_mean_s": g("ttft_mean_s"), "ttft_p95_s": g("ttft_p95_s"), "tpot_mean_s": g("tpot_s"),
            "tpot_p95_s": g("tpot_p95_s"), "slo_attainment": g("slo_attainment"),
        })
    # The highest rate one replica serves at the target attainment (a fine grid of loads).
    grid = np.linspace(0.01, 0.99, 99)
    att = np.asarray(jax.jit(jax.vmap(lambda r: _steady_metrics(params, one, r)["slo_attainment"]))(jnp.asarray(grid * cap, jnp.float32)))
    ok = att >= target_attainment
    rate_at_slo = float(grid[ok].max() * cap) if ok.any() else 0.0
    out = {
        "profile": prof.name, "model": prof.model, "gpu": prof.gpu, "tensor_parallel": prof.tensor_parallel,
        "token_mix": mix.label, "input_tokens_mean": float(tokens["input_mean"]), "output_tokens_mean": out_mean,
        "workload": workload, "slo_ttft_s": float(params.slo_ttft_s), "slo_tpot_s": float(params.slo_tpot_s),
        "ttft_prefill_slack": float(params.ttft_prefill_slack),
        "max_rate_rps_per_replica": cap, "max_decode_tokens_per_s_per_replica": cap * out_mean,
        "rate_at_target_attainment_rps_per_replica": rate_at_slo, "target_attainment": target_attainment,
        "replica_usd_per_h": float(params.replica_price_usd_per_h), "prices": prices, "loads": rows,
    }
    if target_rps is not None:
        if not target_rps > 0:
            raise CapacityError(f"--target-rps must be > 0, got {target_rps}")
        out["target_rps"] = target_rps
        out["replicas_needed"] = replicas_needed(params, target_rps, target_attainment, cap)
    return out


def replicas_needed(params, target_rps: float, target_attainment: float, cap: float) -> int | None:
    """Fewest replicas that serve `target_rps` with attainment >= the target (None: not
    reachable within 4096 replicas, e.g. an SLO the profile cannot meet at any load)."""
    lo = max(int(math.ceil(target_rps / cap)), 1)
    for start in range(lo, 4097, 256):
        r = jnp.arange(start, min(start + 256, 4097), dtype=jnp.float32)
        att = np.asarray(jax.jit(jax.vmap(lambda n: _steady_metrics(params, n, jnp.float32(target_rps))["slo_attainment"]))(r))
        hit = np.nonzero(att >= target_attainment)[0]
        if hit.size:
            return int(r[hit[0]])
    return None


def render(rep: dict) -> str:
    lines = [
        f"{rep['profile']} ({rep['model']} on {rep['tensor_parallel']}x {rep['gpu']}), {rep['token_mix']} "
        f"(mean {rep['input_tokens_mean']:.0f} in / {rep['output_tokens_mean']:.0f} out), {rep['workload']} SLOs "
        f"TTFT {rep['slo_ttft_s']:g} s (or {rep['ttft_prefill_slack']:g}x the idle prefill), TPOT {rep['slo_tpot_s']:g} s",
        f"per replica: max {rep['max_rate_rps_per_replica']:.3g} req/s, {rep['max_decode_tokens_per_s_per_replica']:.4g} output tok/s; "
        f"{rep['rate_at_target_attainment_rps_per_replica']:.3g} req/s at >= {100 * rep['target_attainment']:.0f}% attainment; "
        f"${rep['replica_usd_per_h']:.2f}/h ({rep['prices']})",
        "",
        "| load | req/s | output tok/s | TTFT mean s | TTFT p95 s | TPOT mean s | TPOT p95 s | SLO attainment |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["loads"]:
        lines.append(
            f"| {r['load']:.2f} | {r['rate_rps']:.3g} | {r['decode_tokens_per_s']:.4g} | {r['ttft_mean_s']:.3g} | {r['ttft_p95_s']:.3g} | "
            f"{r['tpot_mean_s']:.3g} | {r['tpot_p95_s']:.3g} | {100 * r['slo_attainment']:.1f}% |"
        )
    if "target_rps" in rep:
        n = rep["replicas_needed"]
        lines.append("")
        lines.append(
            f"replicas for {rep['target_rps']:g} req/s at >= {100 * rep['target_attainment']:.0f}% attainment: "
            + (f"{n}" if n is not None else "not reachable (the SLO is not met at any load)")
        )
    return "\n".join(lines)


def to_json(rep: dict) -> str:
    return json.dumps(rep, indent=2)
