"""Helpers shared by the benchmark scripts: fresh-process workers, the JSON -> markdown
report pattern, and rate formatting."""

from __future__ import annotations

import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


def run_worker(script: str, worker_args: list[str], label: str, xla_flags: str, timeout: float) -> dict:
    """Run `script --worker ...` in a fresh process (its own XLA flags and peak RSS) and
    return the JSON it prints on its last `RESULT ` line, plus `wall_s`."""
    env = dict(os.environ, XLA_FLAGS=xla_flags)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "--worker", *worker_args], env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {label} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall_s"] = time.perf_counter() - t0
    print(f"  {label}: done in {res['wall_s']:.1f}s", file=sys.stderr, flush=True)
    return res


def fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def machine() -> str:
    """This machine, for a benchmark's header."""
    import jax

    host = f"{os.cpu_count()}-core {platform.machine()} CPU"
    if jax.default_backend() != "cpu":  # an accelerator runs the programs; the host only drives them
        host = f"one {jax.devices()[0].device_kind} ({jax.default_backend()}) on a {host}"
    return f"{host}, jax {jax.__version__}, Python {platform.python_version()}"


# The training distribution's randomisation (env section): results of runs that differ in
# these are not the same config's spread. Each with its value when off.
TRAINING_ENV_OFF = {"surge_prob": 0.0, "token_shift_prob": 0.0, "burst_shift_prob": 0.0, "smooth_shift_prob": 0.0,
                    "random_fleet_prob": 0.0, "demand_phase_prob": 0.0, "demand_scale_max": 1.0}


def training_env(env) -> dict:
    """The TRAINING_ENV_OFF keys of a config's env section (a dataclass or a resolved YAML dict)."""
    get = env.get if isinstance(env, dict) else lambda k, d: getattr(env, k, d)
    return {k: float(get(k, off)) for k, off in TRAINING_ENV_OFF.items()}


def train_and_evaluate_seeds(cfg, seeds: int, scenarios: tuple[str, ...] = (), weights_path=None,
                             evaluate_only: bool = False) -> tuple[dict[str, list[dict]], float | None]:
    """Train seeds 0..seeds-1 of `cfg` in one program (trainers.train_seeds) and evaluate
    each like the main job (evaluation seeds, key 0, the config's env) on its scenario and
    on each of `scenarios`: ({scenario: metrics per seed}, training seconds). With
    `weights_path`, the seeds' weights (leading axis: seed) are kept there as msgpack;
    with `evaluate_only` too, they are read back from there instead of trained (training
    seconds None)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import serialization

    from aro_jax.envs.scenarios import scenario_plan
    from aro_jax.training import evaluation, learned_policy, trainers

    t0 = time.perf_counter()
    if evaluate_only:
        trainer, hp = trainers.make_trainer(cfg), trainers.hyperparams(cfg)
        keys = jnp.stack([jax.random.PRNGKey(s) for s in range(seeds)])
        template = jax.eval_shape(jax.vmap(lambda k: trainer.weights(trainer.init(k, hp))), keys)
        weights = serialization.from_state_dict(template, serialization.msgpack_restore(Path(weights_path).read_bytes()))
        if [np.shape(x) for x in jax.tree.leaves(weights)] != [x.shape for x in jax.tree.leaves(template)]:
            raise ValueError(f"{weights_path} holds other runs' weights than {seeds} seeds of this config: train afresh")
        weights, train_s = jax.tree.map(jnp.asarray, weights), None
    else:
        trainer, weights = trainers.train_seeds(cfg, seeds)
        jax.block_until_ready(weights)
        train_s = time.perf_counter() - t0
        if weights_path is not None:
            Path(weights_path).parent.mkdir(parents=True, exist_ok=True)
            Path(weights_path).write_bytes(serialization.msgpack_serialize(serialization.to_state_dict(jax.tree.map(np.asarray, weights))))
    policy = learned_policy.greedy_policy(trainer.network, cfg.ppo.normalize_obs, cfg.ppo.action_masking)
    out = {}
    for scenario in dict.fromkeys((cfg.eval.scenario, *scenarios)):
        params, ticks, _ = scenario_plan(cfg, scenario)
        env, eparams = evaluation.eval_env(cfg, params)
        out[scenario] = [evaluation.run_episodes(env, policy, eparams, jax.random.PRNGKey(0), cfg.eval.num_seeds, ticks,
                                                 jax.tree.map(lambda x: x[s], weights), trainer.per_node) for s in range(seeds)]
    return out, train_s


def scaling_kpis(m, params) -> dict:
    """How a policy used its replicas: the mean ready replicas per region and the share of
    region-ticks at the region's replica limit (what it does when it cannot scale out)."""
    import numpy as np

    ready = np.asarray(m["replicas_ready"])  # (nodes, seeds, ticks)
    at_max = ready >= np.asarray(params.max_replicas)[:, None, None]
    arrivals = np.asarray(m["arrivals"])[at_max].sum()
    share = lambda k: float(100.0 * np.asarray(m[k])[at_max].sum() / arrivals) if arrivals > 0 else 0.0  # noqa: E731
    # At the limit: of the arrivals there, the shares forwarded and dropped, and the served
    # quality (below 1: the small model takes part of the load).
    return {"replicas_mean": float(ready.mean()), "at_max_pct": float(100.0 * at_max.mean()),
            "at_max_forwarded_pct": share("forwarded"), "at_max_dropped_pct": share("dropped"),
            "at_max_quality": float(np.asarray(m["quality"])[at_max].mean()) if at_max.any() else 1.0}


