"""Orbax checkpoints of training runs: save between compiled chunks, restore exactly,
verify what was restored, and repair what an interrupted run leaves behind.

A run directory holds `config.yaml` (the resolved config), `metrics.jsonl` and
`checkpoints/<step>/` written by an Orbax CheckpointManager. Orbax writes each step to a
temporary directory and renames it when complete, so a process killed mid-save leaves no
step that restores to garbage; an unfinished temporary directory is ignored on restore
and removed (with a message) when training continues.

Every step also holds `integrity/`: a SHA-256 digest of each leaf of the saved state and
hyperparameters, computed from the arrays in memory before the save. A restore recomputes
the digests and refuses a step whose values changed on disk (a flipped bit can decode to
a plausible number); with no step asked for it falls back to the newest step that
verifies and says which.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from aro_jax import config as config_lib
from aro_jax.training import learned_policy, trainers

EVAL_METRIC = "eval_reward"
INTEGRITY_ITEM = "integrity"
_TMP_MARK = ".orbax-checkpoint-tmp"
_STEP_NAME = re.compile(r"\d+")


class CheckpointError(RuntimeError):
    """A run directory or checkpoint that cannot be restored; says which and why."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def manager(run_dir: Path, keep_latest: int = 3) -> ocp.CheckpointManager:
    """Keeps the latest `keep_latest` checkpoints plus the best one by evaluation reward.
    Reads every step's metrics file: call `repair` first."""
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=keep_latest),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[EVAL_METRIC], reverse=False, n=1),
        ]),
        best_fn=lambda m: m[EVAL_METRIC],
        best_mode="max",
        create=True,
    )
    return ocp.CheckpointManager(Path(run_dir).resolve() / "checkpoints", options=options)


def _reader(run_dir: Path) -> ocp.CheckpointManager:
    """A read-only manager that reads no step's metrics (restore needs none of them)."""
    options = ocp.CheckpointManagerOptions(create=False, lightweight_initialize=True)
    return ocp.CheckpointManager(Path(run_dir).resolve() / "checkpoints", options=options)


def _host_leaf(x) -> np.ndarray | None:
    """A leaf as the numpy array Orbax writes (Python floats become float32), or None for
    an array this process does not hold whole (sharded over processes)."""
    if isinstance(x, jax.Array):
        if not x.is_fully_addressable:
            return None
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
    return np.asarray(jax.device_get(jnp.asarray(x) if isinstance(x, (bool, int, float)) else x))


def tree_digest(tree) -> dict[str, str | None]:
    """SHA-256 of every leaf (dtype, shape and bytes), keyed by its path in the tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = _host_leaf(leaf)
        if x is None:
            out[jax.tree_util.keystr(path)] = None
            continue
        h = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out


def save(mngr: ocp.CheckpointManager, step: int, state, hp, cfg_dict: dict, eval_reward: float) -> None:
    integrity = {"algorithm": "sha256", "state": tree_digest(state), "hp": tree_digest(hp)}
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), hp=ocp.args.StandardSave(hp), config=ocp.args.JsonSave(cfg_dict),
            **{INTEGRITY_ITEM: ocp.args.JsonSave(integrity)},
        ),
        metrics={EVAL_METRIC: float(eval_reward)},
    )


def load_run_config(run_dir: Path) -> config_lib.ExperimentConfig:
    """The resolved config a run was started with."""
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir}: not a directory; pass the run directory given to `aro train` (holding config.yaml and checkpoints/)")
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no config.yaml, so this is not a training run directory")
    return config_lib.load_config(path)


def steps(run_dir: Path) -> list[int]:
    """The run's complete (finalized) checkpoint steps, oldest first."""
    return sorted(_reader(run_dir).all_steps())


