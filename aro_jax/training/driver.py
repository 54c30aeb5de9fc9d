"""Training driver: compiled chunks -> block -> log -> evaluate -> checkpoint (Stoix's
plain Python loop around the compiled learner). Side effects live here, not in ppo.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from aro_jax import config as config_lib
from aro_jax.envs.scenarios import cluster_params
from aro_jax.envs.serving import ServingNodeEnv
from aro_jax.training import checkpointing, evaluation, learned_policy
from aro_jax.training.trainers import hyperparams, make_trainer

EVAL_SEEDS = 2
EVAL_TICKS = 720  # six simulated hours per node: a cheap, fixed-seed score for "best"


def _tensorboard(run_dir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tb"))


def train(cfg: config_lib.ExperimentConfig | None, run_dir: Path, resume: bool = False, quiet: bool = False):
    """Train per `cfg` into `run_dir`, or continue the run there (`resume`, cfg from the
    run); returns (final state, Hyperparams). Where a run was resumed does not change its
    result: the state is restored exactly and each chunk is the same compiled program."""
    run_dir = Path(run_dir)
    lead = jax.process_index() == 0  # in multi-process runs only process 0 logs and prints
    quiet = quiet or not lead
    if resume:
        cfg = checkpointing.load_run_config(run_dir)
    else:
        if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
            raise checkpointing.CheckpointError(f"{run_dir}: already holds checkpoints; use --resume {run_dir} to continue it or choose another run directory")
        run_dir.mkdir(parents=True, exist_ok=True)
        if lead:
            (run_dir / "config.yaml").write_text(config_lib.to_yaml(cfg))

    trainer = make_trainer(cfg)
    hp = hyperparams(cfg)
    per_chunk = trainer.units_total // cfg.train.num_chunks
    mngr = checkpointing.manager(run_dir, cfg.train.keep_checkpoints)
    if resume:
        abstract = jax.eval_shape(trainer.init, jax.random.PRNGKey(0), hp)
        state, hp, _ = checkpointing.restore(run_dir, abstract, jax.eval_shape(lambda: hp))
    else:
        state = jax.jit(trainer.init)(jax.random.PRNGKey(cfg.train.seed), hp)
    done = trainer.units_done(state)
    log_path = run_dir / "metrics.jsonl"
    if resume and lead and log_path.exists():  # drop lines logged after the restored checkpoint
        kept = [r for r in read_metrics(log_path) if r["unit"] <= done]
        log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    chunk_fn = jax.jit(trainer.chunk, static_argnums=2)
    env = ServingNodeEnv(cfg.env.action_set)
    policy = learned_policy.greedy_policy(trainer.network, cfg.ppo.normalize_obs, cfg.ppo.action_masking)
    eval_params = cluster_params(cfg, "diurnal")
    writer = _tensorboard(run_dir)

    steps = trainer.env_steps_per_unit
    bar = tqdm(total=trainer.units_total * steps, initial=done * steps, unit="step", unit_scale=True, disable=quiet, desc="train")
    while done < trainer.units_total:
        t0 = time.perf_counter()
        state, metrics = chunk_fn(state, hp, per_chunk)
        jax.block_until_ready(metrics)
        dt = time.perf_counter() - t0
        done = trainer.units_done(state)
        eval_metrics = evaluation.run_episodes(
            env, policy, eval_params, jax.random.PRNGKey(10_000), EVAL_SEEDS, EVAL_TICKS, trainer.weights(state), trainer.per_node
        )
        eval_reward = float(np.mean(eval_metrics["reward"]))
        record = {
            "event": "train",
            "unit": done,
            "env_steps": done * steps,
            "steps_per_s": per_chunk * steps / dt,
            **{k: float(np.mean(v[-max(1, per_chunk // 4):])) for k, v in metrics.items()},
            "eval_reward": eval_reward,
        }
        if lead:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if writer is not None and lead:
            for k, v in record.items():
                if isinstance(v, float):
                    writer.add_scalar(k, v, record["env_steps"])
        checkpointing.save(mngr, done, state, hp, config_lib.to_dict(cfg), eval_reward)
        bar.update(per_chunk * steps)
        bar.set_postfix(sps=f"{record['steps_per_s']:.3g}", reward=f"{record['reward']:.3f}", eval=f"{eval_reward:.3f}",
                        e2e_s=f"{record['e2e_mean_s']:.2f}", slo=f"{record['slo_attainment']:.3f}", cost_h=f"{record['cost_usd_per_h']:.1f}")
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    if lead:
        plot_learning_curve(log_path, run_dir / "learning_curve.png")
    return state, hp


def read_metrics(log_path: Path) -> list[dict]:
    with open(log_path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
