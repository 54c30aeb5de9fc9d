"""Typed experiment configs: YAML files composed by `include:`, dotted overrides, and
validation that names the offending key before anything compiles.

Defaults live in the dataclasses (here, and in the layers that own a section: the reward
weights in `envs.params`, the federated settings in `federated.fedppo`); YAML files only
say what differs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from aro_jax.envs.params import RewardWeights
from aro_jax.federated.fedppo import FederatedConfig

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
DATA_DIR_ENV = "ARO_DATA_DIR"
# The data directory beside the checkout (../shared/data from the repository root), the
# value configs written before paths resolved against their file still carry.
_LEGACY_DATA_DIR = "../shared/data"
TRACE_KEYS = ("path", "format", "scale", "loop")


def default_data_dir() -> str:
    """$ARO_DATA_DIR, else ../shared/data beside the repository: never the current directory."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return str(Path(env).expanduser().absolute())
    return str((Path(__file__).resolve().parents[1] / _LEGACY_DATA_DIR).resolve())


class ConfigError(ValueError):
    """An invalid config; the message names the key and says what is expected."""


@dataclass
class NodeConfig:
    name: str = MISSING
    profile: str = "llama2-70b-a100-tp4"  # a name in aro_jax.envs.hardware.PROFILES
    traffic_mix: str = "conversation"  # "conversation" or "code"
    mean_rate_rps: float = 4.0
    tz_offset_h: float = 0.0
    max_replicas: int = 16
    peer_rtt_ms: float = 50.0  # round trip to the region's rebalancing peer
    peer_spare_rps: float = 2.0  # spare capacity that peer lends
    # This deployment's own SLO-attainment target (objective.kind slo), over its workload's
    # (objective.slo_targets) and objective.slo_target: a 7B deployment can reach what a
    # 70B one serving the same workload cannot. None: its workload's.
    slo_target: Optional[float] = None  # noqa: UP045 (OmegaConf reads typing.Optional)


@dataclass
class ClusterConfig:
    name: str = "single"
    nodes: list[NodeConfig] = field(default_factory=lambda: [NodeConfig(name="node-0")])


@dataclass
class EnvConfig:
    action_set: str = "extended"  # "extended" (11 actions) or "paper" (the paper's 5)
    tick_s: float = 30.0
    episode_ticks: int = 2880  # one simulated day
    num_clusters: int = 16  # simulated clusters per node, stepped in parallel
    scenario: str = "diurnal"
    # Holds traces/ for trace-replay scenarios; relative paths resolve against the config
    # file that sets them (an override: the current directory); default: default_data_dir().
    data_dir: str = field(default_factory=default_data_dir)
    # "gpu-cloud" (CoreWeave's GPU-hour prices) or "hyperscaler" (AWS on-demand instance
    # prices); both cover the pods' CPU and memory: aro_jax.envs.hardware.PRICE_SETS
    prices: str = "gpu-cloud"
    quality_tier: bool = True  # false: no small-model tier for any policy (DegradeQuality is masked)
    # "cluster": the regions share one ServingCluster env (forwarded requests are served by
    # the other regions, at their load and price); "node": each region is its own
    # ServingNode-v0 with a modelled peer region (envs/cluster.py, docs/simulator.md).
    kind: str = "node"
    # Training surges: this share of training episodes carries one flash crowd of 1.5x to
    # surge_max_multiplier x demand for 10-60 minutes at a random time, so a policy meets
    # its replica limit in training (envs.serving.draw_surge); evaluation scenarios carry none.
    surge_prob: float = 0.0
    surge_max_multiplier: float = 3.0
    # Cluster-wide surges (kind "cluster"): in this share of training episodes one surge of
    # the same size hits every region at the same time, in place of their own, so a policy
    # meets demand events its peers cannot absorb (envs.cluster.ServingCluster.reset_state).
    surge_shared_prob: float = 0.0
    # Training token lengths: in this share of training episodes the prompt and answer
    # lengths' log-means move by uniform offsets up to the gap between the chat and code
    # mixes (envs.serving.draw_token_shift), so a policy meets the other workload's lengths;
    # evaluation scenarios carry none.
    token_shift_prob: float = 0.0
    # Where those offsets' range is centred: this fraction of the way to the other mix's
    # lengths (0: on the region's own, the other mix's at the range's edge; 0.5: halfway,
    # so both mixes' lengths lie inside it).
    token_shift_toward: float = 0.0
    # In this share of the shifted episodes the shift sets in at a random time of the
    # episode, not at its start: the work per request changes under a running fleet, with
    # the request rate unchanged (a held-out trace's lengths differ from the plan's from
    # its first minute, against a fleet sized for the plan).
    token_shift_onset_prob: float = 0.0
    # Training burstiness: in this share of training episodes the arrivals follow the code
    # trace's burst process (30 s count CV 1.27 against the conversation trace's 0.22;
    # envs.serving.with_burst_shift), so a chat region meets code-like bursts; evaluation
    # scenarios carry none.
    burst_shift_prob: float = 0.0
    # The mirror for code regions: in this share of their training episodes the arrivals
    # follow the conversation trace's smooth process, so sustained load is met as such and
    # not waited out as a burst would be; evaluation scenarios carry none.
    smooth_shift_prob: float = 0.0
    # Training starting fleets: this share of training episodes starts from a fleet drawn
    # uniformly between the region's replica limits (envs.serving.draw_start_fleet) instead
    # of the one sized for its mean rate, so holding the starting fleet is no safe habit;
    # evaluation scenarios carry none.
    random_fleet_prob: float = 0.0
    # Training demand phases: in this share of training episodes the region's demand runs
    # a uniform 0-24 h ahead of its usual daily shape while its clock still reads local time
    # (envs.serving.draw_demand_phase), so the hour is no safe guide to the load and a policy
    # meets daytime demand at night; evaluation scenarios carry none.
    demand_phase_prob: float = 0.0
    # Training demand levels: each training episode's demand is the region's times a
    # log-uniform factor in [1 / demand_scale_max, demand_scale_max] while the node
    # descriptor keeps the planned rate (envs.serving.draw_demand_scale), so a region busier
    # or quieter than planned is no surprise; 1: none; evaluation scenarios carry none.
    demand_scale_max: float = 1.0
    reward: RewardWeights = field(default_factory=RewardWeights)


