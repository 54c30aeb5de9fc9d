"""The main job's spread over training seeds: the embedded default config trained with
`--seeds` seeds in one vmapped program (no logging), each seed's policy evaluated like
the main job (one simulated day from Monday 00:00 UTC, 8 evaluation seeds x 10 regions)
next to Reactive + tier, there and on the held-out flash crowd and traces (the traces where
../shared/data has them). Writes main_job_seeds.json and the markdown rendered from it; the
seeds' weights go to runs/main_job_seeds/weights.msgpack.

usage: python benchmarks/main_job_seeds.py [--seeds 3] [--evaluate-only] [--render-only]
(--evaluate-only: the weights kept by the last run, evaluated again without training)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import run_report, train_and_evaluate_seeds, training_env  # noqa: E402
from main_job import OVERLOAD_SCENARIO, overload_kpis  # noqa: E402

from aro_jax.config import load_config  # noqa: E402
from aro_jax.envs.heuristics import HEURISTICS  # noqa: E402
from aro_jax.envs.scenarios import scenario_plan, trace_path  # noqa: E402
from aro_jax import contract as ct  # noqa: E402
from aro_jax.training import evaluation  # noqa: E402

OUT = Path(__file__).with_name("main_job_seeds.json")
WEIGHTS = Path("runs/main_job_seeds/weights.msgpack")
# Held out from training: heavier demand (OVERLOAD_SCENARIO), then the real traces, whose
# result varied most between training seeds (benchmarks/pareto.md at 0a9657c).
HELD_OUT_TRACES = ("trace-conv", "trace-code")
# What a policy does where it fails: its decisions on the ticks its worst region drops more
# than DROPPING_SHARE of that tick's arrivals, by kind of move.
DROPPING_SHARE = 0.05
MOVES = {"scale out": (ct.INC_GPU,), "scale in": (ct.DEC_GPU,), "CPU or memory": (ct.INC_CPU, ct.DEC_CPU, ct.INC_MEM, ct.DEC_MEM),
         "forward or pull back": (ct.REBALANCE, ct.PULL_BACK), "quality tier": (ct.DEGRADE, ct.RESTORE), "maintain": (ct.MAINTAIN,)}
SHOWN = ("goodput_per_usd", "goodput_rps", "slo_attainment_pct", "dropped_pct", "cost_usd_per_h", "replicas", "quality")


def moves_when_dropping(cfg, m, region: str) -> dict:
    """`region`'s mean ready replicas, the share of its ticks dropping more than
    DROPPING_SHARE, and on those ticks the share of each kind of move (MOVES)."""
    i = [n.name for n in cfg.cluster.nodes].index(region)
    action, arrivals, dropped = (np.asarray(m[k])[i] for k in ("action", "arrivals", "dropped"))
    dropping = dropped > DROPPING_SHARE * np.maximum(arrivals, 1e-9)
    return {"replicas": float(np.asarray(m["replicas_ready"])[i].mean()), "dropping_ticks_pct": float(100 * dropping.mean()),
            "moves": {k: float(np.isin(action[dropping], ids).mean()) if dropping.any() else 0.0 for k, ids in MOVES.items()}}


def held_out_kpis(cfg, m, params) -> dict:
    """overload_kpis, and what the policy does in the region that drops most."""
    k = overload_kpis(cfg, m, params)
    return {**k, "worst_region_moves": moves_when_dropping(cfg, m, k["worst_drop_region"])}


def measure(seeds: int, evaluate_only: bool) -> dict:
    cfg = load_config()
    held_out = (OVERLOAD_SCENARIO, *(t for t in HELD_OUT_TRACES if trace_path(cfg.env.data_dir, t).exists()))
    by_scenario, train_s = train_and_evaluate_seeds(cfg, seeds, held_out, WEIGHTS, evaluate_only)
    trained = None
    if evaluate_only:  # the run that trained these weights, from its report
        last = json.loads(OUT.read_text())
        trained = last.get("trained") or {k: last[k] for k in ("command", "wall_s", "commit")}
        train_s = last["train_s"]
    per_seed = by_scenario[cfg.eval.scenario]
    params, ticks, _ = scenario_plan(cfg, cfg.eval.scenario)
    env, eparams = evaluation.eval_env(cfg, params)
    key = jax.random.PRNGKey(0)  # the main job's evaluation key
    names = [n.name for n in cfg.cluster.nodes]
    targets = [cfg.objective.target(n.traffic_mix, n.slo_target) for n in cfg.cluster.nodes]
    plans = {s: scenario_plan(cfg, s) for s in held_out}
    rows = []
    for s, m in enumerate(per_seed):
        k = evaluation.cluster_kpis(m, cfg.env.tick_s, params)
        regions = evaluation.region_kpis(m, cfg.env.tick_s, params, names)
        # Each region against its own attainment target and the drop bound.
        met = sum(regions[n]["slo_attainment_pct"] >= 100 * t for n, t in zip(names, targets, strict=True))
        drops_over = sum(regions[n]["dropped_pct"] > 100 * cfg.objective.max_drop for n in names)
        rows.append({"seed": s, **{x: k[x] for x in SHOWN}, "targets_met": met, "drops_over": drops_over, "regions": len(names),
                     "held_out": {h: held_out_kpis(cfg, by_scenario[h][s], plans[h][0]) for h in held_out}})
        print(rows[-1], flush=True)
    m = evaluation.run_episodes(env, HEURISTICS["reactive+tier"](cfg.env.tick_s), eparams, key, cfg.eval.num_seeds, ticks)
    k = evaluation.cluster_kpis(m, cfg.env.tick_s, params)
    reactive_held_out = {}
    for h, (hparams, hticks, _) in plans.items():
        henv, heparams = evaluation.eval_env(cfg, hparams)
        m_h = evaluation.run_episodes(henv, HEURISTICS["reactive+tier"](cfg.env.tick_s), heparams, key, cfg.eval.num_seeds, hticks)
        reactive_held_out[h] = held_out_kpis(cfg, m_h, hparams)
    return {"rows": rows, "reactive_tier": {x: k[x] for x in SHOWN}, "reactive_tier_held_out": reactive_held_out, "train_s": train_s, "trained": trained, "steps_per_seed": cfg.train.total_env_steps,
            "env_kind": cfg.env.kind, "training_env": training_env(cfg.env), "ppo": dataclasses.asdict(cfg.ppo),
            "objective": dataclasses.asdict(cfg.objective), "federated": dataclasses.asdict(cfg.federated)}


def render(d: dict) -> str:
    t = d.get("trained") or d
    lines = ["# The main job over training seeds", "", f"Command: `{t['command']}`"
             + (f", then `{d['command']}` (code at {d['commit']}, {d['wall_s'] / 60:.0f} min)" if d.get("trained") else "") + "  ",
             f"Machine: {d['machine']}, {t['wall_s'] / 60:.0f} min ({d['train_s'] / 60:.0f} min training {len(d['rows'])} seeds x "
             f"{d['steps_per_seed'] / 1e6:.0f}M env steps in one program; code at {t['commit']})", "",
             "Each seed's policy on the main job's evaluation (one day, 8 evaluation seeds x 10 regions), and Reactive + tier on "
             "the same days. Seed 0 is the main job's seed; trained here inside a vmap over seeds, it need not be bit-equal to the "
             "main job's run.", "",
             "| policy | " + " | ".join(f"{k} ({evaluation.KPIS[k][0]})" if evaluation.KPIS[k][0] else k for k in SHOWN)
             + " | regions at their attainment target | regions over the drop bound |",
             "|---" * (len(SHOWN) + 3) + "|"]
    counts = lambda r: f" | {r['targets_met']} / {r['regions']} | {r['drops_over']} |" if "targets_met" in r else " | - | - |"  # noqa: E731
    for r in d["rows"]:
        lines.append(f"| learned, seed {r['seed']} | " + " | ".join(evaluation.format_value(r[k]) for k in SHOWN) + counts(r))
    vals = {k: np.array([r[k] for r in d["rows"]]) for k in SHOWN}
    lines.append("| learned, mean ± sd | " + " | ".join(f"{evaluation.format_value(v.mean())} ± {evaluation.format_value(v.std(ddof=1))}"
                                                       if len(v) > 1 else evaluation.format_value(v.mean()) for v in vals.values()) + " | | |")
    lines.append("| Reactive + tier | " + " | ".join(evaluation.format_value(d["reactive_tier"][k]) for k in SHOWN) + " | | |")
    about = {OVERLOAD_SCENARIO: "5x demand for 30 minutes, heavier than anything trained on",
             "trace-conv": "the Azure conversation trace replayed in every region from Monday 00:00 UTC",
             "trace-code": "the Azure code trace replayed in every region from Monday 00:00 UTC"}
    for h, reactive in d["reactive_tier_held_out"].items():
        lines += ["", f"On the held-out {h} ({about[h]}; the same evaluation seeds):", "",
                  "| policy | SLO attainment (%) | dropped (%) | most dropped in | cost ($/h) | its replicas there | its ticks dropping "
                  f"> {DROPPING_SHARE:.0%} | its moves on them: " + " / ".join(MOVES) + " |", "|---" * 8 + "|"]
        for name, o in [(f"learned, seed {r['seed']}", r["held_out"][h]) for r in d["rows"]] + [("Reactive + tier", reactive)]:
            w = o["worst_region_moves"]
            lines.append(f"| {name} | {o['slo_attainment_pct']:.1f} | {o['dropped_pct']:.2f} | {o['worst_drop_region']} "
                         f"{o['worst_drop_pct']:.2f} % | {o['cost_usd_per_h']:,.0f} | {w['replicas']:.1f} | {w['dropping_ticks_pct']:.0f} % | "
                         + " / ".join(f"{v:.2f}" for v in w["moves"].values()) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--evaluate-only", action="store_true", help=f"evaluate the weights the last run kept in {WEIGHTS} instead of training")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    run_report(OUT, render, lambda: measure(args.seeds, args.evaluate_only), args.render_only)

if __name__ == "__main__":
    main()
