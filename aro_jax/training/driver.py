"""Training driver: compiled chunks -> block -> log -> evaluate -> checkpoint (Stoix's
plain Python loop around the compiled learner). Side effects live here, not in ppo.py."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from aro_jax import config as config_lib
from aro_jax.envs.scenarios import cluster_params
from aro_jax.training import checkpointing, evaluation, learned_policy, trainers
from aro_jax.training.trainers import hyperparams, make_trainer

EVAL_SEEDS = 2
EVAL_TICKS = 720  # six simulated hours per node: a cheap, fixed-seed score for "best"


def _tensorboard(run_dir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tb"))


class TrainingError(RuntimeError):
    """Training that cannot go on (non-finite values); says what was kept and what to do."""


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` whole: a process killed meanwhile leaves the old file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _finite_flags(state, metrics) -> dict:
    """Whether each part of the learning state (parameters, optimiser state, normaliser,
    server state; not the envs) and each metric is finite, as booleans to check on host."""
    flags = {}
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = []
        for k in path:
            if not isinstance(k, jax.tree_util.GetAttrKey):
                break
            names.append(k.name)
        if "env_state" in names or names[-1:] == ["obs"] or not jnp.issubdtype(x.dtype, jnp.floating):
            continue
        part = ".".join(names) or "state"
        flags[part] = jnp.logical_and(flags.get(part, True), jnp.isfinite(x).all())
    for k, v in metrics.items():
        if jnp.issubdtype(v.dtype, jnp.floating):
            flags[f"metric {k}"] = jnp.isfinite(v).all()
    return flags


def _recent_mean(values, per_chunk: int):
    """A chunk's metric over its last quarter of units: a float, or a list for metrics kept
    per region (units, regions)."""
    recent = np.mean(np.asarray(values)[-max(1, per_chunk // 4):], axis=0)
    return recent.tolist() if recent.ndim else float(recent)


def train(cfg: config_lib.ExperimentConfig | None, run_dir: Path, resume: bool = False, quiet: bool = False, step: int | None = None):
    """Train per `cfg` into `run_dir`, or continue the run there (`resume`, cfg from the
    run, from its newest valid checkpoint or from `step`); returns (final state,
    Hyperparams). Where a run was resumed does not change its result: the state is
    restored exactly and each chunk is the same compiled program.

    A chunk that produces non-finite learning state or losses raises TrainingError before
    anything of it is logged or saved. What interrupted runs leave (unfinished saves, a
    corrupt step, a torn metrics line) is repaired with a warning on stderr."""
    run_dir = Path(run_dir)
    lead = jax.process_index() == 0  # in multi-process runs only process 0 logs and prints
    quiet = quiet or not lead
    say = checkpointing.warn if lead else (lambda message: None)
    if step is not None and not resume:
        raise checkpointing.CheckpointError(f"{run_dir}: a checkpoint step is chosen to resume from; use it with --resume")
    if resume:
        cfg = checkpointing.load_run_config(run_dir)
    # Built before the run directory is touched: a config it cannot build leaves nothing.
    trainer = make_trainer(cfg)
    hp = hyperparams(cfg)
    per_chunk = trainer.units_total // cfg.train.num_chunks
    unit = "PPO updates" if cfg.federated.mode == "centralized" else "rounds"
    log_path = run_dir / "metrics.jsonl"
    created = not run_dir.exists()
    if not resume:
        if checkpointing.steps(run_dir):
            raise checkpointing.CheckpointError(f"{run_dir}: already holds checkpoints; use --resume {run_dir} to continue it or choose another run directory")
        if lead:
            checkpointing.repair(run_dir, say=say)  # what an interrupted first save left
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(run_dir / "config.yaml", config_lib.to_yaml(cfg))
            if log_path.exists():
                log_path.unlink()
                say(f"{log_path}: removed the log of an earlier attempt that saved no checkpoint")
        state = jax.jit(trainer.init)(jax.random.PRNGKey(cfg.train.seed), hp)
    else:
        logged = read_metrics(log_path, say) if log_path.exists() else []
        if lead:
            checkpointing.repair(run_dir, {r["unit"]: r.get("eval_reward") for r in logged if isinstance(r.get("unit"), int)}, say)
        if not checkpointing.steps(run_dir):
            say(f"{run_dir}: no complete checkpoint (the run was stopped before or during its first save); starting it from the beginning with its config.yaml")
            state = jax.jit(trainer.init)(jax.random.PRNGKey(cfg.train.seed), hp)
        else:
            abstract = jax.eval_shape(trainer.init, jax.random.PRNGKey(0), hp)
            skipped: list[int] = []
            state, hp, restored = checkpointing.restore(run_dir, abstract, jax.eval_shape(lambda: hp), step, say, skipped)
            if lead:
                for s in skipped:
                    checkpointing.discard(run_dir, s, "corrupt", say)
                for s in checkpointing.steps(run_dir):
                    if s > restored:
                        checkpointing.discard(run_dir, s, f"after step {restored}, which the run continues from; training writes it again", say)
        done = trainer.units_done(state)
        if lead and log_path.exists():  # drop lines logged after the restored checkpoint
            kept = [r for r in logged if r.get("unit", 0) <= done]
            _write_atomic(log_path, "".join(json.dumps(r) + "\n" for r in kept))
        if done >= trainer.units_total:
            if lead:
                print(f"{run_dir}: the run is finished ({done} of {trainer.units_total} {unit}); nothing to resume", flush=True)
            return state, hp
    done = trainer.units_done(state)

    chunk_fn = jax.jit(trainer.chunk, static_argnums=2)
    finite_flags = jax.jit(_finite_flags)
    policy = learned_policy.greedy_policy(trainer.network, cfg.ppo.normalize_obs, cfg.ppo.action_masking)
    eval_params = cluster_params(cfg, "diurnal")
    if cfg.objective.kind == "slo":  # score checkpoints by the reward they were trained on
        eval_params = trainers.with_reward_weights(eval_params, trainers.reward_weights(cfg))
    env, eval_params = evaluation.eval_env(cfg, eval_params)
    mngr = checkpointing.manager(run_dir, cfg.train.keep_checkpoints)
    writer = _tensorboard(run_dir) if lead else None

    episode_ticks = int(np.max(cluster_params(cfg, "train").max_steps_in_episode))
    privacy_at = lambda units: trainers.privacy_report(cfg, units, episode_ticks)  # noqa: E731
    steps = trainer.env_steps_per_unit
    bar = tqdm(total=trainer.units_total * steps, initial=done * steps, unit="step", unit_scale=True, disable=quiet, desc="train")
    try:
        while done < trainer.units_total:
            t0 = time.perf_counter()
            new_state, metrics = chunk_fn(state, hp, per_chunk)
            jax.block_until_ready(metrics)
            dt = time.perf_counter() - t0
            bad = sorted((k for k, ok in jax.device_get(finite_flags(new_state, metrics)).items() if not ok), key=lambda k: (k.startswith("metric"), k))
            if bad:
                mngr.wait_until_finished()
                latest = mngr.latest_step()
                if latest is not None:
                    kept = f"the latest checkpoint is still step {latest} ({run_dir / 'checkpoints' / str(latest)})"
                else:
                    kept = "no checkpoint had been saved" + (", so the new run directory is removed" if created else "")
                raise TrainingError(
                    f"{run_dir}: training stopped: the chunk of {unit} {done + 1}-{done + per_chunk} (of {trainer.units_total}) produced "
                    f"non-finite values in {', '.join(bad[:4])}{' and more' if len(bad) > 4 else ''}; nothing of it was logged or saved, and {kept}. "
                    "Resuming would repeat it: start a new run with a changed config (a lower ppo.lr, say)"
                )
            state = new_state
            done = trainer.units_done(state)
            eval_metrics = evaluation.run_episodes(
                env, policy, eval_params, jax.random.PRNGKey(10_000), EVAL_SEEDS, EVAL_TICKS, trainer.weights(state), trainer.per_node
            )
            eval_reward = trainers.eval_score(cfg, eval_metrics)
            record = {
                "event": "train",
                "unit": done,
                "env_steps": done * steps,
                "steps_per_s": per_chunk * steps / dt,
                **{k: _recent_mean(v, per_chunk) for k, v in metrics.items()},
                "eval_reward": eval_reward,
                # (epsilon, delta, unit, mechanism) per protected unit; [] = no guarantee
                "privacy": privacy_at(done),
            }
            if lead:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if writer is not None:
                for k, v in record.items():
                    if isinstance(v, float):
                        writer.add_scalar(k, v, record["env_steps"])
            checkpointing.save(mngr, done, state, hp, config_lib.to_dict(cfg), eval_reward)
            bar.update(per_chunk * steps)
            multipliers = {f"lam{k[-1]}": f"{v:.2f}" for k, v in record.items() if k.startswith("multiplier_") and isinstance(v, float)}
            if hp.cost_limits is not None and "cost_0_by_region" in record:  # regions over a limit / region-constraints
                over = [c > lim for i, lim in enumerate(np.asarray(hp.cost_limits)) for c in record[f"cost_{i}_by_region"]]
                multipliers["over"] = f"{sum(over)}/{len(over)}"
            multipliers.update({f"eps_{r['unit']}": f"{r['epsilon']:.3g}(d={r['delta']:g})" for r in record["privacy"]})
            bar.set_postfix(sps=f"{record['steps_per_s']:.3g}", reward=f"{record['reward']:.3f}", eval=f"{eval_reward:.3f}",
                            e2e_s=f"{record['e2e_mean_s']:.2f}", slo=f"{record['slo_attainment']:.3f}", cost_h=f"{record['cost_usd_per_h']:.1f}",
                            **multipliers)
    except BaseException:
        mngr.wait_until_finished()
        mngr.close()
        if created and lead and not checkpointing.steps(run_dir):  # a failed fresh run leaves no directory
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        bar.close()
    mngr.wait_until_finished()
    mngr.close()
    if lead:
        plot_learning_curve(log_path, run_dir / "learning_curve.png")
        privacy = privacy_at(done)
        summary = {"units": done, "unit": unit, "env_steps": done * steps, "privacy": privacy,
                   "privacy_line": trainers.privacy_line(privacy)}
        _write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if not quiet:
            print(f"{run_dir}: {done} {unit}; privacy: {summary['privacy_line']}", flush=True)
    return state, hp


def read_metrics(log_path: Path, say=checkpointing.warn) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not a JSON record (the torn last line
    of a killed run, say) is reported through `say`, with file and line, and left out."""
    lines = Path(log_path).read_bytes().split(b"\n")
    rows = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError
        except ValueError:  # JSONDecodeError and UnicodeDecodeError included
            last = not any(line.strip() for line in lines[i:])
            what = "an incomplete last record (the run was stopped while writing it)" if last else "not a JSON record"
            say(f"{log_path} line {i}: {what}; dropped")
            continue
        rows.append(record)
    return rows


def plot_learning_curve(log_path: Path, out: Path) -> None:
    """Training reward, evaluation reward and the main KPIs against env steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(log_path)
    if not rows:
        return
    x = np.array([r["env_steps"] for r in rows]) / 1e6
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(x, [r["reward"] for r in rows], label="train (rollout mean)")
    axes[0].plot(x, [r["eval_reward"] for r in rows], label="eval (greedy, fixed seeds)")
    axes[0].set_ylabel("reward per tick")
    axes[0].legend(fontsize=8)
    axes[1].plot(x, [100 * r["slo_attainment"] for r in rows])
    axes[1].set_ylabel("SLO attainment (%)")
    axes[2].plot(x, [r["cost_usd_per_h"] for r in rows])
    axes[2].set_ylabel("cost per node ($/h)")
    for a in axes:
        a.set_xlabel("env steps (M)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
