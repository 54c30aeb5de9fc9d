"""How federated PPO in the cluster env spreads over devices, now that regions interact
every tick: one device; 2 devices each stepping whole clusters (the regions of a cluster
together, the learners' gradients reduced across devices); 2 devices each holding half
the regions (the routing exchanged between devices every tick). The ten-region default
config at a small batch; rounds per second as medians over interleaved repeats, and the
largest parameter difference from the one-device run.

Runs in a fresh process with 2 fake CPU devices (XLA_FLAGS). Writes cluster_sharding.json
and the markdown rendered from it (`--render-only` redraws it).

usage: python benchmarks/cluster_sharding.py [--rounds 2] [--repeats 5] [--clusters 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import run_report, run_worker  # noqa: E402

XLA_FLAGS = "--xla_force_host_platform_device_count=2 --xla_cpu_enable_concurrency_optimized_scheduler=false"
VARIANTS = {"1 device": (1, "clusters"), "2 devices, clusters split": (2, "clusters"), "2 devices, regions split": (2, "regions")}


def worker(args):
    import jax
    import numpy as np
    from jax.flatten_util import ravel_pytree

    from aro_jax.config import load_config
    from aro_jax.envs.scenarios import cluster_params
    from aro_jax.federated import fedppo
    from aro_jax.training import trainers

    assert len(jax.devices()) == 2, jax.devices()
    runs, params_of = {}, {}
    for name, (devices, split) in VARIANTS.items():
        cfg = load_config(None, [f"env.num_clusters={args.clusters}", f"federated.devices={devices}"])
        node_params = cluster_params(cfg, "train")
        learner = trainers.make_learner(cfg, jax.tree.map(lambda x: x[:1], node_params))
        init, chunk, _ = fedppo.make_federated_train(learner, node_params, cfg.federated, coupled=trainers.region_grid(cfg, node_params),
                                                     coupled_split=split)
        hp = trainers.hyperparams(cfg)
        state = jax.jit(init)(jax.random.PRNGKey(0), hp)
        fn = jax.jit(chunk, static_argnums=2)
        end, _ = jax.block_until_ready(fn(state, hp, args.rounds))  # compile
        params_of[name] = np.asarray(ravel_pytree(end.nodes.params)[0])
        runs[name] = (lambda fn=fn, state=state, hp=hp: jax.block_until_ready(fn(state, hp, args.rounds)))
        steps_per_round = cfg.ppo.rollout_steps * cfg.env.num_clusters * len(cfg.cluster.nodes) * cfg.federated.local_updates
    times = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved: load changes hit every variant alike
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    base = params_of["1 device"]
    rows = {name: {"rounds_per_s": args.rounds / statistics.median(t), "env_steps_per_s": args.rounds * steps_per_round / statistics.median(t),
                   "max_param_diff": float(np.abs(params_of[name] - base).max())} for name, t in times.items()}
    print("RESULT " + json.dumps({"rows": rows, "rounds": args.rounds, "repeats": args.repeats, "clusters": args.clusters}))


def render(d: dict) -> str:
    rows = d["rows"]
    one = rows["1 device"]["rounds_per_s"]
    best = max((n for n in rows if n != "1 device"), key=lambda n: rows[n]["rounds_per_s"])
    lines = [
        "# Federated PPO in the cluster env over devices", "",
        f"`{d['command']}` on {d['machine']}, {d['wall_s']:.0f} s. The ten-region default config (multi-Krum, K = 4 local updates) "
        f"with {d['clusters']} clusters per region, {d['rounds']} rounds per timed call, medians of {d['repeats']} interleaved repeats; "
        "2 fake CPU devices share the machine's cores, so the ratio shows the communication pattern's cost, not a speed-up "
        "from more hardware.", "",
        "| layout | rounds/s | env steps/s | vs 1 device | max parameter difference from 1 device |", "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['rounds_per_s']:.3f} | {r['env_steps_per_s']:,.0f} | {r['rounds_per_s'] / one:.2f}x | {r['max_param_diff']:.2g} |")
    speedup = rows[best]["rounds_per_s"] / one
    lines += ["", f"Faster of the two splits: **{best}** ({speedup:.2f}x one device"
              + ("; neither split beats one device here, where both fake devices share the same two cores" if speedup < 1 else "") + "). "
              "The trainer splits clusters (`federated.devices` must divide `env.num_clusters` in the cluster env): every tick's "
              "routing stays inside a device and only the learners' gradients and minibatches cross devices, against one exchange "
              "per simulated tick when the regions are split. The parameters differ from one device's by float rounding that the "
              "sampled actions amplify over the rounds (one update: below 1e-4, `tests/test_cluster_training.py`).", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clusters", type=int, default=16)
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    out = Path(__file__).with_name("cluster_sharding.json")
    flags = ["--rounds", str(args.rounds), "--repeats", str(args.repeats), "--clusters", str(args.clusters)]
    run_report(out, render, lambda: run_worker(__file__, flags, "2 fake devices", os.environ.get("XLA_FLAGS", XLA_FLAGS), 3600),
               args.render_only)


if __name__ == "__main__":
    main()
