"""Where federation pays at the same budget: federated PPO against Local-only and
centralized PPO on the ten-region cluster env.

Each learner trains the main job's config (cluster env, constrained objective) for
`--steps` env steps with `--seeds` training seeds in one vmapped program, and is
evaluated like the main job (diurnal day, common seeds): the constrained objective's
score (trainers.eval_score: mean reward minus 10 x each region's violated share), the
mean reward, goodput per dollar, attainment, drops, and how many regions meet their
attainment target. A region the federation never trained on is unseen_region.py's.

Run at several budgets (--steps), it shows where federation pays: every budget's rows are
kept in federation.json, and federation.md, rendered from it, tabulates the best federated
learner's lead over Local-only at each.

usage: python benchmarks/federation.py [--steps 10000000] [--seeds 2] [--learners LEARNER ...] [--render-only]
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
from bench_common import SIMULATOR_CHANGE, code_commit, command_line, has_change, run_report, train_and_evaluate_seeds  # noqa: E402

from aro_jax.config import load_config  # noqa: E402
from aro_jax.envs.heuristics import HEURISTICS  # noqa: E402
from aro_jax.envs.scenarios import scenario_plan  # noqa: E402
from aro_jax.training import evaluation, trainers  # noqa: E402

OUT = Path(__file__).with_name("federation.json")
MAIN_JOB = "federated, personal (the main job: multi-Krum f=3, deltas, pull 0.001)"
# The learners compared, as overrides of the main job's config (default.yaml).
LEARNERS = {
    "Local-only": ["federated.mode=local"],
    # The main job itself (default.yaml): each region's own policy pulled 0.1 % of the way
    # to the multi-Krum global each round, each region sending its round's delta.
    MAIN_JOB: [],
    # The robustness study's personalised method: each region sends its model's offset from
    # the global, so the global is the robust centre of the regions' models (nearest-neighbour
    # mixing before multi-Krum), and the pull of 3 % a round fades with the learning rate.
    "federated, personal (NNM + multi-Krum f=3, offsets, pull 0.03 annealed)": [
        "federated.pre_aggregators=[nnm]", "federated.personal_mix=0.03", "federated.personal_sends=offset",
        "federated.personal_mix_anneal=true"],
    "federated, one shared policy (multi-Krum f=3)": ["federated.personal_mix=1.0"],
    "federated, one shared policy (FedAvg)": ["federated.personal_mix=1.0", "federated.aggregator=mean", "federated.num_byzantine=0"],
    # One local update per round: the deltas are one PPO update's, as centralized PPO's
    # pooled gradient is, without K updates of drift toward each region's own optimum.
    "federated, one shared policy (multi-Krum f=3), 1 local update per round": ["federated.personal_mix=1.0", "federated.local_updates=1"],
    "centralized (pooled data, one policy)": ["federated.mode=centralized"],
}
SHOWN = ("goodput_per_usd", "slo_attainment_pct", "dropped_pct", "cost_usd_per_h", "forwarded_pct")
EVAL_SEEDS = 4


# The main job's config, its objective's margins included, at the study's budget.
def config(steps: int, extra, nodes=None):
    cfg = load_config(None, [f"train.total_env_steps={steps}", "train.num_chunks=1", f"eval.num_seeds={EVAL_SEEDS}", *extra])
    if nodes is not None:
        cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, nodes=nodes))
    return cfg


REGION_SHOWN = ("slo_attainment_pct", "dropped_pct", "cost_usd_per_h")


def score_row(cfg, metrics, params) -> dict:
    """The cluster's KPIs, and each region's with its attainment target."""
    k = evaluation.cluster_kpis(metrics, cfg.env.tick_s, params)
    by_region = evaluation.region_kpis(metrics, cfg.env.tick_s, params, [n.name for n in cfg.cluster.nodes])
    regions = {n.name: {**{x: by_region[n.name][x] for x in REGION_SHOWN},
                        "target_pct": 100 * cfg.objective.target(n.traffic_mix, n.slo_target)} for n in cfg.cluster.nodes}
    return {"objective": trainers.eval_score(cfg, metrics), "reward": float(np.mean(metrics["reward"])),
            **{x: k[x] for x in SHOWN}, "targets_met": sum(r["slo_attainment_pct"] >= r["target_pct"] for r in regions.values()),
            "regions": regions}


def same_budget(steps: int, seeds: int, learners: list[str]) -> dict:
    out = {}
    for label in learners:
        extra = LEARNERS[label]
        cfg = config(steps, extra)
        by_scenario, train_s = train_and_evaluate_seeds(cfg, seeds)
        per_seed = by_scenario[cfg.eval.scenario]
        params = scenario_plan(cfg, cfg.eval.scenario).params
        rows = [score_row(cfg, m, params) for m in per_seed]
        out[label] = {"rows": rows, "train_s": train_s}
        print(label, rows, f"{train_s:.0f} s", flush=True)
    cfg = config(steps, [])
    params, ticks, _ = scenario_plan(cfg, cfg.eval.scenario)
    env, eparams = evaluation.eval_env(cfg, params)
    m = evaluation.run_episodes(env, HEURISTICS["reactive+tier"](cfg.env.tick_s), eparams, jax.random.PRNGKey(0), cfg.eval.num_seeds, ticks)
    out["Reactive + tier"] = {"rows": [score_row(cfg, m, params)], "train_s": 0.0}
    return out


def measure(steps: int, seeds: int, learners: list[str]) -> dict:
    """A run at one budget and number of training seeds, added to those federation.json
    already holds (with the same objective and evaluation); at the same budget and seeds,
    the learners not run again keep their rows."""
    objective = dataclasses.asdict(config(steps, []).objective)
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    same = old.get("objective") == objective and old.get("eval_seeds") == EVAL_SEEDS
    # Budgets measured on an earlier simulator are set aside, not mixed with new rows.
    current = [b for b in (old["budgets"] if same else []) if all(has_change(c, SIMULATOR_CHANGE) for c in b["commits"])]
    dropped = len(old["budgets"]) - len(current) if same else 0
    # The file at this commit holds them (and names in its own set_aside any set aside before).
    aside = {"budgets": dropped, "commit": code_commit().removesuffix("-dirty")} if dropped else old.get("set_aside")
    budgets = {(b["steps"], b["seeds"]): b for b in current}
    kept = budgets.get((steps, seeds), {"same_budget": {}, "commands": [], "commits": []})
    rows = same_budget(steps, seeds, learners)
    budgets[steps, seeds] = {"steps": steps, "seeds": seeds, "same_budget": {**kept["same_budget"], **rows},
                             "commands": [*kept["commands"], command_line()], "commits": sorted({*kept["commits"], code_commit()})}
    return {"eval_seeds": EVAL_SEEDS, "objective": objective, "budgets": [budgets[k] for k in sorted(budgets)],
            **({"set_aside": aside} if aside else {})}


def _fmt(xs, digits=2):
    xs = np.asarray(xs, float)
    return f"{xs.mean():.{digits}f}" + (f" ± {xs.std(ddof=1):.{digits}f}" if len(xs) > 1 else "")


def objectives(entry: dict) -> np.ndarray:
    """A learner's objective per training seed."""
    return np.array([row["objective"] for row in entry["rows"]])