def grid_table(rows: list[dict], params: list[tuple[str, str]], shown: tuple[str, ...]) -> list[str]:
    """Markdown rows of a heuristic's threshold grid: the policy, each (column, key) of
    `params` ("-" where a row has none) and the KPIs `shown` with their units."""
    from aro_jax.training.evaluation import KPIS, format_value

    head = [c for c, _ in params] + [f"{k} ({KPIS[k][0]})" if KPIS[k][0] else k for k in shown]
    cell = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731
    return ["| policy | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|",
            *(f"| {r['policy']} | " + " | ".join([*(cell(r[k]) for _, k in params), *(format_value(r[k]) for k in shown)]) + " |"
              for r in rows)]


def code_commit() -> str:
    """The commit the measured code is at ("-dirty" when aro_jax/ has uncommitted changes);
    $ARO_CODE_COMMIT where the copy that runs has no git metadata (a remote machine)."""
    if os.environ.get("ARO_CODE_COMMIT"):
        return os.environ["ARO_CODE_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--", "aro_jax") else "")


# The commit from which each local rollout of a cluster-env round acts with the latest
# update's parameters (fedppo.coupled_local_phase); runs recorded before it collected all
# of a round's rollouts with the round's starting policy, so their levels are not comparable.
ON_POLICY_ROLLOUTS = "15f1154"
# The simulator's last change that moves results (the weight cache in host memory fills
# over a load time; the GPU price covers the pods' CPU and memory).
SIMULATOR_CHANGE = "be56a8e"


@functools.lru_cache(maxsize=None)
def has_change(commit: str, change: str) -> bool:
    """Whether code at `commit` ("-dirty" allowed) has the commit `change` in its history."""
    root = Path(__file__).resolve().parents[1]
    rev = commit.removesuffix("-dirty")
    return subprocess.run(["git", "merge-base", "--is-ancestor", change, rev], cwd=root, capture_output=True).returncode == 0


def on_policy_rollouts(commit: str) -> bool:
    """Whether code at `commit` trained with on-policy cluster rollouts."""
    return has_change(commit, ON_POLICY_ROLLOUTS)


def write_report(json_path: Path, data: dict | None, render: Callable[[dict], str]) -> dict:
    """Write a run's results to `json_path` (unless `data` is None: re-render the JSON
    already there) and its markdown, rendered from that JSON alone, next to it."""
    json_path = Path(json_path)
    if data is not None:
        json_path.write_text(json.dumps(data, indent=2) + "\n")
    data = json.loads(json_path.read_text())
    json_path.with_suffix(".md").write_text(render(data))
    return data


def command_line() -> str:
    """This benchmark's command as run, copy-pasteable."""
    return f"python benchmarks/{Path(sys.argv[0]).name} " + shlex.join(sys.argv[1:])


def run_report(json_path: Path, render: Callable[[dict], str], measure: Callable[[], dict], render_only: bool) -> dict:
    """A benchmark's main: `measure()` (timed, with the command and machine recorded) into
    `json_path` and its markdown, or with `render_only` the markdown of the JSON there."""
    if render_only:
        return write_report(json_path, None, render)
    t0 = time.perf_counter()
    data = measure()
    data.update(command=command_line(), machine=machine(), wall_s=time.perf_counter() - t0, commit=code_commit())
    data = write_report(json_path, data, render)
    print(Path(json_path).with_suffix(".md").read_text())
    return data