@dataclass
class PPOSection:
    """The `ppo:` section: values (Hyperparams) and static settings (ppo.PPOConfig) of the learner."""

    lr: float = 3e-4
    anneal_lr: bool = True
    max_grad_norm: float = 0.5
    rollout_steps: int = 64  # env steps per cluster per update
    num_minibatches: int = 4
    update_epochs: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])
    normalize_obs: bool = True
    action_masking: bool = True
    # Train the output layers only, the hidden layers kept as they start (fine-tuning a
    # pretrained policy: trainers.start_from); under DP-SGD the noise covers the heads only.
    frozen_trunk: bool = False
    # With normalize_obs: keep the normaliser's starting statistics (a pretraining's, from
    # public data); nothing updates or reports them, so DP-SGD needs no private statistics.
    frozen_normalizer: bool = False
    # PID gains of the constrained objective's multipliers (objective.kind: slo; Stooke et
    # al. 2020): the integral gain is the multipliers' learning rate per update.
    lagrange_ki: float = 0.05
    lagrange_kp: float = 0.5
    lagrange_kd: float = 0.0


@dataclass
class TrainConfig:
    total_env_steps: int = 2_000_000  # summed over nodes and clusters
    seed: int = 0
    num_chunks: int = 10  # compiled chunks; progress, metrics and checkpoints between them
    run_dir: str = "runs/default"
    keep_checkpoints: int = 3


@dataclass
class ObjectiveConfig:
    """What training optimises. "paper": the ARO reward (env.reward's weights). "slo": the
    operator's objective, cost (and quality loss) minimised subject to per-request SLO
    attainment >= slo_target and a dropped share <= max_drop (constrained PPO; both are
    hyperparameter leaves, so a sweep over targets is one program)."""

    kind: str = "paper"
    slo_target: float = 0.9  # share of requests within their TTFT and TPOT SLOs (drops and rejects count as misses)
    # Per workload (traffic mix) targets that replace slo_target for its regions, e.g.
    # {code: 0.6}: an operator sets attainment targets per service, and one number cannot
    # be right for a chat service and a 0.125 s-TTFT code-completion service alike (a
    # region's own cluster.nodes[].slo_target wins over both). A sweep over slo_target
    # applies the swept target to every region instead.
    slo_targets: dict[str, float] = field(default_factory=dict)
    # Training aims this far above every target (the limits of the constraints), while
    # evaluation judges the targets: the constraint holds on average over the training
    # distribution (a week of random start times), and a single day varies around that
    # average, so a policy trained to the target itself misses it on about half the days.
    slo_margin: float = 0.0
    max_drop: float = 0.01  # share of requests dropped
    # Training keeps drops this far below max_drop (the drop constraint's limit), for the
    # same reason as slo_margin: the bound holds on average over the week, not on each day.
    drop_margin: float = 0.0
    # Mean answer quality of served requests relative to the large model (the small tier's
    # is 0.66, MMLU): 0.98 lets at most ~6 % of requests go to the small model. Jha et al.
    # report the share of time at >= 98 % quality; without this bound the cheapest way to
    # meet an SLO is to serve most traffic with the 7B model.
    min_quality: float = 0.98

    def target(self, traffic_mix: str, own: float | None = None) -> float:
        """A region's attainment target: its own (cluster.nodes[].slo_target), else its
        workload's (slo_targets), else slo_target."""
        return own if own is not None else self.slo_targets.get(traffic_mix, self.slo_target)


@dataclass
class EvalConfig:
    num_seeds: int = 8  # evaluation episodes per node
    scenario: str = "diurnal"
    # Each heuristic with and without the quality-tier rule, and the autoscalers with
    # spill-over routing too: the learned policy may degrade quality and forward below its
    # replica limit, so the baselines may too.
    baselines: list[str] = field(default_factory=lambda: [
        "static-mean", "static-peak", "reactive", "predictive", "static-mean+tier", "reactive+tier", "predictive+tier",
        "reactive+spill+tier", "predictive+spill+tier"])


