"""A region the federation never trained on (leave one region out), zero-shot and after a
short budget on the region itself.

Federated PPO (the FEDERATED rows: one shared policy under the main job's multi-Krum f=3,
after nearest-neighbour mixing, or with randomised training demand; and the main job's
personal policies, the held-out region running its nearest member's) and Local-only train
on the other nine regions, each over `--seeds` training seeds in one vmapped program;
every learned row is their mean. On the
ten-region cluster the held-out region then runs, zero-shot, a federated policy, each of
the nine Local-only policies, or Reactive + tier,
while the other nine regions run Reactive + tier in every row (so only the held-out
region's policy changes). Then three ways to spend the same short budget
(`--after-steps`) with the region present, all on the ten-region cluster:
- *joins the federation*: federated training goes on with ten regions, from the
  nine-region global policy and normaliser (a region that joins mid-training);
- *local fine-tune*: Local-only PPO, every region starting from the federated policy;
- *from scratch*: Local-only PPO from a fresh policy.
The node descriptor in the observation (contract.DESCRIPTOR_FIELDS) is what lets one
policy know which region it serves. Scored like the main job (diurnal day, common
evaluation seeds): the constrained objective of the held-out region alone.

Writes unseen_region.json, and unseen_region.md rendered from it.

usage: python benchmarks/unseen_region.py [--steps 10000000] [--after-steps 2000000]
           [--held-out us-west eu-west] [--seeds 2] [--add-rows] [--render-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import run_report  # noqa: E402
import federation  # noqa: E402
from federation import score_row  # noqa: E402

from aro_jax import contract  # noqa: E402
from aro_jax.envs.heuristics import HEURISTICS, Policy  # noqa: E402
from aro_jax.envs.scenarios import scenario_plan  # noqa: E402
from aro_jax.envs.serving import node_descriptor  # noqa: E402
from aro_jax.training import evaluation, learned_policy, trainers  # noqa: E402

OUT = Path(__file__).with_name("unseen_region.json")
SHARED = ["federated.personal_mix=1.0"]  # the main job's federation, one shared policy
# The federated zero-shot rows: the main job's multi-Krum; nearest-neighbour mixing before
# it (Allouah et al., AISTATS 2023), which lets multi-Krum keep the outlying honest
# regions' learning (the 7B and code regions) instead of discarding it each round; and
# training demand levels randomised (envs.serving.draw_demand_scale), so the policy meets
# regions busier and quieter than their plan, as an unseen region may be.
# The last row is the main job itself (one personal policy per region, each pulled toward
# the robust global): the unseen region runs the personal policy of the member region whose
# node descriptor is nearest to its own (nearest_member), a choice made from descriptors
# alone, before any of its traffic is seen.
FEDERATED = {"federated (zero-shot)": SHARED, "federated, NNM (zero-shot)": [*SHARED, "federated.pre_aggregators=[nnm]"],
             "federated, demand 1.5x (zero-shot)": [*SHARED, "env.demand_scale_max=1.5"],
             "federated, nearest member's own (zero-shot)": []}
ZERO_SHOT = "federated (zero-shot)"
REACTIVE = "Reactive + tier"
AFTER = ("joins the federation", "federated + local fine-tune", "Local-only from scratch")  # the budget rows
LOCAL = ["federated.mode=local"]


def config(steps: int, extra, nodes=None):
    """federation.py's config trained to the targets and the drop bound themselves (no
    margins), as this study's recorded runs were."""
    return federation.config(steps, ["objective.slo_margin=0", "objective.drop_margin=0", *extra], nodes)


def mixed_policy(network, heuristic: Policy, cfg) -> Policy:
    """Per region: the learned policy with its weights, or the heuristic (flag per region)."""
    learned = learned_policy.greedy_policy(network, cfg.ppo.normalize_obs, cfg.ppo.action_masking)

    def act(state, raw, params):
        weights, h_state, use_heuristic = state
        a_learned, _ = learned.act(weights, raw, params)
        a_heuristic, h_state = heuristic.act(h_state, raw, params)
        return jnp.where(use_heuristic, a_heuristic, a_learned), (weights, h_state, use_heuristic)

    return Policy(init=heuristic.init, act=act)


