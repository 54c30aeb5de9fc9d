"""Agreement of the fluid serving model (aro_jax.envs.fluid.fluid_tick) with the
request-level reference simulator (benchmarks/reference_sim.py).

Same node profile, token mix and replica count; arrivals at fixed multiples of the fluid
model's capacity (`replica_capacity_rps * replicas`). The reference gets Poisson arrivals
(several seeds); the fluid model gets the same constant rate per 30 s tick, with CPU
cores and host memory to spare so only the GPUs limit. Both are measured over the same
window after a warm-up. Writes benchmarks/fluid_agreement.md and prints it.

    python benchmarks/fluid_agreement.py [--seeds 3] [--window-s 1800] [--warmup-s 600]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))

from aro_jax.envs import fluid  # noqa: E402
from aro_jax.envs.scenarios import NodeSpec, node_params  # noqa: E402
from reference_sim import EngineSpec, sample_requests, simulate, summarise  # noqa: E402

CASES = (("llama2-70b-a100-tp4", "conversation"), ("llama2-7b-h100-tp1", "code"))
LOADS = (0.3, 0.7, 0.9, 1.2, 2.0)
METRICS = (
    "throughput_rps", "ttft_mean_s", "tpot_mean_s", "e2e_mean_s", "e2e_p95_s", "slo_attainment_fraction",
    "drop_fraction", "unserved_fraction", "queue_requests", "queue_to_serve_requests",
)
HEADERS = (
    "throughput req/s", "TTFT mean s", "TPOT mean s", "e2e mean s", "e2e p95 s", "SLO attainment", "dropped",
    "unserved", "queue", "queue to serve",
)
# Requests keep arriving this long after the window, so the window's last arrivals are
# served under the same load.
TAIL_S = 300.0


def case_params(profile: str, mix: str):
    return node_params(NodeSpec(profile=profile, traffic_mix=mix))


def capacity_rps(params, replicas: int) -> float:
    return float(fluid.replica_capacity_rps(params)) * replicas


def run_reference(
    params, replicas: int, rate_rps: float, seeds, warmup_s: float, window_s: float,
    dispatch: str = "least_outstanding",
) -> dict:
    """Seed-averaged reference metrics over [warmup_s, warmup_s + window_s)."""
    spec = EngineSpec.from_curve(params.model)
    slo = (spec, float(params.slo_ttft_s), float(params.slo_tpot_s), float(params.ttft_prefill_slack))
    runs = []
    for seed in seeds:
        req = sample_requests(np.random.default_rng(seed), rate_rps, warmup_s + window_s + TAIL_S, params.traffic)
        simulate(spec, replicas, req, float(params.queue_timeout_s), dispatch, seed)
        m = summarise(req, warmup_s, warmup_s + window_s, slo)
        m["slo_attainment_fraction"] = m.pop("slo_attainment")
        arrived = np.count_nonzero((req.arrival_s >= warmup_s) & (req.arrival_s < warmup_s + window_s))
        m["unserved_fraction"] = 1.0 - m["throughput_rps"] * window_s / max(arrived, 1)
        runs.append(m)
    return {k: float(np.mean([r[k] for r in runs])) for k in METRICS}


def run_fluid(params, replicas: int, rate_rps: float, warmup_s: float, window_s: float) -> dict:
    """fluid_tick iterated from an empty queue at a constant rate; window metrics."""
    tick = float(params.tick_s)
    n_warm, n_win = round(warmup_s / tick), round(window_s / tick)
    idle_cores, busy_cores = fluid.cpu_cores_per_replica(params)
    cores = 2.0 * replicas * (idle_cores + busy_cores)
    memory_gb = 2.0 * replicas * (fluid.host_memory_per_replica_gb(params) + params.weights_gb)
    r = jnp.float32(replicas)

    def step(queue, _):
        m, queue = fluid.fluid_tick(params, jnp.float32(rate_rps * tick), queue, r, cores, memory_gb, r, 0.0, 0.0)
        return queue, m

    _, m = jax.lax.scan(step, jnp.float32(0.0), None, length=n_warm + n_win)
    m = {k: np.asarray(v)[n_warm:] for k, v in m.items()}
    served = m["served"]
    weighted = lambda x: float(np.sum(x * served) / max(np.sum(served), 1e-9))  # noqa: E731
    return {
        "throughput_rps": float(m["throughput_rps"].mean()),
        "ttft_mean_s": weighted(m["ttft_mean_s"]),
        "tpot_mean_s": weighted(m["tpot_s"]),
        "e2e_mean_s": weighted(m["e2e_mean_s"]),
        "e2e_p95_s": weighted(m["e2e_p95_s"]),
        "slo_attainment_fraction": float(np.sum(m["slo_attainment"] * m["arrivals"]) / np.sum(m["arrivals"])),
        "drop_fraction": float(m["dropped"].sum() / m["arrivals"].sum()),
        "unserved_fraction": float(1.0 - served.sum() / m["arrivals"].sum()),
        "queue_requests": float(m["queue_requests"][-1]),
        "queue_to_serve_requests": float(m["queue_requests"][-1]),
    }


def agreement(profile: str, mix: str, replicas: int, loads, seeds, warmup_s: float, window_s: float) -> list[dict]:
    """One row per load: {'load', 'rate_rps', 'ref': {...}, 'fluid': {...}}."""
    params = case_params(profile, mix)
    cap = capacity_rps(params, replicas)
    rows = []
    for load in loads:
        rate = load * cap
        rows.append({
            "load": load,
            "rate_rps": rate,
            "ref": run_reference(params, replicas, rate, seeds, warmup_s, window_s),
            "fluid": run_fluid(params, replicas, rate, warmup_s, window_s),
        })
    return rows


def _error(metric: str, ref: float, fluid: float) -> str:
    """Relative error for rates and times; absolute difference for fractions."""
    if metric.endswith("fraction"):
        return f"{fluid - ref:+.3f}"
    if metric.startswith("queue"):
        return f"{fluid - ref:+.0f}"
    return f"{100.0 * (fluid / ref - 1.0):+.1f}%" if ref > 0 else "n/a"


def table(rows: list[dict]) -> str:
    head = "| load | model | " + " | ".join(HEADERS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    fmt = lambda k, v: f"{v:.0f}" if k.startswith("queue") else (f"{v:.3f}" if k.endswith("fraction") else f"{v:.3g}")  # noqa: E731
    for row in rows:
        ref, fl = row["ref"], row["fluid"]
        lines.append(f"| {row['load']:.1f} | reference | " + " | ".join(fmt(k, ref[k]) for k in METRICS) + " |")
        lines.append("| | fluid | " + " | ".join(fmt(k, fl[k]) for k in METRICS) + " |")
        lines.append("| | error | " + " | ".join(_error(k, ref[k], fl[k]) for k in METRICS) + " |")
    return "\n".join(lines)


def dispatch_table(replicas: int, seeds, warmup_s: float, window_s: float, load: float = 0.7) -> str:
    """Reference latency under each dispatch policy next to the fluid model's, at `load`."""
    from reference_sim import DISPATCH

    lines = ["| profile | model | TTFT mean s | e2e mean s |", "|---|---|---|---|"]
    for profile, mix in CASES:
        params = case_params(profile, mix)
        rate = load * capacity_rps(params, replicas)
        for dispatch in DISPATCH:
            m = run_reference(params, replicas, rate, seeds, warmup_s, window_s, dispatch)
            lines.append(f"| {profile} | reference, {dispatch} | {m['ttft_mean_s']:.3g} | {m['e2e_mean_s']:.3g} |")
        m = run_fluid(params, replicas, rate, warmup_s, window_s)
        lines.append(f"| {profile} | fluid (arrival CV^2 1/{replicas}) | {m['ttft_mean_s']:.3g} | {m['e2e_mean_s']:.3g} |")
        # The per-instance formulas with Poisson arrivals, as random dispatch gives.
        tokens = fluid.token_moments(params.traffic)
        lat = fluid._latency_at_utilisation(params.model, load, tokens, params.traffic, 1.0)
        ttft = float(lat["ttft_mean_s"])
        e2e = ttft + (float(tokens["output_mean"]) - 1.0) * float(lat["tpot_s"])
        lines.append(f"| {profile} | fluid formulas, Poisson arrivals | {ttft:.3g} | {e2e:.3g} |")
    return "\n".join(lines)


