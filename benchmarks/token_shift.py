"""A training randomisation, measured: the main job's config trained with one of the env's
training-distribution shares (`--key`, default `env.token_shift_prob`) at each of `--probs`
(default 0 and 0.5), `--seeds` training seeds each (one vmapped program per setting), every
policy evaluated on the training scenario and every held-out one next to the main job's
strongest heuristics. Writes token_shift.json (or KEY.json for another key, `_prob`
dropped) and the markdown rendered from it.

usage: python benchmarks/token_shift.py [--key token_shift_prob] [--seeds 2] [--probs 0 0.5] [--steps N] [--scenarios ...] [--render-only]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import run_report  # noqa: E402

from aro_jax.config import load_config  # noqa: E402
from aro_jax.envs.heuristics import HEURISTICS  # noqa: E402
from aro_jax.envs.scenarios import SCENARIOS, scenario_plan  # noqa: E402
from aro_jax.training import evaluation, learned_policy, trainers  # noqa: E402

OUT = Path(__file__).with_name("token_shift.json")
BASELINES = ("reactive+tier", "predictive+spill+tier")
SHOWN = ("slo_attainment_pct", "dropped_pct", "cost_usd_per_h", "goodput_per_usd", "replicas", "quality")
EVAL_SEEDS = 4
# What each randomisation does to a training episode, for the report.
WHAT = {
    "token_shift_prob": ("Training token-length randomisation", "the prompt and answer lengths' log-means move by uniform offsets up to "
                         "0.75 and 2.3 (the gap between the chat and code mixes)"),
    "random_fleet_prob": ("Training starting fleets", "the fleet starts at a whole number of replicas drawn uniformly between the "
                          "region's replica limits (with the CPU and memory that size it) instead of the one sized for its mean rate"),
    "surge_prob": ("Training surges", "one flash crowd of 1.5x to env.surge_max_multiplier x demand lasts 10-60 minutes"),
    "burst_shift_prob": ("Training burstiness (chat regions)", "a chat region's arrivals follow the code trace's burst process "
                         "(30 s count CV 1.27 against its own 0.22)"),
    "smooth_shift_prob": ("Training smoothness (code regions)", "a code region's arrivals follow the conversation trace's smooth "
                          "process (30 s count CV 0.22 against its own 1.27)"),
    "demand_phase_prob": ("Training demand phases", "the demand runs a uniform 0-24 h ahead of the daily shape while the observed "
                          "clock and the forecaster keep local time"),
}


def measure(key: str, probs: list[float], seeds: int, steps: int | None, scenarios: list[str]) -> dict:
    scenarios = [s for s in scenarios if not s.startswith("trace-") or Path(load_config().env.data_dir, "traces").is_dir()]
    learned, train_s = {}, {}
    for p in probs:
        cfg = load_config(None, [f"env.{key}={p}", f"eval.num_seeds={EVAL_SEEDS}", "train.num_chunks=1",
                                 *([f"train.total_env_steps={steps}"] if steps else [])])
        t0 = time.perf_counter()
        trainer, weights = trainers.train_seeds(cfg, seeds)
        learned[p] = (cfg, trainer, jax.block_until_ready(weights))
        train_s[p] = time.perf_counter() - t0
        print(f"{key} {p:g}: trained {seeds} seeds in {train_s[p]:.0f} s", flush=True)
    rows = []
    for scen in scenarios:
        t0 = time.perf_counter()
        for p, (cfg, trainer, weights) in learned.items():
            params, ticks, _ = scenario_plan(cfg, scen)
            env, eparams = evaluation.eval_env(cfg, params)
            policy = learned_policy.greedy_policy(trainer.network, cfg.ppo.normalize_obs, cfg.ppo.action_masking)
            m = jax.jit(jax.vmap(lambda w: evaluation.run_episodes(  # noqa: B023
                env, policy, eparams, jax.random.PRNGKey(0), EVAL_SEEDS, ticks, w, trainer.per_node)))(weights)  # noqa: B023
            names = [n.name for n in cfg.cluster.nodes]
            targets = [100 * cfg.objective.target(n.traffic_mix, n.slo_target) for n in cfg.cluster.nodes]
            for s in range(seeds):
                ms = jax.tree.map(lambda x: np.asarray(x[s]), m)  # noqa: B023
                k = evaluation.cluster_kpis(ms, cfg.env.tick_s, params)
                regions = evaluation.region_kpis(ms, cfg.env.tick_s, params, names)
                met = sum(regions[n]["slo_attainment_pct"] >= t for n, t in zip(names, targets, strict=True))
                rows.append({"scenario": scen, "policy": "learned", key: p, "seed": s, **{x: k[x] for x in SHOWN},
                             "regions_at_target": met, "regions_over_drop_bound": sum(regions[n]["dropped_pct"] > 100 * cfg.objective.max_drop for n in names)})
        for name in BASELINES:  # the heuristics do not depend on the training setting
            m = evaluation.run_episodes(env, HEURISTICS[name](cfg.env.tick_s), eparams, jax.random.PRNGKey(0), EVAL_SEEDS, ticks)
            k = evaluation.cluster_kpis(m, cfg.env.tick_s, params)
            rows.append({"scenario": scen, "policy": name, **{x: k[x] for x in SHOWN}})
        print(f"{scen}: evaluated in {time.perf_counter() - t0:.0f} s", flush=True)
        jax.clear_caches()
    return {"key": key, "probs": probs, "seeds": seeds, "eval_seeds": EVAL_SEEDS, "train_s": {str(p): t for p, t in train_s.items()},
            "steps_per_seed": cfg.train.total_env_steps, "rows": rows}


def learned_mean(rows, scen, p, key: str = "token_shift_prob") -> dict:
    group = [r for r in rows if r["scenario"] == scen and r["policy"] == "learned" and r[key] == p]
    return {k: (float(np.mean([r[k] for r in group])), float(np.std([r[k] for r in group], ddof=1)) if len(group) > 1 else 0.0)
            for k in SHOWN}


def render(d: dict) -> str:
    rows, probs, key = d["rows"], d["probs"], d.get("key", "token_shift_prob")
    title, what = WHAT[key]
    lines = [f"# {title}", "", f"Command: `{d['command']}`  ",
             f"Machine: {d['machine']}, {d['wall_s'] / 60:.0f} min (training {d['seeds']} seeds x {d['steps_per_seed'] / 1e6:.0f}M env "
             f"steps per setting in one program each); code at commit {d.get('commit', 'unknown')}", "",
             f"The main job's config (ten regions, multi-Krum, constrained objective, tier on) trained with `env.{key}` "
             f"{' and '.join(f'{p:g}' for p in probs)}: in that share of training episodes {what}. Every policy on one simulated "
             f"day (the trace scenarios: the trace's own length) from Monday 00:00 UTC, {d['eval_seeds']} evaluation seeds x 10 "
             "regions, the same seeds for every policy. Learned rows: mean ± sd over training seeds."
             + (" With shifts on, the token-shift scenario's lengths (the other mix's) lie inside the training range; the traces' "
                "timelines, per-tick token moments and burstiness stay held out." if key == "token_shift_prob" else ""), ""]
    head = " | ".join(f"{k} ({evaluation.KPIS[k][0]})" if evaluation.KPIS[k][0] else k for k in SHOWN)
    verdicts = []
    for scen in dict.fromkeys(r["scenario"] for r in rows):
        lines += [f"## {scen}", "", f"| policy | {head} | regions at their attainment target, per seed | regions over the drop bound, per seed |",
                  "|---" * (len(SHOWN) + 3) + "|"]
        means = {p: learned_mean(rows, scen, p, key) for p in probs}
        for p in probs:
            per_seed = [r for r in rows if r["scenario"] == scen and r["policy"] == "learned" and r[key] == p]
            lines.append(f"| learned, {key} {p:g} | " + " | ".join(
                f"{evaluation.format_value(m)} ± {evaluation.format_value(s if s > 1e-6 else 0.0)}" for m, s in means[p].values()) + " | "
                + ", ".join(str(r["regions_at_target"]) for r in per_seed) + " | " + ", ".join(str(r["regions_over_drop_bound"]) for r in per_seed) + " |")
        for r in rows:
            if r["scenario"] == scen and r["policy"] != "learned":
                lines.append(f"| {r['policy']} | " + " | ".join(evaluation.format_value(r[k]) for k in SHOWN) + " | | |")
        lines.append("")
        if len(probs) == 2:
            (a, b) = (means[p] for p in probs)
            verdicts.append(f"| {scen} | {b['slo_attainment_pct'][0] - a['slo_attainment_pct'][0]:+.1f} | "
                            f"{b['dropped_pct'][0] - a['dropped_pct'][0]:+.2f} | "
                            f"{100 * (b['cost_usd_per_h'][0] / a['cost_usd_per_h'][0] - 1):+.0f} % | "
                            f"{100 * (b['goodput_per_usd'][0] / a['goodput_per_usd'][0] - 1):+.0f} % |")
    if verdicts:
        p0, p1 = probs
        summary = ["## Summary", "", f"{key} {p1:g} against {p0:g}, mean over training seeds:", "",
                   "| scenario | SLO attainment (points) | dropped (points) | cost | goodput per $ |", "|---|---|---|---|---|", *verdicts, ""]
        lines[lines.index("## " + rows[0]["scenario"]):lines.index("## " + rows[0]["scenario"])] = summary
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--key", choices=list(WHAT), default="token_shift_prob", help="the env's training share to vary")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--probs", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--steps", type=int, help="env steps per run (default: the main job's)")
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    ap.add_argument("--out", type=Path, help="default token_shift.json, or KEY.json (without _prob) for another key")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    out = args.out or (OUT if args.key == "token_shift_prob" else OUT.with_name(f"{args.key.removesuffix('_prob')}.json"))
    run_report(out, render, lambda: measure(args.key, args.probs, args.seeds, args.steps, args.scenarios), args.render_only)


if __name__ == "__main__":
    main()
