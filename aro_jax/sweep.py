"""Vectorised hyperparameter sweeps and batched Bayesian optimisation (rejax style).

A sweep file names an experiment config and the hyperparameters to vary:

    base: ../centralized.yaml          # relative to the sweep file
    overrides: [train.total_env_steps=2000000]
    grid: {lr: [1e-4, 3e-4, 1e-3], ent_coef: [0.0, 0.01]}   # or random: / points:
    seeds: 2
    objective: reward                  # or {kpi: cost_usd_per_mtok, mode: min}
    bo: {parameters: {alpha: {low: 0.1, high: 4, log: true}}, trials: 32, batch_size: 8}

Only values that are pytree leaves of `ppo.Hyperparams` may vary: every (point, seed)
pair then trains in one compiled program (`jit(vmap(train))` over stacked Hyperparams
and keys). Anything that changes shapes or static structure (hidden sizes, cluster
counts) belongs in `overrides:`, one sweep per value.

Evaluation runs the greedy learned policy of each (point, seed) on the base config's
cluster and `eval.scenario`, reusing one compiled harness (weights and reward weights
are traced inputs). The `reward` KPI is each point's own reward function; when reward
weights are swept, rank points by a KPI (cost, SLO attainment) instead.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from aro_jax.config import ConfigError, ExperimentConfig, load_config

# Hyperparams field -> the config key it comes from (Hyperparams.from_config).
SWEEPABLE = {
    "lr": "ppo.lr", "clip_eps": "ppo.clip_eps", "ent_coef": "ppo.ent_coef", "vf_coef": "ppo.vf_coef",
    "gamma": "ppo.gamma", "gae_lambda": "ppo.gae_lambda", "max_grad_norm": "ppo.max_grad_norm",
    "alpha": "env.reward.alpha", "beta": "env.reward.beta", "cost_weight": "env.reward.gamma",
    "slo_penalty": "env.reward.slo_penalty", "quality_penalty": "env.reward.quality_penalty",
}
_BY_CONFIG_KEY = {v: k for k, v in SWEEPABLE.items()}
TOP_LEVEL_KEYS = {"name", "base", "overrides", "grid", "random", "num_samples", "points", "seeds", "seed", "objective", "run_dir", "bo"}
BO_KEYS = {"parameters", "trials", "batch_size", "storage", "study_name", "sampler", "slo_target", "infeasible_penalty", "seed"}
# KPIs where lower is better; the others (throughput, SLO attainment, quality, reward) are maximised.
_MINIMISED = {"ttft_mean_ms", "ttft_p95_ms", "e2e_mean_ms", "e2e_p95_ms", "dropped_pct", "cost_usd_per_h", "cost_usd_per_mtok"}


@dataclass
class Objective:
    kpi: str = "reward"
    mode: str = "max"  # "max" or "min"

    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b


@dataclass
class BOSpec:
    parameters: dict[str, dict]  # name -> {low, high, log}
    trials: int = 32
    batch_size: int = 8
    storage: str | None = None  # default sqlite:///RUN_DIR/study.db
    study_name: str = "aro"
    sampler: str = "tpe"
    slo_target: float = 0.99  # required SLO attainment (fraction of requests)
    infeasible_penalty: float = 1000.0  # $/1M tok added per unit of attainment below the target
    seed: int | None = None


@dataclass
class SweepSpec:
    path: Path
    name: str
    base: Path
    overrides: list[str]
    points: list[dict[str, float]]  # Hyperparams field -> value; empty for a BO-only file
    seeds: int = 1
    seed: int = 0
    objective: Objective = field(default_factory=Objective)
    run_dir: Path | None = None
    bo: BOSpec | None = None

    def config(self, values: dict[str, float] | None = None) -> ExperimentConfig:
        """The base config with the overrides and (optionally) one point's values, validated."""
        extra = [f"{SWEEPABLE[k]}={float(v)!r}" for k, v in (values or {}).items()]
        return load_config(self.base, [*self.overrides, *extra])


