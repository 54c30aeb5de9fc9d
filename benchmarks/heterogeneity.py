"""How different the regions' updates are: the (G, B) gradient dissimilarity of Allouah et
al. (AISTATS 2023, "Fixing by Mixing") measured on the ten-region cluster along the main
job's training trajectory.

(G, B)-dissimilarity: for every parameter vector theta, over the honest nodes i,
    (1/n) sum_i ||g_i(theta) - g(theta)||^2 <= G^2 + B^2 ||g(theta)||^2,
with g_i a node's expected update and g their mean. Here g_i is what the aggregator sees:
a node's delta after its K local PPO updates from the global parameters. A round's delta
carries the node's rollout noise too, which is not heterogeneity; each measured theta runs
the round twice with independent rollouts (a, b) and uses the unbiased cross products
    H = (1/n) sum_i <d_i^a - mean^a, d_i^b - mean^b>   (heterogeneity, estimates the left side)
    S = <mean^a, mean^b>                               (signal, estimates ||g||^2)
    N = (1/n) sum_i ||d_i^a - d_i^b||^2 / 2            (a node's rollout noise, sigma^2)
Reported: G^2 with B = 0 (max H), B^2 with G = 0 (max H / S), and what the latter implies:
no aggregator is robust when f / n >= 1 / (2 + B^2) (their lower bound), so
with B^2 the largest tolerable f of 10 is the largest f < 10 / (2 + B^2).

Writes heterogeneity.json and the markdown rendered from it (`--render-only` redraws it).

usage: python benchmarks/heterogeneity.py [--steps 10000000] [--points 9]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import machine, write_report  # noqa: E402

from aro_jax.config import load_config  # noqa: E402
from aro_jax.envs.scenarios import cluster_params  # noqa: E402
from aro_jax.training import trainers  # noqa: E402


def cross_statistics(a: np.ndarray, b: np.ndarray) -> dict:
    """H, S, N (module docstring) and each node's share of H from two independent rounds'
    deltas a, b of shape (n_nodes, n_params)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    ca, cb = a - a.mean(0), b - b.mean(0)
    per_node = np.sum(ca * cb, axis=1)
    return {
        "H": float(per_node.mean()),
        "S": float(a.mean(0) @ b.mean(0)),
        "N": float(np.mean(np.sum((a - b) ** 2, axis=1)) / 2),
        "per_node_H": per_node.tolist(),
        "mean_delta_norm": float(np.linalg.norm(a, axis=1).mean()),
    }


