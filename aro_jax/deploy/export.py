"""Exported policies: a self-describing, versioned directory that loads without the
trainer or the environment.

Layout of an export directory::

    policy.json           the spec (format_version, network, observation, actions, nodes,
                          training provenance, SHA-256 of every file below)
    params/               Orbax pytree: per policy, the actor's Dense layers and the
                          observation normaliser (mean, var)
    training_config.yaml  the resolved config of the training run (for provenance)

`export_policy` (needs the training code) writes it; `load_policy` reads it with numpy and
Orbax only: the forward pass, the observation scaling and the action mask are
re-implemented here from what the spec describes, so this module imports nothing from
`aro_jax.algorithms` or `aro_jax.envs` at load time.

The policy is feed-forward on the current observation only: it keeps no state across
ticks. The load forecast it uses is an input field (`forecast_rate_rps`), computed by
the forecaster next to the metrics (in the simulator: `serving.raw_observation`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from aro_jax import contract
from aro_jax.contract import (
    DESCRIPTOR_FIELDS, DESCRIPTOR_NAMES, ENV_VERSION, FALLBACK_ACTION, MASK_LIMITS, NORMALIZE_CLIP, NORMALIZE_EPS, OBS_FIELDS,
)
from aro_jax.deploy.controls import node_controls

FORMAT_VERSION = "3.0"  # 2: the node descriptor is part of the policy input; 3: limits for the pods' CPU and memory share
SPEC_FILE = "policy.json"
SPEC_CHECKSUM_FILE = "policy.json.sha256"  # policy.json cannot hold its own digest
PARAMS_DIR = "params"
CONFIG_FILE = "training_config.yaml"
KIND = "aro-exported-policy"


class ExportError(RuntimeError):
    """An export that cannot be written or loaded; the message says which file and why."""


# --------------------------------------------------------------------------------------
# Writing (needs the training code)
# --------------------------------------------------------------------------------------


def export_policy(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False, step: int | None = None) -> Path:
    """Export the newest valid checkpoint (or checkpoint `step`) of a training run to
    `out_dir`; returns `out_dir`.
    Federated and centralized runs export the one global policy; Local-only runs export
    one parameter set per node."""
    import jax

    from aro_jax.envs import serving as sv
    from aro_jax.envs.scenarios import cluster_params
    from aro_jax.training.checkpointing import load_trained_policy

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir}: exists and is not empty; choose a new directory (or pass --force to replace it)")
    cfg, _, weights, per_node = load_trained_policy(run_dir, step)
    node_names = [n.name for n in cfg.cluster.nodes]
    params = cluster_params(cfg, "train")
    action_names = list(contract.ACTION_SETS[cfg.env.action_set])

    weights = jax.tree.map(np.asarray, weights)
    actor = {k: v for k, v in weights.params["params"].items() if k.startswith("actor")}
    hidden = [int(actor[f"actor_{i}"]["kernel"].shape[-1]) for i in range(len(cfg.ppo.hidden_sizes))]

    def one(tree_index):
        pick = (lambda x: x[tree_index]) if tree_index is not None else (lambda x: x)
        layers = {name: {"kernel": pick(layer["kernel"]).astype(np.float32), "bias": pick(layer["bias"]).astype(np.float32)} for name, layer in actor.items()}
        return {"layers": layers, "obs_mean": pick(weights.obs_stats.mean).astype(np.float32), "obs_var": pick(weights.obs_stats.var).astype(np.float32)}

    if per_node:
        trees = {f"p{i}": one(i) for i in range(len(node_names))}
        policy_of_node = {name: f"p{i}" for i, name in enumerate(node_names)}
    else:
        trees = {"global": one(None)}
        policy_of_node = {name: "global" for name in node_names}

    scales = np.asarray(jax.vmap(sv.observation_scale)(params), np.float32)
    descriptors = np.asarray(jax.vmap(sv.node_descriptor)(params), np.float32)
    nodes = {}
    for i, name in enumerate(node_names):
        nodes[name] = {
            "policy": policy_of_node[name],
            "observation_scale": [float(x) for x in scales[i]],
            "descriptor": {f: float(x) for f, x in zip(DESCRIPTOR_NAMES, descriptors[i])},
            "limits": {k: float(np.asarray(getattr(params, k), np.float32)[i]) for k in MASK_LIMITS},
            "controls": node_controls(params, i),
        }

    config_text = (run_dir / "config.yaml").read_text()
    spec = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "env_version": ENV_VERSION,
        "network": {
            "type": "mlp",
            "activation": "tanh",
            "hidden_sizes": hidden,
            "num_actions": len(action_names),
            "input_dim": contract.POLICY_INPUT_DIM,
            "layers": [f"actor_{i}" for i in range(len(hidden))] + ["actor_out"],
            "layer_formula": "x = tanh(x @ kernel + bias) for hidden layers; logits = x @ kernel + bias",
            "dtype": "float32",
        },
        "observation": {
            "fields": list(OBS_FIELDS),
            "descriptor_fields": {name: ref for name, ref in DESCRIPTOR_FIELDS},
            "preprocess": ("obs = raw / observation_scale[node]; if normalize: obs = clip((obs - obs_mean) / sqrt(obs_var + eps), "
                           "-clip, clip); input = concat(obs, features(descriptor[node])), features: log2(value / reference) "
                           "per descriptor field (reference null: the value), not normalised"),
            "normalize": bool(cfg.ppo.normalize_obs),
            "eps": NORMALIZE_EPS,
            "clip": NORMALIZE_CLIP,
        },
        "actions": {
            "action_set": cfg.env.action_set,
            "names": action_names,
            "fallback": FALLBACK_ACTION,
            "masking": bool(cfg.ppo.action_masking),
            "mask_rules": f"contract.feasible_actions of {ENV_VERSION}: limits per node",
            "selection": "argmax of (masked) logits",
        },
        "per_node": bool(per_node),
        "policies": sorted(trees),
        "nodes": nodes,
        "training": {
            "run_dir": str(run_dir.resolve()),
            "mode": cfg.federated.mode,
            "config_name": cfg.name,
            "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
            "kpis": _training_kpis(run_dir),
        },
        "privacy": _privacy(cfg, run_dir, step),
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _save_tree(tmp / PARAMS_DIR, trees)
        (tmp / CONFIG_FILE).write_text(config_text)
        spec["files"] = {rel: digest for rel, digest in _file_digests(tmp).items() if rel not in (SPEC_FILE, SPEC_CHECKSUM_FILE)}
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        (tmp / SPEC_CHECKSUM_FILE).write_text(hashlib.sha256((tmp / SPEC_FILE).read_bytes()).hexdigest() + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _privacy(cfg, run_dir: Path, step: int | None) -> dict:
    """The exported policy's DP guarantees (trainers.privacy_report) at its checkpoint
    step; without a step, at the newest checkpoint (an upper bound if an older one was
    restored). `guarantees` is empty when training added no noise."""
    from aro_jax.training import checkpointing, trainers

    if step is None:
        saved = checkpointing.steps(run_dir)
        step = max(saved) if saved else 0
    report = trainers.privacy_report(cfg, int(step))
    return {"guarantees": report, "summary": trainers.privacy_line(report),
            "public": "simulator parameters (hardware profiles, mean rates, time zones, prices) are public configuration, not protected"}


def _training_kpis(run_dir: Path) -> dict:
    """The last training record of metrics.jsonl (reward, KPIs, eval reward) and, when the
    run was evaluated, its KPI tables."""
    out: dict = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        last = None
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("event") == "train":
                last = rec
        if last:
            out["final"] = {k: v for k, v in last.items() if k != "event" and isinstance(v, (int, float))}
    for table in sorted((run_dir / "eval").glob("kpis_*.json")) if (run_dir / "eval").is_dir() else []:
        try:
            out[table.stem] = json.loads(table.read_text()).get("rows", {})
        except json.JSONDecodeError:
            pass
    return out


def _save_tree(path: Path, tree) -> None:
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path.resolve(), tree)
    ckptr.wait_until_finished()


def _file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------
# Loading (numpy + Orbax only)
# --------------------------------------------------------------------------------------


@dataclass
class _Net:
    layers: list[tuple[np.ndarray, np.ndarray]]  # (kernel, bias), the last one is the output layer
    obs_mean: np.ndarray
    obs_denom: np.ndarray  # sqrt(var + eps), float32 (divide, as the trainer does)


class ExportedPolicy:
    """A loaded export: `act(raw_obs, node=NAME)` -> action indices (greedy, masked)."""

    def __init__(self, path: Path, spec: dict, trees: dict):
        self.path = path
        self.spec = spec
        self.fields: tuple[str, ...] = tuple(spec["observation"]["fields"])
        self.action_names: tuple[str, ...] = tuple(spec["actions"]["names"])
        self.fallback_action: str = spec["actions"]["fallback"]
        self.fallback_index: int = self.action_names.index(self.fallback_action)
        self.node_names: tuple[str, ...] = tuple(spec["nodes"])
        self.env_version: str = spec["env_version"]
        self.normalize = bool(spec["observation"]["normalize"])
        self.masking = bool(spec["actions"]["masking"])
        self._clip = np.float32(spec["observation"]["clip"])
        eps = np.float32(spec["observation"]["eps"])
        self._nets: dict[str, _Net] = {}
        for key in spec["policies"]:
            t = trees[key]
            layers = [(np.asarray(t["layers"][n]["kernel"], np.float32), np.asarray(t["layers"][n]["bias"], np.float32)) for n in spec["network"]["layers"]]
            var = np.asarray(t["obs_var"], np.float32)
            denom = np.sqrt(var + eps).astype(np.float32)
            self._nets[key] = _Net(layers, np.asarray(t["obs_mean"], np.float32), denom)
        self._scale = {n: np.asarray(v["observation_scale"], np.float32) for n, v in spec["nodes"].items()}
        self.descriptor_fields: tuple[str, ...] = tuple(spec["observation"]["descriptor_fields"])
        if self.descriptor_fields != DESCRIPTOR_NAMES:
            raise ExportError(f"{path}: descriptor fields {list(self.descriptor_fields)} differ from {ENV_VERSION}'s {list(DESCRIPTOR_NAMES)}; re-export the run")
        self._features = {}
        for n, v in spec["nodes"].items():
            lacking = [f for f in DESCRIPTOR_NAMES if not isinstance(v.get("descriptor", {}).get(f), (int, float))]
            if lacking:
                raise ExportError(f"{path}: node {n} descriptor lacks a number for {lacking}; the spec is incomplete")
            values = np.asarray([v["descriptor"][f] for f in DESCRIPTOR_NAMES], np.float32)
            self._features[n] = contract.descriptor_features(values, xp=np).astype(np.float32)
        for n, v in spec["nodes"].items():
            lacking = [k for k in MASK_LIMITS if not isinstance(v.get("limits", {}).get(k), (int, float))]
            if lacking:
                raise ExportError(f"{path}: node {n} limits lack a number for {lacking}; the spec is incomplete")
        self._limits = {n: {k: np.float32(v["limits"][k]) for k in MASK_LIMITS} for n, v in spec["nodes"].items()}
        self._idx = {name: i for i, name in enumerate(self.fields)}

    @property
    def num_actions(self) -> int:
        return len(self.action_names)

    def resolve_node(self, node: str | None) -> str:
        if node is None:
            if len(self.node_names) == 1:
                return self.node_names[0]
            raise ValueError(f"this policy was exported for {len(self.node_names)} nodes; pass node= one of {list(self.node_names)}")
        if node not in self._scale:
            raise ValueError(f"unknown node {node!r}; this export knows {list(self.node_names)}")
        return node

    def act(self, raw_obs, node: str | None = None) -> np.ndarray:
        """Greedy action index for raw observations of shape (F,) or (B, F) of one node
        (fields in `self.fields` order, natural units)."""
        node = self.resolve_node(node)
        raw = np.asarray(raw_obs, np.float32)
        if raw.shape[-1] != len(self.fields) or raw.ndim not in (1, 2):
            raise ValueError(f"raw_obs must have shape ({len(self.fields)},) or (B, {len(self.fields)}); got {raw.shape}")
        logits = self.logits(raw, node)
        if self.masking:
            mask = self.feasible(raw, node)[..., : self.num_actions]
            logits = np.where(mask, logits, np.float32(-1e9))
        return np.argmax(logits, axis=-1)

    def logits(self, raw: np.ndarray, node: str) -> np.ndarray:
        net = self._nets[self.spec["nodes"][node]["policy"]]
        features = np.broadcast_to(self._features[node], raw.shape[:-1] + self._features[node].shape)
        x = raw / self._scale[node]
        if self.normalize:
            x = np.clip((x - net.obs_mean) / net.obs_denom, -self._clip, self._clip)
        x = np.concatenate([x, features], axis=-1)
        *hidden, (k_out, b_out) = net.layers
        for k, b in hidden:
            x = np.tanh(x @ k + b)
        return x @ k_out + b_out

    def feasible(self, raw: np.ndarray, node: str) -> np.ndarray:
        """Which of the 11 extended actions can change anything (`aro_jax.contract`)."""
        return contract.feasible_actions(raw, self._limits[node], xp=np)


def load_policy(path: str | Path) -> ExportedPolicy:
    """Load an export directory; refuses a wrong directory, an incompatible format version,
    and missing, truncated or altered files, saying which."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path}: not a directory; pass the directory written by `aro export`")
    spec_path = path / SPEC_FILE
    if not spec_path.is_file():
        hint = " (this is a training run directory: export it first with `aro export RUN_DIR OUT_DIR`)" if (path / "config.yaml").is_file() else ""
        raise ExportError(f"{path}: no {SPEC_FILE}, so this is not an exported policy directory{hint}")
    _check_spec_digest(path, spec_path)
    try:
        spec = json.loads(spec_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{spec_path}: truncated or corrupt spec, not valid JSON ({e})") from e
    if not isinstance(spec, dict) or spec.get("kind") != KIND:
        raise ExportError(f"{spec_path}: not an aro policy spec (kind {spec.get('kind') if isinstance(spec, dict) else None!r}, expected {KIND!r})")
    version = str(spec.get("format_version", ""))
    if version.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise ExportError(
            f"{spec_path}: format_version {version or '(missing)'} is incompatible with this loader, which reads "
            f"format {FORMAT_VERSION.split('.')[0]}.x; re-export the run with this version of aro (`aro export RUN_DIR OUT_DIR`)"
        )
    missing = [k for k in ("env_version", "network", "observation", "actions", "nodes", "policies", "files") if k not in spec]
    if missing:
        raise ExportError(f"{spec_path}: spec lacks {missing}; the file is incomplete")
    _check_spec_sections(spec_path, spec)
    for rel, digest in spec["files"].items():
        f = path / rel
        if not f.is_file():
            raise ExportError(f"{path}: file {rel} is missing; the export is incomplete")
        if hashlib.sha256(f.read_bytes()).hexdigest() != digest:
            raise ExportError(f"{f}: contents do not match the checksum in {SPEC_FILE}; the file is truncated or corrupt")
    try:
        import orbax.checkpoint as ocp

        trees = ocp.StandardCheckpointer().restore((path / PARAMS_DIR).resolve())
    except Exception as e:  # orbax raises many types for unreadable checkpoints
        raise ExportError(f"{path / PARAMS_DIR}: cannot read the parameters ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})") from e
    trees = _to_numpy(trees)
    try:
        policy = ExportedPolicy(path, spec, trees)
    except (KeyError, ValueError, TypeError) as e:
        raise ExportError(f"{path}: parameters do not match the spec ({type(e).__name__}: {e})") from e
    _check_shapes(policy, spec)
    return policy


def _check_spec_digest(path: Path, spec_path: Path) -> None:
    digest_path = path / SPEC_CHECKSUM_FILE
    if not digest_path.is_file():
        raise ExportError(f"{path}: no {SPEC_CHECKSUM_FILE}, so {SPEC_FILE} cannot be verified; re-export the run with this version of aro (`aro export RUN_DIR OUT_DIR`)")
    expected = digest_path.read_text(errors="replace").strip()
    if hashlib.sha256(spec_path.read_bytes()).hexdigest() != expected:
        raise ExportError(f"{spec_path}: contents do not match the checksum in {SPEC_CHECKSUM_FILE}; the spec was edited, truncated or corrupted")


# Keys each spec section must hold (the loader reads them all).
SPEC_SECTION_KEYS = {
    "network": ("hidden_sizes", "num_actions", "input_dim", "layers"),
    "observation": ("fields", "descriptor_fields", "normalize", "eps", "clip"),
    "actions": ("names", "fallback", "masking"),
}


def _check_spec_sections(spec_path: Path, spec: dict) -> None:
    for section, keys in SPEC_SECTION_KEYS.items():
        if not isinstance(spec[section], dict):
            raise ExportError(f"{spec_path}: {section} must be an object, got {type(spec[section]).__name__}")
        lacking = [k for k in keys if k not in spec[section]]
        if lacking:
            raise ExportError(f"{spec_path}: {section} lacks {', '.join(f'{section}.{k}' for k in lacking)}; the file is incomplete")
    if spec["actions"]["fallback"] not in spec["actions"]["names"]:
        raise ExportError(f"{spec_path}: actions.fallback {spec['actions']['fallback']!r} is not one of actions.names")


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def _check_shapes(policy: ExportedPolicy, spec: dict) -> None:
    net = spec["network"]
    if policy.masking and policy.fields != OBS_FIELDS:
        raise ExportError(f"{policy.path}: observation fields differ from {ENV_VERSION}'s, so its feasibility mask does not apply; re-export the run")
    width = len(policy.fields) + len(policy.descriptor_fields)
    dims = [width, *net["hidden_sizes"], net["num_actions"]]
    if net["num_actions"] != len(policy.action_names):
        raise ExportError(f"{policy.path}: spec has {net['num_actions']} network outputs but {len(policy.action_names)} action names")
    for key, n in policy._nets.items():
        for i, (k, b) in enumerate(n.layers):
            if k.shape != (dims[i], dims[i + 1]) or b.shape != (dims[i + 1],):
                raise ExportError(f"{policy.path}: policy {key} layer {net['layers'][i]} has shape {k.shape}, spec says {(dims[i], dims[i + 1])}")
        if n.obs_mean.shape != (len(policy.fields),):
            raise ExportError(f"{policy.path}: policy {key} normaliser has shape {n.obs_mean.shape}, expected ({len(policy.fields)},)")
    for name, node in spec["nodes"].items():
        if node["policy"] not in policy._nets:
            raise ExportError(f"{policy.path}: node {name} refers to missing policy {node['policy']!r}")
        if len(node["observation_scale"]) != len(policy.fields):
            raise ExportError(f"{policy.path}: node {name} observation_scale has {len(node['observation_scale'])} entries, expected {len(policy.fields)}")


def field_vector(values: dict, fields: Sequence[str]) -> np.ndarray:
    """Raw observation vector (float32) from a dict of field -> value."""
    return np.asarray([values[f] for f in fields], np.float32)
