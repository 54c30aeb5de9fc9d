"""Robustness of federated PPO to Byzantine regions: final return of the deployed policies
for every aggregator x attack x f (Byzantine regions of ten), attack strengths swept, several
training seeds; FedAvg and Local-only as reference rows.

One compiled program covers the grid: attacks and (aggregator, f) defences are picked by
`lax.switch` from `FedState.threat` (aro_jax.federated.fedppo), and every run of one
defence (all attacks x strengths x seeds) trains in one vmapped call. Results are kept in
robustness_runs/ (one JSON per batch; a batch already there is not re-run) and rendered
to robustness.md. `--part k/P` runs every P-th batch, so P processes share the grid.

Study config: the default ten-region cluster with 4 simulated clusters per region (not
16) and 2.5M env steps by default (the round count follows from the config and is
printed in robustness.md). This is a fraction of the main job's budget and the
no-attack runs have not converged at it; robustness.md reports the no-attack return
next to the attacked ones, so the comparison is at equal budget, not at a plateau.

Federated methods: "shared" (every region runs the robust global policy, which
conditions on the region through the node descriptor in its input), "momentum" (the same,
each region sending the momentum of its deltas over rounds), "personal" (the main job's at
the time of the recorded runs: each region keeps its own policy, pulled 1 % of the way to
the robust global each round), "personal-pullP" (the same with a pull of P) and
"personal-offsetP" (a pull of P, each region sending its model's offset from the global;
"-annealed": the pull fades with the learning rate).
The return of a run is the constrained objective's score of the policies
the honest regions deploy (regions 3..9 in every row, the attacked and the unattacked
alike, so the rows compare the same regions): mean reward minus 10 x each region's
violated share, so a policy that saves by serving users worse scores lower.

usage: python benchmarks/robustness.py [--method shared personal personal-pull0.03 momentum] [--f 1 2 3] [--seeds 3]
           [--steps 2500000] [--aggregators ...] [--pre nnm+multi_krum ...] [--pull-aggregators ...] [--attacks ...] [--local]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import platform
import subprocess
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from aro_jax.training import evaluation, learned_policy, trainers  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import ON_POLICY_ROLLOUTS, SIMULATOR_CHANGE, code_commit, has_change, on_policy_rollouts  # noqa: E402
from aro_jax.config import load_config  # noqa: E402
from aro_jax.envs.scenarios import cluster_params  # noqa: E402
from aro_jax.federated import aggregators, attacks, fedppo  # noqa: E402

HERE = Path(__file__).parent
N_NODES = 10
F_AIM = 3  # the aim: 3 of the 10 regions Byzantine
EVAL_SEEDS, EVAL_TICKS = 2, 2880
# Attack strengths (attacks.py defines each): the first is the primary one, the rest are
# run with --sweep. None is ALIE's z_max(n, f). A boosted sign flip (4x) outweighs the 7
# honest regions under plain averaging; IPM's small epsilon is the one that defeats
# median and Krum (Xie et al. 2020), its large one defeats the mean.
STRENGTHS = {
    "none": [0.0], "sign_flip": [4.0, 1.0], "alie": [None, 1.5], "ipm": [0.1, 10.0], "nan": [0.0],
    "gaussian": [1.0, 0.01], "scaled": [10.0], "mimic": [0.0], "stale": [0.0],
    # huge: strength x 1e30 per coordinate (1e-12 gives 1e18); normaliser_poisoning: the
    # lie about the observation statistics, in honest standard deviations.
    "huge": [1.0, 1e-12], "normaliser_poisoning": [1e3, -1e3],
}
ATTACKS = list(STRENGTHS)
# Aggregators whose output does not depend on f (only the invalid-row budget does): one
# defence with f = 3 stands for every f <= 3.
F_FREE = {"geometric_median", "centered_clipping"}
# Regions evaluated in every row: those honest under the largest f of the study.
EVAL_FROM = 3
# "personal" as its recorded runs were made: a pull of 1 %; "personal-pullP": the same
# with a pull of P per round (Ditto's lambda, swept). "momentum": the shared policy, each
# region sending the momentum of its deltas (federated.worker_momentum).
WORKER_MOMENTUM = 0.9
PERSONAL_PULLS = (0.003, 0.0075, 0.03)
# "personal-offsetP": a pull of P, each region sending its model's offset from the global
# (federated.personal_sends), so the global is the robust centre of the regions' models;
# "-annealed": the pull fades with the learning rate (federated.personal_mix_anneal);
# "-own-critics": the value and cost critics stay each region's own (federated.personal_own);
# "-own-heads": so does the actor's output layer, on pulled hidden layers.
OFFSET_PULLS = (0.0075, 0.03)
ANNEALED = "federated.personal_mix_anneal=true"
OFFSET_VARIANTS = {"": [], "-annealed": [ANNEALED], "-annealed-own-critics": [ANNEALED, "federated.personal_own=[critic,cost_critic]"],
                   "-annealed-own-heads": [ANNEALED, "federated.personal_own=[critic,cost_critic,actor_out]"]}
METHODS = {"shared": ["federated.personal_mix=1.0"], "personal": ["federated.personal_mix=0.01"],
           **{f"personal-pull{p}": [f"federated.personal_mix={p}"] for p in PERSONAL_PULLS},
           **{f"personal-offset{p}{variant}": [f"federated.personal_mix={p}", "federated.personal_sends=offset", *extra]
              for variant, extra in OFFSET_VARIANTS.items() for p in OFFSET_PULLS},
           "momentum": ["federated.personal_mix=1.0", f"federated.worker_momentum={WORKER_MOMENTUM}"]}

# The Local-only reference row's method: every region trains alone.
LOCAL = "local"
NO_DEFENCE = ("mean", 0, ())


def is_personal(method: str) -> bool:
    return method.startswith("personal")


def study_config(steps: int, extra: list[str] = ()):
    # One XLA device per process: vmap over runs of a program sharded over fake CPU devices
    # can hang XLA's CPU runtime (DESIGN "Speed"); run two processes (--part) to use 2 cores.
    # Trained to the targets and the drop bound themselves (no margins), without surges or
    # token-length shifts, as the recorded runs were.
    return load_config(None, ["objective.slo_margin=0", "objective.drop_margin=0", "env.surge_prob=0", "env.token_shift_prob=0",
                              "env.num_clusters=4", f"train.total_env_steps={steps}", "train.num_chunks=1", *extra])


def allowed(name: str, f: int) -> bool:
    try:
        aggregators.check_requirements(name, N_NODES, f)
        return True
    except ValueError:
        return False


def defences(pre_rows: list[str]) -> list[tuple[str, int, tuple]]:
    """Every (aggregator, f, pre-aggregators) the grid uses; FedAvg assumes f = 0. Each of
    `pre_rows` ("nnm+multi_krum": NNM, Allouah et al. 2023, then multi-Krum; "arc+...":
    adaptive robust clipping, Allouah et al. 2025) adds its pre-aggregators before its rule."""
    out = [("mean", 0, ())]
    for name in aggregators.ROBUST_AGGREGATORS:
        for f in (1, 2, 3):
            if (name in F_FREE and f != 3) or not allowed(name, f):
                continue
            out.append((name, f, ()))
            out += [(name, f, label(row)[1]) for row in pre_rows if label(row)[0] == name]
    return out


def label(name: str) -> tuple[str, tuple]:
    """'nnm+multi_krum' -> (aggregator, pre-aggregators)."""
    *pre, agg = name.split("+")
    return agg, tuple(pre)


def defence_for(name: str, f: int) -> tuple[str, int, tuple]:
    agg, pre = label(name)
    if agg == "mean":
        return ("mean", 0, pre)
    return (agg, 3, pre) if agg in F_FREE else (agg, f, pre)


class Study:
    """The compiled grid program and evaluator, built once."""

    def __init__(self, steps: int, attack_names: list[str], method: str, pre_rows: list[str], train_set: list[str] = ()):
        # "local": the Local-only reference, each region training alone (nothing is
        # aggregated, so the attack and the defence pass through unused).
        self.train_set = " ".join(train_set)
        self.cfg = study_config(steps, [*(["federated.mode=local"] if method == LOCAL else ["federated.mode=federated", *METHODS[method]]),
                                        *train_set])
        self.method = method
        self.defences = defences(pre_rows)
        self.attacks = attack_names
        params = cluster_params(self.cfg, "train")
        init, chunk, learner = trainers.make_federated(self.cfg, params, attack_names, self.defences)
        personal = is_personal(method) or method == LOCAL
        hp = trainers.hyperparams(self.cfg)
        rounds = trainers.num_rounds(self.cfg)

        def start(key, attack, strength, byzantine, defence):
            return init(key, hp).replace(threat=fedppo.Threat(attack, strength, byzantine, defence))

        def deployed(state):
            return (learned_policy.PolicyWeights(state.nodes.params, state.nodes.obs_stats) if personal
                    else learned_policy.PolicyWeights(state.global_params, state.global_stats))

        def train_one(key, attack, strength, byzantine, defence):
            state, metrics = chunk(start(key, attack, strength, byzantine, defence), hp, rounds)
            return deployed(state), metrics["skipped"].mean()

        self.train = jax.jit(jax.vmap(train_one, in_axes=(0, 0, 0, 0, None)))
        self.start = jax.jit(jax.vmap(start, in_axes=(0, 0, 0, 0, None)))
        self.advance = jax.jit(jax.vmap(lambda state, n: chunk(state, hp, n)[0], in_axes=(0, None)), static_argnums=1)
        self.deployed = jax.jit(jax.vmap(deployed))
        self.evaluate = make_evaluator(self.cfg, learner.network, per_node=personal)
        self.rounds = rounds
        self.steps_per_round = steps_per_round(self.cfg)

    def row_name(self, defence: tuple[str, int, tuple]) -> str:
        return "local-only" if self.method == LOCAL else defence_name(defence)

    def threats(self, f: int, runs: list[tuple[str, float, int]]):
        """runs: (attack, strength, seed) each."""
        keys = jnp.stack([jax.random.PRNGKey(seed) for _, _, seed in runs])
        attack = jnp.asarray([self.attacks.index(a) for a, _, _ in runs], jnp.int32)
        strength = jnp.asarray([s for _, s, _ in runs], jnp.float32)
        byz = jnp.asarray([[i < (0 if a == "none" else f) for i in range(N_NODES)] for a, _, _ in runs])
        return keys, attack, strength, byz

    def curve(self, defence: tuple[str, int, tuple], f: int, runs: list[tuple[str, float, int]], points: int) -> list[dict]:
        """The scores of `runs` ((attack, strength, seed) each) after each of `points` equal
        shares of the rounds, evaluated along the way (the learning-rate schedule is the
        whole budget's, as in the grid)."""
        threat = self.threats(f, runs)
        state = self.start(*threat, jnp.int32(self.defences.index(defence)))
        out, done_rounds = [], 0
        for p in range(1, points + 1):
            n = self.rounds * p // points - done_rounds
            state, done_rounds = self.advance(state, n), done_rounds + n
            scores = evaluated(self.cfg, self.evaluate(self.deployed(state)))
            out += [{"method": self.method, "aggregator": self.row_name(defence), "f_assumed": defence[1], "f": 0 if a == "none" else f, "attack": a,
                     "strength": s, "seed": seed, "rounds": done_rounds, "env_steps": done_rounds * self.steps_per_round,
                     **score, **({"train_set": self.train_set} if self.train_set else {}), "commit": COMMIT}
                    for (a, s, seed), score in zip(runs, scores)]
            print(f"  {done_rounds} rounds: " + ", ".join(f"{a} {np.mean([r['score'] for r in out[-len(runs):] if r['attack'] == a]):.3f}"
                                                      for a in dict.fromkeys(a for a, _, _ in runs)), flush=True)
        return out

    def run(self, defence: tuple[str, int, tuple], f: int, cells: list[tuple[str, float]], seeds: int) -> list[dict]:
        runs = [(a, s, seed) for a, s in cells for seed in range(seeds)]
        weights, skipped = self.train(*self.threats(f, runs), jnp.int32(self.defences.index(defence)))
        scores = evaluated(self.cfg, self.evaluate(weights))
        return [
            {"method": self.method, "aggregator": self.row_name(defence), "f_assumed": defence[1], "f": 0 if a == "none" else f,
             "attack": a, "strength": s, "seed": seed, **score, "skipped_rounds": float(k), "commit": COMMIT}
            for (a, s, seed), score, k in zip(runs, scores, np.asarray(skipped))
        ]


def defence_name(defence) -> str:
    return "+".join((*defence[2], defence[0]))


# What the constrained objective's score reads (trainers.eval_score).
SCORED = ("reward", "arrivals", "served", "forwarded", "dropped", "rejected", "slo_attainment", "quality")


def make_evaluator(cfg, network, per_node: bool):
    """weights stacked over runs -> the SCORED metrics (runs, regions, seeds, ticks) (greedy,
    diurnal, common seeds)."""
    params = cluster_params(cfg, "diurnal")
    env, eparams = evaluation.eval_env(cfg, params)
    policy = learned_policy.greedy_policy(network)

    def one(w):
        m = evaluation.run_episodes(env, policy, eparams, jax.random.PRNGKey(123), EVAL_SEEDS, EVAL_TICKS, w, per_node_state=per_node)
        return {k: m[k] for k in SCORED}

    return jax.jit(jax.vmap(one))


def evaluated(cfg, metrics) -> list[dict]:
    """Per run, over regions EVAL_FROM..9: the constrained objective's score (mean reward
    minus 10 x each region's violated share: a policy that serves users worse scores
    lower, whatever it saves) and the mean reward (cost and quality only under it)."""
    honest = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, nodes=cfg.cluster.nodes[EVAL_FROM:]))
    metrics = {k: np.asarray(v)[:, EVAL_FROM:] for k, v in metrics.items()}
    runs = next(iter(metrics.values())).shape[0]
    return [{"score": trainers.eval_score(honest, {k: v[i] for k, v in metrics.items()}),
             "reward": float(metrics["reward"][i].mean())} for i in range(runs)]