def trained(cfg, seeds: int, start=None):
    """(trainer, weights stacked over seeds, seconds): trainers.train_seeds, timed."""
    t0 = time.perf_counter()
    trainer, weights = trainers.train_seeds(cfg, seeds, start)
    return trainer, jax.block_until_ready(weights), time.perf_counter() - t0


def mean_row(per_seed: list[dict]) -> dict:
    """KPIs averaged over training seeds, with the objective's spread (sd) and seed count."""
    row = {k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0]}
    return {**row, "objective_sd": float(np.std([r["objective"] for r in per_seed])), "seeds": len(per_seed)}


def nearest_member(params, h: int) -> int:
    """The index of the region (not `h`) whose descriptor features lie nearest to region
    `h`'s (Euclidean, in the O(1) features the policy sees)."""
    features = np.asarray(contract.descriptor_features(np.asarray(jax.vmap(node_descriptor)(params), np.float64)))
    distance = np.linalg.norm(features - features[h], axis=1)
    distance[h] = np.inf
    return int(np.argmin(distance))


def held_out_region(steps: int, held_out: str, after_steps: int, seeds: int, labels: tuple[str, ...] = tuple(FEDERATED)) -> dict:
    """Every row of one held-out region; with some of the FEDERATED `labels` only, those
    rows (no Local-only, Reactive or budget rows)."""
    whole = labels == tuple(FEDERATED)
    full = config(steps, [])
    names = [n.name for n in full.cluster.nodes]
    h = names.index(held_out)
    nine = [n for n in full.cluster.nodes if n.name != held_out]
    params, ticks, _ = scenario_plan(full, full.eval.scenario)
    twin = nearest_member(params, h)
    twin_of_nine = [n.name for n in nine].index(names[twin])
    trained_weights, train_s = {}, {}
    for label, extra in (*((k, FEDERATED[k]) for k in labels), *((("local", LOCAL),) if whole else ())):
        trainer, weights, train_s[label] = trained(config(steps, extra, nine), seeds)
        personal = label != "local" and trainer.per_node  # the held-out region runs its nearest member's policy
        trained_weights[label] = jax.tree.map(lambda x: x[:, twin_of_nine], weights) if personal else weights
    network = trainer.network
    env, eparams = evaluation.eval_env(full, params)
    heuristic = HEURISTICS["reactive+tier"](full.env.tick_s)
    policy = mixed_policy(network, heuristic, full)
    h_state = jax.vmap(heuristic.init)(params)
    one_node = dataclasses.replace(full, cluster=dataclasses.replace(full.cluster, nodes=[full.cluster.nodes[h]]))
    row_params = jax.tree.map(lambda x: x[h: h + 1], params)

    def evaluate(weights, held_out_learned: bool = True) -> dict:
        """The held-out region runs `weights` (one policy) or the heuristic; the others the heuristic."""
        stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(names),) + x.shape), weights)
        use_heuristic = jnp.arange(len(names)) != h if held_out_learned else jnp.ones(len(names), bool)
        m = evaluation.run_episodes(env, policy, eparams, jax.random.PRNGKey(0), full.eval.num_seeds, ticks,
                                    (stacked, h_state, use_heuristic), True)
        return score_row(one_node, {k: np.asarray(v)[h: h + 1] for k, v in m.items()}, row_params)

    def over_seeds(weights, region=None) -> dict:
        """`weights` stacked over seeds (and regions: take `region`), each seed evaluated."""
        pick = (lambda s: lambda x: x[s]) if region is None else (lambda s: lambda x: x[s, region])
        return mean_row([evaluate(jax.tree.map(pick(s), weights)) for s in range(seeds)])

    rows = {label: over_seeds(trained_weights[label]) for label in labels}
    if not whole:
        print(held_out, rows, flush=True)
        return {"rows": rows, "train_s": train_s, "nearest_member": names[twin]}
    for i, n in enumerate(nine):
        rows[f"Local-only of {n.name}"] = over_seeds(trained_weights["local"], i)
    rows[REACTIVE] = evaluate(jax.tree.map(lambda x: x[0], trained_weights[ZERO_SHOT]), held_out_learned=False) | {"seeds": 0}
    if after_steps:  # from the main job's federated policy of each seed
        ten = lambda mode: config(after_steps, mode, full.cluster.nodes)  # noqa: E731
        fed = trained_weights[ZERO_SHOT]
        for label, mode, start in zip(AFTER, (SHARED, LOCAL, LOCAL), (fed, fed, None)):
            trainer, weights, train_s[label] = trained(ten(mode), seeds, start)
            rows[label] = over_seeds(weights, h if trainer.per_node else None)
    print(held_out, rows, flush=True)
    return {"held_out": held_out, "traffic_mix": full.cluster.nodes[h].traffic_mix, "nearest_member": names[twin], "rows": rows,
            "train_s": train_s}