def incomplete(run_dir: Path) -> list[Path]:
    """What interrupted saves left under checkpoints/: unfinished temporary step
    directories (and step directories Orbax does not count as finalized)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = {str(s) for s in steps(run_dir)}
    return sorted(p for p in root.iterdir() if (_TMP_MARK in p.name or _STEP_NAME.fullmatch(p.name)) and p.name not in done)


def _metrics_problem(path: Path) -> str | None:
    """Why a step's Orbax metrics file cannot be read as {eval_reward: number}, or None."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "not valid JSON"
    except OSError as e:
        return f"unreadable ({e.strerror or type(e).__name__})"
    if not isinstance(value, dict) or not isinstance(value.get(EVAL_METRIC), (int, float)) or not math.isfinite(value[EVAL_METRIC]):
        return f"does not hold a finite {EVAL_METRIC}"
    return None


def repair(run_dir: Path, logged_eval: dict[int, float] | None = None, say: Callable[[str], None] = warn) -> None:
    """Make a run directory safe to train into, saying what was changed: remove what
    interrupted saves left, and rewrite a step's corrupt Orbax metrics file from the
    run's metrics.jsonl (`logged_eval`: step -> eval_reward), or remove it when the log
    does not have that step (the step stays; it is no longer ranked for the best)."""
    root = Path(run_dir) / "checkpoints"
    for path in incomplete(run_dir):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        say(f"removed {path}: an incomplete checkpoint left by an interrupted save")
    for step in steps(run_dir):
        path = root / str(step) / "metrics" / "metrics"
        problem = _metrics_problem(path) if path.exists() else None
        if problem is None:
            continue
        value = (logged_eval or {}).get(step)
        if value is not None and math.isfinite(value):
            path.write_text(json.dumps({EVAL_METRIC: float(value)}))
            say(f"{path}: corrupt checkpoint metrics file ({problem}); rewrote it from metrics.jsonl ({EVAL_METRIC} {value:.6g})")
        else:
            path.unlink()
            say(f"{path}: corrupt checkpoint metrics file ({problem}); removed it (step {step} is kept, but no longer ranked for the best checkpoint)")


def discard(run_dir: Path, step: int, reason: str, say: Callable[[str], None] = warn) -> None:
    """Take a step out of the run: a corrupt one is moved to checkpoints.corrupt/ (kept for
    inspection), a valid one deleted (it is written again when training passes it)."""
    path = Path(run_dir) / "checkpoints" / str(step)
    if reason == "corrupt":
        dest_root = Path(run_dir) / "checkpoints.corrupt"
        dest_root.mkdir(exist_ok=True)
        dest, n = dest_root / str(step), 1
        while dest.exists():
            dest, n = dest_root / f"{step}.{n}", n + 1
        shutil.move(str(path), str(dest))
        say(f"moved corrupt checkpoint {path} to {dest}")
    else:
        shutil.rmtree(path)
        say(f"removed checkpoint {path} ({reason})")


def _verify(step_dir: Path, restored) -> None:
    integrity = restored.get(INTEGRITY_ITEM) if hasattr(restored, "get") else None
    if integrity is None:
        return  # written before checkpoints carried digests: nothing to check against
    if not isinstance(integrity, dict) or integrity.get("algorithm") != "sha256":
        raise CheckpointError(f"{step_dir}: checkpoint is corrupt (its {INTEGRITY_ITEM} record is unreadable)")
    for name in ("state", "hp"):
        expected, actual = integrity.get(name), tree_digest(restored[name])
        if not isinstance(expected, dict) or set(expected) != set(actual):
            raise CheckpointError(f"{step_dir}: checkpoint is corrupt ({name} does not have the leaves its checksums were written for)")
        bad = [k for k, v in actual.items() if v is not None and expected[k] is not None and v != expected[k]]
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise CheckpointError(f"{step_dir}: checkpoint is corrupt (checksum mismatch in {name}{bad[0]}{more}: the data changed after it was written)")