def steps_per_round(cfg) -> int:
    """Env steps one round takes over every region."""
    return cfg.ppo.rollout_steps * cfg.env.num_clusters * N_NODES * cfg.federated.local_updates


def strength_key(x: float) -> float:
    """A strength to 4 significant digits, to group runs by (1e-12 stays 1e-12)."""
    return float(f"{x:.4g}")


def strength_value(s, f: int) -> float:
    return attacks.alie_z_max(N_NODES, f) if s is None else float(s)


RUNS = HERE / "robustness_runs"
GRID_ARGS = RUNS / "command.json"  # the grid's arguments, for --render-only and --curve
COMMIT = code_commit()


def load() -> list[dict]:
    """Every run recorded so far (records before the methods existed are skipped)."""
    return [r for f in sorted(RUNS.glob("*.json")) if f != GRID_ARGS for r in json.loads(f.read_text()) if "method" in r]


def on_policy(records: list[dict]) -> list[dict]:
    """The runs trained with on-policy cluster rollouts: only they count as done or are
    compared with new runs (bench_common.ON_POLICY_ROLLOUTS)."""
    return [r for r in records if on_policy_rollouts(r.get("commit", "unknown"))]


def current_simulator(records: list[dict]) -> list[dict]:
    """The runs on the current simulator (bench_common.SIMULATOR_CHANGE), which came after
    on-policy rollouts: only they count as done or are compared with new curves."""
    return [r for r in records if has_change(r.get("commit", "unknown"), SIMULATOR_CHANGE)]


