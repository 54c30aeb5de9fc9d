"""`aro`: the command-line entry point (side effects live here and in the training driver)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

# XLA's concurrency-optimised CPU scheduler can hang large vmapped programs (DESIGN "Speed").
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")


def evaluate_policies(cfg, policies: dict, scenario: str, out_dir: Path, seed: int = 0) -> dict:
    """Run every policy (name -> (Policy, policy_state or None, per_node)) on every node of the
    cluster on one scenario; write the KPI table
    (markdown/CSV/JSON) and the one-day timeline of the first node; return the rows."""
    import jax
    import numpy as np

    from aro_jax.algorithms import evaluation as ev
    from aro_jax.envs.scenarios import cluster_params
    from aro_jax.envs.serving import ServingNodeEnv

    env = ServingNodeEnv(cfg.env.action_set)
    params = cluster_params(cfg, scenario)
    rows, traces = {}, {}
    for name, (policy, policy_state, per_node) in policies.items():
        metrics = ev.run_episodes(env, policy, params, jax.random.PRNGKey(seed), cfg.eval.num_seeds, cfg.env.episode_ticks, policy_state, per_node)
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

    return {n: (HEURISTICS[n](cfg.env.tick_s), None, False) for n in names}


def cmd_evaluate(args) -> int:
    from aro_jax.config import load_config

    overrides = list(args.overrides)
    if args.scenario:
        overrides.append(f"eval.scenario={args.scenario}")
    cfg = load_config(args.config, overrides, [args.cluster] if args.cluster else [])
    policies = {}
    if args.checkpoint:
        from aro_jax.algorithms.checkpointing import load_trained_policy

        _, policy, weights, per_node = load_trained_policy(Path(args.checkpoint))
        if not (args.config or args.cluster):
            cfg = load_config(Path(args.checkpoint) / "config.yaml", overrides)  # the run's own cluster
        policies["learned"] = (policy, weights, per_node)
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


def _config_args(args):
    """(config path or None, overrides): a first positional `key=value` is an override."""
    if args.config and "=" in args.config and not Path(args.config).exists():
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def cmd_train(args) -> int:
    if args.coordinator:
        from aro_jax.federated.distributed import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from aro_jax.algorithms import driver
    from aro_jax.config import load_config

    if args.resume:
        driver.train(None, Path(args.resume), resume=True)
        return 0
    cfg = load_config(*_config_args(args))
    driver.train(cfg, Path(args.run_dir or cfg.train.run_dir))
    return 0


def cmd_run(args) -> int:
    """The main job: train on the config, then evaluate the policy against the baselines."""
    from aro_jax.algorithms import driver
    from aro_jax.algorithms.checkpointing import load_trained_policy
    from aro_jax.config import load_config

    cfg = load_config(*_config_args(args))
    run_dir = Path(args.run_dir or cfg.train.run_dir)
    driver.train(cfg, run_dir)
    _, policy, weights, per_node = load_trained_policy(run_dir)
    policies = {f"ppo ({cfg.federated.mode})": (policy, weights, per_node), **_heuristic_policies(cfg, cfg.eval.baselines)}
    evaluate_policies(cfg, policies, cfg.eval.scenario, run_dir / "eval")
    print(f"learning curve: {run_dir}/learning_curve.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aro", description="Federated RL orchestration of LLM inference serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the main job: train, evaluate against the baselines (default: embedded ten-region config)")
    p.add_argument("config", nargs="?", help="experiment YAML (default: embedded default.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.lr=1e-4")
    p.add_argument("--run-dir", help="run directory (default: train.run_dir)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="train a policy; --resume RUN_DIR continues a run")
    p.add_argument("config", nargs="?", help="experiment YAML (default: embedded default.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.lr=1e-4 env.num_clusters=2048")
    p.add_argument("--run-dir", help="run directory (default: train.run_dir)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process run: address of process 0 (jax.distributed)")
    p.add_argument("--num-processes", type=int, default=1, help="multi-process run: number of processes")
    p.add_argument("--process-id", type=int, default=0, help="multi-process run: this process's index")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="KPI table of policies on a scenario")
    p.add_argument("--policy", action="append", help="heuristic baseline (repeatable): static-mean|static-peak|reactive|predictive")
    p.add_argument("--checkpoint", help="a training run directory: evaluate its latest policy")
    p.add_argument("--scenario", help="scenario name (diurnal, flash-crowd, outage, token-shift, trace-conv, trace-code)")
    p.add_argument("--cluster", help="YAML file with a top-level 'cluster:' key")
    p.add_argument("--config", help="experiment YAML (default: embedded default.yaml)")
    p.add_argument("--out", help="output directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.num_seeds=16")
    p.set_defaults(func=cmd_evaluate)

    # Overrides may come after options too (`aro train CFG --run-dir D ppo.lr=1e-4`).
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    from aro_jax.algorithms.checkpointing import CheckpointError
    from aro_jax.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
