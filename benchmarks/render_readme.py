"""Render the README's results section from the JSON the benchmark runs wrote.

Every figure between `<!-- BEGIN results -->` and `<!-- END results -->` in README.md
comes from a file under benchmarks/ (named next to it); nothing there is typed by hand.
Run it after any benchmark: `python benchmarks/render_readme.py` (`--check` exits 1 when
the README is out of date, for CI).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
B = ROOT / "benchmarks"
BEGIN, END = "<!-- BEGIN results -->", "<!-- END results -->"


def same_setting(a, b, section: str) -> bool:
    """Whether two recorded runs used the same config `section`; a key that one record
    predates counts at its default."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return a == b
    import dataclasses

    from aro_jax.config import ExperimentConfig

    default = dataclasses.asdict(ExperimentConfig()).get("env" if section == "training_env" else section, {})  # training_env: env keys
    return all(a.get(k, default.get(k)) == b.get(k, default.get(k)) for k in a.keys() | b.keys())


def load(rel: str):
    return json.loads((B / rel).read_text())


def pct(new: float, ref: float) -> str:
    change = 100.0 * (new - ref) / ref
    return f"{change:+.1f} %" if abs(change) < 1 else f"{change:+.0f} %"


def num(x: float, digits: int = 3) -> str:
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.0f}k"


def targets_met(regions: dict, targets: dict, policy: str) -> list[str]:
    """The regions where `policy` reaches its attainment target."""
    return [r for r, t in targets.items() if regions[f"{r} / {policy}"]["slo_attainment_pct"] >= 100 * t]


def missed_regions(regions: dict, targets: dict, policy: str, met: list) -> str:
    """' (not in A, B; n of them within 1 point of it)' for the regions below target."""
    missed = [r for r in targets if r not in met]
    if not missed:
        return ""
    near = len(near_target(regions, targets, policy))
    return f" (not in {', '.join(missed)}" + (f"; {near} of them within 1 point of it)" if near else "; none within 1 point of it)")


def near_target(regions: dict, targets: dict, policy: str) -> list[str]:
    """The regions where `policy` misses its target by at most one point."""
    return [r for r, t in targets.items() if 100 * t - 1 <= regions[f"{r} / {policy}"]["slo_attainment_pct"] < 100 * t]


def by_workload(regions: dict, mix: dict, policy: str, key: str) -> dict[str, float]:
    """Mean of a per-region KPI over each workload's regions."""
    out = {}
    for m in sorted(set(mix.values())):
        out[m] = float(np.mean([regions[f"{r} / {policy}"][key] for r, rm in mix.items() if rm == m]))
    return out