def save(name: str, records: list[dict]) -> None:
    RUNS.mkdir(exist_ok=True)
    (RUNS / f"{name}.json").write_text(json.dumps(records, indent=0))


def cell(records: list[dict], method: str, defence: tuple, f: int, attack: str) -> list[dict]:
    return [r for r in records if (r["method"], r["aggregator"], r["f_assumed"], r["f"], r["attack"])
            == (method, defence_name(defence), defence[1], f, attack)]


def rows(method: str, args) -> list[str]:
    """The aggregator rows (nnm+X included) the grid runs for `method`."""
    if is_personal(method):
        return args.personal_aggregators if method == "personal" else getattr(args, "pull_aggregators", [])
    return {"shared": [*args.aggregators, *args.pre], "momentum": args.momentum_aggregators}[method]


def done(records: list[dict], method: str, defence: tuple, f: int, attack: str, strength: float, seeds: int) -> bool:
    return sum(abs(r["strength"] - strength) < 1e-6 for r in cell(records, method, defence, f, attack)) >= seeds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--f", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2_500_000)
    ap.add_argument("--aggregators", nargs="*", default=list(aggregators.AGGREGATORS), choices=list(aggregators.AGGREGATORS))
    ap.add_argument("--pre", nargs="*", default=["nnm+multi_krum", "arc+multi_krum"],
                    help="rows with pre-aggregators: PRE[+PRE...]+AGGREGATOR")
    ap.add_argument("--personal-aggregators", nargs="+", default=["mean", "multi_krum"],
                    help="the rows (aggregator names, nnm+X included) run for the personal method")
    ap.add_argument("--pull-aggregators", nargs="+", default=["nnm+multi_krum"],
                    help="the rows run for each personal-pullP method")
    ap.add_argument("--momentum-aggregators", nargs="+", default=["mean", "nnm+multi_krum"],
                    help="the rows run for the momentum method")
    ap.add_argument("--attacks", nargs="+", default=["none", "sign_flip", "alie", "ipm", "nan", "huge", "normaliser_poisoning"],
                    choices=ATTACKS)
    ap.add_argument("--sweep", action="store_true", help="every strength of STRENGTHS, not only the first")
    ap.add_argument("--local", action="store_true", help="also run the Local-only reference")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--part", default="0/1", help="k/P: run every P-th batch starting at k")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="curves only: train under this config override too (repeatable); the runs are labelled with it and "
                         "compared only with runs trained the same way, Local-only's included")
    ap.add_argument("--curve", type=int, default=0, metavar="POINTS",
                    help="instead of the grid: the learning curves of these rows and attacks, evaluated at POINTS budgets (robustness_curve.json)")
    args = ap.parse_args()
    recorded = json.loads(GRID_ARGS.read_text()) if GRID_ARGS.exists() else None
    mine = {k: v for k, v in vars(args).items() if k not in ("part", "render_only", "curve", "set")}
    if args.set and not args.curve:
        ap.error("--set trains curves under other settings: give it with --curve")
    if args.curve or args.render_only:  # the grid's own command draws the grid's header
        grid_args = argparse.Namespace(**recorded) if recorded else args
    elif recorded and {k: v for k, v in recorded.items() if k != "later"} != mine:
        # A later grid command adds cells to the recorded grid (finished cells are skipped):
        # the header names the first command and then each later one, at the same budget.
        if recorded["steps"] != args.steps:
            ap.error(f"--steps {args.steps}: the recorded grid ran at {recorded['steps']}; move robustness_runs/ aside for a new budget")
        argv = sys.argv[1:]
        shown = [a for i, a in enumerate(argv) if not a.startswith("--part") and (i == 0 or argv[i - 1] != "--part")]
        command = "python benchmarks/robustness.py " + " ".join(shown)
        recorded["later"] = [*dict.fromkeys([*recorded.get("later", []), command])]
        GRID_ARGS.write_text(json.dumps(recorded))
        grid_args = argparse.Namespace(**recorded)
    else:
        RUNS.mkdir(exist_ok=True)
        GRID_ARGS.write_text(json.dumps(mine))
        grid_args = args
    for row in args.pre:
        agg, pre = label(row)
        if agg not in aggregators.AGGREGATORS or not pre or any(p not in aggregators.PRE_AGGREGATORS for p in pre):
            ap.error(f"--pre {row!r}: expected PRE+AGGREGATOR with PRE in {sorted(aggregators.PRE_AGGREGATORS)} and AGGREGATOR in {sorted(aggregators.AGGREGATORS)}")
    records = load()
    part, parts = map(int, args.part.split("/"))
    if args.curve and not args.render_only:
        run_curves(args)
    elif not args.render_only:
        if args.local and part == 0 and not any(r["aggregator"] == "local-only" for r in records):
            t0 = time.perf_counter()
            save("local-only", Study(args.steps, args.attacks, LOCAL, args.pre).run(NO_DEFENCE, 0, [("none", 0.0)], args.seeds))
            print(f"local-only: {time.perf_counter() - t0:.0f} s", flush=True)
        batches = [(m, f, name) for m in args.method for f in args.f for name in rows(m, args) if allowed(label(name)[0], f)]
        studies = {}
        for method, f, name in batches[part::parts]:
            defence = defence_for(name, f)
            cells = [(a, strength_value(s, f)) for a in args.attacks for s in STRENGTHS[a][: None if args.sweep else 1]]
            cells = [(a, s) for a, s in cells if not done(on_policy(records), method, defence, 0 if a == "none" else f, a, s, args.seeds)]
            if not cells:
                continue
            study = studies.get(method) or studies.setdefault(method, Study(args.steps, args.attacks, method, args.pre))
            t0 = time.perf_counter()
            save(f"{method}-{name}-f{f}-{len(list(RUNS.glob(f'{method}-{name}-f{f}-*')))}", study.run(defence, f, cells, args.seeds))
            print(f"{method} {name} f={f}: {len(cells) * args.seeds} runs in {time.perf_counter() - t0:.0f} s", flush=True)
        records = load()
    render(records, grid_args)