def lead(sb: dict) -> tuple[str, float, float] | None:
    """The best federated learner on the objective, its mean lead over Local-only, and the
    larger of the two rows' standard deviations over training seeds."""
    scores = {k: objectives(v) for k, v in sb.items()}
    fed = [k for k in sb if k.startswith("federated")]
    if not fed or "Local-only" not in sb:
        return None
    best = max(fed, key=lambda k: scores[k].mean())
    noise = max(float(scores[k].std(ddof=1)) if len(scores[k]) > 1 else 0.0 for k in (best, "Local-only"))
    return best, float(scores[best].mean() - scores["Local-only"].mean()), noise


def verdict(sb: dict) -> list[str]:
    """The same-budget aim, checked on the table: the best federated learner's mean
    objective against Local-only's, and whether the seeds resolve the gap."""
    if (found := lead(sb)) is None:
        return []
    best, gap, noise = found
    ours, local = (objectives(sb[k]).mean() for k in (best, "Local-only"))
    return ["", f"Best federated learner on the objective: **{best}** ({ours:.3f}) against Local-only's "
            f"{local:.3f}. Aim (the best federated method >= Local-only at the same budget): "
            + (f"**not shown**: {'ahead' if gap >= 0 else 'behind'} by {gap:+.3f}, inside the spread between training seeds "
               f"(standard deviation up to {noise:.3f}), not a difference these seeds resolve."
               if abs(gap) < noise else f"**{'met' if gap >= 0 else 'not met'}**."), ""]


def margins(d: dict) -> str:
    """How far inside the limits training aimed (the recorded objective; none before it was recorded)."""
    o = d.get("objective") or {"slo_margin": 0.0, "drop_margin": 0.0}
    if not (o["slo_margin"] or o["drop_margin"]):
        return "; trained to the limits themselves"
    return (f"; trained {100 * o['slo_margin']:g} points above each attainment target and {100 * o['drop_margin']:g} "
            "point under the drop bound, as the main job is")


