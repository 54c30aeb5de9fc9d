"""Sweep files: what a sweep or a Bayesian optimisation varies, validated before anything compiles.

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

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from aro_jax.algorithms.ppo import Hyperparams
from aro_jax.config import ConfigError, ExperimentConfig, load_config
from aro_jax.envs.params import RewardWeights
from aro_jax.training.evaluation import KPIS

# Sweepable name -> the config key it comes from (training.trainers.hyperparams): PPO's
# vmappable values, the reward weights and the SLO objective's targets, each under one name.
SWEEPABLE = {
    **{f.name: f"ppo.{f.name}" for f in dataclasses.fields(Hyperparams) if f.name not in ("env", "cost_limits")},
    **{f.name: f"env.reward.{f.name}" for f in dataclasses.fields(RewardWeights)},
    # The constrained objective's targets (they become Hyperparams.cost_limits).
    "slo_target": "objective.slo_target", "max_drop": "objective.max_drop", "min_quality": "objective.min_quality",
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
        cfg = load_config(self.base, [*self.overrides, *extra])
        if self.sweeps_slo_target:  # the swept target holds for every region: no per-workload or per-region ones
            cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, slo_targets={}), cluster=dataclasses.replace(
                cfg.cluster, nodes=[dataclasses.replace(n, slo_target=None) for n in cfg.cluster.nodes]))
        return cfg

    @property
    def sweeps_slo_target(self) -> bool:
        return any("slo_target" in p for p in self.points) or bool(self.bo and "slo_target" in self.bo.parameters)


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
    targets = sorted({k for p in spec.points for k in p} & {"slo_target", "max_drop", "min_quality"})
    if targets and cfg.objective.kind != "slo":
        raise ConfigError(f"sweep key '{targets[0]}': a target of the slo objective, but the base config trains objective.kind={cfg.objective.kind!r}; add objective.kind=slo to overrides:")
    varied = {k for p in spec.points for k in p} | set(spec.bo.parameters if spec.bo else ())
    unused = sorted(varied & {"alpha", "beta", "slo_penalty"})
    if unused and cfg.objective.kind == "slo":
        raise ConfigError(f"sweep key '{unused[0]}': a weight of the paper's reward, which the slo objective does not use "
                          "(it keeps only cost_weight and quality_penalty); add objective.kind=paper to overrides:")
    for p in spec.points:
        spec.config(p)  # ConfigError naming the key for an impossible value
    if spec.bo:
        for name, r in spec.bo.parameters.items():
            spec.config({name: r["low"]})
            spec.config({name: r["high"]})
    return spec