CURVE = HERE / "robustness_curve.json"


def load_curve() -> dict:
    """The curves recorded so far. Runs that predate the current simulator (and so on-policy
    rollouts) are set aside, with the commit whose robustness_curve.json still holds them:
    their levels are not comparable with the runs after, and they must not count as done."""
    if not CURVE.exists():
        return {"commands": [], "records": []}
    data = json.loads(CURVE.read_text())
    fresh = current_simulator(data["records"])
    if len(fresh) < len(data["records"]):
        last = subprocess.run(["git", "log", "-1", "--format=%h", "--", str(CURVE)], cwd=HERE, capture_output=True, text=True).stdout.strip()
        # That file names in its own set_aside where runs set aside before it are kept.
        data = {**data, "records": fresh, "set_aside": {"runs": len(data["records"]) - len(fresh), "commit": last}}
        if not fresh:
            data.update(commands=[], seconds=0.0)
    return data


def run_curves(args) -> None:
    """Learning curves of the requested rows under the requested attacks (first strength;
    every one with --sweep), added to robustness_curve.json (a run already there at the
    same budget is not re-run)."""
    data = load_curve()
    command = "python benchmarks/robustness.py " + " ".join(sys.argv[1:])
    batches = [(method, f, defence_for(name, f)) for method in args.method for f in args.f for name in rows(method, args)
               if allowed(label(name)[0], f)]
    for method, f, defence in batches + ([(LOCAL, 3, NO_DEFENCE)] if args.local else []):
        aggregator = "local-only" if method == LOCAL else defence_name(defence)
        have = {(r["attack"], strength_key(r["strength"]), r["seed"]) for r in data["records"]
                if (r["method"], r["aggregator"], r["f_assumed"]) == (method, aggregator, defence[1]) and r["f"] in (0, f)
                and r["env_steps"] >= 0.99 * args.steps and r.get("train_set", "") == " ".join(args.set)}
        cells = [(a, strength_value(x, f)) for a in (["none"] if method == LOCAL else args.attacks)
                 for x in STRENGTHS[a][: None if args.sweep else 1]]
        runs = [(a, x, seed) for a, x in cells for seed in range(args.seeds) if (a, strength_key(x), seed) not in have]
        if not runs:
            continue
        study = Study(args.steps, args.attacks, method, args.pre, args.set)
        t0 = time.perf_counter()
        print(f"{method} {aggregator} f={f}: curve of {len(runs)} runs", flush=True)
        data["records"] += study.curve(defence, f, runs, args.curve)
        data["commands"] = [*dict.fromkeys([*data["commands"], command])]
        data["seconds"] = data.get("seconds", 0.0) + time.perf_counter() - t0
        data["machine"] = f"{os.cpu_count()}-core {platform.machine()} CPU, jax {jax.__version__}"
        CURVE.write_text(json.dumps(data, indent=0))
        jax.clear_caches()
    plot_curves(data)


def trained_as(data: dict, train_set: str = "") -> dict:
    """The curves trained under `train_set` (a run's `--set` overrides, joined; "": the
    study's own config): runs trained otherwise are never compared with them."""
    return {**data, "records": [r for r in data["records"] if r.get("train_set", "") == train_set]}


def other_settings(data: dict) -> list[str]:
    """Per `--set` the curves ran under: their table and their lead over Local-only trained
    the same way."""
    lines = []
    for train_set in dict.fromkeys(r["train_set"] for r in data["records"] if r.get("train_set")):
        sub = trained_as(data, train_set)
        lines += [f"### Trained with `{train_set}`", "",
                  "The rows below, Local-only's included, trained with these overrides on top of the study's config; compared only "
                  "with one another.", "", *curve_table(sub), "", *versus_local(sub)]
        recs = curve_view(sub, F_AIM)["records"]
        n = max(r["env_steps"] for r in recs)
        for m, a in dict.fromkeys((r["method"], r["aggregator"]) for r in recs if r["aggregator"] != "local-only"):
            sentence = lead_sentence(recs, m, a, n)
            if sentence:
                lines += [f"At {n / 1e6:.3g}M env steps, {m} {a}, both it and Local-only trained with `{train_set}`{sentence}.", ""]
    return lines


def curve_view(data: dict, f: int) -> dict:
    """The curves of the f grid: runs attacked by f regions and the no-attack runs of the
    defence each row uses at f (its assumed f is part of it); Local-only's for every f."""
    return {**data, "records": [r for r in data["records"] if r["aggregator"] == "local-only" or in_grid(r, f)]}


def curve_key(r: dict) -> tuple:
    """A curve: one row (with the f its defence assumes) under one attack at one strength."""
    return r["method"], r["aggregator"], r["f_assumed"], r["f"], r["attack"], strength_key(r["strength"])


def attack_label(key: tuple) -> str:
    _, _, assumed, f, attack, strength = key
    if attack == "none":
        return "none" if assumed in (0, F_AIM) else f"none (defence at f = {assumed})"
    return f"{attack} {strength:g} (f = {f})"


def paired_means(no_attack: dict[int, float], attacked: dict[int, float]) -> tuple[float, float, int, float] | None:
    """Seed -> score of a row's no-attack and attacked runs -> (attacked mean, no-attack
    mean, how many seeds, standard error of the mean seed-by-seed difference; nan below 2
    seeds) on the seeds both ran, so an attack run on fewer seeds is not judged against
    other seeds' luck; None without a common seed."""
    seeds = sorted(no_attack.keys() & attacked.keys())
    if not seeds:
        return None
    diff = [attacked[k] - no_attack[k] for k in seeds]
    stderr = float(np.std(diff, ddof=1) / np.sqrt(len(seeds))) if len(seeds) > 1 else float("nan")
    return float(np.mean([attacked[k] for k in seeds])), float(np.mean([no_attack[k] for k in seeds])), len(seeds), stderr


