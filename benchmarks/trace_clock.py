"""The held-out conversation trace at other local hours: the replay as evaluated (from
Monday 00:00 UTC, each region at its own local time) and with every region's clock moved
so that the same replay starts at local hour H. The arrivals are the same in every row;
only the time of day the regions read (their observed clock and forecaster) moves. A
policy that acts on the load it sees scores alike at every hour; one that reads the hour
does not. Reactive + tier reads no clock and is the control.

usage: python benchmarks/trace_clock.py --checkpoint runs/main [--hours 0 14] [--seeds 4]
       python benchmarks/trace_clock.py --render-only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import run_report  # noqa: E402

OUT = Path(__file__).with_suffix(".json")
SCENARIO = "trace-conv"
BASELINE = "reactive+tier"
SHOWN = ("slo_attainment_pct", "dropped_pct", "cost_usd_per_h")


def measure(run_dir: Path, hours: list[float], seeds: int) -> dict:
    import jax
    import jax.numpy as jnp

    from aro_jax.config import load_config
    from aro_jax.envs.heuristics import HEURISTICS
    from aro_jax.envs.scenarios import scenario_plan
    from aro_jax.training import evaluation
    from aro_jax.training.checkpointing import load_trained_policy

    _, policy, weights, per_node = load_trained_policy(run_dir, None)
    cfg = load_config(run_dir / "config.yaml", [f"eval.num_seeds={seeds}"])
    plan = scenario_plan(cfg, SCENARIO)
    names = [n.name for n in cfg.cluster.nodes]
    policies = {"learned": (policy, weights, per_node), BASELINE: (HEURISTICS[BASELINE](cfg.env.tick_s), None, False)}
    tz = {n.name: float(n.tz_offset_h) for n in cfg.cluster.nodes}

    def at(local_h):
        t = plan.params.traffic
        return plan.params if local_h is None else plan.params.replace(traffic=t.replace(tz_offset_h=jnp.full_like(t.tz_offset_h, local_h)))

    rows = []
    for h in [None, *hours]:
        params = at(h)
        env, env_params = evaluation.eval_env(cfg, params)
        for name, (pol, state, per) in policies.items():
            m = evaluation.run_episodes(env, pol, env_params, jax.random.PRNGKey(0), seeds, plan.num_ticks, state, per)
            cluster = evaluation.cluster_kpis(m, cfg.env.tick_s, params)
            regions = evaluation.region_kpis(m, cfg.env.tick_s, params, names)
            rows.append({"local_hour": h, "policy": name, "cluster": {k: float(cluster[k]) for k in SHOWN},
                         "regions": {r: {k: float(v[k]) for k in SHOWN} for r, v in regions.items()}})
    return {"run_dir": str(run_dir), "scenario": SCENARIO, "seeds": seeds, "ticks": plan.num_ticks, "tz_offset_h": tz, "rows": rows}


def _clock(hours: float) -> str:
    return f"{int(hours):02d}:{round(60 * (hours % 1)):02d}"


def render(d: dict) -> str:
    def when(h):
        return "as evaluated (Monday 00:00 UTC, each region's own local time)" if h is None else f"{_clock(h)} local in every region"

    worst = sorted(d["tz_offset_h"], key=lambda r: next(x for x in d["rows"] if x["local_hour"] is None and x["policy"] == "learned")
                   ["regions"][r]["slo_attainment_pct"])[:2]
    out = [
        "# The conversation trace at other local hours",
        "",
        f"Command: `{d['command']}`  ",
        f"Machine: {d['machine']}; code at commit {d['commit']}; policy from `{d['run_dir']}`.",
        "",
        f"The held-out {d['scenario']} replay ({d['ticks']} ticks), {d['seeds']} evaluation seeds, the same arrivals in every row; "
        "only the local time the regions read moves (their observed clock and forecaster). As evaluated, the replay starts at "
        + ", ".join(f"{_clock((24 + h) % 24)} in {r}" for r, h in d["tz_offset_h"].items()) + ".",
        "",
        "| replay starts | policy | attainment (%) | dropped (%) | cost ($/h) | " + " | ".join(f"{r} attainment (%)" for r in worst) + " |",
        "|---|---|---|---|---|" + "---|" * len(worst),
    ]
    for x in d["rows"]:
        c = x["cluster"]
        out.append(f"| {when(x['local_hour'])} | {x['policy']} | {c['slo_attainment_pct']:.1f} | {c['dropped_pct']:.2f} | "
                   f"{c['cost_usd_per_h']:,.0f} | " + " | ".join(f"{x['regions'][r]['slo_attainment_pct']:.1f}" for r in worst) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("runs/main"))
    ap.add_argument("--hours", type=float, nargs="+", default=[0.0, 14.0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    run_report(OUT, render, lambda: measure(args.checkpoint, args.hours, args.seeds), args.render_only)


if __name__ == "__main__":
    main()