def runs(d: dict) -> list[dict]:
    """The commands that measured `d`, earliest first ({command, commit})."""
    return [*d.get("earlier", []), {"command": d["command"], "commit": d.get("commit", "unknown")}]


def measure(steps: int, held_out: list[str], after_steps: int, seeds: int, add_rows: bool) -> dict:
    """The held-out regions' runs; the other regions already in unseen_region.json at the
    same budgets and seeds are kept (with the command and commit that measured them).
    `add_rows`: only the FEDERATED rows that those regions lack, added to them."""
    budgets = {"steps": steps, "after_steps": after_steps, "seeds": seeds}
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    same = bool(old) and all(old.get(k) == v for k, v in budgets.items())
    if add_rows:
        if not same:
            sys.exit(f"error: {OUT} holds no run at --steps {steps} --after-steps {after_steps} --seeds {seeds} to add rows to; "
                     "measure its regions first")
        for u in old["regions"]:
            missing = tuple(k for k in FEDERATED if k not in u["rows"])
            if missing and u["held_out"] in held_out:
                new = held_out_region(steps, u["held_out"], after_steps, seeds, missing)
                federated = {k: u["rows"].get(k) or new["rows"][k] for k in FEDERATED}
                u["rows"] = federated | {k: v for k, v in u["rows"].items() if k not in federated}
                u["train_s"].update(new["train_s"])
                u["nearest_member"] = new["nearest_member"]
        return {**old, "earlier": runs(old)}
    data = {**budgets, "eval_seeds": config(steps, []).eval.num_seeds,
            "regions": [held_out_region(steps, name, after_steps, seeds) for name in held_out]}
    kept = [u for u in old.get("regions", []) if u["held_out"] not in held_out]
    if kept and same:
        data["regions"] = kept + data["regions"]
        data["earlier"] = runs(old)
    return data


def rivals(rows: dict) -> dict:
    """The zero-shot rivals: every transferred Local-only policy and Reactive + tier."""
    return {k: v for k, v in rows.items() if k.startswith("Local-only of") or k == REACTIVE}


def zero_shot_verdict(rows: dict, federated: str = ZERO_SHOT) -> tuple[str, bool]:
    """The best rival of a zero-shot federated row and whether the row beats it on the objective."""
    best = max(rivals(rows), key=lambda k: rows[k]["objective"])
    return best, rows[federated]["objective"] > rows[best]["objective"]


def beaten(rows: dict, federated: str) -> int:
    """How many rivals the zero-shot federated row beats on the objective."""
    return sum(rows[federated]["objective"] > r["objective"] for r in rivals(rows).values())


def objective(r: dict) -> str:
    return f"{r['objective']:.3f}" + (f" ± {r['objective_sd']:.3f}" if r.get("seeds", 1) > 1 else "")


