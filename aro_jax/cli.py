"""`aro`: the command-line entry point (side effects live here and in the training driver)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

# XLA's concurrency-optimised CPU scheduler can hang large vmapped programs (DESIGN "Speed").
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")


def _cluster_params(cfg, scenario: str):
    from aro_jax.envs import scenarios

    nodes = []
    for n in cfg.cluster.nodes:
        p = scenarios.node_params(scenarios.NodeSpec(**dataclasses.asdict(n)), cfg.env.episode_ticks, cfg.env.tick_s)
        r = cfg.env.reward
        p = p.replace(alpha=r.alpha, beta=r.beta, gamma=r.gamma, slo_penalty=r.slo_penalty)
        nodes.append(scenarios.apply_scenario(p, scenario, cfg.env.data_dir) if scenario != "train" else p)
    return scenarios.stack_params(nodes)


def evaluate_policies(cfg, policies: dict, scenario: str, out_dir: Path, seed: int = 0) -> dict:
    """Run every policy on every node of the cluster on one scenario; write the KPI table
    (markdown/CSV/JSON) and the one-day timeline of the first node; return the rows."""
    import jax
    import numpy as np

    from aro_jax.algorithms import evaluation as ev
    from aro_jax.envs.serving import ServingNodeEnv

    env = ServingNodeEnv(cfg.env.action_set)
    params = _cluster_params(cfg, scenario)
    rows, traces = {}, {}
    for name, policy in policies.items():
        metrics = ev.run_episodes(env, policy, params, jax.random.PRNGKey(seed), cfg.eval.num_seeds, cfg.env.episode_ticks)
        rows[name] = ev.cluster_kpis(metrics, cfg.env.tick_s)
        traces[name] = {k: np.asarray(v[0, 0]) for k, v in metrics.items()}
    ev.save_table(rows, out_dir, f"kpis_{scenario}")
    ev.plot_timeline(traces, cfg.env.tick_s, cfg.cluster.nodes[0].name, out_dir / f"timeline_{scenario}.png")
    title = f"{cfg.cluster.name}, scenario {scenario}, {cfg.eval.num_seeds} seeds x {len(cfg.cluster.nodes)} nodes x 1 day"
    print(ev.format_table(rows, title))
    print(f"\nwrote {out_dir}/kpis_{scenario}.{{md,csv,json}} and timeline_{scenario}.png")
    return rows


def _heuristic_policies(cfg, names):
    from aro_jax.envs.heuristics import HEURISTICS

    return {n: HEURISTICS[n](cfg.env.tick_s) for n in names}


def cmd_evaluate(args) -> int:
    from aro_jax.config import load_config

    overrides = list(args.overrides)
    if args.scenario:
        overrides.append(f"eval.scenario={args.scenario}")
    cfg = load_config(args.config, overrides, [args.cluster] if args.cluster else [])
    policies = {}
    if args.checkpoint:
        from aro_jax.algorithms.checkpointing import load_trained_policy

        policies["learned"] = load_trained_policy(Path(args.checkpoint))
    names = args.policy or ([] if args.checkpoint else cfg.eval.baselines)
    unknown = [n for n in names if n not in _all_heuristics()]
    if unknown:
        print(f"error: unknown --policy {unknown[0]!r}; choose from {sorted(_all_heuristics())}", file=sys.stderr)
        return 2
    policies.update(_heuristic_policies(cfg, names))
    out = Path(args.out or (Path(args.checkpoint) / "eval" if args.checkpoint else "runs/eval"))
    evaluate_policies(cfg, policies, cfg.eval.scenario, out)
    return 0


def _all_heuristics():
    from aro_jax.envs.heuristics import HEURISTICS

    return HEURISTICS


def cmd_run(args) -> int:
    """The main job: the embedded default config, baselines evaluated on the cluster."""
    from aro_jax.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    out = Path(args.out or cfg.train.run_dir)
    evaluate_policies(cfg, _heuristic_policies(cfg, cfg.eval.baselines), cfg.eval.scenario, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aro", description="Federated RL orchestration of LLM inference serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the main job on a config (default: the embedded ten-region config)")
    p.add_argument("config", nargs="?", help="experiment YAML (default: embedded default.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.lr=1e-4")
    p.add_argument("--out", help="output directory (default: train.run_dir)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("evaluate", help="KPI table of policies on a scenario")
    p.add_argument("--policy", action="append", help="heuristic baseline (repeatable): static-mean|static-peak|reactive|predictive")
    p.add_argument("--checkpoint", help="a training run directory: evaluate its latest policy")
    p.add_argument("--scenario", help="scenario name (diurnal, flash-crowd, outage, token-shift, trace-conv, trace-code)")
    p.add_argument("--cluster", help="YAML file with a top-level 'cluster:' key")
    p.add_argument("--config", help="experiment YAML (default: embedded default.yaml)")
    p.add_argument("--out", help="output directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.num_seeds=16")
    p.set_defaults(func=cmd_evaluate)

    args = parser.parse_args(argv)
    from aro_jax.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