@dataclass
class ExperimentConfig:
    name: str = "default"
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    ppo: PPOSection = field(default_factory=PPOSection)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Request traces `aro evaluate` replays: region name (or "*" for every region without
    # its own) -> a file path, or {path, format, scale, loop} (scenarios.TraceReplay).
    # Relative paths resolve against the config file that names them.
    traces: dict[str, Any] = field(default_factory=dict)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _yaml_problem(e: Exception) -> str:
    """`line L column C: problem` of a YAML parse error, on one line."""
    mark = getattr(e, "problem_mark", None)
    if isinstance(e, UnicodeDecodeError):
        problem = f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
    else:
        problem = getattr(e, "problem", None) or str(e) or type(e).__name__
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
    return _one_line(where + problem)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """Read a YAML file, merging its `include:` files (relative paths) first."""
    path = path.resolve()
    included_from = f" (included from {seen[-1]})" if seen else ""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}{included_from}")
    if path in seen:
        raise ConfigError(f"{path}: include cycle through {[str(p) for p in seen]}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError, UnicodeDecodeError and friends
        raise ConfigError(f"{path}{included_from}: not valid YAML: {_yaml_problem(e)}") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}{included_from}: expected a mapping of config keys at the top level")
    _resolve_paths(cfg, path.parent)
    includes = cfg.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    merged = OmegaConf.create()
    for inc in includes:
        if not isinstance(inc, str):
            raise ConfigError(f"{path}: include entries must be file paths, got {inc!r}")
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / inc, seen + (path,)))
    return OmegaConf.merge(merged, cfg)


def _resolve_paths(cfg: DictConfig, base: Path) -> None:
    """Relative file paths of one config file (env.data_dir, traces) made absolute against
    the file's directory, so a config works from any current directory."""
    def resolve(value):
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            return value
        return str((base / Path(value).expanduser()).resolve())

    env = cfg.get("env")
    if isinstance(env, DictConfig) and isinstance(env.get("data_dir"), str):
        resolved = resolve(env.data_dir)
        # Run directories' config.yaml files written before this rule name the old default;
        # it meant the data beside the checkout, not beside the run.
        if env.data_dir == _LEGACY_DATA_DIR and not Path(resolved).is_dir():
            resolved = default_data_dir()
        env.data_dir = resolved
    traces = cfg.get("traces")
    if isinstance(traces, DictConfig):
        for region in list(traces.keys()):
            entry = traces[region]
            if isinstance(entry, str):
                traces[region] = resolve(entry)
            elif isinstance(entry, DictConfig) and isinstance(entry.get("path"), str):
                entry.path = resolve(entry.path)


# Numbers as YAML 1.1 leaves them: `5e6` (no dot, no exponent sign) is a string, and a
# float in a file (`5.0e6`) is not an int. Numeric fields take both, by the schema's type.
_INT_TEXT = re.compile(r"[-+]?\d[\d_]*")
_FLOAT_TEXT = re.compile(r"[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][-+]?\d+)?")


def _as_number(value, kind: type):
    if isinstance(value, bool) or kind not in (int, float):
        return value
    if isinstance(value, str):
        text = value.strip()
        if _INT_TEXT.fullmatch(text):
            value = int(text.replace("_", ""))
        elif _FLOAT_TEXT.fullmatch(text):
            value = float(text.replace("_", ""))
        else:
            return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is float and isinstance(value, int):
        return float(value)
    return value


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}


def _coerce_numbers(node, kind):
    """`node` (plain YAML data) with numeric strings and integral floats converted where
    the schema type `kind` asks for an int or a float."""
    if dataclasses.is_dataclass(kind) and isinstance(node, dict):
        types = _field_types(kind)
        return {k: _coerce_numbers(v, types[k]) if k in types else v for k, v in node.items()}
    if typing.get_origin(kind) is list and isinstance(node, list):
        (item,) = typing.get_args(kind) or (Any,)
        return [_coerce_numbers(v, item) for v in node]
    return _as_number(node, kind)


def _key_type(key: str):
    """The schema type of a dotted key (`cluster.nodes.0.mean_rate_rps`), or None."""
    kind: Any = ExperimentConfig
    for part in key.split("."):
        if dataclasses.is_dataclass(kind):
            kind = _field_types(kind).get(part)
        elif typing.get_origin(kind) is list and part.lstrip("-").isdigit():
            kind = (typing.get_args(kind) or (None,))[0]
        else:
            return None
        if kind is None:
            return None
    return kind