def measure(steps: int, points: int, overrides: list[str]) -> dict:
    cfg = load_config(None, [f"train.total_env_steps={steps}", "train.num_chunks=1", *overrides])
    node_params = cluster_params(cfg, "train")
    init, chunk, _ = trainers.make_federated(cfg, node_params)
    hp = trainers.hyperparams(cfg)
    rounds = trainers.num_rounds(cfg)
    # Measured at rounds 0, interval, ...: never at the run's end, where the annealed
    # learning rate is 0 and every delta vanishes.
    interval = max(1, rounds // points)
    advance = jax.jit(lambda s: chunk(s, hp, interval)[0])
    one_round = jax.jit(lambda s: chunk(s, hp, 1)[0])

    def replicate(state):
        """The same round from the same state with other rollout keys."""
        return state.replace(nodes=state.nodes.replace(key=jax.vmap(lambda k: jax.random.fold_in(k, 1))(state.nodes.key)))

    state = jax.jit(init)(jax.random.PRNGKey(cfg.train.seed), hp)
    rows = []
    t0 = time.perf_counter()
    for point in range(points):
        done = point * interval
        a = one_round(state).previous_deltas
        b = one_round(replicate(state)).previous_deltas
        row = cross_statistics(np.asarray(a), np.asarray(b))
        row["round"] = done
        rows.append(row)
        print(f"  round {done}: H={row['H']:.3g} S={row['S']:.3g} N={row['N']:.3g}", file=sys.stderr, flush=True)
        if point + 1 < points:
            state = advance(state)
    wall = time.perf_counter() - t0
    return {
        "config": {"aggregator": cfg.federated.aggregator, "num_byzantine": cfg.federated.num_byzantine,
                   "local_updates": cfg.federated.local_updates, "rounds": rounds, "env_steps": steps},
        "nodes": [n.name for n in cfg.cluster.nodes],
        "rows": rows,
        "wall_s": wall,
    }


def summarise(data: dict) -> dict:
    rows = [r for r in data["rows"] if r["S"] > 0]
    g2 = max(r["H"] for r in data["rows"])
    b2 = max(r["H"] / r["S"] for r in rows) if rows else math.inf
    n = len(data["nodes"])
    f_max = max((f for f in range(n) if f / n < 1 / (2 + b2)), default=0)
    median_ratio = float(np.median([r["H"] / r["S"] for r in rows])) if rows else math.inf
    # The other (G, B) pairs: for B^2 at the bound of f Byzantine nodes (B^2 < n / f - 2),
    # the smallest G^2 that covers every measured round, G^2 = max_t (H_t - B^2 S_t).
    at_bound = {f: {"B2": n / f - 2, "G2": max(r["H"] - (n / f - 2) * r["S"] for r in data["rows"])} for f in (1, 2, 3)}
    return {"G2_at_B0": g2, "B2_at_G0": b2, "median_H_over_S": median_ratio, "max_tolerable_f": f_max, "G2_at_bound": at_bound}


def render(data: dict) -> str:
    s = summarise(data)
    n = len(data["nodes"])
    c = data["config"]
    lines = [
        "# Heterogeneity of the regions: (G, B) gradient dissimilarity",
        "",
        f"Command: `{data['command']}`; machine: {data['machine']}; {data['wall_s']:.0f} s; figures from heterogeneity.json.",
        "",
        f"Ten-region cluster, the main job's trajectory ({c['aggregator']}, f = {c['num_byzantine']}, K = {c['local_updates']} local "
        f"updates per round, {c['rounds']} rounds, {c['env_steps']:,} env steps). At each measured round every node's delta is "
        "computed twice from the same global parameters with independent rollouts; cross products of the two give unbiased "
        "estimates of the heterogeneity H = (1/n) sum_i ||g_i - g||^2, the signal S = ||g||^2 and a node's rollout noise N "
        "(see benchmarks/heterogeneity.py).",
        "",
        "| round | H (heterogeneity) | S (signal) | H / S | N (rollout noise) | mean delta norm |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        ratio = f"{r['H'] / r['S']:.3g}" if r["S"] > 0 else "n/a (S <= 0)"
        lines.append(f"| {r['round']} | {r['H']:.3g} | {r['S']:.3g} | {ratio} | {r['N']:.3g} | {r['mean_delta_norm']:.3g} |")
    share = np.mean([np.asarray(r["per_node_H"]) / max(r["H"], 1e-30) for r in data["rows"]], axis=0)
    lines += [
        "",
        f"G^2 with B = 0: {s['G2_at_B0']:.3g}. B^2 with G = 0: {s['B2_at_G0']:.3g} (the largest H / S; the median over "
        f"the measured rounds is {s['median_H_over_S']:.3g}; each H / S is an estimate from one pair of rounds). "
        f"With that B^2, Allouah et al.'s bound (no aggregator is robust when f / n >= 1 / (2 + B^2)) leaves at most "
        f"f = {s['max_tolerable_f']} of {n} tolerable; the main job's f = {c['num_byzantine']} "
        + ("is inside it." if c["num_byzantine"] <= s["max_tolerable_f"] else
           "is beyond it under this reading (G = 0). Read with G > 0 instead (next table), the measured rounds fit the f = 3 "
           "bound's B^2 only with a G^2 many times the late rounds' signal. Either way the regions' honest updates differ "
           "from each other far more than their mean moves once training is under way, so a rule that discards outlying "
           "honest updates discards signal."),
        "",
        "(G, B) pairs at the bound for f Byzantine regions of 10 (B^2 must stay below n / f - 2): the smallest G^2 that "
        "covers every measured round with that B^2, against the signal S of the last measured round:",
        "",
        "| f | B^2 (bound) | G^2 | G^2 / S (last round) |",
        "|---|---|---|---|",
        *[f"| {f} | {v['B2']:.3g} | {v['G2']:.3g} | {v['G2'] / data['rows'][-1]['S']:.3g} |" for f, v in sorted(s["G2_at_bound"].items(), key=lambda kv: int(kv[0]))],
        "",
        "Each region's share of H (its <d_i^a - mean^a, d_i^b - mean^b> over n H, averaged over the measured rounds; "
        "1.0 is an average region):",
        "",
        "| region | share |",
        "|---|---|",
    ]
    lines += [f"| {name} | {v:.2f} |" for name, v in zip(data["nodes"], share)]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10_000_000)
    ap.add_argument("--points", type=int, default=9)
    ap.add_argument("--render-only", action="store_true", help="re-render the markdown from heterogeneity.json")
    args = ap.parse_args()
    out = Path(__file__).with_name("heterogeneity.json")
    if args.render_only:
        write_report(out, None, render)
        print(out.with_suffix(".md").read_text())
        return
    data = measure(args.steps, args.points, [])
    data["command"] = f"python benchmarks/heterogeneity.py --steps {args.steps} --points {args.points}"
    data["machine"] = machine()
    data["summary"] = summarise(data)
    write_report(out, data, render)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