def paired_cells(recs: list[dict], method: str, aggregator: str, env_steps: int) -> dict[tuple[str, float], tuple[float, float, int, float]]:
    """(attack, strength) -> paired_means of a row's runs at `env_steps` against its no-attack runs."""
    by_cell: dict[tuple[str, float], dict[int, float]] = {}
    for r in recs:
        if (r["method"], r["aggregator"]) == (method, aggregator) and abs(r["env_steps"] - env_steps) <= 0.01 * env_steps:
            by_cell.setdefault((r["attack"], strength_key(r["strength"])), {})[r["seed"]] = r["score"]
    pairs = {k: paired_means(by_cell.get(("none", 0.0), {}), runs) for k, runs in by_cell.items()}
    return {k: v for k, v in pairs.items() if v is not None}


def curve_table(data: dict) -> list[str]:
    """Score (mean over seeds) of each curve at each budget, and for each attack the share
    of the same row's no-attack score it keeps there, on the seeds both ran."""
    recs = data["records"]
    steps = sorted({r["env_steps"] for r in recs})
    runs = lambda key, n: [r["score"] for r in recs if curve_key(r) == key and r["env_steps"] == n]  # noqa: E731
    mean = lambda key, n: np.mean(runs(key, n) or [np.nan])  # noqa: E731
    lines = ["| method | aggregator | attack | seeds | " + " | ".join(f"{n / 1e6:.3g}M" for n in steps) + " |",
             "|---|---|---|---|" + "---|" * len(steps)]
    for key in dict.fromkeys(curve_key(r) for r in recs):
        lines.append(f"| {key[0]} | {key[1]} | {attack_label(key)} | {max(len(runs(key, n)) for n in steps)} | "
                     + " | ".join("-" if np.isnan(mean(key, n)) else f"{mean(key, n):.3f}" for n in steps) + " |")
        if key[4] != "none":
            base = (key[0], key[1], key[2], 0, "none", 0.0)
            by_seed = lambda k, n: {r["seed"]: r["score"] for r in recs if curve_key(r) == k and r["env_steps"] == n}  # noqa: E731
            pairs = [paired_means(by_seed(base, n), by_seed(key, n)) for n in steps]
            lines.append("| | | kept | | " + " | ".join("-" if p is None else kept_text(p) for p in pairs) + " |")
    return lines


# What a lead over Local-only is made of: the score, its mean reward (cost and quality),
# and its constraint penalty (score - reward, so a lead there is fewer violations).
PARTS = {"score": lambda r: r["score"], "reward": lambda r: r["reward"], "penalty": lambda r: r["score"] - r["reward"]}


def lead_over_local(recs: list[dict], method: str, aggregator: str, env_steps: int, part: str = "score") -> tuple[float, float, int, int] | None:
    """A row's no-attack mean `part` (PARTS) minus Local-only's at `env_steps`, the standard
    error of that difference over training seeds (Welch), and the two seed counts; None
    below 2 seeds each. A lead within about two standard errors cannot be told from a tie."""
    runs = lambda m, a: [PARTS[part](r) for r in recs if (r["method"], r["aggregator"], r["attack"]) == (m, a, "none")  # noqa: E731
                         and abs(r["env_steps"] - env_steps) <= 0.01 * env_steps]
    x, y = runs(method, aggregator), runs(LOCAL, "local-only")
    if len(x) < 2 or len(y) < 2:
        return None
    return float(np.mean(x) - np.mean(y)), float(np.sqrt(np.var(x, ddof=1) / len(x) + np.var(y, ddof=1) / len(y))), len(x), len(y)


def lead_parts(recs: list[dict], method: str, aggregator: str, env_steps: int) -> str:
    """'; of it, reward ... and constraint penalty ...': the lead_over_local of each part."""
    leads = {k: lead_over_local(recs, method, aggregator, env_steps, k) for k in ("reward", "penalty")}
    if None in leads.values():
        return ""
    return (f"; of it, the mean reward (cost and quality) {leads['reward'][0]:+.3f} +- {leads['reward'][1]:.3f} and the constraint "
            f"penalty {leads['penalty'][0]:+.3f} +- {leads['penalty'][1]:.3f} (positive: fewer violations than Local-only)")


def lead_sentence(recs: list[dict], method: str, aggregator: str, env_steps: int) -> str:
    """'; its no-attack lead over Local-only ...: >= Local-only **verdict**', its parts and
    its seed-by-seed count; "" below 2 seeds each."""
    lead, paired = lead_over_local(recs, method, aggregator, env_steps), paired_with_local(recs, method, aggregator, env_steps)
    if lead is None:
        return ""
    return (f"; its no-attack lead over Local-only {lead[0]:+.3f} +- {lead[1]:.3f} ({lead[2]} / {lead[3]} seeds): "
            f">= Local-only **{versus_local_verdict(*lead[:2])}**{lead_parts(recs, method, aggregator, env_steps)}"
            + ("" if paired is None else f"; seed by seed it scores higher than Local-only in {paired[0]} of {paired[1]} seeds "
               f"(median difference {paired[2]:+.3f})"))


def paired_with_local(recs: list[dict], method: str, aggregator: str, env_steps: int) -> tuple[int, int, float] | None:
    """Seed by seed (the seeds both a row's no-attack runs and Local-only ran at
    `env_steps`): in how many the row scores higher, of how many, and the median of the
    differences; None without a common seed. A mean lead that one Local-only seed's
    collapse makes shows here as a minority of seeds."""
    def by_seed(m, a):
        return {r["seed"]: r["score"] for r in recs if (r["method"], r["aggregator"], r["attack"]) == (m, a, "none")
                and abs(r["env_steps"] - env_steps) <= 0.01 * env_steps}
    x, y = by_seed(method, aggregator), by_seed(LOCAL, "local-only")
    common = sorted(x.keys() & y.keys())
    if not common:
        return None
    diff = np.array([x[k] - y[k] for k in common])
    return int((diff > 0).sum()), len(common), float(np.median(diff))


