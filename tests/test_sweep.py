"""Vectorised sweeps and resumable Bayesian optimisation (aro_jax/sweep.py) on tiny configs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from aro_jax import sweep
from aro_jax.config import CONFIG_DIR, ConfigError, load_config

# One node, 2 clusters, 3 PPO updates of 8 steps, 32-tick evaluation episodes.
TINY = [
    "cluster.nodes=[{name: node-0}]", "env.num_clusters=2", "env.episode_ticks=32", "ppo.rollout_steps=8",
    "ppo.num_minibatches=2", "ppo.update_epochs=1", "ppo.hidden_sizes=[16,16]", "train.total_env_steps=48",
    "train.num_chunks=1", "eval.num_seeds=2", "objective.kind=paper",
]


def write_sweep(tmp_path: Path, body: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"base": str(CONFIG_DIR / "centralized.yaml"), "overrides": TINY, **body}))
    return path


@pytest.mark.timeout(600)
def test_sweep_of_eight_points_is_one_program_and_finds_the_known_best(tmp_path):
    # A learning rate of 1e-9 leaves every point with the same (initial) policy, since all
    # points share the seeds; the evaluation episodes are then identical and the reward is
    # alpha * served share + the same remainder: strictly increasing in alpha, so the
    # largest alpha is certainly best and the reward column is certainly monotone.
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    path = write_sweep(tmp_path, {"grid": {"alpha": alphas[::-1][:4] + alphas[:4], "lr": [1e-9]}, "seeds": 2, "objective": "reward"})
    spec = sweep.load_sweep(path)
    assert len(spec.points) == 8
    result = sweep.run_sweep(spec, tmp_path / "out", quiet=True)

    assert result.traces == 1  # 8 points x 2 seeds: one traced (compiled) training program
    best = result.rows[result.best_index]
    assert best["alpha"] == max(alphas)
    by_alpha = sorted(result.rows, key=lambda r: r["alpha"])
    rewards = [r["reward"] for r in by_alpha]
    assert all(b > a for a, b in zip(rewards, rewards[1:])), rewards
    # Same policy everywhere: the reward-independent KPIs agree across points.
    assert np.ptp([r["cost_usd_per_h"] for r in result.rows]) < 1e-6 * max(1.0, best["cost_usd_per_h"])

    files = result.files
    for key in ("csv", "md", "json", "best", "plot"):
        assert files[key].stat().st_size > 0
    header = files["csv"].read_text().splitlines()[0].split(",")
    assert {"alpha", "lr", "cost_usd_per_mtok", "slo_attainment_pct", "reward"} <= set(header)
    assert len(files["csv"].read_text().splitlines()) == 9
    # best.yaml is a ready-to-run config: it loads and carries the chosen values.
    cfg = load_config(files["best"])
    assert cfg.env.reward.alpha == max(alphas) and cfg.ppo.lr == pytest.approx(1e-9)
    assert cfg.env.num_clusters == 2 and cfg.federated.mode == "centralized"


def test_sweep_keys_accept_config_names_and_random_sampling(tmp_path):
    path = write_sweep(tmp_path, {"random": {"ppo.lr": {"low": 1e-5, "high": 1e-2, "log": True}, "env.reward.cost_weight": {"low": 0.5, "high": 2.0}},
                                  "num_samples": 5, "seed": 3})
    spec = sweep.load_sweep(path)
    assert len(spec.points) == 5 and set(spec.points[0]) == {"lr", "cost_weight"}
    assert all(1e-5 <= p["lr"] <= 1e-2 and 0.5 <= p["cost_weight"] <= 2.0 for p in spec.points)
    assert spec.points == sweep.load_sweep(path).points  # seeded
    explicit = sweep.load_sweep(write_sweep(tmp_path, {"points": [{"lr": 1e-3, "ent_coef": 0.0}, {"lr": 3e-4}]}, "p.yaml"))
    assert explicit.points == [{"lr": 1e-3, "ent_coef": 0.0}, {"lr": 3e-4}]


@pytest.mark.parametrize("body, message", [
    ({"grid": {"ppo.hidden_sizes": [[32], [64]]}}, "'ppo.hidden_sizes' cannot vary inside one compiled program"),
    ({"grid": {"env.num_clusters": [2, 4]}}, "'env.num_clusters' cannot vary"),
    ({"grid": {"learning_rate": [1e-3]}}, "unknown hyperparameter 'learning_rate'"),
    ({"grid": {"lr": [1e-3]}, "colour": "red"}, "sweep key 'colour': unknown"),
    ({"grid": {"lr": [1e-3]}, "points": [{"lr": 1e-3}]}, "give one of grid:, random:, points:"),
    ({}, "a sweep needs one of grid:, random:, points:"),
    ({"grid": {"lr": ["fast"]}}, "sweep key 'grid.lr': expected a number"),
    ({"grid": {"alpha": [1.0, -1.0]}}, "config key 'env.reward.alpha': must be >= 0"),
    ({"random": {"lr": {"low": 1e-3, "high": 1e-4}}, "num_samples": 2}, "low must be < high"),
    ({"random": {"lr": {"low": 1e-4, "high": 1e-3}}}, "needs a positive integer num_samples"),
    ({"grid": {"lr": [1e-3]}, "objective": "happiness"}, "sweep key 'objective'"),
    ({"grid": {"lr": [1e-3]}, "seeds": 0}, "sweep key 'seeds'"),
    ({"grid": {"lr": [1e-3]}, "overrides": ["federated.mode=federated"]}, "config key 'federated.mode'"),
])
def test_invalid_sweep_files_name_the_problem(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"base": str(CONFIG_DIR / "centralized.yaml"), "overrides": body.pop("overrides", TINY), **body}))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", "'")):
        sweep.load_sweep(path)


def test_invalid_bo_sections(tmp_path):
    def bad(bo, message, require="bo"):
        with pytest.raises(ConfigError, match=message):
            sweep.load_sweep(write_sweep(tmp_path, {"bo": bo}), require)

    bad({"parameters": {"ppo.hidden_sizes": {"low": 1, "high": 2}}}, "cannot vary")
    bad({"parameters": {"alpha": {"low": 0.1, "high": 2}}, "sampler": "cmaes"}, "bo.sampler")
    bad({"parameters": {"alpha": {"low": 0.1, "high": 2}}, "slo_target": 99}, "bo.slo_target")
    bad({"parameters": {"alpha": {"low": 0.1, "high": 2}}, "trials": 0}, "bo.trials")
    bad({"parameters": {"alpha": {"low": -1.0, "high": 2}}}, "env.reward.alpha")
    with pytest.raises(ConfigError, match="needs a bo: section"):
        sweep.load_sweep(write_sweep(tmp_path, {"grid": {"lr": [1e-3]}}), "bo")


def test_operator_objective_penalises_missing_the_slo():
    ok = {"slo_attainment_pct": 99.5, "cost_usd_per_mtok": 3.0}
    miss = {"slo_attainment_pct": 95.0, "cost_usd_per_mtok": 1.0}
    assert sweep.operator_objective(ok, 0.99, 1000.0) == (3.0, True)
    value, feasible = sweep.operator_objective(miss, 0.99, 1000.0)
    assert not feasible and value == pytest.approx(1.0 + 1000.0 * 0.04) and value > 3.0
    assert sweep.operator_objective(miss, 0.9, 1000.0) == (1.0, True)  # a looser bar


@pytest.mark.timeout(900)
def test_optimize_resumes_after_the_process_is_killed(tmp_path):
    import optuna

    trials, batch = 6, 2
    path = write_sweep(tmp_path, {"seeds": 1, "bo": {
        "parameters": {"alpha": {"low": 0.1, "high": 4.0, "log": True}, "cost_weight": {"low": 0.1, "high": 4.0, "log": True}},
        "trials": trials, "batch_size": batch, "slo_target": 0.5, "study_name": "resume", "seed": 0}})
    run_dir = tmp_path / "bo"
    storage = f"sqlite:///{(run_dir / 'study.db').resolve()}"
    # The real `aro optimize`; in the first run the second batch's evaluation stalls, so the
    # kill certainly lands after batch 1 is told and while batch 2 is asked but not told.
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import os, sys, time\n"
        "from aro_jax import cli, sweep\n"
        "evaluate, calls = sweep.SweepTrainer.evaluate, []\n"
        "def stalling(self, *a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2 and os.environ.get('STALL_SECOND_BATCH'):\n"
        "        time.sleep(600)\n"
        "    return evaluate(self, *a, **k)\n"
        "sweep.SweepTrainer.evaluate = stalling\n"
        "sys.exit(cli.main(sys.argv[1:]))\n")
    cmd = [sys.executable, str(launcher), "optimize", str(path), "--run-dir", str(run_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def complete():
        # Poll the worker's log of told trials, not the database: opening the study from
        # here while the worker creates its tables would race on the schema.
        log = run_dir / "trials.jsonl"
        return len(log.read_text().splitlines()) if log.exists() else 0

    proc = subprocess.Popen(cmd, env={**env, "STALL_SECOND_BATCH": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while complete() < batch and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()
    # The schema exists now (a trial was told), so reading the study cannot race its creation.
    # Kill while the next batch is asked but not told.
    while time.time() < deadline and proc.poll() is None:
        running = optuna.load_study(study_name="resume", storage=storage).get_trials(states=(optuna.trial.TrialState.RUNNING,))
        if running:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = complete()
    assert batch <= killed_at < trials

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr

    study = optuna.load_study(study_name="resume", storage=storage)
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(finished) == trials
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    evaluated = [json.loads(line)["trial"] for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert len(evaluated) == len(set(evaluated)) == trials  # no trial number was evaluated twice
    assert sorted(evaluated) == sorted(t.number for t in finished)
    # Trials left RUNNING by the kill were failed and their proposals evaluated once more.
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    retried = {t.user_attrs.get("retry_of") for t in finished} - {None}
    assert failed and retried == {t.number for t in failed}
    summary = json.loads((run_dir / "best.json").read_text())
    assert summary["finished"] == trials and (run_dir / "best.yaml").exists()
    load_config(run_dir / "best.yaml")


@pytest.mark.timeout(600)
def test_slo_target_sweep_is_one_program_with_per_point_limits(tmp_path):
    path = write_sweep(tmp_path, {"overrides": [*TINY, "objective.kind=slo", "objective.slo_margin=0"], "grid": {"slo_target": [0.8, 0.9, 0.99]}})
    spec = sweep.load_sweep(path)
    trainer = sweep.SweepTrainer(spec.config())
    hp = trainer.hyperparams(spec.points, seeds=1)
    np.testing.assert_allclose(np.asarray(hp.cost_limits)[:, 0], [0.2, 0.1, 0.01], rtol=1e-5)
    states, _ = trainer.train(spec.points, seeds=1)
    assert trainer.traces == 1
    assert states.constraint.multipliers.shape == (3, 3)  # points x (misses, drops, quality loss)


def test_slo_target_needs_the_slo_objective(tmp_path):
    with pytest.raises(ConfigError, match="objective.kind=slo"):
        sweep.load_sweep(write_sweep(tmp_path, {"grid": {"slo_target": [0.8, 0.9]}}))


def test_paper_reward_weights_need_the_paper_objective(tmp_path):
    with pytest.raises(ConfigError, match="objective.kind=paper"):
        sweep.load_sweep(write_sweep(tmp_path, {"overrides": [*TINY, "objective.kind=slo"], "grid": {"alpha": [0.5, 1.0]}}))


def test_every_sweepable_name_is_a_config_key_that_reaches_the_hyperparameters():
    """Each SWEEPABLE value set as a config override changes the run's Hyperparams (the
    multipliers' PID gains once named ppo.* keys that the config did not have)."""
    import dataclasses

    import jax

    from aro_jax.sweep.spec import SWEEPABLE
    from aro_jax.training import trainers

    for name, key in SWEEPABLE.items():
        kind = "objective.kind=" + ("paper" if key.startswith("env.reward.") else "slo")  # reward weights: the paper objective's
        base = trainers.hyperparams(load_config(None, [kind]))
        hp = trainers.hyperparams(load_config(None, [kind, f"{key}=0.123"]))
        leaves = lambda h: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(h)])  # noqa: E731
        assert not np.allclose(leaves(hp), leaves(base)), key
        if name in {f.name for f in dataclasses.fields(hp)}:
            assert float(getattr(hp, name)) == pytest.approx(0.123), key


def test_sweep_evaluates_a_trace_scenario_for_the_traces_own_length(tmp_path):
    """A one-hour trace is evaluated over its own ticks, not a day whose other 23 hours
    have no arrivals (which flattered every cheap policy's cost per token)."""
    from aro_jax.config import load_config
    from aro_jax.sweep.vectorised import SweepTrainer

    traces = tmp_path / "data" / "traces"
    traces.mkdir(parents=True)
    rows = "".join(f"{t}.0,{100 + t},{10 + t}\n" for t in range(0, 100, 5))  # 100 s: 4 ticks of 30 s
    (traces / "AzureLLMInferenceTrace_conv.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + rows)
    cfg = load_config(None, ["eval.scenario=trace-conv", f"env.data_dir={tmp_path / 'data'}"])
    sweep = SweepTrainer(cfg)
    assert sweep._eval_ticks == 4 < cfg.env.episode_ticks
    assert float(sweep._eval_params.traffic.replay_weight[0]) == 1.0