def load_config(path: str | Path | None = None, overrides: list[str] = (), extra_files: list[str | Path] = ()) -> ExperimentConfig:
    """Load, compose, override and validate an experiment config.

    `extra_files` are YAML layers merged after `path` (e.g. another cluster file);
    `overrides` are dotted `key=value` strings (`ppo.lr=1e-4`). Raises ConfigError naming
    the offending key for unknown keys, wrong types and impossible values.
    """
    schema = OmegaConf.structured(ExperimentConfig)
    try:
        layers = [schema]
        files = [Path(path) if path else DEFAULT_CONFIG, *(Path(f) for f in extra_files)]
        for f in files:
            layer = OmegaConf.to_container(_read_yaml(f), resolve=False)
            layers.append(OmegaConf.create(_coerce_numbers(layer, ExperimentConfig)))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value (e.g. ppo.lr=1e-4)")
        cfg = OmegaConf.merge(*layers)
        for override in overrides:
            key, value = override.split("=", 1)
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"config key '{key.strip()}': value {value!r} is not valid YAML: {_yaml_problem(e)}") from e
            kind = _key_type(key.strip())
            parsed = _coerce_numbers(parsed, kind) if kind is not None else parsed
            OmegaConf.update(cfg, key.strip(), parsed, merge=True)
        obj = OmegaConf.to_object(cfg)
        # What is still relative came from an override: relative to the current directory.
        obj.env.data_dir = str(Path(obj.env.data_dir).expanduser().absolute())
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': {_one_line(str(e).splitlines()[0] if str(e) else type(e).__name__)}") from e
    validate(obj)
    return obj


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def validate(cfg: ExperimentConfig) -> None:
    """Impossible values, each reported with its key."""
    from aro_jax.envs import hardware, scenarios
    from aro_jax.envs.serving import ACTION_SETS

    def require(ok: bool, key: str, msg: str):
        if not ok:
            raise ConfigError(f"config key '{key}': {msg}")

    for key, value in _floats(cfg):  # inf and nan pass `> 0` checks or poison training
        require(math.isfinite(value), key, f"must be a finite number, got {value}")
    require(len(cfg.cluster.nodes) > 0, "cluster.nodes", "at least one node is needed")
    names = [n.name for n in cfg.cluster.nodes]
    require(len(set(names)) == len(names), "cluster.nodes", f"node names must be unique, got {names}")
    for i, n in enumerate(cfg.cluster.nodes):
        k = f"cluster.nodes.{i}"
        require(n.profile in hardware.PROFILES or hardware.is_profile_file(n.profile), f"{k}.profile",
                f"unknown profile {n.profile!r}; choose one of {sorted(hardware.PROFILES)} or a profile .yaml file (aro calibrate --out)")
        require(n.traffic_mix in scenarios.TRAFFIC_MIXES, f"{k}.traffic_mix", f"must be one of {sorted(scenarios.TRAFFIC_MIXES)}, got {n.traffic_mix!r}")
        require(n.mean_rate_rps > 0, f"{k}.mean_rate_rps", f"must be > 0, got {n.mean_rate_rps}")
        require(n.max_replicas >= 1, f"{k}.max_replicas", f"must be >= 1, got {n.max_replicas}")
        require(-12 <= n.tz_offset_h <= 14, f"{k}.tz_offset_h", f"must be a UTC offset in [-12, 14] hours, got {n.tz_offset_h}")
        require(n.peer_rtt_ms >= 0 and n.peer_spare_rps >= 0, k, "peer_rtt_ms and peer_spare_rps must be >= 0")

    e = cfg.env
    require(e.action_set in ACTION_SETS, "env.action_set", f"must be one of {sorted(ACTION_SETS)}, got {e.action_set!r}")
    require(e.kind in ("cluster", "node"), "env.kind", f"must be 'cluster' (the regions share one env) or 'node' (each region alone), got {e.kind!r}")
    require(e.prices in hardware.PRICE_SETS, "env.prices", f"must be one of {list(hardware.PRICE_SETS)}, got {e.prices!r}")
    require(e.tick_s > 0, "env.tick_s", f"must be > 0, got {e.tick_s}")
    require(e.episode_ticks >= 1, "env.episode_ticks", f"must be >= 1, got {e.episode_ticks}")
    require(0 <= e.surge_prob <= 1, "env.surge_prob", f"must be a share of episodes in [0, 1], got {e.surge_prob}")
    require(0 <= e.token_shift_prob <= 1, "env.token_shift_prob", f"must be a share of episodes in [0, 1], got {e.token_shift_prob}")
    require(0 <= e.token_shift_onset_prob <= 1, "env.token_shift_onset_prob",
            f"must be a share of episodes in [0, 1], got {e.token_shift_onset_prob}")
    require(0 <= e.token_shift_toward <= 1, "env.token_shift_toward",
            f"must be a fraction of the way to the other mix's lengths in [0, 1], got {e.token_shift_toward}")
    require(0 <= e.burst_shift_prob <= 1, "env.burst_shift_prob", f"must be a share of episodes in [0, 1], got {e.burst_shift_prob}")
    require(0 <= e.smooth_shift_prob <= 1, "env.smooth_shift_prob", f"must be a share of episodes in [0, 1], got {e.smooth_shift_prob}")
    require(0 <= e.random_fleet_prob <= 1, "env.random_fleet_prob", f"must be a share of episodes in [0, 1], got {e.random_fleet_prob}")
    require(0 <= e.demand_phase_prob <= 1, "env.demand_phase_prob", f"must be a share of episodes in [0, 1], got {e.demand_phase_prob}")
    require(0 <= e.surge_shared_prob <= 1, "env.surge_shared_prob", f"must be a share of episodes in [0, 1], got {e.surge_shared_prob}")
    require(e.surge_shared_prob == 0 or e.kind == "cluster", "env.surge_shared_prob",
            f"needs env.kind=cluster (regions that share one env), got env.kind={e.kind!r}")
    require(1 <= e.demand_scale_max <= 4, "env.demand_scale_max",
            f"must be in [1, 4] (a factor on the demand; 1: none), got {e.demand_scale_max}")
    # Below the held-out flash crowd's 5x, which must stay heavier than anything trained on.
    require(1.5 <= e.surge_max_multiplier < 5, "env.surge_max_multiplier",
            f"must be in [1.5, 5) (1.5x is the smallest surge; the held-out flash crowd is 5x), got {e.surge_max_multiplier}")
    require(e.num_clusters >= 1, "env.num_clusters", f"must be >= 1, got {e.num_clusters}")
    require(e.scenario in scenarios.TRAINING_SCENARIOS, "env.scenario",
            f"{e.scenario!r} is not a training scenario (held-out scenarios {list(scenarios.HELD_OUT_SCENARIOS)} are for evaluation only); choose one of {list(scenarios.TRAINING_SCENARIOS)}")
    for w in dataclasses.asdict(e.reward):
        require(getattr(e.reward, w) >= 0, f"env.reward.{w}", f"must be >= 0, got {getattr(e.reward, w)}")

    p = cfg.ppo
    require(p.lr > 0, "ppo.lr", f"must be > 0, got {p.lr}")
    require(p.rollout_steps >= 1, "ppo.rollout_steps", f"must be >= 1, got {p.rollout_steps}")
    require(p.update_epochs >= 1, "ppo.update_epochs", f"must be >= 1, got {p.update_epochs}")
    require(p.num_minibatches >= 1, "ppo.num_minibatches", f"must be >= 1, got {p.num_minibatches}")
    batch = p.rollout_steps * e.num_clusters * len(cfg.cluster.nodes)
    if cfg.federated.mode in ("federated", "local"):  # one learner per node, on its own clusters
        node_batch = p.rollout_steps * e.num_clusters
        require(node_batch % p.num_minibatches == 0, "ppo.num_minibatches",
                f"{p.num_minibatches} does not divide the batch of {node_batch} transitions per node "
                f"(rollout_steps {p.rollout_steps} x num_clusters {e.num_clusters}: in {cfg.federated.mode} mode each node's learner updates on its own clusters)")
    else:
        require(batch % p.num_minibatches == 0, "ppo.num_minibatches",
                f"{p.num_minibatches} does not divide the batch of {batch} transitions (rollout_steps x num_clusters x nodes)")
    require(0 < p.gamma <= 1, "ppo.gamma", f"must be in (0, 1], got {p.gamma}")
    require(0 <= p.gae_lambda <= 1, "ppo.gae_lambda", f"must be in [0, 1], got {p.gae_lambda}")
    require(p.clip_eps > 0, "ppo.clip_eps", f"must be > 0, got {p.clip_eps}")
    require(p.max_grad_norm > 0, "ppo.max_grad_norm", f"must be > 0, got {p.max_grad_norm}")
    require(p.ent_coef >= 0 and p.vf_coef >= 0, "ppo.ent_coef", "ent_coef and vf_coef must be >= 0")
    require(min(p.lagrange_ki, p.lagrange_kp, p.lagrange_kd) >= 0, "ppo.lagrange_ki", "the multipliers' PID gains lagrange_ki, lagrange_kp and lagrange_kd must be >= 0")
    require(len(p.hidden_sizes) >= 1 and all(h >= 1 for h in p.hidden_sizes), "ppo.hidden_sizes", f"need positive layer sizes, got {p.hidden_sizes}")

    _validate_federated(cfg, require)

    o = cfg.objective
    require(o.kind in ("paper", "slo"), "objective.kind", f"must be paper or slo, got {o.kind!r}")
    require(0 < o.slo_target < 1, "objective.slo_target", f"must be a share in (0, 1), got {o.slo_target}")
    for mix, target in o.slo_targets.items():
        require(mix in scenarios.TRAFFIC_MIXES, f"objective.slo_targets.{mix}", f"unknown traffic mix; choose from {sorted(scenarios.TRAFFIC_MIXES)}")
        require(math.isfinite(target) and 0 < target < 1, f"objective.slo_targets.{mix}", f"must be a share in (0, 1), got {target}")
    own = [n.slo_target for n in cfg.cluster.nodes if n.slo_target is not None]
    for i, n in enumerate(cfg.cluster.nodes):
        require(n.slo_target is None or (math.isfinite(n.slo_target) and 0 < n.slo_target < 1), f"cluster.nodes.{i}.slo_target",
                f"must be a share in (0, 1) (or null: its workload's target), got {n.slo_target}")
    highest = max([o.slo_target, *o.slo_targets.values(), *own])
    require(0 <= o.slo_margin < 1 - highest, "objective.slo_margin",
            f"must be >= 0 and leave every target plus the margin below 1 (highest target {highest}), got {o.slo_margin}")
    require(0 <= o.max_drop < 1, "objective.max_drop", f"must be a share in [0, 1), got {o.max_drop}")
    require(0 <= o.drop_margin <= o.max_drop, "objective.drop_margin",
            f"must be >= 0 and at most objective.max_drop ({o.max_drop}), got {o.drop_margin}")
    require(0 < o.min_quality <= 1, "objective.min_quality", f"must be a share in (0, 1], got {o.min_quality}")

    t = cfg.train
    require(t.num_chunks >= 1, "train.num_chunks", f"must be >= 1, got {t.num_chunks}")
    require(t.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}")
    updates = t.total_env_steps // batch
    require(updates >= t.num_chunks, "train.total_env_steps",
            f"{t.total_env_steps} steps give {updates} PPO updates of {batch} transitions, fewer than train.num_chunks={t.num_chunks}")

    trace_entries(cfg)

    from aro_jax.envs.heuristics import HEURISTICS

    require(cfg.eval.num_seeds >= 1, "eval.num_seeds", f"must be >= 1, got {cfg.eval.num_seeds}")
    require(cfg.eval.scenario in scenarios.SCENARIOS, "eval.scenario", f"must be one of {list(scenarios.SCENARIOS)}")
    for b in cfg.eval.baselines:
        require(b in HEURISTICS, "eval.baselines", f"unknown baseline {b!r}; choose from {sorted(HEURISTICS)}")


