"""`aro optimize`: batched ask/tell Bayesian optimisation (Optuna) of a sweep file's bo:
parameters, each batch one vmapped training program; resumable studies with crash recovery."""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import numpy as np

from aro_jax.config import ConfigError
from aro_jax.sweep.run import write_best_config
from aro_jax.sweep.spec import BOSpec, SweepSpec
from aro_jax.sweep.vectorised import SweepTrainer, mean_over_seeds


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
        kpis = mean_over_seeds(per_run, len(padded), spec.seeds)[: len(points)]
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
