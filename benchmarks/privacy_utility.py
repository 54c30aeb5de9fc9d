"""Privacy/utility: robust federated PPO (the default config's multi-Krum) with per-node
clipping and Gaussian noise at several noise levels, each node's (epsilon, delta) from the
accountant, and the learned policy's evaluation reward and KPIs.

Privacy unit: one node's update per round (node-level DP); noise is added to each node's
clipped delta before the robust aggregator, so the guarantee holds whatever the
aggregator does (post-processing); every node takes part in every round (sampling 1).

Writes privacy_utility.json and the markdown rendered from it (`--render-only` redraws it).

usage: python benchmarks/privacy_utility.py [--steps 10000000] [--clip 0.1] [--noise 0 0.3 1 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import machine, write_report  # noqa: E402

from aro_jax.training import evaluation, learned_policy, trainers  # noqa: E402
from aro_jax.config import load_config  # noqa: E402
from aro_jax.envs.heuristics import reactive_policy  # noqa: E402
from aro_jax.envs.scenarios import cluster_params  # noqa: E402
from aro_jax.envs.serving import ServingNodeEnv  # noqa: E402
from aro_jax.federated import fedppo  # noqa: E402

EVAL_SEEDS, EVAL_TICKS = 4, 2880


def run(steps: int, clip: float, noise: float, delta: float):
    overrides = [f"train.total_env_steps={steps}", "train.num_chunks=1"]
    if noise > 0 or clip > 0:
        overrides += [f"federated.dp_clip_norm={clip}", f"federated.dp_noise_multiplier={noise}", f"federated.dp_delta={delta}"]
    cfg = load_config(None, overrides)
    trainer = trainers.make_trainer(cfg)
    hp = trainers.hyperparams(cfg)
    t0 = time.perf_counter()
    state = jax.jit(trainer.init)(jax.random.PRNGKey(cfg.train.seed), hp)
    state, metrics = jax.jit(trainer.chunk, static_argnums=2)(state, hp, trainer.units_total)
    jax.block_until_ready(metrics)
    wall = time.perf_counter() - t0
    env = ServingNodeEnv(cfg.env.action_set)
    params = cluster_params(cfg, "diurnal")
    policy = learned_policy.greedy_policy(trainer.network)
    m = evaluation.run_episodes(env, policy, params, jax.random.PRNGKey(123), EVAL_SEEDS, EVAL_TICKS, trainer.weights(state))
    rounds = trainers.num_rounds(cfg)
    # Each round releases a node's update and its observation statistics (fedppo.privacy_spent).
    eps = fedppo.privacy_spent(cfg.federated, rounds) if noise > 0 else float("inf")
    return cfg, rounds, eps, evaluation.cluster_kpis(m, cfg.env.tick_s, params), float(np.mean(metrics["delta_norm"])), wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10_000_000)
    ap.add_argument("--clip", type=float, default=0.1)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.3, 1.0, 3.0])
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--render-only", action="store_true", help="re-render the markdown from privacy_utility.json")
    args = ap.parse_args()
    out = Path(__file__).with_name("privacy_utility.json")
    if args.render_only:
        write_report(out, None, render)
        print(out.with_suffix(".md").read_text())
        return

    rows = []
    for noise in args.noise:
        clip = args.clip if noise > 0 else 0.0
        cfg, rounds, eps, k, dnorm, wall = run(args.steps, clip, noise, args.delta)
        rows.append({"noise_multiplier": noise, "clip_norm": clip, "rounds": rounds, "epsilon": eps, "delta": args.delta,
                     "mean_delta_norm": dnorm, "train_wall_s": wall, **k})
        print(json.dumps(rows[-1]), flush=True)
    cfg = load_config()
    env = ServingNodeEnv(cfg.env.action_set)
    params = cluster_params(cfg, "diurnal")
    m = evaluation.run_episodes(env, reactive_policy(cfg.env.tick_s), params, jax.random.PRNGKey(123), EVAL_SEEDS, EVAL_TICKS)
    reactive = evaluation.cluster_kpis(m, cfg.env.tick_s, params)

    data = {
        "command": f"python benchmarks/privacy_utility.py --steps {args.steps} --clip {args.clip} --noise {' '.join(map(str, args.noise))}",
        "machine": machine(), "eval_seeds": EVAL_SEEDS, "rows": rows, "reactive": reactive,
        "network_params": int(sum(x.size for x in jax.tree.leaves(trainers.make_trainer(cfg).network.init(jax.random.PRNGKey(0), jax.numpy.zeros(20))))),
    }
    write_report(out, data, render)
    print(out.with_suffix(".md").read_text())


def render(data: dict) -> str:
    rows, reactive = data["rows"], data["reactive"]
    lines = [
        "# Privacy / utility of robust federated PPO",
        "",
        f"Command: `{data['command']}`; machine: {data['machine']}; figures from privacy_utility.json.",
        "",
        "Default config (ten regions, multi-Krum f = 3) trained for the given env steps; privacy unit: one node's update "
        "per round, every node in every round (sampling 1), noise std = noise multiplier x clip norm added to each node's "
        "clipped delta and to its clipped observation statistics before the robust aggregation; epsilon from "
        "dp-accounting's RDP accountant over both releases of every round at the given delta. Evaluation: "
        f"greedy policy, diurnal scenario, {data['eval_seeds']} seeds x 10 regions x 1 day (Reactive on the same seeds for reference).",
        "",
        "| noise multiplier | clip norm | rounds | epsilon (delta) | reward | mean e2e (ms) | SLO (%) | $ / 1M tok | quality |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "no DP" if r["noise_multiplier"] == 0 else f"{r['epsilon']:.3g} ({r['delta']:g})"
        clip = "-" if r["clip_norm"] == 0 else f"{r['clip_norm']:g}"
        lines.append(f"| {r['noise_multiplier']:g} | {clip} | {r['rounds']} | {eps} | {r['reward']:.3f} | {r['e2e_mean_ms']:,.0f} | "
                     f"{r['slo_attainment_pct']:.1f} | {r['cost_usd_per_mtok']:.3f} | {r['quality']:.3f} |")
    lines.append(f"| Reactive (reference) | | | | {reactive['reward']:.3f} | {reactive['e2e_mean_ms']:,.0f} | "
                 f"{reactive['slo_attainment_pct']:.1f} | {reactive['cost_usd_per_mtok']:.3f} | {reactive['quality']:.3f} |")
    lines += ["", f"Mean L2 norm of a node's round delta without DP: {rows[0]['mean_delta_norm']:.3g} "
              f"({data['network_params']} parameters)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