# --- the sweep file -----------------------------------------------------------------------


def _is_config_key(dotted: str) -> bool:
    node: Any = ExperimentConfig()
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return True


def _param_name(key: str, where: str) -> str:
    """A sweep key (Hyperparams field or its dotted config key) -> the Hyperparams field."""
    if key in SWEEPABLE:
        return key
    if key in _BY_CONFIG_KEY:
        return _BY_CONFIG_KEY[key]
    if _is_config_key(key):
        raise ConfigError(
            f"sweep key '{where}.{key}': '{key}' cannot vary inside one compiled program (it changes shapes or "
            f"static structure); set it under overrides: and run one sweep per value. Vmappable keys: {sorted(SWEEPABLE)}")
    raise ConfigError(f"sweep key '{where}.{key}': unknown hyperparameter '{key}'; choose from {sorted(SWEEPABLE)}")


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"sweep key '{where}': expected a number, got {value!r}")
    return float(value)


def _range(spec, where: str) -> dict:
    if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or set(spec) - {"low", "high", "log"}:
        raise ConfigError(f"sweep key '{where}': expected {{low, high, log}}, got {spec!r}")
    low, high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
    log = bool(spec.get("log", False))
    if not low < high:
        raise ConfigError(f"sweep key '{where}': low must be < high, got {low} and {high}")
    if log and low <= 0:
        raise ConfigError(f"sweep key '{where}': a log range needs low > 0, got {low}")
    return {"low": low, "high": high, "log": log}


def _points(raw: dict, rng: np.random.Generator) -> list[dict[str, float]]:
    given = [k for k in ("grid", "random", "points") if k in raw]
    if len(given) > 1:
        raise ConfigError(f"sweep file: give one of grid:, random:, points:, not {given}")
    if not given:
        return []
    kind = given[0]
    body = raw[kind]
    if kind == "grid":
        if not isinstance(body, dict) or not body:
            raise ConfigError("sweep key 'grid': expected a mapping of hyperparameter -> list of values")
        names, values = [], []
        for k, vs in body.items():
            names.append(_param_name(k, "grid"))
            vs = vs if isinstance(vs, list) else [vs]
            if not vs:
                raise ConfigError(f"sweep key 'grid.{k}': empty list")
            values.append([_number(v, f"grid.{k}") for v in vs])
        import itertools

        return [dict(zip(names, combo)) for combo in itertools.product(*values)]
    if kind == "random":
        if not isinstance(body, dict) or not body:
            raise ConfigError("sweep key 'random': expected a mapping of hyperparameter -> {low, high, log}")
        n = raw.get("num_samples")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"sweep key 'num_samples': random: needs a positive integer num_samples, got {n!r}")
        ranges = {_param_name(k, "random"): _range(v, f"random.{k}") for k, v in body.items()}
        return [{k: _sample(r, rng) for k, r in ranges.items()} for _ in range(n)]
    if not isinstance(body, list) or not body or not all(isinstance(p, dict) for p in body):
        raise ConfigError("sweep key 'points': expected a non-empty list of {hyperparameter: value} mappings")
    return [{_param_name(k, f"points.{i}"): _number(v, f"points.{i}.{k}") for k, v in p.items()} for i, p in enumerate(body)]


def _sample(r: dict, rng: np.random.Generator) -> float:
    if r["log"]:
        return float(math.exp(rng.uniform(math.log(r["low"]), math.log(r["high"]))))
    return float(rng.uniform(r["low"], r["high"]))


def _objective(raw) -> Objective:
    if raw is None:
        return Objective()
    from aro_jax.algorithms.evaluation import KPIS

    kpi, mode = (raw, None) if isinstance(raw, str) else (raw.get("kpi"), raw.get("mode")) if isinstance(raw, dict) else (None, None)
    if kpi not in KPIS:
        raise ConfigError(f"sweep key 'objective': expected a KPI name or {{kpi, mode}}; KPI must be one of {list(KPIS)}, got {kpi!r}")
    mode = mode or ("min" if kpi in _MINIMISED else "max")
    if mode not in ("min", "max"):
        raise ConfigError(f"sweep key 'objective.mode': must be min or max, got {mode!r}")
    return Objective(kpi, mode)