def parse_trace_scale(value, key: str) -> float | str:
    """A trace scale: a positive finite number, or "fit" (ConfigError naming `key`)."""
    if isinstance(value, str) and value.strip().lower() == "fit":
        return "fit"
    number = _as_number(value.strip() if isinstance(value, str) else value, float)
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not (math.isfinite(number) and number > 0):
        raise ConfigError(f"{key}: trace scale must be a positive number or 'fit', got {value!r}")
    return float(number)


def trace_entries(cfg: ExperimentConfig) -> dict[str, dict]:
    """The `traces:` map checked and normalised: region (or "*") -> {path (absolute),
    format, scale, loop}, with None where the entry leaves a setting to the command line.
    Raises ConfigError naming the key."""
    from aro_jax.envs.trace import FORMATS

    names = [n.name for n in cfg.cluster.nodes]
    out = {}
    for region, entry in (cfg.traces or {}).items():
        key = f"traces.{region}"
        if region != "*" and region not in names:
            raise ConfigError(f"config key '{key}': the cluster {cfg.cluster.name!r} has no region {region!r}; its regions are {', '.join(names)} (or '*' for every region)")
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"config key '{key}': expected a trace file path or a mapping with keys {', '.join(TRACE_KEYS)}, got {entry!r}")
        unknown = [k for k in entry if k not in TRACE_KEYS]
        if unknown:
            raise ConfigError(f"config key '{key}.{unknown[0]}': unknown trace setting; expected {', '.join(TRACE_KEYS)}")
        path = entry.get("path")
        if not isinstance(path, str) or not path.strip():
            raise ConfigError(f"config key '{key}.path': a trace file path is required, got {path!r}")
        fmt = entry.get("format")
        if fmt is not None and fmt not in (*FORMATS, "auto"):
            raise ConfigError(f"config key '{key}.format': must be one of {', '.join(FORMATS)} or auto, got {fmt!r}")
        scale = entry.get("scale")
        if scale is not None:
            scale = parse_trace_scale(scale, f"config key '{key}.scale'")
        loop = entry.get("loop")
        if loop is not None and not isinstance(loop, bool):
            raise ConfigError(f"config key '{key}.loop': must be true or false, got {loop!r}")
        out[region] = {"path": str(Path(path).expanduser().absolute()), "format": None if fmt == "auto" else fmt, "scale": scale, "loop": loop}
    return out