def versus_local(data: dict) -> list[str]:
    """Each federated row's lead over Local-only (lead_over_local) at every budget of the
    curves, the rows' defences as at f = 3."""
    recs = curve_view(data, F_AIM)["records"]
    steps = sorted({r["env_steps"] for r in recs if r["aggregator"] == "local-only"})
    fed = [(m, a) for m, a in dict.fromkeys((r["method"], r["aggregator"]) for r in recs if r["aggregator"] != "local-only")
           if any(lead_over_local(recs, m, a, n) for n in steps)]
    if len(steps) < 2 or not fed:
        return []
    lines = ["Federation against Local-only, no attack: each row's mean score minus Local-only's at the same budget, +- the standard "
             "error of the difference over training seeds (seeds of the row / of Local-only); positive: federation leads. Under each row, the "
             "lead split into its two parts: the mean reward (cost and quality) and the constraint penalty (score - reward; positive: "
             "fewer violations than Local-only).", "",
             "| method | aggregator | " + " | ".join(f"{n / 1e6:.3g}M" for n in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for m, a in fed:
        for part in PARTS:
            leads = [lead_over_local(recs, m, a, n, part) for n in steps]
            head = f"| {m} | {a} |" if part == "score" else f"| | of which {part} |"
            lines.append(f"{head} " + " | ".join("-" if c is None else f"{c[0]:+.3f} +- {c[1]:.3f}" + (f" ({c[2]} / {c[3]})" if part == "score" else "")
                                                 for c in leads) + " |")
    return lines + [""]


def best_curve_row(data: dict):
    """At the curves' last budget n, of the rows run there under every attack and strength
    any row met there (a row run at fewer strengths has fewer chances to meet its worst):
    the one with the best worst cell (an attack that cannot reach a row, normaliser
    poisoning for personal policies, is its noise, not an attack on it). A row's worst cell
    is the one that keeps least of its no-attack score on the seeds both ran
    (paired_cells). -> ((method, aggregator), (worst score, (attack, strength))), the rows
    compared, the attacks, n, the rows' paired cells; None without one."""
    recs = data["records"]
    n = max((r["env_steps"] for r in recs), default=0)
    every = {(r["attack"], strength_key(r["strength"])) for r in recs if abs(r["env_steps"] - n) <= 0.01 * n and r["attack"] != "none"}
    worst, cells = {}, {}
    for m, a in dict.fromkeys((r["method"], r["aggregator"]) for r in recs if r["aggregator"] != "local-only"):
        cells[(m, a)] = paired_cells(recs, m, a, n)
        if ("none", 0.0) in cells[(m, a)] and every <= cells[(m, a)].keys():
            reach = {k for k in every if not (is_personal(m) and k[0] == "normaliser_poisoning")}
            if not reach:
                continue
            key = min((k for k in cells[(m, a)] if k in reach), key=lambda k: kept_share(*cells[(m, a)][k][1::-1]))  # ties: the first run
            worst[(m, a)] = (cells[(m, a)][key][0], key)
    if not worst:
        return None
    return max(worst.items(), key=lambda kv: kv[1][0]), list(worst), sorted({k[0] for k in every}), n, cells


def curve_aim(data: dict, f: int = F_AIM) -> list[str]:
    """The aim at the curves' last budget, where the no-attack runs have levelled off, with
    f regions Byzantine, for the best row there (best_curve_row): its kept share and its
    lead over Local-only; and FedAvg's worst cell there where it ran."""
    data = curve_view(data, f)
    best = best_curve_row(data)
    if best is None:
        return []
    ((m, a), (score, (attack, strength))), compared, every, n, cells = best
    _, base, seeds, stderr = cells[(m, a)][(attack, strength)]
    kept, kept_err = kept_share(base, score), stderr / max(abs(base), 1e-9)
    swept = sorted({k for k, _ in cells[(m, a)] if sum(j == k for j, _ in cells[(m, a)]) > 1})
    poison = [(k[1], kept_share(b, v)) for k, (v, b, *_) in cells[(m, a)].items() if is_personal(m) and k[0] == "normaliser_poisoning"]
    return [f"{'Aim' if f == F_AIM else 'The same'} at {n / 1e6:.3g}M env steps ({f} of 10 regions Byzantine from round 0; rows run there under every attack "
            f"and strength any row ran: {', '.join(f'{x} {y}' for x, y in compared)}; attacks {', '.join(every)}; "
            f"{'strengths swept for ' + ', '.join(swept) if swept else 'first strength each'}): the best by its worst "
            f"cell is **{m} {a}**, {score:.3f} under {attack} ({strength:g}) against {base:.3f} with no attack on the same {seeds} seeds: keeps "
            f"{100 * kept:.0f} % +- {100 * kept_err:.0f} (standard error of the seed-by-seed difference), >= 90 % "
            f"**{keep_verdict(kept, kept_err)}**"
            + lead_sentence(data["records"], m, a, n)
            + (f". Noise at this budget: normaliser poisoning ({', '.join(f'{k:g}' for k, _ in poison)}), which cannot reach this "
               f"row's policies, reads {' / '.join(f'{100 * q:.0f} %' for _, q in poison)} kept" if poison else "")
            + f". {fedavg_at(paired_cells(data['records'], 'shared', NO_DEFENCE[0], n))}.", ""]


def curve_aims(data: dict) -> list[str]:
    """curve_aim at f = 3 (the issue's aim), then at each other f the curves ran."""
    return [line for f in [F_AIM, *sorted({r["f"] for r in data["records"]} - {0, F_AIM})] for line in curve_aim(data, f)]


def kept_text(pair: tuple[float, float, int, float]) -> str:
    """'71 %', or '71 +- 12 %' with the paired standard error where there are 2 or more seeds."""
    kept, err = kept_share(pair[1], pair[0]), pair[3] / max(abs(pair[1]), 1e-9)
    return f"{100 * kept:.0f} %" if np.isnan(err) else f"{100 * kept:.0f} +- {100 * err:.0f} %"


def keep_verdict(kept: float, err: float) -> str:
    """The >= 90 % aim on the mean, and whether a miss lies within two standard errors of it
    (then more seeds could still turn it)."""
    if kept >= 0.9:
        return "met"
    return "not met" + (", within two standard errors of 90 %" if 0.9 - kept < 2 * err else "")


def versus_local_verdict(lead: float, stderr: float) -> str:
    """A lead over Local-only counts as met where it is at least two standard errors above
    a tie: a mean lead inside that band is a tie, not shown either way."""
    if abs(lead) < 2 * stderr:
        return f"not shown: {'ahead' if lead >= 0 else 'behind'} on the mean, within two standard errors of a tie"
    return "met" if lead > 0 else "not met"


def fedavg_at(cells: dict[tuple[str, float], tuple[float, float, int, float]]) -> str:
    """FedAvg's (one shared policy, plain mean) worst attack cell (paired_cells) against its
    no-attack score on the same seeds at one budget, and whether it collapses (keeps < 50 %)."""
    attacked = {k: v for k, v in cells.items() if k[0] != "none"}
    if not attacked:
        return "FedAvg did not run at this budget; its collapse is shown at the grid's budget above"
    (attack, strength), (score, base, *_) = min(attacked.items(), key=lambda kv: kept_share(kv[1][1], kv[1][0]))
    kept = kept_share(base, score)
    return (f"FedAvg at this budget: {score:.3g} under {attack} ({strength:g}) against {base:.3f} with no attack, keeps "
            f"{100 * kept:.0f} %: collapses (keeps < 50 %) **{'yes' if kept < 0.5 else 'no'}**")


def noise_floor(data: dict) -> list[str]:
    """A personal policy keeps its own normaliser, so normaliser poisoning cannot reach it:
    a personal row's poisoned runs differ from its no-attack runs only by run-to-run noise
    where the two ran in different batches (float reductions reorder). Their lowest kept
    share over the budgets is the floor above which "kept" cannot be told from no harm; in
    one batch the two are equal."""
    recs = curve_view(data, F_AIM)["records"]
    out = []
    for method, agg in dict.fromkeys((r["method"], r["aggregator"]) for r in recs if is_personal(r["method"])):
        steps = sorted({r["env_steps"] for r in recs if (r["method"], r["aggregator"], r["attack"]) == (method, agg, "normaliser_poisoning")})
        kept = {(n, k): kept_share(base, v) for n in steps for k, (v, base, *_) in paired_cells(recs, method, agg, n).items()
                if k[0] == "normaliser_poisoning"}
        if kept and min(kept.values()) >= 1.0:
            out.append(f"Normaliser poisoning leaves {method} {agg} exactly at its no-attack score at every budget: the two cells "
                       "ran in one batch, and the attack cannot reach its policies (each keeps its own normaliser). Between "
                       "batches, run-to-run noise is not measured by these runs.")
        elif kept:
            n, k = min(kept, key=kept.get)
            out.append(f"Noise floor: {method} {agg} keeps {100 * kept[(n, k)]:.0f} % of its no-attack score under normaliser poisoning "
                       f"({k[1]:g}) at {n / 1e6:.3g}M env steps, an attack that cannot reach its policies (each keeps its own normaliser): "
                       "the two cells ran in different batches, so that gap is run-to-run noise: a kept share between it and 100 % cannot "
                       "be told from no harm at these seed counts.")
    return out + [""] if out else []


def plot_curves(data: dict) -> None:
    """Left: every row's no-attack curve and Local-only's; right: the best row at the last
    budget (best_curve_row) under each attack and strength. Mean +- standard error over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curve_view(trained_as(data), F_AIM)
    recs = data["records"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    best = best_curve_row(data)
    for key in dict.fromkeys(curve_key(r) for r in recs):
        on_left, on_right = key[4] == "none", best is not None and key[:2] == best[0][0]
        for ax in [ax for ax, on in ((left, on_left), (right, on_right)) if on]:
            steps = sorted({r["env_steps"] for r in recs if curve_key(r) == key})
            scores = [[r["score"] for r in recs if curve_key(r) == key and r["env_steps"] == n] for n in steps]
            se = [np.std(s, ddof=1) / np.sqrt(len(s)) if len(s) > 1 else 0.0 for s in scores]
            style = {"color": "black", "linestyle": "--"} if key[0] == LOCAL else {}
            ax.errorbar(np.asarray(steps) / 1e6, [np.mean(s) for s in scores], yerr=se, marker="o", capsize=3,
                        label=f"{key[0]} {key[1]}" if ax is left else attack_label(key), **style)
    left.set_title("No attack: every row and Local-only", fontsize=10)
    right.set_title("" if best is None else f"{' '.join(best[0][0])} under attack", fontsize=10)
    left.set_ylabel("constrained objective of regions 3..9 (higher is better)")
    for ax in (left, right):
        ax.set_xlabel("env steps (millions); mean +- s.e. over seeds")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(CURVE.with_suffix(".png"), dpi=110)
    plt.close(fig)


def summarise(records: list[dict], method: str, defence: tuple, f: int, attack: str) -> tuple[float, float, float] | None:
    """(mean over seeds, worst seed, strength) at the attack's most damaging strength."""
    by_strength: dict[float, list[float]] = {}
    for r in cell(records, method, defence, f, attack):
        by_strength.setdefault(strength_key(r["strength"]), []).append(r["score"])
    if not by_strength:
        return None
    strength, rewards = min(by_strength.items(), key=lambda kv: np.mean(kv[1]))
    return float(np.mean(rewards)), float(np.min(rewards)), strength


def kept_share(base: float, worst: float) -> float:
    """Scores are negative (costs, penalties): "keeps 90 %" reads as losing at most 10 % of
    the no-attack score's distance to zero."""
    return 1.0 - max(base - worst, 0.0) / max(abs(base), 1e-9)


def in_grid(record: dict, f: int) -> bool:
    """Whether a run belongs to the f grid: attacked by f regions, or a no-attack run of the
    defence the grid uses at f (a robust aggregator's assumed f is part of it)."""
    assumed = record.get("f_assumed", f)
    return record["f"] == f or (record["attack"] == "none" and assumed == defence_for(record["aggregator"], f)[1])


def aim_statement(summary: dict[str, tuple[float, float, str]], f: int, local: float | None) -> str:
    """The issue's aim, checked on the table: the best robust method keeps >= 90 % of its
    own no-attack return under every attack, FedAvg collapses under at least one, and the
    best robust method's no-attack return is at least Local-only's. The grid's budget is
    short of convergence: `curve_aim` checks the aim again where the curves level off."""
    robust = {k: v for k, v in summary.items() if label(k.split(" ")[-1])[0] != "mean"}
    fedavg = [v for k, v in summary.items() if label(k.split(" ")[-1])[0] == "mean"]
    if not robust or not fedavg:
        return ""
    best = max(robust, key=lambda k: robust[k][1])
    base, worst, attack = robust[best]
    collapsed = min(kept_share(b, w) for b, w, _ in fedavg) < 0.5
    met_keep = kept_share(base, worst) >= 0.9
    met_local = local is not None and base >= local
    return (f"Best robust method at f = {f} by its worst attack: **{best}**, {worst:.3f} under {attack} ({base:.3f} without attack, "
            f"{100 * kept_share(base, worst):.0f} % kept); FedAvg keeps {100 * min(kept_share(b, w) for b, w, _ in fedavg):.0f} % at worst; "
            f"Local-only {local if local is None else round(local, 3)}. Aims: keeps >= 90 % **{'met' if met_keep else 'not met'}**; "
            f"FedAvg collapses (keeps < 50 %) **{'yes' if collapsed else 'no'}**; no-attack return >= Local-only's "
            f"**{'met' if met_local else 'not met'}**. At this budget the no-attack runs have not levelled off: the aim at the "
            "learning curves' budget is under *Learning curves*.")


def render(records: list[dict], args) -> None:
    fresh = on_policy(records)
    records = fresh or records
    seeds = max((r["seed"] for r in records), default=-1) + 1
    cfg = study_config(args.steps, ["federated.mode=federated"])
    lines = [
        "# Robustness to Byzantine regions",
        "",
        f"Command: `python benchmarks/robustness.py --method {' '.join(args.method)} --f {' '.join(map(str, args.f))} --seeds {args.seeds} "
        f"--steps {args.steps} --aggregators {' '.join(args.aggregators)} --pre {' '.join(args.pre)} "
        f"--personal-aggregators {' '.join(args.personal_aggregators)} "
        + (f"--pull-aggregators {' '.join(args.pull_aggregators)} " if any(m.startswith(("personal-pull", "personal-offset")) for m in args.method) else "")
        + (f"--momentum-aggregators {' '.join(args.momentum_aggregators)} " if "momentum" in args.method else "")
        + f"--attacks {' '.join(args.attacks)}"
        f"{' --local' if args.local else ''}`" + "".join(f", then `{c}`" for c in getattr(args, "later", []))
        + " (results accumulate in robustness_runs/; `--part k/P` splits the grid over P processes; "
        f"`--render-only` redraws this file); machine: {os.cpu_count()}-core {platform.machine()} CPU, jax {jax.__version__}; "
        f"code at commit {', '.join(sorted({r.get('commit', 'unknown') for r in records}))}.",
        "",
        f"Setup: the ten-region cluster env ({cfg.env.kind}), {cfg.env.num_clusters} simulated clusters per region, {args.steps:,} env steps "
        f"({trainers.num_rounds(cfg)} rounds of {cfg.federated.local_updates} local PPO updates per region), the main job's constrained "
        "objective. Regions 0..f-1 (us-east, us-west, eu-west) are Byzantine from round 0; each robust aggregator assumes the true f "
        "(geometric median and centered clipping do not use f; FedAvg assumes f = 0). Return: the constrained objective's score of the policies "
        f"regions {EVAL_FROM}..9 deploy (mean reward per tick minus 10 x each region's violated share of its attainment, drop and "
        f"quality limits, trainers.eval_score; greedy, diurnal training scenario, {EVAL_SEEDS} evaluation seeds x 1 day, common seeds for every run); "
        f"{seeds} training seeds per cell. Methods: *shared* (one robust global policy), *momentum* (the same, each region sending the "
        f"momentum of its deltas, beta = {WORKER_MOMENTUM}, Karimireddy et al. 2021) and *personal* (each region's own policy pulled "
        "1 % of the way to the robust global per round, the main job's at the time; *personal-pullP*: P of the way; *personal-offsetP*: "
        "the same, each region sending its model's offset from the global instead of its round's delta, so the global is the robust "
        "centre of the regions' models, federated.personal_sends; *-annealed*: the pull fades with the learning rate, "
        "federated.personal_mix_anneal; *-own-critics*: the value and cost critics stay each region's own, never pulled; *-own-heads*: "
        "so does the actor's output layer, a personal head on pulled hidden layers, federated.personal_own). nnm+X: nearest-neighbour "
        "mixing before X; arc+X: adaptive robust clipping before X.",
        "",
        f"Attack strengths ({'swept; the worst, by mean over seeds, is reported' if args.sweep else 'the first of each list'}"
        f"{'' if args.sweep or not any('--sweep' in c for c in getattr(args, 'later', [])) else '; every one of each list for the rows of the later commands run with --sweep, each cell at its most damaging'}): "
        f"{STRENGTHS} (None: ALIE's z_max(n, f)). Each cell: mean over seeds / worst seed, at the worst strength. *worst attack*: the "
        "lowest cell mean minus the same row's no-attack mean. *kept*: 1 - (no-attack mean - lowest cell mean) / |no-attack mean| "
        "(scores are negative: costs and penalties).",
        "",
        *([] if fresh or not records else [
            f"Every grid run below predates commit {ON_POLICY_ROLLOUTS}, from which each local rollout of a round acts with the "
            "latest update's policy; before it, all of a round's rollouts acted with the round's starting policy. They also predate "
            f"the simulator's last change (commit {SIMULATOR_CHANGE}). The grid's rows compare with one another, trained alike; "
            "*Learning curves* below holds the runs trained on-policy on the current simulator.", ""]),
    ]
    local_rows = [r["score"] for r in records if r["aggregator"] == "local-only"]
    local = float(np.mean(local_rows)) if local_rows else None
    if local_rows:
        lines += [f"Local-only reference (no federation, immune to attacks): {local:.3f} mean / {min(local_rows):.3f} worst over "
                  f"{len(local_rows)} seeds.", ""]
    names = sorted({r["aggregator"] for r in records if r["aggregator"] != "local-only"},
                   key=lambda n: (list(aggregators.AGGREGATORS).index(label(n)[0]), n))
    for f in sorted({r["f"] for r in records if r["f"] > 0}):
        summary = {}
        present = [a for a in ATTACKS[1:] if any(r["f"] == f and r["attack"] == a for r in records)]
        lines += [f"## f = {f} of 10 regions Byzantine", "",
                  "| method | aggregator | no attack | " + " | ".join(present) + " | worst attack | kept |",
                  "|---|---|" + "---|" * (len(present) + 3)]
        for method in METHODS:
            for name in names:
                d = defence_for(name, f)
                base = summarise(records, method, d, 0, "none")
                cells = {a: summarise(records, method, d, f, a) for a in present}
                if base is None or all(c is None for c in cells.values()):
                    continue
                fmt = lambda c: "-" if c is None else f"{c[0]:.3f} / {c[1]:.3f}"  # noqa: E731
                worst = min((c[0] for c in cells.values() if c is not None), default=np.nan)
                kept = kept_share(base[0], worst)
                shown = "mean (FedAvg)" if name == "mean" else name
                lines.append(f"| {method} | {shown} | {fmt(base)} | " + " | ".join(fmt(cells[a]) for a in present)
                             + f" | {worst - base[0]:+.3f} | {100 * kept:.0f} % |")
                summary[f"{method} {name}"] = (base[0], worst, min(present, key=lambda a: (cells[a] or (np.inf,))[0]))
        lines += ["", aim_statement(summary, f, local), ""]
    curve = load_curve()
    own = trained_as(curve)
    aside = curve.get("set_aside")
    if curve["records"] or aside:
        lines += ["## Learning curves", ""]
    if aside:
        lines += [f"{aside['runs']} earlier curve runs predate on-policy rollouts (commit {ON_POLICY_ROLLOUTS}) or the simulator's "
                  f"last change (commit {SIMULATOR_CHANGE}) and are set aside: `git show {aside['commit']}:benchmarks/robustness_curve.json` "
                  "holds them. Every curve below trained on-policy on the current simulator.", ""]
    if curve["records"]:
        lines += [f"Command: {', then '.join(f'`{c}`' for c in curve['commands'])}; {curve['machine']}, {curve['seconds'] / 60:.0f} min; "
                  f"code at commit {', '.join(sorted({r['commit'] for r in curve['records']}))}. The same study config, one run per "
                  "seed evaluated along the way (so the learning-rate schedule is the whole budget's), "
                  "mean score over the seeds in the *seeds* column. "
                  "[Plot](robustness_curve.png).", "", *curve_table(own), "", *versus_local(own), *curve_aims(own), *noise_floor(own),
                  *other_settings(curve)]
    (HERE / "robustness.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
