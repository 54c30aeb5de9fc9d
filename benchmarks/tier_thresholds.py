"""Tune the baselines' quality-tier rule once, on the training scenario, and freeze it.

For Reactive + tier and Static (mean) + tier on the ten-region cluster's diurnal days, a
grid of (degrade load, restore load) thresholds (heuristics.with_quality_tier); the chosen
pair maximises Reactive + tier's goodput per dollar among those whose SLO attainment is
within 0.1 percentage points of Reactive's without the tier. heuristics.TIER_DEGRADE_LOAD / TIER_RESTORE_LOAD
hold the result (tests/test_docs.py checks they match this JSON).

usage: python benchmarks/tier_thresholds.py [--seeds 2] [--render-only]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import grid_table, run_report  # noqa: E402

from aro_jax.config import load_config  # noqa: E402
from aro_jax.envs import heuristics  # noqa: E402
from aro_jax.envs.scenarios import cluster_params  # noqa: E402
from aro_jax.training import evaluation  # noqa: E402

DEGRADE = (0.8, 0.9, 1.0, 1.1)
RESTORE = (0.4, 0.5, 0.6, 0.7)
ATTAINMENT_TOLERANCE_PP = 0.1  # seed noise of a 2-seed day, in percentage points
SHOWN = ("goodput_per_usd", "goodput_rps", "slo_attainment_pct", "dropped_pct", "cost_usd_per_h", "quality")


def measure(seeds: int) -> dict:
    cfg = load_config()
    params = cluster_params(cfg, "diurnal")
    env, eparams = evaluation.eval_env(cfg, params)
    key = jax.random.PRNGKey(7)
    run = lambda policy, state=None: evaluation.cluster_kpis(  # noqa: E731
        evaluation.run_episodes(env, policy, eparams, key, seeds, cfg.env.episode_ticks, state, state is not None), cfg.env.tick_s, params)
    rows = []
    for base in ("reactive", "static-mean"):
        rows.append({"policy": base, "degrade_load": None, "restore_load": None, **{k: run(heuristics.HEURISTICS[base](cfg.env.tick_s))[k] for k in SHOWN}})
        tiered = heuristics.HEURISTICS[f"{base}+tier"](cfg.env.tick_s)
        base_states = jax.vmap(heuristics.HEURISTICS[base](cfg.env.tick_s).init)(params)
        for d in DEGRADE:
            for r in RESTORE:
                if r >= d:
                    continue
                nodes = params.tick_s.shape[0]
                state = (base_states, jnp.tile(jnp.array([d, r], jnp.float32), (nodes, 1)))
                k = run(tiered, state)
                rows.append({"policy": f"{base}+tier", "degrade_load": d, "restore_load": r, **{x: k[x] for x in SHOWN}})
                print(rows[-1], flush=True)
    return {"rows": rows, **choose(rows), "seeds": seeds, "scenario": "diurnal", "cluster": cfg.cluster.name}


def choose(rows: list[dict]) -> dict:
    """The Reactive + tier thresholds with the best goodput per dollar among those whose
    attainment is within ATTAINMENT_TOLERANCE_PP of Reactive's without the tier."""
    no_tier = next(r for r in rows if r["policy"] == "reactive")
    tiered = [r for r in rows if r["policy"] == "reactive+tier"]
    ok = [r for r in tiered if r["slo_attainment_pct"] >= no_tier["slo_attainment_pct"] - ATTAINMENT_TOLERANCE_PP]
    best = max(ok or tiered, key=lambda r: r["goodput_per_usd"])
    return {"chosen": {"degrade_load": best["degrade_load"], "restore_load": best["restore_load"]}, "constraint_met": bool(ok)}


def render(data: dict) -> str:
    c = data["chosen"]
    lines = [
        "# Quality-tier thresholds of the baselines", "",
        f"Command: `{data['command']}`  ", f"Machine: {data['machine']}, {data['wall_s']:.0f} s", "",
        f"Grid on the training scenario ({data['scenario']}, {data['cluster']}, {data['seeds']} seeds x 1 day). "
        "Chosen: the Reactive + tier thresholds with the best goodput per dollar among those whose SLO attainment "
        f"is within 0.1 percentage points of Reactive's without the tier{'' if data['constraint_met'] else ' (none was; the best goodput per dollar overall)'}: "
        f"**degrade above load {c['degrade_load']:g}, restore below {c['restore_load']:g}**. Frozen in "
        "`aro_jax/envs/heuristics.py` and used for every `+tier` baseline on every scenario.", "",
        *grid_table(data["rows"], [("degrade load", "degrade_load"), ("restore load", "restore_load")], SHOWN),
    ]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    run_report(Path(__file__).with_name("tier_thresholds.json"), render, lambda: measure(args.seeds), args.render_only)

if __name__ == "__main__":
    main()