def _bo(raw) -> BOSpec:
    if not isinstance(raw, dict):
        raise ConfigError("sweep key 'bo': expected a mapping with parameters:, trials:, batch_size:")
    unknown = sorted(set(raw) - BO_KEYS)
    if unknown:
        raise ConfigError(f"sweep key 'bo.{unknown[0]}': unknown; choose from {sorted(BO_KEYS)}")
    params = raw.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ConfigError("sweep key 'bo.parameters': expected a mapping of hyperparameter -> {low, high, log}")
    spec = BOSpec(parameters={_param_name(k, "bo.parameters"): _range(v, f"bo.parameters.{k}") for k, v in params.items()})
    for key in ("trials", "batch_size"):
        v = raw.get(key, getattr(spec, key))
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"sweep key 'bo.{key}': must be a positive integer, got {v!r}")
        setattr(spec, key, v)
    spec.sampler = raw.get("sampler", "tpe")
    if spec.sampler not in ("tpe", "gp"):
        raise ConfigError(f"sweep key 'bo.sampler': must be tpe or gp, got {spec.sampler!r}")
    spec.slo_target = _number(raw.get("slo_target", 0.99), "bo.slo_target")
    if not 0 < spec.slo_target <= 1:
        raise ConfigError(f"sweep key 'bo.slo_target': a fraction in (0, 1], got {spec.slo_target}")
    spec.infeasible_penalty = _number(raw.get("infeasible_penalty", 1000.0), "bo.infeasible_penalty")
    spec.storage = raw.get("storage")
    spec.study_name = str(raw.get("study_name", "aro"))
    spec.seed = raw.get("seed")
    return spec