def shedding_table(replicas: int, seeds, warmup_s: float, window_s: float, overloads=(1.2, 1.5, 2.0, 3.0)) -> str:
    """Reference throughput above capacity, and the mean prompt of the requests it serves."""
    lines = ["| profile | load | reference throughput / fluid capacity | mean prompt tokens served / offered |", "|---|---|---|---|"]
    for profile, mix in CASES:
        params = case_params(profile, mix)
        spec = EngineSpec.from_curve(params.model)
        cap = capacity_rps(params, replicas)
        for load in overloads:
            gain, prompt = [], []
            for seed in seeds:
                req = sample_requests(np.random.default_rng(seed), load * cap, warmup_s + window_s, params.traffic)
                simulate(spec, replicas, req, float(params.queue_timeout_s))
                done = (req.finish_s >= warmup_s) & (req.finish_s < warmup_s + window_s)
                gain.append(done.sum() / window_s / cap)
                prompt.append(req.input_tokens[done].mean() / req.input_tokens.mean())
            lines.append(f"| {profile} | {load:.1f} | {np.mean(gain):.3f} | {np.mean(prompt):.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--warmup-s", type=float, default=600.0)
    ap.add_argument("--window-s", type=float, default=1800.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "fluid_agreement.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    sections = []
    for profile, mix in CASES:
        rows = agreement(profile, mix, args.replicas, LOADS, range(args.seeds), args.warmup_s, args.window_s)
        cap = capacity_rps(case_params(profile, mix), args.replicas)
        sections.append(f"## {profile}, {mix} mix, {args.replicas} replicas (fluid capacity {cap:.3g} req/s)\n\n{table(rows)}\n")
        print(sections[-1], flush=True)
    dispatch = dispatch_table(args.replicas, range(args.seeds), args.warmup_s, args.window_s)
    print(dispatch, flush=True)
    shedding = shedding_table(args.replicas, range(args.seeds), args.warmup_s, args.window_s)
    print(shedding, flush=True)
    wall = time.perf_counter() - t0
    cmd = "python benchmarks/fluid_agreement.py" + (
        "" if (args.seeds, args.warmup_s, args.window_s, args.replicas) == (3, 600.0, 1800.0, 2)
        else f" --seeds {args.seeds} --warmup-s {args.warmup_s:g} --window-s {args.window_s:g} --replicas {args.replicas}"
    )
    md = f"""# Fluid model vs request-level reference

Generated by `{cmd}` on a 2-core CPU ({wall:.0f} s wall).

Reference: `benchmarks/reference_sim.py`: event-driven, iteration-level continuous
batching per engine (vLLM-like, no chunked prefill): FCFS admission while batch slots and
KV for prompt + output allow, one prefill iteration for everything admitted, else one
decode iteration; least-outstanding-requests dispatch; requests waiting longer than the
{60:g} s timeout are dropped. Poisson arrivals, log-normal token lengths, {args.seeds} seeds averaged.
Fluid: `fluid_tick` over 30 s ticks at the same constant rate, CPU and host memory to
spare. Both use the same `ServiceCurve`. Load = arrival rate / fluid capacity
(`replica_capacity_rps` x replicas). Window: {args.window_s:g} s after a {args.warmup_s:g} s warm-up.
Throughput counts completions in the window; latencies and drops are those of the
requests arriving in it (fluid: served-weighted tick means); unserved = 1 - throughput /
arrival rate (drops + queue growth). Queue: requests waiting at the end of the window;
queue to serve: those of them that will be served (the fluid model drops at once what
cannot start within the timeout, so its queue is the second kind). Error: relative for
rates and times, absolute for fractions and queues.

{chr(10).join(sections)}
## Dispatch policy (load 0.7, {args.replicas} replicas)

The fluid model gives each instance's arrivals a squared CV of 1/N over N instances
(round-robin's Erlang-N gaps); least-outstanding dispatch is smoother still. Random
dispatch gives each engine Poisson arrivals, which the same formulas with CV 1 follow.

{dispatch}

## Above capacity: shedding of long prompts

{shedding}

## Notes

What the fluid model does to follow the reference's mechanics (aro_jax/envs/fluid.py,
`_instance_model`, `_latency_at_utilisation`, latency lines of `fluid_tick`):
- Prefill time is averaged over the prompt distribution (E[c L^2], clipped log-normal
  moments), not taken at the mean prompt; this alone moved capacity by 4% (70B
  conversation) and 12% (7B code).
- The prefill emits the first token: n - 1 decode iterations; the context summed over
  them is (n-1) L + n(n-1)/2; the KV footprint of the batch is that of full reservation
  (prompt + output) weighted by time in the batch.
- TTFT: all waiting requests are prefilled in one iteration at the next boundary, so the
  wait is a non-preemptive priority M/G/1 (decode iterations the low class) plus the
  batch-mates that join the same prefill iteration.
- Time per output token: a sequence sees a batch of itself plus the average others, and
  waits for the prefills of requests that arrived during its own prefill iteration.
- A standing backlog replaces the stationary queueing wait instead of adding to it.
- Dispatch over N instances smooths each one's arrivals (squared CV 1/N), which scales
  the terms that count arrivals right after a request's own (table above).

Where they still differ:
- Above capacity with a KV-bound batch (7B code): when the head of a queue does not fit
  in the free KV it waits, and at the timeout edge it is dropped; requests that fit are
  admitted. The engine sheds long prompts, so it serves more (shorter) requests per second
  than the fluid capacity, more so the larger the overload (table above). With a
  slot-bound batch (70B conversation: 256 sequences fill before the KV) any request fits
  a freed slot and there is no such gain. The fluid capacity is the FCFS capacity of the
  offered mix; its drop fraction is higher than the reference's by the shed share.
- Near saturation (0.9) the 7B code engine's decode batch fluctuates more than the
  Poisson batch the fluid model assumes, so its mean e2e is 10-20% low there.
- Queue length above capacity: the fluid model drops at once the requests that cannot
  start within the timeout, so its queue is about capacity x timeout; the engines hold
  every request until its timeout passes, about arrival rate x timeout. The requests
  that will be served agree ("queue to serve"); the drops come up to one timeout later.
"""
    args.out.write_text(md)
    print(f"wrote {args.out} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
