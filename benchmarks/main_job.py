"""The main job's results: run `aro run` on the embedded default config (or collect a run
already made) into benchmarks/main_job/: the KPI table (json/md/csv), the learning curve,
the one-day timeline and summary.json (wall time, training rate, the final training
record with each region's constraint costs and multipliers, and each region's SLO
attainment per day over the training week). The README's main-job figures are rendered from these files
(benchmarks/render_readme.py).

usage: python benchmarks/main_job.py [--from RUN_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import code_commit, scaling_kpis, training_env  # noqa: E402

OUT = Path(__file__).parent / "main_job"


WEEK_SEEDS = 2


def week_by_region(run_dir: Path) -> dict:
    """The trained policy over the whole training week from Monday 00:00 UTC (the window its
    constraints are averaged over), WEEK_SEEDS seeds: each region's SLO attainment per
    day and over the week (drops and rejects as misses), its dropped share, and the share
    of its consecutive tick pairs that reverse a CPU or memory move (a resize undone on the
    next tick: churn that buys nothing unless the model gives it away)."""
    import jax
    import numpy as np

    from aro_jax import contract as ct
    from aro_jax.envs.scenarios import cluster_params
    from aro_jax.training import checkpointing, evaluation

    cfg, policy, weights, per_node = checkpointing.load_trained_policy(run_dir)
    env, params = evaluation.eval_env(cfg, cluster_params(cfg, "diurnal"))
    day = round(86_400 / cfg.env.tick_s)
    m = jax.tree.map(np.asarray, evaluation.run_episodes(env, policy, params, jax.random.PRNGKey(0), WEEK_SEEDS, 7 * day, weights, per_node))
    attempted = sum(m[k] for k in ("served", "forwarded", "dropped", "rejected"))
    by_day = lambda x: x.reshape(x.shape[0], WEEK_SEEDS, 7, day).sum(axis=(1, 3))  # (regions, days)  # noqa: E731
    arrivals, missed = by_day(m["arrivals"]), by_day((1.0 - m["slo_attainment"]) * attempted)
    dropped = m["dropped"].sum(axis=(1, 2))
    a = m["action"]  # (regions, seeds, ticks)
    undone = sum((a[..., :-1] == x) & (a[..., 1:] == y) for x, y in
                 ((ct.INC_CPU, ct.DEC_CPU), (ct.DEC_CPU, ct.INC_CPU), (ct.INC_MEM, ct.DEC_MEM), (ct.DEC_MEM, ct.INC_MEM)))
    reversed_pct = 100 * undone.mean(axis=(1, 2))
    return {
        node.name: {"attainment_pct_by_day": (100 * (1 - missed[i] / arrivals[i])).tolist(),
                    "attainment_pct": float(100 * (1 - missed[i].sum() / arrivals[i].sum())),
                    "dropped_pct": float(100 * dropped[i] / arrivals[i].sum()),
                    "resizes_reversed_pct": float(reversed_pct[i])}
        for i, node in enumerate(cfg.cluster.nodes)
    }


# Overload: a held-out scenario heavier than anything trained on (5x demand for 30 min at
# 10:00, envs/scenarios.py), against the baselines that have the learned policy's levers.
OVERLOAD_SCENARIO = "flash-crowd"
OVERLOAD_BASELINES = ("reactive+tier", "predictive+tier", "reactive+spill+tier", "predictive+spill+tier", "static-peak")
# A reference, not a baseline: every region at its replica limit all day with the spill
# and tier rules. What it still drops in the crowd, the limit forces on any policy of
# these levers that does not forward or degrade more.
CEILING = "capacity ceiling (max replicas + spill + tier)"


def overload_kpis(cfg, m, params, shown=("slo_attainment_pct", "dropped_pct", "cost_usd_per_h")) -> dict:
    """One policy's cluster-wide `shown` KPIs on OVERLOAD_SCENARIO (evaluation metrics `m`),
    and the region that drops most."""
    from aro_jax.training import evaluation

    k = evaluation.cluster_kpis(m, cfg.env.tick_s, params)
    regions = evaluation.region_kpis(m, cfg.env.tick_s, params, [n.name for n in cfg.cluster.nodes])
    worst = max(regions, key=lambda r: regions[r]["dropped_pct"])
    return {**{x: k[x] for x in shown}, "worst_drop_region": worst, "worst_drop_pct": regions[worst]["dropped_pct"]}


def overload(run_dir: Path, baselines: tuple[str, ...] = OVERLOAD_BASELINES, ceiling: bool = True) -> dict:
    """The trained policy and `baselines` (and the capacity ceiling) on OVERLOAD_SCENARIO
    (the main job's evaluation seeds, one day): whether a policy scales out or drops when
    demand jumps past its training, cluster-wide and in the region where it drops most."""
    import jax
    import numpy as np

    from aro_jax.envs import heuristics
    from aro_jax.envs.scenarios import cluster_params
    from aro_jax.training import checkpointing, evaluation

    cfg, policy, weights, per_node = checkpointing.load_trained_policy(run_dir)
    params = cluster_params(cfg, OVERLOAD_SCENARIO)
    env, eparams = evaluation.eval_env(cfg, params)
    policies = {"learned": (policy, weights, per_node), **{n: (heuristics.HEURISTICS[n](cfg.env.tick_s), None, False) for n in baselines}}
    if ceiling:
        policies[CEILING] = (heuristics.with_quality_tier(heuristics.with_spillover(heuristics.static_policy("peak", 1e-6))), None, False)
    out = {}
    for name, (pol, state, per) in policies.items():
        m = jax.tree.map(np.asarray, evaluation.run_episodes(env, pol, eparams, jax.random.PRNGKey(0), cfg.eval.num_seeds,
                                                             cfg.env.episode_ticks, state, per))
        out[name] = {**overload_kpis(cfg, m, params, ("slo_attainment_pct", "dropped_pct", "cost_usd_per_h", "goodput_per_usd")),
                     **scaling_kpis(m, params)}
    return {"scenario": OVERLOAD_SCENARIO, "policies": out}


def collect(run_dir: Path, wall_s: float | None, command: str) -> dict:
    import jax

    from aro_jax.training import checkpointing

    OUT.mkdir(exist_ok=True)
    names = [f"kpis_diurnal{part}.{ext}" for part in ("", "_regions") for ext in ("json", "md", "csv")]
    for name in (*names, "timeline_diurnal.png"):
        shutil.copy(run_dir / "eval" / name, OUT / name)
    shutil.copy(run_dir / "learning_curve.png", OUT / "learning_curve.png")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("event") == "train"]
    steps_per_chunk = train[0]["env_steps"]
    train_s = sum(steps_per_chunk / r["steps_per_s"] for r in train)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    run_cfg = checkpointing.load_run_config(run_dir)
    summary = {
        "command": command,
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, jax {jax.__version__}, Python {platform.python_version()}",
        "commit": code_commit(),
        "wall_s": wall_s,
        "train_s": train_s,
        "env_steps": train[-1]["env_steps"],
        "env_steps_per_s": train[-1]["env_steps"] / train_s,
        "final": train[-1],
        "eval_rewards": [r["eval_reward"] for r in train],
        "objective": config.get("objective"),
        "env_kind": config["env"].get("kind", "node"),
        "training_env": training_env(config["env"]),
        "ppo": config["ppo"],
        "federated": config["federated"],
        # Each region's attainment target (its workload's, else the run's slo_target).
        "region_targets": {n.name: run_cfg.objective.target(n.traffic_mix, n.slo_target) for n in run_cfg.cluster.nodes},
        "region_mix": {n["name"]: n.get("traffic_mix", "conversation") for n in config["cluster"]["nodes"]},
        "week": week_by_region(run_dir),
        "overload": overload(run_dir),
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="run_dir", type=Path, help="collect this finished `aro run` directory instead of running")
    ap.add_argument("--keep", type=Path, help="run into this directory (kept, e.g. for benchmarks/paper_table.py --learned)")
    args = ap.parse_args()
    if args.run_dir:
        summary = collect(args.run_dir, None, "aro run")
    else:
        run_dir = args.keep or Path(tempfile.mkdtemp(prefix="aro-main-job-")) / "run"
        t0 = time.perf_counter()
        subprocess.run(["aro", "run", f"train.run_dir={run_dir}"], check=True)
        summary = collect(run_dir, time.perf_counter() - t0, "pip install -e . && aro run")
    print(json.dumps({k: v for k, v in summary.items() if k != "final"}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