def _floats(obj, key: str = ""):
    """(dotted key, value) of every float in a config object, lists included."""
    join = lambda part: f"{key}.{part}" if key else str(part)  # noqa: E731
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _floats(getattr(obj, f.name), join(f.name))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _floats(v, join(i))
    elif isinstance(obj, float):
        yield key, obj


def check_data(cfg: ExperimentConfig, keys: tuple[str, ...] = ("env.scenario", "eval.scenario")) -> None:
    """Read and check the data files of the scenarios a command will run (the scenario
    config `keys` it uses), before anything compiles: a trace-replay scenario needs
    env.data_dir to hold its trace, a well-formed CSV. Raises ConfigError naming the key
    and the file (full path, line)."""
    from aro_jax.envs import scenarios
    from aro_jax.envs.trace import TraceFormatError, load_trace_csv

    for key in keys:
        section, name = key.split(".")
        scenario = getattr(getattr(cfg, section), name)
        if not scenario.startswith("trace-"):
            continue
        data_dir = Path(cfg.env.data_dir).absolute()
        path = scenarios.trace_path(data_dir, scenario)
        if not data_dir.is_dir():
            raise ConfigError(f"config key 'env.data_dir': {data_dir} is not a directory; {key} {scenario} replays traces/{path.name} from it")
        try:
            load_trace_csv(path)
        except (TraceFormatError, OSError) as e:
            raise ConfigError(f"config key '{key}' = {scenario}: {_one_line(str(e), 500)}") from e


