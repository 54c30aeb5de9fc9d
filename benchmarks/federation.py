"""Where federation pays: federated PPO against Local-only on the ten-region cluster env,
and a region the federation never trained on.

1. *Same budget*: each learner trains the main job's config (cluster env, constrained
   objective) for `--steps` env steps with `--seeds` training seeds in one vmapped
   program, and is evaluated like the main job (diurnal day, common seeds): the
   constrained objective's score (trainers.eval_score: mean reward minus 10 x each
   region's violated share), the mean reward, goodput per dollar, attainment, drops,
   and how many regions meet their attainment target.
2. *Unseen region* (leave one region out): federated PPO (one shared policy) and
   Local-only train on the other nine regions; on the ten-region cluster the held-out
   region then runs, zero-shot, the federated policy, each of the nine Local-only
   policies, or Reactive + tier, while the other nine regions run Reactive + tier in every
   row (so only the held-out region's policy changes); then, from the federated policy,
   a short Local-only fine-tune on the cluster (each region from the shared policy), and
   the same budget of Local-only from scratch. The node descriptor in the
   observation (contract.DESCRIPTOR_FIELDS) is what lets one policy know which region
   it serves.

Writes federation.json, and federation.md rendered from it.

usage: python benchmarks/federation.py [--steps 10000000] [--seeds 2] [--held-out us-west eu-west]
           [--fine-tune-steps 2000000] [--learners LEARNER ...] [--render-only]
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import run_report, train_and_evaluate_seeds  # noqa: E402

from aro_jax.config import load_config  # noqa: E402
from aro_jax.envs.heuristics import HEURISTICS, Policy  # noqa: E402
from aro_jax.envs.scenarios import cluster_params  # noqa: E402
from aro_jax.training import evaluation, learned_policy, trainers  # noqa: E402

OUT = Path(__file__).with_name("federation.json")
# The learners compared, as overrides of the main job's config (default.yaml).
LEARNERS = {
    "Local-only": ["federated.mode=local"],
    "federated, personal (main job: multi-Krum f=3, pull 0.01)": [],
    "federated, one shared policy (multi-Krum f=3)": ["federated.personal_mix=1.0"],
    "federated, one shared policy (FedAvg)": ["federated.personal_mix=1.0", "federated.aggregator=mean", "federated.num_byzantine=0"],
    # One local update per round: the deltas are one PPO update's, as centralized PPO's
    # pooled gradient is, without K updates of drift toward each region's own optimum.
    "federated, one shared policy (multi-Krum f=3), 1 local update per round": ["federated.personal_mix=1.0", "federated.local_updates=1"],
    "centralized (pooled data, one policy)": ["federated.mode=centralized"],
}
SHOWN = ("goodput_per_usd", "slo_attainment_pct", "dropped_pct", "cost_usd_per_h", "forwarded_pct")
EVAL_SEEDS = 4


def config(steps: int, extra, nodes=None):
    cfg = load_config(None, [f"train.total_env_steps={steps}", "train.num_chunks=1", f"eval.num_seeds={EVAL_SEEDS}", *extra])
    if nodes is not None:
        cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, nodes=nodes))
    return cfg


def targets_met(cfg, metrics, params) -> int:
    names = [n.name for n in cfg.cluster.nodes]
    rows = evaluation.region_kpis(metrics, cfg.env.tick_s, params, names)
    return sum(rows[n.name]["slo_attainment_pct"] >= 100 * cfg.objective.slo_targets.get(n.traffic_mix, cfg.objective.slo_target)
               for n in cfg.cluster.nodes)


def score_row(cfg, metrics, params) -> dict:
    k = evaluation.cluster_kpis(metrics, cfg.env.tick_s, params)
    return {"objective": trainers.eval_score(cfg, metrics), "reward": float(np.mean(metrics["reward"])),
            **{x: k[x] for x in SHOWN}, "targets_met": targets_met(cfg, metrics, params)}


def same_budget(steps: int, seeds: int, learners: list[str]) -> dict:
    out = {}
    for label in learners:
        extra = LEARNERS[label]
        cfg = config(steps, extra)
        per_seed, train_s = train_and_evaluate_seeds(cfg, seeds)
        params = cluster_params(cfg, cfg.eval.scenario)
        rows = [score_row(cfg, m, params) for m in per_seed]
        out[label] = {"rows": rows, "train_s": train_s}
        print(label, rows, f"{train_s:.0f} s", flush=True)
    cfg = config(steps, [])
    params = cluster_params(cfg, cfg.eval.scenario)
    env, eparams = evaluation.eval_env(cfg, params)
    m = evaluation.run_episodes(env, HEURISTICS["reactive+tier"](cfg.env.tick_s), eparams, jax.random.PRNGKey(0), cfg.eval.num_seeds, cfg.env.episode_ticks)
    out["Reactive + tier"] = {"rows": [score_row(cfg, m, params)], "train_s": 0.0}
    return out


def mixed_policy(network, heuristic: Policy, cfg) -> Policy:
    """Per region: the learned policy with its weights, or the heuristic (flag per region)."""
    learned = learned_policy.greedy_policy(network, cfg.ppo.normalize_obs, cfg.ppo.action_masking)

    def act(state, raw, params):
        weights, h_state, use_heuristic = state
        a_learned, _ = learned.act(weights, raw, params)
        a_heuristic, h_state = heuristic.act(h_state, raw, params)
        return jnp.where(use_heuristic, a_heuristic, a_learned), (weights, h_state, use_heuristic)

    return Policy(init=heuristic.init, act=act)


def fine_tune(full, steps: int, start) -> learned_policy.PolicyWeights:
    """Local-only PPO on the ten-region cluster for `steps` env steps, every region's policy
    and normaliser starting from `start` (a shared policy), or from scratch (None); the
    stacked per-region weights."""
    cfg = config(steps, ["federated.mode=local"], full.cluster.nodes)
    trainer = trainers.make_trainer(cfg)
    hp = trainers.hyperparams(cfg)
    regions = len(cfg.cluster.nodes)

    def run(key):
        state = trainer.init(key, hp)
        if start is not None:
            per_region = lambda x: jnp.broadcast_to(x, (regions,) + jnp.shape(x))  # noqa: E731
            state = state.replace(nodes=state.nodes.replace(params=jax.tree.map(per_region, start.params),
                                                            obs_stats=jax.tree.map(per_region, start.obs_stats)))
        state, _ = trainer.chunk(state, hp, trainer.units_total)
        return trainer.weights(state)

    return jax.jit(run)(jax.random.PRNGKey(0))


def unseen_region(steps: int, held_out: str, fine_tune_steps: int) -> dict:
    full = config(steps, [])
    names = [n.name for n in full.cluster.nodes]
    h = names.index(held_out)
    nine = [n for n in full.cluster.nodes if n.name != held_out]
    trained = {}
    for label, extra in (("federated", ["federated.personal_mix=1.0"]), ("local", ["federated.mode=local"])):
        trainer, weights = trainers.train_seeds(config(steps, extra, nine), 1)
        trained[label] = (trainer, jax.tree.map(lambda x: x[0], weights))
    network = trained["federated"][0].network
    params = cluster_params(full, full.eval.scenario)
    env, eparams = evaluation.eval_env(full, params)
    heuristic = HEURISTICS["reactive+tier"](full.env.tick_s)
    policy = mixed_policy(network, heuristic, full)
    h_state = jax.vmap(heuristic.init)(params)
    one_node = dataclasses.replace(full, cluster=dataclasses.replace(full.cluster, nodes=[full.cluster.nodes[h]]))
    row_params = jax.tree.map(lambda x: x[h : h + 1], params)

    def evaluate(weights, held_out_learned: bool) -> dict:
        """The held-out region runs `weights` (one policy) or the heuristic; the others the heuristic."""
        stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(names),) + x.shape), weights)
        use_heuristic = jnp.arange(len(names)) != h if held_out_learned else jnp.ones(len(names), bool)
        m = evaluation.run_episodes(env, policy, eparams, jax.random.PRNGKey(0), full.eval.num_seeds, full.env.episode_ticks,
                                    (stacked, h_state, use_heuristic), True)
        m = {k: np.asarray(v)[h : h + 1] for k, v in m.items()}
        return score_row(one_node, m, row_params)

    fed_w = trained["federated"][1]
    rows = {"federated (zero-shot)": evaluate(fed_w, True)}
    local_w = trained["local"][1]
    for i, n in enumerate(nine):
        rows[f"Local-only of {n.name}"] = evaluate(jax.tree.map(lambda x: x[i], local_w), True)
    if fine_tune_steps:
        label = f"{fine_tune_steps / 1e6:g}M steps"
        tuned = fine_tune(full, fine_tune_steps, fed_w)
        rows[f"federated + local fine-tune ({label})"] = evaluate(jax.tree.map(lambda x: x[h], tuned), True)
        scratch = fine_tune(full, fine_tune_steps, None)
        rows[f"Local-only on the region itself, from scratch ({label})"] = evaluate(jax.tree.map(lambda x: x[h], scratch), True)
    rows["Reactive + tier"] = evaluate(fed_w, False)
    print(held_out, rows, flush=True)
    return {"held_out": held_out, "traffic_mix": full.cluster.nodes[h].traffic_mix, "rows": rows}


def measure(steps: int, seeds: int, held_out: list[str], learners: list[str], fine_tune_steps: int) -> dict:
    """A run; with a subset of the learners, the rows of the other learners and the unseen
    regions already in federation.json (at the same steps and seeds) are kept."""
    data = {"steps": steps, "seeds": seeds, "eval_seeds": EVAL_SEEDS, "same_budget": same_budget(steps, seeds, learners),
            "unseen": [unseen_region(steps, name, fine_tune_steps) for name in held_out], "fine_tune_steps": fine_tune_steps}
    if set(learners) != set(LEARNERS) and OUT.exists():
        old = json.loads(OUT.read_text())
        if (old["steps"], old["seeds"]) == (steps, seeds):
            data["same_budget"] = {**old["same_budget"], **data["same_budget"]}
            if not held_out:
                data["fine_tune_steps"] = old.get("fine_tune_steps", 0)
            data["unseen"] = data["unseen"] or old["unseen"]
            data["earlier_commands"] = [*old.get("earlier_commands", []), old["command"]]
    return data


def _fmt(xs, digits=2):
    xs = np.asarray(xs, float)
    return f"{xs.mean():.{digits}f}" + (f" ± {xs.std(ddof=1):.{digits}f}" if len(xs) > 1 else "")


def verdict(sb: dict) -> list[str]:
    """The same-budget aim, checked on the table: the best federated learner's mean
    objective against Local-only's, and whether the seeds resolve the gap."""
    scores = {k: np.array([row["objective"] for row in v["rows"]]) for k, v in sb.items()}
    spread = {k: float(x.std(ddof=1)) if len(x) > 1 else 0.0 for k, x in scores.items()}
    fed = [k for k in sb if k.startswith("federated")]
    if not fed or "Local-only" not in sb:
        return []
    best = max(fed, key=lambda k: scores[k].mean())
    gap = float(scores[best].mean() - scores["Local-only"].mean())
    noise = max(spread[best], spread["Local-only"])
    return ["", f"Best federated learner on the objective: **{best}** ({scores[best].mean():.3f}) against Local-only's "
            f"{scores['Local-only'].mean():.3f}. Aim (the best federated method >= Local-only at the same budget): "
            f"**{'met' if gap >= 0 else 'not met'}**"
            + (f", by {gap:+.3f}, inside the spread between training seeds (standard deviation up to {noise:.3f}): not a "
               "difference these seeds resolve." if abs(gap) < noise else "."), ""]