def render(d: dict) -> str:
    seeds = d.get("seeds", 1)
    federated = [k for k in FEDERATED if all(k in u["rows"] for u in d["regions"])]
    seed_note = (f"({seeds} training seeds: every learned row is the mean over them, the objective ± its sd)."
                 if seeds > 1 else "(one training seed).")
    lines = ["# An unseen region", "", "Command: " + ", then ".join(f"`{r['command']}`" for r in runs(d)) + "  ",
             f"Machine: {d['machine']}, {d['wall_s'] / 60:.0f} min (the last command); code at commit "
             f"{', '.join(r['commit'] for r in runs(d))}.", "",
             f"Leave one region out: federated PPO (one shared policy, the main job's multi-Krum f = 3; *NNM*: nearest-neighbour "
             f"mixing before it; *demand 1.5x*: each training episode's demand a log-uniform 1/1.5 to 1.5 times the region's "
             f"plan, its descriptor unchanged; *nearest member's own*: the main job, one policy per region pulled toward the "
             f"robust global, the held-out region running the policy of the member whose node descriptor features lie nearest "
             f"to its own) and Local-only train on the other nine regions for {d['steps'] / 1e6:g}M env steps "
             f"{seed_note} "
             f"Evaluated on the ten-region cluster, diurnal day, {d['eval_seeds']} evaluation seeds common to every row; the other "
             "nine regions run Reactive + tier in every row. The held-out region's own KPIs; *objective*: the constrained "
             "objective's score for that region alone (mean reward per tick minus 10 x its violated share of the attainment, "
             "drop and quality limits; higher is better). The last rows spend "
             f"{d['after_steps'] / 1e6:g}M more env steps on the ten-region cluster, from the main job's federation of the same "
             "seed: the region joins the federation (training goes on from the nine-region global), a Local-only fine-tune "
             "from the federated policy, or Local-only from scratch. *train (s)*: the row's own training run, all seeds in one "
             "program (the nine Local-only policies come from one run, its time on the first of them).", "",
             "Aim: zero-shot, the federated policy beats every transferred Local-only policy and Reactive + tier on the "
             "objective.", ""]
    met = {k: [] for k in federated}
    for u in d["regions"]:
        rows = u["rows"]
        twin = f"; nearest member: {u['nearest_member']}" if "nearest_member" in u else ""
        lines += [f"## {u['held_out']} ({u['traffic_mix']}{twin})", "",
                  "| policy on the held-out region | objective | reward | goodput/$ | attainment (%) | dropped (%) | cost ($/h) | train (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        seconds = u.get("train_s", {})
        first_local = next(k for k in rows if k.startswith("Local-only of"))
        for label, r in rows.items():
            s = seconds.get({first_local: "local"}.get(label, label))
            lines.append(f"| {label} | {objective(r)} | {r['reward']:.3f} | {r['goodput_per_usd']:.0f} | "
                         f"{r['slo_attainment_pct']:.1f} | {r['dropped_pct']:.2f} | {r['cost_usd_per_h']:.0f} | "
                         f"{'' if s is None else f'{s:.0f}'} |")
        lines.append("")
        for k in federated:
            rival, won = zero_shot_verdict(rows, k)
            met[k].append(won)
            lines.append(f"Zero-shot: {k.removesuffix(' (zero-shot)')} {rows[k]['objective']:.3f} against the best rival, "
                         f"{rival} ({rows[rival]['objective']:.3f}): aim **{'met' if won else 'not met'}** (it beats "
                         f"{beaten(rows, k)} of the {len(rivals(rows))} rivals).")
        later = [k for k in AFTER if k in rows]
        if later:
            best = max(later, key=lambda k: rows[k]["objective"])
            lines.append(f"With {d['after_steps'] / 1e6:g}M more steps: " + ", ".join(f"{k} {rows[k]['objective']:.3f}" for k in later)
                         + f"; best: {best}.")
        lines.append("")
    lines += [f"Aim met ({k.removesuffix(' (zero-shot)')}) in {sum(v)} of {len(v)} held-out regions." for k, v in met.items()]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10_000_000)
    ap.add_argument("--after-steps", type=int, default=2_000_000, help="the budget with the region present (0: zero-shot only)")
    ap.add_argument("--held-out", nargs="+", default=["us-west", "eu-west"])
    ap.add_argument("--seeds", type=int, default=2, help="training seeds, one vmapped program per learner")
    ap.add_argument("--add-rows", action="store_true", help="train only the federated rows the measured regions lack")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    run_report(OUT, render, lambda: measure(args.steps, args.held_out, args.after_steps, args.seeds, args.add_rows), args.render_only)


if __name__ == "__main__":
    main()