def _validate_federated(cfg: ExperimentConfig, require) -> None:
    fed, n = cfg.federated, len(cfg.cluster.nodes)
    require(fed.mode in ("centralized", "federated", "local"), "federated.mode", f"must be centralized, federated or local, got {fed.mode!r}")
    require(0 < fed.dp_delta < 1, "federated.dp_delta", f"must be in (0, 1), got {fed.dp_delta}")
    _validate_segment_dp(cfg, require)
    require(0 <= fed.global_ema < 1, "federated.global_ema", f"must be a decay in [0, 1) (0: deploy the last global), got {fed.global_ema}")
    require(fed.global_ema == 0 or (fed.mode == "federated" and fed.personal_mix == 1), "federated.global_ema",
            "averages the one shared global policy: needs federated.mode=federated and federated.personal_mix=1")
    if fed.mode == "centralized":
        return  # the other federated settings do not apply
    from aro_jax.federated import aggregators, attacks

    require(fed.local_updates >= 1, "federated.local_updates", f"must be >= 1, got {fed.local_updates}")
    require(fed.server_lr > 0, "federated.server_lr", f"must be > 0, got {fed.server_lr}")
    require(0 < fed.personal_mix <= 1, "federated.personal_mix", f"must be a share in (0, 1] (1: every region runs the global policy), got {fed.personal_mix}")
    networks = ("actor", "critic", "cost_critic")
    require(set(fed.personal_own) <= {*networks, *(f"{n}_out" for n in networks)}
            and (not fed.personal_own or (fed.mode == "federated" and fed.personal_mix < 1)),
            "federated.personal_own", f"names networks or output layers a personalised region keeps its own (actor, critic, "
            f"cost_critic, actor_out, critic_out, cost_critic_out; needs federated.mode=federated and federated.personal_mix < 1), "
            f"got {list(fed.personal_own)}")
    require(fed.personal_sends in ("delta", "offset"), "federated.personal_sends", f"must be delta or offset, got {fed.personal_sends!r}")
    require(not fed.personal_mix_anneal or (fed.mode == "federated" and fed.personal_mix < 1), "federated.personal_mix_anneal",
            "anneals the pull of personal policies: needs federated.mode=federated and federated.personal_mix < 1")
    require(fed.personal_sends == "delta" or (fed.mode == "federated" and fed.personal_mix < 1), "federated.personal_sends",
            "offset is what a personalised region sends: needs federated.mode=federated and federated.personal_mix < 1")
    require(fed.personal_sends == "delta" or (fed.server_momentum == 0 and fed.worker_momentum == 0), "federated.personal_sends",
            "offset messages are positions, not steps: momentum over them would overshoot the centre; set server_momentum and worker_momentum to 0")
    require(0 <= fed.server_momentum < 1, "federated.server_momentum", f"must be in [0, 1), got {fed.server_momentum}")
    require(0 <= fed.worker_momentum < 1, "federated.worker_momentum", f"must be in [0, 1), got {fed.worker_momentum}")
    require(fed.num_byzantine >= 0, "federated.num_byzantine", f"must be >= 0, got {fed.num_byzantine}")
    require(fed.aggregator in aggregators.AGGREGATORS, "federated.aggregator", f"unknown {fed.aggregator!r}; choose from {sorted(aggregators.AGGREGATORS)}")
    for p in fed.pre_aggregators:
        require(p in aggregators.PRE_AGGREGATORS, "federated.pre_aggregators", f"unknown {p!r}; choose from {sorted(aggregators.PRE_AGGREGATORS)}")
    if fed.mode == "federated":
        try:
            aggregators.check_requirements(fed.aggregator, n, fed.num_byzantine)
        except ValueError as e:
            require(False, "federated.num_byzantine", f"{e} (cluster has {n} nodes)")
    require(fed.attack in attacks.ATTACKS, "federated.attack", f"unknown {fed.attack!r}; choose from {sorted(attacks.ATTACKS)}")
    require(all(0 <= i < n for i in fed.byzantine_nodes), "federated.byzantine_nodes", f"indices must be in [0, {n}), got {fed.byzantine_nodes}")
    require(fed.attack == "none" or fed.byzantine_nodes, "federated.byzantine_nodes", f"attack {fed.attack!r} needs at least one Byzantine node index")
    require(fed.dp_clip_norm >= 0 and fed.dp_noise_multiplier >= 0, "federated.dp_noise_multiplier", "dp_clip_norm and dp_noise_multiplier must be >= 0")
    require(fed.dp_noise_multiplier == 0 or fed.dp_clip_norm > 0, "federated.dp_clip_norm", "noise needs a clip norm > 0 (the noise std is noise_multiplier x clip_norm)")
    require(fed.dp_noise_multiplier == 0 or fed.dp_stats_clip_norm > 0, "federated.dp_stats_clip_norm",
            "DP noise on the observation statistics needs their clip norm > 0")
    require(fed.dp_mechanism in ("local", "central"), "federated.dp_mechanism", f"must be local or central, got {fed.dp_mechanism!r}")
    require(0 < fed.dp_node_sampling <= 1, "federated.dp_node_sampling", f"must be a rate in (0, 1], got {fed.dp_node_sampling}")
    if fed.mode == "federated" and fed.dp_noise_multiplier > 0:
        # Region unit: N = regions; delta must be below 1 / N (else "leak one region" is allowed).
        require(fed.dp_delta < 1 / n, "federated.dp_delta", f"{fed.dp_delta} is not below 1/N = 1/{n} for the region unit (N = regions)")
        if fed.dp_mechanism == "central":
            from aro_jax.federated import privacy

            try:
                privacy.check_central(fed.aggregator, fed.pre_aggregators)
            except ValueError as e:
                require(False, "federated.aggregator" if fed.aggregator not in privacy.CENTRAL_SENSITIVITY else "federated.pre_aggregators", str(e))
    require(fed.dp_node_sampling == 1 or (fed.dp_mechanism == "central" and fed.dp_noise_multiplier > 0), "federated.dp_node_sampling",
            "sampling regions (< 1) needs dp_mechanism central with noise: under local noise the server sees which regions sent, so sampling amplifies nothing against it")
    if cfg.env.kind == "cluster":  # the regions step together: devices split the clusters
        require(fed.devices >= 1 and cfg.env.num_clusters % fed.devices == 0, "federated.devices",
                f"must divide env.num_clusters={cfg.env.num_clusters} (in the cluster env each device steps whole clusters), got {fed.devices}")
    else:
        require(fed.devices >= 1 and n % fed.devices == 0, "federated.devices", f"must divide the {n} nodes, got {fed.devices}")
    if fed.mode != "centralized":
        batch = cfg.ppo.rollout_steps * cfg.env.num_clusters * n
        rounds = cfg.train.total_env_steps // batch // fed.local_updates
        require(rounds >= cfg.train.num_chunks, "federated.local_updates",
                f"{fed.local_updates} local updates per round leave {rounds} rounds, fewer than train.num_chunks={cfg.train.num_chunks}")


