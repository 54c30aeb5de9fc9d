"""The main job and variants of it (other overrides of the default config, one training
seed each): which regions meet their attainment targets on each day of the training
week and over the week (the window the constraints are averaged over), with their
dropped share, and each region's Lagrange multipliers at the end of training.
Renders benchmarks/main_job_variants.md from main_job_variants.json.

usage: python benchmarks/main_job_variants.py --variant NAME "OVERRIDE ..." [--variant ...]
       python benchmarks/main_job_variants.py --from NAME=RUN_DIR "OVERRIDE ..."   (collect a finished `aro train` run)
       python benchmarks/main_job_variants.py --render-only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import code_commit, machine, write_report  # noqa: E402
from main_job import OVERLOAD_SCENARIO, overload, week_by_region  # noqa: E402

OUT = Path(__file__).parent / "main_job_variants.json"
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def final_multipliers(run_dir: Path) -> list[list[float]]:
    """Each region's Lagrange multipliers in the run's last checkpoint, (regions, constraints)."""
    import jax
    import numpy as np

    from aro_jax.training import checkpointing, trainers

    cfg = checkpointing.load_run_config(run_dir)
    trainer, hp = trainers.make_trainer(cfg), trainers.hyperparams(cfg)
    abstract = jax.eval_shape(trainer.init, jax.random.PRNGKey(0), hp)
    state, _, _ = checkpointing.restore(run_dir, abstract, jax.eval_shape(lambda: hp))
    return np.asarray(state.nodes.constraint.multipliers).tolist()


def collect(name: str, overrides: str, run_dir: Path, train_s: float | None) -> dict:
    from aro_jax.training.checkpointing import load_run_config

    cfg = load_run_config(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = [r for r in records if r.get("event") == "train"][-1]
    o = cfg.objective
    return {
        "name": name,
        "command": f"aro train {overrides}".strip(),
        "train_s": train_s,
        "commit": code_commit(),
        "slo_margin": o.slo_margin,
        "drop_margin": o.drop_margin,
        "max_drop": o.max_drop,
        "targets": {n.name: o.target(n.traffic_mix, n.slo_target) for n in cfg.cluster.nodes},
        "train_cost_usd_per_h": final["cost_usd_per_h"],
        "final_multipliers": final_multipliers(run_dir),
        "week": week_by_region(run_dir),
        "overload": overload(run_dir, baselines=(), ceiling=False)["policies"]["learned"],
    }


def counts(v: dict) -> dict:
    """Regions meeting their targets on Monday and over the week; those over the drop bound."""
    targets, week = v["targets"], v["week"]
    return {"regions": len(targets),
            "monday": sum(week[r]["attainment_pct_by_day"][0] >= 100 * t for r, t in targets.items()),
            "week": sum(week[r]["attainment_pct"] >= 100 * t for r, t in targets.items()),
            "drops_over": [r for r in targets if week[r]["dropped_pct"] > 100 * v["max_drop"]]}


def render(data: dict) -> str:
    out = [
        "# The main job and its variants, day by day over the training week",
        "",
        f"Machine: {data['machine']}. Each variant is the main job's `aro train` with the overrides shown (one training seed, "
        "30M env steps), evaluated like the main job but over the whole week from Monday 00:00 UTC (the window its constraints "
        "average over), 2 evaluation seeds, the regions coupled in the cluster env. Attainment counts drops and rejects as misses. "
        "A cell is bold where the region meets its target that day. *met*: regions at or above target (Monday; the week); "
        "*drops over*: regions whose week's dropped share is over `objective.max_drop`. A run collected with `--from` may have been "
        "trained at an earlier commit; the config it resolved to is in its `config.yaml`.",
        "",
    ]
    out += ["| variant | met on Monday | met over the week | drops over the bound | training cost ($/h per region) |", "|---|---|---|---|---|"]
    for v in data["variants"]:
        c = counts(v)
        out.append(f"| {v['name']} | {c['monday']} of {c['regions']} | {c['week']} of {c['regions']} | {len(c['drops_over'])} | {v['train_cost_usd_per_h']:.1f} |")
    out.append("")
    heavy = [v for v in data["variants"] if "overload" in v]
    summary = Path(__file__).parent / "main_job" / "summary.json"
    if heavy and summary.is_file():  # the main job's own figures, for comparison
        main = json.loads(summary.read_text())
        heavy = [{"name": f"the main job (`{main['command']}`, main_job/summary.json)", "overload": main["overload"]["policies"]["learned"]}, *heavy]
    if heavy:
        out += [f"On the held-out {OVERLOAD_SCENARIO} (5x demand for 30 min, heavier than anything trained on; the main job's "
                "evaluation seeds, one day), for the variants collected with it. *At the limit*: the region-ticks at their replica "
                "limit, the shares of their arrivals forwarded and dropped and the quality served.", "",
                "| variant | attainment (%) | dropped (%) | worst region's dropped (%) | at the limit: forwarded / dropped (%) / quality | cost ($/h) |",
                "|---|---|---|---|---|---|"]
        for v in heavy:
            o = v["overload"]
            out.append(f"| {v['name']} | {o['slo_attainment_pct']:.1f} | {o['dropped_pct']:.2f} | {o['worst_drop_pct']:.2f} ({o['worst_drop_region']}) "
                       f"| {o['at_max_forwarded_pct']:.1f} / {o['at_max_dropped_pct']:.1f} / {o['at_max_quality']:.3f} | {o['cost_usd_per_h']:,.0f} |")
        out.append("")
    for v in data["variants"]:
        targets, week = v["targets"], v["week"]
        c = counts(v)
        met_mon, met_week, over = c["monday"], c["week"], c["drops_over"]
        out += [
            f"## {v['name']}",
            "",
            f"`{v['command']}`; collected at commit {v['commit']}"
            + (f"; {v['train_s'] / 60:.1f} min of training" if v.get("train_s") else "")
            + f"; training cost {v['train_cost_usd_per_h']:.1f} $/h per region (last chunk's rollouts). "
            f"Met: **{met_mon} of {len(targets)}** on Monday, **{met_week} of {len(targets)}** over the week; "
            f"drops over the bound: {len(over)}" + (f" ({', '.join(over)})" if over else "") + ".",
            "",
            "| region | target (%) | " + " | ".join(DAYS) + " | week | dropped (%) | miss multiplier | drop multiplier |",
            "|---" * (len(DAYS) + 6) + "|",
        ]
        for (region, target), lam in zip(targets.items(), v["final_multipliers"], strict=True):
            w = week[region]
            cell = lambda x: f"**{x:.1f}**" if x >= 100 * target else f"{x:.1f}"  # noqa: E731, B023
            out.append(f"| {region} | {100 * target:.0f} | " + " | ".join(cell(x) for x in w["attainment_pct_by_day"])
                       + f" | {cell(w['attainment_pct'])} | {w['dropped_pct']:.2f} | {lam[0]:.2f} | {lam[1]:.2f} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "OVERRIDES"), help="train and collect")
    ap.add_argument("--from", dest="runs", nargs=2, action="append", default=[], metavar=("NAME=RUN_DIR", "OVERRIDES"),
                    help="collect a finished `aro train` run made with these overrides")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if args.render_only:
        write_report(OUT, None, render)
        return
    data = json.loads(OUT.read_text()) if OUT.is_file() else {"variants": []}
    new = []
    for spec, overrides in args.runs:
        name, run_dir = spec.split("=", 1)
        new.append(collect(name, overrides, Path(run_dir), None))
    for name, overrides in args.variant:
        run_dir = Path(tempfile.mkdtemp(prefix="aro-variant-")) / "run"
        t0 = time.perf_counter()
        subprocess.run(["aro", "train", *overrides.split(), f"train.run_dir={run_dir}"], check=True)
        new.append(collect(name, overrides, run_dir, time.perf_counter() - t0))
    names = {v["name"] for v in new}
    data["variants"] = [v for v in data["variants"] if v["name"] not in names] + new
    data["machine"] = machine()
    write_report(OUT, data, render)
    print(OUT.with_suffix(".md").read_text())


if __name__ == "__main__":
    sys.exit(main())
