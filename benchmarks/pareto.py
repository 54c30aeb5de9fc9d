"""Cost / SLO-attainment frontiers: the constrained learner (objective "slo") at several
attainment targets against the autoscalers at several settings each, on the training
scenario and every held-out one, with the quality tier off for every policy.

Learned: the default federated config under `objective.kind=slo`, one run per (target,
seed), all trained in one compiled program (the targets are hyperparameter leaves,
vmapped with the seeds). Heuristics: Reactive (HPA) at several target loads, Predictive
at several headrooms, Static sized for the peak at several utilisations. Every policy is
evaluated on the same seeds. Writes pareto.json, then pareto.md and pareto.png from it.

usage: python benchmarks/pareto.py [--targets 0.7 0.75 0.8 0.85 0.9] [--seeds 2]
           [--steps 2500000] [--clusters 4] [--eval-seeds 4] [--render-only]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import machine, scaling_kpis, write_report  # noqa: E402

from aro_jax.config import load_config  # noqa: E402
from aro_jax.envs import heuristics  # noqa: E402
from aro_jax.envs.scenarios import SCENARIOS, cluster_params  # noqa: E402
from aro_jax.training import evaluation, learned_policy, trainers  # noqa: E402

OUT = Path(__file__).with_name("pareto.json")
# The main job's objective.slo_target. A swept target t holds for the chat regions; the
# code regions keep their offset from it (their own target 0.6 at the main job's 0.9, so
# t - 0.3 here: serving_costs shifts their miss cost by the difference).
MAIN_TARGET = 0.9
PAPER_COST_CLAIM_PCT = 18.0  # the paper: -18 % cost against Static
SETTINGS = {
    "reactive": ("target load", [0.4, 0.5, 0.6, 0.7, 0.8, 0.9], lambda tick, v: heuristics.reactive_policy(tick, target_load=v)),
    "predictive": ("headroom", [0.0, 0.25, 0.5, 0.75, 1.0], lambda tick, v: heuristics.predictive_policy(tick, headroom=v)),
    "static-peak": ("utilisation", [0.5, 0.6, 0.7, 0.8, 0.9], lambda tick, v: heuristics.static_policy("peak", utilisation=v)),
}
KPIS = ("goodput_per_usd", "goodput_rps", "slo_attainment_pct", "rejected_pct", "cost_usd_per_mtok", "cost_usd_per_h", "throughput_rps", "dropped_pct", "e2e_mean_ms", "quality")


def study_config(args, extra=()):
    # Trained to the swept targets and the drop bound themselves (no margins), as the recorded runs were.
    return load_config(None, ["objective.kind=slo", "objective.slo_margin=0", "objective.drop_margin=0", "env.quality_tier=false", f"env.num_clusters={args.clusters}",
                              f"train.total_env_steps={args.steps}", "train.num_chunks=1", f"eval.num_seeds={args.eval_seeds}", *extra])


def train_frontier(args):
    cfg = study_config(args)
    trainer = trainers.make_trainer(cfg)
    base = trainers.hyperparams(cfg)
    targets = [t for t in args.targets for _ in range(args.seeds)]
    runs = len(targets)
    hps = jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), (runs,) + jnp.shape(x)), base)
    hps = hps.replace(cost_limits=jax.vmap(trainers.cost_limits)(jnp.asarray(targets), jnp.full((runs,), cfg.objective.max_drop), jnp.full((runs,), cfg.objective.min_quality)))
    keys = jnp.stack([jax.random.PRNGKey(s) for _ in args.targets for s in range(args.seeds)])

    def one(key, hp):
        state, metrics = trainer.chunk(trainer.init(key, hp), hp, trainer.units_total)
        return trainer.weights(state), {k: v[-1] for k, v in metrics.items()}

    t0 = time.perf_counter()
    weights, last = jax.block_until_ready(jax.jit(jax.vmap(one))(keys, hps))
    print(f"trained {runs} runs ({len(args.targets)} targets x {args.seeds} seeds) in {time.perf_counter() - t0:.0f} s", flush=True)
    return cfg, trainer, targets, weights, {k: np.asarray(v).tolist() for k, v in last.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.75, 0.8, 0.85, 0.9])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2_500_000)
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--eval-seeds", type=int, default=4)
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if args.render_only:
        write_report(OUT, None, render)
        plot(OUT)
        return 0
    t_start = time.perf_counter()
    cfg, trainer, targets, weights, last = train_frontier(args)
    policy = learned_policy.greedy_policy(trainer.network, cfg.ppo.normalize_obs, cfg.ppo.action_masking)
    key = jax.random.PRNGKey(2024)
    rows = []
    for scen in args.scenarios:
        params = cluster_params(cfg, scen)
        env, eparams = evaluation.eval_env(cfg, params)
        for i, target in enumerate(targets):
            w = jax.tree.map(lambda x: x[i], weights)
            m = evaluation.run_episodes(env, policy, eparams, key, args.eval_seeds, cfg.env.episode_ticks, w, trainer.per_node)
            k = evaluation.cluster_kpis(m, cfg.env.tick_s, params)
            rows.append({"policy": "learned (slo)", "setting": target, "seed": i % args.seeds, "scenario": scen,
                         **{x: k[x] for x in KPIS}, **scaling_kpis(m, params)})
        for name, (_, values, make) in SETTINGS.items():
            for v in values:
                m = evaluation.run_episodes(env, make(cfg.env.tick_s, v), eparams, key, args.eval_seeds, cfg.env.episode_ticks)
                k = evaluation.cluster_kpis(m, cfg.env.tick_s, params)
                rows.append({"policy": name, "setting": v, "seed": 0, "scenario": scen, **{x: k[x] for x in KPIS},
                             **scaling_kpis(m, params)})
        print(f"{scen}: evaluated", flush=True)
        # Every heuristic setting is its own compiled program; dropping them per scenario
        # keeps the JIT's code memory bounded (it runs out after a few scenarios otherwise).
        jax.clear_caches()
    data = {
        "command": "python benchmarks/pareto.py " + " ".join(sys.argv[1:]), "machine": machine(),
        "wall_s": time.perf_counter() - t_start, "targets": args.targets, "seeds": args.seeds, "steps": args.steps,
        "clusters": args.clusters, "eval_seeds": args.eval_seeds, "max_drop": cfg.objective.max_drop,
        "rounds": trainers.num_rounds(cfg), "settings": {k: {"parameter": v[0], "values": v[1]} for k, v in SETTINGS.items()},
        "train_last": last, "rows": rows,
    }
    write_report(OUT, data, render)
    plot(OUT)
    print(OUT.with_suffix(".md").read_text())
    return 0


def learned_points(rows, scen):
    """(setting, mean attainment, mean $/1M tok, mean goodput/$) per target, over seeds."""
    out = []
    for t in sorted({r["setting"] for r in rows if r["policy"].startswith("learned")}):
        group = [r for r in rows if r["policy"].startswith("learned") and r["scenario"] == scen and r["setting"] == t]
        if group:
            out.append((t, *(float(np.mean([r[k] for r in group])) for k in ("slo_attainment_pct", "cost_usd_per_mtok", "goodput_per_usd"))))
    return out


def band(rows, scen) -> tuple[float, float]:
    """(ceiling, band) in %: prompts over the context window are rejected whatever the
    policy does, so no policy's attainment exceeds 100 - rejected share (the ceiling);
    the aim's 90 % is read as 90 % of the requests that can be served, min(90, 0.9 x
    ceiling), which is 90 % itself only where nothing is rejected."""
    ceiling = 100.0 - float(np.mean([r["rejected_pct"] for r in rows if r["scenario"] == scen]))
    return ceiling, min(90.0, 0.9 * ceiling)


def aims(data) -> list[dict]:
    """Per scenario: is every heuristic point in the band (attainment >= `band`) beaten
    by a learned point (no lower attainment, lower cost)? And at the main target, the
    learned cost against the cheapest heuristic setting that reaches the same attainment."""
    out = []
    rows = data["rows"]
    for scen in dict.fromkeys(r["scenario"] for r in rows):
        ceiling, lo = band(rows, scen)
        learned = learned_points(rows, scen)
        heur = [r for r in rows if r["scenario"] == scen and not r["policy"].startswith("learned")]
        contenders = [h for h in heur if h["slo_attainment_pct"] >= lo]
        unbeaten = [h for h in contenders if not any(a >= h["slo_attainment_pct"] and c < h["cost_usd_per_mtok"] for _, a, c, _ in learned)]
        main = next((p for p in learned if abs(p[0] - MAIN_TARGET) < 1e-9), None)
        saving = cheapest = None
        if main:
            reach = [h for h in heur if h["slo_attainment_pct"] >= main[1]]
            if reach:
                cheapest = min(reach, key=lambda h: h["cost_usd_per_mtok"])
                saving = 100.0 * (1.0 - main[2] / cheapest["cost_usd_per_mtok"])
        out.append({"scenario": scen, "ceiling": ceiling, "band": lo, "contenders": len(contenders), "unbeaten": unbeaten, "main": main,
                    "cheapest": cheapest, "saving_pct": saving,
                    "frontier_below": bool(learned) and not unbeaten and any(a >= lo for _, a, _, _ in learned)})
    return out


def render(data: dict) -> str:
    lines = [
        "# Cost / SLO-attainment frontiers (quality tier off for every policy)", "",
        f"Command: `{data['command']}`; machine: {data['machine']}; {data['wall_s'] / 60:.0f} min; figures from pareto.json, "
        "plot [`pareto.png`](pareto.png).", "",
        f"Learned: the default federated config (ten regions, multi-Krum) under `objective.kind=slo` (cost minimised subject to "
        f"SLO attainment >= target and dropped share <= {data['max_drop']:g}), {data['clusters']} clusters per region, "
        f"{data['steps']:,} env steps ({data['rounds']} rounds), targets {', '.join(f'{t:g}' for t in data['targets'])} x "
        f"{data['seeds']} seeds in one compiled program. Heuristics: "
        + "; ".join(f"{k} at {v['parameter']} {', '.join(f'{x:g}' for x in v['values'])}" for k, v in data["settings"].items())
        + f". Evaluation: one simulated day, {data['eval_seeds']} seeds x 10 regions, the same seeds for every policy.", "",
        f"Aim: on every scenario the learned frontier lies below every heuristic's at attainment >= 90 % (each heuristic point "
        f"there is beaten by a learned point with no lower attainment and a lower cost per 1M tokens), and at the main job's "
        f"target ({MAIN_TARGET:g}) the learned policy costs >= {PAPER_COST_CLAIM_PCT:g} % less than the cheapest heuristic "
        "setting that reaches its attainment. Prompts over the context window are rejected whatever the policy does and count "
        "as misses, so attainment cannot exceed the scenario's ceiling (100 % - rejected share, about 90 % on this cluster); the "
        "band is therefore 90 % of what can be served: attainment >= min(90 %, 0.9 x ceiling).", "",
        f"| scenario | ceiling / band (%) | frontier below every heuristic in the band | learned at target {MAIN_TARGET:g}: attainment / $ per 1M tok | cheapest heuristic reaching it | saving |",
        "|---|---|---|---|---|---|",
    ]
    results = aims(data)
    for a in results:
        main = f"{a['main'][1]:.1f} % / {a['main'][2]:.3f}" if a["main"] else "—"
        cheap = (f"{a['cheapest']['policy']} ({a['cheapest']['setting']:g}): {a['cheapest']['slo_attainment_pct']:.1f} % / "
                 f"{a['cheapest']['cost_usd_per_mtok']:.3f}") if a["cheapest"] else "none reaches it"
        saving = f"{a['saving_pct']:+.0f} %" if a["saving_pct"] is not None else "—"
        below = "yes" if a["frontier_below"] else (
            f"no ({len(a['unbeaten'])} of {a['contenders']} unbeaten: " + ", ".join(f"{h['policy']} {h['setting']:g}" for h in a["unbeaten"][:4]) + ")"
            if a["unbeaten"] else "no (no learned point reaches the band)")
        lines.append(f"| {a['scenario']} | {a['ceiling']:.1f} / {a['band']:.1f} | {below} | {main} | {cheap} | {saving} |")
    met = all(a["frontier_below"] for a in results) and all((a["saving_pct"] or -1e9) >= PAPER_COST_CLAIM_PCT for a in results)
    lines += ["", f"Aim: **{'met' if met else 'not met'}**.", ""]
    overload = [r for r in data["rows"] if r["scenario"] == "flash-crowd"]
    if overload:
        pick = lambda pol, setting: [r for r in overload if r["policy"] == pol and abs(r["setting"] - setting) < 1e-9]  # noqa: E731
        mean = lambda rs, k: float(np.mean([r[k] for r in rs]))  # noqa: E731
        lrn, rea = pick("learned (slo)", MAIN_TARGET), pick("reactive", 0.7)
        if lrn and rea:
            lines += [f"Overload (flash crowd: 5x demand for 30 min, held out): the learned policy at target {MAIN_TARGET:g} drops "
                      f"{mean(lrn, 'dropped_pct'):.2f} % of requests with {mean(lrn, 'replicas_mean'):.1f} replicas per region on "
                      f"average and {mean(lrn, 'at_max_pct'):.1f} % of region-ticks at the replica limit; Reactive (target load 0.7) "
                      f"drops {mean(rea, 'dropped_pct'):.2f} % with {mean(rea, 'replicas_mean'):.1f} replicas and "
                      f"{mean(rea, 'at_max_pct'):.1f} % at the limit.", ""]
    for scen in dict.fromkeys(r["scenario"] for r in data["rows"]):
        lines += [f"## {scen}", "", "| policy | setting | SLO attainment (%) | $ / 1M tok | goodput per $ (req) | dropped (%) | mean e2e (ms) |", "|---|---|---|---|---|---|---|"]
        for t, att, cost, gp in learned_points(data["rows"], scen):
            lines.append(f"| learned (slo) | target {t:g} (mean of {data['seeds']} seeds) | {att:.1f} | {cost:.3f} | {gp:,.0f} | "
                         f"{np.mean([r['dropped_pct'] for r in data['rows'] if r['scenario'] == scen and r['setting'] == t and r['policy'].startswith('learned')]):.2f} | "
                         f"{np.mean([r['e2e_mean_ms'] for r in data['rows'] if r['scenario'] == scen and r['setting'] == t and r['policy'].startswith('learned')]):,.0f} |")
        for r in sorted((r for r in data["rows"] if r["scenario"] == scen and not r["policy"].startswith("learned")), key=lambda r: (r["policy"], r["setting"])):
            lines.append(f"| {r['policy']} | {r['setting']:g} | {r['slo_attainment_pct']:.1f} | {r['cost_usd_per_mtok']:.3f} | "
                         f"{r['goodput_per_usd']:,.0f} | {r['dropped_pct']:.2f} | {r['e2e_mean_ms']:,.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(json_path: Path) -> None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    scens = list(dict.fromkeys(r["scenario"] for r in data["rows"]))
    cols = min(3, len(scens))
    fig, axes = plt.subplots((len(scens) + cols - 1) // cols, cols, figsize=(5 * cols, 3.8 * ((len(scens) + cols - 1) // cols)), squeeze=False)
    for ax, scen in zip(axes.flat, scens):
        pts = learned_points(data["rows"], scen)
        ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-", color="black", label="learned (slo targets)")
        for name, marker in zip(SETTINGS, "s^v"):
            hs = sorted((r for r in data["rows"] if r["scenario"] == scen and r["policy"] == name), key=lambda r: r["setting"])
            ax.plot([r["slo_attainment_pct"] for r in hs], [r["cost_usd_per_mtok"] for r in hs], marker + "--", label=name, alpha=0.8)
        ax.axvline(band(data["rows"], scen)[1], color="grey", lw=0.8, ls=":")
        ax.set_title(scen)
        ax.set_xlabel("SLO attainment (%)")
        ax.set_ylabel("$ per 1M tokens")
    for ax in list(axes.flat)[len(scens):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(json_path.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