def num_updates(cfg: ExperimentConfig) -> int:
    """PPO updates a run makes: whole chunks of equal size (each compiles once), so up to
    num_chunks - 1 updates' worth of total_env_steps is not run."""
    batch = cfg.ppo.rollout_steps * cfg.env.num_clusters * len(cfg.cluster.nodes)
    per_chunk = cfg.train.total_env_steps // batch // cfg.train.num_chunks
    return per_chunk * cfg.train.num_chunks


def segment_pool(cfg: ExperimentConfig) -> int:
    """Segments (simulated clusters) in one learner's pool: a region's clusters, or every
    region's in centralized mode (one learner on pooled data)."""
    return cfg.env.num_clusters * (len(cfg.cluster.nodes) if cfg.federated.mode == "centralized" else 1)


def _validate_segment_dp(cfg: ExperimentConfig, require) -> None:
    """Record-level DP (DP-SGD over segments, unit one simulated cluster-day)."""
    fed = cfg.federated
    c, s, q = fed.segment_dp_clip_norm, fed.segment_dp_noise_multiplier, fed.segment_dp_sampling_rate
    require(c >= 0 and s >= 0, "federated.segment_dp_noise_multiplier", "segment_dp_clip_norm and segment_dp_noise_multiplier must be >= 0")
    require(s == 0 or c > 0, "federated.segment_dp_clip_norm", "noise needs a clip norm > 0 (the noise std is noise_multiplier x clip_norm)")
    require(0 <= q <= 1, "federated.segment_dp_sampling_rate", f"must be a rate in (0, 1] (0: 1 / ppo.num_minibatches), got {q}")
    if c == 0:
        return
    require(not cfg.ppo.normalize_obs or cfg.ppo.frozen_normalizer
            or (fed.segment_dp_stats_noise_multiplier > 0 and fed.segment_dp_stats_clip_norm > 0), "ppo.normalize_obs",
            "under DP-SGD (federated.segment_dp_clip_norm > 0) needs federated.segment_dp_stats_noise_multiplier > 0 (and its clip norm), "
            "ppo.frozen_normalizer: true, or false: "
            "the running normaliser would pool every segment's observations without noise (observations are already divided by each region's public observation scale)")
    require(cfg.objective.kind == "paper", "objective.kind",
            "DP-SGD needs the paper objective: the slo objective's Lagrange multipliers are updated from every segment's costs without noise")
    n = segment_pool(cfg)
    if s > 0:
        require(fed.dp_delta < 1 / n, "federated.dp_delta", f"{fed.dp_delta} is not below 1/N = 1/{n} for the segment unit (N = segments in a learner's pool)")
