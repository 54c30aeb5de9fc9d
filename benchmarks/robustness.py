"""Robustness of federated PPO to Byzantine nodes: final evaluation reward of the global
policy for each aggregator x attack, f of the ten regions Byzantine from round 0, seeds
trained in one vmapped program. Rows are written to the markdown as they finish.

usage: python benchmarks/robustness.py [--f 3] [--seeds 3] [--steps 2000000]
           [--aggregators mean median multi_krum] [--attacks none sign_flip alie nan]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from aro_jax.algorithms import driver, evaluation, learned_policy  # noqa: E402
from aro_jax.algorithms.ppo import Hyperparams  # noqa: E402
from aro_jax.config import load_config  # noqa: E402
from aro_jax.envs.scenarios import cluster_params  # noqa: E402
from aro_jax.envs.serving import ServingNodeEnv  # noqa: E402

EVAL_SEEDS, EVAL_TICKS = 2, 2880
STRENGTH = {"sign_flip": 1.0, "scaled": 10.0, "gaussian": 1.0, "alie": 1.5, "ipm": 0.5}  # one strength each (not swept)


def cell(aggregator: str, attack: str, f: int, seeds: int, steps: int) -> list[float]:
    """Evaluation reward of the final global policy, one value per training seed."""
    byz = list(range(f)) if attack != "none" else []
    overrides = [f"train.total_env_steps={steps}", "train.num_chunks=1", f"federated.aggregator={aggregator}",
                 f"federated.num_byzantine={0 if aggregator == 'mean' else f}", f"federated.attack={attack}",
                 f"federated.byzantine_nodes={byz}", f"federated.attack_strength={STRENGTH.get(attack, 1.0)}"]
    cfg = load_config(None, overrides)
    trainer = driver.make_trainer(cfg)
    hp = Hyperparams.from_config(cfg)
    keys = jax.random.split(jax.random.PRNGKey(cfg.train.seed), seeds)
    states = jax.jit(jax.vmap(trainer.init, in_axes=(0, None)))(keys, hp)
    states, _ = jax.jit(jax.vmap(lambda s: trainer.chunk(s, hp, trainer.units_total)))(states)
    env = ServingNodeEnv(cfg.env.action_set)
    params = cluster_params(cfg, "diurnal")
    policy = learned_policy.greedy_policy(trainer.network)
    rewards = []
    for i in range(seeds):
        weights = trainer.weights(jax.tree.map(lambda x: x[i], states))
        m = evaluation.run_episodes(env, policy, params, jax.random.PRNGKey(123), EVAL_SEEDS, EVAL_TICKS, weights)
        rewards.append(float(np.mean(m["reward"])))
    return rewards


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--f", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2_000_000)
    ap.add_argument("--aggregators", nargs="+", default=["mean", "median", "multi_krum"])
    ap.add_argument("--attacks", nargs="+", default=["none", "sign_flip", "alie", "nan"])
    args = ap.parse_args()
    out = Path(__file__).with_name("robustness.md")
    head = [
        "# Robustness to Byzantine regions (partial grid)",
        "",
        f"Command: `python benchmarks/robustness.py --f {args.f} --seeds {args.seeds} --steps {args.steps} "
        f"--aggregators {' '.join(args.aggregators)} --attacks {' '.join(args.attacks)}`; machine: {os.cpu_count()}-core "
        f"{platform.machine()} CPU, jax {jax.__version__}.",
        "",
        f"Default config (ten regions, 4 local updates per round) trained for {args.steps:,} env steps; regions 0..{args.f - 1} "
        f"send the attack from round 0 (strengths: {STRENGTH}); aggregators assume f = {args.f} (FedAvg: none). Reward: the "
        f"final global policy, greedy, diurnal scenario, {EVAL_SEEDS} evaluation seeds x 10 regions x 1 day, per training seed.",
        "",
        "| aggregator | attack | mean reward | worst seed | per seed | wall s |",
        "|---|---|---|---|---|---|",
    ]
    out.write_text("\n".join(head) + "\n")
    for agg in args.aggregators:
        for attack in args.attacks:
            t0 = time.perf_counter()
            r = cell(agg, attack, args.f, args.seeds, args.steps)
            row = f"| {agg} | {attack} | {np.mean(r):.3f} | {min(r):.3f} | {', '.join(f'{x:.3f}' for x in r)} | {time.perf_counter() - t0:.0f} |"
            with open(out, "a") as fh:
                fh.write(row + "\n")
            print(row, flush=True)


if __name__ == "__main__":
    main()
