"""Whole-training throughput: PPO (aro_jax make_train) on the serving node env next to
the SAME trainer on gymnax CartPole-v1.

One node (`default_node_params()` with a leading node axis of 1), `num_clusters` envs,
rollout_steps 64, 4 minibatches, 4 epochs, actor and critic MLPs [64, 64]. For each
num_clusters a subprocess builds both learners, jits `train_chunk(state, hp, U)` for a
fixed number U of PPO updates, times the first call (compile + run) and then `--repeats`
rounds of steady-state calls with node and CartPole calls interleaved (load from other
jobs hits both alike). Env steps/s = U * rollout_steps * num_clusters / median call time;
compile s = first call - median call. The same subprocess also times the env stepping
alone (`jit(scan(vmap(env.step)))` with random actions, 64 steps x num_clusters, as in
benchmarks/env_throughput.py) to show how much of an update is env stepping.

    /work/venv/bin/python benchmarks/train_throughput.py          # writes benchmarks/train_throughput.md
    /work/venv/bin/python benchmarks/train_throughput.py --clusters 16 --updates 2 --repeats 2 --out /tmp/t.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import bench_common  # noqa: E402  (benchmarks/ is the script directory)

BASE_XLA_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
ROLLOUT_STEPS = 64
AIM_RATIO = 0.5


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def make_cfg(clusters: int, updates: int):
    from aro_jax.config import load_config

    batch = ROLLOUT_STEPS * clusters
    return load_config(overrides=[
        # One node in the node env, trained alone: the trainer's speed, not federation's
        # (benchmarks/federated_overhead.md measures that).
        "cluster.nodes=[{name: node-0}]",
        "env.kind=node",
        "federated.mode=centralized",
        "federated.aggregator=fedavg",
        "federated.num_byzantine=0",
        # The same PPO for both envs: CartPole has no constraint costs to learn.
        "objective.kind=paper",
        f"env.num_clusters={clusters}",
        f"ppo.rollout_steps={ROLLOUT_STEPS}",
        "ppo.num_minibatches=4",
        "ppo.update_epochs=4",
        "ppo.hidden_sizes=[64, 64]",
        # Enough updates that the learning-rate schedule is not at its end; one chunk.
        f"train.total_env_steps={batch * max(updates, 1) * 100}",
        "train.num_chunks=1",
    ])


def worker(clusters: int, updates: int, repeats: int) -> dict:
    import gymnax
    import jax
    import jax.numpy as jnp

    from aro_jax.algorithms import ppo
    from aro_jax.envs.scenarios import default_node_params, stack_params
    from aro_jax.envs.serving import ServingNodeEnv
    from aro_jax.training import trainers

    sys.path.insert(0, str(Path(__file__).parent))
    from env_throughput import init_states, make_rollout, time_interleaved

    cfg = make_cfg(clusters, updates)
    hp = trainers.hyperparams(cfg)
    cartpole, cartpole_params = gymnax.make("CartPole-v1")
    envs = {
        "node": (ServingNodeEnv(cfg.env.action_set), stack_params([default_node_params()])),
        "cartpole": (cartpole, jax.tree.map(lambda x: jnp.asarray(x)[None], cartpole_params)),
    }
    # CartPole's observation has no node descriptor to pass by the normaliser.
    cartpole_config = dataclasses.replace(trainers.ppo_config(cfg), obs_passthrough=0)
    calls, env_calls = {}, {}
    for name, (env, params) in envs.items():
        # The same generic PPO and settings for both; the node adds the serving hooks.
        learner = (trainers.make_learner(cfg, params) if name == "node"
                   else ppo.make_train(env, params, cartpole_config, stacked=True))
        init, train_chunk = learner.init, learner.train_chunk
        state = jax.block_until_ready(jax.jit(init)(jax.random.PRNGKey(0), hp))
        calls[name] = (jax.jit(train_chunk, static_argnums=2), (state, hp, updates))
        one = jax.tree.map(lambda x: x[0], params)
        env_calls[name] = (jax.jit(make_rollout(env, clusters, ROLLOUT_STEPS)),
                           (jax.random.PRNGKey(1), init_states(env, one, clusters), one))

    def after_first(name, t):
        t["rss_mb_after"] = rss_mb()

    steps_per_call = updates * ROLLOUT_STEPS * clusters
    out = {"clusters": clusters, "updates": updates, "steps_per_call": steps_per_call, "train": {}, "env_only": {}}
    for name, t in time_interleaved(calls, repeats, after_first).items():
        t["steps_per_s"] = steps_per_call / t["median_s"]
        t["s_per_update"] = t["median_s"] / updates
        out["train"][name] = t
    for name, t in time_interleaved(env_calls, repeats).items():
        t["steps_per_s"] = ROLLOUT_STEPS * clusters / t["median_s"]
        t["s_per_update"] = t["median_s"]  # one rollout of 64 steps = one update's env steps
        out["env_only"][name] = t
    # A sanity check that training ran: the last update's mean reward is finite.
    state, metrics = calls["node"][0](*calls["node"][1])
    out["node_last_reward"] = float(metrics["reward"][-1])
    out["rss_mb"] = rss_mb()
    out["jax"] = jax.__version__
    return out


def run_worker(clusters: int, updates: int, repeats: int, xla_flags: str, timeout: float) -> dict:
    args = ["--clusters", str(clusters), "--updates", str(updates), "--repeats", str(repeats)]
    return bench_common.run_worker(__file__, args, f"clusters={clusters}", xla_flags, timeout)


fmt_rate = bench_common.fmt_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--updates", type=int, default=8, help="PPO updates per timed train_chunk call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".md")))
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--render", metavar="JSON", help="re-render the markdown from a saved JSON, no measuring")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = worker(args.clusters[0], args.updates, args.repeats)
        print("RESULT " + json.dumps(res), flush=True)
        return

    out_json = Path(args.out).with_suffix(".json")
    if args.render:
        data = json.loads(Path(args.render).read_text())
    else:
        t_start = time.perf_counter()
        load_start = os.getloadavg()[0]
        flags = " ".join(f for f in [os.environ.get("XLA_FLAGS", ""), BASE_XLA_FLAGS] if f)
        rows = [run_worker(c, args.updates, args.repeats, flags, args.timeout) for c in args.clusters]
        data = {"rows": rows, "flags": flags, "argv": sys.argv[1:], "updates": args.updates, "repeats": args.repeats,
                "total_s": time.perf_counter() - t_start, "load_start": load_start, "load_end": os.getloadavg()[0],
                "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}
        out_json.write_text(json.dumps(data, indent=1))
    Path(args.out).write_text(render(data))
    print(f"wrote {args.out}", file=sys.stderr)


def render(data: dict) -> str:
    import importlib.metadata as md

    rows, flags, total_s = data["rows"], data["flags"], data["total_s"]
    load_start, load_end = data["load_start"], data["load_end"]
    jax_version = rows[0]["jax"]
    machine = f"{data['cpu_count']}-core {data['machine']} CPU, no GPU, jax {jax_version}"
    argv = " ".join(data["argv"])
    cmd = f"/work/venv/bin/python benchmarks/train_throughput.py{(' ' + argv) if argv else ''}"
    L = ["# Training throughput: PPO on the serving node env vs the same PPO on gymnax CartPole-v1\n"]
    L.append(f"- Command: `{cmd}` (from the repository root)")
    L.append(f"- Machine: {machine} (jaxlib {md.version('jaxlib')}, gymnax {md.version('gymnax')}, flax {md.version('flax')}, "
             f"optax {md.version('optax')}, Python {data['python']}); other jobs may share the cores, so absolute "
             "rates are noisy and the ratios (same process, calls interleaved) are the figures to compare.")
    L.append(f"- XLA_FLAGS: `{flags}` (one XLA CPU device)")
    L.append(f"- Trainer: `aro_jax.algorithms.ppo.make_train` (through `training.trainers.make_learner`) on one node in the node env (`default_node_params()` stacked to a node axis "
             f"of 1; CartPole: `gymnax.make('CartPole-v1')` params stacked the same way, `env=CartPoleEnv`, no action "
             f"mask), rollout_steps {ROLLOUT_STEPS}, 4 minibatches, 4 epochs, hidden [64, 64], obs normalisation on "
             f"(config default); node env with action masking (config default); the unconstrained objective (`objective.kind=paper`) for both, as CartPole has no constraint costs (the main job's constrained PPO adds a cost critic per constraint). Timed: `jit(train_chunk)` of "
             f"{data['updates']} PPO updates; median of {data['repeats']} steady-state calls; compile s = first call - median "
             f"call. Each num_clusters in its own subprocess; peak RSS = that process's `ru_maxrss` after the node "
             f"learner's first call. Total wall time {total_s:.0f} s; 1-min load "
             f"average {load_start:.1f} at the start and {load_end:.1f} at the end (2 cores: above ~2 means other jobs "
             "were competing for them).\n")
    L.append("## Whole training (env steps/s, after compile)\n")
    L.append("| num_clusters | env steps per update | node steps/s | CartPole steps/s | ratio node/CartPole | node compile s | CartPole compile s | peak RSS MB (node / both) |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        n, c = r["train"]["node"], r["train"]["cartpole"]
        L.append(f"| {r['clusters']} | {ROLLOUT_STEPS * r['clusters']} | {fmt_rate(n['steps_per_s'])} | {fmt_rate(c['steps_per_s'])} | "
                 f"{n['steps_per_s'] / c['steps_per_s']:.2f} | {n['compile_s']:.1f} | {c['compile_s']:.1f} | "
                 f"{n['rss_mb_after']:.0f} / {r['rss_mb']:.0f} |")
    L.append("")
    L.append("## How much of an update is env stepping\n")
    L.append(f"Env stepping alone (`jit(scan(vmap(env.step)))`, random actions, {ROLLOUT_STEPS} steps x num_clusters: one "
             "update's worth of env steps) next to a whole PPO update, same process, median times. The share is a rough "
             "estimate (inside training the env is fused with the policy forward pass).\n")
    L.append("| num_clusters | node: env-only ms / update ms (share) | CartPole: env-only ms / update ms (share) | node env-only steps/s | CartPole env-only steps/s |")
    L.append("|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = []
        for k in ("node", "cartpole"):
            e, t = r["env_only"][k]["s_per_update"], r["train"][k]["s_per_update"]
            cells.append(f"{e * 1e3:.1f} / {t * 1e3:.1f} ({e / t:.0%})")
        L.append(f"| {r['clusters']} | {cells[0]} | {cells[1]} | {fmt_rate(r['env_only']['node']['steps_per_s'])} | "
                 f"{fmt_rate(r['env_only']['cartpole']['steps_per_s'])} |")
    L.append("")
    L.append("## Aim and interpretation\n")
    ratios = [r["train"]["node"]["steps_per_s"] / r["train"]["cartpole"]["steps_per_s"] for r in rows]
    met = all(x >= AIM_RATIO for x in ratios)
    L.append(f"- Aim: node-env training at >= {AIM_RATIO:g} x the CartPole figure. Ratios: "
             + ", ".join(f"{x:.2f} at {r['clusters']} clusters" for x, r in zip(ratios, rows))
             + f" -> **{'met' if met else 'not met'}**"
             + ("" if met else f" (met at: {', '.join(str(r['clusters']) for x, r in zip(ratios, rows) if x >= AIM_RATIO) or 'none'})")
             + ".")
    for r in rows:
        n, c = r["train"]["node"], r["train"]["cartpole"]
        en, ec = r["env_only"]["node"]["s_per_update"], r["env_only"]["cartpole"]["s_per_update"]
        L.append(f"- {r['clusters']} clusters: a node-env update takes {n['s_per_update'] * 1e3:.1f} ms vs CartPole's "
                 f"{c['s_per_update'] * 1e3:.1f} ms. Stepping the envs alone: node {en * 1e3:.1f} ms, CartPole {ec * 1e3:.1f} ms "
                 f"per update's worth of steps; everything else (policy forward passes, GAE, 4 epochs x 4 minibatches of "
                 f"PPO, obs normalisation) is roughly {(n['s_per_update'] - en) * 1e3:.1f} ms vs {(c['s_per_update'] - ec) * 1e3:.1f} ms "
                 f"(the node learner has 20 observation features vs 4, 11 actions vs 2, and action masking).")
    span = lambda xs: f"{min(xs):.0f}" if f"{min(xs):.0f}" == f"{max(xs):.0f}" else f"{min(xs):.0f}-{max(xs):.0f}"  # noqa: E731
    L.append(f"- Compile: node-env training {span([r['train']['node']['compile_s'] for r in rows])} s, CartPole "
             f"{span([r['train']['cartpole']['compile_s'] for r in rows])} s "
             "(once per run per chunk size; the driver reuses the compiled chunk).")
    finite = all(math.isfinite(r["node_last_reward"]) for r in rows)
    L.append(f"- Sanity: the node learner's last mean reward in the timed chunk was {'finite in every run' if finite else 'NOT finite'} "
             f"({', '.join(format(r['node_last_reward'], '.3f') for r in rows)}).")
    L.append("")
    return "\n".join(L)

if __name__ == "__main__":
    main()
