"""Orbax checkpoints of training runs: save between compiled chunks, restore exactly.

A run directory holds `config.yaml` (the resolved config), `metrics.jsonl` and
`checkpoints/<step>/` written by an Orbax CheckpointManager. Orbax writes each step to a
temporary directory and renames it when complete, so a process killed mid-save leaves no
step that restores to garbage; an unfinished temporary directory is ignored.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from aro_jax import config as config_lib
from aro_jax.training import learned_policy, trainers

EVAL_METRIC = "eval_reward"


class CheckpointError(RuntimeError):
    """A run directory or checkpoint that cannot be restored; says which and why."""


def manager(run_dir: Path, keep_latest: int = 3) -> ocp.CheckpointManager:
    """Keeps the latest `keep_latest` checkpoints plus the best one by evaluation reward."""
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


def save(mngr: ocp.CheckpointManager, step: int, state, hp, cfg_dict: dict, eval_reward: float) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), hp=ocp.args.StandardSave(hp), config=ocp.args.JsonSave(cfg_dict)),
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


def restore(run_dir: Path, abstract_state, abstract_hp, step: int | None = None):
    """(state, hp, step) from the latest (or given) checkpoint of a run."""
    run_dir = Path(run_dir)
    mngr = manager(run_dir)
    steps = mngr.all_steps()
    if not steps:
        raise CheckpointError(f"{run_dir}: no complete checkpoint under checkpoints/ (training never reached its first save, or the directory was emptied)")
    step = mngr.latest_step() if step is None else step
    if step not in steps:
        raise CheckpointError(f"{run_dir}: no checkpoint at step {step}; available: {sorted(steps)}")
    try:
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                hp=ocp.args.StandardRestore(abstract_hp),
            ),
        )
    except Exception as e:  # orbax raises many types for truncated/corrupt files
        raise CheckpointError(f"{run_dir}/checkpoints/{step}: checkpoint is corrupt or does not match this config ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e
    leaves = jax.tree.leaves(restored.state)
    if any(getattr(x, "dtype", None) is not None and x.dtype.kind == "f" and not bool(jax.numpy.isfinite(x).all()) for x in leaves):
        raise CheckpointError(f"{run_dir}/checkpoints/{step}: restored state holds non-finite values; the checkpoint is corrupt")
    return restored.state, restored.hp, step


def load_trained_policy(run_dir: Path, step: int | None = None):
    """(cfg, Policy, weights, per_node) for a run's latest (or given) checkpoint; with
    per_node the weights have a leading node axis (Local-only runs)."""
    cfg = load_run_config(run_dir)
    trainer = trainers.make_trainer(cfg)
    hp0 = trainers.hyperparams(cfg)
    abstract = jax.eval_shape(trainer.init, jax.random.PRNGKey(0), hp0)
    state, _, step = restore(run_dir, abstract, jax.eval_shape(lambda: hp0), step)
    policy = learned_policy.greedy_policy(trainer.network, cfg.ppo.normalize_obs, cfg.ppo.action_masking)
    return cfg, policy, trainer.weights(state), trainer.per_node