def _read_failure(e: Exception) -> str:
    """What a failed Orbax read means, in words (TensorStore's messages carry a spec repr)."""
    text = f"{type(e).__name__} {e}"
    if "Structure mismatch" in text or "not found in metadata_tree" in text:
        return "checkpoint does not match this run's config (its saved trees have other leaves)"
    for marker, reason in (
        ("CRC-32C", "a stored CRC check fails"),
        ("checksum", "a stored checksum fails"),
        ("NOT_FOUND", "a file is missing"),
        ("FileNotFoundError", "a file is missing"),
        ("JSONDecodeError", "a metadata file is not valid JSON"),
        ("UnicodeDecodeError", "a metadata file is not valid JSON"),
        ("DATA_LOSS", "a file is truncated or does not decode"),
        ("OUT_OF_RANGE", "a file is truncated"),
    ):
        if marker in text:
            return f"checkpoint is corrupt ({reason})"
    return f"checkpoint is corrupt or does not match this run's config ({type(e).__name__} while reading it)"


def _restore_step(mngr, run_dir: Path, step: int, abstract_state, abstract_hp):
    step_dir = Path(run_dir) / "checkpoints" / str(step)
    items = dict(state=ocp.args.StandardRestore(abstract_state), hp=ocp.args.StandardRestore(abstract_hp))
    if (step_dir / INTEGRITY_ITEM).is_dir():
        items[INTEGRITY_ITEM] = ocp.args.JsonRestore()
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax and tensorstore raise many types for truncated/corrupt files
        raise CheckpointError(f"{step_dir}: {_read_failure(e)}") from e
    _verify(step_dir, restored)
    leaves = jax.tree.leaves(restored.state)
    if any(getattr(x, "dtype", None) is not None and x.dtype.kind == "f" and not bool(jnp.isfinite(x).all()) for x in leaves):
        raise CheckpointError(f"{step_dir}: checkpoint is corrupt (the restored state holds non-finite values)")
    return restored.state, restored.hp


def restore(run_dir: Path, abstract_state, abstract_hp, step: int | None = None, say: Callable[[str], None] = warn,
            skipped: list[int] | None = None):
    """(state, hp, step) from the given checkpoint, or the newest one that verifies: each
    newer step that fails is reported through `say` (and appended to `skipped`)."""
    run_dir = Path(run_dir)
    mngr = _reader(run_dir)
    available = sorted(mngr.all_steps())
    if not available:
        raise CheckpointError(f"{run_dir}: no complete checkpoint under checkpoints/ (training never reached its first save, or the directory was emptied)")
    if step is not None:
        if step not in available:
            raise CheckpointError(f"{run_dir}: no checkpoint at step {step}; available: {available}")
        return (*_restore_step(mngr, run_dir, step, abstract_state, abstract_hp), step)
    failures = []
    for candidate in reversed(available):
        try:
            state, hp = _restore_step(mngr, run_dir, candidate, abstract_state, abstract_hp)
        except CheckpointError as e:
            failures.append(str(e))
            say(f"{e}; skipped")
            if skipped is not None:
                skipped.append(candidate)
            continue
        if failures:
            say(f"using {run_dir / 'checkpoints' / str(candidate)}, the newest checkpoint that verifies")
        return state, hp, candidate
    raise CheckpointError(f"{run_dir}: none of the checkpoints {available} verifies; the newest: {failures[0]}")


def load_trained_policy(run_dir: Path, step: int | None = None):
    """(cfg, Policy, weights, per_node) for a run's latest valid (or given) checkpoint;
    with per_node the weights have a leading node axis (Local-only runs)."""
    cfg = load_run_config(run_dir)
    trainer = trainers.make_trainer(cfg)
    hp0 = trainers.hyperparams(cfg)
    abstract = jax.eval_shape(trainer.init, jax.random.PRNGKey(0), hp0)
    state, _, step = restore(run_dir, abstract, jax.eval_shape(lambda: hp0), step)
    policy = learned_policy.greedy_policy(trainer.network, cfg.ppo.normalize_obs, cfg.ppo.action_masking)
    return cfg, policy, trainer.weights(state), trainer.per_node