def load_sweep(path: str | Path, require: str = "sweep") -> SweepSpec:
    """Read and validate a sweep file; `require` is "sweep" (grid/random/points needed) or
    "bo" (a bo: section needed). Every point is validated as a full config, so a bad
    value names its config key; nothing is compiled."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"sweep key '{unknown[0]}': unknown; choose from {sorted(TOP_LEVEL_KEYS)}")
    if "base" not in raw:
        raise ConfigError("sweep key 'base': required (the experiment config, relative to the sweep file)")
    overrides = raw.get("overrides", []) or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"sweep key 'overrides': expected a list of key=value strings, got {overrides!r}")
    seeds, seed = raw.get("seeds", 1), raw.get("seed", 0)
    for key, v in (("seeds", seeds), ("seed", seed)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if key == "seeds" else 0):
            raise ConfigError(f"sweep key '{key}': must be a {'positive' if key == 'seeds' else 'non-negative'} integer, got {v!r}")
    spec = SweepSpec(
        path=path, name=str(raw.get("name", path.stem)), base=(path.parent / str(raw["base"])).resolve(),
        overrides=list(overrides), points=_points(raw, np.random.default_rng(seed)), seeds=seeds, seed=seed,
        objective=_objective(raw.get("objective")), run_dir=Path(raw["run_dir"]) if raw.get("run_dir") else None,
        bo=_bo(raw["bo"]) if "bo" in raw else None,
    )
    if require == "sweep" and not spec.points:
        raise ConfigError(f"{path}: a sweep needs one of grid:, random:, points:")
    if require == "bo" and spec.bo is None:
        raise ConfigError(f"{path}: aro optimize needs a bo: section")
    cfg = spec.config()
    if cfg.federated.mode != "centralized":
        raise ConfigError(f"config key 'federated.mode': sweeps vmap the single-learner trainer; need centralized, got {cfg.federated.mode!r}")
    for p in spec.points:
        spec.config(p)  # ConfigError naming the key for an impossible value
    if spec.bo:
        for name, r in spec.bo.parameters.items():
            spec.config({name: r["low"]})
            spec.config({name: r["high"]})
    return spec


# --- training and evaluation --------------------------------------------------------------


class SweepTrainer:
    """One compiled program training P points x S seeds: `jit(vmap(train))` over stacked
    Hyperparams and keys. `traces` counts how often the Python train function was traced
    (compiled); calls with the same number of runs reuse the program."""

    def __init__(self, cfg: ExperimentConfig):
        import jax

        from aro_jax.algorithms import learned_policy, ppo
        from aro_jax.algorithms.evaluation import run_episodes
        from aro_jax.envs.scenarios import cluster_params
        from aro_jax.envs.serving import ServingNodeEnv

        self.cfg = cfg
        self.learner = ppo.make_train(cfg, cluster_params(cfg, "train"))
        self.traces = 0

        def traced_train(key, hp):
            self.traces += 1
            return self.learner.train(key, hp)

        self._train = jax.jit(jax.vmap(traced_train))
        self._env = ServingNodeEnv(cfg.env.action_set)
        self._policy = learned_policy.greedy_policy(self.learner.network, cfg.ppo.normalize_obs, cfg.ppo.action_masking)
        self._eval_params = cluster_params(cfg, cfg.eval.scenario)
        self._run_episodes = run_episodes
        self._weights = learned_policy.PolicyWeights
        self._with_reward_weights = ppo.with_reward_weights

    def hyperparams(self, points: list[dict[str, float]], seeds: int):
        """Stack Hyperparams for every (point, seed) pair, point-major: leaves of shape (P*S,)."""
        import jax.numpy as jnp

        from aro_jax.algorithms.ppo import Hyperparams

        base = Hyperparams.from_config(self.cfg)
        rows = [{**dataclasses.asdict(base), **p} for p in points for _ in range(seeds)]
        return Hyperparams(**{k: jnp.asarray([r[k] for r in rows], jnp.float32) for k in dataclasses.asdict(base)})

    def train(self, points: list[dict[str, float]], seeds: int, seed: int = 0):
        """Train every point with seeds `seed..`: the same S keys for every point (common
        random numbers). Returns (final states, metrics), leading axis P*S."""
        import jax

        keys = jax.random.split(jax.random.PRNGKey(seed), seeds)
        keys = jax.numpy.tile(keys, (len(points), 1))
        states, metrics = self._train(keys, self.hyperparams(points, seeds))
        jax.block_until_ready(states.params)
        return states, metrics

    def evaluate(self, states, hps, seed: int = 0) -> list[dict[str, float]]:
        """Cluster KPIs of each run's greedy policy on the eval scenario, under that run's
        reward weights; one compiled harness for all runs."""
        import jax

        from aro_jax.algorithms.evaluation import cluster_kpis

        rows = []
        runs = jax.tree.leaves(hps)[0].shape[0]
        for i in range(runs):
            pick = lambda x: x[i]  # noqa: E731
            hp = jax.tree.map(pick, hps)
            weights = self._weights(jax.tree.map(pick, states.params), jax.tree.map(pick, states.obs_stats))
            metrics = self._run_episodes(
                self._env, self._policy, self._with_reward_weights(self._eval_params, hp), jax.random.PRNGKey(seed),
                self.cfg.eval.num_seeds, self.cfg.env.episode_ticks, weights, False)
            rows.append(cluster_kpis(metrics, self.cfg.env.tick_s))
        return rows


def _mean_over_seeds(rows: list[dict[str, float]], points: int, seeds: int) -> list[dict[str, float]]:
    out = []
    for p in range(points):
        group = rows[p * seeds:(p + 1) * seeds]
        out.append({k: float(np.mean([r[k] for r in group])) for k in group[0]} | {
            f"{k}_std": float(np.std([r[k] for r in group])) for k in group[0]})
    return out


@dataclass
class SweepResult:
    rows: list[dict[str, float]]  # per point: swept values, KPIs (mean over seeds), *_std
    best_index: int
    traces: int  # times the training program was traced (1 = one compiled program)
    train_seconds: float
    files: dict[str, Path]


def run_sweep(spec: SweepSpec, run_dir: Path, quiet: bool = False) -> SweepResult:
    """Train every point of `spec` x seeds in one compiled program, evaluate each greedily,
    write results.{csv,md,json}, best.yaml and sweep.png to `run_dir`."""
    from aro_jax.algorithms.evaluation import KPIS

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = spec.config()
    trainer = SweepTrainer(cfg)
    say = (lambda *a: None) if quiet else print
    say(f"sweep {spec.name}: {len(spec.points)} points x {spec.seeds} seeds in one program ({len(cfg.cluster.nodes)} nodes x {cfg.env.num_clusters} clusters each)")
    start = time.time()
    states, metrics = trainer.train(spec.points, spec.seeds, spec.seed)
    train_s = time.time() - start
    say(f"trained in {train_s:.1f}s (compiled {trainer.traces}x); evaluating on {cfg.eval.scenario}")
    per_run = trainer.evaluate(states, trainer.hyperparams(spec.points, spec.seeds), spec.seed)
    kpis = _mean_over_seeds(per_run, len(spec.points), spec.seeds)
    final_train_reward = np.asarray(metrics["reward"])[:, -1].reshape(len(spec.points), spec.seeds).mean(1)
    swept = list(dict.fromkeys(k for p in spec.points for k in p))
    rows = [{**p, **k, "train_reward_last": float(r)} for p, k, r in zip(spec.points, kpis, final_train_reward)]
    best = 0
    for i, r in enumerate(rows):
        if spec.objective.better(r[spec.objective.kpi], rows[best][spec.objective.kpi]):
            best = i
    files = {
        "csv": run_dir / "results.csv", "md": run_dir / "results.md", "json": run_dir / "results.json",
        "best": run_dir / "best.yaml", "plot": run_dir / "sweep.png",
    }
    columns = ["point", *swept, *KPIS, "train_reward_last"]
    with open(files["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for i, r in enumerate(rows):
            w.writerow([i, *(f"{r[c]:.6g}" for c in columns[1:])])
    files["md"].write_text(_markdown(rows, swept, spec.objective, best) + "\n")
    files["json"].write_text(json.dumps({
        "sweep": str(spec.path), "objective": dataclasses.asdict(spec.objective), "best_point": best,
        "seeds": spec.seeds, "traces": trainer.traces, "train_seconds": train_s, "rows": rows}, indent=2))
    write_best_config(spec, rows[best], swept, files["best"], f"{spec.name}-best")
    plot_sweep(rows, swept, spec.objective, best, files["plot"])
    say(_markdown(rows, swept, spec.objective, best))
    say(f"best point {best}: {json.dumps({k: rows[best][k] for k in swept})}; wrote {run_dir}/results.{{csv,md,json}}, best.yaml, sweep.png")
    return SweepResult(rows, best, trainer.traces, train_s, files)


def _markdown(rows, swept, objective: Objective, best: int) -> str:
    from aro_jax.algorithms.evaluation import KPIS, _fmt

    cols = [*swept, *KPIS]
    head = "| point | " + " | ".join(cols) + " |"
    lines = [f"objective: {objective.mode} {objective.kpi} (best: point {best}, marked *)", "", head, "|---" * (len(cols) + 1) + "|"]
    for i, r in enumerate(rows):
        lines.append(f"| {i}{'*' if i == best else ''} | " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def write_best_config(spec: SweepSpec, values: dict[str, float], swept: list[str], path: Path, name: str) -> None:
    """A ready-to-run experiment YAML: `include:` the base, then the sweep's overrides and
    the chosen values under ppo. / env.reward."""
    from omegaconf import OmegaConf

    tree = OmegaConf.create({"name": name})
    for o in spec.overrides:
        key, value = o.split("=", 1)
        OmegaConf.update(tree, key.strip(), yaml.safe_load(value), merge=True)
    for k in swept:
        OmegaConf.update(tree, SWEEPABLE[k], float(values[k]), merge=True)
    body = OmegaConf.to_container(tree)
    include = os.path.relpath(spec.base, Path(path).resolve().parent)
    text = f"# Best point of sweep {spec.path} ({name}).\n" + yaml.safe_dump({"include": [include], **body}, sort_keys=False)
    Path(path).write_text(text)


def plot_sweep(rows, swept, objective: Objective, best: int, path: Path) -> None:
    """Objective per point (error bars: std over seeds); against the swept parameter when
    only one varies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varying = [k for k in swept if len({r[k] for r in rows}) > 1]
    y = np.array([r[objective.kpi] for r in rows])
    err = np.array([r.get(f"{objective.kpi}_std", 0.0) for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(varying) == 1:
        k = varying[0]
        x = np.array([r[k] for r in rows])
        order = np.argsort(x)
        ax.errorbar(x[order], y[order], yerr=err[order], marker="o", capsize=3)
        ax.plot([x[best]], [y[best]], "r*", ms=14, label="best")
        if x.min() > 0 and x.max() / x.min() >= 100:
            ax.set_xscale("log")
        ax.set_xlabel(k)
    else:
        ax.bar(np.arange(len(rows)), y, yerr=err, capsize=3, color=["tab:red" if i == best else "tab:blue" for i in range(len(rows))])
        ax.set_xticks(np.arange(len(rows)))
        ax.set_xticklabels(["\n".join(f"{k}={r[k]:.3g}" for k in varying) for r in rows], fontsize=6)
        ax.set_xlabel("point")
    ax.set_ylabel(f"{objective.kpi} ({objective.mode})")
    ax.set_title("sweep: objective per point (red: best)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- Bayesian optimisation -----------------------------------------------------------------


def operator_objective(kpis: dict[str, float], slo_target: float, penalty: float) -> tuple[float, bool]:
    """(value to minimise, feasible): cost per 1M tokens when SLO attainment >= the target,
    else that cost plus `penalty` per unit of attainment missing, so every infeasible point
    ranks below a feasible one of similar cost and the search is pulled toward feasibility."""
    attainment = kpis["slo_attainment_pct"] / 100.0
    cost = kpis["cost_usd_per_mtok"]
    if not np.isfinite(cost):
        return float("inf"), False
    if attainment >= slo_target:
        return float(cost), True
    return float(cost + penalty * (slo_target - attainment)), False


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale_trials(study, all_hosts: bool = False) -> list[int]:
    """Trials asked but never told (the worker was killed): mark them FAIL and enqueue their
    parameters again, so the proposal is evaluated once under a new trial number and no
    finished trial is repeated. Only trials whose worker ran on this host and is dead are
    touched, so other machines sharing the study keep their running trials; `all_hosts`
    fails every RUNNING trial (use when no other worker is alive)."""
    import optuna

    host = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        w_host, _, w_pid = worker.rpartition(":")
        stale = all_hosts or (w_host == host and w_pid.isdigit() and not _pid_alive(int(w_pid)) and int(w_pid) != os.getpid())
        if not stale:
            continue
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        failed.append(t.number)
    return failed


def _sampler(bo: BOSpec):
    import optuna

    if bo.sampler == "gp":
        try:
            import torch  # noqa: F401  (optuna's GPSampler needs it)
        except ImportError as e:
            raise ConfigError("sweep key 'bo.sampler': gp needs torch installed (pip install torch); use tpe otherwise") from e
        return optuna.samplers.GPSampler(seed=bo.seed)
    # constant_liar: trials asked in the same batch are assumed to score badly while
    # running, so a batch spreads out instead of proposing one point batch_size times.
    return optuna.samplers.TPESampler(seed=bo.seed, constant_liar=True, n_startup_trials=max(bo.batch_size, 4))


def run_optimize(spec: SweepSpec, run_dir: Path, quiet: bool = False, fail_running: bool = False) -> dict:
    """Batched ask/tell Bayesian optimisation of `spec.bo.parameters`: each batch of
    `batch_size` proposals trains as one vmapped program (padded to the batch size so it
    compiles once) and is scored by `operator_objective`. Stops when the study holds
    `trials` finished trials; a restart resumes the stored study."""
    import optuna

    bo = spec.bo
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    storage = bo.storage or f"sqlite:///{(run_dir / 'study.db').resolve()}"
    say = (lambda *a: None) if quiet else print
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=bo.study_name, direction="minimize", sampler=_sampler(bo), load_if_exists=True)
    recovered = recover_stale_trials(study, all_hosts=fail_running)
    if recovered:
        say(f"marked unfinished trials {recovered} FAIL and re-enqueued their parameters")
    cfg = spec.config()
    trainer = SweepTrainer(cfg)
    distributions = {
        k: optuna.distributions.FloatDistribution(r["low"], r["high"], log=r["log"]) for k, r in bo.parameters.items()}
    log = run_dir / "trials.jsonl"
    finished = lambda: len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))  # noqa: E731
    while (remaining := bo.trials - finished()) > 0:
        trials = [study.ask(distributions) for _ in range(min(bo.batch_size, remaining))]
        for t in trials:
            t.set_user_attr("worker", _worker_id())
        points = [dict(t.params) for t in trials]
        padded = points + [points[-1]] * (bo.batch_size - len(points))  # same shape: no recompilation
        states, _ = trainer.train(padded, spec.seeds, spec.seed)
        per_run = trainer.evaluate(states, trainer.hyperparams(padded, spec.seeds), spec.seed)
        kpis = _mean_over_seeds(per_run, len(padded), spec.seeds)[: len(points)]
        for t, k in zip(trials, kpis):
            value, feasible = operator_objective(k, bo.slo_target, bo.infeasible_penalty)
            t.set_user_attr("feasible", feasible)
            for name in ("cost_usd_per_mtok", "slo_attainment_pct", "cost_usd_per_h", "reward", "e2e_p95_ms"):
                t.set_user_attr(name, k[name])
            study.tell(t, value if np.isfinite(value) else 1e12)
            with open(log, "a") as f:
                f.write(json.dumps({"trial": t.number, "params": t.params, "value": value, "feasible": feasible, "worker": _worker_id()}) + "\n")
        say(f"batch of {len(trials)} told: trials {[t.number for t in trials]}; {finished()}/{bo.trials} finished (compiled {trainer.traces}x)")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    feasible = [t for t in complete if t.user_attrs.get("feasible")]
    best = min(feasible or complete, key=lambda t: t.value)
    write_best_config(spec, best.params, list(best.params), run_dir / "best.yaml", f"{spec.name}-bo-best")
    summary = {"storage": storage, "study_name": bo.study_name, "finished": len(complete), "feasible": len(feasible),
               "best_trial": best.number, "best_value": best.value, "best_params": best.params, "best_feasible": bool(feasible)}
    (run_dir / "best.json").write_text(json.dumps(summary, indent=2))
    _write_trials_table(complete, run_dir / "trials.csv")
    say(f"best trial {best.number}: {best.params} -> {best.value:.4g} $/1M tok ({'feasible' if feasible else 'no trial met the SLO target'}); wrote {run_dir}/best.yaml")
    return summary


def _write_trials_table(trials, path: Path) -> None:
    params = sorted({k for t in trials for k in t.params})
    attrs = ["feasible", "cost_usd_per_mtok", "slo_attainment_pct", "cost_usd_per_h", "reward", "e2e_p95_ms"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", *params, "value", *attrs])
        for t in sorted(trials, key=lambda t: t.number):
            w.writerow([t.number, *(t.params.get(k, "") for k in params), t.value, *(t.user_attrs.get(a, "") for a in attrs)])