def budget_table(b: dict) -> list[str]:
    """One budget's rows and its verdict."""
    lines = ["| learner | objective | reward | goodput/$ | attainment (%) | dropped (%) | cost ($/h) | forwarded (%) | targets met (of 10) | train (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    sb = b["same_budget"]
    order = [k for k in LEARNERS if k in sb] + [k for k in sb if k not in LEARNERS]  # the heuristic last
    for label, r in ((k, sb[k]) for k in order):
        col = lambda k: [row[k] for row in r["rows"]]  # noqa: E731
        lines.append(f"| {label} | {_fmt(col('objective'), 3)} | {_fmt(col('reward'), 3)} | {_fmt(col('goodput_per_usd'), 0)} | "
                     f"{_fmt(col('slo_attainment_pct'), 1)} | {_fmt(col('dropped_pct'), 2)} | {_fmt(col('cost_usd_per_h'), 0)} | "
                     f"{_fmt(col('forwarded_pct'), 1)} | {_fmt(col('targets_met'), 1)} | {r['train_s']:.0f} |")
    return lines + verdict(sb)


def region_table(b: dict) -> list[str]:
    """Where the best federated learner's lead comes from: each region's attainment and cost
    against Local-only's (means over training seeds; rows that recorded regions only)."""
    found = lead(b["same_budget"])
    if found is None or not all("regions" in row for k in (found[0], "Local-only") for row in b["same_budget"][k]["rows"]):
        return []
    best = found[0]
    mean = lambda k, region, x: np.mean([row["regions"][region][x] for row in b["same_budget"][k]["rows"]])  # noqa: E731
    first = b["same_budget"][best]["rows"][0]["regions"]
    lines = [f"Per region, {best} against Local-only (means over training seeds; *at target*: seeds whose attainment meets the "
             "region's target):", "",
             "| region | target (%) | attainment (%) | Local-only | at target | Local-only | cost ($/h) | Local-only | dropped (%) | Local-only |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for region, r in first.items():
        hits = lambda k: sum(row["regions"][region]["slo_attainment_pct"] >= row["regions"][region]["target_pct"]  # noqa: E731
                             for row in b["same_budget"][k]["rows"])
        lines.append(f"| {region} | {r['target_pct']:.0f} | {mean(best, region, 'slo_attainment_pct'):.1f} | "
                     f"{mean('Local-only', region, 'slo_attainment_pct'):.1f} | {hits(best)}/{b['seeds']} | {hits('Local-only')}/{b['seeds']} | "
                     f"{mean(best, region, 'cost_usd_per_h'):.0f} | {mean('Local-only', region, 'cost_usd_per_h'):.0f} | "
                     f"{mean(best, region, 'dropped_pct'):.2f} | {mean('Local-only', region, 'dropped_pct'):.2f} |")
    return lines


def budget_section(b: dict) -> list[str]:
    regions = region_table(b)
    return [f"## {b['steps'] / 1e6:g}M env steps, {b['seeds']} training seeds", "",
            "Commands: " + ", then ".join(f"`{c}`" for c in b["commands"]) + f"; code at commit {', '.join(b['commits'])}.", "",
            *budget_table(b), *([*regions, ""] if regions else [])]


def summary(d: dict) -> list[str]:
    """Per budget, the best federated learner's lead over Local-only: where federation pays."""
    lines = ["| budget | training seeds | best federated learner | lead over Local-only | standard error | seeds' spread (sd) | "
             "the main job's federation's lead |", "|---|---|---|---|---|---|---|"]
    for b in d["budgets"]:
        if (found := lead(b["same_budget"])) is not None:
            best, gap, noise = found
            mean = lambda k: objectives(b["same_budget"][k]).mean()  # noqa: E731
            se = np.sqrt(sum(objectives(b["same_budget"][k]).var(ddof=1) / b["seeds"]
                             for k in (best, "Local-only"))) if b["seeds"] > 1 else float("nan")
            own = f"{mean(MAIN_JOB) - mean('Local-only'):+.3f}" if MAIN_JOB in b["same_budget"] else "not run"
            lines.append(f"| {b['steps'] / 1e6:g}M | {b['seeds']} | {best} | {gap:+.3f} | {se:.3f} | {noise:.3f} | {own} |")
    return lines


def render(d: dict) -> str:
    lines = ["# Where federation pays", "",
             f"Machine: {d['machine']}; the last command took {d['wall_s'] / 60:.0f} min. Each budget's commands and code commits are under it.", "",
             "Every learner trains the main job's config (cluster env, constrained objective: chat regions 90 % attainment, code 60 %, "
             f"<= 1 % dropped, quality >= 0.98{margins(d)}) for the budget's env steps, its learning-rate schedule over the whole "
             f"budget, and is evaluated on the diurnal day ({d['eval_seeds']} evaluation seeds, common to every row). *objective*: "
             "the constrained objective's score (mean reward per tick minus 10 x each region's violated share, arrival-weighted; "
             "higher is better). Mean ± standard deviation over training seeds. *lead*: the best federated learner's mean objective "
             "minus Local-only's at the same budget; *standard error*: the lead's, over training seeds; the aim reads met when "
             "the lead is positive and larger than either row's standard deviation; *the main job's federation's lead*: the same "
             "for the main job's own federated learner.", "", *summary(d), ""]
    if aside := d.get("set_aside"):
        lines += [f"{aside['budgets']} earlier budgets were measured before the simulator's change at commit {SIMULATOR_CHANGE} "
                  f"and are set aside: `git show {aside['commit']}:benchmarks/federation.json` holds them.", ""]
    for b in d["budgets"]:
        lines += budget_section(b) + [""]
    return "\n".join(lines).rstrip() + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10_000_000)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--learners", nargs="*", default=list(LEARNERS), choices=list(LEARNERS), metavar="LEARNER",
                    help="a subset of the learners (the others' rows in federation.json are kept)")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    run_report(OUT, render, lambda: measure(args.steps, args.seeds, args.learners), args.render_only)


if __name__ == "__main__":
    main()