def main_job() -> list[str]:
    rows = load("main_job/kpis_diurnal.json")["rows"]
    regions = load("main_job/kpis_diurnal_regions.json")["rows"]
    s = load("main_job/summary.json")
    learned = next(k for k in rows if k.startswith("ppo"))
    ppo = rows[learned]
    cols = [("goodput_per_usd", "goodput / $ (req/$)"), ("goodput_rps", "goodput (req/s)"), ("slo_attainment_pct", "SLO attainment (%)"),
            ("e2e_mean_all_ms", "mean e2e, all arrivals (ms)"), ("e2e_p95_ms", "p95 e2e, served (ms)"), ("dropped_pct", "dropped (%)"),
            ("rejected_pct", "rejected (%)"), ("forwarded_pct", "forwarded (%)"), ("served_for_peers_rps", "served for peers (req/s)"),
            ("replicas", "replicas / region"),
            ("cost_usd_per_h", "cost ($/h)"), ("quality", "quality")]
    wall = f"{s['wall_s'] / 60:.1f} min wall clock in all, " if s.get("wall_s") else ""
    out = [
        f"The main job (`{s['command']}`; {s['machine']}; code at commit {s.get('commit', 'unknown')}): {wall}{s['train_s'] / 60:.1f} min of training "
        f"({s['env_steps'] / 1e6:.1f}M env steps at {rate(s['env_steps_per_s'])} env steps/s), then the evaluation: "
        "one simulated day from Monday 00:00 UTC, 8 seeds x 10 regions, the same seeds for every policy"
        + (", the regions coupled in the cluster env as in training (forwarded requests served by the peers at their load and price)"
           if s.get("env_kind") == "cluster" else ", each region alone with its modelled peer") + "; headline figures "
        "count every arrival (a drop or a reject is a miss) and percentiles are of the day's pooled requests "
        "([`kpis_diurnal.md`](benchmarks/main_job/kpis_diurnal.md), per region "
        "[`kpis_diurnal_regions.md`](benchmarks/main_job/kpis_diurnal_regions.md), "
        "[`summary.json`](benchmarks/main_job/summary.json)):",
        "",
        "| policy | " + " | ".join(c[1] for c in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, r in rows.items():
        label = f"**{name}**" if name == learned else name
        out.append(f"| {label} | " + " | ".join(num(r[k]) for k, _ in cols) + " |")
    cfg = s.get("objective") or {"kind": "paper"}
    targets = s.get("region_targets") or {}
    text = ""
    if cfg["kind"] == "slo" and targets:
        mix_targets = {m: t for m, t in (cfg.get("slo_targets") or {}).items() if m not in targets}
        region_mix = s.get("region_mix") or {}
        own = {r: t for r, t in targets.items() if abs(t - mix_targets.get(region_mix.get(r), cfg["slo_target"])) > 1e-9}
        per_mix = "; ".join(x for x in (", ".join(f"{m} {100 * t:.0f} %" for m, t in mix_targets.items()),
                                        "per deployment " + ", ".join(f"{r} {100 * t:.0f} %" for r, t in own.items()) if own else "") if x)
        met = targets_met(regions, targets, learned)
        drop_ok = ppo["dropped_pct"] <= 100 * cfg["max_drop"]
        drops_over = [r for r in targets if regions[f"{r} / {learned}"]["dropped_pct"] > 100 * cfg["max_drop"]]
        quality_ok = ppo["quality"] >= cfg.get("min_quality", 0.0)
        text += (f"The policy is trained on the operator's objective (`objective.kind: slo`): the cheapest allocation whose "
                 f"regions meet their SLO attainment targets ({100 * cfg['slo_target']:.0f} %" + (f"; per workload {per_mix}" if per_mix else "")
                 + f"), with at most {100 * cfg['max_drop']:g} % dropped and served quality >= {cfg.get('min_quality', 0):g} of the large "
                 f"model's. On the training day it meets its target in **{len(met)} of {len(targets)} regions**"
                 + missed_regions(regions, targets, learned, met)
                 + f"; drops {ppo['dropped_pct']:.3g} % ({'within' if drop_ok else '**over**'} the bound cluster-wide"
                 + (f"; **over** it in {len(drops_over)} region{'s' if len(drops_over) > 1 else ''}: " + ", ".join(f"{r} {regions[f'{r} / {learned}']['dropped_pct']:.2f} %" for r in drops_over)
                    if drops_over else "; within it in every region")
                 + f"), quality {ppo['quality']:.3f} "
                 f"({'within' if quality_ok else '**under**'} the bound). Baselines meeting their targets: "
                 + ", ".join(f"{name} {len(targets_met(regions, targets, name))}/{len(targets)}" for name in rows if name != learned) + ". ")
        week = s.get("week")
        if week:  # the window the constraints are trained on
            met_week = [r for r, t in targets.items() if week[r]["attainment_pct"] >= 100 * t]
            over_drop = [r for r in targets if week[r]["dropped_pct"] > 100 * cfg["max_drop"]]
            worst = min(targets, key=lambda r: min(week[r]["attainment_pct_by_day"]) - 100 * targets[r])
            text += (f"Over the whole training week from the same Monday (the window its constraints average over; 2 seeds; "
                     f"`summary.json` \"week\") it meets its target in **{len(met_week)} of {len(targets)} regions**"
                     + (f" (not in {', '.join(r for r in targets if r not in met_week)})" if len(met_week) < len(targets) else "")
                     + f", drops over the bound in {len(over_drop)}"
                     + (" (" + ", ".join(f"{r} {week[r]['dropped_pct']:.2f} %" for r in over_drop) + ")" if over_drop else "")
                     + f"; its worst region-day is {worst} at "
                     f"{min(week[worst]['attainment_pct_by_day']):.1f} % against {100 * targets[worst]:.0f} %. ")
            if all("resizes_reversed_pct" in week[r] for r in targets):  # churn: a CPU or memory move undone on the next tick
                churn = sorted(targets, key=lambda r: week[r]["resizes_reversed_pct"])
                text += (f"It undoes a CPU or memory move on the next tick on {week[churn[len(churn) // 2]]['resizes_reversed_pct']:.1f} % "
                         f"of a region's tick pairs (median over regions; most in {churn[-1]}, "
                         f"{week[churn[-1]]['resizes_reversed_pct']:.1f} %). ")
    over = s.get("overload")
    overload_table = []
    if over:  # a held-out scenario heavier than training: scale out, or drop?
        text += (f"Overload: the held-out {over['scenario']} scenario (5x demand for 30 min, heavier than anything trained on; "
                 "`summary.json` \"overload\"), in the table below. ")
        at_limit = lambda v: (f"{v['at_max_forwarded_pct']:.1f} / {v['at_max_dropped_pct']:.1f} / {v['at_max_quality']:.3f}"  # noqa: E731
                              if "at_max_forwarded_pct" in v and v["at_max_pct"] > 0 else "-")
        overload_table = [
            "", f"Overload ({over['scenario']}):", "",
            "| policy | attainment (%) | dropped (%) | most dropped in | replicas / region | region-ticks at the replica limit (%) "
            "| at the limit: forwarded / dropped (% of its arrivals) / quality | cost ($/h) |",
            "|---|---|---|---|---|---|---|---|",
            *(f"| {n} | {v['slo_attainment_pct']:.1f} | {v['dropped_pct']:.2f} | {v['worst_drop_region']} {v['worst_drop_pct']:.2f} % | "
              f"{v['replicas_mean']:.2f} | {v['at_max_pct']:.1f} | {at_limit(v)} | {v['cost_usd_per_h']:.0f} |" for n, v in over["policies"].items()),
        ]
        ceiling = next((v for n, v in over["policies"].items() if n.startswith("capacity ceiling")), None)
        if ceiling and "learned" in over["policies"]:
            v = over["policies"]["learned"]
            overload_table += ["", f"The capacity ceiling (every region at its replica limit all day) still drops {ceiling['dropped_pct']:.2f} %: "
                               f"that much the replica limits force on this crowd. The learned policy drops {v['dropped_pct']:.2f} %, "
                               f"{abs(v['dropped_pct'] - ceiling['dropped_pct']):.2f} points "
                               f"{'above' if v['dropped_pct'] > ceiling['dropped_pct'] else 'below'} it, at "
                               f"{100 * v['cost_usd_per_h'] / ceiling['cost_usd_per_h']:.0f} % of its cost; at the limit it serves "
                               f"{'none' if v['at_max_quality'] >= 0.9995 else 'part'} of the crowd with the small model."]
    mix = s.get("region_mix") or {}
    if mix and "reactive+tier" in rows:
        rep_l, rep_r = (by_workload(regions, mix, p, "replicas") for p in (learned, "reactive+tier"))
        att_l, att_r = (by_workload(regions, mix, p, "slo_attainment_pct") for p in (learned, "reactive+tier"))
        text += ("Where the difference comes from, per workload (mean over its regions, learned against Reactive + tier): "
                 + "; ".join(f"{m}: {num(rep_l[m])} against {num(rep_r[m])} replicas, {att_l[m]:.1f} % against {att_r[m]:.1f} % attainment"
                             for m in rep_l) + ". ")
    for ref in ("reactive+tier", "reactive", "reactive+spill+tier", "predictive+spill+tier"):
        if ref in rows:
            r = rows[ref]
            text += (f"Against {ref.replace('+', ' + ')}: goodput per dollar {pct(ppo['goodput_per_usd'], r['goodput_per_usd'])}, "
                     f"SLO attainment {ppo['slo_attainment_pct'] - r['slo_attainment_pct']:+.1f} points, cost {pct(ppo['cost_usd_per_h'], r['cost_usd_per_h'])}, "
                     f"replicas per region {num(ppo['replicas'])} against {num(r['replicas'])}, quality {ppo['quality']:.3f} against {r['quality']:.3f}. ")
    seeds_match = (B / "main_job_seeds.json").is_file() and all(same_setting(load("main_job_seeds.json").get(k), s.get(k), k)
                                                                 for k in ("env_kind", "training_env", "ppo", "objective", "federated"))
    if seeds_match:  # the spread of the main job's own config only
        d = load("main_job_seeds.json")
        v = {k: np.array([r[k] for r in d["rows"]]) for k in ("goodput_per_usd", "slo_attainment_pct", "dropped_pct", "cost_usd_per_h")}
        rt = d["reactive_tier"]
        text += (f"Over {len(d['rows'])} training seeds ([`benchmarks/main_job_seeds.md`](benchmarks/main_job_seeds.md), mean ± sd): "
                 f"goodput per dollar {num(v['goodput_per_usd'].mean())} ± {num(v['goodput_per_usd'].std(ddof=1))}, attainment "
                 f"{v['slo_attainment_pct'].mean():.1f} ± {v['slo_attainment_pct'].std(ddof=1):.1f} %, drops {v['dropped_pct'].mean():.2f} ± "
                 f"{v['dropped_pct'].std(ddof=1):.2f} %, cost {num(v['cost_usd_per_h'].mean())} ± {num(v['cost_usd_per_h'].std(ddof=1))} $/h "
                 f"(Reactive + tier: {num(rt['goodput_per_usd'])}, {rt['slo_attainment_pct']:.1f} %, {rt['dropped_pct']:.2f} %, "
                 f"{num(rt['cost_usd_per_h'])} $/h)"
                 + (f"; regions at their attainment target per seed: {', '.join(str(r['targets_met']) for r in d['rows'])} of "
                    f"{d['rows'][0]['regions']}, over the drop bound: {', '.join(str(r['drops_over']) for r in d['rows'])}"
                    if all("targets_met" in r for r in d["rows"]) else "") + ". ")
        for h, rt_h in d.get("reactive_tier_held_out", {}).items():  # where the seeds part ways
            seeds_h = [r["held_out"][h] for r in d["rows"]]
            attained = ", ".join(f"{o['slo_attainment_pct']:.1f}" for o in seeds_h)
            dropped = ", ".join(f"{o['dropped_pct']:.2f}" for o in seeds_h)
            text += (f"On the held-out {h} the seeds reach {attained} % attainment with {dropped} % dropped (Reactive + tier "
                     f"{rt_h['slo_attainment_pct']:.1f} %, {rt_h['dropped_pct']:.2f} %). ")
        outside = [f"{'below' if ppo[key] < v[key].min() else 'above'} every one of these seeds in {what.format(ppo[key])}"
                   for key, what in (("slo_attainment_pct", "attainment ({:.1f} %)"), ("goodput_per_usd", "goodput per dollar ({:,.0f})"))
                   if not v[key].min() <= ppo[key] <= v[key].max()]
        if outside:  # the headline run is not a typical seed: say so
            text += (f"The run above lies {' and '.join(outside)} (they were trained in one vmapped program, which need not be "
                     "bit-equal to the driver's chunked run). ")
    out += [
        "",
        text + "Every baseline also runs with the quality-tier rule (`+tier`, thresholds tuned once on the training scenario: "
        "[`benchmarks/tier_thresholds.md`](benchmarks/tier_thresholds.md)), so the small model is a lever for all of them, and the "
        "autoscalers also with spill-over routing (`+spill`: forward the load above a share of capacity to peers before scaling, "
        "and size the region for what it keeps; the share tuned once: [`benchmarks/spill_threshold.md`](benchmarks/spill_threshold.md)), "
        "so forwarding below the replica limit is a lever for them too (without it they forward only at the limit). "
        "The same seeds give the same table on one machine; another CPU need not give bit-equal training.",
        *overload_table,
        "",
        "![learning curve](benchmarks/main_job/learning_curve.png)",
        "![one day of one region](benchmarks/main_job/timeline_diurnal.png)",
        *stale_studies(),
    ]
    return out


CLUSTER_STUDIES = {"federation.json": "federation", "unseen_region.json": "unseen_region", "robustness_curve.json": "robustness",
                   "robustness_runs": "robustness", "pareto.json": "pareto", "main_job_variants.json": "main_job_variants",
                   "token_shift.json": "token_shift", "privacy_utility.json": "privacy_utility", "random_fleet.json": "random_fleet",
                   "paper_table.json": "paper_table"}


def recorded_commits(tree) -> set[str]:
    """Every "commit" (and "commits" list) a study's JSON records, "-dirty" marks dropped."""
    if isinstance(tree, dict):
        return {c for k, v in tree.items() if k != "set_aside"  # where runs set aside are kept, not a run's code
                for c in ({v.removesuffix("-dirty")} if k == "commit" and isinstance(v, str)
                          else {x.removesuffix("-dirty") for x in v} if k == "commits" else recorded_commits(v))}
    return {c for v in tree for c in recorded_commits(v)} if isinstance(tree, list) else set()


# Studies of the simulator's results beyond the cluster-env training studies.
SIMULATOR_STUDIES = {**CLUSTER_STUDIES, "smooth_shift.json": "smooth_shift", "pareto_tier.json": "pareto_tier",
                     "spill_threshold.json": "spill_threshold", "tier_thresholds.json": "tier_thresholds",
                     "trace_clock.json": "trace_clock", "heterogeneity.json": "heterogeneity"}


def predating(change: str, studies: dict[str, str], unrecorded: bool) -> list[str]:
    """The `studies` with a run recorded at code before the commit `change` (and, where
    `unrecorded`, those that record no commit, so cannot show they are after it)."""
    sys.path.insert(0, str(B))
    from bench_common import has_change

    stale = []
    for rel, md in studies.items():
        path = B / rel
        files = sorted(path.glob("*.json")) if path.is_dir() else [path] if path.is_file() else []
        if not files:
            continue
        commits = set().union(*(recorded_commits(json.loads(f.read_text())) for f in files))
        if (not all(has_change(c, change) for c in commits) if commits else unrecorded) and md not in stale:
            stale.append(md)
    return stale


def stale_studies() -> list[str]:
    """The studies with runs recorded before on-policy rollouts or before the simulator's
    last change: named, so no reader compares them with the main job as if they were
    measured alike."""
    sys.path.insert(0, str(B))
    from bench_common import ON_POLICY_ROLLOUTS, SIMULATOR_CHANGE

    links = lambda names: ", ".join(f"[`{m}.md`](benchmarks/{m}.md)" for m in names)  # noqa: E731
    out = []
    off_policy = predating(ON_POLICY_ROLLOUTS, CLUSTER_STUDIES, unrecorded=False)
    if off_policy:
        out += ["", f"Trained before on-policy rollouts: in the studies {links(off_policy)} some or all runs predate commit "
                f"{ON_POLICY_ROLLOUTS}, from which each local rollout of a cluster-env round acts with the latest update's policy; "
                "before it, all of a round's rollouts acted with the round's starting policy. The main job and its seeds above "
                "trained on-policy. Those studies compare their rows with one another, trained alike; their levels may move once rerun."]
    old_simulator = predating(SIMULATOR_CHANGE, SIMULATOR_STUDIES, unrecorded=True)
    if old_simulator:
        out += ["", f"Measured on an earlier simulator: {links(old_simulator)} have runs from before commit {SIMULATOR_CHANGE} "
                "(or record no commit). Before it, a replica started from host memory in about 25 s the moment memory had room "
                "for the weights (the copy now fills from storage over a cold start's load time), and the default price set "
                "billed the pods' CPU and memory on top of the GPUs (CoreWeave's GPU price covers them); see docs/simulator.md. "
                "The main job and its seeds above ran on the current simulator."]
    return out


def speed() -> list[str]:
    env = load("env_throughput.json")
    single = {r["batch"]: r for r in env["single"]}
    b4096 = single[4096]
    biggest = single[max(single)]
    sharded = max(env["sharded"], key=lambda r: r["node"]["steps_per_s"])
    train = load("train_throughput.json")["rows"]
    ratios = [r["train"]["node"]["steps_per_s"] / r["train"]["cartpole"]["steps_per_s"] for r in train]
    node_rates = [r["train"]["node"]["steps_per_s"] for r in train]
    scaling = load("scaling.json")
    fed = {r["devices"]: r for r in scaling["federated"]}
    envs = {r["clusters"]: r for r in scaling["env"]}
    return [
        f"- [`benchmarks/env_throughput.md`](benchmarks/env_throughput.md): the node env steps at {rate(b4096['node']['steps_per_s'])} "
        f"steps/s at batch 4096 ({b4096['node']['steps_per_s'] / b4096['cartpole']['steps_per_s']:.2f}x gymnax CartPole in the same run) "
        f"and {rate(biggest['node']['steps_per_s'])} at batch {max(single):,} on one XLA CPU device; "
        f"{rate(sharded['node']['steps_per_s'])} sharded over {sharded['devices']} CPU devices (batch {sharded['batch']:,}).",
        f"- [`benchmarks/train_throughput.md`](benchmarks/train_throughput.md): whole PPO training at {min(ratios):.2f}-{max(ratios):.2f}x "
        f"the same trainer on CartPole ({rate(min(node_rates))}-{rate(max(node_rates))} env steps/s for "
        f"{min(r['clusters'] for r in train)}-{max(r['clusters'] for r in train)} clusters).",
        f"- [`benchmarks/scaling.md`](benchmarks/scaling.md): the simulator alone from {rate(envs[min(envs)]['steps_per_s'])} env steps/s "
        f"with {min(envs)} cluster to {rate(envs[max(envs)]['steps_per_s'])} with {max(envs):,}; federated training "
        f"{rate(fed[1]['steps_per_s'])} env steps/s on one device and {rate(fed[2]['steps_per_s'])} "
        f"({fed[2]['steps_per_s'] / fed[1]['steps_per_s']:.2f}x) with the node axis sharded over 2 devices. Absolute rates on "
        "this shared machine move by up to 2x between runs; ratios within one run are the stable figures.",
        *agent_latency(),
        "- Model and system checks, each with its command and machine: "
        "[`fluid_agreement.md`](benchmarks/fluid_agreement.md) (fluid model against a request-level simulator), "
        "[`hardware_fit.md`](benchmarks/hardware_fit.md) (service-time fits), [`aggregation.md`](benchmarks/aggregation.md) "
        "and [`federated_overhead.md`](benchmarks/federated_overhead.md) (robust aggregation cost), "
        "[`privacy_utility.md`](benchmarks/privacy_utility.md).",
    ]


def agent_latency() -> list[str]:
    if not (B / "agent_latency.json").is_file():
        return []
    rows = load("agent_latency.json")["rows"]
    one, http = rows["Python API, 1 observation"], rows["HTTP loopback, 1 observation"]
    ka, nka = rows["HTTP, 20 clients, keep-alive"], rows["HTTP, 20 clients, new connection per request"]
    e2e = load("agent_latency.json").get("e2e")
    tail = (f"; from a Prometheus scrape to the published decision {e2e['p50_ms']:.0f} ms p50 / {e2e['p99_ms']:.0f} ms p99 "
            f"({e2e['scrape_interval']} scrapes)") if e2e else ""
    return [f"- [`benchmarks/agent_latency.md`](benchmarks/agent_latency.md): the deployment agent decides in {one['p50_ms']:.2f} ms "
            f"p50 through the Python API and {http['p50_ms']:.2f} ms over HTTP; with 20 concurrent clients it serves "
            f"{ka['throughput_rps']:,.0f} req/s with keep-alive (p99 {ka['p99_ms']:.1f} ms) and {nka['throughput_rps']:,.0f} req/s "
            f"with a new connection per request (p99 {nka['p99_ms']:.1f} ms){tail}."]


def paper() -> list[str]:
    if not (B / "paper_table.json").is_file():
        return []
    d = load("paper_table.json")
    sys.path.insert(0, str(B))
    import paper_table as pt

    on, off = d["tables"]["tier on"], d["tables"].get("tier off", {})
    out = [
        "`python benchmarks/paper_table.py --learned RUN_DIR --learned-no-tier RUN_DIR` → "
        "[`benchmarks/paper_table.md`](benchmarks/paper_table.md): the main job's policy against every heuristic with "
        "the tier available to all (each heuristic also with the tier rule) and, from a policy trained without it, with the "
        f"tier off for all; training scenario and five held-out ones, {d['eval_seeds']} evaluation seeds; code at commit "
        f"{d.get('commit', 'unknown')}. Does the learned policy beat Reactive on goodput per dollar at no worse SLO attainment?",
        "",
        "| scenario | tier on: against Reactive + tier | tier off: against Reactive |",
        "|---|---|---|",
    ]
    wins_on = wins_off = 0
    for scen in on:
        a, won_a = pt.verdict(on[scen]["rows"], "Reactive + tier")
        b, won_b = pt.verdict(off[scen]["rows"], "Reactive") if scen in off else ("-", False)
        wins_on, wins_off = wins_on + won_a, wins_off + won_b
        out.append(f"| {scen} | {a} | {b} |")
    be = d["best_effort"]["tier on"]
    loads = list(be[pt.LEARNED])
    avail = lambda name: " / ".join(f"{be[name][x]['availability_pct']:.0f}" for x in loads)  # noqa: E731
    out += [
        "",
        f"It wins in {wins_on} of {len(on)} scenarios with the tier on and {wins_off} of {len(off)} with it off. Best-effort "
        f"availability (share of region-ticks with >= 90 % of requests within SLO) at {' / '.join(loads)} load: learned "
        f"{avail(pt.LEARNED)}, Reactive + tier {avail('Reactive + tier')}, Reactive {avail('Reactive')}. The learned rows are "
        "one training seed each (intervals in the markdown are over evaluation seeds).",
    ]
    if "trace-conv" in on and not pt.verdict(on["trace-conv"]["rows"], "Reactive + tier")[1]:
        out[-1] += (" On the conversation trace the replay starts at Monday 00:00 UTC, 1-4 am local in eu-central and "
                    "me-central, where the policy holds its night fleet under daytime load; with the replay at 14:00 local in "
                    "every region it beats Reactive + tier ([`benchmarks/trace_clock.md`](benchmarks/trace_clock.md); docs/simulator.md, "
                    "*Training demand phases*).")
    return out


def robustness() -> list[str]:
    sys.path.insert(0, str(B))
    import robustness as study

    every = study.load()

    def grid(f):
        """The f grid's records (robustness.md has one per f) with the Local-only runs, and
        its cells' scores."""
        rows = [r for r in every if r["aggregator"] == "local-only" or study.in_grid(r, f)]
        by_strength = {}
        for r in rows:
            by_strength.setdefault((r["method"], r["aggregator"], r["attack"]), {}).setdefault(study.strength_key(r["strength"]), []).append(r["score"])
        # a swept cell stands at its most damaging strength (mean over seeds), as in robustness.md
        cell = {key: min(scores.values(), key=np.mean) for key, scores in by_strength.items()}
        return rows, cell

    def aim(f, rows, cell):
        """The aim as robustness.md states it (its aim_statement), on the same cells."""
        attacks = [a for a in study.ATTACKS if any(r["attack"] == a for r in rows)]
        summary = {}
        for m, a in dict.fromkeys((r["method"], r["aggregator"]) for r in rows if r["aggregator"] != "local-only"):
            attacked = {k: np.mean(cell[(m, a, k)]) for k in attacks if k != "none" and (m, a, k) in cell}
            if (m, a, "none") in cell and attacked:
                worst = min(attacked, key=attacked.get)
                summary[f"{m} {a}"] = (float(np.mean(cell[(m, a, "none")])), float(attacked[worst]), worst)
        local = cell.get(("local", "local-only", "none"))
        return study.aim_statement(summary, f, float(np.mean(local)) if local else None)

    curve = study.trained_as(study.load_curve())  # the study's own config; runs trained with --set stay in robustness.md
    versus = study.versus_local(curve)
    out = ["From the learning curves (robustness.md, *Learning curves*: the study config run to 6M env steps with on-policy "
           "rollouts, evaluated along the way). " + versus[0], *versus[1:], *study.curve_aims(curve)] if versus else []  # each aim ends in ""
    rows, cell = grid(3)
    if not rows:
        return out
    if not study.on_policy(rows):
        out += [f"The grid below ran before on-policy rollouts (commit {study.ON_POLICY_ROLLOUTS}) and on the earlier simulator "
                f"(before commit {study.SIMULATOR_CHANGE}): its rows compare with one another, trained alike, and not with the "
                "curves above.", ""]
    fed = [r for r in rows if r["aggregator"] != "local-only"]
    attacks = [a for a in study.ATTACKS if any(r["attack"] == a for r in fed)]
    strength = {a: study.strength_value(study.STRENGTHS[a][0], 3) for a in attacks}  # the first listed of each
    out += [
        "`python benchmarks/robustness.py` (the command and study config are in "
        "[`benchmarks/robustness.md`](benchmarks/robustness.md)): three of the ten regions attack from round 0, each robust "
        f"aggregator assumes f = 3, in the cluster env at a small budget (4 clusters per region; not converged); code at commit "
        f"{', '.join(sorted({r.get('commit', 'unknown') for r in rows}))}. Score: the "
        "constrained objective of the policies regions 3..9 deploy (mean reward minus 10 x each region's violated share; "
        "higher is better), mean over seeds / worst seed; a row whose attacks were swept over strengths (robustness.md) "
        "shows each at its most damaging:",
        "",
        "| method | aggregator | " + " | ".join(f"{k} ({strength[k]:g})" if k != "none" else k for k in attacks) + " |",
        "|---|---" + "|---" * len(attacks) + "|",
    ]
    for m, a in dict.fromkeys((r["method"], r["aggregator"]) for r in fed):
        out.append(f"| {m} | {a} | " + " | ".join(
            f"{np.mean(cell[(m, a, k)]):.2f} / {np.min(cell[(m, a, k)]):.2f}" if (m, a, k) in cell else "—" for k in attacks) + " |")
    local = cell.get(("local", "local-only", "none"))
    out += ["", "Methods: *shared*, one robust global policy; *personal*, each region's own policy pulled 1 % of the way to the robust "
            f"global per round (*personal-pullP*: P of the way; *personal-offsetP*: the same, each region sending its model's offset "
            f"from the global instead of its round's delta, `federated.personal_sends`; *-annealed*: the pull fades with the learning rate, `federated.personal_mix_anneal`; *-own-critics*: the value and cost critics stay each region's own, never pulled; *-own-heads*: so does the actor's output layer, `federated.personal_own`); *momentum*, the shared policy with each region sending the momentum of its deltas (beta {study.WORKER_MOMENTUM:g}, "
            "`federated.worker_momentum`).", ""]
    if local:
        out.append(f"Local-only (no federation): {np.mean(local):.2f} / {np.min(local):.2f}.")
    out += ["", aim(3, rows, cell)]
    for f in sorted({r["f"] for r in every if 0 < r["f"] != 3}):
        rows_f, cell_f = grid(f)
        out += ["", f"{f} of 10 regions Byzantine (fewer rows: robustness.md). " + aim(f, rows_f, cell_f)]
    return out


def federation() -> list[str]:
    """The lead per budget, and the largest budget's table (benchmarks/federation.py)."""
    if not (B / "federation.json").is_file():
        return []
    sys.path.insert(0, str(B))
    import federation as study

    d = json.loads((B / "federation.json").read_text())
    largest = d["budgets"][-1]
    return [f"[`benchmarks/federation.md`](benchmarks/federation.md): every learner trains the main job's config for the "
            "budget's env steps; *objective*: the constrained objective's score (higher is better). The best federated "
            "learner's lead over Local-only at each budget:", "", *study.summary(d), "",
            f"At {largest['steps'] / 1e6:g}M env steps ({largest['seeds']} training seeds; `{largest['commands'][-1]}`, code at "
            f"commit {', '.join(largest['commits'])}):", "", *study.budget_table(largest)[:-1], "",
            *main_job_federation(largest["same_budget"], study),
            "On the simulator before be56a8e, trained as the main job (30M env steps, 3 seeds, code f63f2f2), the learner "
            "sending offsets (NNM + multi-Krum, pull 0.03 annealed) dropped 12-16 % of the held-out conversation trace in "
            "every seed, against 1.0-8.9 % with the main job's federation (`configs/default.yaml` records it)."]


def main_job_federation(rows: dict, study) -> list[str]:
    """Where the main job's own federation stands among the learners of one budget."""
    main_job = study.MAIN_JOB
    if main_job not in rows:
        return []
    mean = lambda k, x: float(np.mean([r[x] for r in rows[k]["rows"]]))  # noqa: E731
    learned = [k for k in rows if k in study.LEARNERS]
    ranks = {x: 1 + sum(mean(k, x) > mean(main_job, x) for k in learned) for x in ("objective", "targets_met")}
    return [f"The main job's own federation ranks {ranks['objective']} of {len(learned)} learned rows on the objective and "
            f"{ranks['targets_met']} of {len(learned)} on targets met ({mean(main_job, 'targets_met'):.1f} of 10 on average).", ""]


def unseen_region() -> list[str]:
    """Per held-out region: the zero-shot verdict and the budget rows (benchmarks/unseen_region.py)."""
    if not (B / "unseen_region.json").is_file():
        return []
    import unseen_region as ur

    d = load("unseen_region.json")
    seeds = d.get("seeds", 1)
    commands = ", then ".join(f"`{r['command']}`" for r in ur.runs(d))
    out = [f"{commands} → [`benchmarks/unseen_region.md`](benchmarks/unseen_region.md): trained on nine regions for "
           f"{d['steps'] / 1e6:g}M env steps ({seeds} training seed{'s' if seeds > 1 else ''}, learned rows their mean), the "
           f"tenth region's own objective, the others on Reactive + tier; code at commit "
           f"{', '.join(r['commit'] for r in ur.runs(d))}.", ""]
    for u in d["regions"]:
        rows = u["rows"]
        later = [k for k in ur.AFTER if k in rows]
        more = (f"; with {d['after_steps'] / 1e6:g}M more steps: " + ", ".join(f"{k} {rows[k]['objective']:.3f}" for k in later)) if later else ""
        verdicts = []
        for k in (k for k in ur.FEDERATED if k in rows):
            rival, won = ur.zero_shot_verdict(rows, k)
            verdicts.append(f"{k.removesuffix(' (zero-shot)')} {rows[k]['objective']:.3f} ({rows[k]['slo_attainment_pct']:.1f} % "
                            f"attainment) against {rival} {rows[rival]['objective']:.3f}: aim **{'met' if won else 'not met'}**, "
                            f"beats {ur.beaten(rows, k)} of {len(ur.rivals(rows))} rivals")
        out.append(f"- {u['held_out']} ({u['traffic_mix']}), zero-shot: " + "; ".join(verdicts) + f"{more}.")
    return out


def hyperscore() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from aro_jax.training.evaluation import hyperscore as hs

    v_paper = math.exp((math.log(math.sqrt(0.305) / (1 - math.sqrt(0.305))) + math.log(2.0)) / 5.0)  # V for 130.5
    return [f"HyperScore (the paper's 100 [1 + sigmoid(beta ln V + gamma)^kappa] with its published beta = 5, gamma = −ln 2, "
            f"kappa = 2): V = 0.95 gives {hs(0.95):.1f} and the maximum, at V = 1, is {hs(1.0):.1f}; the paper's worked "
            f"result of 130.5 would need V = {v_paper:.2f}."]


VERDICTS = {"met": "met", "not met": "not met",
            "below public": "not met: below the policy pretrained on public data alone, which uses no protected data"}


def privacy() -> list[str]:
    """Per privacy_utility group: its best private row within the aim's epsilon."""
    import privacy_utility as pu

    d = load("privacy_utility.json")
    aim = d["aim"]
    lines = [f"[`benchmarks/privacy_utility.md`](benchmarks/privacy_utility.md), {d['seeds']} training seeds per row, a two-region "
             f"cluster (us-east and eu-central unless a group names another); utility share = the share of the best non-private run's improvement over the untrained policy. Aim: "
             f"share >= {aim['share']:g} at epsilon <= {aim['epsilon']:g} (delta {aim['delta']:g}). Best row per group within "
             "that epsilon:", ""]
    for unit, group in d["groups"].items():
        _, best, untrained = pu._summary(group)
        within = [r for r in group["rows"] if r["epsilon"] <= aim["epsilon"]]
        if not within:
            continue
        top = max(within, key=lambda r: np.mean(r["reward_seeds"]))
        share = pu._share(np.mean(top["reward_seeds"]), untrained, best)
        cluster = [pu._short(o).split("=", 1)[1] for o in group["settings"] if o.startswith("cluster.nodes=")]
        lines.append(f"- Group {unit}{f' (regions {cluster[0]})' if cluster else ''}, unit {top['privacy'][0]['unit']}: {top['mechanism']}, noise {top['noise_multiplier']:g}, "
                     f"epsilon {top['epsilon']:.3g}: share **{share:.2f}**, {VERDICTS[pu.verdict(group, top, untrained, best, aim)]}"
                     + (" (the group's note says what its epsilon does not count)" if "does not count" in pu.GROUPS.get(unit, {}).get("note", "") else "")
                     + ". "
                     f"Code commit: {pu._commits(group)}."
                     + (f" Machine: {group['machine']}." if group.get("machine", d["machine"]) != d["machine"] else ""))
    return lines


def pareto() -> list[str]:
    """The frontier study's aims per scenario (benchmarks/pareto.py), tier off and, when it
    has run, tier on."""
    if not (B / "pareto.json").is_file():
        return []
    import pareto as pa

    lines = ["### Cost against SLO attainment", ""]
    for name in ("pareto.json", "pareto_tier.json"):
        if not (B / name).is_file():
            continue
        d, stem = load(name), name.removesuffix(".json")
        lines += [f"`{d['command']}` → [`benchmarks/{stem}.md`](benchmarks/{stem}.md) ([plot](benchmarks/{stem}.png)): the main job's "
                  f"config (at the study's commit) trained to targets {', '.join(f'{t:g}' for t in d['targets'])} ({d['seeds']} seed{'s' if d['seeds'] > 1 else ''}"
                  + "".join(f"; then {', '.join(f'{t:g}' for t in add['targets'])} with the code regions at t {add['code_target_offset']:+.2f}"
                            + (f", trained with `{add['train_set']}`" if add.get("train_set") else "")
                            + (f" at commit {add['commit']}" if add.get("commit") else "") + " "
                            f"({add['seeds']} seed{'s' if add['seeds'] > 1 else ''}, `{add['command']}`)" for add in d.get("additions", []))
                  + ", "
                  f"{d['clusters']} clusters per region, {d['steps'] / 1e6:g}M env steps, `env.token_shift_prob={d.get('token_shift_prob', 0.0):g}`, "
                  f"`env.surge_prob={d.get('surge_prob', 0.0):g}`, "
                  f"`objective.slo_margin={d['slo_margin']:g}`, "
                  f"one compiled program{' per command' if d.get('additions') else ''}) against "
                  + ", ".join(f"{k} at {len(v['values'])} settings" for k, v in d["settings"].items())
                  + f", tier {'on' if d.get('tier') else 'off'} for all. Aim (stated with the tier off): the learned frontier below every "
                  "heuristic's in the band (attainment >= min(90 %, 0.9 x the ceiling that policy-independent rejects leave)), and at "
                  f"target {pa.MAIN_TARGET:g} >= {pa.PAPER_COST_CLAIM_PCT:g} % cheaper than the cheapest heuristic setting reaching its attainment.", ""]
        for a in pa.aims(d):
            main = (f"learned at {pa.MAIN_TARGET:g}{' (' + d['main_label'] + ')' if d.get('main_label') else ''}: {a['main'][0]:.1f} % at "
                    f"${a['main'][1]:.3f} per 1M tokens" if a["main"] else "no learned point at the main target")
            vs = (f", cost saving {a['saving_pct']:+.0f} % against {a['cheapest']['policy']} {a['cheapest']['setting']:g}"
                  + (f" ({a['cheapest']['slo_attainment_pct']:.1f} %, the closest: no heuristic setting reaches that attainment)" if a["beyond_reach"] else "")
                  if a["saving_pct"] is not None else ", no heuristic setting reaches that attainment")
            lines.append(f"- {a['scenario']} (ceiling {a['ceiling']:.1f} %, band >= {a['band']:.1f} %): frontier below every heuristic in "
                         f"the band **{'yes' if a['frontier_below'] else 'no'}**{'' if a['contenders'] or not a['frontier_below'] else ' (no heuristic setting reaches the band)'}; {main}{vs if a['main'] else ''}; within the learned "
                         f"span ({a['learned_span'][0]:.1f}-{a['learned_span'][1]:.1f} %) a learned point beats {a['covered_beaten']} of "
                         f"{a['covered']} heuristic points.")
        commits = list(dict.fromkeys(r.get("commit") or d.get("commit") or "the study's own (unrecorded)" for r in d["rows"] if r["policy"].startswith("learned")))
        if len(commits) > 1:
            lines.append(f"- The learned points come from code at {', '.join(commits)}; the verdicts above pool them (each is a policy "
                         "evaluated in the same scenarios; which code a point was trained with is in its label in the study's tables).")
        stale = [s for s in dict.fromkeys(r["scenario"] for r in d["rows"]) if s not in pa.scenarios_measured(d)]
        if stale:
            lines.append(f"- {', '.join(stale)}: not shown; this run evaluated the one-hour traces over a whole day (23 hours "
                         "without arrivals after the trace), pricing idle hours; they need a rerun.")
        lines.append("")
    return lines


def variants() -> list[str]:
    """What the main job's personal pull and training margin do, from main_job_variants.json."""
    if not (B / "main_job_variants.json").is_file():
        return []
    d = load("main_job_variants.json")
    sys.path.insert(0, str(B))
    import main_job_variants as mv

    out = ["Where the main job's settings come from (`python benchmarks/main_job_variants.py`, one training seed each, 30M env steps, "
           "every region's attainment per day over the training week, 2 evaluation seeds: "
           "[`benchmarks/main_job_variants.md`](benchmarks/main_job_variants.md)):", "",
           "| variant | met on Monday | met over the week | drops over the bound |", "|---|---|---|---|"]
    for v in d["variants"]:
        c = mv.counts(v)
        name = v["name"].replace("the current default", "the default when measured")  # names are as of their run
        out.append(f"| `{v['command']}` ({name}) | {c['monday']} / {c['regions']} | {c['week']} / {c['regions']} | "
                   + (", ".join(c["drops_over"]) or "none") + " |")
    if "training_env" not in d:  # variants from before the token shifts: name the default they override, and today's
        from aro_jax.config import load_config

        now = load_config()
        out += ["", "Variants whose name does not say otherwise override an earlier default, which trained on each region's own "
                "token lengths (`env.token_shift_prob=0`) and aimed 2 points above each target (`objective.slo_margin=0.02`); the "
                f"main job now shifts the lengths in {100 * now.env.token_shift_prob:g} % of its training episodes (below), aims "
                f"{100 * now.objective.slo_margin:g} points above and surges in {100 * now.env.surge_prob:g} % of its episodes"
                + (f"; its shifts are centred {now.env.token_shift_toward:g} of the way to the other mix's lengths and "
                   f"{100 * now.env.token_shift_onset_prob:g} % of them set in midway (docs/simulator.md)"
                   if now.env.token_shift_toward or now.env.token_shift_onset_prob else "") + "."]
    return out


def token_shift() -> list[str]:
    """What training token-length randomisation does on every scenario, from token_shift.json."""
    if not (B / "token_shift.json").is_file():
        return []
    d = load("token_shift.json")
    sys.path.insert(0, str(B))
    import token_shift as ts

    p0, p1 = d["probs"]
    out = [f"Training token lengths (`{d['command'].strip()}`, {d['seeds']} training seeds per setting, {d['eval_seeds']} evaluation "
           f"seeds, code at commit {d.get('commit', 'unknown')}: [`benchmarks/token_shift.md`](benchmarks/token_shift.md)): the main "
           f"job's config with `env.token_shift_prob` {p1:g} against {p0:g}, mean over training seeds. With shifts on, the "
           "token-shift scenario's lengths lie inside the training range; the traces stay held out.", "",
           "| scenario | SLO attainment (points) | dropped (points) | cost | regions at target, per seed |", "|---|---|---|---|---|"]
    for scen in dict.fromkeys(r["scenario"] for r in d["rows"]):
        a, b = (ts.learned_mean(d["rows"], scen, p) for p in (p0, p1))
        met = lambda p: ", ".join(str(r["regions_at_target"]) for r in d["rows"]  # noqa: E731
                                  if r["scenario"] == scen and r["policy"] == "learned" and r["token_shift_prob"] == p)
        out.append(f"| {scen} | {b['slo_attainment_pct'][0] - a['slo_attainment_pct'][0]:+.1f} | "
                   f"{b['dropped_pct'][0] - a['dropped_pct'][0]:+.2f} | {pct(b['cost_usd_per_h'][0], a['cost_usd_per_h'][0])} | "
                   f"{met(p1)} against {met(p0)} |")
    return out


def render() -> str:
    parts = ["### Main job", "", *main_job(), "", *variants(), "", *token_shift(), "", "### Speed and model checks", "", *speed(), "",
             "### Against the paper, on held-out traffic", "", *paper(), "", *hyperscore(), "",
             "### Federated against Local-only", "", *federation(), "", "### An unseen region", "", *unseen_region(), "",
             "### Byzantine regions", "", *robustness(), "", *pareto(), "### Differential privacy", "", *privacy()]
    return "\n".join([BEGIN, "<!-- rendered by benchmarks/render_readme.py from benchmarks/**/*.json; do not edit by hand -->", "", *parts, "", END])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md differs from a fresh render")
    args = ap.parse_args()
    readme = (ROOT / "README.md").read_text()
    if BEGIN not in readme or END not in readme:
        print(f"error: README.md lacks the {BEGIN} ... {END} markers", file=sys.stderr)
        return 2
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + render() + tail
    if args.check:
        return 0 if new == readme else 1
    (ROOT / "README.md").write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
