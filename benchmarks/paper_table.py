"""The ARO paper's comparison on the ten-region cluster, on honest metrics: the learned
policy of a run (the main job's) against every heuristic, with the quality tier available
to all (each heuristic also with the tier rule, `+tier`) and with the tier off for all
(a learned policy trained without it), on the training scenario and on every held-out one
(the Azure conversation and code traces replayed natively, flash crowd, outage, token-length
shift); best-effort availability as load grows; HyperScore.

Headline: goodput per dollar (requests completed within SLO per dollar) at SLO attainment
over all arrivals. A row's interval is Student's t over the evaluation seeds (the learned
rows are one training seed each: the spread between training seeds is not in this table).
Every row of a scenario sees the same evaluation seeds (common random numbers). The run
writes paper_table.json; the markdown and plots are rendered from it (`--render-only`).

usage: python benchmarks/paper_table.py --learned RUN_DIR [--learned-no-tier RUN_DIR] [--eval-seeds 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import code_commit, machine, write_report  # noqa: E402

from aro_jax.envs.heuristics import HEURISTICS  # noqa: E402
from aro_jax.envs.scenarios import SCENARIOS, scenario_plan  # noqa: E402
from aro_jax.training import evaluation  # noqa: E402
from aro_jax.training.checkpointing import load_trained_policy  # noqa: E402

HERE = Path(__file__).parent
OUT = HERE / "paper_table.json"
LEARNED = "ARO (learned)"
BASES = {"Static (mean)": "static-mean", "Static (peak)": "static-peak", "Reactive": "reactive", "Predictive": "predictive"}
TIERED = {f"{k} + tier": f"{v}+tier" for k, v in BASES.items()}
COLUMNS = ["goodput_per_usd", "goodput_rps", "slo_attainment_pct", "e2e_mean_all_ms", "e2e_p95_ms", "dropped_pct", "rejected_pct",
           "forwarded_pct", "served_for_peers_rps", "replicas", "cost_usd_per_h", "cost_usd_per_mtok", "quality"]
PAPER_CLAIMS = {"latency vs Reactive": -22.0, "throughput vs Reactive": +28.0, "cost vs Static": -18.0}
LOADS = (1.0, 2.0, 5.0, 10.0)
SLO_BAR = 0.9  # a region-tick is "available" when at least 90 % of its requests meet the SLOs


def with_tier(cfg, on: bool):
    return dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, quality_tier=on))


def scenarios(cfg) -> list[str]:
    have = (Path(cfg.env.data_dir) / "traces").is_dir()
    return [s for s in SCENARIOS if have or not s.startswith("trace-")]


def per_seed_kpis(metrics, tick_s, params, seeds) -> list[dict]:
    return [evaluation.cluster_kpis({k: np.asarray(v)[:, i:i + 1] for k, v in metrics.items()}, tick_s, params) for i in range(seeds)]


def availability(metrics) -> dict:
    slo, quality = np.asarray(metrics["slo_attainment"]), np.asarray(metrics["quality"])
    return {"availability_pct": 100 * float(np.mean(slo >= SLO_BAR)), "quality_above_98_pct": 100 * float(np.mean(quality >= 0.98))}


def measure(args) -> dict:
    cfg, learned, weights, per_node = load_trained_policy(Path(args.learned))
    tables = {"tier on": (with_tier(cfg, True), {LEARNED: (learned, weights, per_node)}, {**BASES, **TIERED})}
    if args.learned_no_tier:
        cfg_off, policy_off, weights_off, per_node_off = load_trained_policy(Path(args.learned_no_tier))
        tables["tier off"] = (with_tier(cfg, False), {LEARNED: (policy_off, weights_off, per_node_off)}, BASES)
    key = jax.random.PRNGKey(2024)
    out = {"tables": {}, "best_effort": {}}
    for table, (tcfg, learned_rows, heuristic_rows) in tables.items():
        policies = {**learned_rows, **{n: (HEURISTICS[h](tcfg.env.tick_s), None, False) for n, h in heuristic_rows.items()}}
        out["tables"][table] = {}
        for scen in scenarios(tcfg):
            params, ticks, _ = scenario_plan(tcfg, scen)
            env, eparams = evaluation.eval_env(tcfg, params)
            rows = {}
            for name, (policy, state, pn) in policies.items():
                m = evaluation.run_episodes(env, policy, eparams, key, args.eval_seeds, ticks, state, pn)
                rows[name] = per_seed_kpis(m, tcfg.env.tick_s, params, args.eval_seeds)
            out["tables"][table][scen] = {"ticks": ticks, "rows": rows}
            print(f"{table} / {scen}: done", flush=True)
        base, _, _ = scenario_plan(tcfg, "diurnal")
        shown = [LEARNED, "Reactive", "Static (peak)"] + (["Reactive + tier"] if table == "tier on" else [])
        for load in LOADS:
            t = base.traffic.replace(mean_rate_rps=base.traffic.mean_rate_rps * load)
            params = base.replace(traffic=t)
            env, eparams = evaluation.eval_env(tcfg, params)
            for name in shown:
                policy, state, pn = policies[name]
                m = evaluation.run_episodes(env, policy, eparams, key, args.eval_seeds, tcfg.env.episode_ticks, state, pn)
                out["best_effort"].setdefault(table, {}).setdefault(name, {})[f"{load:g}x"] = availability(m)
        print(f"{table} / best effort: done", flush=True)
    out["objective"] = dataclasses.asdict(cfg.objective)
    out["env_kind"] = cfg.env.kind
    out["federated"] = {"mode": cfg.federated.mode, "aggregator": cfg.federated.aggregator, "personal_mix": cfg.federated.personal_mix}
    return out


def mean_ci(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def fmt(mean: float, ci: float) -> str:
    digits = 0 if abs(mean) >= 100 else (1 if abs(mean) >= 10 else 3)
    m = f"{mean:,.{digits}f}"
    return m if math.isnan(ci) else f"{m} ± {ci:,.{digits}f}"


def kpi(rows: dict, name: str, key: str) -> float:
    return float(np.mean([r[key] for r in rows[name]]))


def change(a: float, b: float) -> str:
    return f"{100 * (a - b) / b:+.1f} %"


def verdict(rows: dict, ref: str) -> tuple[str, bool]:
    """Does the learned row beat `ref` on goodput per dollar at no worse SLO attainment?"""
    g, r = kpi(rows, LEARNED, "goodput_per_usd"), kpi(rows, ref, "goodput_per_usd")
    a, b = kpi(rows, LEARNED, "slo_attainment_pct"), kpi(rows, ref, "slo_attainment_pct")
    wins = g > r and a >= b
    return f"{change(g, r)} goodput/$, {a - b:+.1f} pts attainment: **{'yes' if wins else 'no'}**", wins


def render(d: dict) -> str:
    o, fed = d["objective"], d["federated"]
    per_mix = ", ".join(f"{k} {100 * v:.0f} %" for k, v in (o.get("slo_targets") or {}).items())
    lines = [
        "# The ARO paper's comparison on the ten-region cluster", "",
        f"Command: `{d['command']}`  ", f"Machine: {d['machine']}, {d['wall_s'] / 60:.0f} min", "",
        f"The learned rows are the policies of `{d['learned']}` (federated mode {fed['mode']}, aggregator {fed['aggregator']}, "
        f"personal mix {fed['personal_mix']:g}; objective {o['kind']}: attainment >= {100 * o['slo_target']:.0f} %"
        + (f" ({per_mix})" if per_mix else "") + f", drops <= {100 * o['max_drop']:g} %, quality >= {o.get('min_quality', 0):g})"
        + (f" and, tier off, `{d['learned_no_tier']}` (trained with `env.quality_tier=false`)" if d.get("learned_no_tier") else "")
        + f". Every row: greedy policy, {d['eval_seeds']} evaluation seeds x 10 regions"
        + (" coupled in the cluster env as in training (forwarded requests served by the peers at their load and price)"
           if d.get("env_kind") == "cluster" else " each alone with its modelled peer") + ", one simulated day from Monday 00:00 "
        "UTC (the trace scenarios: the trace's own length, replayed natively); mean ± 95 % CI over evaluation seeds. "
        "Headline figures count every arrival: SLO attainment and goodput count drops and rejects as misses; mean e2e "
        "over all arrivals counts a drop at the queue timeout and a reject at the SLO budget; p95 e2e is of the served "
        "requests, pooled over the day.", "",
    ]
    for table, scens in d["tables"].items():
        lines += [f"## Quality tier {table.split()[-1]} for every policy", ""]
        for scen, block in scens.items():
            rows = block["rows"]
            lines += [f"### {scen} ({block['ticks']} ticks)", "",
                      "| policy | " + " | ".join(f"{c} ({evaluation.KPIS[c][0]})" if evaluation.KPIS[c][0] else c for c in COLUMNS) + " |",
                      "|---" * (len(COLUMNS) + 1) + "|"]
            for name in rows:
                label = f"**{name}**" if name == LEARNED else name
                lines.append(f"| {label} | " + " | ".join(fmt(*mean_ci([r[c] for r in rows[name]])) for c in COLUMNS) + " |")
            lines.append("")
    lines += ["## Verdict: does the learned policy beat Reactive on goodput per dollar at no worse SLO attainment?", "",
              "| scenario | tier on: against Reactive + tier | tier off: against Reactive |", "|---|---|---|"]
    on, off = d["tables"]["tier on"], d["tables"].get("tier off", {})
    for scen in on:
        a = verdict(on[scen]["rows"], "Reactive + tier")[0]
        b = verdict(off[scen]["rows"], "Reactive")[0] if scen in off else "-"
        lines.append(f"| {scen} | {a} | {b} |")
    losing = [scen for scen in on if not verdict(on[scen]["rows"], "Reactive + tier")[1]]
    if losing:
        lines += ["", "Where it does not win, what it runs (tier on, learned against Reactive + tier): " + "; ".join(
            f"{scen}: {kpi(on[scen]['rows'], LEARNED, 'replicas'):.1f} against {kpi(on[scen]['rows'], 'Reactive + tier', 'replicas'):.1f} "
            f"replicas per region, {kpi(on[scen]['rows'], LEARNED, 'dropped_pct'):.1f} % against "
            f"{kpi(on[scen]['rows'], 'Reactive + tier', 'dropped_pct'):.1f} % dropped" for scen in losing)
            + ". The policy was trained on the diurnal distribution only, to the cheapest allocation that holds each region at "
            "its target; where it runs fewer replicas than Reactive + tier and drops more ("
            + ", ".join(s_ for s_ in losing if kpi(on[s_]["rows"], LEARNED, "replicas") < kpi(on[s_]["rows"], "Reactive + tier", "replicas")) +
            "), it keeps that lean allocation when demand or the token mix moves past what it trained on, instead of scaling "
            "out as the HPA rule does" + "".join(
                f"; on {s_} it runs more replicas and still drops more, which these figures do not explain"
                for s_ in losing if kpi(on[s_]["rows"], LEARNED, "replicas") >= kpi(on[s_]["rows"], "Reactive + tier", "replicas")) + "."]
    lines += ["", "## Against the paper's claims (tier on)", "",
              "Paper: " + ", ".join(f"{k} {v:+.0f} %" for k, v in PAPER_CLAIMS.items()) + ". Latency here is the mean e2e over "
              "all arrivals; throughput differs between policies only by drops and forwarding (the arrivals are the same), so "
              "+28 % is out of reach by construction; cost is $/h.", "",
              "| scenario | latency vs Reactive | throughput vs Reactive | cost vs Static (mean) | cost vs Static (peak) |", "|---|---|---|---|---|"]
    for scen, block in on.items():
        r = block["rows"]
        lines.append(f"| {scen} | {change(kpi(r, LEARNED, 'e2e_mean_all_ms'), kpi(r, 'Reactive', 'e2e_mean_all_ms'))} | "
                     f"{change(kpi(r, LEARNED, 'throughput_rps'), kpi(r, 'Reactive', 'throughput_rps'))} | "
                     f"{change(kpi(r, LEARNED, 'cost_usd_per_h'), kpi(r, 'Static (mean)', 'cost_usd_per_h'))} | "
                     f"{change(kpi(r, LEARNED, 'cost_usd_per_h'), kpi(r, 'Static (peak)', 'cost_usd_per_h'))} |")
    lines += ["", "## Best-effort serving (Jha et al. 2024)", "",
              f"Diurnal traffic at {', '.join(f'{x:g}x' for x in LOADS)} the provisioned load; availability = share of (region, "
              f"tick) with SLO attainment >= {SLO_BAR:.0%}; quality >= 98 % = share of region-ticks whose served quality is at "
              "least 98 % of the large model's.", "",
              "| tier | policy | " + " | ".join(f"{x:g}x availability / quality >= 98 % (%)" for x in LOADS) + " |", "|---" * (len(LOADS) + 2) + "|"]
    for table, per in d["best_effort"].items():
        for name, by_load in per.items():
            lines.append(f"| {table} | {name} | " + " | ".join(
                f"{v['availability_pct']:.1f} / {v['quality_above_98_pct']:.1f}" for v in by_load.values()) + " |")
    lines += ["", "## HyperScore", "",
              "HyperScore = 100 [1 + sigmoid(beta ln V + gamma)^kappa] (beta = 5, gamma = -ln 2, kappa = 2), V = SLO attainment "
              f"share on the training scenario, tier on. Its maximum (V = 1) is {evaluation.hyperscore(1.0):.1f}: the paper's 130.5 "
              "does not follow from its own formula.", "", "| policy | V | HyperScore |", "|---|---|---|"]
    for name in on["diurnal"]["rows"]:
        v = kpi(on["diurnal"]["rows"], name, "slo_attainment_pct") / 100
        lines.append(f"| {name} | {v:.3f} | {evaluation.hyperscore(v):.1f} |")
    return "\n".join(lines) + "\n"


def plot(d: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = d["tables"]
    fig, axes = plt.subplots(len(tables), 1, figsize=(12, 4.5 * len(tables)), squeeze=False)
    for ax, (table, scens) in zip(axes[:, 0], tables.items()):
        names = list(next(iter(scens.values()))["rows"])
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ys = [kpi(b["rows"], name, "goodput_per_usd") for b in scens.values()]
            ax.bar(np.arange(len(scens)) + i * width, ys, width, label=name)
        ax.set_xticks(np.arange(len(scens)) + 0.4 - width / 2, list(scens))
        ax.set_ylabel("goodput per dollar (req/$)")
        ax.set_title(f"quality tier {table.split()[-1]} for every policy")
        ax.legend(fontsize=7, ncol=5)
    fig.tight_layout()
    fig.savefig(HERE / "paper_table.png", dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--learned", help="a finished run directory (the main job's)")
    ap.add_argument("--learned-no-tier", help="a run trained with env.quality_tier=false, for the tier-off table")
    ap.add_argument("--eval-seeds", type=int, default=4)
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if args.render_only:
        d = write_report(OUT, None, render)
        plot(d)
        return
    if not args.learned:
        ap.error("--learned RUN_DIR is needed (or --render-only)")
    t0 = time.perf_counter()
    d = measure(args)
    d.update(command="python benchmarks/paper_table.py " + " ".join(sys.argv[1:]), machine=machine(), commit=code_commit(), wall_s=time.perf_counter() - t0,
             learned=str(args.learned), learned_no_tier=args.learned_no_tier and str(args.learned_no_tier), eval_seeds=args.eval_seeds)
    d = write_report(OUT, d, render)
    plot(d)
    print((HERE / "paper_table.md").read_text())


if __name__ == "__main__":
    main()
