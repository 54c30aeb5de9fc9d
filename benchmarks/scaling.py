"""Scaling: env steps/s against the number of simulated clusters (1 to 65,536), and
federated training steps/s against the devices the node axis is sharded over (1, 2, 4, 8
fake XLA CPU devices), each with its compile time and peak RSS. Every point is a fresh
subprocess (its own XLA flags and peak memory). Plots: scaling.png.

usage: python benchmarks/scaling.py [--clusters 1 16 256 4096 65536] [--devices 1 2 4 8]
           [--rounds 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import bench_common  # noqa: E402  (benchmarks/ is the script directory)
import env_throughput  # noqa: E402

HERE = Path(__file__).parent
BASE_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def federated_worker(devices: int, rounds: int, repeats: int) -> dict:
    """Median steps/s of `rounds` compiled federated rounds of the default config, cut to
    its first 8 regions so that 1, 2, 4 and 8 devices all divide the node axis."""
    import jax

    from aro_jax.training import trainers
    from aro_jax.config import load_config
    from aro_jax.envs.scenarios import cluster_params

    cfg = load_config(None)
    cfg.cluster.nodes = cfg.cluster.nodes[:8]
    cfg.federated.devices = devices
    cfg.federated.num_byzantine = 2  # multi-Krum needs n >= 2f + 3
    init, chunk, _ = trainers.make_federated(cfg, cluster_params(cfg, "train"))
    hp = trainers.hyperparams(cfg)
    state = jax.jit(init)(jax.random.PRNGKey(0), hp)
    fn = jax.jit(chunk, static_argnums=2)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(state, hp, rounds))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(state, hp, rounds))
        times.append(time.perf_counter() - t0)
    steps = rounds * cfg.federated.local_updates * cfg.ppo.rollout_steps * cfg.env.num_clusters * len(cfg.cluster.nodes)
    med = statistics.median(times)
    return {"devices": devices, "steps_per_s": steps / med, "compile_s": first - med,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clusters", type=int, nargs="+", default=[1, 16, 256, 4096, 65536])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print("RESULT " + json.dumps(federated_worker(args.worker, args.rounds, args.repeats)), flush=True)
        return

    env_rows = []
    for batch in args.clusters:
        r = env_throughput.run_worker("single", batch, env_throughput.default_steps(batch), args.repeats, BASE_FLAGS, 900)
        node = r["node"]
        env_rows.append({"clusters": batch, "steps_per_s": node["steps_per_s"], "compile_s": node["compile_s"], "rss_mb": r["rss_mb"]})
    fed_rows = []
    for d in args.devices:
        flags = f"--xla_force_host_platform_device_count={d} {BASE_FLAGS}"
        fed_rows.append(bench_common.run_worker(__file__, [str(d), "--rounds", str(args.rounds), "--repeats", str(args.repeats)],
                                                f"federated devices={d}", flags, 1800))
    (HERE / "scaling.json").write_text(json.dumps({"env": env_rows, "federated": fed_rows}, indent=1))
    render(env_rows, fed_rows, args)


def render(env_rows, fed_rows, args) -> None:
    import jax

    fmt = bench_common.fmt_rate
    lines = [
        "# Scaling", "",
        f"Command: `python benchmarks/scaling.py --clusters {' '.join(map(str, args.clusters))} --devices "
        f"{' '.join(map(str, args.devices))} --rounds {args.rounds} --repeats {args.repeats}`; machine: {os.cpu_count()}-core "
        f"{platform.machine()} CPU, jax {jax.__version__}. Each point is a fresh process; rates are medians of "
        f"{args.repeats} steady-state calls; compile = first call - median call; RSS = the process's peak.", "",
        "## Env steps/s against simulated clusters (one XLA CPU device)", "",
        "`jit(scan(vmap(env.step)))` with random actions, the env's auto-reset included (benchmarks/env_throughput.py's harness).", "",
        "| clusters | env steps/s | compile (s) | peak RSS (MB) |", "|---|---|---|---|",
        *[f"| {r['clusters']:,} | {fmt(r['steps_per_s'])} | {r['compile_s']:.1f} | {r['rss_mb']:,.0f} |" for r in env_rows], "",
        "## Federated training steps/s against node-axis devices", "",
        f"Default config cut to its first 8 regions (x 16 clusters, 4 local PPO updates per round, multi-Krum with "
        f"f = 2, the most n = 8 allows); {args.rounds} rounds per call; the node axis is sharded over N fake CPU devices "
        "(`--xla_force_host_platform_device_count=N`, `federated.devices=N`). This host has 2 cores, so beyond 2 devices the "
        "devices share cores: the column shows what sharding costs, not what more chips would give.", "",
        "| devices | env steps/s (training) | vs 1 device | compile (s) | peak RSS (MB) |", "|---|---|---|---|---|",
        *[f"| {r['devices']} | {fmt(r['steps_per_s'])} | {r['steps_per_s'] / fed_rows[0]['steps_per_s']:.2f}x | "
          f"{r['compile_s']:.1f} | {r['rss_mb']:,.0f} |" for r in fed_rows], "",
    ]
    (HERE / "scaling.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].loglog([r["clusters"] for r in env_rows], [r["steps_per_s"] for r in env_rows], marker="o")
    axes[0].set_xlabel("simulated clusters (vmapped)")
    axes[0].set_ylabel("env steps/s")
    axes[0].set_title("simulator, one CPU device")
    axes[1].plot([r["devices"] for r in fed_rows], [r["steps_per_s"] for r in fed_rows], marker="o")
    axes[1].set_xlabel("devices on the node axis (fake CPU devices, 2 cores)")
    axes[1].set_ylabel("training env steps/s")
    axes[1].set_title("federated PPO, 10 regions")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "scaling.png", dpi=110)
    plt.close(fig)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
