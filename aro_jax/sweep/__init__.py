"""Vectorised hyperparameter sweeps and batched Bayesian optimisation (rejax style): sweep
files (`spec`), one compiled program over points x seeds (`vectorised`), `aro sweep`'s
report (`run`) and `aro optimize` (`optimize`)."""

from aro_jax.sweep.optimize import operator_objective, recover_stale_trials, run_optimize
from aro_jax.sweep.run import SweepResult, run_sweep, write_best_config
from aro_jax.sweep.spec import SWEEPABLE, BOSpec, Objective, SweepSpec, load_sweep
from aro_jax.sweep.vectorised import SweepTrainer

__all__ = [
    "SWEEPABLE", "BOSpec", "Objective", "SweepResult", "SweepSpec", "SweepTrainer", "load_sweep", "operator_objective",
    "recover_stale_trials", "run_optimize", "run_sweep", "write_best_config",
]
