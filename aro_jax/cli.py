"""`aro`: the command-line entry point (side effects live here and in the training driver)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

# XLA's concurrency-optimised CPU scheduler can hang large vmapped programs (DESIGN "Speed").
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")


def _heuristic_policies(cfg, names):
    from aro_jax.envs.heuristics import HEURISTICS

    return {n: (HEURISTICS[n](cfg.env.tick_s), None, False) for n in names}


def cmd_evaluate(args) -> int:
    from aro_jax.config import check_data, load_config
    from aro_jax.envs.heuristics import HEURISTICS

    unknown = [n for n in args.policy or [] if n not in HEURISTICS]
    if unknown:  # before loading or compiling anything
        print(f"error: unknown --policy {unknown[0]!r}; choose from {sorted(HEURISTICS)}", file=sys.stderr)
        return 2
    if args.step is not None and not args.checkpoint:
        print("error: --step picks a checkpoint of --checkpoint RUN_DIR; pass both", file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    if args.scenario:
        overrides.append(f"eval.scenario={args.scenario}")
    policies = {}
    if args.checkpoint:  # first: a bad run directory is named precisely
        from aro_jax.training.checkpointing import load_trained_policy

        _, policy, weights, per_node = load_trained_policy(Path(args.checkpoint), args.step)
        policies["learned"] = (policy, weights, per_node)
    # A checkpoint is evaluated on its run's own cluster unless a config or cluster is given.
    config = Path(args.checkpoint) / "config.yaml" if args.checkpoint and not (args.config or args.cluster) else args.config
    cfg = load_config(config, overrides, [args.cluster] if args.cluster else [])
    check_data(cfg, ("eval.scenario",))
    plan = _replay_plan(cfg, args)  # reads every trace file before anything compiles
    names = args.policy or ([] if args.checkpoint else cfg.eval.baselines)
    policies.update(_heuristic_policies(cfg, names))
    out = Path(args.out or (Path(args.checkpoint) / "eval" if args.checkpoint else "runs/eval"))
    from aro_jax.training.evaluation import evaluate_policies

    if plan is None:
        evaluate_policies(cfg, policies, cfg.eval.scenario, out)
        return 0
    name, plan = plan
    for note in plan.notes:
        print(f"replay: {note}")
    print(f"replay: episode of {plan.num_ticks} ticks of {cfg.env.tick_s:g} s ({plan.num_ticks * cfg.env.tick_s / 3600.0:.3g} h) from simulated time 0\n")
    evaluate_policies(cfg, policies, name, out, node_params=plan.params, num_ticks=plan.num_ticks)
    return 0


def _replay_plan(cfg, args):
    """(output name, scenarios.ReplayPlan) of the traces to replay (--trace flags over the
    config's traces: map), or None when there are none. A bare --trace FILE replaces the
    map for every region; REGION=FILE sets one region. The flags' format, scale and loop
    apply to every trace whose config entry does not set its own."""
    import re

    from aro_jax.config import ConfigError, parse_trace_scale, trace_entries
    from aro_jax.envs import scenarios

    scale = parse_trace_scale(args.trace_scale, "--trace-scale") if args.trace_scale is not None else None
    entries = trace_entries(cfg)
    regions = [n.name for n in cfg.cluster.nodes]
    given = {}
    for value in args.trace or []:
        region, sep, path = value.partition("=")
        if sep and region in regions:
            given[region] = path
        elif sep and not Path(value).is_file():
            raise ConfigError(f"--trace {value}: the cluster {cfg.cluster.name!r} has no region {region!r}; give REGION=FILE with one of {', '.join(regions)}, or a bare FILE for every region")
        else:
            given[scenarios.ALL_REGIONS] = value
    if scenarios.ALL_REGIONS in given:  # a bare file is every region's trace
        entries = {}
    for region, path in given.items():
        origin = f"--trace {path}" if region == scenarios.ALL_REGIONS else f"--trace {region}={path}"
        entries[region] = {"path": str(Path(path).expanduser().absolute()), "format": None, "scale": None, "loop": None, "origin": origin}
    if not entries:
        if args.trace_format or args.trace_scale is not None or args.trace_loop:
            raise ConfigError("--trace-format, --trace-scale and --trace-loop apply to replayed traces: give --trace FILE (or a traces: map in the config)")
        return None
    specs = {
        region: scenarios.TraceReplay(
            path=e["path"],
            format=e["format"] or (None if args.trace_format in (None, "auto") else args.trace_format),
            scale=e["scale"] if e["scale"] is not None else (scale if scale is not None else 1.0),
            loop=e["loop"] if e["loop"] is not None else bool(args.trace_loop),
            origin=e.get("origin", f"config key 'traces.{region}'"),
        )
        for region, e in entries.items()
    }
    plan = scenarios.replay_cluster_params(cfg, specs)
    files = {s.path for s in specs.values()}
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(next(iter(files))).stem) if len(files) == 1 else ""
    return (f"replay-{stem}" if stem else "replay"), plan


def _config_args(args):
    """(config path or None, overrides): a first positional `key=value` is an override."""
    if args.config and "=" in args.config and not Path(args.config).exists():
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def cmd_train(args) -> int:
    if args.coordinator:
        from aro_jax.federated.distributed import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from aro_jax.training import driver
    from aro_jax.config import check_data, load_config

    if args.step is not None and not args.resume:
        print("error: --step picks the checkpoint to continue from; use it with --resume RUN_DIR", file=sys.stderr)
        return 2
    if args.resume:
        driver.train(None, Path(args.resume), resume=True, step=args.step)
        return 0
    cfg = load_config(*_config_args(args))
    check_data(cfg, ("env.scenario",))
    driver.train(cfg, Path(args.run_dir or cfg.train.run_dir))
    return 0


def cmd_run(args) -> int:
    """The main job: train on the config, evaluate the policy against the baselines, and
    export it for the deployment agent."""
    from aro_jax.training import driver
    from aro_jax.training.checkpointing import load_trained_policy
    from aro_jax.config import load_config
    from aro_jax.deploy.export import export_policy
    from aro_jax.training.evaluation import evaluate_policies

    from aro_jax.config import check_data

    cfg = load_config(*_config_args(args))
    check_data(cfg)  # the training scenario and eval.scenario, before training
    run_dir = Path(args.run_dir or cfg.train.run_dir)
    driver.train(cfg, run_dir)
    _, policy, weights, per_node = load_trained_policy(run_dir)
    policies = {f"ppo ({cfg.federated.mode})": (policy, weights, per_node), **_heuristic_policies(cfg, cfg.eval.baselines)}
    evaluate_policies(cfg, policies, cfg.eval.scenario, run_dir / "eval")
    exported = export_policy(run_dir, run_dir / "export", overwrite=True)
    print(f"learning curve: {run_dir}/learning_curve.png")
    print(f"exported policy: {exported} (serve it with: aro agent --policy {exported})")
    return 0


def _load_sweep(args, require: str):
    from aro_jax import sweep

    spec = sweep.load_sweep(args.sweep_file, require)
    if args.overrides:  # command-line overrides apply to the base config of every point
        spec.overrides = [*spec.overrides, *args.overrides]
        for point in [{}, *spec.points]:
            spec.config(point)
    from aro_jax.config import check_data

    check_data(spec.config({}))  # the points are evaluated on its eval.scenario after training
    return spec, Path(args.run_dir or spec.run_dir or f"runs/sweeps/{spec.name}")


def cmd_sweep(args) -> int:
    """Train every point of a sweep file (x seeds) in one compiled program, evaluate, rank."""
    from aro_jax import sweep

    spec, run_dir = _load_sweep(args, "sweep")
    sweep.run_sweep(spec, run_dir)
    return 0


def cmd_optimize(args) -> int:
    """Batched Bayesian optimisation (Optuna ask/tell) of a sweep file's bo: section."""
    from aro_jax import sweep

    spec, run_dir = _load_sweep(args, "bo")
    for key in ("trials", "batch_size", "storage", "study_name", "slo_target"):
        if getattr(args, key) is not None:
            setattr(spec.bo, key, getattr(args, key))
    sweep.run_optimize(spec, run_dir, fail_running=args.fail_running)
    return 0


def cmd_export(args) -> int:
    """Write a self-describing policy directory from a training run's latest checkpoint."""
    from aro_jax.deploy.export import ExportError, export_policy, load_policy

    try:
        out = export_policy(Path(args.run_dir), Path(args.out_dir), overwrite=args.force, step=args.step)
        policy = load_policy(out)  # check it loads before saying so
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kind = f"{len(policy.node_names)} per-node policies" if policy.spec["per_node"] else "one global policy"
    print(f"exported {kind} for nodes {list(policy.node_names)} ({len(policy.action_names)} actions, env {policy.env_version}) to {out}")
    return 0


def cmd_agent(args) -> int:
    """Serve decisions from an exported policy: JSON lines, HTTP, or a control loop over
    vLLM metrics (--vllm / --prometheus) that publishes the desired state."""
    from aro_jax.deploy.runner import run_agent

    return run_agent(args)


def cmd_capacity(args) -> int:
    """Capacity planning for one profile and token mix from the serving model."""
    from aro_jax import capacity

    try:
        given = [x for x in (args.input_tokens is not None or args.output_tokens is not None, args.mix, args.trace) if x]
        if len(given) != 1:
            raise capacity.CapacityError("give one token mix: --input-tokens N --output-tokens M, --mix NAME or --trace FILE")
        if args.mix:
            mix = capacity.named_mix(args.mix)
        elif args.trace:
            mix = capacity.trace_mix(args.trace)
        else:
            if args.input_tokens is None or args.output_tokens is None:
                raise capacity.CapacityError("fixed lengths need both --input-tokens and --output-tokens")
            mix = capacity.fixed_mix(args.input_tokens, args.output_tokens)
        loads = tuple(float(x) for x in args.loads.split(",")) if args.loads else capacity.LOADS
        workload = args.workload or ("code" if args.mix == "code" else "chatbot")
        rep = capacity.report(args.profile, mix, loads, args.target_rps, args.target_attainment, workload, args.prices)
    except (capacity.CapacityError, ValueError) as e:
        if isinstance(e, capacity.CapacityError) or "profile" in str(e) or "prices" in str(e):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    print(capacity.to_json(rep) if args.json else capacity.render(rep))
    return 0


def cmd_calibrate(args) -> int:
    """Fit a hardware profile YAML from measurements (splitwise CSV or vLLM benchmark JSON)."""
    from aro_jax import calibrate

    try:
        result = calibrate.calibrate(args.files, like=args.like, name=args.name)
    except calibrate.CalibrationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(calibrate.render(result))
    if args.out:
        Path(args.out).write_text(calibrate.profile_yaml(result["profile"]))
        print(f"wrote {args.out}")
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
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint that verifies")
    p.add_argument("--step", type=int, help="with --resume: continue from this checkpoint step; later checkpoints are removed (default: the newest that verifies)")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process run: address of process 0 (jax.distributed)")
    p.add_argument("--num-processes", type=int, default=1, help="multi-process run: number of processes")
    p.add_argument("--process-id", type=int, default=0, help="multi-process run: this process's index")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="KPI table of policies on a scenario")
    p.add_argument("--policy", action="append", help="heuristic baseline (repeatable): static-mean|static-peak|reactive|predictive, each +tier; reactive+spill|predictive+spill (+tier)")
    p.add_argument("--checkpoint", help="a training run directory: evaluate its latest policy")
    p.add_argument("--step", type=int, help="with --checkpoint: evaluate this checkpoint step (default: the newest that verifies)")
    p.add_argument("--scenario", help="scenario name (diurnal, flash-crowd, outage, token-shift, trace-conv, trace-code)")
    p.add_argument("--cluster", help="YAML file with a top-level 'cluster:' key")
    p.add_argument("--config", help="experiment YAML (default: embedded default.yaml)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--trace", action="append", metavar="[REGION=]FILE",
                   help="replay a request trace (repeatable): FILE for every region, REGION=FILE for one; the episode is as long as the longest trace (shorter ones end in zero arrivals); regions without a trace run --scenario")
    p.add_argument("--trace-format", choices=["auto", "azure", "burstgpt", "mooncake"], help="trace file format (default: detected from the header or first line)")
    p.add_argument("--trace-scale", help="multiply the trace's arrivals by this number, or 'fit': scale its mean rate to the region's configured mean_rate_rps (default 1: the trace's own rates)")
    p.add_argument("--trace-loop", action="store_true", help="repeat a trace shorter than env.episode_ticks to fill it (default: no looping)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.num_seeds=16")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sweep", help="vectorised hyperparameter sweep: every point x seed in one compiled program")
    p.add_argument("sweep_file", help="sweep YAML (e.g. configs/sweeps/lr_entropy.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the base config, e.g. train.total_env_steps=1e6")
    p.add_argument("--run-dir", help="output directory (default: run_dir in the file, else runs/sweeps/NAME)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("optimize", help="Bayesian optimisation (Optuna) of a sweep file's bo: parameters; resumable")
    p.add_argument("sweep_file", help="sweep YAML with a bo: section")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the base config")
    p.add_argument("--run-dir", help="output directory (default: run_dir in the file, else runs/sweeps/NAME)")
    p.add_argument("--trials", type=int, help="finished trials to reach (overrides bo.trials)")
    p.add_argument("--batch-size", type=int, help="proposals per vmapped training run (overrides bo.batch_size)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///RUN_DIR/study.db)")
    p.add_argument("--study-name", help="study name (overrides bo.study_name)")
    p.add_argument("--slo-target", type=float, help="required SLO attainment as a fraction (overrides bo.slo_target)")
    p.add_argument("--fail-running", action="store_true", help="mark every RUNNING trial FAIL and re-enqueue it (no other worker alive)")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("export", help="export a trained run's policy to a self-describing directory (loads without the trainer)")
    p.add_argument("run_dir", help="training run directory (holding config.yaml and checkpoints/)")
    p.add_argument("out_dir", help="directory to write (policy.json, params/, training_config.yaml)")
    p.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    p.add_argument("--step", type=int, help="export this checkpoint step (default: the newest that verifies)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("agent", help="deployment agent: a control loop over vLLM metrics (--vllm/--prometheus), or decisions over JSON lines/HTTP")
    from aro_jax.deploy.runner import add_agent_arguments

    add_agent_arguments(p)
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("capacity", help="capacity planning: per-replica max rate, latencies and SLO attainment by load, replicas for a target")
    p.add_argument("profile", help="a hardware profile name (e.g. llama2-7b-a100-tp1) or a profile YAML from `aro calibrate`")
    p.add_argument("--input-tokens", type=int, help="fixed prompt length (with --output-tokens)")
    p.add_argument("--output-tokens", type=int, help="fixed output length (with --input-tokens)")
    p.add_argument("--mix", help="a named traffic mix (conversation, code)")
    p.add_argument("--trace", help="a trace CSV (Azure format): its lengths, fitted log-normally")
    p.add_argument("--workload", help="SLO class: chatbot, code, summarization (default: chatbot; code for --mix code)")
    p.add_argument("--loads", help="comma-separated loads as fractions of the max rate (default 0.3,0.5,0.8,0.95)")
    p.add_argument("--target-rps", type=float, help="also report the replicas needed for this request rate")
    p.add_argument("--target-attainment", type=float, default=0.95, help="SLO attainment to plan for (default 0.95)")
    p.add_argument("--prices", default="gpu-cloud", help="price set: gpu-cloud or hyperscaler")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_capacity, overrides=[])

    p = sub.add_parser("calibrate", help="fit a hardware profile YAML from measurements (splitwise perf-model CSV, vLLM benchmark_serving JSON)")
    p.add_argument("files", nargs="+", help="measurement files: .csv (splitwise format) or .json (vLLM benchmark_serving results)")
    p.add_argument("--like", default="llama2-7b-a100-tp1", help="profile whose model, GPU and memory facts the fit keeps (default llama2-7b-a100-tp1)")
    p.add_argument("--name", help="name of the new profile (default: calibrated-<like>)")
    p.add_argument("--out", help="write the profile YAML here (a cluster file can name it as its profile)")
    p.set_defaults(func=cmd_calibrate, overrides=[])

    # Overrides may come after options too (`aro train CFG --run-dir D ppo.lr=1e-4`).
    parser.add_argument("--debug", action="store_true", help="on an error, print the full traceback too (accepted anywhere on the line)")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    if not debug:
        _quiet_failed_restore_echoes()
    return _run(args.func, args, debug)


def _quiet_failed_restore_echoes() -> None:
    """When an Orbax restore fails on a corrupt file, TensorStore reads still in flight
    finish after Orbax closed its event loop, and each reports `Event loop is closed` (or
    an unretrieved task exception) on stderr: echoes of a failure the restore already
    reported in one line. Drop those; anything else reaches the default hooks."""
    import logging

    default = sys.unraisablehook

    def hook(unraisable):
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
        code = getattr(unraisable.object, "cr_code", None)  # an Orbax read coroutine never finished
        if not (closed_loop or (code is not None and "orbax" in code.co_filename)):
            default(unraisable)

    def tensorstore_echo(record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage().startswith("Task exception was never retrieved") and "tensorstore" in repr(exc))

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(tensorstore_echo)


def _run(func, args, debug: bool) -> int:
    """Run a command; every failure ends in one `error:` line on stderr (rc 2 for bad
    input, 1 for an unexpected failure, 130 when interrupted), with the traceback only
    under --debug."""
    from aro_jax.config import ConfigError
    from aro_jax.deploy.export import ExportError
    from aro_jax.envs.trace import TraceFormatError
    from aro_jax.training.checkpointing import CheckpointError
    from aro_jax.training.driver import TrainingError

    expected = (ConfigError, CheckpointError, TrainingError, TraceFormatError, ExportError, FileNotFoundError)
    try:
        return func(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's last word on any failure
        if debug:
            traceback.print_exc()
        text = " ".join(str(e).split())
        if isinstance(e, expected):
            print(f"error: {text or type(e).__name__}", file=sys.stderr)
            return 2
        text = text if len(text) <= 300 else text[:297] + "..."
        hint = "" if debug else " (run again with --debug for the full traceback)"
        print(f"error: {type(e).__name__}: {text}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