def render(d: dict) -> str:
    earlier = "".join(f"`{c}`, then " for c in d.get("earlier_commands", []))
    lines = ["# Where federation pays", "", f"Command: {earlier}`{d['command']}`  ",
             f"Machine: {d['machine']}, {d['wall_s'] / 60:.0f} min (the last command); code at commit {d.get('commit', 'unknown')}.", "",
             f"## The same budget: {d['steps'] / 1e6:g}M env steps, {d['seeds']} training seeds", "",
             "The main job's config (cluster env, constrained objective: chat regions 90 % attainment, code 60 %, <= 1 % dropped, "
             f"quality >= 0.98), evaluated on the diurnal day ({d['eval_seeds']} evaluation seeds, common to every row). *objective*: "
             "the constrained objective's score (mean reward per tick minus 10 x each region's violated share, arrival-weighted; "
             "higher is better). Mean ± standard deviation over training seeds.", "",
             "| learner | objective | reward | goodput/$ | attainment (%) | dropped (%) | cost ($/h) | forwarded (%) | targets met (of 10) | train (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    sb = d["same_budget"]
    order = [k for k in LEARNERS if k in sb] + [k for k in sb if k not in LEARNERS]  # the heuristic last
    for label, r in ((k, sb[k]) for k in order):
        col = lambda k: [row[k] for row in r["rows"]]  # noqa: E731
        lines.append(f"| {label} | {_fmt(col('objective'), 3)} | {_fmt(col('reward'), 3)} | {_fmt(col('goodput_per_usd'), 0)} | "
                     f"{_fmt(col('slo_attainment_pct'), 1)} | {_fmt(col('dropped_pct'), 2)} | {_fmt(col('cost_usd_per_h'), 0)} | "
                     f"{_fmt(col('forwarded_pct'), 1)} | {_fmt(col('targets_met'), 1)} | {r['train_s']:.0f} |")
    lines += verdict(sb)
    lines += ["## An unseen region, zero-shot", "",
              "Trained on the other nine regions (one seed each); evaluated on the ten-region cluster, the other nine running "
              "Reactive + tier in every row. The held-out region's own KPIs; *objective* as above, for that region alone.", ""]
    for u in d["unseen"]:
        rows = u["rows"]
        lines += [f"### {u['held_out']} ({u['traffic_mix']})", "",
                  "| policy on the held-out region | objective | reward | goodput/$ | attainment (%) | dropped (%) | cost ($/h) |",
                  "|---|---|---|---|---|---|---|"]
        for label, r in rows.items():
            lines.append(f"| {label} | {r['objective']:.3f} | {r['reward']:.3f} | {r['goodput_per_usd']:.0f} | {r['slo_attainment_pct']:.1f} | "
                         f"{r['dropped_pct']:.2f} | {r['cost_usd_per_h']:.0f} |")
        others = {k: v for k, v in rows.items() if k.startswith("Local-only of") or k == "Reactive + tier"}
        rival = max(others, key=lambda k: others[k]["objective"])
        win = rows["federated (zero-shot)"]["objective"] > others[rival]["objective"]
        lines += ["", f"Best rival: {rival} ({others[rival]['objective']:.3f}); federated zero-shot "
                  f"{rows['federated (zero-shot)']['objective']:.3f}: aim (beats every transferred Local-only policy and Reactive) "
                  f"**{'met' if win else 'not met'}**.", ""]
        tuned = next((k for k in rows if k.startswith("federated + local fine-tune")), None)
        if tuned:
            scratch = next(k for k in rows if k.startswith("Local-only on the region itself"))
            lines += [f"After the fine-tune: {rows[tuned]['objective']:.3f} ({tuned}), against {rows[scratch]['objective']:.3f} "
                      f"for the same budget from scratch.", ""]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10_000_000)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--held-out", nargs="*", default=["us-west", "eu-west"])
    ap.add_argument("--fine-tune-steps", type=int, default=2_000_000, help="local fine-tune on the held-out region (0: none)")
    ap.add_argument("--learners", nargs="*", default=list(LEARNERS), choices=list(LEARNERS), metavar="LEARNER",
                    help="a subset of the learners (the others' rows in federation.json are kept)")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    run_report(OUT, render, lambda: measure(args.steps, args.seeds, args.held_out, args.learners, args.fine_tune_steps), args.render_only)


if __name__ == "__main__":
    main()
