"""Agreement of the fluid serving model (aro_jax.envs.serving.fluid_tick) with the
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

from aro_jax.envs import serving  # noqa: E402
from aro_jax.envs.scenarios import NodeSpec, node_params  # noqa: E402
from reference_sim import EngineSpec, sample_requests, simulate, summarise  # noqa: E402

CASES = (("llama2-70b-a100-tp4", "conversation"), ("llama2-7b-h100-tp1", "code"))
LOADS = (0.3, 0.7, 0.9, 1.2, 2.0)
METRICS = ("throughput_rps", "ttft_mean_s", "e2e_mean_s", "e2e_p95_s", "drop_fraction", "unserved_fraction", "queue_requests")
# Requests keep arriving this long after the window, so the window's last arrivals are
# served under the same load.
TAIL_S = 300.0


def case_params(profile: str, mix: str):
    return node_params(NodeSpec(profile=profile, traffic_mix=mix))


def capacity_rps(params, replicas: int) -> float:
    return float(serving.replica_capacity_rps(params)) * replicas


def run_reference(params, replicas: int, rate_rps: float, seeds, warmup_s: float, window_s: float) -> dict:
    """Seed-averaged reference metrics over [warmup_s, warmup_s + window_s)."""
    spec = EngineSpec.from_curve(params.model)
    runs = []
    for seed in seeds:
        req = sample_requests(np.random.default_rng(seed), rate_rps, warmup_s + window_s + TAIL_S, params.traffic)
        simulate(spec, replicas, req, float(params.queue_timeout_s))
        m = summarise(req, warmup_s, warmup_s + window_s)
        arrived = np.count_nonzero((req.arrival_s >= warmup_s) & (req.arrival_s < warmup_s + window_s))
        m["unserved_fraction"] = 1.0 - m["throughput_rps"] * window_s / max(arrived, 1)
        runs.append(m)
    return {k: float(np.mean([r[k] for r in runs])) for k in METRICS}


def run_fluid(params, replicas: int, rate_rps: float, warmup_s: float, window_s: float) -> dict:
    """fluid_tick iterated from an empty queue at a constant rate; window metrics."""
    tick = float(params.tick_s)
    n_warm, n_win = round(warmup_s / tick), round(window_s / tick)
    idle_cores, busy_cores = serving._cpu_cores_per_replica(params)
    cores = 2.0 * replicas * (idle_cores + busy_cores)
    memory_gb = 2.0 * replicas * (serving._host_memory_per_replica_gb(params) + params.weights_gb)
    r = jnp.float32(replicas)

    def step(queue, _):
        m, queue = serving.fluid_tick(params, jnp.float32(rate_rps * tick), queue, r, cores, memory_gb, r, 0.0, 0.0)
        return queue, m

    _, m = jax.lax.scan(step, jnp.float32(0.0), None, length=n_warm + n_win)
    m = {k: np.asarray(v)[n_warm:] for k, v in m.items()}
    served = m["served"]
    weighted = lambda x: float(np.sum(x * served) / max(np.sum(served), 1e-9))  # noqa: E731
    return {
        "throughput_rps": float(m["throughput_rps"].mean()),
        "ttft_mean_s": weighted(m["ttft_mean_s"]),
        "e2e_mean_s": weighted(m["e2e_mean_s"]),
        "e2e_p95_s": weighted(m["e2e_p95_s"]),
        "drop_fraction": float(m["dropped"].sum() / m["arrivals"].sum()),
        "unserved_fraction": float(1.0 - served.sum() / m["arrivals"].sum()),
        "queue_requests": float(m["queue_requests"][-1]),
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
    if metric == "queue_requests":
        return f"{fluid - ref:+.0f}"
    return f"{100.0 * (fluid / ref - 1.0):+.1f}%" if ref > 0 else "n/a"


def table(rows: list[dict]) -> str:
    head = "| load | model | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    fmt = lambda k, v: f"{v:.0f}" if k == "queue_requests" else (f"{v:.3f}" if k.endswith("fraction") else f"{v:.3g}")  # noqa: E731
    for row in rows:
        ref, fl = row["ref"], row["fluid"]
        lines.append(f"| {row['load']:.1f} | reference | " + " | ".join(fmt(k, ref[k]) for k in METRICS) + " |")
        lines.append(f"| | fluid | " + " | ".join(fmt(k, fl[k]) for k in METRICS) + " |")
        lines.append("| | error | " + " | ".join(_error(k, ref[k], fl[k]) for k in METRICS) + " |")
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
    wall = time.perf_counter() - t0
    cmd = "python benchmarks/fluid_agreement.py" + (
        "" if (args.seeds, args.warmup_s, args.window_s, args.replicas) == (3, 600.0, 1800.0, 2)
        else f" --seeds {args.seeds} --warmup-s {args.warmup_s:g} --window-s {args.window_s:g} --replicas {args.replicas}"
    )
    md = f"""# Fluid model vs request-level reference

Generated by `{cmd}` on a 2-core CPU ({wall:.0f} s wall).

Reference: `benchmarks/reference_sim.py` (event-driven, iteration-level continuous
batching, full KV reservation at admission, prefill-priority, least-outstanding-requests
dispatch, FCFS queue per engine with a {60:g} s timeout), Poisson arrivals, {args.seeds} seeds
averaged. Fluid: `fluid_tick` over 30 s ticks at the same constant rate, CPU and host
memory to spare. Load = arrival rate / fluid capacity (`replica_capacity_rps` x replicas).
Window: {args.window_s:g} s after a {args.warmup_s:g} s warm-up. Throughput counts completions in the
window; latencies and drops are those of the requests arriving in it (fluid: served-
weighted tick means); unserved = 1 - throughput / arrival rate (drops + queue growth);
queue = requests waiting at the end of the window. Error: relative for rates and times,
absolute for fractions and the queue.

{chr(10).join(sections)}"""
    args.out.write_text(md)
    print(f"wrote {args.out} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
